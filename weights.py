"""Weights: the published ones by timm's name VARIANT.TAG, downloaded once and checked; checkpoint files
read without running their code; timm's, torchvision's and train.py's weights loaded into a model.

    load_pretrained(net, read_checkpoint('output/train/RUN/model_best.pth.tar'))  # or a .safetensors file
    load_pretrained(net, read_checkpoint(published_weights('tf_efficientnetv2_s.in21k_ft_in1k')))

timm's files come from the Hugging Face hub into its cache (shared with timm; HF_ENDPOINT for a mirror,
HF_HUB_OFFLINE=1 offline), torchvision's into torch.hub's; `python model.py` lists every tag. A cached file
is not asked for again; a download is checked against the SHA-256 its publisher states, and a failed one
leaves nothing in the cache and is one CheckpointError line naming the URL, the cache and a local copy's flag.
"""
import argparse
import contextlib
import hashlib
import http.client
import logging
import os
import re
import sys

import safetensors.torch
import torch

import model as models
from errors import CheckpointError, one_line

TORCHVISION_MODELS = 'https://download.pytorch.org/models'  # the tests serve their own folder instead
LOCAL_COPY = "give a local copy instead (train.py --pretrained PATH, predict.py's checkpoint argument)"

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
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # unpickling errors, truncated files, foreign formats
        if is_safetensors:
            raise CheckpointError(f"cannot read {path} as a safetensors file: {one_line(e)}") from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        if lines[0].startswith('Weights only load failed'):  # torch names the refused callable
            detail = next((line for line in lines if 'GLOBAL' in line), lines[-1])
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects beyond tensors and plain types, which "
                f"unpickling could run as code ({detail.rstrip('.')}); load it with "
                f"torch.load(weights_only=False) only if you trust its source") from None
        raise CheckpointError(f"cannot read checkpoint {path} as a weights-only file "
                              f"(tensors and plain types): {lines[0]}") from None


# ----------------------------------------------------------------------------------------------
# Published weights by timm's name VARIANT.TAG: every EfficientNetV2 tag on timm's hub (repo timm/VARIANT.TAG)
# and torchvision's three files, tagged tv_in1k as timm tags torchvision's weights (resnet50.tv_in1k). in1k:
# ImageNet-1k; in21k: ImageNet-21k (21,843 classes, no ImageNet-1k top-1); in21k_ft_in1k: in21k, then in1k;
# ra2, agc: timm's in1k recipes. A variant's first row is its default (--pretrained with the bare name). Top-1
# on ImageNet-1k's validation set (timm's results/results-imagenet.csv at 4e5207c, torchvision's docs) at the
# variant's eval settings with the row's overrides (timm squashes tf_m/l/xl's and b3.in21k_ft_in1k's images
# to a square, data.py center-crops). Not here: gc_efficientnetv2_rw_t.agc_in1k, another network.
_TF = dict(mean=models.TF_MEAN, std=models.TF_STD)
#   VARIANT.TAG                            publisher   classes  top-1   eval overrides
PUBLISHED_WEIGHTS = {
    'efficientnetv2_rw_t.ra2_in1k':        ('timm',        1000, 82.354, {}),
    'efficientnetv2_rw_s.ra2_in1k':        ('timm',        1000, 83.830, {}),
    'efficientnetv2_rw_m.agc_in1k':        ('timm',        1000, 84.830, {}),
    'efficientnetv2_s.tv_in1k':            ('torchvision', 1000, 84.228, dict(interpolation='bilinear')),
    'efficientnetv2_m.tv_in1k':            ('torchvision', 1000, 85.112, dict(test_size=480, interpolation='bilinear')),
    'efficientnetv2_l.tv_in1k':            ('torchvision', 1000, 85.808, _TF),
    'tf_efficientnetv2_s.in1k':            ('timm',        1000, 83.900, {}),
    'tf_efficientnetv2_s.in21k_ft_in1k':   ('timm',        1000, 84.332, {}),
    'tf_efficientnetv2_s.in21k':           ('timm',       21843, None, {}),
    'tf_efficientnetv2_m.in1k':            ('timm',        1000, 85.208, {}),
    'tf_efficientnetv2_m.in21k_ft_in1k':   ('timm',        1000, 86.014, {}),
    'tf_efficientnetv2_m.in21k':           ('timm',       21843, None, {}),
    'tf_efficientnetv2_l.in1k':            ('timm',        1000, 85.660, {}),
    'tf_efficientnetv2_l.in21k_ft_in1k':   ('timm',        1000, 86.802, {}),
    'tf_efficientnetv2_l.in21k':           ('timm',       21843, None, {}),
    'tf_efficientnetv2_xl.in21k_ft_in1k':  ('timm',        1000, 86.754, {}),  # no in1k-only weights
    'tf_efficientnetv2_xl.in21k':          ('timm',       21843, None, {}),
    'tf_efficientnetv2_b0.in1k':           ('timm',        1000, 78.386, {}),
    'tf_efficientnetv2_b1.in1k':           ('timm',        1000, 79.518, {}),
    'tf_efficientnetv2_b2.in1k':           ('timm',        1000, 80.226, {}),
    'tf_efficientnetv2_b3.in1k':           ('timm',        1000, 81.960, {}),
    'tf_efficientnetv2_b3.in21k_ft_in1k':  ('timm',        1000, 82.634, dict(crop_pct=0.9, **_TF)),
    'tf_efficientnetv2_b3.in21k':          ('timm',       21843, None, _TF),
}  # efficientnetv2_xl: none (timm lists it untrained; tf_efficientnetv2_xl has Google's weights)
TORCHVISION_FILES = {'efficientnetv2_s.tv_in1k': 'efficientnet_v2_s-dd5fe13b.pth',
                     'efficientnetv2_m.tv_in1k': 'efficientnet_v2_m-dc08266a.pth',
                     'efficientnetv2_l.tv_in1k': 'efficientnet_v2_l-59c71312.pth'}


