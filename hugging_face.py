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

from data import DataError, choose_splits


def load_hugging_face(root, splits, keys):
    """-> (train_set, val_set, class names): the splits `splits` (train, val; None: the defaults) of the dataset at
    `root`, by the columns `keys` (image, label; None: the first Image, ClassLabel ones) renamed image and label."""
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
    train_set.source = val_set.source = f'splits {", ".join(names)}, columns {", ".join(chosen)}' + (
        f' (other class labels: {", ".join(others)}; --target-key picks one)' if others else ''
    )
    labels = features[label_column]  # a ClassLabel has names; plain integers count up from 0
    classes = labels.names if hasattr(labels, 'names') else [str(i) for i in range(max(train_set['label']) + 1)]
    return train_set, val_set, list(classes)
