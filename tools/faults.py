"""train.py with faults injected or watched, for the tests: it patches train.py's functions, then runs
its main(). train.py itself knows nothing of this.

    python tools/faults.py --inf-loss-steps 2,3,4 -- TRAIN_ARGS...        # those steps' losses are inf
    torchrun --nproc_per_node=2 tools/faults.py --fail-rank 1 -- TRAIN_ARGS...   # rank 1 raises

--inf-loss-steps N,M,...: this process's N-th, M-th ... training steps (1-based) get an infinite loss
(train.train_loss is wrapped; validation does not call it).
--sigterm-at-loss N: the process sends itself SIGTERM at its N-th loss computation (it stops after that step).
--sigterm-group-at-loss N: rank 0 sends SIGTERM to its process group (itself and its loader workers) and to its
launcher's (torchrun, which relays it to every rank's group) at its N-th loss computation, as a scheduler signals
every process of a job.
--kill-at-loss N: the process SIGKILLs itself at its N-th loss computation (train.train_loss runs once per
micro-batch: with --grad-accum-steps 2 an even N dies between a step's two micro-batches).
--disk-full-at-save N: the process's N-th checkpoint write (checkpoint.atomic_write of a .pth.tar) fails as on a full
disk: once 1 MB is in the file, its write() raises OSError(ENOSPC), as the kernel's does.
--fail-rank R: the process of rank R raises a RuntimeError after its first training step.
--record-dtypes PREFIX: at exit, PREFIX.rankR.json lists the dtypes of every tensor made while
validating (train.validate) and of every tensor given to a collective (all_reduce, all_gather).
--record-teardown PREFIX: PREFIX.rankR.txt gets the number of DistributedDataParallel modules still alive when the
process group is destroyed (one that outlives it ends with the interpreter, whose gloo threads can then abort it).
"""

import argparse
import atexit
import errno
import gc
import itertools
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import distributed  # noqa: E402
import train  # noqa: E402


def inject_infinite_losses(steps):
    original = train.train_loss
    calls = itertools.count(1)

    def train_loss(*args, **kwargs):
        loss = original(*args, **kwargs)
        return loss * float('inf') if next(calls) in steps else loss

    train.train_loss = train_loss


def signal_at_loss(count, signum, whole_group=False):
    original = train.train_loss
    calls = itertools.count(1)

    def train_loss(*args, **kwargs):
        call = next(calls)
        if call == count and not whole_group:
            os.kill(os.getpid(), signum)
        elif call == count and distributed.get_rank() == 0:
            for group in {os.getpgrp(), os.getpgid(os.getppid())}:
                os.killpg(group, signum)
        return original(*args, **kwargs)

    train.train_loss = train_loss


def fill_disk_at_save(count, capacity=1 << 20):
    original = checkpoint.atomic_write
    calls = itertools.count(1)

    class FullDisk:
        """The file as a full disk has it: what fits is written, then ENOSPC."""

        def __init__(self, file):
            self.file = file
            self.written = 0

        def write(self, data):
            room = capacity - self.written
            if len(data) > room:
                self.written += self.file.write(memoryview(data)[:room])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.file.write(data)

        def flush(self):
            self.file.flush()

    def atomic_write(path, write, *args, **kwargs):
        if path.endswith('.pth.tar') and next(calls) == count:
            return original(path, lambda f: write(FullDisk(f)), *args, **kwargs)
        return original(path, write, *args, **kwargs)

    checkpoint.atomic_write = atomic_write


def inject_failure(rank):
    original = train.train_step

    def train_step(*args, **kwargs):
        result = original(*args, **kwargs)
        if distributed.get_rank() == rank:
            raise RuntimeError(f'failure injected on rank {rank} after its first step')
        return result

    train.train_step = train_step


def record_dtypes(prefix):
    seen = dict(validation=set(), collectives=set())

    class RecordCreated(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            seen['validation'].update(str(t.dtype) for t in tree_leaves(result) if isinstance(t, torch.Tensor))
            return result

    validate = train.validate

    def recorded_validate(*args, **kwargs):
        with RecordCreated():
            return validate(*args, **kwargs)

    train.validate = recorded_validate

    for module in (dist, dist.distributed_c10d):  # all_gather_object calls c10d's all_gather
        for name in ('all_reduce', 'all_gather'):

            def recorded(*args, _collective=getattr(module, name), **kwargs):  # noqa: B008 (binds this collective)
                seen['collectives'].update(str(t.dtype) for t in tree_leaves(args) if isinstance(t, torch.Tensor))
                return _collective(*args, **kwargs)

            setattr(module, name, recorded)

    def write():
        with open(f'{prefix}.rank{os.environ.get("RANK", 0)}.json', 'w') as f:  # the group is gone by now
            json.dump({key: sorted(value) for key, value in seen.items()}, f)

    atexit.register(write)


def record_teardown(prefix):
    destroy = dist.destroy_process_group

    def recorded_destroy(*args, **kwargs):
        alive = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
        with open(f'{prefix}.rank{dist.get_rank()}.txt', 'w') as f:
            f.write(str(alive))
        return destroy(*args, **kwargs)

    dist.destroy_process_group = recorded_destroy


def main():
    split = sys.argv.index('--')
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--inf-loss-steps', type=lambda text: {int(step) for step in text.split(',')})
    parser.add_argument('--kill-at-loss', type=int)
    parser.add_argument('--sigterm-at-loss', type=int)
    parser.add_argument('--sigterm-group-at-loss', type=int)
    parser.add_argument('--disk-full-at-save', type=int)
    parser.add_argument('--fail-rank', type=int)
    parser.add_argument('--record-dtypes', metavar='PREFIX')
    parser.add_argument('--record-teardown', metavar='PREFIX')
    faults, launcher_args = parser.parse_known_args(sys.argv[1:split])  # torch.distributed.launch
    # puts its --local-rank=K right after the script's name: it goes on to train.py
    if faults.record_dtypes:
        record_dtypes(faults.record_dtypes)
    if faults.record_teardown:
        record_teardown(faults.record_teardown)
    if faults.inf_loss_steps:
        inject_infinite_losses(faults.inf_loss_steps)
    if faults.kill_at_loss:
        signal_at_loss(faults.kill_at_loss, signal.SIGKILL)
    if faults.sigterm_at_loss:
        signal_at_loss(faults.sigterm_at_loss, signal.SIGTERM)
    if faults.sigterm_group_at_loss:
        signal_at_loss(faults.sigterm_group_at_loss, signal.SIGTERM, whole_group=True)
    if faults.disk_full_at_save:
        fill_disk_at_save(faults.disk_full_at_save)
    if faults.fail_rank is not None:
        inject_failure(faults.fail_rank)
    train.main(sys.argv[split + 1 :] + launcher_args)


if __name__ == '__main__':
    main()
