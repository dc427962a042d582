"""The run around train.py's recipe: where it stands (TrainState), checkpoints and exact resume,
stop signals, the non-finite-loss guard, the output folder, summary.csv and curves.png, one-line
errors. Not a script: train.py calls it in these places only,

    with run.one_line_errors(): ...            bad input ends with `error: ...` and exit status 2
    run.check_output(args), run.create_output(args)             the run folder and args.yaml
    checkpointer = run.Checkpointer(...); checkpointer.resume(path, state)
    checkpointer.stop_or_save(state, loss, skipped, at_log_step)    once per step
    checkpointer.end_epoch(state, ...), checkpointer.stop(state)

A copy of train.py without those lines (and `state.next_epoch()` where end_epoch was, which moved
the state on) is a plain loop that trains, validates and logs, but writes nothing and cannot resume
(checked by hand: such a copy trains the demo).

Why a resumed run can match an uninterrupted one bit for bit: the data order and every image's
augmentation are functions of (seed, epoch, index) (data.py) and the learning rate a function of
the epoch (utils.learning_rate); a checkpoint holds all the rest, as tensors and plain types:
modules, optimizer, loss scale, the TrainState, and per rank the RNG states and BatchNorm statistics.
"""
import contextlib
import glob
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

import data
import model as models
import utils
import weights

NONFINITE_LIMIT = 5        # consecutive non-finite losses before the run stops
SIGNAL_REPEAT_SECONDS = 2  # a SIGTERM/SIGINT this soon after the first is the same request, relayed
# Flags that do not change what the run computes: they may differ on resume without a warning.
RESUME_FREE_ARGS = {'data_dir', 'data_path', 'output', 'resume', 'workers', 'log_interval', 'device',
                    'checkpoint_interval', 'checkpoint_hist', 'dist_timeout', 'local_rank', 'evaluate',
                    'perf_steps', 'pretrained', 'strict_data'}


@dataclass
class TrainState:
    """Where the run stands: what a checkpoint holds beyond the modules, optimizer and loss scale.
    `step` batches of `epoch` are done (0 at the epoch's start); loss_sum is the float32 sum of their
    global-batch losses (a device tensor while the epoch runs: adding costs no sync) and loss_count
    how many it holds; bad_images counts the unreadable files met. `ranks` holds per rank the RNG
    states and, with several processes, the BatchNorm statistics; it is filled at each save."""
    epoch: int = 0
    step: int = 0
    num_updates: int = 0
    best_metric: float = None  # top-1 of the EMA with --model-ema (timm's reported metric), else the model's
    best_epoch: int = None
    loss_sum: float = 0.0
    loss_count: int = 0
    bad_images: int = 0
    ranks: list = None

    def count_step(self, loss, bad_images):
        self.step, self.num_updates = self.step + 1, self.num_updates + 1
        self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1
        self.bad_images += int(bad_images.sum())

    def next_epoch(self):
        self.epoch, self.step, self.loss_sum, self.loss_count, self.bad_images = self.epoch + 1, 0, 0.0, 0, 0

    def to_checkpoint(self):
        return {f.name: getattr(self, f.name) for f in fields(self)} | dict(loss_sum=float(self.loss_sum))


