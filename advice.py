"""Advice at the start of a run where its flags do not fit its data, beside the copy: a warning where timm's
ImageNet-length defaults meet a small training set or timm's warm-up covers the whole run, and a start line counting
the images drop_last leaves out of each epoch, with the -b that would use them all. train.py adds them to its start
lines when this file is beside it; a copy without it trains the same, without them.
"""

import math
import sys

import flags
import optim
from distributed import get_world_size, say

SMALL_TRAINING_SET_STEPS = 10  # steps per epoch at or below which timm's ImageNet-length defaults are warned of


def advise(args, dataset_len, steps_per_epoch, scheduler):
    """Says the warnings that apply (not of a copy's own schedule) and returns the left-out line, or ''."""
    timm_length = (args.epochs, args.batch_size) == tuple(flags.BY_DATA[key][0] for key in ('epochs', 'batch_size'))
    if timm_length and not args.pretrained and steps_per_epoch <= SMALL_TRAINING_SET_STEPS:
        say(
            f"warning: timm's ImageNet defaults on {dataset_len} images: {args.epochs} epochs of {steps_per_epoch} "
            f'step{"s" * (steps_per_epoch > 1)} (batch {args.batch_size}) from random weights; a small folder '
            f"learns far more from published weights: see the README's recipe (Training on your own images: "
            f'--pretrained --epochs 15 -b 64 ...)',
            file=sys.stderr,
        )
    if isinstance(scheduler, optim.TimmSchedule) and 0 < args.epochs <= args.warmup_epochs:
        say(
            f'warning: the warm-up (--warmup-epochs {args.warmup_epochs}) covers the whole run (--epochs '
            f'{args.epochs}): the lr rises from --warmup-lr {args.warmup_lr:g} and never reaches {args.lr:g}; give '
            f'--warmup-epochs 0, or fewer than --epochs',
            file=sys.stderr,
        )
    return left_out_images(dataset_len, steps_per_epoch, args)


def left_out_images(dataset_len, steps_per_epoch, args):
    """A start line counting the images drop_last leaves out of each epoch, with the -b that would use them all."""
    left_out = dataset_len - steps_per_epoch * flags.global_batch(args)
    if left_out <= 0:
        return ''
    per_process = math.ceil(dataset_len / get_world_size())
    sizes = range(args.batch_size // 2, args.batch_size + 1)
    fits = [b for b in sizes if per_process % (b * args.grad_accum_steps) == 0]
    hint = f'-b {fits[-1]} uses them all' if fits else 'the next epoch leaves out others'
    return f'\n{left_out} of {dataset_len} training images are left out of each epoch (drop_last): {hint}'
