"""The run around train.py's recipe, nothing lost: the command line read once (flags.py's flags, -c FILE's through
config.py, what a --resume checkpoint names), the run folder, and the Supervisor beside the epoch loop. It keeps the
TrainState and where a resumed run starts, saves checkpoints (checkpoint.py), takes job signals, guards against a
loss that stays non-finite and writes the epoch's summary row; each of its hooks answers whether the loop stops now.

    args = parse_command_line(argv)
    progress = Supervisor(args, parts, meta, device, epoch_logger)
    progress.start()                        # resumes, makes the run folder, takes job signals
"""

import glob
import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
import devices
import flags
from checkpoint import atomic_write, checkpoint_settings, load_checkpoint, plain_args, save_checkpoint
from distributed import cpu_group, get_world_size, is_main_process, say
from errors import UsageError, import_beside

NONFINITE_LIMIT = 5  # consecutive non-finite losses before the run stops
SIGNAL_REPEAT_SECONDS = 2  # a job signal this soon after the first is the same request, relayed


# The command line, and the run folder


def parse_command_line(argv=None):
    """train.py's flags, resolved: -c FILE's under the command line's, --resume auto found, the variant and image
    settings of a --resume checkpoint where --model is not given, flags.resolve_args, the run folder's name."""
    parser = flags.get_args_parser()
    args = parser.parse_args(argv)
    if args.config:  # config.py, beside the copy
        args = import_beside('config', '-c FILE').parse_with_config(parser, argv, args.config)
    if isinstance(args.pretrained, str) and os.path.isdir(args.pretrained):
        raise UsageError(
            f'--pretrained takes a weights file or no value, and {args.pretrained} is a folder: put the data '
            f'folder before --pretrained'
        )
    if args.resume == 'auto':
        if not args.output:
            raise UsageError('--resume auto needs --output DIR (the run folder to continue)')
        last = os.path.join(args.output, 'last.pth.tar')
        args.resume = last if os.path.exists(last) else None
    if args.model is None and args.resume:
        saved = checkpoint_settings(args.resume)  # what the command line left unset
        vars(args).update({key: value for key, value in saved.items() if getattr(args, key) is None})
    flags.resolve_args(args)
    if not args.output:
        args.output = os.path.join('output', 'train', f'{time.strftime("%Y%m%d-%H%M%S")}-{args.model}-{args.img_size}')
    if not args.resume and not args.evaluate and os.path.exists(os.path.join(args.output, 'last.pth.tar')):
        raise UsageError(
            f'{args.output} already holds a run; continue it with --resume auto or choose another --output'
        )
    return args


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
    lines = ''.join(f'{key}: {json.dumps(value)}\n' for key, value in plain_args(args).items())
    atomic_write(os.path.join(args.output, 'args.yaml'), lambda f: f.write(lines.encode()))
    say(f'Output: {args.output}')


# The Supervisor


class Supervisor:
    """The run's bookkeeping beside the epoch loop: the TrainState and where a resumed run starts, checkpoints
    (every --checkpoint-interval steps, at epoch ends, on a stop signal), job signals, the non-finite guard, the
    end of --perf-steps, the epoch's summary row. Creating it changes nothing; start() does."""

    def __init__(self, args, parts, meta, device, epoch_logger):
        self.args = args
        self.parts = parts
        self.meta = meta
        self.device = device
        self.epoch_logger = epoch_logger
        self.state = TrainState()
        self.stop = StopSignals()
        self.guard = NonFiniteGuard(device)
        self.first_epoch = 0

    def start(self):
        """Resumes from --resume, makes the run folder, and from now on takes job signals."""
        if self.args.resume:
            load_checkpoint(self.args.resume, self.parts, self.state, self.args, self.meta['num_classes'])
        create_output(self.args)
        self.first_epoch = self.state.epoch
        self.stop.install()

    def batches_done(self):
        """Batches of this epoch a resumed run leaves out (its sampler starts after them)."""
        return self.state.step * self.args.grad_accum_steps

    def begin_epoch(self, lr, num_steps):
        """Notes the lr the epoch begins with (its summary row's). Returns the epoch's last step: its last, or the
        one that ends --perf-steps (the ModelZoo's throughput runs)."""
        if self.state.step == 0:
            self.state.epoch_lr = lr
        if not self.args.perf_steps:
            return num_steps - 1
        return min(num_steps - 1, self.state.step + self.args.perf_steps - self.state.num_updates - 1)

    def save(self, names):
        save_checkpoint(self.args.output, names, self.parts, self.state, self.meta)

    def should_stop_after_step(self, loss, skipped, at_log_step, last_of_epoch):
        """The guard at log steps; a checkpoint every --checkpoint-interval steps (not at an epoch's end)."""
        self.guard.update(loss, skipped)
        if at_log_step:
            self.guard.check(self.state)
        if self.stop.agree():
            return True
        interval = self.args.checkpoint_interval
        if interval and self.state.step % interval == 0 and not last_of_epoch and self.guard.check(self.state):
            self.save(['last.pth.tar'])
        return False

    def should_stop_before_validation(self):
        """After an epoch's steps: a stop signal (then saved, and said how to go on) or --perf-steps done."""
        if self.stop.agree(wait=True):
            self.stopped(saved=False)
            return True
        return bool(self.args.perf_steps) and self.state.num_updates >= self.args.perf_steps

    def should_stop_after_epoch(self, evaluation, ema_evaluation, images_per_sec):
        """The epoch's log row, best metric and checkpoints (none after a non-finite loss), then a stop signal.
        The file is written once, linked as model_best and checkpoint-E, and renamed to last.pth.tar only then: a
        kill before the rename redoes the epoch, and a resumed run never sees a model_best older than best_epoch."""
        state = self.state
        epoch = state.epoch
        finite = self.guard.check(state)
        self.epoch_logger.log(state, evaluation, ema_evaluation, images_per_sec, devices.peak_memory_mib(self.device))
        is_best = state.finish_epoch((ema_evaluation or evaluation)['top1'], finite)
        hist = self.args.checkpoint_hist
        if finite:
            names = ['model_best.pth.tar'] * is_best + [f'checkpoint-{epoch}.pth.tar'] * bool(hist) + ['last.pth.tar']
            self.save(names)
            old = os.path.join(self.args.output, f'checkpoint-{epoch - hist}.pth.tar')
            if hist and is_main_process() and os.path.exists(old):
                os.remove(old)
        if self.stop.agree(wait=True) and epoch + 1 < self.args.epochs:
            self.stopped(saved=True)
            return True
        return False

    def stopped(self, saved):
        """After a stop signal: save where the run stands (unless the epoch's end just did), say how to go on."""
        finite = self.guard.check(self.state)
        if finite and not saved:
            self.save(['last.pth.tar'])
        last = os.path.join(self.args.output, 'last.pth.tar')
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
        self.step += 1
        self.num_updates += 1
        self.loss_sum = self.loss_sum + loss
        self.loss_count += 1
        self.bad_images += bad_images

    def finish_epoch(self, top1, finite):
        """Moves on to the next epoch. Returns whether `top1` is the best so far (never after a non-finite loss)."""
        is_best = finite and (self.best_metric is None or top1 > self.best_metric)
        if is_best:
            self.best_metric = top1
            self.best_epoch = self.epoch
        self.epoch += 1
        self.step = 0
        self.loss_sum = 0.0
        self.loss_count = 0
        self.bad_images = 0
        return is_best


