"""Pixels to tensors: datasets, the epoch batch sampler, per-image transforms and per-batch augmentation.

    train_set, val_set, classes = load_datasets('folder', '/data/imagenet')   # DATA/{train,val}/<class>/*.jpg
    train_set.transform = train_transform(288, aa='rand-m9-mstd0.5', mean=model.IMAGENET_MEAN)
    sampler = EpochBatchSampler(len(train_set), 256, shuffle=True, drop_last=True, seed=42, rank=r, world_size=n)
    loader = create_loader(train_set, sampler, workers=8)
    mix = MixupCutmix(mixup, cutmix, smoothing, num_classes) if mixup > 0 or cutmix > 0 else None
    for epoch in ...:
        sampler.set_epoch(epoch)
        for images, labels, bad_counts in loader:                          # uint8 (N,3,H,W) on the CPU
            images = random_erase(normalize(images.to(device), model.IMAGENET_MEAN, model.IMAGENET_STD), prob)
            images, targets = mix(images, labels) if mix else (images, labels)

1. Datasets: load_datasets() -> (train_set, val_set, classes). Items are (uint8 CHW image, label, bad_count).
2. Sampling: EpochBatchSampler yields batches of (index, item seed), a pure function of (seed, epoch, rank,
   world_size). Each item's augmentation runs on torch's RNG reseeded with mix_seed(seed, epoch, index), so it
   depends only on (seed, epoch, index): not on the worker count, the world size or a resume.
3. Per-image transforms (loader workers, CPU, uint8 in and out): train_transform (RandomResizedCrop, flip,
   RandAugment) and eval_transform (resize, centre crop), as in the reference recipe (timm 0.5.4). RandAugment's
   15 ops give timm's PIL results on uint8 tensors: torchvision's v2 op where it is exact and as fast, else ours.
4. Per-batch, on the device: normalize, random_erase, MixupCutmix (timm's prefetcher does the same on the GPU).

Measured per worker (one thread, 500x375 JPEGs -> 288 px, decode + crop + flip + RandAugment m9, bench.py --no-step
--compare-timm on a shared 2-core CPU): 1.6-2.0x the images/s of timm's uint8 (prefetcher) pipeline. The gain is in
decoding (torchvision), the crop (uint8 tensor resize, 2-3x faster than PIL's), the shears and translations (one
gather, 3-5x) and sharpness (~5x); the other RandAugment ops cost about what PIL's do.
"""
import io
import math
import os
import sys
import warnings

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

# torchvision 0.29 deprecates its image decoders (in favour of TorchCodec) and warns on every call. They are still
# the fastest JPEG/PNG path in this environment; read_image falls back to PIL for anything they refuse.
warnings.filterwarnings('ignore', message='The image decoding and encoding capabilities of TorchVision',
                        category=DeprecationWarning)

DATASETS = ('folder', 'cifar10', 'cifar100', 'digits', 'synthetic')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')  # compared lower-cased


