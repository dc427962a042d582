"""The published weights by timm's name VARIANT.TAG, downloaded once and checked. Beside the copy (README, "What
to copy"): train.py imports it only for a tag (--model VARIANT.TAG) or --pretrained without a path.

    python published.py      # the variants (parameters, GMACs, sizes, top-1), then every tag's weights
    load_pretrained(net, read_checkpoint(published_weights('tf_efficientnetv2_s.in21k_ft_in1k')))  # weights.py's

timm's files come from the Hugging Face hub into its cache (shared with timm; HF_ENDPOINT for a mirror,
HF_HUB_OFFLINE=1 offline), torchvision's into torch.hub's. A cached file is not asked for again; a download is
checked against the SHA-256 its publisher states, and a failed one leaves nothing in the cache and is one
CheckpointError line naming the URL, the cache and a local copy's flag.
"""

import contextlib
import hashlib
import http.client
import logging
import os
import re
import sys

import torch

import distributed
import model as models
from errors import CheckpointError

TORCHVISION_MODELS = 'https://download.pytorch.org/models'  # the tests serve their own folder instead
LOCAL_COPY = "give a local copy instead (train.py --pretrained PATH, predict.py's checkpoint argument)"

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
    'efficientnetv2_rw_t.ra2_in1k': ('timm', 1000, 82.354, {}),
    'efficientnetv2_rw_s.ra2_in1k': ('timm', 1000, 83.830, {}),
    'efficientnetv2_rw_m.agc_in1k': ('timm', 1000, 84.830, {}),
    'efficientnetv2_s.tv_in1k': ('torchvision', 1000, 84.228, dict(interpolation='bilinear')),
    'efficientnetv2_m.tv_in1k': ('torchvision', 1000, 85.112, dict(test_size=480, interpolation='bilinear')),
    'efficientnetv2_l.tv_in1k': ('torchvision', 1000, 85.808, _TF),
    'tf_efficientnetv2_s.in1k': ('timm', 1000, 83.900, {}),
    'tf_efficientnetv2_s.in21k_ft_in1k': ('timm', 1000, 84.332, {}),
    'tf_efficientnetv2_s.in21k': ('timm', 21843, None, {}),
    'tf_efficientnetv2_m.in1k': ('timm', 1000, 85.208, {}),
    'tf_efficientnetv2_m.in21k_ft_in1k': ('timm', 1000, 86.014, {}),
    'tf_efficientnetv2_m.in21k': ('timm', 21843, None, {}),
    'tf_efficientnetv2_l.in1k': ('timm', 1000, 85.660, {}),
    'tf_efficientnetv2_l.in21k_ft_in1k': ('timm', 1000, 86.802, {}),
    'tf_efficientnetv2_l.in21k': ('timm', 21843, None, {}),
    'tf_efficientnetv2_xl.in21k_ft_in1k': ('timm', 1000, 86.754, {}),  # no in1k-only weights
    'tf_efficientnetv2_xl.in21k': ('timm', 21843, None, {}),
    'tf_efficientnetv2_b0.in1k': ('timm', 1000, 78.386, {}),
    'tf_efficientnetv2_b1.in1k': ('timm', 1000, 79.518, {}),
    'tf_efficientnetv2_b2.in1k': ('timm', 1000, 80.226, {}),
    'tf_efficientnetv2_b3.in1k': ('timm', 1000, 81.960, {}),
    'tf_efficientnetv2_b3.in21k_ft_in1k': ('timm', 1000, 82.634, dict(crop_pct=0.9, **_TF)),
    'tf_efficientnetv2_b3.in21k': ('timm', 21843, None, _TF),
}  # efficientnetv2_xl: none (timm lists it untrained; tf_efficientnetv2_xl has Google's weights)
TORCHVISION_FILES = {
    'efficientnetv2_s.tv_in1k': 'efficientnet_v2_s-dd5fe13b.pth',
    'efficientnetv2_m.tv_in1k': 'efficientnet_v2_m-dc08266a.pth',
    'efficientnetv2_l.tv_in1k': 'efficientnet_v2_l-59c71312.pth',
}


def published_tag(name):
    """VARIANT.TAG of the weights `name` means: itself, or for a bare variant its default. An unknown
    variant is a ValueError, a variant without weights or an unknown tag a CheckpointError (one line)."""
    models.check_model_name(name)
    variant = name.split('.')[0]
    tags = [tag for tag in PUBLISHED_WEIGHTS if tag.split('.')[0] == variant]
    if not tags:
        raise CheckpointError(
            f'{variant} has no published ImageNet weights: train it from scratch, or '
            f'start from a variant that has them (python published.py lists them)'
        )
    if name != variant and name not in tags:
        raise CheckpointError(
            f'no published weights {name}: {variant} has {", ".join(tags)} (python published.py lists every tag)'
        )
    return tags[0] if name == variant else name


