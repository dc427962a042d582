"""The log lines and what a run leaves to read: timm's `Train:` and `Test:` lines (the ModelZoo scripts parse them),
the `Epoch` line and its summary.csv row, curves.png and TensorBoard's scalars (curves.py and tensorboard_scalars.py,
beside the copy), top-k accuracy. Rank 0 alone prints (distributed.say) and writes.
"""

import csv
import io
import itertools
import os
import time

import torch

from checkpoint import atomic_write
from devices import synchronize
from distributed import all_reduce_sum, get_world_size, is_main_process, max_over_ranks, say

AVERAGE_AFTER_STEP = 3  # warm-up steps left out of the running images/s, as the ModelZoo parser wants


class TrainLogger:
    """Times an epoch's optimizer steps and prints timm's `Train:` line every `log_interval`-th step and at the
    last; progress and the loss sum come from `state` (run.TrainState). The device syncs only at log steps."""

    def __init__(self, epoch, num_steps, last_step, log_interval, state, device):
        self.epoch = epoch
        self.num_steps = num_steps
        self.last_step = last_step
        self.log_interval = log_interval
        self.state = state
        self.device = device
        self.first_step = state.step
        self.images_per_sec = 0.0
        self.step_time = AverageMeter()
        self.data_time = AverageMeter()

    def log_every(self, loader, micro_batches=1):
        """The loader's batches in lists of `micro_batches` (one optimizer step each) up to last_step,
        timing how long each list took to arrive."""
        data_start = time.perf_counter()
        self.last_log = data_start
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
        """After each step: prints the line at a log step, and returns whether it was one."""
        step = self.state.step - 1
        self.steps_since_log += 1
        if step % self.log_interval and step != self.last_step:
            return False
        synchronize(self.device)
        now = time.perf_counter()
        seconds = (now - self.last_log) / self.steps_since_log
        if step - self.first_step >= AVERAGE_AFTER_STEP:
            self.step_time.update(seconds, self.steps_since_log)
        self.last_log = now
        self.steps_since_log = 0
        average = self.step_time.avg if self.step_time.count else seconds
        global_batch = batch_size * get_world_size()
        self.images_per_sec = global_batch / average
        loss_now = loss.item()
        average_loss = float(self.state.loss_sum) / self.state.loss_count
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
        self.log_interval = log_interval
        self.device = device
        self.name = name
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
        now = self.averages(batch)
        average = self.averages(self.totals)
        say(
            f'{self.name}: [{self.batch_idx:>4d}/{self.num_batches - 1}]  '
            f'Time: {self.batch_time.val:.3f} ({self.batch_time.avg:.3f})  '
            f'Loss: {now["loss"]:>7.4f} ({average["loss"]:>6.4f})  '
            f'Acc@1: {now["top1"]:>7.4f} ({average["top1"]:>7.4f})  '
            f'Acc@5: {now["top5"]:>7.4f} ({average["top5"]:>7.4f})'
        )

    def read_unread(self):
        """Adds the batches since the last log line, each summed over all ranks, to the totals (one read). Returns
        the last batch's sums."""
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
        self.output = output
        self.draw_curves = True

    def log(self, state, evaluation, ema_evaluation, images_per_sec, peak_memory_mib):
        """The epoch of `state` (run.TrainState): its loss, lr, skipped images; TensorBoard draws the evaluation at
        the optimizer steps so far."""
        if not is_main_process():
            return
        log_scalars(state.num_updates, 'eval', **evaluation)
        if ema_evaluation:
            log_scalars(state.num_updates, 'eval_ema', **ema_evaluation)
        row = dict(epoch=state.epoch, train_loss=f'{float(state.loss_sum) / max(state.loss_count, 1):.6g}')
        row['eval_loss'] = f'{evaluation["loss"]:.6g}'
        row |= {f'eval_{key}': f'{evaluation[key]:.4f}' for key in ('top1', 'top5')}
        row |= {f'ema_{key}': f'{ema_evaluation[key]:.4f}' if ema_evaluation else '' for key in ('top1', 'top5')}
        row |= dict(lr=f'{state.epoch_lr:.6g}', images_per_sec=f'{images_per_sec:.2f}', bad_images=state.bad_images)
        row['peak_memory_mib'] = f'{peak_memory_mib:.0f}'
        ema_text = f'  ema_top1 {row["ema_top1"]}' if ema_evaluation else ''
        say(
            f'Epoch {state.epoch}: train_loss {row["train_loss"]}  eval_loss {row["eval_loss"]}  '
            f'top1 {row["eval_top1"]}  top5 {row["eval_top5"]}{ema_text}  lr {row["lr"]}  '
            f'images/s {row["images_per_sec"]}  peak_memory_mib {row["peak_memory_mib"]}  '
            f'skipped_images {state.bad_images}'
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
        with open(path, newline='') as f:
            rows = [old for old in csv.DictReader(f) if int(old['epoch']) < row['epoch']]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(row), lineterminator='\n', extrasaction='ignore')
    writer.writeheader()
    writer.writerows([*rows, row])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


# A live view of long runs: rank 0's tensorboard_scalars.Scalars with --log-tensorboard (train.py sets it), else None
tensorboard = None


def log_scalars(step, group, **scalars):
    """Each value as the scalar GROUP/NAME at `step`, when TensorBoard is open."""
    if tensorboard is not None:
        tensorboard.add(step, group, scalars)


class AverageMeter:
    def __init__(self):
        self.val = 0.0
        self.sum = 0.0
        self.count = 0

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
