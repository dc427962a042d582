"""Weights from elsewhere, beside the copy: timm's and torchvision's files, and train.py's checkpoints, loaded into a
model for --pretrained PATH (fine-tuning: a new classifier where the classes differ), predict.py and the tests; the
published weights by tag through published.py; --freeze-bn. train.py imports this only for --pretrained and
--freeze-bn.

    load_pretrained(net, read_checkpoint('output/train/RUN/model_best.pth.tar'))  # or timm's .safetensors file
"""

import torch

from checkpoint import read_checkpoint  # the one reader of weight files, also for this file's callers
from distributed import say
from errors import CheckpointError, import_beside


def published():
    """published.py: the published weights by tag (beside the copy)."""
    return import_beside('published', 'the published weights by tag (--model VARIANT.TAG, --pretrained alone)')


def load_for_training(model, name, pretrained):
    """--pretrained: the weights file `pretrained`, or (True) --model NAME's published weights, into `model`; what
    was converted or left out (a new classifier) is said."""
    path = published().fetch(name) if pretrained is True else pretrained
    for note in load_pretrained(model, read_checkpoint(path)):
        say(note)


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
    a classifier of another shape is skipped (fine-tuning); any other mismatch raises. Returns notes to log."""
    state = _unwrap(checkpoint, use_ema)
    notes = []
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


def freeze_batchnorm(model):
    """--freeze-bn, for fine-tuning with small batches: BatchNorm in eval mode uses and keeps its running
    statistics; its scale and shift still train."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
