"""Pixels to tensors: datasets, the epoch batch sampler, per-image transforms and per-batch augmentation.

    train_set, val_set, classes = load_datasets('folder', '/data/imagenet')   # DATA/{train,val}/<class>/*.jpg
    sampler = EpochBatchSampler(len(train_set), 256, shuffle=True, drop_last=True, seed=42, rank=r, world_size=n)
    sampler.set_epoch(epoch)
    transform = train_transform(288, aa='rand-m9-mstd0.5', mean=model.IMAGENET_MEAN)
    loader = create_loader(transformed(train_set, transform), sampler, workers=8)
    mix = MixupCutmix(mixup, cutmix, smoothing, num_classes) if mixup > 0 or cutmix > 0 else None
    for images, labels, bad_counts in loader:                              # uint8 (N,3,H,W) on the CPU
        images = random_erase(normalize(images.to(device), model.IMAGENET_MEAN, model.IMAGENET_STD), prob)
        images, targets = mix(images, labels) if mix else (images, labels)

1. Datasets: any map-style dataset of (image, label), the image a PIL image or a uint8 (C, H, W) tensor:
   torchvision.datasets.*, your own, a Hugging Face split (rows {'image': ..., 'label': ...}). load_datasets()
   gives the built-in ones (an image folder, CIFAR, the digits demo, synthetic images). Transformed wraps any of
   them for the loader: (index, item seed) keys, uint8 RGB tensors, a transform seeded per item, bad-image counts.
2. Sampling: EpochBatchSampler yields batches of (index, item seed), a pure function of (seed, epoch, rank,
   world_size). Each item's transform runs on torch's RNG reseeded with mix_seed(seed, epoch, index), so it
   depends only on (seed, epoch, index): not on the worker count, the world size or a resume.
3. Per-image transforms (loader workers, CPU, uint8 in and out): train_transform (RandomResizedCrop, flip,
   RandAugment or colour jitter) and eval_transform (resize, centre crop), as in the Ascend ModelZoo recipe
   (timm 0.5.4). RandAugment, timm's policy and PIL results on uint8 tensors, lives in randaugment.py.
4. Per-batch, on the device: normalize, random_erase, MixupCutmix (timm's prefetcher does the same on the GPU).

Per worker this pipeline gives 1.5-2x the images/s of timm's (bench.py; docs/measurements.md says where from).
"""
import gc
import io
import math
import os
import sys
import warnings

import numpy as np
import torch

from errors import DataError, check_torchvision
check_torchvision()  # before torchvision's imports: a torch/torchvision mismatch is said in one line
import torchvision.transforms.v2.functional as TF  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.io import ImageReadMode, decode_image  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from randaugment import RandAugment, parse_rand_augment  # noqa: E402

# torchvision 0.29 deprecates its image decoders (in favour of TorchCodec) and warns on every call. They are still
# the fastest JPEG/PNG path in this environment; read_image falls back to PIL for anything they refuse.
warnings.filterwarnings('ignore', message='The image decoding and encoding capabilities of TorchVision',
                        category=DeprecationWarning)

DATASETS = ('folder', 'hf', 'wds', 'cifar10', 'cifar100', 'digits', 'synthetic')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')  # compared lower-cased


# ----------------------------------------------------------------------------------------------------------------
# 1. Datasets
# ----------------------------------------------------------------------------------------------------------------

class Transformed(torch.utils.data.Dataset):
    """A dataset of (image, label) as the training loop loads it. Keys are (index, item seed) pairs from
    EpochBatchSampler (a plain int: seed 0); items are (uint8 RGB (3, H, W) tensor, int label, bad_count), the
    image passed through `transform` on torch's RNG seeded with the item's seed. The dataset's images may be PIL
    images or uint8 (1 or 3, H, W) tensors; a third value in its items is the number of unreadable files
    replaced to make that item (ImageFolder), else the count is 0."""

    def __init__(self, dataset, transform=None):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, item_seed = key if isinstance(key, tuple) else (key, 0)
        item = self.dataset[index]
        if isinstance(item, dict):  # a Hugging Face datasets row
            item = _row_image_and_label(item)
        image, label, *bad_count = item
        image = as_uint8_rgb(image)
        if self.transform is not None:
            # fork_rng restores the caller's CPU RNG afterwards (workers=0 must not disturb the training loop).
            # default_generator.manual_seed, not torch.manual_seed: the latter also reseeds every CUDA device.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(item_seed)
                image = self.transform(image)
        return image, int(label), bad_count[0] if bad_count else 0


