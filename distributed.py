"""Devices, ranks under torchrun, torch.distributed.launch or Slurm's srun, the store where they meet (also after
torchrun restarts a group), the collectives train.py needs, the rank-0 print, how a rank ends: one line or traceback."""

import contextlib
import datetime
import importlib.util
import os
import re
import sys
import time

import torch
import torch.distributed as dist

from errors import CheckpointError, DataError, UsageError, one_line

# ----------------------------------------------------------------------------------------------
# Devices


def device_type(name):
    """'auto': cuda, else an Ascend npu, else cpu, alike on every rank; 'cuda' or 'npu' without one is a UsageError."""
    if name == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        npu = importlib.util.find_spec('torch_npu') and importlib.import_module('torch_npu')  # registers the device
        return 'npu' if npu and torch.npu.is_available() else 'cpu'
    if name == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda: no CUDA GPU is visible; use --device cpu or auto')
    if name == 'npu':
        try:
            importlib.import_module('torch_npu')
        except ImportError:
            raise UsageError(
                "--device npu: torch_npu is not installed (Ascend's PyTorch adapter); install it or use --device cpu"
            ) from None
    return name


def select_device(name, local_rank):
    """This process's device: cuda:LOCAL_RANK, npu:LOCAL_RANK or the cpu (name as device_type takes it)."""
    name = device_type(name)
    if name == 'cpu':
        return torch.device('cpu')
    accelerator = getattr(torch, name)  # torch.cuda, or torch.npu once torch_npu is imported
    index = device_index(local_rank, accelerator.device_count(), 'GPU' if name == 'cuda' else 'NPU')
    accelerator.set_device(index)
    return torch.device(name, index)


def device_index(local_rank, visible, kind='GPU'):
    """The local rank, or under srun with devices bound per task (--gpus-per-task, --ntasks-per-gpu: each task
    sees only its own, yet SLURM_LOCALID counts the node's tasks) the local rank modulo the devices it sees."""
    if local_rank < visible:
        return local_rank
    bound = any(key in os.environ for key in ('SLURM_GPUS_PER_TASK', 'SLURM_NTASKS_PER_GPU'))
    if visible and bound and ranks_from_slurm():
        return local_rank % visible
    raise UsageError(
        f'process {local_rank} has no {kind}: {visible} visible; start at most that many processes per node'
    )


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'npu':
        torch.npu.synchronize()


def reset_peak_memory(device):
    """Starts a new peak for peak_memory_mib: the accelerator's allocator statistics, or on Linux the process's
    peak resident set (VmHWM, reset through /proc/self/clear_refs)."""
    accelerator = getattr(torch, device.type, None)
    if hasattr(accelerator, 'reset_peak_memory_stats'):
        accelerator.reset_peak_memory_stats(device)
        return
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:  # not Linux, or not allowed: the peak counts from the process's start
        pass


def peak_memory_mib(device):
    """The most memory held since reset_peak_memory: allocated on a GPU/NPU (torchvision's references' "max mem"),
    resident in this process on the CPU (its loader workers not counted)."""
    accelerator = getattr(torch, device.type, None)
    if hasattr(accelerator, 'max_memory_allocated'):
        return accelerator.max_memory_allocated(device) / 2**20
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024
    except (OSError, StopIteration):
        import resource  # the peak since the process started: KiB on Linux, bytes on macOS

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == 'darwin' else 1024)


