"""Small shared pieces for train.py: optimizer, lr schedule, EMA, mixed precision, the log lines,
atomic writes, distributed helpers, training curves.

    python utils.py plot output/train/RUN [RUN2 ...] [--out curves.png]   # redraw / overlay curves

RMSpropTF and the step schedule are our own because timm's exact semantics differ from torch's, and
ModelEma because torch's AveragedModel syncs with the GPU every step (all tested against timm in
test/test_utils.py); everything else is torch's own machinery.
"""
import contextlib
import copy
import errno
import itertools
import math
import os
import random
import re
import shutil
import sys
import time

import torch
import torch.distributed as dist

from model import CheckpointError


def check_torchvision():
    """Ends the program with one line when torchvision was built for another torch than this one (its
    operators fail to register: 'operator torchvision::nms does not exist'); call it before importing it."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        from importlib.metadata import version
        print(f"error: torchvision {version('torchvision')} does not work with torch {torch.__version__} "
              f"({str(error).splitlines()[0]}); install a matching pair from one index, e.g. "
              f"pip install --force-reinstall torch torchvision", file=sys.stderr, flush=True)
        sys.exit(2)


class UsageError(ValueError):
    """Bad input from the command line or the machine: one line, exit status 2, no traceback."""


class DataError(ValueError):
    """Bad user input about data. The message is one line: what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Optimizer

class RMSpropTF(torch.optim.Optimizer):
    """TensorFlow-1 RMSprop as timm implements it, updated with foreach kernels:
    the square average starts at one (torch: zero), eps sits inside the root, and lr is
    accumulated inside the momentum buffer. Weight decay is L2 added to the gradient."""

    # On the CPU, foreach ops over the whole model allocate model-sized temporaries that the
    # allocator hands back to the OS after every step: ~140 MB of fresh pages (~37k page faults)
    # per step for rw_t, slower than timm's per-tensor loop. Chunks of at most this many elements
    # keep the temporaries small enough to be reused (bench.py: 1.25x faster than timm's loop
    # instead of 1.45x slower). Accelerators take each group in one piece.
    cpu_chunk_numel = 1 << 18

    def __init__(self, params, lr=1e-2, alpha=0.9, eps=1e-10, weight_decay=0.0, momentum=0.9):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p]['square_avg'] = torch.ones_like(p)
                    self.state[p]['momentum_buffer'] = torch.zeros_like(p)
            for chunk in self._chunks(params):
                self._update(group, chunk)

    def _chunks(self, params):
        chunk, numel = [], 0
        for p in params:
            if chunk and p.device.type == 'cpu' and numel + p.numel() > self.cpu_chunk_numel:
                yield chunk
                chunk, numel = [], 0
            chunk.append(p)
            numel += p.numel()
        if chunk:
            yield chunk

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


def learning_rate(epoch, sched, lr, epochs, warmup_lr, warmup_epochs, decay_epochs, decay_rate,
                  min_lr):
    if sched not in SCHEDULES:
        raise UsageError(f"unknown schedule '{sched}': choose {', '.join(SCHEDULES)}")
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
    if sched == 'step':
        return lr * decay_rate ** (epoch // decay_epochs)
    if sched == 'cosine':
        if epoch >= epochs:
            return min_lr
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))
    return lr  # 'const'


