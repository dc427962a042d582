"""One run over many processes: the ranks a launcher gives (torchrun, torch.distributed.launch; Slurm's srun through
cluster.py, beside the copy), the process group, the collectives train.py needs, the rank-0 print, and how a rank
ends: bad input in one line, a lost peer in one line, a bug with its traceback.

    rank, world_size, local_rank = distributed_env()
    init_distributed(device)                          # when world_size > 1
"""

import contextlib
import datetime
import gc
import os
import re
import sys

import torch
import torch.distributed as dist

from errors import CheckpointError, DataError, UsageError, import_beside, one_line

# Launchers and the process group


def distributed_env():
    """(rank, world_size, local_rank) from torchrun's (or torch.distributed.launch's) variables; in an srun step
    started without torchrun, from Slurm's (cluster.py)."""
    if 'RANK' not in os.environ and 'SLURM_STEP_NUM_TASKS' in os.environ:  # an srun step started without torchrun
        return import_beside('cluster', 'srun without torchrun').slurm_env()
    return int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('LOCAL_RANK', 0))


def init_distributed(device, timeout_minutes=30):
    """One process group over all ranks, meeting at MASTER_ADDR:MASTER_PORT (torch's env://), and one on the CPU
    beside it (cpu_group). A collective waiting past the timeout fails; the launcher then stops the others."""
    global _cpu_group
    backend = {'cuda': 'nccl', 'npu': 'hccl'}.get(device.type, 'gloo')
    rank, world_size, _ = distributed_env()
    if 'MASTER_ADDR' not in os.environ or 'MASTER_PORT' not in os.environ:
        raise UsageError(f'{world_size} processes but no MASTER_ADDR and MASTER_PORT: start them with torchrun or srun')
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store = None
    if int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)) > 0:
        store = import_beside('cluster', 'torchrun --max-restarts').restart_safe_store(rank, world_size, timeout)
    cuda = device if device.type == 'cuda' else None
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, device_id=cuda)
    if backend != 'gloo':
        _cpu_group = dist.new_group(backend='gloo', timeout=timeout)


_cpu_group = None  # beside an NCCL or HCCL group; with gloo the default group is on the CPU already


def cpu_group():
    """The ranks' process group on the CPU, for what they agree on without making a GPU or NPU wait (None: the
    default group)."""
    return _cpu_group


def destroy_distributed():
    """After success only: with a rank gone, tearing the group down can block. No reference to a group may outlive
    this: gloo's threads would then end with the interpreter and abort it. The DDP module can: matplotlib keeps
    frames in a reference cycle (curves.png is drawn from train()'s callees), so cycles are collected first."""
    global _cpu_group
    _cpu_group = None
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Ranks and collectives (without a process group: one process, rank 0)


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process():
    """Rank 0: the one that logs and writes files."""
    return get_rank() == 0


def say(message, file=None):  # None: sys.stdout as it is now (redirect_stdout, pytest)
    if is_main_process():
        print(message, file=file, flush=True)


def all_reduce_sum(tensor):
    """In place over all ranks; returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_over_ranks(number, device):
    """The largest of an integer over all ranks (int32: every backend reduces it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return number
    value = torch.tensor([number], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def average_bn_stats(model):
    """timm's distribute_bn('reduce'): average BN running statistics over ranks before eval."""
    for name, buffer in model.named_buffers():
        if 'running_mean' in name or 'running_var' in name:
            all_reduce_sum(buffer).div_(get_world_size())


# Ending a rank: bad input in one line, a failed peer in one line, bugs with their traceback


@contextlib.contextmanager
def one_line_errors(alike_on_every_rank=False):
    """Bad input (flags, data, checkpoints) or a loss that stays non-finite ends the program with `error: ...`,
    exit status 2, no traceback: said by rank 0 when every rank finds the same (flags; the all-reduced loss), else
    by the rank that hit it. The launcher stops the others."""
    rank = int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', 0)))  # as the launcher gave it
    several = int(os.environ.get('WORLD_SIZE', os.environ.get('SLURM_STEP_NUM_TASKS', 1))) > 1
    where = f' (rank {rank})' if several else ''
    try:
        yield
    except (UsageError, DataError, CheckpointError, FloatingPointError, TimeoutError) as e:
        if rank == 0 or not (alike_on_every_rank or isinstance(e, FloatingPointError)):
            print(f'error{where}: {one_line(e)}', file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # train.py: SIGINT before its stop handler is set, or while evaluating
        print(f'interrupted{where} before anything was saved', file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:
        if several and is_peer_failure(e):  # another rank failed and says why
            reason = one_line(e).split('] ', 1)[-1].split('. ')[0]  # gloo: "[file:line] What. Hint."
            print(f'rank {rank} stops: another rank failed ({reason})', file=sys.stderr, flush=True)
            sys.stdout.flush()  # then no teardown: gloo's threads, still waiting on the lost peer, could
            os._exit(1)  # abort the exit ('terminate called without an active exception', 1 in 6 tries)
        raise  # a bug: the traceback, each line prefixed [rankN] by torch.distributed


# What gloo's and HCCL's RuntimeErrors say when another rank went away or went silent for --dist-timeout (after a
# gloo timeout every later one says 'Application timeout caused pair closure').
PEER_FAILURE = re.compile(
    r'Connection (closed|reset) by peer|Broken pipe|Timed out waiting|Application timeout caused pair closure|'
    r'Socket (unexpectedly )?closed|(Read|Write) timeout|Watchdog caught collective operation timeout|'
    r'timed out in blocking wait'
)


def is_peer_failure(error):
    """Whether a collective failed because another rank went away (it reports its own error) or went silent: a
    DistError (NCCL, the stores, some HCCL timeouts), or a RuntimeError that says PEER_FAILURE."""
    said = isinstance(error, RuntimeError) and PEER_FAILURE.search(str(error)) is not None
    return isinstance(error, dist.DistError) or said
