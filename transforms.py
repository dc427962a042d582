"""Transforms: what the loader workers do to each image and what the device does to each batch.

    transform = train_transform(288, aa='rand-m9-mstd0.5', mean=model.IMAGENET_MEAN)   # a v2.Compose
    images = random_erase(normalize(images.to(device), model.IMAGENET_MEAN, model.IMAGENET_STD), prob)
    images, targets = MixupCutmix(mixup, cutmix, smoothing, num_classes)(images, labels)

1. Per image (loader workers, CPU, uint8 (3, H, W) in and out, torch's global RNG, seeded per item by
   data.Transformed): the Ascend ModelZoo recipe's train_transform and eval_transform, each a v2.Compose, so one
   line adds a transform (as torchvision's references/classification/presets.py). RandAugment: randaugment.py.
2. Per batch, on the device: normalize, random_erase, MixupCutmix (timm's prefetcher does the same on the GPU).
"""

import math

import torch

from errors import DataError, check_torchvision

check_torchvision()  # before torchvision's imports: a torch/torchvision mismatch is said in one line
from torchvision.transforms import v2  # noqa: E402

from randaugment import RandAugment, parse_rand_augment  # noqa: E402

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
    """RandomResizedCrop -> horizontal flip -> RandAugment or colour jitter (timm's order).

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
    return v2.Compose(
        [
            v2.Resize(math.floor(size / crop_pct), _interpolation_mode(interpolation), antialias=True),
            v2.CenterCrop(size),
        ]
    )


# 2. Per batch, on the device -----------------------------------------------------------------------------------


def normalize(images_uint8, mean, std, *, channels_last=False):
    """uint8 (N, 3, H, W) -> float32 (x / 255 - mean) / std, computed as timm's prefetcher does: (x - 255 mean) /
    (255 std), on whatever device the images are."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images_uint8.to(dtype=torch.float32, memory_format=memory_format)
    # Made on the CPU and sent without blocking: torch.tensor(..., device='cuda') waits for the GPU to
    # finish all queued work (a host sync in every training step).
    mean = torch.tensor([255 * m for m in mean]).view(1, -1, 1, 1).to(images.device, non_blocking=True)
    std = torch.tensor([255 * s for s in std]).view(1, -1, 1, 1).to(images.device, non_blocking=True)
    return images.sub_(mean).div_(std)


def _erase_box(height, width):
    """timm RandomErasing's box: area 2%..1/3 of the image, log-uniform aspect 0.3..3.3, 10 tries."""
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(10):
        target_area = float(torch.empty(()).uniform_(0.02, 1 / 3)) * height * width
        aspect = math.exp(float(torch.empty(()).uniform_(*log_aspect)))
        box_height = int(round(math.sqrt(target_area * aspect)))
        box_width = int(round(math.sqrt(target_area / aspect)))
        if box_width < width and box_height < height:
            top = int(torch.randint(0, height - box_height + 1, ()))
            left = int(torch.randint(0, width - box_width + 1, ()))
            return top, left, box_height, box_width
    return 0, 0, 0, 0


def random_erase(images, prob):
    """timm's RandomErasing(mode='pixel', max_count=1) on a normalized batch: with probability `prob` per sample,
    one rectangle is replaced by N(0, 1) noise. Returns a new tensor; boxes are drawn on the CPU, the noise and
    the masking happen on the images' device in a few batched kernels."""
    if prob <= 0:
        return images
    batch, _, height, width = images.shape
    boxes = [_erase_box(height, width) if float(torch.rand(())) <= prob else (0, 0, 0, 0) for _ in range(batch)]
    boxes = torch.tensor(boxes).to(images.device, non_blocking=True)  # no host sync (see normalize)
    top, left, box_height, box_width = boxes.view(batch, 4, 1, 1).unbind(1)
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    columns = torch.arange(width, device=images.device).view(1, 1, width)
    in_box = (rows >= top) & (rows < top + box_height) & (columns >= left) & (columns < left + box_width)
    return torch.where(in_box[:, None], torch.randn_like(images), images)


class MixupCutmix:
    """(images, int labels) -> (mixed images, soft targets): each batch mixed with itself rolled by one (torchvision's
    MixUp / CutMix, one picked at random when both are on; needs mixup > 0 or cutmix > 0), label smoothing folded
    in as t * (1 - s) + s / K: exactly timm's Mixup target (smoothing is affine, so it commutes with mixing)."""

    def __init__(self, mixup, cutmix, smoothing, num_classes):
        mixers = [
            mixer(alpha=alpha, num_classes=num_classes)
            for mixer, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix))
            if alpha > 0
        ]
        if not mixers:
            raise ValueError(
                f'MixupCutmix needs mixup > 0 or cutmix > 0, got {mixup} and {cutmix}; use None for neither'
            )
        self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
        self.smoothing, self.num_classes = smoothing, num_classes

    def __call__(self, images, labels):
        images, targets = self.mix(images, labels)
        return images, targets * (1 - self.smoothing) + self.smoothing / self.num_classes