class DataError(ValueError):
    """Bad user input about data. The message is one line: what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------------------------
# 1. Datasets
# ----------------------------------------------------------------------------------------------------------------

class ImageDataset(torch.utils.data.Dataset):
    """Base class. Subclasses give load(index) -> (uint8 CHW image, label, bad_count); this class adds the
    seeded transform. Keys are (index, item seed) pairs from EpochBatchSampler, or plain ints (seed 0)."""
    transform = None  # callable(uint8 CHW tensor) -> uint8 CHW tensor, or None; assign a new one to change it

    def __getitem__(self, key):
        index, item_seed = key if isinstance(key, tuple) else (key, 0)
        image, label, bad_count = self.load(index)
        if self.transform is not None:
            # fork_rng restores the caller's CPU RNG afterwards (workers=0 must not disturb the training loop).
            # default_generator.manual_seed, not torch.manual_seed: the latter also reseeds every CUDA device.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(item_seed)
                image = self.transform(image)
        return image, label, bad_count


class ImageFolder(ImageDataset):
    """Image files listed as (path, label), decoded on access. Unreadable files are replaced by the next
    readable one (bad_count 1, one warning per file) or, when strict, raise DataError."""

    def __init__(self, samples, strict=False):
        self.samples = samples
        self.strict = strict
        # Shared between loader workers, so each bad file is reported once per run, not once per worker/epoch.
        self.known_unreadable = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        for offset in range(len(self.samples)):
            substitute = (index + offset) % len(self.samples)
            if self.known_unreadable[substitute]:
                continue
            path, label = self.samples[substitute]
            try:
                return read_image(path), label, int(offset > 0)
            except UnreadableImage as error:
                if self.strict:
                    raise DataError(f'unreadable image {path}: {error}; '
                                    'replace or delete it (or allow skipping bad files)') from None
                self.known_unreadable[substitute] = True
                print(f'warning: skipping unreadable image {path}: {error}', file=sys.stderr, flush=True)
        raise DataError(f'none of the {len(self.samples)} images (e.g. {self.samples[0][0]}) is readable; '
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


class InMemoryImages(ImageDataset):
    """A uint8 (N, 3, H, W) tensor and its labels (CIFAR, digits)."""

    def __init__(self, images, labels):
        self.images = images
        self.labels = [int(label) for label in labels]

    def __len__(self):
        return len(self.labels)

    def load(self, index):
        return self.images[index], self.labels[index], 0


class SyntheticImages(ImageDataset):
    """Random uint8 images made in memory, for throughput runs: a pool of 64, indexed modulo.

    Augmentation is skipped: the images are made at the final size, so a benchmark measures the training step,
    not the input pipeline. The size is honoured though: a transform with a `size` attribute (train_transform,
    eval_transform) gets images of that size, so progressive learning's size schedule still applies."""
    pool_size = 64

    def __init__(self, length, image_size, num_classes):
        self.length, self.image_size, self.num_classes = length, image_size, num_classes
        self.pools = {image_size: self.make_pool(image_size)}  # made now, so forked workers share it

    def make_pool(self, size):
        generator = torch.Generator().manual_seed(size)
        return torch.randint(0, 256, (self.pool_size, 3, size, size), dtype=torch.uint8, generator=generator)

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        size = getattr(self.transform, 'size', self.image_size)
        if size not in self.pools:
            self.pools[size] = self.make_pool(size)
        return self.pools[size][index % self.pool_size], index % self.num_classes, 0


def load_datasets(dataset, data_path=None, *, strict_data=False, synthetic_size=224, num_classes=None):
    """-> (train_set, val_set, classes). See DATASETS; `num_classes` applies to 'synthetic' only (default 1000).

    'folder': DATA/train/<class>/**/*.jpg|jpeg|png and DATA/val/<class>/... (torchvision's ImageFolder layout).
    'cifar10', 'cifar100': torchvision's python-format files under DATA (nothing is downloaded).
    'digits': scikit-learn's 1797 8x8 digits as RGB, a fixed stratified 80/20 split; no files needed.
    'synthetic': random images (SyntheticImages), ImageNet's 1281167 train (so a throughput run of
        --perf-steps at any batch size and world size stays inside one epoch) and 1280 val.
    """
    if dataset == 'folder':
        return _load_folder(_existing_path(dataset, data_path), strict_data)
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


_DATA_PATH_HINTS = {'folder': 'the folder holding train/<class>/ and val/<class>/',
                    'cifar10': "the folder holding torchvision's cifar-10-batches-py/",
                    'cifar100': "the folder holding torchvision's cifar-100-python/"}


def _existing_path(dataset, data_path):
    if not data_path:
        raise DataError(f'dataset {dataset!r} needs a data path: {_DATA_PATH_HINTS[dataset]}')
    if not os.path.isdir(data_path):
        raise DataError(f'data path {data_path} does not exist or is not a folder; give '
                        f'{_DATA_PATH_HINTS[dataset]}')
    return data_path


def _load_folder(root, strict):
    split_classes, split_samples = {}, {}
    for split in ('train', 'val'):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise DataError(f'no {split}/ folder in {root}; expected {root}/train/<class>/*.jpg and '
                            f'{root}/val/<class>/*.jpg')
        split_classes[split], split_samples[split] = _scan_class_folders(folder)
    train_classes, val_classes = split_classes['train'], split_classes['val']
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f'train/ and val/ in {root} hold different classes (only in train: {only_train or "-"}; '
                        f'only in val: {only_val or "-"}); give both the same class folders')
    return (ImageFolder(split_samples['train'], strict), ImageFolder(split_samples['val'], strict),
            train_classes)