def published_config(name):
    """The eval config (test_size, crop_pct, interpolation, mean, std; train_size) of the weights
    `name` means (see published_tag), with which they reach the table's top-1."""
    tag = published_tag(name)
    return {**models.VARIANTS[tag.split('.')[0]]['config'], **PUBLISHED_WEIGHTS[tag][3]}


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
    url = huggingface_hub.hf_hub_url(repo, filename)
    cache = huggingface_hub.constants.HF_HUB_CACHE
    hub_log = logging.getLogger('huggingface_hub')
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # no notices while it retries a host that is down: one line
    try:
        path = huggingface_hub.hf_hub_download(repo, filename)
    except Exception as e:  # its own errors, OSErrors, and its HTTP client's exceptions (a cut transfer)
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        reason = 'HF_HUB_OFFLINE is set and the file is not cached' if offline else _reason(e)
        raise CheckpointError(f'cannot download {url} into {cache} ({reason}): {LOCAL_COPY}') from None
    finally:
        hub_log.setLevel(level)
    _check_sha256(path, url, cache)
    if progress:
        print(f'downloaded {url} to {path}', file=sys.stderr, flush=True)
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
                f'{url} does not match the SHA-256 the hub states (expected {expected[:16]}, got '
                f'{digest.hexdigest()[:16]}); nothing was kept in {cache}: try again, or check the mirror'
            )
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
        raise CheckpointError(
            f'{url} does not match the SHA-256 prefix in its name (expected '
            f'{sha256_prefix}); nothing was kept in {folder}: try again'
        ) from None
    except (OSError, http.client.HTTPException) as e:  # urllib's URLError and HTTPError are OSErrors
        raise CheckpointError(
            f'cannot download {url} to {path} ({_reason(e)}): copy that file there by hand, or {LOCAL_COPY}'
        ) from None
    if progress:
        print(f'downloaded {url} to {path}', file=sys.stderr, flush=True)
    return path


def _reason(error):
    """Why a download failed, in a few words: the HTTP status, or the innermost error's first line."""
    while error.__cause__ is not None:  # huggingface_hub wraps the cause (LocalEntryNotFoundError)
        error = error.__cause__
    response = getattr(error, 'response', None)  # huggingface_hub's HTTP errors (httpx's or requests')
    if response is not None:
        return f'HTTP {response.status_code} {getattr(response, "reason_phrase", None) or response.reason}'
    if isinstance(getattr(error, 'code', None), int):  # urllib's HTTPError
        return f'HTTP {error.code} {error.reason}'
    error = getattr(error, 'reason', None) or error  # urllib's URLError holds the socket's error
    # the first line, not errors.one_line's last: huggingface_hub's size check adds advice on the next lines
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def fetch(name):
    """published_weights(name) for a run of several processes: downloaded once per node (local rank 0 fetches
    while the others wait, then find the file in the cache)."""
    local_rank = distributed.distributed_env()[2]
    if local_rank == 0:
        path = published_weights(name)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path if local_rank == 0 else published_weights(name, progress=False)


# ----------------------------------------------------------------------------------------------
# The table: `python published.py`


def count_macs(model, size):
    """Multiply-accumulates of one forward pass at size x size: each conv and linear layer's output elements
    times the inputs each sums (BN, SE gating, activations not counted). For a model on the meta device, by
    hooks in eval mode: FlopCounterMode and BN's training branch are slower there (docs/measurements.md)."""
    macs = []

    def count(layer, inputs, output):
        macs.append(output.numel() * layer.weight[0].numel())  # weight[0]: one output's inputs

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    was_training = model.training
    with torch.no_grad():
        model.eval()(torch.empty(1, 3, size, size, device=model.conv_stem.weight.device))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return sum(macs)


if __name__ == '__main__':
    print(
        f'{"model":<24}{"params":>14}{"GMACs":>8}{"train":>7}{"test":>6}{"crop":>7}   ImageNet top-1 '
        f'of the default weights (--pretrained)'
    )
    for name in models.list_models():
        with torch.device('meta'):
            net = models.create_model(name)
        cfg = net.config
        params = sum(p.numel() for p in net.parameters())
        tag = next((tag for tag in PUBLISHED_WEIGHTS if tag.split('.')[0] == name), None)
        top1 = f'{PUBLISHED_WEIGHTS[tag][2]:.3f} @{published_config(tag)["test_size"]}' if tag else ''
        print(
            f'{name:<24}{params:>14,}{count_macs(net, cfg["train_size"]) / 1e9:>8.2f}{cfg["train_size"]:>7}'
            f'{cfg["test_size"]:>6}{cfg["crop_pct"]:>7.3f}   {top1:<12}{tag or "none"}'
        )
    print(
        f'\n{"--model VARIANT.TAG --pretrained":<38}{"classes":>8}{"train":>7}{"test":>6}{"crop":>7}'
        f'   mean/std  resize    ImageNet top-1'
    )
    for tag, (publisher, classes, top1, _) in PUBLISHED_WEIGHTS.items():
        cfg = published_config(tag)
        norm = '0.5' if cfg['mean'] == models.TF_MEAN else 'ImageNet'
        top1 = f'{top1:.3f} @{cfg["test_size"]}' if top1 else 'none: 21k classes'
        print(
            f'{tag:<38}{classes:>8,}{cfg["train_size"]:>7}{cfg["test_size"]:>6}{cfg["crop_pct"]:>7.3f}'
            f'   {norm:<10}{cfg["interpolation"]:<10}{top1} ({publisher})'
        )