def _row_image_and_label(row):
    if 'image' not in row or 'label' not in row:
        raise DataError(f"a Hugging Face dataset row needs 'image' and 'label' columns, this one has "
                        f"{', '.join(row)}: rename them, e.g. split.rename_columns({{'img': 'image'}})")
    return row['image'], row['label']


def as_uint8_rgb(image):
    """A PIL image, a uint8 (1 or 3, H, W) tensor or a uint8 (H, W) or (H, W, 1 or 3) numpy array (OpenCV's,
    albumentations') -> uint8 (3, H, W) tensor."""
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image if image.mode == 'RGB' else image.convert('RGB'))
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and (image.ndim == 2 or (
            image.ndim == 3 and image.shape[2] in (1, 3))):
        image = torch.from_numpy(np.ascontiguousarray(image.reshape(*image.shape[:2], -1))).permute(2, 0, 1)
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] in (1, 3):
        return image.expand(3, -1, -1)
    described = f'{image.dtype} {type(image).__name__} of shape {tuple(image.shape)}' if hasattr(image, 'shape') \
        else type(image).__name__
    raise DataError(f"a dataset gave an image as a {described}; give PIL images, uint8 (3, H, W) tensors or uint8 "
                    f"(H, W, 3) arrays (torchvision's ToTensor() makes floats: use PILToTensor())")


def transformed(dataset, transform):
    """The dataset as the loop loads it: Transformed(dataset, transform), except synthetic images, which are made
    at the transform's size instead and not augmented (a throughput run measures the step, not the pipeline)."""
    if isinstance(dataset, SyntheticImages):
        return SyntheticImages(len(dataset), transform.size, dataset.num_classes)
    return Transformed(dataset, transform)


class ImageFolder(torch.utils.data.Dataset):
    """Image files under `root`, given relative to it with their labels, as (uint8 image, label, bad_count),
    decoded on access. An unreadable file is replaced by the next readable one (bad_count 1, one warning per file)
    or, when strict, raises DataError.

    The list is two numpy arrays (paths as fixed-width bytes, labels as int32), not Python objects: loader
    workers read them without touching reference counts, so their pages stay shared, not copied per worker."""

    def __init__(self, root, paths, labels, strict=False):
        self.root, self.strict = root, strict
        self.paths = np.array([os.fsencode(path) for path in paths], dtype=np.bytes_)
        self.labels = np.array(labels, dtype=np.int32)
        # Shared between loader workers, so each bad file is reported once per run, not once per worker/epoch.
        self.known_unreadable = torch.zeros(len(self.labels), dtype=torch.bool).share_memory_()

    def __len__(self):
        return len(self.labels)

    def path(self, index):
        return os.path.join(self.root, os.fsdecode(self.paths[index]))

    def __getitem__(self, index):
        for offset in range(len(self)):
            substitute = (index + offset) % len(self)
            if self.known_unreadable[substitute]:
                continue
            path = self.path(substitute)
            try:
                return read_image(path), int(self.labels[substitute]), int(offset > 0)
            except UnreadableImage as error:
                if self.strict:
                    raise DataError(f'unreadable image {path}: {error}; '
                                    'replace or delete it (or allow skipping bad files)') from None
                self.known_unreadable[substitute] = True
                print(f'warning: skipping unreadable image {path}: {error}', file=sys.stderr, flush=True)
        raise DataError(f'none of the {len(self)} images (e.g. {self.path(0)}) is readable; '
                        'check the files are JPEG or PNG images')


class UnreadableImage(Exception):
    """A file that is not a whole, decodable image (empty, truncated, not an image)."""