def published_tag(name):
    """VARIANT.TAG of the weights `name` means: itself, or for a bare variant its default. An unknown
    variant is a ValueError, a variant without weights or an unknown tag a CheckpointError (one line)."""
    models.check_model_name(name)
    variant = name.split('.')[0]
    tags = [tag for tag in PUBLISHED_WEIGHTS if tag.split('.')[0] == variant]
    if not tags:
        raise CheckpointError(f"{variant} has no published ImageNet weights: train it from scratch, or "
                              f"start from a variant that has them (python model.py lists them)")
    if name != variant and name not in tags:
        raise CheckpointError(f"no published weights {name}: {variant} has {', '.join(tags)} "
                              f"(python model.py lists every tag)")
    return tags[0] if name == variant else name


def published_config(name):
    """The eval config (test_size, crop_pct, interpolation, mean, std; train_size) of the weights
    `name` means (see published_tag), with which they reach the table's top-1."""
    tag = published_tag(name)
    return {**models.VARIANTS[tag.split('.')[0]]['config'], **PUBLISHED_WEIGHTS[tag][3]}


def model_config(name, published=False):
    """The settings to train and evaluate --model NAME with: a tag's (as timm's create_model takes
    them, its weights loaded or not), the default weights' when `published`, else the variant's."""
    return published_config(name) if published or '.' in name else models.VARIANTS[name]['config']


def published_weights(name, progress=True):
    """Local path of the published weights `name` means (see published_tag): the cached file, or else
    downloaded now (`progress`: a line on stderr when saved, and on a terminal the client's bar). No such
    weights or a failed download is a CheckpointError of one line; an unknown variant a ValueError."""
    tag = published_tag(name)
    if PUBLISHED_WEIGHTS[tag][0] == 'timm':
        return _from_hugging_face(f'timm/{tag}', 'model.safetensors', progress)
    return _from_torchvision(TORCHVISION_FILES[tag], progress)


def _from_hugging_face(repo, filename, progress):
    """hf_hub_download, plus what this project promises beyond it: no request at all once the file is
    cached (it asks the hub for the newest revision on every call), the SHA-256 check, one-line errors."""
    import huggingface_hub  # only here: its import is slow, and reading files does not need it
    cached = huggingface_hub.try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):  # else None, or a marker that the hub once answered "no such file"
        return cached
    url, cache = huggingface_hub.hf_hub_url(repo, filename), huggingface_hub.constants.HF_HUB_CACHE
    hub_log = logging.getLogger('huggingface_hub')
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # no notices while it retries a host that is down: one line
    try:
        path = huggingface_hub.hf_hub_download(repo, filename)
    except Exception as e:  # its own errors, OSErrors, and its HTTP client's exceptions (a cut transfer)
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        reason = 'HF_HUB_OFFLINE is set and the file is not cached' if offline else _reason(e)
        raise CheckpointError(f"cannot download {url} into {cache} ({reason}): {LOCAL_COPY}") from None
    finally:
        hub_log.setLevel(level)
    _check_sha256(path, url, cache)
    if progress:
        print(f"downloaded {url} to {path}", file=sys.stderr, flush=True)
    return path


