"""--compile, beside the copy: torch.compile of the training forward and backward. train.py imports this only for
--compile; a copy without it trains eagerly.
"""

import torch

from errors import UsageError


def compile_model(model, precision, args):
    """Only the training forward/backward is compiled: EMA, evaluation and checkpoints use the plain module (no
    `_orig_mod.` in saved keys). Static shapes: --progressive recompiles once per stage."""
    if not getattr(precision, 'compiles', True):  # apex_amp.py's: apex patches torch's functions
        raise UsageError("--compile does not work with apex's patched functions; use --amp")
    config = torch._dynamo.config
    limit = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'  # torch < 2.7
    setattr(config, limit, max(getattr(config, limit), args.prog_stages + 1))
    return torch.compile(model, dynamic=False)