def read_image(path):
    """Decode an image file to a uint8 RGB (3, H, W) tensor; raise UnreadableImage if that is impossible."""
    try:
        with open(path, 'rb') as file:
            encoded = file.read()
    except OSError as error:  # gone since the folder was listed, no permission, I/O error
        raise UnreadableImage(error.strerror or type(error).__name__) from None
    return decode_image_bytes(encoded)


def decode_image_bytes(encoded):
    """Decode an image file's bytes to a uint8 RGB (3, H, W) tensor; raise UnreadableImage if that is impossible."""
    if not encoded:
        raise UnreadableImage('empty file')
    try:  # libjpeg-turbo / libpng through torchvision: the fast path, and it rejects truncated files
        return decode_image(torch.frombuffer(bytearray(encoded), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        pass
    try:  # PIL reads some files torchvision refuses (e.g. a BMP or GIF saved as .jpg)
        with Image.open(io.BytesIO(encoded)) as image:
            pixels = np.array(image.convert('RGB'))
        return torch.from_numpy(pixels).permute(2, 0, 1)
    except Image.UnidentifiedImageError:
        raise UnreadableImage('not a JPEG or PNG image') from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
        raise UnreadableImage(str(error).splitlines()[0] if str(error) else type(error).__name__) from None


class SyntheticImages(torch.utils.data.Dataset):
    """Random uint8 images made in memory, for throughput runs: a pool of 64 at `image_size`, indexed modulo.
    The loop does not augment them (see `transformed`), so a benchmark measures the training step, not the input
    pipeline; progressive learning's sizes still apply."""
    pool_size = 64

    def __init__(self, length, image_size, num_classes):
        self.length, self.image_size, self.num_classes = length, image_size, num_classes
        generator = torch.Generator().manual_seed(image_size)
        self.pool = torch.randint(0, 256, (self.pool_size, 3, image_size, image_size), dtype=torch.uint8,
                                  generator=generator)

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return self.pool[index % self.pool_size], index % self.num_classes, 0


def load_datasets(dataset, data_path=None, *, strict_data=False, synthetic_size=224, num_classes=None,
                  splits=(None, None), keys=(None, None), skip_bad_shards=False):
    """-> (train_set, val_set, classes). See DATASETS; `num_classes` applies to 'synthetic' only (default 1000).
    `splits`: the (train, val) split names of 'folder' and 'hf' (default: train, and the first of VAL_SPLITS
    found); `keys`: the (image, label) columns of 'hf' (default: its Image column and its first ClassLabel one).
    The built-in sets say in `source` which splits and columns they are (the run's start line).

    'folder': DATA/train/<class>/**/*.jpg|jpeg|png and DATA/val/<class>/... (torchvision's ImageFolder layout).
    'hf': a Hugging Face dataset under DATA (see _load_hugging_face); needs the datasets package.
    'wds': WebDataset tar shards (timm's imagenet-*-wds layout): a folder, a brace pattern or a hub id (shards.py).
    'cifar10', 'cifar100': torchvision's datasets on their python-format files under DATA (nothing is downloaded).
    'digits': scikit-learn's 1797 8x8 digits as uint8 tensors, a fixed stratified 80/20 split; no files needed.
    'synthetic': random images (SyntheticImages), ImageNet's 1281167 train (so a throughput run of
        --perf-steps at any batch size and world size stays inside one epoch) and 1280 val.
    """
    if dataset == 'folder':
        return _load_folder(_existing_path(dataset, data_path), strict_data, splits)
    if dataset == 'hf':
        return _load_hugging_face(_existing_path(dataset, data_path), splits, keys)
    if dataset == 'wds':
        import shards
        return shards.load_shards(data_path, *splits, target_key=keys[1], strict=strict_data,
                                  skip_bad_shards=skip_bad_shards)
    if dataset in ('cifar10', 'cifar100'):
        return _load_cifar(dataset, _existing_path(dataset, data_path))
    if dataset == 'digits':
        return _load_digits()
    if dataset == 'synthetic':
        num_classes = num_classes or 1000
        classes = [f'class_{i}' for i in range(num_classes)]
        return (SyntheticImages(1281167, synthetic_size, num_classes),
                SyntheticImages(1280, synthetic_size, num_classes), classes)
    raise DataError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASETS)}')


