"""Images to batches: datasets, the epoch batch sampler and the loader (the transforms are transforms.py).

    train_set, val_set, classes = load_datasets('folder', '/data/imagenet')   # DATA/{train,val}/<class>/*.jpg
    sampler = EpochBatchSampler(len(train_set), 256, shuffle=True, drop_last=True, seed=42, rank=r, world_size=n)
    sampler.set_epoch(epoch)
    loader = create_loader(transformed(train_set, transforms.train_transform(288)), sampler, workers=8)
    for images, labels, bad_images in loader:                              # uint8 (N,3,H,W) on the CPU

Any map-style dataset of (image, label) loads through Transformed; an item's seed depends only on (seed, epoch,
index), not on the workers, the world size or a resume.
"""

import atexit
import gc
import io
import math
import multiprocessing
import os
import signal
import sys
import warnings

import numpy as np
import torch

import distributed
from errors import DataError, check_torchvision, import_beside

check_torchvision()  # before torchvision's first import (train.py imports this file first): one line if it fails
from PIL import Image  # noqa: E402
from torchvision.datasets.folder import make_dataset  # noqa: E402
from torchvision.io import ImageReadMode, decode_image  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

# torchvision 0.29 deprecates its image decoders (in favour of TorchCodec) and warns on every call. They are still
# the fastest JPEG/PNG path in this environment; read_image falls back to PIL for anything they refuse.
warnings.filterwarnings('ignore', 'The image decoding and encoding capabilities of TorchVision', DeprecationWarning)

# The datasets but 'folder', each loaded by its file beside the copy: load(dataset, data_path, splits, strict_data)
DATASET_FILES = dict(
    hf='hugging_face', wds='shards', cifar10='cifar', cifar100='cifar', digits='demo_data', synthetic='demo_data'
)
DATASETS = ('folder', *DATASET_FILES)
VAL_SPLITS = ('validation', 'val', 'valid', 'test')  # the held-out split by default: the first found
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')  # compared lower-cased
# What schedulers send every process of a job to end it (Slurm's scancel and time limit, Kubernetes, systemd,
# `timeout`, Ctrl-C in a terminal, sbatch --signal=USR1@SECONDS): the main process stops with a checkpoint
# (run.StopSignals), loader workers leave the stop to it (create_loader).
JOB_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


# 1. Datasets


class Transformed(torch.utils.data.Dataset):
    """A dataset of (image, label) as the loop loads it: keys (index, item seed) (an int: seed 0), items (uint8 RGB
    (3, H, W), int label, bad_images: the dataset's third value, else 0), transformed per item."""

    def __init__(self, dataset, transform=None):
        self.dataset = dataset
        self.transform = transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, item_seed = key if isinstance(key, tuple) else (key, 0)
        image, label, *bad_images = self.dataset[index]
        image = as_uint8_rgb(image)
        if self.transform is not None:
            # fork_rng restores the caller's CPU RNG afterwards (workers=0 must not disturb the training loop).
            # default_generator.manual_seed, not torch.manual_seed: the latter also reseeds every CUDA device.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(item_seed)
                image = self.transform(image)
        return image, int(label), bad_images[0] if bad_images else 0


def as_uint8_rgb(image):
    """A uint8 (3, H, W) tensor from a PIL image, a uint8 (1 or 3, H, W) tensor or a uint8 (H, W[, 1 or 3]) array
    (OpenCV's), by torchvision's to_image. PIL images of other modes are converted to RGB first (a palette image's
    values are indices)."""
    if isinstance(image, Image.Image) and image.mode != 'RGB':
        image = image.convert('RGB')
    if isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
        tensor = v2.functional.to_image(image).as_subclass(torch.Tensor)
        if tensor.dtype == torch.uint8 and tensor.ndim == 3 and tensor.shape[0] in (1, 3):
            return tensor.expand(3, -1, -1)
    described = type(image).__name__
    if hasattr(image, 'shape'):
        described = f'{image.dtype} {described} of shape {tuple(image.shape)}'
    raise DataError(
        f'a dataset gave an image as a {described}; give PIL images, uint8 (3, H, W) tensors or uint8 '
        f"(H, W, 3) arrays (torchvision's ToTensor() makes floats: use PILToTensor())"
    )


def transformed(dataset, transform):
    """Transformed(dataset, transform), unless the dataset transforms itself: random images
    (demo_data.SyntheticImages) are made again at the crop size, so that a benchmark measures the training step."""
    if hasattr(dataset, 'transformed'):
        return dataset.transformed(transform)
    return Transformed(dataset, transform)


class ImageFolder(torch.utils.data.Dataset):
    """Image files under `root` (paths relative to it, with labels) as (uint8 image, label, bad_images), decoded on
    access; an unreadable file is replaced by the next readable one (bad_images 1, one warning per file) or, when
    strict, raises DataError. The list is two numpy arrays (paths as fixed-width bytes, labels as int32): loader
    workers read them without touching reference counts, so their pages stay shared, not copied per worker."""

    def __init__(self, root, paths, labels, strict=False):
        self.root = root
        self.strict = strict
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
                    raise DataError(
                        f'unreadable image {path}: {error}; replace or delete it (or allow skipping bad files)'
                    ) from None
                self.known_unreadable[substitute] = True
                print(f'warning: skipping unreadable image {path}: {error}', file=sys.stderr, flush=True)
        raise DataError(
            f'none of the {len(self)} images (e.g. {self.path(0)}) is readable; check the files are JPEG or PNG images'
        )


