"""The optimizer side of the recipe, the part a copy swaps: timm's RMSpropTF, parameter groups, lr schedules, the
weights' EMA, mixed precision, progressive learning. Each says why it is not torch's; test/test_utils.py checks."""

import contextlib
import copy
import importlib
import math

import torch

from errors import UsageError

# ----------------------------------------------------------------------------------------------
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
            chunk, numel = [], 0
            for p in params:
                if chunk and p.device.type == 'cpu' and numel + p.numel() > self.cpu_chunk_numel:
                    self._update(group, chunk)
                    chunk, numel = [], 0
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
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith('.bias') else decay).append(p)
    return [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]


# ----------------------------------------------------------------------------------------------
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

    def __init__(
        self, optimizer, steps_per_epoch, sched, epochs, warmup_lr, warmup_epochs, decay_epochs, decay_rate, min_lr
    ):
        lr, self.sched = optimizer.param_groups[0]['lr'], sched
        schedule = dict(
            sched=sched,
            lr=lr,
            epochs=epochs,
            warmup_lr=warmup_lr,
            warmup_epochs=warmup_epochs,
            decay_epochs=decay_epochs,
            decay_rate=decay_rate,
            min_lr=min_lr,
        )
        learning_rate(0, **schedule)  # an unknown name fails here, not at the first step
        super().__init__(optimizer, lambda step: learning_rate(step // steps_per_epoch, **schedule) / lr)


# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Mixed precision


class Precision:
    """Native or apex O1: autocast(), backward(loss), step(optimizer, clip_grad) -> skipped, state_dict (loss scale).
    Native float16 has a GradScaler (skips non-finite steps, lowers its scale); bfloat16 and float32 need none.
    `skipped` is False where no step is skipped, a bool under apex, and a bool tensor on the device under the
    GradScaler: it stays there, so a step waits for the device only in the scaler's own check."""

    def __init__(self, device_type, dtype=None, apex_optimizer=None):
        self.device_type, self.dtype, self.apex_optimizer = device_type, dtype, apex_optimizer
        self.apex_amp = importlib.import_module('apex.amp') if apex_optimizer is not None else None
        self.scaler = grad_scaler(device_type, enabled=dtype == torch.float16 and not self.apex_amp)
        self.apex_overflowed = False

    def autocast(self):
        if self.dtype is None or self.apex_amp:  # apex casts by itself
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, self.dtype)

    def backward(self, loss):
        if not self.apex_amp:
            self.scaler.scale(loss).backward()
            return
        scale = self.loss_scale()
        with self.apex_amp.scale_loss(loss, self.apex_optimizer) as scaled_loss:
            scaled_loss.backward()
        # apex checks the gradients as scale_loss exits: after an overflow it has already lowered its scale and
        # turned the next optimizer.step() into a no-op, so only the scale before and after tells a skipped step.
        self.apex_overflowed |= self.loss_scale() < scale

    def step(self, optimizer, clip_grad=None):
        if clip_grad:  # on the true gradients: GradScaler unscales them here (apex already has; its scaler is off)
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group['params']], clip_grad)
        if self.apex_amp:
            optimizer.step()
            skipped, self.apex_overflowed = self.apex_overflowed, False
            return skipped
        if not self.scaler.is_enabled():
            optimizer.step()
            return False
        # The scale as a tensor (get_scale() would wait for the device); a skipped step lowers it.
        scale = self.scaler._get_scale_async().clone()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler._get_scale_async() < scale

    def loss_scale(self):
        if self.apex_amp:
            return self.apex_amp._amp_state.loss_scalers[0].loss_scale()
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def state_dict(self):  # apex: {'loss_scaler0': {...}}; the GradScaler's: {} when disabled
        return self.apex_amp.state_dict() if self.apex_amp else self.scaler.state_dict()

    def load_state_dict(self, state):
        """Another kind's state (fp16 <-> apex, or none saved) is ignored: the scale starts afresh."""
        if self.apex_amp and 'loss_scaler0' in state:
            self.apex_amp.load_state_dict(state)
        elif self.scaler.is_enabled() and 'scale' in state:
            self.scaler.load_state_dict(state)