class TimmSchedule(torch.optim.lr_scheduler.LambdaLR):
    """timm's schedule as a torch scheduler, stepped after every optimizer step: the lr of step s is
    learning_rate(s // steps_per_epoch, ...) for the first group, and that times its own ratio for any
    group created with another lr (per-group learning rates are kept)."""

    def __init__(self, optimizer, steps_per_epoch, sched, epochs, warmup_lr, warmup_epochs, decay_epochs,
                 decay_rate, min_lr):
        lr, self.sched = optimizer.param_groups[0]['lr'], sched
        schedule = dict(sched=sched, lr=lr, epochs=epochs, warmup_lr=warmup_lr, warmup_epochs=warmup_epochs,
                        decay_epochs=decay_epochs, decay_rate=decay_rate, min_lr=min_lr)
        learning_rate(0, **schedule)  # an unknown name fails here, not at the first step
        super().__init__(optimizer, lambda step: learning_rate(step // steps_per_epoch, **schedule) / lr)


# ----------------------------------------------------------------------------------------------
# EMA of weights and BN buffers

class ModelEma(torch.nn.Module):
    """timm's ModelEmaV2: a copy of the model whose parameters and buffers follow
    e = decay * e + (1 - decay) * w after every optimizer step, from the first step on.

    One foreach lerp for the floating-point tensors and a few foreach ops for the integer ones
    (BN's num_batches_tracked, truncated as timm does). torch's AveragedModel does the same math
    but copies a counter to the device every step (a blocking copy: a host sync on CUDA) and
    loops over the integer buffers in Python; timm loops over every tensor (bench.py)."""

    def __init__(self, model, decay):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update_parameters(self, model):
        pairs = zip([*self.module.parameters(), *self.module.buffers()],
                    [*model.parameters(), *model.buffers()])
        floats, ints = [], []
        for pair in pairs:
            (floats if pair[0].is_floating_point() else ints).append(pair)
        if floats:
            averaged, current = zip(*floats)
            torch._foreach_lerp_(list(averaged), list(current), 1.0 - self.decay)
        if ints:  # computed in float32 and truncated back, as timm's d * e + (1 - d) * w
            averaged, current = (list(tensors) for tensors in zip(*ints))
            mixed = torch._foreach_mul(averaged, self.decay)
            torch._foreach_add_(mixed, torch._foreach_mul(current, 1.0 - self.decay))
            torch._foreach_copy_(averaged, mixed)



# ----------------------------------------------------------------------------------------------
# Mixed precision

class Precision:
    """Mixed precision behind four calls, native or NVIDIA apex: autocast(), backward(loss),
    step(optimizer, clip_grad) -> whether the step was skipped, state_dict()/load_state_dict()
    (the loss scale, saved in checkpoints). Native: torch.autocast, with a GradScaler for float16
    (it skips a step whose gradients are not finite and lowers its scale); bfloat16 and float32
    need none. apex: O1, set up by create_precision (apex patches the model and optimizer)."""

    def __init__(self, device_type, dtype=None, apex_optimizer=None):
        self.device_type, self.dtype, self.apex_optimizer = device_type, dtype, apex_optimizer
        native_fp16 = dtype == torch.float16 and apex_optimizer is None
        self.scaler = torch.amp.GradScaler(device_type, enabled=native_fp16)

    def autocast(self):
        if self.dtype is None or self.apex_optimizer is not None:  # apex casts by itself
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, self.dtype)

    def backward(self, loss):
        if self.apex_optimizer is None:
            self.scaler.scale(loss).backward()
            return
        from apex import amp
        with amp.scale_loss(loss, self.apex_optimizer) as scaled_loss:
            scaled_loss.backward()

    def step(self, optimizer, clip_grad=None):
        scale = self.loss_scale()
        if clip_grad:  # on the true gradients: GradScaler unscales here, apex already has
            if self.apex_optimizer is None:
                self.scaler.unscale_(optimizer)
            parameters = [p for group in optimizer.param_groups for p in group['params']]
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        self.scaler.step(optimizer)  # a plain optimizer.step() when the scaler is disabled
        self.scaler.update()
        # A skipped step halves the scale; reading it costs no extra sync (the scaler synced to decide).
        return scale is not None and self.loss_scale() < scale

    def loss_scale(self):
        if self.apex_optimizer is not None:
            from apex import amp
            return amp._amp_state.loss_scalers[0].loss_scale()
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def state_dict(self):
        if self.apex_optimizer is not None:
            from apex import amp
            return amp.state_dict()  # {'loss_scaler0': {'loss_scale': ..., 'unskipped': ...}}
        return self.scaler.state_dict()  # {} when disabled

    def load_state_dict(self, state):
        """Another kind's state (fp16 <-> apex, or none saved) is ignored: the scale starts afresh."""
        if self.apex_optimizer is not None and 'loss_scaler0' in state:
            from apex import amp
            amp.load_state_dict(state)
        elif self.scaler.is_enabled() and 'scale' in state:
            self.scaler.load_state_dict(state)


def create_precision(device, model, optimizer, amp=False, amp_dtype=None, apex=False, say=print):
    """-> (Precision, model, optimizer). --apex-amp uses apex O1 where apex imports (on a GPU or
    NPU) and native mixed precision otherwise, saying so; --amp is native. The default dtype is
    float16 on accelerators and bfloat16 on the CPU."""
    dtype = getattr(torch, amp_dtype or ('bfloat16' if device.type == 'cpu' else 'float16'))
    if apex and device.type != 'cpu':
        try:
            from apex import amp as apex_amp
        except ImportError:
            pass
        else:
            model, optimizer = apex_amp.initialize(model, optimizer, opt_level='O1')
            return Precision(device.type, dtype, apex_optimizer=optimizer), model, optimizer
    if apex:
        say(f"--apex-amp: NVIDIA apex is not available here; using native mixed precision "
            f"({str(dtype).replace('torch.', '')})")
    return Precision(device.type, dtype if amp or apex else None), model, optimizer


# ----------------------------------------------------------------------------------------------
# The log lines: timm's `Train:` and `Test:` formats, which the ModelZoo scripts parse

AVERAGE_AFTER_STEP = 3  # warm-up steps left out of the running images/s, as the ModelZoo parser wants


class TrainLogger:
    """Times an epoch's optimizer steps and prints timm's `Train:` line at log steps: every `log_interval`-th
    step and the last one to run. Progress and the epoch's loss sum are read from `state` (run.py's
    TrainState: `step` steps done, loss_sum, loss_count); the clock syncs the device only at log steps."""

    def __init__(self, epoch, num_steps, last_step, log_interval, state, device=torch.device('cpu')):
        self.epoch, self.num_batches, self.last_batch = epoch, num_steps, last_step
        self.log_interval, self.state, self.device = log_interval, state, device
        self.first_batch, self.images_per_sec = state.step, 0.0
        self.step_time, self.data_time = AverageMeter(), AverageMeter()

    def log_every(self, loader, micro_batches=1):
        """The loader's batches in lists of `micro_batches` (one optimizer step each) up to last_step,
        timing how long each list took to arrive."""
        self.last_log = data_start = time.perf_counter()
        self.steps_since_log = 0
        batches = iter(loader)
        for _ in range(self.last_batch + 1 - self.first_batch):
            step_batches = list(itertools.islice(batches, micro_batches))
            if len(step_batches) < micro_batches:
                return
            self.data_time.update(time.perf_counter() - data_start)
            yield step_batches
            data_start = time.perf_counter()

    def update(self, loss, batch_size, lr):
        """After each step: prints the line at a log step; -> whether it was one."""
        batch_idx, self.steps_since_log = self.state.step - 1, self.steps_since_log + 1
        if batch_idx % self.log_interval and batch_idx != self.last_batch:
            return False
        synchronize(self.device)
        now = time.perf_counter()
        seconds, steps = (now - self.last_log) / self.steps_since_log, self.steps_since_log
        self.last_log, self.steps_since_log = now, 0
        if batch_idx - self.first_batch >= AVERAGE_AFTER_STEP:
            self.step_time.update(seconds, steps)
        average = self.step_time.avg if self.step_time.count else seconds
        global_batch = batch_size * get_world_size()
        self.images_per_sec = global_batch / average
        loss_now = loss.item()
        log_scalars(self.state.num_updates, 'train', loss=loss_now, lr=lr, images_per_sec=self.images_per_sec)
        if is_main_process():
            average_loss = float(self.state.loss_sum) / self.state.loss_count
            print(f"Train: {self.epoch} [{batch_idx:>4d}/{self.num_batches} "
                  f"({100.0 * batch_idx / max(self.num_batches - 1, 1):>3.0f}%)]  "
                  f"Loss: {loss_now:#.4g} ({average_loss:#.3g})  "
                  f"Time: {seconds:.3f}s, {global_batch / seconds:>7.2f}/s  "
                  f"({average:.3f}s, {global_batch / average:>7.2f}/s)  "
                  f"LR: {lr:.3e}  Data: {self.data_time.val:.3f} ({self.data_time.avg:.3f})", flush=True)
        return True


class EvalLogger:
    """Sums of one validation pass over all ranks, and timm's `Test:` line: each value is the
    batch's over all ranks, in brackets the average so far. Every rank iterates the same number of
    batches (a shorter shard gets empty ones) for the per-batch all-reduce: the loss sum travels as
    float32 and the counts as int32, never float64, which Ascend's HCCL does not reduce
    (https://www.hiascend.com/document/detail/en/canncommercial/850/API/hcclapiref/hcclcpp_07_0020.html);
    the running totals are Python numbers on the host."""

    def __init__(self, log_interval, device, name='Test', is_main=True):
        self.log_interval, self.device, self.name, self.is_main = log_interval, device, name, is_main
        self.totals = dict(loss=0.0, top1=0, top5=0, count=0)
        self.batch_time = AverageMeter()

    def log_every(self, loader, empty_batch):
        """The loader's batches, then `empty_batch` until this rank has had as many as the longest."""
        self.num_batches = max_over_ranks(len(loader), self.device)
        self.end = time.perf_counter()
        batches = itertools.chain(loader, itertools.repeat(empty_batch))
        for self.batch_idx, batch in zip(range(self.num_batches), batches):
            yield batch

    def update(self, loss_sum, hits, count):
        """loss_sum: the batch's summed loss (a tensor); hits: its top-1 and top-5 counts (a tensor)."""
        counts = torch.cat([hits, hits.new_tensor([count])]).int()
        batch = dict(loss=all_reduce_sum(loss_sum.detach().float()).item(),
                     **dict(zip(('top1', 'top5', 'count'), all_reduce_sum(counts).tolist())))
        for key, value in batch.items():
            self.totals[key] += value
        self.batch_time.update(time.perf_counter() - self.end)
        self.end = time.perf_counter()
        if self.is_main and (self.batch_idx % self.log_interval == 0 or self.batch_idx == self.num_batches - 1):
            now, average = self.averages(batch), self.averages(self.totals)
            print(f"{self.name}: [{self.batch_idx:>4d}/{self.num_batches - 1}]  "
                  f"Time: {self.batch_time.val:.3f} ({self.batch_time.avg:.3f})  "
                  f"Loss: {now['loss']:>7.4f} ({average['loss']:>6.4f})  "
                  f"Acc@1: {now['top1']:>7.4f} ({average['top1']:>7.4f})  "
                  f"Acc@5: {now['top5']:>7.4f} ({average['top5']:>7.4f})", flush=True)

    @staticmethod
    def averages(sums):
        count = max(sums['count'], 1)
        return dict(loss=sums['loss'] / count, top1=100 * sums['top1'] / count, top5=100 * sums['top5'] / count)

    def result(self):
        """loss, top1, top5 over every validation image, each counted once."""
        return self.averages(self.totals)


class EpochLogger:
    """The end of each epoch on rank 0: the `Epoch` line, its summary.csv row and curves.png redrawn.
    A rerun epoch (a resumed run redoing a cut-off one) replaces its row, so the file reads as one run."""

    def __init__(self, output, is_main=True):
        self.output, self.is_main, self.draw_curves = output, is_main, is_main

    def log(self, epoch, train_loss, evaluation, ema_evaluation, lr, images_per_sec, bad_images, step=None):
        """`step`: the optimizer steps so far, where TensorBoard draws the epoch's evaluation."""
        if not self.is_main:
            return
        log_scalars(step, 'eval', **evaluation)
        log_scalars(step, 'eval_ema', **(ema_evaluation or {}))
        if _tensorboard is not None:
            _tensorboard.flush()
        row = dict(epoch=epoch, train_loss=f"{train_loss:.6g}", eval_loss=f"{evaluation['loss']:.6g}",
                   eval_top1=f"{evaluation['top1']:.4f}", eval_top5=f"{evaluation['top5']:.4f}",
                   ema_top1=f"{ema_evaluation['top1']:.4f}" if ema_evaluation else '',
                   ema_top5=f"{ema_evaluation['top5']:.4f}" if ema_evaluation else '',
                   lr=f"{lr:.6g}", images_per_sec=f"{images_per_sec:.2f}", bad_images=bad_images)
        print(f"Epoch {epoch}: train_loss {row['train_loss']}  eval_loss {row['eval_loss']}  "
              f"top1 {row['eval_top1']}  top5 {row['eval_top5']}"
              + (f"  ema_top1 {row['ema_top1']}" if ema_evaluation else '')
              + f"  lr {row['lr']}  images/s {row['images_per_sec']}  skipped_images {bad_images}", flush=True)
        write_summary(os.path.join(self.output, 'summary.csv'), row)
        self.draw()

    def draw(self):
        """curves.png next to summary.csv (said once if matplotlib is missing)."""
        if not self.draw_curves:
            return
        try:
            plot_curves([self.output], os.path.join(self.output, 'curves.png'))
        except ImportError:
            self.draw_curves = False
            print("matplotlib is not installed: no curves.png is drawn (pip install matplotlib; "
                  "python utils.py plot DIR draws it later)", flush=True)


def write_summary(path, row):
    """Append the epoch's row; rows of this epoch or later (from a run that was cut off and resumed)
    are replaced, so the file always reads as one uninterrupted run."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f.read().splitlines()[1:] if line and int(line.split(',')[0]) < row['epoch']]
    lines = [','.join(row), *rows, ','.join(str(value) for value in row.values())]
    atomic_write(path, lambda f: f.write(('\n'.join(lines) + '\n').encode()))


# A live view of long runs: TensorBoard scalars (--log-tensorboard) beside summary.csv, from rank 0

_tensorboard = None


def open_tensorboard(folder, first_step=0):
    """From now on log_scalars writes TensorBoard event files into `folder` (`tensorboard --logdir
    output/train` shows every run). A resumed run purges what an earlier one wrote from its first step
    on, so redone steps are not drawn twice. The tensorboard package is needed (train.py checks first)."""
    global _tensorboard
    from torch.utils.tensorboard import SummaryWriter
    _tensorboard = SummaryWriter(folder, purge_step=first_step or None, flush_secs=30)


def log_scalars(step, group, **scalars):
    """Each value as the scalar GROUP/NAME at `step`, when TensorBoard is open."""
    if _tensorboard is not None and is_main_process():
        for name, value in scalars.items():
            _tensorboard.add_scalar(f'{group}/{name}', value, step)


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

def atomic_write(path, write, links=(), size=None):
    """write(binary file) into a temporary file in the same folder, fsync, rename: a kill at any
    moment leaves either the old file or the new one, never half of one. Each of `links` (paths in
    the same folder) gets the same bytes before `path` is renamed (link_or_copy): the file is written
    once. The temporary names, .NAME.PID.tmp, are what train.py clears from --output as stale. A full
    disk or quota is a UsageError naming the folder, the bytes needed (`size`, else at least those
    written) and those free."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temporary_path(path)
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        for other in links:
            link_or_copy(tmp, other)
        os.replace(tmp, path)
    except Exception as error:
        if not is_disk_full(error):
            raise
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        needs = f"about {size / 1e6:.1f} MB" if size else f"more than {written:,} bytes"
        if os.path.exists(tmp):
            os.remove(tmp)  # before asking what is free
        free = shutil.disk_usage(folder).free
        raise UsageError(f"no space left in {folder} for {os.path.basename(path)}: it needs {needs}, "
                         f"{free / 1e6:.1f} MB are free; free some space there or choose another --output") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)