def default_workers():
    """timm's 4 loader processes per device, but not more than this device's share of the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return min(4, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))


def default_channels_last(device):
    """Without --channels-last: NHWC on CUDA (cuDNN's fast depthwise and bf16 kernels want it) and on the
    CPU (oneDNN's; docs/measurements.md, Speed); the NPU keeps NCHW (its adapter picks its own formats)."""
    return device.type in ('cuda', 'cpu')


# ----------------------------------------------------------------------------------------------
# Launchers and the process group


def distributed_env():
    """(rank, world_size, local_rank) from torchrun's (or torch.distributed.launch's) variables, else from Slurm's in an
    srun step (`srun --ntasks-per-node=8 python train.py`; as TensorFlow's SlurmClusterResolver): the step's task count,
    so a batch script's own `python train.py` is one process despite SLURM_NTASKS=N."""
    if not ranks_from_slurm():
        return tuple(
            int(os.environ.get(key, default)) for key, default in (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0))
        )
    return tuple(int(os.environ[key]) for key in ('SLURM_PROCID', 'SLURM_STEP_NUM_TASKS', 'SLURM_LOCALID'))


def ranks_from_slurm():
    """Whether this process is a task of an srun step started without torchrun (which sets RANK)."""
    return 'RANK' not in os.environ and 'SLURM_STEP_NUM_TASKS' in os.environ


def master_address():
    """(host, port) of the store: MASTER_ADDR and MASTER_PORT (torchrun sets both), else the srun step's first node and
    a port from the job id: jobs sharing a node differ (torch's 29500 would collide), below ephemeral ports (32768)."""
    nodelist = os.environ.get('SLURM_STEP_NODELIST') or os.environ.get('SLURM_JOB_NODELIST')
    host = os.environ.get('MASTER_ADDR') or (first_host(nodelist) if nodelist else None)
    port = os.environ.get('MASTER_PORT') or (
        10000 + int(os.environ['SLURM_JOB_ID']) % 20000 if 'SLURM_JOB_ID' in os.environ else None
    )
    if not host or not port:
        raise UsageError(
            f'{distributed_env()[1]} processes but no MASTER_ADDR and MASTER_PORT: start them '
            f'with torchrun or srun, or set both'
        )
    return host, int(port)


def first_host(nodelist):
    """The first host of a Slurm host list: 'node[01-03,07],gpu5' -> 'node01', 'rack[2-3]-n[4,6]' ->
    'rack2-n4' (the part before the first comma outside brackets, each bracket by its first value)."""
    first = re.match(r'[^,\[]*(?:\[[^\]]*\][^,\[]*)*', nodelist).group(0)
    return re.sub(r'\[([^\]\-,]*)[^\]]*\]', r'\1', first)


def init_distributed(device, timeout_minutes=30):
    """One process group over all ranks, and a CPU one beside it (cpu_group); a collective waiting past the timeout
    fails (the launcher stops all)."""
    global _cpu_group
    backend = {'cuda': 'nccl', 'npu': 'hccl'}.get(device.type, 'gloo')
    rank, world_size, _ = distributed_env()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(
        backend,
        store=rendezvous_store(rank, world_size, timeout),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if device.type == 'cuda' else None,
    )
    if backend != 'gloo':
        _cpu_group = dist.new_group(backend='gloo', timeout=timeout)


_cpu_group = None  # beside an NCCL or HCCL group; with gloo's the default group is on the CPU already


def cpu_group():
    """The ranks' process group on the CPU, for what they agree on without making a GPU or NPU wait (None: the
    default group)."""
    return _cpu_group


def rendezvous_store(rank, world_size, timeout):
    """The store where the ranks meet, as torch's env:// makes it (a client of torchrun's, else served by rank 0),
    but under torchrun each group gets keys of its own: torchrun's store outlives its workers, and a group restarted
    (--max-restarts) read the dead group's addresses there and failed or hung (pytorch/pytorch#167288)."""
    host, port = master_address()
    agent = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
    store = dist.PrefixStore(
        'default_pg',
        dist.TCPStore(
            host, port, world_size, is_master=rank == 0 and not agent, timeout=timeout, multi_tenant=not agent
        ),
    )
    return dist.PrefixStore(fresh_key_space(store, rank, world_size, timeout), store) if agent else store


def fresh_key_space(store, rank, world_size, timeout):
    """A prefix no earlier group used: rank 0 names it after a random token, handed to each rank under a key named after
    the rank's own random token, which no dead process can have written. Not the restart count: each torchrun agent
    counts its own (under c10d, not after a membership change), so nodes would disagree (pytorch/pytorch#108158)."""
    token = os.urandom(8).hex()
    if rank > 0:
        store.set(f'hello/{rank}', token)
        store.wait([f'welcome/{token}'], timeout)
        space = store.get(f'welcome/{token}').decode()
        store.set(f'{space}/arrived/{rank}', '')
        return space
    deadline = time.monotonic() + timeout.total_seconds()
    waiting = set(range(1, world_size))
    while waiting:  # a rank's hello may still be a dead process's: read it again until the rank arrives
        if time.monotonic() > deadline:
            raise TimeoutError(
                f'ranks {sorted(waiting)} did not join the process group within '
                f'{timeout.total_seconds() / 60:g} minutes (--dist-timeout)'
            )
        for other in sorted(waiting):
            if store.check([f'{token}/arrived/{other}']):
                waiting.discard(other)
            elif store.check([f'hello/{other}']):
                store.set(f'welcome/{store.get(f"hello/{other}").decode()}', token)
        time.sleep(0.01)
    return token


def destroy_distributed():
    """After success only: with a rank gone, tearing the group down can block. No reference to a group may outlive
    this: gloo's threads would then end with the interpreter and abort it."""
    global _cpu_group
    _cpu_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
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


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """In place over all ranks; returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_over_ranks(tensor):
    """The mean over ranks, as a new tensor (gloo has no AVG)."""
    return all_reduce_sum(tensor.clone()) / get_world_size()


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


# ----------------------------------------------------------------------------------------------
# Ending a rank: bad input in one line, a failed peer in one line, bugs with their traceback


@contextlib.contextmanager
def one_line_errors(alike_on_every_rank=False):
    """Bad input (flags, data, checkpoints) or a loss that stays non-finite ends the program with `error: ...`,
    exit status 2, no traceback: said by rank 0 when every rank finds the same (flags; the all-reduced loss), else
    by the rank that hit it. The launcher stops the others."""
    rank, world_size, _ = distributed_env()
    where = f' (rank {rank})' if world_size > 1 else ''
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
        if world_size > 1 and is_peer_failure(e):  # another rank failed and says why
            reason = one_line(e).split('] ', 1)[-1].split('. ')[0]  # gloo: "[file:line] What. Hint."
            print(f'rank {rank} stops: another rank failed ({reason})', file=sys.stderr, flush=True)
            sys.stdout.flush()  # then no teardown: gloo's threads, still waiting on the lost peer, could
            os._exit(1)  # abort the exit ('terminate called without an active exception', 1 in 6 tries)
        raise  # a bug: the traceback, each line prefixed [rankN] by torch.distributed


def is_peer_failure(error):
    """Whether a collective failed because another rank went away (it reports its own error) or went silent for
    --dist-timeout: a DistError (NCCL, the stores, some HCCL timeouts), or gloo's and HCCL's RuntimeError known by its
    message (after a gloo timeout every later one says 'Application timeout caused pair closure')."""
    signs = (
        'Connection closed by peer',
        'Connection reset by peer',
        'Broken pipe',
        'Timed out waiting',
        'Application timeout caused pair closure',
        'Socket closed',
        'Socket unexpectedly closed',
        'Read timeout',
        'Write timeout',
        'Watchdog caught collective operation timeout',
        'timed out in blocking wait',
    )
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(sign in str(error) for sign in signs)
    )