def _scan_class_folders(folder):
    """-> (sorted class names, [(path, label)]) for folder/<class>/**/<image>; hidden entries are ignored."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith('.'))
    if not classes:
        raise DataError(f'{folder} has no class folders; expected {folder}/<class>/*.jpg')
    samples = []
    for label, name in enumerate(classes):
        paths = sorted(_image_files(os.path.join(folder, name)))
        if not paths:
            raise DataError(f'class folder {os.path.join(folder, name)} has no images '
                            f'({", ".join(IMAGE_EXTENSIONS)}); add images or remove the folder')
        samples += [(path, label) for path in paths]
    return classes, samples


def _image_files(folder):
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories[:] = [name for name in subdirectories if not name.startswith('.')]
        for name in files:
            if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.join(directory, name)


def _load_cifar(dataset, root):
    from torchvision.datasets import CIFAR10, CIFAR100
    cifar = CIFAR10 if dataset == 'cifar10' else CIFAR100
    try:
        splits = [cifar(root, train=train, download=False) for train in (True, False)]
    except RuntimeError:  # torchvision: 'Dataset not found or corrupted'
        raise DataError(f'no {dataset} files under {root} (expected {os.path.join(root, cifar.base_folder)}); '
                        f'fetch them once with torchvision.datasets.{cifar.__name__}({root!r}, download=True)'
                        ) from None
    sets = [InMemoryImages(torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous(), split.targets)
            for split in splits]
    return sets[0], sets[1], list(splits[0].classes)


def _load_digits():
    from sklearn.datasets import load_digits  # imported here: only this demo dataset needs scikit-learn
    digits = load_digits()
    grey = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
    images = torch.from_numpy(grey)[:, None].expand(-1, 3, -1, -1).contiguous()
    train_indices, val_indices = stratified_split(digits.target, val_fraction=0.2, seed=0)
    return (InMemoryImages(images[train_indices], digits.target[train_indices]),
            InMemoryImages(images[val_indices], digits.target[val_indices]), [str(d) for d in range(10)])


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


def create_loader(dataset, batch_sampler, *, workers, pin_memory=False, persistent=False):
    """A DataLoader over the sampler's batches; items collate to (uint8 images, int64 labels, int64 bad_counts).

    It owns a torch.Generator, so starting an epoch's iterator does not draw from the global RNG (bitwise
    resume). Workers copy dataset.transform when they start: after changing the transform, persistent workers
    keep the old one, so make a new loader then (progressive learning does that once per stage)."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0, prefetch_factor=2 if workers > 0 else None,
        generator=torch.Generator())


# ----------------------------------------------------------------------------------------------------------------
# 3. Per-image transforms: uint8 (3, H, W) tensor in and out, randomness from torch's global RNG only
# ----------------------------------------------------------------------------------------------------------------

_INTERPOLATIONS = {'bicubic': TF.InterpolationMode.BICUBIC, 'bilinear': TF.InterpolationMode.BILINEAR,
                   'nearest': TF.InterpolationMode.NEAREST}


def _check_interpolation(name):
    if name not in _INTERPOLATIONS:
        raise DataError(f'unknown interpolation {name!r}; use one of {", ".join(_INTERPOLATIONS)}')
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
                                interpolation=_INTERPOLATIONS[self.interpolation], antialias=True)
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
        image = TF.resize(image, [self.resize_to], interpolation=_INTERPOLATIONS[self.interpolation],
                          antialias=True)
        return TF.center_crop(image, [self.size, self.size])

    def __repr__(self):
        return f'EvalTransform(size={self.size}, crop_pct={self.crop_pct}, interpolation={self.interpolation})'


def eval_transform(size, *, crop_pct=1.0, interpolation='bicubic'):
    return EvalTransform(size, crop_pct, _check_interpolation(interpolation))