class Checkpointer:
    """Saves and restores the run (rank 0 writes, every rank reads), stops it on SIGTERM / SIGINT
    or a loss that stays non-finite, and writes summary.csv and curves.png at each epoch's end.
    `model` is the unwrapped model (not DDP, not compiled): its keys are what checkpoints hold."""

    def __init__(self, args, classes, model, optimizer, precision, model_ema=None, batches_per_epoch=None,
                 rank=0, world_size=1, device=torch.device('cpu')):
        self.args, self.classes, self.model, self.optimizer = args, classes, model, optimizer
        self.precision, self.model_ema, self.batches_per_epoch = precision, model_ema, batches_per_epoch
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.device, self.draw_curves = device, rank == 0
        self.nonfinite = torch.zeros((), device=device, dtype=torch.long)  # the streak, on the device
        self.stop_signal = self.signal_time = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)

    def path(self, name):
        return os.path.join(self.args.output, name)

    # -- in the step loop ----------------------------------------------------------------------

    def stop_or_save(self, state, loss, skipped, at_log_step):
        """After each step: counts non-finite losses (steps fp16's GradScaler skipped do not count),
        checks them and agrees on stopping at log steps, saves every --checkpoint-interval batches.
        -> whether the epoch should stop here (a stop signal)."""
        if not skipped:
            self.nonfinite = (self.nonfinite + 1) * (~torch.isfinite(loss))
        if at_log_step:
            self.check_finite(state)
        if self.stop_requested(at_log_step):
            return True
        interval = self.args.checkpoint_interval
        if interval and state.step % interval == 0 and state.step < self.batches_per_epoch:
            self.save_mid_epoch(state)
        return False

    def check_finite(self, state):
        """Raises after NONFINITE_LIMIT non-finite losses in a row (the streak runs across epochs);
        -> whether the last one was finite: checkpoints are written only then."""
        streak = int(self.nonfinite)
        if streak >= NONFINITE_LIMIT:
            raise FloatingPointError(
                f"the loss was not finite for {streak} consecutive steps (epoch {state.epoch}, step "
                f"{state.step}); lower --lr or use --clip-grad; the last good checkpoint is kept")
        return streak == 0

    def save_mid_epoch(self, state):
        # Every rank checks (the loss is all-reduced, so all agree); after a non-finite loss the
        # weights are not worth keeping and the last good checkpoint stays.
        if self.check_finite(state):
            self.save(state, 'last.pth.tar')

    # -- stop signals ------------------------------------------------------------------------------

    def on_signal(self, signum, frame):
        """SIGTERM / SIGINT ask for a stop after the current step, with a checkpoint. One request
        often arrives twice within milliseconds (Ctrl-C reaches torchrun and its workers, and torchrun
        relays it; Slurm signals every process): repeats within SIGNAL_REPEAT_SECONDS are that
        request. A later signal stops at once, without saving."""
        now = time.monotonic()
        if self.signal_time is None:
            self.stop_signal, self.signal_time = signum, now
        elif now - self.signal_time > SIGNAL_REPEAT_SECONDS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def stop_requested(self, at_log_step=True):
        """One process checks its flag every step; several agree at log steps so they stop together:
        a signal to any rank stops all of them (each then holds the signal number)."""
        if self.world_size == 1:
            return self.stop_signal is not None
        if not at_log_step:
            return False
        flag = torch.tensor([float(self.stop_signal or 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stop_signal = int(flag.item()) or None
        return self.stop_signal is not None

    def stop(self, state, saved=False):
        """After a stop signal: save where the run stands, unless the epoch's end just did
        (`saved`), and say how to continue."""
        finite = self.check_finite(state)
        if finite and not saved:
            self.save(state, 'last.pth.tar')
        if self.is_main:
            done = (f"checkpoint saved to {self.path('last.pth.tar')}" if finite else
                    "the loss was not finite, so the last good checkpoint was kept")
            print(f"Stopped by {signal.Signals(self.stop_signal).name} at epoch {state.epoch}, step "
                  f"{state.step}; {done}. To continue, run the same command with --output "
                  f"{self.args.output} --resume auto", flush=True)

    # -- the epoch's end ---------------------------------------------------------------------------

    def end_epoch(self, state, train_loss, images_per_sec, lr, evaluation, ema_evaluation=None):
        """The epoch's summary line, summary.csv row and curves.png, then (unless its last loss was
        not finite) model_best, checkpoint-E and last, in that order: a kill before last.pth.tar
        redoes the epoch, rewriting the others with the same bytes. The state moves to the next epoch."""
        epoch, bad_images, reported = state.epoch, state.bad_images, ema_evaluation or evaluation
        finite = self.check_finite(state)  # after a non-finite loss: no checkpoint, no new best
        is_best = finite and (state.best_metric is None or reported['top1'] > state.best_metric)
        if is_best:
            state.best_metric, state.best_epoch = reported['top1'], epoch
        state.next_epoch()
        state.ranks = self.rank_states() if finite else None
        if not self.is_main:
            return
        row = dict(epoch=epoch, train_loss=f"{train_loss:.6g}", eval_loss=f"{evaluation['loss']:.6g}",
                   eval_top1=f"{evaluation['top1']:.4f}", eval_top5=f"{evaluation['top5']:.4f}",
                   ema_top1=f"{ema_evaluation['top1']:.4f}" if ema_evaluation else '',
                   ema_top5=f"{ema_evaluation['top5']:.4f}" if ema_evaluation else '',
                   lr=f"{lr:.6g}", images_per_sec=f"{images_per_sec:.2f}", bad_images=bad_images)
        print(f"Epoch {epoch}: train_loss {row['train_loss']}  eval_loss {row['eval_loss']}  "
              f"top1 {row['eval_top1']}  top5 {row['eval_top5']}"
              + (f"  ema_top1 {row['ema_top1']}" if ema_evaluation else '')
              + f"  lr {row['lr']}  images/s {row['images_per_sec']}  skipped_images {bad_images}", flush=True)
        write_summary(self.path('summary.csv'), row)
        self.draw()
        if finite:
            hist = self.args.checkpoint_hist
            self.write(state, ['model_best.pth.tar'] * is_best + [f'checkpoint-{epoch}.pth.tar'] * bool(hist)
                       + ['last.pth.tar'])
            if hist and os.path.exists(self.path(f'checkpoint-{epoch - hist}.pth.tar')):
                os.remove(self.path(f'checkpoint-{epoch - hist}.pth.tar'))

    def draw(self):
        """curves.png next to summary.csv, redrawn each epoch (said once if matplotlib is missing)."""
        if not self.draw_curves:
            return
        try:
            utils.plot_curves([self.args.output], self.path('curves.png'))
        except ImportError:
            self.draw_curves = False
            print("matplotlib is not installed: no curves.png is drawn (pip install matplotlib; "
                  "python utils.py plot DIR draws it later)", flush=True)

    # -- saving and resuming -----------------------------------------------------------------------

    def save(self, state, name):
        """A collective (every rank adds its own random and BatchNorm states); rank 0 writes."""
        state.ranks = self.rank_states()
        if self.is_main:
            self.write(state, [name])

    def rank_states(self):
        """What differs between ranks and decides their future, in rank order: the random streams
        and, with several processes, the BatchNorm running statistics (DDP broadcasts rank 0's before
        each forward and each rank updates its copy with its own batch; the EMA's are never synced)."""
        state = dict(rng=utils.rng_state())
        if self.world_size == 1:
            return [state]
        state['buffers'] = {name: b.cpu() for name, b in self.model.named_buffers()}
        if self.model_ema is not None:
            state['ema_buffers'] = {name: b.cpu() for name, b in self.model_ema.module.named_buffers()}
        states = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states

    def write(self, state, names):
        checkpoint = dict(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            model_ema=self.model_ema.module.state_dict() if self.model_ema is not None else None,
            scaler=self.precision.state_dict(), **state.to_checkpoint(), arch=self.args.model,
            num_classes=self.args.num_classes, classes=list(self.classes), args=plain_args(self.args))
        for name in names:
            utils.atomic_save(checkpoint, self.path(name))

    def resume(self, path, state):
        """Continue from a checkpoint of train.py (of this version or earlier ones): modules,
        optimizer, loss scale, TrainState, and this rank's random and BatchNorm states."""
        checkpoint = weights.read_checkpoint(path)
        self.check_resumable(path, checkpoint)
        self.model.load_state_dict(checkpoint['model'])
        if self.model_ema is not None:
            self.model_ema.module.load_state_dict(checkpoint.get('model_ema') or checkpoint['model'])
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        self.precision.load_state_dict(checkpoint['scaler'])
        for field in fields(state):
            setattr(state, field.name, checkpoint.get(field.name, getattr(state, field.name)))
        if len(state.ranks) == self.world_size:
            self.restore_rank_state(state.ranks[self.rank])
        else:  # another world size: rank 0 goes on with the saved streams, the others start new ones
            utils.set_rng_state(state.ranks[0]['rng'])
            if self.rank > 0:
                torch.manual_seed(data.mix_seed(self.args.seed, self.rank, state.epoch, state.step))
        if self.is_main:
            print(f"Resumed from {path}: epoch {state.epoch}, step {state.step}", flush=True)

    def check_resumable(self, path, checkpoint):
        required = ('model', 'optimizer', 'scaler', 'epoch', 'step', 'num_updates', 'best_metric',
                    'best_epoch', 'loss_sum', 'loss_count', 'ranks', 'arch', 'num_classes')
        missing = [key for key in required if key not in checkpoint] if isinstance(checkpoint, dict) else ['state']
        if missing:
            raise models.CheckpointError(f"{path} is not a train.py checkpoint (no {', '.join(missing[:3])}); "
                                         f"to start from its weights use --pretrained {path}")
        args, saved = self.args, checkpoint.get('args') or {}
        if checkpoint['arch'] != args.model or checkpoint['num_classes'] != args.num_classes:
            raise utils.UsageError(f"{path} holds {checkpoint['arch']} with {checkpoint['num_classes']} classes, "
                                   f"this run is {args.model} with {args.num_classes}; resume with --model "
                                   f"{checkpoint['arch']} and the same data, or choose another --output")
        if saved.get('opt', args.opt) != args.opt:
            raise utils.UsageError(f"{path} holds {saved['opt']} optimizer state, this run uses --opt {args.opt}; "
                                   f"resume with --opt {saved['opt']}, or start from its weights with "
                                   f"--pretrained {path}")
        changed = [f"{key} {value!r} (checkpoint: {saved[key]!r})" for key, value in plain_args(args).items()
                   if key in saved and key not in RESUME_FREE_ARGS and saved[key] != value]
        if changed and self.is_main:
            print(f"warning: resuming with settings that differ from the checkpoint's, so the run will not "
                  f"match an uninterrupted one: {', '.join(changed)}", file=sys.stderr, flush=True)

    def restore_rank_state(self, saved):
        utils.set_rng_state(saved['rng'])
        ema = self.model_ema.module if self.model_ema is not None else None
        with torch.no_grad():  # several processes: this rank's own BatchNorm statistics
            for module, key in ((self.model, 'buffers'), (ema, 'ema_buffers')):
                if module is not None and key in saved:
                    for name, buffer in module.named_buffers():
                        buffer.copy_(saved[key][name])


def plain_args(args):
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in vars(args).items()}


# ----------------------------------------------------------------------------------------------
# The output folder and summary.csv

def check_output(args):
    """Before anything is built: the default run folder's name, --resume auto resolved to the
    folder's last.pth.tar (or to a fresh start), and a folder already holding a run refused."""
    if not args.output:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        args.output = os.path.join('output', 'train', f"{stamp}-{args.model}-{args.img_size}")
    last = os.path.join(args.output, 'last.pth.tar')
    if args.resume == 'auto':
        args.resume = last if os.path.exists(last) else None
    elif not args.resume and not args.evaluate and os.path.exists(last):
        raise utils.UsageError(f"{args.output} already holds a run; continue it with --resume auto or "
                               f"choose another --output")


def create_output(args, is_main):
    """Once the inputs are known to be good: the folder (rank 0), with args.yaml, and the leftovers
    of a save cut off by a kill removed (utils.atomic_write's temporary files)."""
    if not is_main:
        return
    try:
        os.makedirs(args.output, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.output):  # a unique name: runs may share a folder
            pass
    except OSError as e:
        raise utils.UsageError(f"cannot write to --output {args.output}: {e.strerror}") from None
    for stale in glob.glob(os.path.join(glob.escape(args.output), '.*.tmp')):
        os.remove(stale)
    utils.atomic_write(os.path.join(args.output, 'args.yaml'), lambda f: f.write(''.join(
        f"{key}: {json.dumps(value)}\n" for key, value in plain_args(args).items()).encode()))
    print(f"Output: {args.output}", flush=True)


def write_summary(path, row):
    """Append the epoch's row; rows of this epoch or later (from a run that was cut off and resumed)
    are replaced, so the file always reads as one uninterrupted run."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f.read().splitlines()[1:] if line and int(line.split(',')[0]) < row['epoch']]
    lines = [','.join(row), *rows, ','.join(str(value) for value in row.values())]
    utils.atomic_write(path, lambda f: f.write(('\n'.join(lines) + '\n').encode()))


# ----------------------------------------------------------------------------------------------
# Errors

@contextlib.contextmanager
def one_line_errors(alike_on_every_rank=False):
    """Bad input (flags, data, checkpoints) or a loss that stays non-finite ends the run with one line,
    `error: ...`, and exit status 2, no traceback: said by rank 0 when every rank finds the same (the
    flags; the all-reduced loss), else by the rank that hit it. The launcher stops the others."""
    rank, world_size, _ = utils.distributed_env()
    where = f' (rank {rank})' if world_size > 1 else ''
    try:
        yield
    except (utils.UsageError, utils.DataError, models.CheckpointError, FloatingPointError) as e:
        if rank == 0 or not (alike_on_every_rank or isinstance(e, FloatingPointError)):
            print(f"error{where}: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # SIGINT before the Checkpointer's handler (or while evaluating)
        print(f"interrupted{where}: no training step had run, nothing to save", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:
        if world_size > 1 and utils.is_peer_failure(e):  # another rank failed and says why
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
