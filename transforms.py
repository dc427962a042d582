"""Transforms: what the loader workers do to each image and what the device does to each batch.

    transform = train_transform(288, aa='rand-m9-mstd0.5', mean=model.IMAGENET_MEAN)   # a v2.Compose
    images = normalize(images.to(device), model.IMAGENET_MEAN, model.IMAGENET_STD)
    images, targets = mixup_cutmix(mixup, cutmix, smoothing, num_classes)(images, labels)   # None: no mixing

1. Per image (loader workers, CPU, uint8 (3, H, W) in and out, torch's global RNG, seeded per item by
   data.Transformed): the Ascend ModelZoo recipe's train_transform and eval_transform, each a v2.Compose, so one
   line adds a transform (as torchvision's references/classification/presets.py). RandAugment: randaugment.py.
2. Per batch, on the device: normalize, mixup_cutmix (timm's prefetcher does the same on the GPU; random erasing,
   --reprob, is random_erasing.py's, beside the copy).
"""

import math

import torch
from torchvision.transforms import v2

from errors import DataError
from randaugment import RandAugment, parse_rand_augment

INTERPOLATIONS = ('bilinear', 'bicubic')  # the modes timm's configs use; names of torchvision's InterpolationMode


def _interpolation_mode(name):
    if name not in INTERPOLATIONS:
        raise DataError(f'unknown interpolation {name!r}; use one of {", ".join(INTERPOLATIONS)}')
    return v2.InterpolationMode(name)


# 1. Per image ---------------------------------------------------------------------------------------------------


def train_transform(
    size,
    *,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    hflip=0.5,
    aa=None,
    magnitude=None,
    interpolation='bicubic',
    mean=(0.5, 0.5, 0.5),
    color_jitter=0.0,
):
    """RandomResizedCrop, a horizontal flip, then RandAugment or colour jitter (timm's order).

    `aa`: a timm RandAugment spec ('rand-m9-mstd0.5') or parse_rand_augment's dict (train.py's), None for none;
    `magnitude` replaces its m (progressive learning's per stage); `mean`, the model's normalization mean, sets
    the fill of RandAugment's geometric ops (timm: round(255 * mean)). `color_jitter` c: brightness, contrast,
    saturation in [1 - c, 1 + c], only without RandAugment (timm 0.5.4's). The crop is timm's algorithm, but
    torchvision's float32 log-ratio (timm: float64) can move a box side by a pixel for the same draws."""
    mode = _interpolation_mode(interpolation)
    steps = [v2.RandomResizedCrop(size, scale, ratio, interpolation=mode, antialias=True)]
    if hflip > 0:  # no flip, no draw: the random stream stays that of the steps kept
        steps.append(v2.RandomHorizontalFlip(hflip))
    if aa:
        options = parse_rand_augment(aa) if isinstance(aa, str) else dict(aa)
        if magnitude is not None:
            options['magnitude'] = magnitude
        fill = tuple(min(255, round(255 * channel_mean)) for channel_mean in mean)
        steps.append(RandAugment(**options, fill=fill, interpolation=interpolation))
    elif color_jitter:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    return v2.Compose(steps)


def eval_transform(size, *, crop_pct=1.0, interpolation='bicubic'):
    """Resize the shorter side to floor(size / crop_pct), then centre-crop size x size (timm's eval transform)."""
    resize = v2.Resize(math.floor(size / crop_pct), _interpolation_mode(interpolation), antialias=True)
    return v2.Compose([resize, v2.CenterCrop(size)])


# 2. Per batch, on the device -----------------------------------------------------------------------------------


def normalize(images_uint8, mean, std, *, channels_last=False):
    """uint8 (N, 3, H, W) images as float32 (x / 255 - mean) / std, computed as timm's prefetcher does:
    (x - 255 mean) / (255 std), on whatever device the images are."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images_uint8.to(dtype=torch.float32, memory_format=memory_format)
    # Made on the CPU and sent without blocking: torch.tensor(..., device='cuda') waits for the GPU to
    # finish all queued work (a host sync in every training step).
    mean = torch.tensor([255 * m for m in mean]).view(1, -1, 1, 1).to(images.device, non_blocking=True)
    std = torch.tensor([255 * s for s in std]).view(1, -1, 1, 1).to(images.device, non_blocking=True)
    return images.sub_(mean).div_(std)


def mixup_cutmix(mixup, cutmix, smoothing, num_classes):
    """The one place that decides whether batches are mixed: a MixupCutmix, or None when both alphas are 0."""
    return MixupCutmix(mixup, cutmix, smoothing, num_classes) if mixup > 0 or cutmix > 0 else None


class MixupCutmix:
    """Mixes a batch of images and int labels with itself rolled by one, into mixed images and soft targets
    (torchvision's MixUp or CutMix, one picked at random when both are on); label smoothing is folded in as
    t * (1 - s) + s / K: exactly timm's Mixup target (smoothing is affine, so it commutes with mixing)."""

    def __init__(self, mixup, cutmix, smoothing, num_classes):
        pairs = ((v2.MixUp, mixup), (v2.CutMix, cutmix))
        mixers = [mixer(alpha=alpha, num_classes=num_classes) for mixer, alpha in pairs if alpha > 0]
        self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
        self.smoothing = smoothing
        self.num_classes = num_classes

    def __call__(self, images, labels):
        images, targets = self.mix(images, labels)
        return images, targets * (1 - self.smoothing) + self.smoothing / self.num_classes
