"""Weight files: checkpoints read without running their code; timm's, torchvision's and train.py's weights
loaded into a model (published.py, beside the copy, downloads the published ones by tag).

    load_pretrained(net, read_checkpoint('output/train/RUN/model_best.pth.tar'))  # or a .safetensors file
"""

import argparse
import contextlib

import safetensors.torch
import torch

import model as models
from errors import CheckpointError, import_beside, one_line

# timm's train.py stores its arguments, an argparse.Namespace (a plain attribute bag), in every
# checkpoint; allow that one class as timm does. torch < 2.5 has no allow-list and refuses them.
_allow_globals = getattr(torch.serialization, 'safe_globals', lambda _: contextlib.nullcontext())


def read_checkpoint(path):
    """A checkpoint file's dict, tensors and plain Python types only, never code: torch.load with
    weights_only=True, or the safetensors package for a .safetensors file (timm's hub). A missing,
    broken or unsafe file is a CheckpointError of one line."""
    is_safetensors = str(path).endswith('.safetensors')
    try:
        if is_safetensors:
            return safetensors.torch.load_file(path)
        with _allow_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'checkpoint not found: {path}') from None
    except Exception as e:  # unpickling errors, truncated files, foreign formats
        if is_safetensors:
            raise CheckpointError(f'cannot read {path} as a safetensors file: {one_line(e)}') from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        if lines[0].startswith('Weights only load failed'):  # torch names the refused callable
            detail = next((line for line in lines if 'GLOBAL' in line), lines[-1])
            raise CheckpointError(
                f'refused to load {path}: it holds Python objects beyond tensors and plain types, which '
                f'unpickling could run as code ({detail.rstrip(".")}); load it with '
                f'torch.load(weights_only=False) only if you trust its source'
            ) from None
        raise CheckpointError(
            f'cannot read checkpoint {path} as a weights-only file (tensors and plain types): {lines[0]}'
        ) from None


def published():
    """published.py: the published weights by tag (beside the copy)."""
    return import_beside('published', 'the published weights by tag (--model VARIANT.TAG, --pretrained alone)')


def model_config(name, published_weights=False):
    """--model NAME's settings: a tag's (with its weights or not, as timm's create_model), else the variant's."""
    if published_weights or '.' in name:  # the default weights' settings for a bare name
        return published().published_config(name)
    return models.VARIANTS[name]['config']


# ----------------------------------------------------------------------------------------------
# Loading weights into a model: timm's, torchvision's, and this project's checkpoints


def _unwrap(checkpoint, use_ema):
    """The model's state dict out of a bare dict, timm's wrapper or this project's checkpoint."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'checkpoint is a {type(checkpoint).__name__}, not a state dict')
    keys = ('state_dict_ema', 'model_ema', 'state_dict', 'model') if use_ema else ('state_dict', 'model')
    key = next((key for key in keys if isinstance(checkpoint.get(key), dict) and checkpoint[key]), None)
    state = checkpoint[key] if key else checkpoint
    # DDP's and torch.compile's wrappers prefix the keys
    return {k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in state.items()}


def _torchvision_names(state, model):
    """torchvision's efficientnet_v2_* has our layout under other names, in the same order."""
    ours = [(k, v) for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')]
    theirs = [(k, v) for k, v in state.items() if not k.endswith('num_batches_tracked')]
    if len(ours) != len(theirs):
        raise CheckpointError(
            f'torchvision state dict has {len(theirs)} entries, the model has {len(ours)}: not the same variant'
        )
    for m in model.modules():  # torchvision trains these models with TF's BN eps
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-3
    return {k: v for (k, _), (_, v) in zip(ours, theirs)}


def load_pretrained(model, checkpoint, use_ema=True):
    """Load timm, torchvision or own weights (a state dict, or a checkpoint dict holding one, its EMA
    weights when present and use_ema; read_checkpoint reads files) into `model`, in place. Only
    a classifier of another shape is skipped (fine-tuning); any other mismatch raises. -> notes to log."""
    state, notes = _unwrap(checkpoint, use_ema), []
    if 'features.0.0.weight' in state:
        state = _torchvision_names(state, model)
        notes.append('converted torchvision weights; BatchNorm eps set to 1e-3')
    expected = model.state_dict()
    for key in expected:  # published files may omit these counters; torch itself then loads 0
        if key.endswith('num_batches_tracked') and key not in state:
            state[key] = torch.tensor(0)
    for key in list(expected) + list(state):
        if key not in state or key not in expected:
            where = 'missing from the checkpoint' if key not in state else 'not in the model'
            raise CheckpointError(f"checkpoint does not fit this model: key '{key}' {where}")
    skipped = [k for k in state if k.startswith('classifier.') and state[k].shape != expected[k].shape]
    for key in expected:
        if key not in skipped and state[key].shape != expected[key].shape:
            raise CheckpointError(
                f"checkpoint does not fit this model: '{key}' has shape "
                f'{tuple(state[key].shape)}, the model {tuple(expected[key].shape)}'
            )
    if skipped:
        notes.append(
            f'classifier left as initialised (checkpoint has {state["classifier.weight"].shape[0]} '
            f'classes, model {model.num_classes})'
        )
        state.update({k: expected[k] for k in skipped})
    model.load_state_dict(state)
    return notes
