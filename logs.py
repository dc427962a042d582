"""The log lines and what a run leaves to read: timm's `Train:` and `Test:` lines (the ModelZoo scripts parse
them), the `Epoch` line and its summary.csv row (and curves.png: curves.py), TensorBoard scalars, top-k accuracy.
Rank 0 alone prints (distributed.say) and writes.
"""

import itertools
import os
import time

import torch

from distributed import all_reduce_sum, get_world_size, is_main_process, max_over_ranks, say, synchronize
from run import atomic_write

# ----------------------------------------------------------------------------------------------
# The log lines: timm's `Train:` and `Test:` formats, which the ModelZoo scripts parse

CPU = torch.device('cpu')
AVERAGE_AFTER_STEP = 3  # warm-up steps left out of the running images/s, as the ModelZoo parser wants


class TrainLogger:
    """Times an epoch's optimizer steps and prints timm's `Train:` line every `log_interval`-th step and at the
    last; progress and the loss sum come from `state` (run.TrainState). The device syncs only at log steps."""

    def __init__(self, epoch, num_steps, last_step, log_interval, state, device=CPU):
        self.epoch, self.num_steps, self.last_step = epoch, num_steps, last_step
        self.log_interval, self.state, self.device = log_interval, state, device
        self.first_step, self.images_per_sec = state.step, 0.0
        self.step_time, self.data_time = AverageMeter(), AverageMeter()

    def log_every(self, loader, micro_batches=1):
        """The loader's batches in lists of `micro_batches` (one optimizer step each) up to last_step,
        timing how long each list took to arrive."""
        self.last_log = data_start = time.perf_counter()
        self.steps_since_log = 0
        batches = iter(loader)
        for _ in range(self.last_step + 1 - self.first_step):
            step_batches = list(itertools.islice(batches, micro_batches))
            if len(step_batches) < micro_batches:
                return
            self.data_time.update(time.perf_counter() - data_start)
            yield step_batches
            data_start = time.perf_counter()

    def update(self, loss, batch_size, lr):
        """After each step: prints the line at a log step; -> whether it was one."""
        step, self.steps_since_log = self.state.step - 1, self.steps_since_log + 1
        if step % self.log_interval and step != self.last_step:
            return False
        synchronize(self.device)
        now = time.perf_counter()
        seconds, steps = (now - self.last_log) / self.steps_since_log, self.steps_since_log
        self.last_log, self.steps_since_log = now, 0
        if step - self.first_step >= AVERAGE_AFTER_STEP:
            self.step_time.update(seconds, steps)
        average = self.step_time.avg if self.step_time.count else seconds
        global_batch = batch_size * get_world_size()
        self.images_per_sec = global_batch / average
        loss_now, average_loss = loss.item(), float(self.state.loss_sum) / self.state.loss_count
        log_scalars(self.state.num_updates, 'train', loss=loss_now, lr=lr, images_per_sec=self.images_per_sec)
        say(
            f'Train: {self.epoch} [{step:>4d}/{self.num_steps} ({100.0 * step / max(self.num_steps - 1, 1):>3.0f}%)]  '
            f'Loss: {loss_now:#.4g} ({average_loss:#.3g})  '
            f'Time: {seconds:.3f}s, {global_batch / seconds:>7.2f}/s  '
            f'({average:.3f}s, {global_batch / average:>7.2f}/s)  '
            f'LR: {lr:.3e}  Data: {self.data_time.val:.3f} ({self.data_time.avg:.3f})'
        )
        return True