def temporary_path(path):
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")


def link_or_copy(source, path):
    """`path` gets `source`'s bytes, atomically: a hard link (no space, no time), or a copy where the
    filesystem has none. The two names then share one file until either is replaced by a rename
    (atomic_write), which leaves the other's bytes as they were."""
    tmp = temporary_path(path)
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)  # link() does not overwrite, and open() would write through a stale link
        try:
            os.link(source, tmp)
        except OSError:  # FAT, some network and FUSE filesystems
            with open(source, 'rb') as original, open(tmp, 'wb') as f:
                shutil.copyfileobj(original, f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_disk_full(error):
    """ENOSPC or EDQUOT, also where torch's zip writer reports the failed write as its own RuntimeError
    ('unexpected pos'), raised while the OSError was being handled."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def atomic_save(obj, path, links=()):
    """torch.save(obj) into `path` once, and `links` made from it (atomic_write). The size named
    when the disk is full is that of the tensors' storages, most of the file."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in torch.utils._pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)}
    atomic_write(path, lambda f: torch.save(obj, f), links, size=sum(storages.values()))


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

def device_type(name):
    """'auto' picks cuda, then an Ascend npu (torch_npu imported only if installed), then cpu;
    'cuda' or 'npu' on a machine without one is a UsageError. The same answer on every rank."""
    if name == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        import importlib.util
        if importlib.util.find_spec('torch_npu'):
            import torch_npu  # noqa: F401  (registers the device)
            if torch.npu.is_available():
                return 'npu'
        return 'cpu'
    if name == 'cuda' and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if name == 'npu':
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            raise UsageError("--device npu: torch_npu is not installed (Ascend's PyTorch "
                             "adapter); install it or use --device cpu") from None
    return name


def select_device(name, local_rank):
    """This process's device: cuda:LOCAL_RANK, npu:LOCAL_RANK or the cpu (name as device_type)."""
    name = device_type(name)
    if name in ('cuda', 'npu'):
        accelerator = getattr(torch, name)  # torch.cuda, or torch.npu once torch_npu is imported
        if local_rank >= accelerator.device_count():
            raise UsageError(f"process {local_rank} has no {'GPU' if name == 'cuda' else 'NPU'}: "
                             f"{accelerator.device_count()} visible; start at most that many "
                             f"processes per node")
        accelerator.set_device(local_rank)
        return torch.device(name, local_rank)
    return torch.device('cpu')


def distributed_env():
    """(rank, world_size, local_rank): torchrun's (or torch.distributed.launch's) RANK, WORLD_SIZE and
    LOCAL_RANK; else, in a process srun started, Slurm's, with no torchrun needed:

        srun --ntasks-per-node=8 --gpus-per-node=8 python train.py ...   # each task sees its node's GPUs

    torchrun's win when both are set (torchrun in an salloc or srun shell). The size is the step's
    task count: a batch script also holds SLURM_PROCID=0 and SLURM_NTASKS=N, and a `python train.py`
    there is one process (TensorFlow's SlurmClusterResolver reads the same variables)."""
    if 'RANK' in os.environ or 'SLURM_STEP_NUM_TASKS' not in os.environ:
        return (int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)),
                int(os.environ.get('LOCAL_RANK', 0)))
    return (int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_STEP_NUM_TASKS']),
            int(os.environ['SLURM_LOCALID']))