# RandAugment ---------------------------------------------------------------------------------------------------
# timm's policy (timm/data/auto_augment.py) and PIL ops, on uint8 CHW tensors with PIL's arithmetic (truncation,
# clamping, pixel centres).

RAND_AUGMENT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
                    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
                    'TranslateYRel')
RAND_AUGMENT_INCREASING_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
                               'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
                               'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
                               'TranslateXRel', 'TranslateYRel')
_GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def _enhance_factor(level, sign):  # 0.1 .. 1.9 as the level grows; 1.0 leaves the image alone
    return (level / 10 * 1.8 + 0.1,)


def _enhance_increasing_factor(level, sign):  # 1.0 -/+ up to 0.9: stronger either way as the level grows
    return (max(0.1, 1.0 + sign * level / 10 * 0.9),)


# timm's level -> op arguments, level on its 0..10 scale; `sign` is a fresh random +-1 per op application.
LEVEL_TO_ARGS = {
    'AutoContrast': lambda level, sign: (),
    'Equalize': lambda level, sign: (),
    'Invert': lambda level, sign: (),
    'Rotate': lambda level, sign: (sign * level / 10 * 30,),                            # degrees
    'Posterize': lambda level, sign: (int(level / 10 * 4),),                            # bits kept, 0..4
    'PosterizeIncreasing': lambda level, sign: (4 - int(level / 10 * 4),),
    'Solarize': lambda level, sign: (min(256, int(level / 10 * 256)),),                 # threshold
    'SolarizeIncreasing': lambda level, sign: (256 - min(256, int(level / 10 * 256)),),
    'SolarizeAdd': lambda level, sign: (min(128, int(level / 10 * 110)),),              # added below 128
    'Color': _enhance_factor, 'ColorIncreasing': _enhance_increasing_factor,
    'Contrast': _enhance_factor, 'ContrastIncreasing': _enhance_increasing_factor,
    'Brightness': _enhance_factor, 'BrightnessIncreasing': _enhance_increasing_factor,
    'Sharpness': _enhance_factor, 'SharpnessIncreasing': _enhance_increasing_factor,
    'ShearX': lambda level, sign: (sign * level / 10 * 0.3,),                           # shear factor
    'ShearY': lambda level, sign: (sign * level / 10 * 0.3,),
    'TranslateXRel': lambda level, sign: (sign * level / 10 * 0.45,),                   # fraction of the size
    'TranslateYRel': lambda level, sign: (sign * level / 10 * 0.45,),
}


class RandAugment:
    """timm's RandAugment on uint8 CHW tensors: num_ops ops drawn with replacement, each applied with
    probability `prob` at a level ~ N(magnitude, magnitude_std) clipped to [0, magnitude_max] (uniform on
    [0, magnitude] when magnitude_std is infinite). `magnitude` may be changed between epochs."""

    def __init__(self, magnitude=10, num_ops=2, magnitude_std=0.0, magnitude_max=10, prob=0.5, increasing=False,
                 fill=(128, 128, 128), interpolation='bicubic'):
        self.magnitude, self.num_ops, self.magnitude_std, self.magnitude_max = (magnitude, num_ops, magnitude_std,
                                                                                magnitude_max)
        self.prob, self.fill, self.interpolation = prob, tuple(fill), _check_interpolation(interpolation)
        self.op_names = RAND_AUGMENT_INCREASING_OPS if increasing else RAND_AUGMENT_OPS

    def sample_level(self):
        if self.magnitude_std == float('inf'):
            level = _uniform(0, self.magnitude)
        else:
            level = self.magnitude + self.magnitude_std * float(torch.randn(()))
        return max(0.0, min(level, self.magnitude_max))

    def __call__(self, image):
        for _ in range(self.num_ops):
            name = self.op_names[int(torch.randint(len(self.op_names), ()))]
            if float(torch.rand(())) > self.prob:
                continue
            sign = -1 if float(torch.rand(())) < 0.5 else 1
            image = self.apply(name, image, self.sample_level(), sign)
        return image

    def apply(self, name, image, level, sign):
        """One op at a given level and sign (no randomness): what the tests compare with timm."""
        args = LEVEL_TO_ARGS[name](level, sign)
        if name in _GEOMETRIC_OPS:
            return OPS[name](image, *args, fill=self.fill, interpolation=self.interpolation)
        return OPS[name.replace('Increasing', '')](image, *args)

    def __repr__(self):
        return (f'RandAugment(magnitude={self.magnitude}, num_ops={self.num_ops}, magnitude_std='
                f'{self.magnitude_std}, magnitude_max={self.magnitude_max}, prob={self.prob}, '
                f'increasing={self.op_names is RAND_AUGMENT_INCREASING_OPS})')


