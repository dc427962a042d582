"""--dataset hf: a Hugging Face dataset (the datasets package) as train.py's data. This file sits beside the copy
(train.py, data.py, ...) and data.load_datasets imports it only for --dataset hf: a copy without it trains on
every other dataset.

    pip install datasets
    python train.py --dataset hf /data/imagenet-1k               # the hub's parquet files: data/train-*.parquet ...
    python train.py --dataset hf /data/cifar100 --target-key coarse_label    # saved with DatasetDict.save_to_disk

A dataset saved with DatasetDict.save_to_disk, or the hub's layout of parquet files (data/train-*.parquet,
data/test-*.parquet, converted once to Arrow files in the datasets cache), with a train and a held-out split
(data.choose_splits; --train-split, --val-split), an image column and a class-label column (the first
datasets.Image and datasets.ClassLabel ones; --input-key, --target-key). Rows are read from memory-mapped Arrow
files, so loader workers share them; images decode on access, in data.Transformed.
"""

import os

import torch

from data import DataError, choose_splits, require_folder


def load(dataset, root, splits, strict_data, keys=(None, None), **options):
    """data.load_datasets' call: load_hugging_face's splits as datasets of (image, label) (Rows)."""
    hint = "a dataset saved with datasets' save_to_disk, or a folder of the hub's parquet files"
    require_folder(dataset, root, hint)
    train_set, val_set, classes = load_hugging_face(root, splits, keys)
    return Rows(train_set), Rows(val_set), classes


class Rows(torch.utils.data.Dataset):
    """A Hugging Face split with columns image and label as a dataset of (image, label), for data.Transformed: a
    split of your own too (rename its columns first, e.g. split.rename_columns({'img': 'image'}))."""

    def __init__(self, split):
        self.split = split
        self.source = getattr(split, 'source', 'a Hugging Face split')

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        row = self.split[index]
        if 'image' not in row or 'label' not in row:
            raise DataError(
                f"a Hugging Face row needs 'image' and 'label' columns, this one has {', '.join(row)}: rename "
                f"them, e.g. split.rename_columns({{'img': 'image'}})"
            )
        return row['image'], row['label']


def load_hugging_face(root, splits, keys):
    """The training set, the validation set and the class names: the splits `splits` (train, val; None: the
    defaults) of the dataset at `root`, with the columns `keys` (image, label; None: the first Image and
    ClassLabel ones) renamed image and label."""
    try:
        import datasets
    except ImportError:
        raise DataError('--dataset hf needs the datasets package: pip install datasets') from None
    datasets.disable_progress_bars()  # logs are plain lines
    try:
        is_saved = os.path.exists(os.path.join(root, 'dataset_dict.json'))
        loaded = datasets.load_from_disk(root) if is_saved else datasets.load_dataset(root)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise DataError(f'cannot read {root} as a Hugging Face dataset: {str(error).splitlines()[0]}') from None
    names = choose_splits(list(loaded), splits, root)
    features = loaded[names[0]].features
    columns = [
        [name for name, kind in features.items() if isinstance(kind, type_)]
        for type_ in (datasets.Image, datasets.ClassLabel)
    ]
    chosen = [key or (found[0] if found else None) for key, found in zip(keys, columns)]
    for flag, kind, key in zip(('--input-key', '--target-key'), ('Image', 'ClassLabel'), chosen):
        if key not in features:
            described = ', '.join(f'{name} ({type(kind).__name__})' for name, kind in features.items())
            raise DataError(
                f'{root} has no {f"column {key}" if key else f"datasets.{kind} column"}; its columns '
                f'are {described}: name the one to use with {flag}'
            )
    image_column, label_column = chosen
    renames = {old: new for old, new in ((image_column, 'image'), (label_column, 'label')) if old != new}
    train_set, val_set = (loaded[name].select_columns(chosen).rename_columns(renames) for name in names)
    others = [name for name in columns[1] if name != label_column]
    other_labels = f' (other class labels: {", ".join(others)}; --target-key picks one)' if others else ''
    train_set.source = f'splits {", ".join(names)}, columns {", ".join(chosen)}{other_labels}'
    val_set.source = train_set.source
    labels = features[label_column]  # a ClassLabel has names; plain integers count up from 0
    classes = labels.names if hasattr(labels, 'names') else [str(i) for i in range(max(train_set['label']) + 1)]
    return train_set, val_set, list(classes)