VAL_SPLITS = ('validation', 'val', 'valid', 'test')  # the held-out split by default: the first found


def choose_splits(available, splits, where, kind='split', suffix=''):
    """-> (train, val): the names in `splits` or the defaults (train; the first of VAL_SPLITS found), each checked
    against `available`; names of folders end in '/'."""
    train = (splits[0] or 'train').rstrip('/') + suffix
    defaults = [name + suffix for name in VAL_SPLITS]
    val = splits[1].rstrip('/') + suffix if splits[1] else next((name for name in defaults if name in available), None)
    held_out = f'no {val} {kind}' if val else f"no held-out {kind} ({', '.join(defaults)})"
    for problem, flag, found in ((f'no {train} {kind}', '--train-split', train in available),
                                 (held_out, '--val-split', val in available)):
        if not found:
            raise DataError(f"{where} has {problem}; its {kind}s: {', '.join(available) or 'none'}; name the one "
                            f"to use with {flag}")
    return train, val


_DATA_PATH_HINTS = {'folder': 'the folder holding train/<class>/ and val/<class>/',
                    'hf': "a dataset saved with datasets' save_to_disk, or a folder of the hub's parquet files",
                    'cifar10': "the folder holding torchvision's cifar-10-batches-py/",
                    'cifar100': "the folder holding torchvision's cifar-100-python/"}


def _existing_path(dataset, data_path):
    if not data_path:
        raise DataError(f'dataset {dataset!r} needs a data path: {_DATA_PATH_HINTS[dataset]}')
    if not os.path.isdir(data_path):
        raise DataError(f'data path {data_path} does not exist or is not a folder; give '
                        f'{_DATA_PATH_HINTS[dataset]}')
    return data_path


def _load_folder(root, strict, splits):
    subfolders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith('.'))
    names = choose_splits([f'{name}/' for name in subfolders], splits, root, kind='folder', suffix='/')
    folders = [os.path.join(root, split.rstrip('/')) for split in names]
    scanned = [_scan_class_folders(folder) for folder in folders]  # (classes, paths, labels) each
    (train_classes, *_), (val_classes, *_) = scanned
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f'{names[0]} and {names[1]} in {root} hold different classes (only in train: '
                        f'{only_train or "-"}; only in val: {only_val or "-"}); give both the same class folders')
    train_set, val_set = (ImageFolder(folder, paths, labels, strict)
                          for folder, (_, paths, labels) in zip(folders, scanned))
    train_set.source = val_set.source = f'folders {names[0]} and {names[1]}'
    return train_set, val_set, train_classes


