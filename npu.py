"""Ascend NPUs, beside the copy: torch_npu (Ascend's PyTorch adapter), which registers the 'npu' device with torch
(torch.npu: HCCL collectives, pinned memory, random streams), and the float16 loss scaler Ascend documents for it.
devices.py and precision.py import this only where an NPU is used; the rest of the recipe runs there as on CUDA.
"""

import importlib

import torch

from errors import UsageError


def available():
    """Whether torch_npu, installed (devices.device_type checks before it imports this file), sees an NPU once
    imported (which registers the device)."""
    importlib.import_module('torch_npu')
    return torch.npu.is_available()


def require():
    try:
        importlib.import_module('torch_npu')
    except ImportError:
        raise UsageError(
            "--device npu: torch_npu is not installed (Ascend's PyTorch adapter); install it or use --device cpu"
        ) from None


def grad_scaler():
    """torch_npu's GradScaler, not torch's: it also reads the NPU's overflow flags (float16 there may saturate
    instead of reaching inf) and all-reduces an overflow over the ranks (torch_npu/npu/amp/grad_scaler.py)."""
    return importlib.import_module('torch_npu.npu.amp').GradScaler()