def _check_sha256(path, url, cache):
    """huggingface_hub checks a download's length, not its content. The hub states a large (LFS) file's
    SHA-256 in X-Linked-Etag and the cache names the file's blob after it: unless they match (or when
    interrupted), remove the blob and its snapshot link. Not checked: files kept in git (named by a
    SHA-1) and caches without links (Windows, by default)."""
    blob = os.path.realpath(path)
    expected = os.path.basename(blob)
    if not re.fullmatch(r'[0-9a-f]{64}', expected):
        return
    try:
        digest = hashlib.sha256()
        with open(blob, 'rb') as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise CheckpointError(
                f"{url} does not match the SHA-256 the hub states (expected {expected[:16]}, got "
                f"{digest.hexdigest()[:16]}); nothing was kept in {cache}: try again, or check the mirror")
    except BaseException:
        for leftover in (path, blob):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        raise


def _from_torchvision(file, progress):
    """torch.hub's downloader, as torchvision's loader uses it: the file named with its SHA-256 prefix
    is checked against it, written to a temporary file and renamed into place only when it matches."""
    url = f'{TORCHVISION_MODELS}/{file}'
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    path = os.path.join(folder, file)
    if os.path.exists(path):
        return path
    sha256_prefix = re.search(r'-([0-9a-f]{8,})\.', file).group(1)
    try:
        os.makedirs(folder, exist_ok=True)
        # torch.hub's bar only on a terminal: its carriage returns do not belong in a log file
        torch.hub.download_url_to_file(url, path, sha256_prefix, progress=progress and sys.stderr.isatty())
    except RuntimeError:  # torch.hub's "invalid hash value"
        raise CheckpointError(f"{url} does not match the SHA-256 prefix in its name (expected "
                              f"{sha256_prefix}); nothing was kept in {folder}: try again") from None
    except (OSError, http.client.HTTPException) as e:  # urllib's URLError and HTTPError are OSErrors
        raise CheckpointError(f"cannot download {url} to {path} ({_reason(e)}): copy that file there "
                              f"by hand, or {LOCAL_COPY}") from None
    if progress:
        print(f"downloaded {url} to {path}", file=sys.stderr, flush=True)
    return path


def _reason(error):
    """Why a download failed, in a few words: the HTTP status, or the innermost error's first line."""
    while error.__cause__ is not None:  # huggingface_hub wraps the cause (LocalEntryNotFoundError)
        error = error.__cause__
    response = getattr(error, 'response', None)  # huggingface_hub's HTTP errors (httpx's or requests')
    if response is not None:
        return f"HTTP {response.status_code} {getattr(response, 'reason_phrase', None) or response.reason}"
    if isinstance(getattr(error, 'code', None), int):  # urllib's HTTPError
        return f"HTTP {error.code} {error.reason}"
    error = getattr(error, 'reason', None) or error  # urllib's URLError holds the socket's error
    # the first line, not errors.one_line's last: huggingface_hub's size check adds advice on the next lines
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Loading weights into a model: timm's, torchvision's, and this project's checkpoints

def _unwrap(checkpoint, use_ema):
    """The model's state dict out of a bare dict, timm's wrapper or this project's checkpoint."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint is a {type(checkpoint).__name__}, not a state dict")
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
        raise CheckpointError(f"torchvision state dict has {len(theirs)} entries, the model has "
                              f"{len(ours)}: not the same variant")
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
        notes.append("converted torchvision weights; BatchNorm eps set to 1e-3")
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
            raise CheckpointError(f"checkpoint does not fit this model: '{key}' has shape "
                                  f"{tuple(state[key].shape)}, the model {tuple(expected[key].shape)}")
    if skipped:
        notes.append(f"classifier left as initialised (checkpoint has {state['classifier.weight'].shape[0]} "
                     f"classes, model {model.num_classes})")
        state.update({k: expected[k] for k in skipped})
    model.load_state_dict(state)
    return notes
