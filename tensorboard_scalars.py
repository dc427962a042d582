"""--log-tensorboard, beside the copy: the log lines' numbers as TensorBoard scalars in the run folder, a live view of
long runs (`tensorboard --logdir output/train`). train.py imports this only for that flag; pip install tensorboard.
"""

from torch.utils.tensorboard import SummaryWriter


class Scalars:
    """Scalars GROUP/NAME at optimizer steps. A resumed run purges what an earlier one wrote from its first step on:
    redone steps are not drawn twice."""

    def __init__(self, folder, first_step=0):
        self.writer = SummaryWriter(folder, purge_step=first_step or None, flush_secs=30)

    def add(self, step, group, scalars):
        for name, value in scalars.items():
            self.writer.add_scalar(f'{group}/{name}', value, step)
        if group != 'train':  # an epoch's evaluation: written at once
            self.writer.flush()