def master_address():
    """(host, port) of the store where the ranks meet: MASTER_ADDR and MASTER_PORT (torchrun sets both);
    under srun without them, the step's first node and a port from the job id: two jobs sharing a
    node then differ (torch's default 29500 would collide), and 10000-29999 lies below Linux's
    ephemeral ports (32768 up), which outgoing connections take."""
    nodelist = os.environ.get('SLURM_STEP_NODELIST') or os.environ.get('SLURM_JOB_NODELIST')
    host = os.environ.get('MASTER_ADDR') or (first_host(nodelist) if nodelist else None)
    port = os.environ.get('MASTER_PORT') or (
        10000 + int(os.environ['SLURM_JOB_ID']) % 20000 if 'SLURM_JOB_ID' in os.environ else None)
    if not host or not port:
        raise UsageError(f"{distributed_env()[1]} processes but no MASTER_ADDR and MASTER_PORT: start them "
                         f"with torchrun or srun, or set both")
    return host, int(port)


def first_host(nodelist):
    """The first host of a Slurm host list: 'node[01-03,07],gpu5' -> 'node01', 'rack[2-3]-n[4,6]' ->
    'rack2-n4' (the part before the first comma outside brackets, each bracket by its first value)."""
    first = re.match(r'[^,\[]*(?:\[[^\]]*\][^,\[]*)*', nodelist).group(0)
    return re.sub(r'\[([^\]\-,]*)[^\]]*\]', r'\1', first)


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process():
    """Rank 0: the one that logs and writes files."""
    return get_rank() == 0


