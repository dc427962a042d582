"""Mixed precision: autocast, and float16's loss scaling by torch's GradScaler. Beside the copy: NVIDIA apex's O1 for
--apex-amp (apex_amp.py) and the loss scaler of Ascend NPUs (npu.py).

    precision, model, optimizer = create_precision(device, model, optimizer, amp=True, amp_dtype='float16')
    with precision.autocast():
        loss = train_loss(model(images), targets, args)
    precision.backward(loss)
    skipped = precision.step(optimizer, clip_grad)   # under float16: a bool tensor, on the device
"""

import contextlib
import importlib
import importlib.util

import torch

from errors import import_beside


class Precision:
    """Autocast in `dtype` (None: float32 throughout) and, for float16, a GradScaler: it skips a step whose gradients
    are not finite and lowers its scale. step() answers whether it skipped the step: False without a scaler, else a
    bool tensor on the device, so a step waits for the device only in the scaler's own check."""

    def __init__(self, device_type, dtype=None, scaler=None):
        self.device_type = device_type
        self.dtype = dtype
        self.scaler = scaler or torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)

    def autocast(self):
        return contextlib.nullcontext() if self.dtype is None else torch.autocast(self.device_type, self.dtype)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def step(self, optimizer, clip_grad=None):
        if clip_grad:
            clip_gradients(optimizer, clip_grad, self.scaler)
        if not self.scaler.is_enabled():
            optimizer.step()
            return False
        # The scale as a tensor (get_scale() would wait for the device): a skipped step lowers it.
        scale = self.scaler._get_scale_async().clone()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler._get_scale_async() < scale

    def state_dict(self):  # the GradScaler's: {} when disabled
        return self.scaler.state_dict()

    def load_state_dict(self, state):
        """Another kind's state (apex's, or none saved) is ignored: the scale starts afresh."""
        if self.scaler.is_enabled() and 'scale' in state:
            self.scaler.load_state_dict(state)


def clip_gradients(optimizer, max_norm, scaler):
    """Clips the true gradients: a GradScaler's are unscaled first (a disabled one leaves them as they are)."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group['params']], max_norm)


def create_precision(device, model, optimizer, amp=False, amp_dtype=None, apex=False, say=print):
    """The Precision, and the model and optimizer it trains. --amp: native; --apex-amp: apex's O1 where apex_amp.py
    and apex import (a GPU), else native, saying so. The default dtype is float16 on accelerators, bfloat16 on the
    CPU."""
    dtype = getattr(torch, amp_dtype or ('bfloat16' if device.type == 'cpu' else 'float16'))
    if apex and device.type != 'cpu' and importlib.util.find_spec('apex_amp'):
        made = importlib.import_module('apex_amp').initialize(model, optimizer, device.type)
        if made is not None:
            return made
    if apex:
        dtype_name = str(dtype).replace('torch.', '')
        say(f'--apex-amp: NVIDIA apex is not available here; using native mixed precision ({dtype_name})')
    if not (amp or apex):
        return Precision(device.type), model, optimizer
    scaler = None
    if device.type == 'npu' and dtype == torch.float16:
        scaler = import_beside('npu', 'an Ascend NPU').grad_scaler()
    return Precision(device.type, dtype, scaler), model, optimizer