class UnreadableImage(Exception):
    """A file that is not a whole, decodable image (empty, truncated, not an image)."""


def read_image(path):
    """decode_image_bytes of the file at `path`."""
    try:
        with open(path, 'rb') as file:
            return decode_image_bytes(file.read())
    except OSError as error:  # gone since the folder was listed, no permission, I/O error
        raise UnreadableImage(error.strerror or type(error).__name__) from None


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
            return torch.from_numpy(np.array(image.convert('RGB'))).permute(2, 0, 1)
    except Image.UnidentifiedImageError:
        raise UnreadableImage('not a JPEG or PNG image') from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
        raise UnreadableImage(str(error).splitlines()[0] if str(error) else type(error).__name__) from None


def load_datasets(dataset, data_path=None, *, splits=(None, None), strict_data=False, **options):
    """The training set, the validation set and the class names; `source` on the sets names their splits and
    columns (for the start line). 'folder': DATA/{train,val}/<class>/**/*.jpg|jpeg|png (torchvision's ImageFolder
    layout). The others load in their files beside the copy (DATASET_FILES), which take the `options` they use:
    `keys`, the (image, label) columns (hf, wds); `skip_bad_shards` (wds); `synthetic_size`, `num_classes`
    (synthetic). `splits`: the (train, val) names (choose_splits)."""
    if dataset == 'folder':
        return _load_folder(data_path, strict_data, splits)
    if dataset not in DATASET_FILES:
        raise DataError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASETS)}')
    feature = 'the demo (python train.py without data)' if dataset == 'digits' else f'--dataset {dataset}'
    loader = import_beside(DATASET_FILES[dataset], feature)
    return loader.load(dataset, data_path, splits, strict_data, **options)


def require_folder(dataset, data_path, hint):
    """A DataError unless `data_path` names a folder; `hint` says what it holds."""
    if not data_path:
        raise DataError(f'dataset {dataset!r} needs a data path: {hint}')
    if not os.path.isdir(data_path):
        raise DataError(f'data path {data_path} does not exist or is not a folder; give {hint}')


def choose_splits(available, splits, where, kind='split', suffix=''):
    """The train and val split names: those in `splits` or the defaults (train; the first of VAL_SPLITS found),
    each checked against `available`. Names of folders end in '/'."""
    train = (splits[0] or 'train').rstrip('/') + suffix
    defaults = [name + suffix for name in VAL_SPLITS]
    val = splits[1].rstrip('/') + suffix if splits[1] else next((name for name in defaults if name in available), None)
    for name, flag in ((train, '--train-split'), (val, '--val-split')):
        if name not in available:
            problem = f'no {name} {kind}' if name else f'no held-out {kind} ({", ".join(defaults)})'
            listed = ', '.join(available) or 'none'
            raise DataError(f'{where} has {problem}; its {kind}s: {listed}; name the one to use with {flag}')
    return train, val


def _load_folder(root, strict, splits):
    require_folder('folder', root, 'the folder holding train/<class>/ and val/<class>/')
    subfolders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith('.'))
    names = choose_splits([f'{name}/' for name in subfolders], splits, root, kind='folder', suffix='/')
    folders = [os.path.join(root, split.rstrip('/')) for split in names]
    scanned = [_scan_class_folders(folder) for folder in folders]  # (classes, paths, labels) each
    (train_classes, *_), (val_classes, *_) = scanned
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f'{names[0]} and {names[1]} in {root} hold different classes (only in train: '
            f'{only_train or "-"}; only in val: {only_val or "-"}); give both the same class folders'
        )
    train_set, val_set = (
        ImageFolder(folder, paths, labels, strict) for folder, (_, paths, labels) in zip(folders, scanned)
    )
    train_set.source = f'folders {names[0]} and {names[1]}'
    val_set.source = train_set.source
    return train_set, val_set, train_classes