def grad_scaler(device_type, enabled):
    """torch's GradScaler; on an Ascend NPU torch_npu's, as Ascend documents: it also reads the NPU's overflow
    flags (fp16 there may saturate instead of reaching inf) and all-reduces the overflow over ranks."""
    if device_type == 'npu' and enabled:
        return importlib.import_module('torch_npu.npu.amp').GradScaler()
    return torch.amp.GradScaler(device_type, enabled=enabled)


def create_precision(device, model, optimizer, amp=False, amp_dtype=None, apex=False, say=print):
    """-> (Precision, model, optimizer). --amp: native; --apex-amp: apex O1 where it imports (GPU, NPU), else native,
    saying so. The default dtype is float16 on accelerators, bfloat16 on the CPU."""
    dtype = getattr(torch, amp_dtype or ('bfloat16' if device.type == 'cpu' else 'float16'))
    if apex and device.type != 'cpu':
        try:
            from apex import amp as apex_amp
        except ImportError:  # not installed, or a recent apex without amp
            pass
        else:
            model, optimizer = apex_amp.initialize(model, optimizer, opt_level='O1')
            return Precision(device.type, dtype, apex_optimizer=optimizer), model, optimizer
    if apex:
        say(
            f'--apex-amp: NVIDIA apex is not available here; using native mixed precision '
            f'({str(dtype).replace("torch.", "")})'
        )
    return Precision(device.type, dtype if amp or apex else None), model, optimizer


# ----------------------------------------------------------------------------------------------
# Progressive learning (the EfficientNetV2 paper, section 4): image size and regularization rise by stage


def stage_settings(args, epoch):
    """What the epoch trains with. Without --progressive: the flags. With it, the paper's progressive
    learning: image size, RandAugment magnitude, mixup and dropout rise by stage."""
    magnitude = args.rand_augment['magnitude'] if args.rand_augment else None
    if not args.progressive:
        return dict(
            stage=0,
            size=args.img_size,
            magnitude=magnitude,
            mixup=args.mixup,
            drop=args.drop,
            epochs=(0, args.epochs - 1),
        )
    stages = args.prog_stages
    stage_of = lambda e: min(e * stages // args.epochs, stages - 1)  # noqa: E731
    stage = stage_of(epoch)  # a pure function of the epoch: resuming needs nothing else
    in_stage = [e for e in range(args.epochs) if stage_of(e) == stage]
    # The size's first stage is already a step up from the minimum (the paper's V2-S: 171, 214, 257, 300);
    # the others start at their minimum and reach the flag's value in the last stage.
    size = args.prog_min_size + (args.img_size - args.prog_min_size) * (stage + 1) // stages
    ratio = stage / max(stages - 1, 1)
    lerp = lambda low, high: low + (high - low) * ratio  # noqa: E731
    if args.rand_augment:  # a minimum above the flag's value is capped to it: regularization never falls
        magnitude = lerp(min(args.prog_min_aa, magnitude), magnitude)
    return dict(
        stage=stage,
        size=size,
        magnitude=magnitude,
        mixup=lerp(0.0, args.mixup),
        drop=lerp(min(args.prog_min_drop, args.drop), args.drop),
        epochs=(in_stage[0], in_stage[-1]),
    )


def describe_stage(settings, args):
    first, last = settings['epochs']
    magnitude = 'off' if settings['magnitude'] is None else f'{settings["magnitude"]:.2f}'
    compiles = ', torch.compile compiles once for this size' if args.compile else ''
    return (
        f'Stage {settings["stage"] + 1}/{args.prog_stages}: epochs {first}-{last}, image size '
        f'{settings["size"]} (eval {args.eval_size}), RandAugment magnitude {magnitude}, mixup '
        f'{settings["mixup"]:.3f}, dropout {settings["drop"]:.3f}{compiles}'
    )
