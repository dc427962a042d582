"""The datasets that need no files, beside the copy: the digits demo (`python train.py` without data: scikit-learn's
handwritten digits, shipped inside the package) and random images (--dataset synthetic, for throughput runs and the
ModelZoo scripts without --data_path). data.load_datasets imports this only for them.
"""

import numpy as np
import torch
from torchvision.transforms import v2

from errors import DataError


def load(dataset, data_path, splits, strict_data, synthetic_size=224, num_classes=None, **options):
    """data.load_datasets' call: the digits, or random images of `synthetic_size` in `num_classes` (1000)."""
    return load_digits() if dataset == 'digits' else load_synthetic(synthetic_size, num_classes or 1000)


def load_synthetic(image_size, num_classes):
    """Random images, as many as ImageNet's 1281167 for training (a --perf-steps run stays in one epoch) and 1280
    for validation, and the class names."""
    sets = [SyntheticImages(length, image_size, num_classes) for length in (1281167, 1280)]
    return *sets, [f'class_{i}' for i in range(num_classes)]


class SyntheticImages(torch.utils.data.Dataset):
    """Random uint8 images made in memory, for throughput runs: a pool of 64 at `image_size`, indexed modulo; not
    augmented: data.transformed makes them again at the crop size instead."""

    pool_size = 64

    def __init__(self, length, image_size, num_classes):
        self.length = length
        self.image_size = image_size
        self.num_classes = num_classes
        self.pool = torch.randint(
            0,
            256,
            (self.pool_size, 3, image_size, image_size),
            dtype=torch.uint8,
            generator=torch.Generator().manual_seed(image_size),
        )

    def transformed(self, transform):
        """The same random images made again at the transform's last crop size, not augmented."""
        crops = [step for step in transform.transforms if isinstance(step, (v2.RandomResizedCrop, v2.CenterCrop))]
        return SyntheticImages(self.length, crops[-1].size[0], self.num_classes)

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return self.pool[index % self.pool_size], index % self.num_classes, 0


def load_digits():
    """scikit-learn's 1797 8x8 digits as uint8 RGB images, split 80/20 by class as scikit-learn's train_test_split
    does (1437 / 360), each part in the files' order; and the class names."""
    try:
        import sklearn.datasets  # imported here: only the demo needs scikit-learn
        import sklearn.model_selection
    except ImportError:
        raise DataError(
            'the digits demo needs scikit-learn: pip install scikit-learn (or pip install -r requirements.txt)'
        ) from None
    digits = sklearn.datasets.load_digits()
    grey = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
    images = torch.from_numpy(grey)[:, None].expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target)
    train_indices, val_indices = (
        torch.from_numpy(np.sort(indices))
        for indices in sklearn.model_selection.train_test_split(
            np.arange(len(labels)), test_size=0.2, stratify=digits.target, random_state=0
        )
    )  # each in the files' order
    return (
        torch.utils.data.TensorDataset(images[train_indices], labels[train_indices]),
        torch.utils.data.TensorDataset(images[val_indices], labels[val_indices]),
        [str(d) for d in range(10)],
    )
