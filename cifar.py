"""--dataset cifar10 and cifar100, beside the copy: torchvision's CIFAR files under DATA, nothing downloaded.
data.load_datasets imports this only for them.
"""

import os

from data import DataError, require_folder


def load(dataset, root, splits, strict_data, **options):
    """data.load_datasets' call: torchvision's CIFAR-10 or CIFAR-100 sets of (PIL image, label), train and test (the
    splits are CIFAR's own), and the class names."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cifar = CIFAR10 if dataset == 'cifar10' else CIFAR100
    folder = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}[dataset]
    require_folder(dataset, root, f"the folder holding torchvision's {folder}/")
    try:
        train_set, val_set = [cifar(root, train=train, download=False) for train in (True, False)]
    except RuntimeError:  # torchvision: 'Dataset not found or corrupted'
        raise DataError(
            f'no {dataset} files under {root} (expected {os.path.join(root, cifar.base_folder)}); fetch '
            f'them once with torchvision.datasets.{cifar.__name__}({root!r}, download=True)'
        ) from None
    return train_set, val_set, list(train_set.classes)
