"""The device a process trains on and what follows from it: a CUDA GPU (an Ascend NPU through npu.py, beside the
copy) or the CPU; a rank's device by its local rank; the loader's worker count and the memory format that suit it;
waiting for it; its random stream and its peak memory.

    device = select_device('auto', local_rank)      # cuda:LOCAL_RANK, npu:LOCAL_RANK or cpu
"""

import importlib.util
import os
import sys

import torch

from errors import UsageError, import_beside


def device_type(name):
    """'auto': cuda, else an Ascend NPU, else cpu, alike on every rank; 'cuda' or 'npu' without one is a UsageError."""
    if name == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        if importlib.util.find_spec('torch_npu') is None:
            return 'cpu'
        return 'npu' if import_beside('npu', 'an Ascend NPU').available() else 'cpu'
    if name == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda: no CUDA GPU is visible; use --device cpu or auto')
    if name == 'npu':
        import_beside('npu', '--device npu').require()
    return name


def select_device(name, local_rank):
    """This process's device: cuda:LOCAL_RANK, npu:LOCAL_RANK or the cpu (name as device_type takes it)."""
    name = device_type(name)
    if name == 'cpu':
        return torch.device('cpu')
    accelerator = getattr(torch, name)  # torch.cuda, or torch.npu once torch_npu is imported
    visible = accelerator.device_count()
    if local_rank >= visible:
        kind = 'GPU' if name == 'cuda' else 'NPU'
        raise UsageError(f'process {local_rank} has no {kind}: {visible} visible; start at most that many per node')
    accelerator.set_device(local_rank)
    return torch.device(name, local_rank)


def accelerator_module(device):
    """torch.cuda, torch.npu, ...: the module of a device's own functions; None for the CPU and the meta device."""
    return getattr(torch, device.type, None) if device.type not in ('cpu', 'meta') else None


def synchronize(device):
    """Waits until the device has done what was queued (log lines time whole steps)."""
    if accelerator_module(device) is not None:
        accelerator_module(device).synchronize()


def default_workers():
    """timm's 4 loader processes per device, but not more than this device's share of the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return min(4, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))


def default_channels_last(device):
    """Without --channels-last: NHWC on CUDA (cuDNN's fast depthwise and bf16 kernels want it) and on the
    CPU (oneDNN's; docs/measurements.md, Speed); the NPU keeps NCHW (its adapter picks its own formats)."""
    return device.type in ('cuda', 'cpu')


def reset_peak_memory(device):
    """Starts a new peak for peak_memory_mib: the accelerator's allocator statistics, or on Linux the process's
    peak resident set (VmHWM, reset through /proc/self/clear_refs)."""
    accelerator = accelerator_module(device)
    if hasattr(accelerator, 'reset_peak_memory_stats'):
        accelerator.reset_peak_memory_stats(device)
        return
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:  # not Linux, or not allowed: the peak counts from the process's start
        pass


def peak_memory_mib(device):
    """The most memory held since reset_peak_memory: allocated on a GPU or NPU (torchvision's references' "max
    mem"), resident in this process on the CPU (its loader workers not counted)."""
    accelerator = accelerator_module(device)
    if hasattr(accelerator, 'max_memory_allocated'):
        return accelerator.max_memory_allocated(device) / 2**20
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024
    except (OSError, StopIteration):
        import resource  # the peak since the process started: KiB on Linux, bytes on macOS

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == 'darwin' else 1024)
