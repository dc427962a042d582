"""--reprob, timm's random erasing, beside the copy: on the device, after normalization, as timm's prefetcher does it.
train.py imports this only when --reprob is above 0.
"""

import math

import torch


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