# Stopping: on a signal, and on a loss that stays non-finite


class StopSignals:
    """A job signal (data.JOB_SIGNALS: SIGTERM, SIGINT, SIGHUP, SIGUSR1) asks the run to stop after the current step,
    with a checkpoint; rank 0 says so as it arrives. One request often arrives twice within milliseconds (Slurm
    signals every process, torchrun relays what it gets), hence the SIGNAL_REPEAT_SECONDS window; a later signal
    stops at once, unsaved. Ranks agree without making the device wait: at each step every rank puts its flag into
    an all-reduce on the CPU group (distributed.cpu_group), started without waiting and read at the next step, so
    all stop after the same step, at most two after the signal, whatever --log-interval is."""

    def __init__(self):
        self.received = None  # this process's signal
        self.first_time = None
        self.signal = None  # the one all ranks stop for
        self.round = None  # (flag, work) of the all-reduce started at the last step

    def install(self):
        for job_signal in data.JOB_SIGNALS:
            signal.signal(job_signal, self.on_signal)

    def on_signal(self, signum, frame):
        now = time.monotonic()
        if self.first_time is None:
            self.received = signum
            self.first_time = now
            if is_main_process():  # os.write: a print() here could land inside one the signal interrupted
                os.write(1, f'{signal.Signals(signum).name}: stopping after this step, with a checkpoint\n'.encode())
        elif now - self.first_time > SIGNAL_REPEAT_SECONDS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def agree(self, wait=False):
        """Every rank: whether all stop now (with one process: whether it got a signal). Once a step the answer is
        the last step's all-reduce, and this step's starts; between epochs (`wait`) it is waited for."""
        if get_world_size() == 1:
            self.signal = self.received
        elif not self.finish_round():
            self.start_round()
            if wait:
                self.finish_round()
        return self.signal is not None

    def start_round(self):
        flag = torch.tensor([self.received or 0], dtype=torch.int32)
        self.round = flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=cpu_group(), async_op=True)

    def finish_round(self):
        """Waits for the round in flight, if any, and returns whether it agreed on a stop."""
        if self.round is None:
            return False
        flag, work = self.round
        work.wait()
        self.round = None
        self.signal = int(flag) or None
        return self.signal is not None


class NonFiniteGuard:
    """Non-finite losses in a row across epoch ends, on the device (no sync per step; fp16's skipped steps ignored)."""

    def __init__(self, device):
        self.streak = torch.zeros((), device=device, dtype=torch.long)

    def update(self, loss, skipped):
        """`skipped`: Precision.step's answer, a bool or (fp16's GradScaler) a bool tensor on the device."""
        counted = (self.streak + 1) * (~torch.isfinite(loss))
        if isinstance(skipped, torch.Tensor):
            self.streak = torch.where(skipped, self.streak, counted)
        elif not skipped:
            self.streak = counted

    def check(self, state):
        """Raises after NONFINITE_LIMIT in a row. Returns whether the last loss was finite (checkpoints are written
        only then). Every rank agrees: the losses are all-reduced."""
        streak = int(self.streak)
        if streak >= NONFINITE_LIMIT:
            raise FloatingPointError(
                f'the loss was not finite for {streak} consecutive steps (epoch {state.epoch}, step {state.step}); '
                f'lower --lr or use --clip-grad; the last good checkpoint is kept'
            )
        return streak == 0