def parse_rand_augment(spec):
    """timm's RandAugment spec -> RandAugment keyword arguments. 'rand' then dash-separated sections:
    m<magnitude> n<num_ops> mstd<std> (over 100: uniform) mmax<max level> p<prob> inc<0|1>; e.g. 'rand-m9-mstd0.5'.
    Defaults are timm's: magnitude 10, 2 ops, std 0, max 10, prob 0.5, not increasing."""
    example = "e.g. 'rand-m9-mstd0.5' (sections m, n, mstd, mmax, p, inc)"
    sections = str(spec).split('-')
    if sections[0] != 'rand':
        raise DataError(f'RandAugment spec {spec!r} must start with "rand"; {example}')
    options = dict(magnitude=10, num_ops=2, magnitude_std=0.0, magnitude_max=10, prob=0.5, increasing=False)
    # Longest keys first, so 'mstd0.5' is not read as 'm' with value 'std0.5'.
    parsers = {'mstd': ('magnitude_std', float), 'mmax': ('magnitude_max', float), 'inc': ('increasing', int),
               'm': ('magnitude', float), 'n': ('num_ops', int), 'p': ('prob', float)}
    for section in sections[1:]:
        key = next((key for key in parsers if section.startswith(key)), None)
        if key is None:
            raise DataError(f'unknown section {section!r} in RandAugment spec {spec!r}; {example}')
        name, parse = parsers[key]
        try:
            value = parse(section[len(key):])
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < 0 or (key == 'inc' and value > 1):
            raise DataError(f'bad number in section {section!r} of RandAugment spec {spec!r}; {example}')
        options[name] = value
    options['increasing'] = bool(options['increasing'])
    if options['magnitude_std'] > 100:  # timm's convention for "uniform in [0, magnitude]"
        options['magnitude_std'] = float('inf')
    return options


# The ops: uint8 CHW in and out, timm's PIL results (tests: colour ops bit-exact, geometric ops within 1). OPS uses
# torchvision's v2 op where it is bit-exact and no slower (Invert, Posterize, Brightness), else a kernel below;
# each kept kernel says why, with times per call on a 288 px photo, one thread. Per-value maps are 256-entry numpy
# lookup tables (np.take is several times faster than torch indexing, which needs int64); elementwise work is in
# place, since fresh 1 MB buffers cost more in page faults than the arithmetic.

def _apply_lut(image, lut):
    """out = lut[image]; lut is a (256,) uint8 array, or (3, 256) for one table per channel."""
    pixels = image.numpy()
    if lut.ndim == 1:
        return torch.from_numpy(np.take(lut, pixels, mode='clip'))  # 'clip': no bounds check (uint8 < 256)
    return torch.from_numpy(np.stack([np.take(channel_lut, channel, mode='clip')
                                      for channel_lut, channel in zip(lut, pixels)]))


_IDENTITY_LUT = np.arange(256, dtype=np.uint8)


# kept: TF.autocontrast scales in float32, PIL's table in float64: off by 1 on up to 22% of values
def auto_contrast(image):
    """PIL's ImageOps.autocontrast: stretch each channel so its min -> 0 and max -> 255."""
    luts = []
    for low, high in zip(image.amin(dim=(1, 2)).tolist(), image.amax(dim=(1, 2)).tolist()):
        if high <= low:
            luts.append(_IDENTITY_LUT)
        else:
            scale = 255.0 / (high - low)
            luts.append(np.clip(np.trunc(np.arange(256) * scale - low * scale), 0, 255).astype(np.uint8))
    return _apply_lut(image, np.stack(luts))


