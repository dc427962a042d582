"""The run around train.py's recipe, nothing lost: the Supervisor beside the epoch loop, and its pieces: TrainState,
checkpoints of named parts (model, optimizer, scheduler, scaler, model_ema), StopSignals, NonFiniteGuard, the run
folder, files written whole (atomic_write: a kill or a full disk never leaves half a file). A resumed run matches an
uninterrupted one bit for bit: the data order and augmentations are functions of (seed, epoch, index) (data.py), the
lr of the step, and a checkpoint holds the rest: the parts, the TrainState, per rank the RNG and BatchNorm states."""

import errno
import glob
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

import data
import weights
from distributed import cpu_group, get_rank, get_world_size, is_main_process, peak_memory_mib, say
from errors import CheckpointError, UsageError

NONFINITE_LIMIT = 5  # consecutive non-finite losses before the run stops
SIGNAL_REPEAT_SECONDS = 2  # a SIGTERM/SIGINT this soon after the first is the same request, relayed
# Flags that do not change what the run computes: they may differ on resume without a warning.
RESUME_FREE_ARGS = {
    'data_dir',
    'data_path',
    'output',
    'resume',
    'workers',
    'log_interval',
    'device',
    'num_classes',
    'checkpoint_interval',
    'checkpoint_hist',
    'dist_timeout',
    'local_rank',
    'evaluate',
    'perf_steps',
    'pretrained',
    'strict_data',
    'log_tensorboard',
}


class Supervisor:
    """The TrainState, checkpoints (every --checkpoint-interval steps, at epoch ends, on a stop signal), stop
    signals, the non-finite guard, the epoch's log row. Creating it resumes, makes the run folder, sets handlers."""

    def __init__(self, args, parts, meta, device, epoch_logger):
        self.args, self.parts, self.meta, self.device, self.epoch_logger = args, parts, meta, device, epoch_logger
        self.state = TrainState()
        if args.resume:
            load_checkpoint(args.resume, parts, self.state, args, meta['num_classes'])
        create_output(args)
        self.first_epoch = self.state.epoch
        self.stop, self.guard = StopSignals(), NonFiniteGuard(device)

    def save(self, names):
        save_checkpoint(self.args.output, names, self.parts, self.state, self.meta)

    def after_step(self, loss, skipped, at_log_step, last_of_epoch):
        """The guard; a checkpoint every --checkpoint-interval steps (not at an epoch's end); -> whether to stop."""
        self.guard.update(loss, skipped)
        if at_log_step:
            self.guard.check(self.state)
        if self.stop.requested():
            return True
        interval = self.args.checkpoint_interval
        if interval and self.state.step % interval == 0 and not last_of_epoch and self.guard.check(self.state):
            self.save(['last.pth.tar'])
        return False

    def ends_before_validation(self):
        """After an epoch's steps: a stop signal (saved, and said how to go on) or --perf-steps done."""
        if self.stop.agree():
            self.stopped(saved=False)
            return True
        return bool(self.args.perf_steps) and self.state.num_updates >= self.args.perf_steps

    def end_epoch(self, evaluation, ema_evaluation, images_per_sec):
        """The epoch's log row, best metric and checkpoints (none after a non-finite loss); -> whether to go on.
        The file is written once, linked as model_best and checkpoint-E, and renamed to last.pth.tar only then: a
        kill before the rename redoes the epoch, and a resumed run never sees a model_best older than best_epoch."""
        state, epoch, args = self.state, self.state.epoch, self.args
        finite = self.guard.check(state)
        self.epoch_logger.log(
            epoch,
            float(state.loss_sum) / max(state.loss_count, 1),
            evaluation,
            ema_evaluation,
            state.epoch_lr,
            images_per_sec,
            state.bad_images,
            peak_memory_mib(self.device),
            step=state.num_updates,
        )
        is_best = state.finish_epoch((ema_evaluation or evaluation)['top1'], finite)
        if finite:
            self.save(
                ['model_best.pth.tar'] * is_best
                + [f'checkpoint-{epoch}.pth.tar'] * bool(args.checkpoint_hist)
                + ['last.pth.tar']
            )
            old = os.path.join(args.output, f'checkpoint-{epoch - args.checkpoint_hist}.pth.tar')
            if args.checkpoint_hist and is_main_process() and os.path.exists(old):
                os.remove(old)
        if self.stop.agree() and epoch + 1 < args.epochs:
            self.stopped(saved=True)
            return False
        return True

    def stopped(self, saved):
        """After a stop signal: save where the run stands (unless the epoch's end just did), say how to go on."""
        finite, last = self.guard.check(self.state), os.path.join(self.args.output, 'last.pth.tar')
        if finite and not saved:
            self.save(['last.pth.tar'])
        done = f'checkpoint saved to {last}' if finite else 'the loss was not finite, so the last good one was kept'
        say(
            f'Stopped by {signal.Signals(self.stop.signal).name} at epoch {self.state.epoch}, step {self.state.step}; '
            f'{done}. To continue, run the same command with --output {self.args.output} --resume auto'
        )

    def report_best(self):
        if self.state.best_metric is not None:
            say(f'*** Best metric: {self.state.best_metric} (epoch {self.state.best_epoch})')


