"""train.py with faults injected, for the tests: it patches train.py's functions, then runs its main().
train.py itself knows nothing of this.

    python test/faults.py --inf-loss-steps 2,3,4 -- TRAIN_ARGS...        # those steps' losses are inf
    torchrun --nproc_per_node=2 test/faults.py --fail-rank 1 -- TRAIN_ARGS...   # rank 1 raises

--inf-loss-steps N,M,...: this process's N-th, M-th ... training steps (1-based) get an infinite loss
(train.train_loss is wrapped; validation does not call it).
--fail-rank R: the process of rank R raises a RuntimeError after its first training step.
"""
import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
import utils  # noqa: E402


def inject_infinite_losses(steps):
    original, calls = train.train_loss, itertools.count(1)

    def train_loss(*args, **kwargs):
        loss = original(*args, **kwargs)
        return loss * float('inf') if next(calls) in steps else loss
    train.train_loss = train_loss


def inject_failure(rank):
    original = train.train_step

    def train_step(*args, **kwargs):
        result = original(*args, **kwargs)
        if utils.get_rank() == rank:
            raise RuntimeError(f"failure injected on rank {rank} after its first step")
        return result
    train.train_step = train_step


def main():
    split = sys.argv.index('--')
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--inf-loss-steps', type=lambda text: {int(step) for step in text.split(',')})
    parser.add_argument('--fail-rank', type=int)
    faults = parser.parse_args(sys.argv[1:split])
    if faults.inf_loss_steps:
        inject_infinite_losses(faults.inf_loss_steps)
    if faults.fail_rank is not None:
        inject_failure(faults.fail_rank)
    train.main(sys.argv[split + 1:])


if __name__ == '__main__':
    main()
