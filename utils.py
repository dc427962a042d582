"""Small shared pieces for train.py: optimizer, lr schedule, EMA, meters, checkpoints, distributed.

RMSpropTF and the step schedule are our own because timm's exact semantics differ from torch's
(tested against timm in test/test_utils.py); everything else is torch's own machinery.
"""
import math
import os
import random

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class UsageError(ValueError):
    """Bad input from the command line or the machine: one line, exit status 2, no traceback."""


# ----------------------------------------------------------------------------------------------
# Optimizer

class RMSpropTF(torch.optim.Optimizer):
    """TensorFlow-1 RMSprop as timm implements it, updated with foreach kernels:
    the square average starts at one (torch: zero), eps sits inside the root, and lr is
    accumulated inside the momentum buffer. Weight decay is L2 added to the gradient."""

    def __init__(self, params, lr=1e-2, alpha=0.9, eps=1e-10, weight_decay=0.0, momentum=0.9):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]['square_avg'] = torch.ones_like(p)
                    self.state[p]['momentum_buffer'] = torch.zeros_like(p)
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


def create_optimizer(name, model, lr, weight_decay, momentum=0.9, eps=None):
    groups = param_groups(model, weight_decay)
    if name == 'rmsproptf':
        return RMSpropTF(groups, lr=lr, alpha=0.9, eps=1e-10 if eps is None else eps,
                         momentum=momentum)
    if name == 'sgd':  # timm's 'sgd' is Nesterov momentum
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, foreach=True)
    if name == 'adamw':
        return torch.optim.AdamW(groups, lr=lr, eps=1e-8 if eps is None else eps, foreach=True)
    raise UsageError(f"unknown optimizer '{name}': choose rmsproptf, sgd or adamw")


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule: a pure function of the epoch (timm changes the lr once per epoch),
# so resuming needs nothing but the epoch.

def learning_rate(epoch, sched, lr, epochs, warmup_lr, warmup_epochs, decay_epochs, decay_rate,
                  min_lr):
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
    if sched == 'step':
        return lr * decay_rate ** (epoch // decay_epochs)
    if sched == 'cosine':
        if epoch >= epochs:
            return min_lr
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))
    return lr  # 'const'


# ----------------------------------------------------------------------------------------------
# EMA of weights and BN buffers

def create_ema(model, decay):
    """timm's ModelEmaV2 semantics with torch's AveragedModel (foreach lerp):
    every step, each parameter and buffer e = decay * e + (1 - decay) * w."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    # AveragedModel copies the weights on its first update; timm decays from the first step.
    ema.n_averaged.fill_(1)
    return ema


# ----------------------------------------------------------------------------------------------
# Meters

class AverageMeter:
    def __init__(self):
        self.val, self.sum, self.count = 0.0, 0.0, 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n

    @property
    def avg(self):
        return self.sum / max(self.count, 1)


def accuracy(output, target, topk=(1, 5)):
    """Number of samples whose target is in the top-k predictions, for each k (a tensor)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return torch.stack([hit[:, :min(k, maxk)].any(dim=1).sum() for k in topk])


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, weights-only reads

def atomic_save(obj, path):
    """Write to a temporary file in the same folder, fsync, rename: a kill at any moment leaves
    either the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def rng_state():
    """Every random stream the training step draws from, as tensors and plain types."""
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


# ----------------------------------------------------------------------------------------------
# Devices and processes

def select_device(name, local_rank):
    """'auto' picks cuda, then an Ascend npu (torch_npu imported only if installed), then cpu."""
    if name == 'auto':
        if torch.cuda.is_available():
            name = 'cuda'
        else:
            import importlib.util
            name = 'npu' if importlib.util.find_spec('torch_npu') else 'cpu'
            if name == 'npu':
                import torch_npu  # noqa: F401  (registers the device)
                name = 'npu' if torch.npu.is_available() else 'cpu'
    if name == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"process {local_rank} has no GPU: {torch.cuda.device_count()} "
                               f"visible; start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        return torch.device('cuda', local_rank)
    if name == 'npu':
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            raise UsageError("--device npu: torch_npu is not installed (Ascend's PyTorch "
                               "adapter); install it or use --device cpu") from None
        if local_rank >= torch.npu.device_count():
            raise UsageError(f"process {local_rank} has no NPU: {torch.npu.device_count()} "
                               f"visible; start at most that many processes per node")
        torch.npu.set_device(local_rank)
        return torch.device('npu', local_rank)
    return torch.device('cpu')


def distributed_env():
    """(rank, world_size, local_rank) as set by torchrun / torch.distributed.launch."""
    return (int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)),
            int(os.environ.get('LOCAL_RANK', 0)))


def init_distributed(device, timeout_s=1800):
    import datetime
    backend = {'cuda': 'nccl', 'npu': 'hccl'}.get(device.type, 'gloo')
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def all_reduce_sum(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_bn_stats(model, world_size):
    """timm's distribute_bn('reduce'): average BN running statistics over ranks before eval."""
    if world_size == 1:
        return
    for name, buf in model.named_buffers():
        if 'running_mean' in name or 'running_var' in name:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world_size)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'npu':
        torch.npu.synchronize()