@dataclass
class TrainState:
    """Beyond the parts' state dicts: `step` optimizer steps of `epoch` done; loss_sum, the float32 sum of their
    global-batch losses (a device tensor during the epoch: no sync); bad_images, unreadable files met; epoch_lr,
    the lr the epoch began with (its summary row's); `ranks`, per rank the RNG and BatchNorm states (at saves)."""

    epoch: int = 0
    step: int = 0
    num_updates: int = 0
    best_metric: float = None  # top-1 of the EMA with --model-ema (timm's reported metric), else the model's
    best_epoch: int = None
    loss_sum: float = 0.0
    loss_count: int = 0
    bad_images: int = 0
    epoch_lr: float = None
    ranks: list = None

    def count_step(self, loss, bad_images=0):
        self.step, self.num_updates = self.step + 1, self.num_updates + 1
        self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1
        self.bad_images += bad_images

    def finish_epoch(self, top1, finite=True):
        """Moves on to the next epoch; -> whether `top1` is the best so far (never after a non-finite loss)."""
        is_best = finite and (self.best_metric is None or top1 > self.best_metric)
        if is_best:
            self.best_metric, self.best_epoch = top1, self.epoch
        self.epoch, self.step, self.loss_sum, self.loss_count, self.bad_images = self.epoch + 1, 0, 0.0, 0, 0
        return is_best


# ----------------------------------------------------------------------------------------------
# Checkpoints: a dict of named parts (each with state_dict / load_state_dict), the state, the run's facts


def save_checkpoint(folder, names, parts, state, meta):
    """A collective: state.ranks gets each rank's random streams and, with several processes, its BatchNorm
    statistics (each rank updates its own with its batches; the EMA's are never synced); rank 0 writes
    {part: its state_dict or None, the state's fields, meta} once, as the last of `names`, the others linked."""
    mine, several = dict(rng=rng_state(model_device(parts))), get_world_size() > 1
    for key, module in (('buffers', parts['model']), ('ema_buffers', parts.get('model_ema'))):
        if several and module is not None:
            mine[key] = {name: b.cpu() for name, b in module.named_buffers()}
    state.ranks = [None] * get_world_size() if several else [mine]
    if several:
        dist.all_gather_object(state.ranks, mine)
    if not is_main_process():
        return
    checkpoint = {name: part.state_dict() if part is not None else None for name, part in parts.items()}
    state_fields = {f.name: getattr(state, f.name) for f in fields(state)} | dict(loss_sum=float(state.loss_sum))
    *others, last = [os.path.join(folder, name) for name in names]
    atomic_save(checkpoint | state_fields | meta, last, links=others)