def init_distributed(device, timeout_minutes=30):
    """One process group over all ranks: nccl for GPUs, hccl for NPUs, gloo for CPUs. A collective
    that waits longer than the timeout fails (the launcher then stops every rank)."""
    import datetime
    backend = {'cuda': 'nccl', 'npu': 'hccl'}.get(device.type, 'gloo')
    rank, world_size, _ = distributed_env()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend, store=rendezvous_store(rank, world_size, timeout), rank=rank,
                            world_size=world_size, timeout=timeout,
                            device_id=device if device.type == 'cuda' else None)


def rendezvous_store(rank, world_size, timeout):
    """The store in which the ranks exchange addresses, made as torch's env:// makes it (a client of
    torchrun's store, else served by rank 0), but under torchrun each group gets keys of its own:
    torchrun's store outlives its workers, and a group restarted after a failure (--max-restarts)
    read the dead group's addresses there and failed ('Connection refused') or hung until the
    timeout in 8 of 14 tries (pytorch/pytorch#167288; test/test_elastic.py)."""
    host, port = master_address()
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        store = dist.PrefixStore('default_pg', dist.TCPStore(host, port, world_size, is_master=False,
                                                             timeout=timeout))
        return dist.PrefixStore(fresh_key_space(store, rank, world_size, timeout), store)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore('default_pg', store)


