"""How the weights move after each step, the part a copy swaps: timm's RMSpropTF and parameter groups, its
learning-rate schedules, and the weights' EMA. Each says why it is not torch's; test/test_recipe_parts.py checks them
against timm.
"""

import copy
import math

import torch

from errors import UsageError

# Optimizer


class RMSpropTF(torch.optim.Optimizer):
    """TensorFlow-1 RMSprop as timm's (not torch's): the square average starts at one (torch: zero), eps sits
    inside the root, lr is accumulated in the momentum buffer; weight decay is L2 added to the gradient."""

    # On the CPU, foreach ops over the whole model allocate model-sized temporaries, returned to the OS every
    # step; chunks of this many elements reuse theirs (docs/measurements.md, Speed). Accelerators: one piece.
    cpu_chunk_numel = 1 << 18

    def __init__(self, params, lr=1e-2, alpha=0.9, eps=1e-10, weight_decay=0.0, momentum=0.9):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(square_avg=torch.ones_like(p), momentum_buffer=torch.zeros_like(p))
            chunk = []
            numel = 0
            for p in params:
                if chunk and p.device.type == 'cpu' and numel + p.numel() > self.cpu_chunk_numel:
                    self._update(group, chunk)
                    chunk = []
                    numel = 0
                chunk.append(p)
                numel += p.numel()
            if chunk:
                self._update(group, chunk)

    def _update(self, group, params):
        grads = [p.grad for p in params]
        if group['weight_decay']:
            grads = torch._foreach_add(grads, params, alpha=group['weight_decay'])
        square_avg = [self.state[p]['square_avg'] for p in params]
        # TF's order of operations: sa += (g^2 - sa) * (1 - alpha)
        delta = torch._foreach_mul(grads, grads)
        torch._foreach_sub_(delta, square_avg)
        torch._foreach_add_(square_avg, delta, alpha=1.0 - group['alpha'])
        denom = torch._foreach_add(square_avg, group['eps'])
        torch._foreach_sqrt_(denom)
        if group['momentum'] > 0:
            buffers = [self.state[p]['momentum_buffer'] for p in params]
            torch._foreach_mul_(buffers, group['momentum'])
            torch._foreach_addcdiv_(buffers, grads, denom, value=group['lr'])
            torch._foreach_sub_(params, buffers)
        else:
            torch._foreach_addcdiv_(params, grads, denom, value=-group['lr'])


def param_groups(model, weight_decay):
    """timm's grouping: biases and 1-D parameters (BN) get no weight decay."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    undecayed = {name for name, p in trained if p.ndim <= 1 or name.endswith('.bias')}
    no_decay = [p for name, p in trained if name in undecayed]
    decay = [p for name, p in trained if name not in undecayed]
    return [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]


# Learning-rate schedules: timm's change the lr once per epoch, a pure function of the epoch.

SCHEDULES = ('step', 'cosine', 'const')


def learning_rate(epoch, sched, lr, epochs, warmup_lr, warmup_epochs, decay_epochs, decay_rate, min_lr):
    if sched not in SCHEDULES:
        raise UsageError(f"unknown schedule '{sched}': choose {', '.join(SCHEDULES)}")
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
    if sched == 'step':
        return lr * decay_rate ** (epoch // decay_epochs)
    if sched == 'cosine':
        return min_lr if epoch >= epochs else min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))
    return lr  # 'const'


class TimmSchedule(torch.optim.lr_scheduler.LambdaLR):
    """timm's schedule per optimizer step: step s gets learning_rate(s // steps_per_epoch), times a group's lr ratio
    to group 0. Not StepLR (decays only at multiples of step_size; the recipe's epoch // 2.4 decays at 3, 5, 8, ...)
    nor SequentialLR (restarts the count after the warm-up); both change the lr each step(), timm's once an epoch."""

    def __init__(self, optimizer, steps_per_epoch, sched, epochs, warmup, decay, min_lr):
        """warmup: (--warmup-lr, --warmup-epochs); decay: (--decay-epochs, --decay-rate) of the step schedule."""
        lr = optimizer.param_groups[0]['lr']
        self.sched = sched
        schedule = (sched, lr, epochs, *warmup, *decay, min_lr)
        learning_rate(0, *schedule)  # an unknown name fails here, not at the first step
        super().__init__(optimizer, lambda step: learning_rate(step // steps_per_epoch, *schedule) / lr)


# EMA of weights and BN buffers


class ModelEma(torch.nn.Module):
    """timm's ModelEmaV2: a copy whose parameters and buffers follow e = decay * e + (1 - decay) * w after every
    optimizer step, from the first on. Faster than torch's AveragedModel, which copies a counter to the device
    each step (a host sync on CUDA) and loops over integer buffers in Python (docs/measurements.md, Speed)."""

    def __init__(self, model, decay):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model):
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()]))
        floats = [pair for pair in pairs if pair[0].is_floating_point()]
        ints = [pair for pair in pairs if not pair[0].is_floating_point()]
        if floats:
            averaged, current = zip(*floats)
            torch._foreach_lerp_(list(averaged), list(current), 1.0 - self.decay)
        if ints:  # BN's num_batches_tracked: computed in float32 and truncated back, as timm's d * e + (1 - d) * w
            averaged, current = (list(tensors) for tensors in zip(*ints))
            mixed = torch._foreach_mul(averaged, self.decay)
            torch._foreach_add_(mixed, torch._foreach_mul(current, 1.0 - self.decay))
            torch._foreach_copy_(averaged, mixed)