def load_checkpoint(path, parts, state, args, num_classes):
    """Continue from a train.py checkpoint (of this version or earlier ones); every rank reads the file. Each rank
    restores its random streams and BatchNorm statistics; in another world size rank 0 goes on with the saved
    streams, the others start new ones."""
    checkpoint = weights.read_checkpoint(path)
    check_resumable(path, checkpoint, args, num_classes)
    for name, part in parts.items():
        if part is None:
            continue
        if name == 'model_ema' and not checkpoint.get('model_ema'):  # resumed with --model-ema added
            part.load_state_dict(checkpoint['model'])
        elif name == 'scheduler' and isinstance(part, torch.optim.lr_scheduler.LambdaLR):
            # timm's schedules are a function of the step: this run's at the saved step, so a resume with
            # another --epochs trains its first step at the new schedule's lr (older files saved none)
            part.last_epoch = checkpoint['num_updates'] - 1
            part.step()
        else:
            part.load_state_dict(checkpoint[name])
    for field in fields(state):
        setattr(state, field.name, checkpoint.get(field.name, getattr(state, field.name)))
    rank, same_world = get_rank(), len(state.ranks) == get_world_size()
    saved = state.ranks[rank if same_world else 0]
    torch.set_rng_state(saved['rng']['torch'])
    random.setstate(saved['rng']['python'])
    device = model_device(parts)
    if device_rng(device) is not None and device.type in saved['rng']:
        device_rng(device).set_rng_state(saved['rng'][device.type])
    if not same_world and rank > 0:
        torch.manual_seed(data.mix_seed(args.seed, rank, state.epoch, state.step))
    with torch.no_grad():
        for module, key in ((parts['model'], 'buffers'), (parts.get('model_ema'), 'ema_buffers')):
            for name, buffer in module.named_buffers() if same_world and module is not None and key in saved else ():
                buffer.copy_(saved[key][name])
    say(f'Resumed from {path}: epoch {state.epoch}, step {state.step}')


def check_resumable(path, checkpoint, args, num_classes):
    required = (
        'model',
        'optimizer',
        'scaler',
        'epoch',
        'step',
        'num_updates',
        'best_metric',
        'best_epoch',
        'loss_sum',
        'loss_count',
        'ranks',
        'arch',
        'num_classes',
    )
    missing = [key for key in required if key not in checkpoint] if isinstance(checkpoint, dict) else ['state']
    if missing:
        raise CheckpointError(
            f'{path} is not a train.py checkpoint (no {", ".join(missing[:3])}); '
            f'to start from its weights use --pretrained {path}'
        )
    saved = checkpoint.get('args') or {}
    own_run = os.path.abspath(path) == os.path.abspath(os.path.join(args.output, 'last.pth.tar'))
    elsewhere = 'or choose another --output' if own_run else f'or start from its weights with --pretrained {path}'
    if checkpoint['arch'] != args.model or checkpoint['num_classes'] != num_classes:
        raise UsageError(
            f'{path} holds {checkpoint["arch"]} with {checkpoint["num_classes"]} classes, this run is '
            f'{args.model} with {num_classes}; resume with --model {checkpoint["arch"]} and the same '
            f'data, {elsewhere}'
        )
    if saved.get('opt', args.opt) != args.opt:
        raise UsageError(
            f'{path} holds {saved["opt"]} optimizer state, this run uses --opt {args.opt}; '
            f'resume with --opt {saved["opt"]}, {elsewhere}'
        )
    changed = [
        f'{key} {value!r} (checkpoint: {saved[key]!r})'
        for key, value in plain_args(args).items()
        if key in saved and key not in RESUME_FREE_ARGS and saved[key] != value
    ]
    if changed:
        say(
            f"warning: resuming with settings that differ from the checkpoint's, so the run will not match an "
            f'uninterrupted one: {", ".join(changed)}',
            file=sys.stderr,
        )


def plain_args(args):
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in vars(args).items()}


def rng_state(device):
    """Every random stream the training step draws from, as tensors and plain types: the CPU's, Python's and,
    under the device's name ('cuda', 'npu'), the device's own (dropout, drop path and random erasing draw there)."""
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    if device_rng(device) is not None:
        state[device.type] = device_rng(device).get_rng_state()
    return state


def device_rng(device):
    """torch.cuda, torch.npu, ...: the module holding `device`'s random stream (that of the current device);
    None for the CPU, whose stream is torch's own, and for devices without one."""
    module = getattr(torch, device.type, None)
    return module if hasattr(module, 'get_rng_state') else None