# kept: 1.3x faster than TF.equalize (0.56 vs 0.74 ms), which is PIL-exact too
def equalize(image):
    """PIL's ImageOps.equalize: per channel, map values through the histogram's cumulative distribution."""
    luts = []
    for channel in image.numpy():
        histogram = np.bincount(channel.ravel(), minlength=256)
        present = histogram[histogram > 0]
        step = (present.sum() - present[-1]) // 255 if len(present) > 1 else 0
        if step == 0:
            luts.append(_IDENTITY_LUT)
        else:
            darker = np.cumsum(histogram) - histogram  # pixels darker than each value
            luts.append(np.minimum((step // 2 + darker) // step, 255).astype(np.uint8))
    return _apply_lut(image, np.stack(luts))


# kept: 1.6-1.9x faster than TF.solarize (0.20 vs 0.38 ms), which also refuses timm's threshold 256 (a no-op)
def solarize(image, threshold):
    return _apply_lut(image, np.where(_IDENTITY_LUT < threshold, _IDENTITY_LUT, 255 - _IDENTITY_LUT))


# kept: v2 has no SolarizeAdd
def solarize_add(image, add, threshold=128):
    values = np.arange(256)
    return _apply_lut(image, np.where(values < threshold, np.minimum(values + add, 255), values).astype(np.uint8))


def _grey(image):
    """PIL's RGB -> L conversion (ITU-R 601 weights in 16-bit fixed point), as an int32 (H, W) tensor."""
    red, green, blue = image.numpy().astype(np.int32)
    return torch.from_numpy((red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16)


# kept: TF.adjust_contrast blends towards the unrounded mean of a float grey: off by 1 on up to 89% of values
def contrast(image, factor):
    """PIL's Image.blend(mean grey, image, factor): float32 math, truncated, clipped, as a lookup table."""
    grey = _grey(image)
    mean = np.float32(int(float(grey.sum()) / grey.numel() + 0.5))  # PIL: int(ImageStat.Stat(L).mean + 0.5)
    blended = mean + np.float32(factor) * (np.arange(256, dtype=np.float32) - mean)
    return _apply_lut(image, np.clip(blended, 0, 255).astype(np.uint8))


# kept: TF.adjust_saturation's float grey differs from PIL's fixed-point L: off by 1 on up to 47% of values
def color(image, factor):
    """PIL's Image.blend(grey, image, factor), in place on a float32 copy."""
    grey, pixels = _grey(image).float(), image.float()
    return pixels.sub_(grey).mul_(factor).add_(grey).clamp_(0, 255).to(torch.uint8)


# kept: TF.adjust_sharpness is off by 1 on 0.3% of values and 3-12x slower (its conv2d: 1.9-5.9 vs 0.5-0.7 ms)
def sharpness(image, factor):
    """Blend with PIL's SMOOTH filter (3x3 ones with centre 5, / 13, rounded; the 1-pixel border unfiltered,
    where the blend is then the identity)."""
    pixels = image.float()
    vertical_sums = pixels[:, :-2] + pixels[:, 1:-1]
    vertical_sums += pixels[:, 2:]
    box = vertical_sums[:, :, :-2] + vertical_sums[:, :, 1:-1]
    box += vertical_sums[:, :, 2:]
    centre = pixels[:, 1:-1, 1:-1]  # a view: blending it in place blends `pixels`
    smooth = box.add_(centre, alpha=4).div_(13).add_(0.5).floor_()
    centre.sub_(smooth).mul_(factor).add_(smooth)
    return pixels.clamp_(0, 255).to(torch.uint8)


# Geometric ops: PIL's Image.transform(AFFINE) semantics. Output pixel (x, y) samples the input at the affine
# image of its centre (x + 0.5, y + 0.5), in coordinates where pixel i spans [i, i + 1); a source outside the
# image gives `fill`; interpolation neighbours outside it are clamped to the edge; PIL truncates the result.

def _cubic_weights(frac):
    """PIL's bicubic (a = -1, sharper than torch's a = -0.75) for neighbours at -1, 0, 1, 2 of offset frac."""
    return torch.stack([-frac + 2 * frac ** 2 - frac ** 3, 1 - 2 * frac ** 2 + frac ** 3,
                        frac + frac ** 2 - frac ** 3, -frac ** 2 + frac ** 3], dim=1)


# kept: TF.affine on tensors has no bicubic; its bilinear is up to 137 off at the edges and 2x slower (1.8 vs 0.9 ms)
def _shift_rows(image, shifts, fill, interpolation):
    """Output row y samples input row y at x + shifts[y]: PIL's affine transform for shear-x and translate-x.
    The shift is constant along a row, so each row needs one integer offset and one set of tap weights
    (a gather and 4 multiply-adds: 3-5x faster than PIL's generic 2-D bicubic resampler)."""
    channels, height, width = image.shape
    source = torch.arange(width) + 0.5 + shifts[:, None]  # each output pixel's source, PIL's coordinates
    outside = (source < 0) | (source >= width)
    if interpolation == 'nearest':
        index = source.floor_().long().clamp_(0, width - 1)
        shifted = image.gather(2, index.expand(channels, -1, -1))
    else:
        frac = (shifts - shifts.floor()).float()
        if interpolation == 'bilinear':
            first_tap, weights = 0, torch.stack([1 - frac, frac], dim=1)
        else:
            first_tap, weights = -1, _cubic_weights(frac)
        taps = weights.shape[1]
        columns = torch.arange(width + taps - 1) + shifts.floor().long()[:, None] + first_tap
        window = image.gather(2, columns.clamp_(0, width - 1).expand(channels, -1, -1)).float()
        shifted = weights[:, 0, None] * window[:, :, :width]
        for tap in range(1, taps):
            shifted.addcmul_(weights[:, tap, None], window[:, :, tap:tap + width])
        shifted = shifted.clamp_(0, 255).to(torch.uint8)
    for channel, value in zip(shifted, fill):  # per channel: ~4x cheaper than a broadcast torch.where
        channel.masked_fill_(outside, value)
    return shifted


def shear_x(image, factor, fill, interpolation):  # PIL: transform(AFFINE, (1, factor, 0, 0, 1, 0))
    row_centres = torch.arange(image.shape[1], dtype=torch.float64) + 0.5
    return _shift_rows(image, factor * row_centres, fill, interpolation)


def shear_y(image, factor, fill, interpolation):  # PIL: transform(AFFINE, (1, 0, 0, factor, 1, 0))
    return shear_x(image.transpose(1, 2), factor, fill, interpolation).transpose(1, 2)


def translate_x_rel(image, fraction, fill, interpolation):  # PIL: (1, 0, fraction * width, 0, 1, 0)
    shifts = torch.full((image.shape[1],), fraction * image.shape[2], dtype=torch.float64)
    return _shift_rows(image, shifts, fill, interpolation)


def translate_y_rel(image, fraction, fill, interpolation):
    return translate_x_rel(image.transpose(1, 2), fraction, fill, interpolation).transpose(1, 2)


_PIL_RESAMPLING = {'nearest': Image.NEAREST, 'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}


# kept: TF.rotate on tensors has no bicubic; its bilinear (as fast: 1.8 ms) is up to 138 off at the edges
def rotate(image, degrees, fill, interpolation):
    """PIL's Image.rotate: counter-clockwise about the centre, same size, by PIL itself. Merging and splitting
    channel planes is ~3x cheaper than transposing CHW <-> HWC."""
    rgb = Image.merge('RGB', [Image.fromarray(channel) for channel in image.numpy()])
    rotated = rgb.rotate(degrees, resample=_PIL_RESAMPLING[interpolation], fillcolor=fill)
    return torch.from_numpy(np.stack([np.asarray(band) for band in rotated.split()]))


OPS = {'AutoContrast': auto_contrast, 'Equalize': equalize, 'Invert': TF.invert, 'Posterize': TF.posterize,
       'Solarize': solarize, 'SolarizeAdd': solarize_add, 'Color': color, 'Contrast': contrast,
       'Brightness': TF.adjust_brightness, 'Sharpness': sharpness, 'Rotate': rotate, 'ShearX': shear_x,
       'ShearY': shear_y, 'TranslateXRel': translate_x_rel, 'TranslateYRel': translate_y_rel}


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