def fresh_key_space(store, rank, world_size, timeout):
    """A prefix no earlier group used, agreed on through the store. Rank 0 names it after a random
    token and hands it to each other rank under a key named after that rank's own random token,
    which no dead process can have written. (TORCHELASTIC_RESTART_COUNT cannot name it: each torchrun
    agent counts its own restarts, and under --rdzv-backend c10d not those after a membership
    change, so nodes disagree (pytorch/pytorch#108158) and the group would wait for the timeout.)"""
    token = os.urandom(8).hex()
    if rank > 0:
        store.set(f'hello/{rank}', token)
        store.wait([f'welcome/{token}'], timeout)
        space = store.get(f'welcome/{token}').decode()
        store.set(f'{space}/arrived/{rank}', '')
        return space
    deadline = time.monotonic() + timeout.total_seconds()
    waiting = set(range(1, world_size))
    while waiting:  # a rank's hello may still be a dead process's: read it again until the rank arrives
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {sorted(waiting)} did not join the process group within "
                               f"{timeout.total_seconds() / 60:g} minutes (--dist-timeout)")
        for other in sorted(waiting):
            if store.check([f'{token}/arrived/{other}']):
                waiting.discard(other)
            elif store.check([f'hello/{other}']):
                store.set(f"welcome/{store.get(f'hello/{other}').decode()}", token)
        time.sleep(0.01)
    return token


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """In place over all ranks (nothing without a process group); returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_over_ranks(tensor):
    """The mean over ranks, as a new tensor (gloo has no AVG); the tensor itself with one process."""
    if get_world_size() == 1:
        return tensor
    return all_reduce_sum(tensor.clone()) / get_world_size()


def max_over_ranks(number, device):
    """The largest of an integer over all ranks (int32: every backend reduces it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return number
    value = torch.tensor([number], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def is_peer_failure(error):
    """Whether a collective failed because another rank went away (that rank reports its own
    error) or stopped answering for --dist-timeout (it says nothing): gloo says the connection
    closed or it timed out, NCCL and HCCL raise DistBackendError."""
    signs = ('Connection closed by peer', 'Connection reset by peer', 'Broken pipe', 'Timed out waiting')
    return isinstance(error, dist.DistBackendError) or any(sign in str(error) for sign in signs)


def average_bn_stats(model):
    """timm's distribute_bn('reduce'): average BN running statistics over ranks before eval."""
    if get_world_size() == 1:
        return
    for name, buf in model.named_buffers():
        if 'running_mean' in name or 'running_var' in name:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(get_world_size())


def freeze_batchnorm(model):
    """BatchNorm in eval mode inside a training model: it normalizes with its running statistics
    and leaves them unchanged; its scale and shift still train (fine-tuning with small batches)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def destroy_distributed():
    """After success only: with a rank gone, tearing the group down can block."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'npu':
        torch.npu.synchronize()


def default_workers():
    """timm's 4 loader processes per device, but not more than this device's share of the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return min(4, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))


def default_channels_last(device):
    """The memory format train.py uses when --channels-last is not given: NHWC on CUDA (cuDNN's
    fast depthwise and bf16 kernels want it; +30% in timm's benchmarks) and on the CPU (oneDNN:
    forward+backward of rw_t 1.2x faster at 96 and 288 px, 1.6x at 32 px; README, Performance);
    the NPU keeps NCHW (its adapter picks its own internal formats)."""
    return device.type in ('cuda', 'cpu')


# ----------------------------------------------------------------------------------------------
# Errors: bad input ends with one line, `error: ...`, and exit status 2

@contextlib.contextmanager
def one_line_errors(alike_on_every_rank=False):
    """Bad input (flags, data, checkpoints) or a loss that stays non-finite ends the program with one line,
    `error: ...`, and exit status 2, no traceback: said by rank 0 when every rank finds the same (the
    flags; the all-reduced loss), else by the rank that hit it. The launcher stops the others."""
    rank, world_size, _ = distributed_env()
    where = f' (rank {rank})' if world_size > 1 else ''
    try:
        yield
    except (UsageError, DataError, CheckpointError, FloatingPointError, TimeoutError) as e:
        if rank == 0 or not (alike_on_every_rank or isinstance(e, FloatingPointError)):
            print(f"error{where}: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # train.py: SIGINT before its stop handler is set, or while evaluating
        print(f"interrupted{where} before anything was saved", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:
        if world_size > 1 and is_peer_failure(e):  # another rank failed and says why
            reason = one_line(e).split('] ', 1)[-1].split('. ')[0]  # gloo: "[file:line] What. Hint."
            print(f"rank {rank} stops: another rank failed ({reason})", file=sys.stderr, flush=True)
            sys.exit(1)
        raise  # a bug: the traceback, each line prefixed [rankN] by torch.distributed


def one_line(error):
    """The message alone, also when a DataLoader worker wrapped it in its traceback text."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    last = lines[-1]
    for prefix in (f"{type(error).__module__}.{type(error).__name__}: ", f"{type(error).__name__}: "):
        last = last[len(prefix):] if last.startswith(prefix) else last
    return last


# ----------------------------------------------------------------------------------------------
# Training curves from summary.csv. matplotlib is optional: imported here only, with the Agg
# canvas (no display needed), so training goes on without it.

CURVE_PANELS = (  # panel title, then (summary.csv column, line style) drawn in it
    ('loss (log scale)', (('train_loss', '-'), ('eval_loss', '--'))),
    ('top-1 (%)', (('eval_top1', '-'), ('ema_top1', '--'))),
    ('learning rate', (('lr', '-'),)),
    ('images/s', (('images_per_sec', '-'),)),
)


def read_summary(path):
    """summary.csv as {column: [float or None per epoch]} (an empty cell is None)."""
    import csv
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    return {column: [float(row[column]) if row.get(column) else None for row in rows]
            for column in (rows[0].keys() if rows else ())}


def plot_curves(run_dirs, out_path):
    """Draw loss, top-1, lr and images/s against epoch for each run folder's summary.csv into
    out_path (PNG); several folders are overlaid, one colour each. Returns the Figure."""
    from matplotlib.figure import Figure  # ImportError when matplotlib is missing: callers decide
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(11, 7), layout='constrained')
    axes = fig.subplots(2, 2).flatten()
    for ax, (title, _) in zip(axes, CURVE_PANELS):
        ax.set_title(title)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_yscale('log')  # early losses (an eval loss of 30 at epoch 0) would flatten the rest
    for index, run_dir in enumerate(run_dirs):
        summary_path = os.path.join(run_dir, 'summary.csv')
        if not os.path.exists(summary_path):
            raise UsageError(f"{run_dir} has no summary.csv: not a run folder of train.py")
        summary = read_summary(summary_path)
        name = os.path.basename(os.path.normpath(run_dir))
        colour = f'C{index % 10}'
        for ax, (_, columns) in zip(axes, CURVE_PANELS):
            for column, style in columns:
                points = [(e, v) for e, v in zip(summary.get('epoch', []), summary.get(column, []))
                          if v is not None]
                if not points:
                    continue  # e.g. ema_top1 of a run without --model-ema
                label = column if len(run_dirs) == 1 else f'{name}: {column}'
                ax.plot(*zip(*points), style, color=colour, label=label,
                        marker='o' if len(points) <= 50 else None, markersize=3)
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize='small')
    fig.suptitle(', '.join(os.path.basename(os.path.normpath(d)) for d in run_dirs))
    atomic_write(out_path, lambda f: fig.savefig(f, dpi=100, format='png'))  # never half a PNG
    return fig


if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser(description="Redraw training curves from train.py run folders.")
    commands = parser.add_subparsers(dest='command', required=True)
    plot = commands.add_parser('plot', help='loss, top-1, lr, images/s vs epoch; several runs overlay')
    plot.add_argument('run_dirs', nargs='+', metavar='DIR', help='folders holding summary.csv')
    plot.add_argument('--out', help='PNG to write; default: DIR/curves.png for one run, '
                                    'curves.png here for several')
    cli = parser.parse_args()
    out = cli.out or (os.path.join(cli.run_dirs[0], 'curves.png') if len(cli.run_dirs) == 1
                      else 'curves.png')
    with one_line_errors():
        try:
            plot_curves(cli.run_dirs, out)
        except ImportError:
            raise UsageError("drawing curves needs matplotlib: pip install matplotlib") from None
        except OSError as e:
            raise UsageError(f"cannot write {out}: {e.strerror}") from None
    print(f"wrote {out}")