def model_device(parts):
    return next(parts['model'].parameters()).device


# ----------------------------------------------------------------------------------------------
# Stopping: on a signal, and on a loss that stays non-finite


class StopSignals:
    """A job signal (data.JOB_SIGNALS: SIGTERM, SIGINT, SIGHUP, SIGUSR1) asks the run to stop after the current step,
    with a checkpoint; rank 0 says so as it arrives. One request often arrives twice within milliseconds (Slurm
    signals every process, torchrun relays what it gets), hence the SIGNAL_REPEAT_SECONDS window; a later signal
    stops at once, unsaved. Ranks agree without making the device wait: at each step every rank puts its flag into
    an all-reduce on the CPU group (distributed.cpu_group), started without waiting and read at the next step, so
    all stop after the same step, at most two after the signal, whatever --log-interval is."""

    def __init__(self):
        self.received, self.first_time = None, None  # this process's signal
        self.signal = None  # the one all ranks stop for
        self.round = None  # (flag, work) of the all-reduce started at the last step
        for job_signal in data.JOB_SIGNALS:
            signal.signal(job_signal, self.on_signal)

    def on_signal(self, signum, frame):
        now = time.monotonic()
        if self.first_time is None:
            self.received, self.first_time = signum, now
            if is_main_process():  # os.write: a print() here could land inside one the signal interrupted
                os.write(1, f'{signal.Signals(signum).name}: stopping after this step, with a checkpoint\n'.encode())
        elif now - self.first_time > SIGNAL_REPEAT_SECONDS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def requested(self):
        """Every rank, once a step: whether all stop now (with one process: whether it got a signal)."""
        if get_world_size() == 1:
            self.signal = self.received
        elif not self.finish_round():
            self.start_round()
        return self.signal is not None

    def agree(self):
        """Every rank, between epochs: as requested(), from a round waited for."""
        if get_world_size() == 1:
            self.signal = self.received
        elif not self.finish_round():
            self.start_round()
            self.finish_round()
        return self.signal is not None

    def start_round(self):
        flag = torch.tensor([self.received or 0], dtype=torch.int32)
        self.round = flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=cpu_group(), async_op=True)

    def finish_round(self):
        """Waits for the round in flight, if any; -> whether it agreed on a stop."""
        if self.round is None:
            return False
        flag, work = self.round
        work.wait()
        self.round, self.signal = None, int(flag) or None
        return self.signal is not None


class NonFiniteGuard:
    """Non-finite losses in a row across epoch ends, on the device (no sync per step; fp16's skipped steps ignored)."""

    def __init__(self, device):
        self.streak = torch.zeros((), device=device, dtype=torch.long)

    def update(self, loss, skipped=False):
        """`skipped`: Precision.step's answer, a bool or (fp16's GradScaler) a bool tensor on the device."""
        counted = (self.streak + 1) * (~torch.isfinite(loss))
        if isinstance(skipped, torch.Tensor):
            self.streak = torch.where(skipped, self.streak, counted)
        elif not skipped:
            self.streak = counted

    def check(self, state):
        """Raises after NONFINITE_LIMIT in a row; -> whether the last loss was finite (checkpoints are written
        only then). Every rank agrees: the losses are all-reduced."""
        streak = int(self.streak)
        if streak >= NONFINITE_LIMIT:
            raise FloatingPointError(
                f'the loss was not finite for {streak} consecutive steps (epoch {state.epoch}, '
                f'step {state.step}); lower --lr or use --clip-grad; the last good checkpoint '
                f'is kept'
            )
        return streak == 0


# ----------------------------------------------------------------------------------------------
# The run folder, and files written whole


def resolve_resume(args):
    """--resume auto: --output's last.pth.tar where there is one, else a fresh start (None)."""
    if args.resume != 'auto':
        return
    if not args.output:
        raise UsageError('--resume auto needs --output DIR (the run folder to continue)')
    last = os.path.join(args.output, 'last.pth.tar')
    args.resume = last if os.path.exists(last) else None