def _scan_class_folders(folder):
    """The sorted class names, the image paths relative to `folder` and their labels, for folder/<class>/**/<image>
    (IMAGE_EXTENSIONS), by torchvision's make_dataset, hidden files and folders left out. The classes are listed
    here: torchvision's find_classes would take a hidden folder (.ipynb_checkpoints) for one."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith('.'))
    if not classes:
        raise DataError(f'{folder} has no class folders; expected {folder}/<class>/*.jpg')

    def is_image(path):  # below a class folder (not hidden), so a hidden entry's name follows a separator
        relative = path[len(folder) + 1 :]
        return relative.lower().endswith(IMAGE_EXTENSIONS) and os.sep + '.' not in relative

    class_index = {name: label for label, name in enumerate(classes)}
    samples = make_dataset(folder, class_index, is_valid_file=is_image, allow_empty=True)
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if empty:
        raise DataError(
            f'class folder {os.path.join(folder, empty[0])} has no images '
            f'({", ".join(IMAGE_EXTENSIONS)}); add images or remove the folder'
        )
    return classes, [path[len(folder) + 1 :] for path, _ in samples], [label for _, label in samples]


# 2. Sampling


def mix_seed(*values):
    """A 63-bit seed from integers (numpy's SeedSequence): nearby inputs give unrelated seeds."""
    return int(np.random.SeedSequence([value % 2**64 for value in values]).generate_state(1, np.uint64)[0] >> 1)


def seed_torch(seed, *context):
    """The one place the training's torch seeds are set, the CPU's and every device's: `seed` itself, or mixed with
    `context` (a rank; a resume's epoch and step) so that each rank draws streams of its own."""
    torch.manual_seed(mix_seed(seed, *context) if context else seed)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, item seed) for one rank, a pure function of (seed, epoch, rank, world_size).

    shuffle=True (training): one permutation per (seed, epoch), the same on every rank, padded by repeating its
    start to a multiple of world_size (as DistributedSampler: ranks step in lockstep); rank r takes every
    world_size-th index from r, so the ranks' k-th batches together are the k-th batch of one process with batch
    size world_size * batch_size, augmentations included. shuffle=False (evaluation): rank r takes range(r, n,
    world_size), unpadded: every image counts once; the last batches may be short and uneven across ranks.
    drop_last drops each rank's incomplete last batch."""

    def __init__(self, dataset_len, batch_size, *, shuffle, drop_last, seed=0, rank=None, world_size=None):
        rank = distributed.get_rank() if rank is None else rank  # this process's, unless given
        world_size = distributed.get_world_size() if world_size is None else world_size
        if dataset_len < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f'need dataset_len >= 1, batch_size >= 1 and 0 <= rank < world_size, got '
                f'{dataset_len}, {batch_size}, {rank}, {world_size}'
            )
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch; start_batch skips the epoch's first batches without loading them (exact resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self):
        """Batches in the whole epoch for this rank (start_batch is not subtracted)."""
        count = (
            math.ceil(self.dataset_len / self.world_size)
            if self.shuffle
            else len(range(self.rank, self.dataset_len, self.world_size))
        )
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng(mix_seed(self.seed, self.epoch))
        # Drawn first, for every index: an item's seed is a function of (seed, epoch, index) alone, whatever rank,
        # world size or worker loads it (cheaper than a SeedSequence per item: docs/measurements.md).
        item_seeds = rng.integers(0, 2**63, size=self.dataset_len)
        padded_len = math.ceil(self.dataset_len / self.world_size) * self.world_size  # the permutation wraps around
        indices = (
            np.resize(rng.permutation(self.dataset_len), padded_len) if self.shuffle else np.arange(self.dataset_len)
        )[self.rank :: self.world_size]
        for batch in range(self.start_batch, len(self)):
            chunk = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield list(zip(chunk.tolist(), item_seeds[chunk].tolist()))


def create_loader(dataset, batch_sampler, *, workers, pin_memory=False):
    """A DataLoader over the sampler's batches, items collated to (uint8 images, int64 labels, int64 bad_images), with
    its own torch.Generator: an epoch's iterator draws nothing from the global RNG (bitwise resume). Workers copy
    the dataset and transform as they start: train.py makes a loader each epoch, so progressive sizes reach them.
    Workers ignore JOB_SIGNALS: signalled with the whole job, they go on until the main process, which stops
    after its step and saves, ends them (torch's workers also end when their main process dies)."""
    return FrozenHeapLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator(),
        worker_init_fn=ignore_job_signals,
    )


def ignore_job_signals(worker_id):
    """In a loader worker: JOB_SIGNALS ignored, then unblocked (FrozenHeapLoader forks with them blocked)."""
    for job_signal in JOB_SIGNALS:
        signal.signal(job_signal, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)


@atexit.register  # after multiprocessing's own exit handler, so it runs before it
def end_workers():
    """Loader workers still alive at exit (an error left an epoch unfinished) end here: multiprocessing's exit
    handler would send them SIGTERM, which they ignore, and then wait for them forever. torch's handler of
    their deaths (SIGCHLD) is removed first: at exit a killed worker is no error."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()


class FrozenHeapLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers fork from a frozen heap: a forked worker's garbage collector writes to every object
    it scans, so a full collection copies the interpreter's whole heap into it (docs/measurements.md). Objects frozen
    (gc.freeze) before the fork are never scanned there; the main process unfreezes its own right after. The fork
    happens with JOB_SIGNALS blocked: a signal to the job then finds a worker ignoring it, or waits for the main
    process, never a worker that has not yet set its handlers (ignore_job_signals)."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        gc.collect()  # what is garbage now would never be collected once frozen
        gc.freeze()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
        try:
            return super().__iter__()  # forks the workers
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            gc.unfreeze()