class EvalLogger:
    """One validation pass summed over all ranks, and timm's `Test:` line: the batch's values over all ranks,
    in brackets the average so far. The sums stay on the device until a log line, which reads them once; every
    rank iterates as many batches as the longest shard (empty ones after its own), so all reach the same log
    lines and their all-reduces, of float32 and int32 only: Ascend's HCCL reduces no float64
    (https://www.hiascend.com/document/detail/en/canncommercial/850/API/hcclapiref/hcclcpp_07_0020.html)."""

    def __init__(self, log_interval, device, name='Test'):
        self.log_interval, self.device, self.name = log_interval, device, name
        self.totals = dict(loss=0.0, top1=0, top5=0, count=0)
        self.batch_time = AverageMeter()
        self.unread = []  # (loss sum, [top-1, top-5, count]) of each batch since the last log line, on the device

    def log_every(self, loader, empty_batch):
        """The loader's batches, then `empty_batch` until this rank has had as many as the longest."""
        self.num_batches = max_over_ranks(len(loader), self.device)
        self.end = time.perf_counter()
        batches = itertools.chain(loader, itertools.repeat(empty_batch))
        for batch_idx, batch in zip(range(self.num_batches), batches):
            self.batch_idx = batch_idx
            yield batch

    def update(self, loss_sum, hits, count):
        """loss_sum: the batch's summed loss; hits: its top-1 and top-5 counts (tensors on the device)."""
        counts = torch.cat([hits, hits.new_full((1,), count)]).int()  # a fill on the device, not a copy to it
        self.unread.append((loss_sum.detach().float(), counts))
        at_log_line = self.batch_idx % self.log_interval == 0 or self.batch_idx == self.num_batches - 1
        batch = self.read_unread() if at_log_line else None  # the read waits for the device: time it too
        self.batch_time.update(time.perf_counter() - self.end)
        self.end = time.perf_counter()
        if batch is None:
            return
        now, average = self.averages(batch), self.averages(self.totals)
        say(
            f'{self.name}: [{self.batch_idx:>4d}/{self.num_batches - 1}]  '
            f'Time: {self.batch_time.val:.3f} ({self.batch_time.avg:.3f})  '
            f'Loss: {now["loss"]:>7.4f} ({average["loss"]:>6.4f})  '
            f'Acc@1: {now["top1"]:>7.4f} ({average["top1"]:>7.4f})  '
            f'Acc@5: {now["top5"]:>7.4f} ({average["top5"]:>7.4f})'
        )

    def read_unread(self):
        """Adds the batches since the last log line, each summed over all ranks, to the totals (one read);
        -> the last batch's sums."""
        losses = all_reduce_sum(torch.stack([loss for loss, _ in self.unread]))
        counts = all_reduce_sum(torch.stack([counts for _, counts in self.unread]))
        rows = torch.cat([losses[:, None], counts.float()], dim=1).tolist()  # a batch's counts are exact in float32
        self.unread = []
        for loss, top1, top5, count in rows:
            batch = dict(loss=loss, top1=int(top1), top5=int(top5), count=int(count))
            for key, value in batch.items():
                self.totals[key] += value
        return batch

    @staticmethod
    def averages(sums):
        count = max(sums['count'], 1)
        return dict(loss=sums['loss'] / count, top1=100 * sums['top1'] / count, top5=100 * sums['top5'] / count)

    def result(self):
        """loss, top1, top5 over every validation image, each counted once."""
        return self.averages(self.totals)


class EpochLogger:
    """The end of each epoch (rank 0): the `Epoch` line, its summary.csv row, curves.png redrawn (curves.py)."""

    def __init__(self, output):
        self.output, self.draw_curves = output, True

    def log(
        self, epoch, train_loss, evaluation, ema_evaluation, lr, images_per_sec, bad_images, peak_memory_mib, step=None
    ):
        """`step`: the optimizer steps so far, where TensorBoard draws the epoch's evaluation; `peak_memory_mib`:
        the epoch's (distributed.peak_memory_mib)."""
        if not is_main_process():
            return
        log_scalars(step, 'eval', **evaluation)
        log_scalars(step, 'eval_ema', **(ema_evaluation or {}))
        if _tensorboard is not None:
            _tensorboard.flush()
        row = dict(
            epoch=epoch,
            train_loss=f'{train_loss:.6g}',
            eval_loss=f'{evaluation["loss"]:.6g}',
            eval_top1=f'{evaluation["top1"]:.4f}',
            eval_top5=f'{evaluation["top5"]:.4f}',
            ema_top1=f'{ema_evaluation["top1"]:.4f}' if ema_evaluation else '',
            ema_top5=f'{ema_evaluation["top5"]:.4f}' if ema_evaluation else '',
            lr=f'{lr:.6g}',
            images_per_sec=f'{images_per_sec:.2f}',
            bad_images=bad_images,
            peak_memory_mib=f'{peak_memory_mib:.0f}',
        )
        ema = f'  ema_top1 {row["ema_top1"]}' if ema_evaluation else ''
        say(
            f'Epoch {epoch}: train_loss {row["train_loss"]}  eval_loss {row["eval_loss"]}  top1 {row["eval_top1"]}  '
            f'top5 {row["eval_top5"]}{ema}  lr {row["lr"]}  images/s {row["images_per_sec"]}  '
            f'peak_memory_mib {row["peak_memory_mib"]}  skipped_images {bad_images}'
        )
        write_summary(os.path.join(self.output, 'summary.csv'), row)
        if self.draw_curves:
            try:
                import curves  # beside the copy

                curves.plot_curves([self.output], os.path.join(self.output, 'curves.png'))
            except ImportError:  # said once
                self.draw_curves = False
                say(
                    'no curves.png is drawn: it needs matplotlib (pip install matplotlib) and curves.py beside '
                    'train.py; python curves.py DIR draws it later'
                )


def write_summary(path, row):
    """Append the epoch's row, replacing rows of this epoch or later (a resumed run's): one uninterrupted run."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f.read().splitlines()[1:] if line and int(line.split(',')[0]) < row['epoch']]
    lines = [','.join(row), *rows, ','.join(str(value) for value in row.values())]
    atomic_write(path, lambda f: f.write(('\n'.join(lines) + '\n').encode()))


# A live view of long runs: TensorBoard scalars (--log-tensorboard) beside summary.csv, from rank 0

_tensorboard = None


def open_tensorboard(folder, first_step=0):
    """From now on log_scalars writes TensorBoard event files into `folder` (`tensorboard --logdir output/train`).
    A resumed run purges what an earlier one wrote from its first step on: redone steps are not drawn twice."""
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
    return torch.stack([hit[:, : min(k, maxk)].any(dim=1).sum() for k in topk])