VARIANT_SETTINGS = ('img_size', 'eval_size', 'crop_pct', 'interpolation', 'mean', 'std')


def checkpoint_settings(path):
    """What a train.py checkpoint names of its run: the variant (arch, as --model) and its image settings."""
    checkpoint = weights.read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('arch'), str):
        return {}  # not a train.py checkpoint: check_resumable says so
    saved = checkpoint.get('args') if isinstance(checkpoint.get('args'), dict) else {}
    return dict(model=checkpoint['arch'], **{key: saved[key] for key in VARIANT_SETTINGS if saved.get(key) is not None})


def check_output(args):
    """Before anything is built: the run folder's default name; a folder with a run refused unless resumed."""
    if not args.output:
        args.output = os.path.join('output', 'train', f'{time.strftime("%Y%m%d-%H%M%S")}-{args.model}-{args.img_size}')
    if not args.resume and not args.evaluate and os.path.exists(os.path.join(args.output, 'last.pth.tar')):
        raise UsageError(
            f'{args.output} already holds a run; continue it with --resume auto or choose another --output'
        )


def create_output(args):
    """Rank 0, once the inputs are known good: the folder, args.yaml, and a killed save's temporary files removed."""
    if not is_main_process():
        return
    try:
        os.makedirs(args.output, exist_ok=True)
        tempfile.TemporaryFile(dir=args.output).close()  # a unique name: runs may share a folder
    except OSError as e:
        raise UsageError(f'cannot write to --output {args.output}: {e.strerror}') from None
    for stale in glob.glob(os.path.join(glob.escape(args.output), '.*.tmp')):
        os.remove(stale)
    atomic_write(
        os.path.join(args.output, 'args.yaml'),
        lambda f: f.write(''.join(f'{key}: {json.dumps(value)}\n' for key, value in plain_args(args).items()).encode()),
    )
    print(f'Output: {args.output}', flush=True)


def atomic_save(obj, path, links=()):
    """torch.save(obj) into `path` once, and `links` made from it (atomic_write); the size a full disk error
    names is that of the tensors' storages, most of the file."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in torch.utils._pytree.tree_leaves(obj)
        if isinstance(t, torch.Tensor)
    }
    atomic_write(path, lambda f: torch.save(obj, f), links, size=sum(storages.values()))


def atomic_write(path, write, links=(), size=None):
    """write(binary file) into a temporary file beside `path` (.NAME.PID.tmp), fsync, give each of `links` the same
    bytes (link_or_copy), rename: a kill leaves the old file or the new one, never half of one. A full disk or
    quota is a UsageError naming the folder, the bytes needed (`size`, else at least those written) and free."""
    folder, tmp = os.path.dirname(os.path.abspath(path)), temporary_path(path)
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
        needs = f'about {size / 1e6:.1f} MB' if size else f'more than {written:,} bytes'
        if os.path.exists(tmp):
            os.remove(tmp)  # before asking what is free
        raise UsageError(
            f'no space left in {folder} for {os.path.basename(path)}: it needs {needs}, '
            f'{shutil.disk_usage(folder).free / 1e6:.1f} MB are free; free some space there or '
            f'choose another --output'
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)


def temporary_path(path):
    return os.path.join(os.path.dirname(os.path.abspath(path)), f'.{os.path.basename(path)}.{os.getpid()}.tmp')


def link_or_copy(source, path):
    """`path` gets `source`'s bytes atomically: a hard link, or a copy (atomic_write) where the filesystem has none.
    The names share one file until one is replaced by a rename, which leaves the other's bytes as they were."""
    tmp = temporary_path(path)
    if os.path.lexists(tmp):
        os.remove(tmp)  # link() does not overwrite, and open() would write through a stale link
    try:
        os.link(source, tmp)
    except OSError:  # FAT, some network and FUSE filesystems
        with open(source, 'rb') as original:
            return atomic_write(path, lambda f: shutil.copyfileobj(original, f))
    os.replace(tmp, path)


def is_disk_full(error):
    """ENOSPC or EDQUOT, also behind torch's zip writer's own RuntimeError ('unexpected pos')."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False