def _scan_class_folders(folder):
    """-> (sorted class names, paths relative to folder, labels) for folder/<class>/**/<image>; hidden entries
    are ignored."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith('.'))
    if not classes:
        raise DataError(f'{folder} has no class folders; expected {folder}/<class>/*.jpg')
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = find_images(os.path.join(folder, name))
        if not found:
            raise DataError(f'class folder {os.path.join(folder, name)} has no images '
                            f'({", ".join(IMAGE_EXTENSIONS)}); add images or remove the folder')
        paths += [path[len(folder) + 1:] for path in found]
        labels += [label] * len(found)
    return classes, paths, labels


def find_images(folder):
    """Sorted paths of the images (IMAGE_EXTENSIONS) under folder, searched recursively; hidden entries skipped."""
    found = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories[:] = [name for name in subdirectories if not name.startswith('.')]
        found += [os.path.join(directory, name) for name in files
                  if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _load_hugging_face(root, splits, keys):
    """A Hugging Face dataset with a train and a held-out split (see choose_splits), an image column and a
    class-label column: saved with DatasetDict.save_to_disk, or the hub's layout of parquet files
    (data/train-*.parquet, data/test-*.parquet, converted once to Arrow files in the datasets cache). Rows are
    read from memory-mapped Arrow files, so loader workers share them; images decode on access."""
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
    columns = [[name for name, kind in features.items() if isinstance(kind, type_)]
               for type_ in (datasets.Image, datasets.ClassLabel)]
    chosen = [key or (found[0] if found else None) for key, found in zip(keys, columns)]
    for flag, kind, key in zip(('--input-key', '--target-key'), ('Image', 'ClassLabel'), chosen):
        if key not in features:
            described = ', '.join(f'{name} ({type(kind).__name__})' for name, kind in features.items())
            raise DataError(f"{root} has no {f'column {key}' if key else f'datasets.{kind} column'}; its columns "
                            f"are {described}: name the one to use with {flag}")
    image_column, label_column = chosen
    renames = {old: new for old, new in ((image_column, 'image'), (label_column, 'label')) if old != new}
    train_set, val_set = (loaded[name].select_columns(chosen).rename_columns(renames) for name in names)
    others = [name for name in columns[1] if name != label_column]
    train_set.source = val_set.source = f"splits {', '.join(names)}, columns {', '.join(chosen)}" + (
        f" (other class labels: {', '.join(others)}; --target-key picks one)" if others else '')
    labels = features[label_column]  # a ClassLabel has names; plain integers count up from 0
    classes = labels.names if hasattr(labels, 'names') else [str(i) for i in range(max(train_set['label']) + 1)]
    return train_set, val_set, list(classes)


def _load_cifar(dataset, root):
    from torchvision.datasets import CIFAR10, CIFAR100
    cifar = CIFAR10 if dataset == 'cifar10' else CIFAR100
    try:
        train_set, val_set = [cifar(root, train=train, download=False) for train in (True, False)]
    except RuntimeError:  # torchvision: 'Dataset not found or corrupted'
        raise DataError(f'no {dataset} files under {root} (expected {os.path.join(root, cifar.base_folder)}); '
                        f'fetch them once with torchvision.datasets.{cifar.__name__}({root!r}, download=True)'
                        ) from None
    return train_set, val_set, list(train_set.classes)


def _load_digits():
    try:
        from sklearn.datasets import load_digits  # imported here: only this demo dataset needs scikit-learn
    except ImportError:
        raise DataError('the digits demo needs scikit-learn: pip install scikit-learn (or pip install -r '
                        'requirements.txt)') from None
    digits = load_digits()
    grey = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
    images = torch.from_numpy(grey)[:, None].expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target)
    train_indices, val_indices = stratified_split(digits.target, val_fraction=0.2, seed=0)
    return (torch.utils.data.TensorDataset(images[train_indices], labels[train_indices]),
            torch.utils.data.TensorDataset(images[val_indices], labels[val_indices]), [str(d) for d in range(10)])


def stratified_split(labels, val_fraction, seed):
    """-> (train indices, val indices), each sorted; every class keeps round(val_fraction * count) for val."""
    random_state = np.random.RandomState(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = random_state.permutation(np.flatnonzero(labels == label))
        val_count = int(round(val_fraction * len(members)))
        val += members[:val_count].tolist()
        train += members[val_count:].tolist()
    return torch.tensor(sorted(train)), torch.tensor(sorted(val))


# ----------------------------------------------------------------------------------------------------------------
# 2. Sampling
# ----------------------------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def mix_seed(*values):
    """A 63-bit seed from integers (splitmix64 chained over them): nearby inputs give unrelated seeds."""
    state = 0
    for value in values:
        state = ((state ^ (value & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state >> 1


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, item seed) for one rank, a pure function of (seed, epoch, rank, world_size).

    shuffle=True (training): one permutation per (seed, epoch), the same on every rank, padded by repeating its
    start to a multiple of world_size (like DistributedSampler, so ranks step in lockstep); rank r takes every
    world_size-th index from r. Then the ranks' k-th batches together are exactly the k-th batch a single process
    with batch size world_size * batch_size would see, augmentations included.
    shuffle=False (evaluation): rank r takes range(r, n, world_size) with no padding, so every image counts
    exactly once; the last batches may be short and uneven across ranks.
    drop_last drops each rank's incomplete last batch.
    """

    def __init__(self, dataset_len, batch_size, *, shuffle, seed=0, rank=0, world_size=1, drop_last):
        if dataset_len < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f'need dataset_len >= 1, batch_size >= 1 and 0 <= rank < world_size, got '
                             f'{dataset_len}, {batch_size}, {rank}, {world_size}')
        self.dataset_len, self.batch_size, self.shuffle, self.drop_last = dataset_len, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch; start_batch skips the epoch's first batches without loading them (exact resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def rank_indices(self):
        if not self.shuffle:
            return list(range(self.rank, self.dataset_len, self.world_size))
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.dataset_len, generator=generator).tolist()
        padded_len = math.ceil(self.dataset_len / self.world_size) * self.world_size
        while len(order) < padded_len:
            order += order[:padded_len - len(order)]
        return order[self.rank::self.world_size]

    def __len__(self):
        """Batches in the whole epoch for this rank (start_batch is not subtracted)."""
        if self.shuffle:
            count = math.ceil(self.dataset_len / self.world_size)
        else:
            count = len(range(self.rank, self.dataset_len, self.world_size))
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self):
        indices = self.rank_indices()
        for batch in range(self.start_batch, len(self)):
            chunk = indices[batch * self.batch_size:(batch + 1) * self.batch_size]
            # An item's seed is the same whatever rank, world size or worker loads it.
            yield [(index, mix_seed(self.seed, self.epoch, index)) for index in chunk]


