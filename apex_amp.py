"""--apex-amp where NVIDIA apex's O1 imports (a GPU, apex built from source): Precision's interface over apex.amp,
beside the copy. precision.create_precision imports it only for that flag; without it, or without apex, the run uses
native mixed precision and says so.

    precision, model, optimizer = initialize(model, optimizer, 'cuda')   # None without apex.amp
"""

import importlib

from precision import Precision


def initialize(model, optimizer, device_type):
    """An ApexPrecision, and the model and optimizer as apex's O1 patches them; None where apex.amp does not
    import."""
    try:
        amp = importlib.import_module('apex.amp')
    except ImportError:  # not installed, or a recent apex without amp (the PyPI package named apex is unrelated)
        return None
    model, optimizer = amp.initialize(model, optimizer, opt_level='O1')
    return ApexPrecision(amp, optimizer, device_type), model, optimizer


class ApexPrecision(Precision):
    """apex's O1: it casts by itself (no autocast: Precision without a dtype), scales the loss, and skips a step
    whose gradients overflow. It checks them as scale_loss exits: after an overflow it has already lowered its scale
    and made the next optimizer.step() a no-op, so only the scale before and after tells a skipped step. step()
    answers a bool (apex has read the check back already)."""

    compiles = False  # apex patches torch's functions

    def __init__(self, amp, optimizer, device_type):
        super().__init__(device_type)  # with a disabled GradScaler: clipping leaves apex's unscaled gradients
        self.amp = amp
        self.optimizer = optimizer
        self.overflowed = False

    def backward(self, loss):
        scale = self.loss_scale()
        with self.amp.scale_loss(loss, self.optimizer) as scaled_loss:
            scaled_loss.backward()
        self.overflowed |= self.loss_scale() < scale

    def step(self, optimizer, clip_grad=None):
        super().step(optimizer, clip_grad)  # clips and steps, a no-op after apex saw an overflow
        skipped = self.overflowed
        self.overflowed = False
        return skipped

    def loss_scale(self):
        return self.amp._amp_state.loss_scalers[0].loss_scale()

    def state_dict(self):  # {'loss_scaler0': {...}}
        return self.amp.state_dict()

    def load_state_dict(self, state):
        """A GradScaler's state (or none saved) is ignored: the scale starts afresh."""
        if 'loss_scaler0' in state:
            self.amp.load_state_dict(state)