def create_loader(dataset, batch_sampler, *, workers, pin_memory=False):
    """A DataLoader over the sampler's batches; items collate to (uint8 images, int64 labels, int64 bad_counts).

    It owns a torch.Generator, so starting an epoch's iterator does not draw from the global RNG (bitwise
    resume). Workers copy the dataset (and its transform) when they start: train.py makes a new loader each
    epoch, so progressive learning's new sizes reach them."""
    return FrozenHeapLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin_memory,
                            prefetch_factor=2 if workers > 0 else None, generator=torch.Generator())


class FrozenHeapLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers fork from a frozen heap. A forked worker shares the main process's pages until
    it writes to them, and its garbage collector writes to every object it scans: a full collection in a worker
    copies the interpreter's whole heap (~90 MiB per worker at 1.28 M files, README). Objects frozen (gc.freeze)
    before the fork are never scanned there; the main process unfreezes its own right after."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        gc.collect()  # what is garbage now would never be collected once frozen
        gc.freeze()
        try:
            return super().__iter__()  # forks the workers
        finally:
            gc.unfreeze()


# ----------------------------------------------------------------------------------------------------------------
# 3. Per-image transforms: uint8 (3, H, W) tensor in and out, randomness from torch's global RNG only
# ----------------------------------------------------------------------------------------------------------------

INTERPOLATIONS = ('bilinear', 'bicubic')  # the modes timm's configs use; names of torchvision's InterpolationMode


def _check_interpolation(name):
    if name not in INTERPOLATIONS:
        raise DataError(f'unknown interpolation {name!r}; use one of {", ".join(INTERPOLATIONS)}')
    return name


def _uniform(low, high):
    return float(torch.empty(()).uniform_(low, high))


def random_crop_box(height, width, scale, ratio):
    """RandomResizedCrop's box (top, left, crop_height, crop_width): timm's and torchvision's algorithm."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, ()))
            left = int(torch.randint(0, width - crop_width + 1, ()))
            return top, left, crop_height, crop_width
    # Ten misses (extreme aspect ratios): the whole image, cut to the nearest allowed aspect ratio, centred.
    crop_height, crop_width = height, width
    if width / height < min(ratio):
        crop_height = int(round(width / min(ratio)))
    elif width / height > max(ratio):
        crop_width = int(round(height * max(ratio)))
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


class TrainTransform:
    """RandomResizedCrop -> horizontal flip -> RandAugment or colour jitter (timm's order). `size` and
    `rand_augment.magnitude` may be changed between epochs, or a new transform assigned to dataset.transform."""

    def __init__(self, size, scale, ratio, hflip, rand_augment, interpolation, color_jitter=None):
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip
        self.rand_augment, self.interpolation, self.color_jitter = rand_augment, interpolation, color_jitter

    def __call__(self, image):
        top, left, height, width = random_crop_box(image.shape[-2], image.shape[-1], self.scale, self.ratio)
        # Resizing the uint8 tensor (torchvision's SIMD path, antialiased like PIL) is ~2x faster than PIL.
        image = TF.resized_crop(image, top, left, height, width, [self.size, self.size],
                                interpolation=TF.InterpolationMode(self.interpolation), antialias=True)
        if self.hflip > 0 and float(torch.rand(())) < self.hflip:
            image = image.flip(-1)
        if self.rand_augment is not None:
            image = self.rand_augment(image)
        if self.color_jitter is not None:
            image = self.color_jitter(image)
        return image

    def __repr__(self):
        return (f'TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, '
                f'interpolation={self.interpolation}, rand_augment={self.rand_augment}, '
                f'color_jitter={self.color_jitter})')


def train_transform(size, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, aa=None,
                    interpolation='bicubic', mean=(0.5, 0.5, 0.5), color_jitter=0.0):
    """The training transform; `aa` is a timm RandAugment spec such as 'rand-m9-mstd0.5' (None: no RandAugment).
    `mean`, the model's normalization mean, only sets the fill colour of RandAugment's geometric ops (timm:
    round(255 * mean)); the default grey gives (128, 128, 128), timm RandAugment's fill when given no mean.
    `color_jitter`: brightness, contrast and saturation factors in [1 - c, 1 + c], only without RandAugment
    (timm 0.5.4's --color-jitter, 0.4 by default in its train.py)."""
    _check_interpolation(interpolation)
    rand_augment = jitter = None
    if aa:
        fill = tuple(min(255, round(255 * channel_mean)) for channel_mean in mean)
        rand_augment = RandAugment(**parse_rand_augment(aa), fill=fill, interpolation=interpolation)
    elif color_jitter:
        jitter = v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
    return TrainTransform(size, tuple(scale), tuple(ratio), hflip, rand_augment, interpolation, jitter)


class EvalTransform:
    """Resize the shorter side to floor(size / crop_pct), then centre-crop size x size (timm's eval transform)."""

    def __init__(self, size, crop_pct, interpolation):
        self.size, self.crop_pct, self.interpolation = size, crop_pct, interpolation
        self.resize_to = math.floor(size / crop_pct)

    def __call__(self, image):
        image = TF.resize(image, [self.resize_to], interpolation=TF.InterpolationMode(self.interpolation),
                          antialias=True)
        return TF.center_crop(image, [self.size, self.size])

    def __repr__(self):
        return f'EvalTransform(size={self.size}, crop_pct={self.crop_pct}, interpolation={self.interpolation})'


def eval_transform(size, *, crop_pct=1.0, interpolation='bicubic'):
    return EvalTransform(size, crop_pct, _check_interpolation(interpolation))


# ----------------------------------------------------------------------------------------------------------------
# 4. Per-batch, on the device
# ----------------------------------------------------------------------------------------------------------------

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
        target_area = _uniform(0.02, 1 / 3) * height * width
        aspect = math.exp(_uniform(*log_aspect))
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
    """Mix each batch with itself rolled by one (torchvision's MixUp / CutMix, one picked at random per batch
    when both are on) and fold label smoothing into the soft targets: t * (1 - s) + s / K, which is exactly
    timm's Mixup target (smoothing is affine, so smoothing then mixing = mixing then smoothing).
    Callable(images, int labels) -> (mixed images, soft targets); needs mixup > 0 or cutmix > 0."""

    def __init__(self, mixup, cutmix, smoothing, num_classes):
        mixers = [mixer(alpha=alpha, num_classes=num_classes)
                  for mixer, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if alpha > 0]
        if not mixers:
            raise ValueError(f'MixupCutmix needs mixup > 0 or cutmix > 0, got {mixup} and {cutmix}; '
                             'use None for neither')
        self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
        self.smoothing, self.num_classes = smoothing, num_classes

    def __call__(self, images, labels):
        images, targets = self.mix(images, labels)
        return images, targets * (1 - self.smoothing) + self.smoothing / self.num_classes
