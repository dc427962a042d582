"""WebDataset tar shards as map-style datasets: random access through a cached index of member offsets.

    python train.py --dataset wds /data/imagenet-1k-wds               # a folder of shards (+ _info.json)
    python train.py --dataset wds '/data/in1k/imagenet1k-{train-{0000..0099},validation-0000}.tar'  # some shards
    python train.py --dataset wds timm/imagenet-1k-wds                # a hub dataset, downloaded once (large)

timm's layout (timm/imagenet-1k-wds, -12k-wds, -22k-wds): [PREFIX-]SPLIT-NNNN.tar shards of samples KEY.jpg (or
.jpeg, .png, .webp) + KEY.cls (the label as text) (+ KEY.json), a sample's files next to each other; _info.json,
where present, lists each split's shards. Each shard is indexed once, its tar headers walked (no image read),
into $XDG_CACHE_HOME/efficientnetv2/shards (default ~/.cache/...), named after the shard's path, size and
modification time. An item is then one read of the image's bytes: what the loop does for a folder (per-image
seeded augmentation, mid-epoch bitwise resume, exact distributed validation) holds for shards. The index is
numpy arrays, 20 bytes a sample, which loader workers read without copying.
"""

import fcntl
import glob
import hashlib
import json
import mmap
import os
import re
import sys

import numpy as np
import torch

from data import DataError, UnreadableImage, choose_splits, decode_image_bytes

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
SHARD_NAME = re.compile(r'(?:.*-)?([^-/]+)-\d+\.tar$')  # [PREFIX-]SPLIT-NNNN.tar
CACHE = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'efficientnetv2', 'shards')


class BadShard(Exception):
    """A shard that cannot be read as a tar archive (missing, truncated, a damaged header)."""


def load(dataset, path, splits, strict_data, keys=(None, None), skip_bad_shards=False, **options):
    """data.load_datasets' call: load_shards with the label from `keys`' second name, if given."""
    return load_shards(path, *splits, target_key=keys[1], strict=strict_data, skip_bad_shards=skip_bad_shards)


def load_shards(path, train_split=None, val_split=None, target_key=None, strict=False, skip_bad_shards=False):
    """The training set, the validation set and the class names '0' to 'K-1', K the largest label + 1 (the module
    docstring says more). With `target_key` the label is this field of KEY.json instead of KEY.cls."""
    if not path:
        raise DataError('--dataset wds needs a data path: a folder of shards, a brace pattern or a hub dataset id')
    folder, splits, lengths = _find_splits(path)
    for name in (train_split, val_split):
        if name and ('.tar' in name or '{' in name):  # a pattern of shard files, as timm's --train-split takes
            splits[name] = expand_braces(os.path.join(folder, name))
    names = choose_splits(list(splits), (train_split, val_split), path)
    sets = [ShardSamples(splits[name], target_key, strict, skip_bad_shards, lengths) for name in names]
    for dataset in sets:  # the run's start line
        dataset.source = f'shards of {names[0]} and {names[1]}'
    num_classes = int(max(dataset.labels.max(initial=-1) for dataset in sets)) + 1
    return sets[0], sets[1], [str(label) for label in range(num_classes)]


def _find_splits(path):
    """The folder, each split's shard paths and each shard's sample count, from _info.json or the shards' names."""
    if not os.path.exists(path) and '{' not in path and re.fullmatch(r'[\w.-]+/[\w.-]+', path):
        path = _download(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    info_path = os.path.join(folder, '_info.json')
    if os.path.isdir(path) and os.path.exists(info_path):
        try:
            with open(info_path) as file:
                info = json.load(file)['splits']
            splits = {name: [os.path.join(folder, file) for file in split['filenames']] for name, split in info.items()}
            lengths = {
                os.path.join(folder, file): count
                for split in info.values()
                for file, count in zip(split['filenames'], split.get('shard_lengths', ()))
            }
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise DataError(
                f"{info_path} is not timm's _info.json ({type(error).__name__}: {error}): it needs "
                '{"splits": {"train": {"filenames": [...]}, ...}}; fix or remove it'
            ) from None
        return folder, splits, lengths
    files = sorted(glob.glob(os.path.join(path, '*.tar'))) if os.path.isdir(path) else expand_braces(path)
    if not files:
        raise DataError(
            f'no shards (*.tar) in {path}; give a folder of [PREFIX-]SPLIT-NNNN.tar files, a brace '
            'pattern such as train-{0000..0099}.tar, or a hub dataset id such as timm/imagenet-1k-wds'
        )
    splits = {}
    for file in files:
        found = SHARD_NAME.match(os.path.basename(file))
        splits.setdefault(found.group(1) if found else 'train', []).append(file)
    return folder, splits, {}


def expand_braces(pattern):
    """'a-{0000..0002}.tar' -> ['a-0000.tar', 'a-0001.tar', 'a-0002.tar'] (zero-padded like the first number);
    '{train,val}' lists; braces may nest ('{train-{0000..0009},val-0000}')."""
    start = pattern.find('{')
    if start < 0:
        return [pattern]
    depth = 0
    choices = []
    begin = start + 1
    for end in range(start, len(pattern)):
        depth += {'{': 1, '}': -1}.get(pattern[end], 0)
        if depth == 1 and pattern[end] == ',' or depth == 0:
            choices.append(pattern[begin:end])
            begin = end + 1
        if depth == 0:
            break
    if depth:
        raise DataError(f'a {{ without its }} in {pattern}')
    numbers = re.fullmatch(r'(\d+)\.\.(\d+)', choices[0])
    if numbers and len(choices) == 1:
        first, last = numbers.groups()
        choices = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    rest = pattern[end + 1 :]
    return [name for choice in choices for name in expand_braces(pattern[:start] + choice + rest)]


def _download(repo_id):
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(repo_id, repo_type='dataset', allow_patterns=['*.tar', '*.json'])
    except Exception as error:
        raise DataError(
            f'{repo_id} is no folder here and cannot be downloaded from the Hugging Face hub ('
            f'{type(error).__name__}: {str(error).partition(chr(10))[0]}); give a folder of shards, '
            'or log in (huggingface-cli login) for a gated dataset'
        ) from None


class ShardSamples(torch.utils.data.Dataset):
    """The samples of a list of shards as (uint8 image, label, bad_images), decoded on access. As data.ImageFolder:
    an unreadable image is replaced by the next readable one (bad_images 1, one warning naming shard and member)
    or, when strict, raises DataError. A shard that is not a whole tar archive raises DataError, or with
    skip_bad_shards is left out with a warning saying how many images that loses."""

    def __init__(self, shards, target_key=None, strict=False, skip_bad_shards=False, lengths=None):
        lengths = lengths or {}
        self.strict = strict
        indexes = []
        kept = []
        try:
            os.makedirs(CACHE, exist_ok=True)
            lock = open(os.path.join(CACHE, 'indexing.lock'), 'w')
        except OSError as error:
            raise DataError(
                f'cannot write the shard index cache {CACHE} ({error.strerror}); set XDG_CACHE_HOME '
                'to a writable folder'
            ) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process indexes, the others wait, then load; closing unlocks
            for shard in shards:
                try:
                    indexes.append(_cached_index(shard, target_key))
                    kept.append(shard)
                except BadShard as error:
                    if not skip_bad_shards:
                        raise DataError(
                            f'unreadable shard {shard}: {error.args[0]}; replace it, or leave it out '
                            'with --skip-bad-shards'
                        ) from None
                    lost = lengths.get(shard, f'at least {error.args[1]}')  # _info.json's count, else those found
                    print(
                        f'warning: skipping unreadable shard {shard}: {error.args[0]}; {lost} images lost',
                        file=sys.stderr,
                        flush=True,
                    )
        if not sum(len(index) for index in indexes):
            raise DataError(
                f'no image in the {len(shards)} shard(s) {shards[0]} ...; they should hold samples KEY.jpg + KEY.cls'
            )
        self.shards = np.array([os.fsencode(shard) for shard in kept], dtype=np.bytes_)
        self.shard_ids = np.repeat(np.arange(len(kept), dtype=np.int32), [len(index) for index in indexes])
        index = np.concatenate(indexes)
        self.offsets = np.ascontiguousarray(index[:, 0])
        self.sizes = index[:, 1].astype(np.int32)
        self.labels = index[:, 2].astype(np.int32)
        # Shared between loader workers, so each bad image is reported once per run, not once per worker/epoch.
        self.known_unreadable = torch.zeros(len(self.labels), dtype=torch.bool).share_memory_()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        for step in range(len(self)):
            substitute = (index + step) % len(self)
            if self.known_unreadable[substitute]:
                continue
            try:
                return decode_image_bytes(self._read(substitute)), int(self.labels[substitute]), int(step > 0)
            except UnreadableImage as error:
                name = self.member_name(substitute)
                if self.strict:
                    raise DataError(
                        f'unreadable image {name}: {error}; replace it (or allow skipping bad files)'
                    ) from None
                self.known_unreadable[substitute] = True
                print(f'warning: skipping unreadable image {name}: {error}', file=sys.stderr, flush=True)
        raise DataError(f'none of the {len(self)} images in {os.fsdecode(self.shards[0])} ... is readable')

    def _read(self, index, before=0):
        try:
            with open(self.shards[self.shard_ids[index]], 'rb') as file:
                return os.pread(file.fileno(), int(self.sizes[index]) + before, int(self.offsets[index]) - before)
        except OSError as error:  # gone or changed since it was indexed, I/O error
            raise UnreadableImage(error.strerror or type(error).__name__) from None

    def member_name(self, index):
        """SHARD:MEMBER, the member's name read back from its tar header (the 512 bytes before its data)."""
        try:
            name = _header_name(self._read(index, before=512)[:512])
        except UnreadableImage:
            name = f'(bytes {self.offsets[index]}..)'
        return f'{os.fsdecode(self.shards[self.shard_ids[index]])}:{name}'


def _cached_index(shard, target_key):
    """The shard's index (index_shard), from the cache or made and cached."""
    try:
        stat = os.stat(shard)
    except OSError as error:
        raise BadShard(error.strerror or type(error).__name__, 0) from None
    identity = json.dumps([os.path.abspath(shard), stat.st_size, stat.st_mtime_ns, target_key])
    cached = os.path.join(CACHE, hashlib.sha1(identity.encode()).hexdigest() + '.npy')
    if os.path.exists(cached):
        return np.load(cached)
    index = index_shard(shard, target_key)
    np.save(f'{cached}.{os.getpid()}.tmp.npy', index)  # then renamed: a cached index is always whole
    os.replace(f'{cached}.{os.getpid()}.tmp.npy', cached)
    return index


def index_shard(shard, target_key=None):
    """An int64 (samples, 3) array of image offset, image size and label, read from the tar headers alone (and the
    label members). Raises BadShard for a truncated or damaged tar, DataError for a sample without a label."""
    samples = []
    key = None
    members = {}
    try:
        with open(shard, 'rb') as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as tar:
            for name, offset, size in _tar_members(tar):
                found = re.match(r'^((?:.*/|)[^./]+)\.([^/]*)$', name)  # webdataset's KEY.EXTENSION
                if not found:
                    continue
                if found.group(1) != key and members:
                    samples.append(_sample(shard, tar, key, members, target_key))
                    members = {}
                key = found.group(1)
                members[found.group(2).lower()] = (offset, size)
            if members:
                samples.append(_sample(shard, tar, key, members, target_key))
    except BadShard as error:
        raise BadShard(error.args[0], len(samples)) from None
    except DataError:
        raise
    except (OSError, ValueError) as error:  # unreadable; mmap refuses an empty file
        raise BadShard(getattr(error, 'strerror', None) or str(error), 0) from None
    return np.array(samples, dtype=np.int64).reshape(-1, 3)


def _sample(shard, tar, key, members, target_key):
    image = next((members[extension] for extension in IMAGE_EXTENSIONS if extension in members), None)
    label_member = 'json' if target_key else 'cls'
    if image is None or label_member not in members:
        missing = f'image ({key}.jpg, .jpeg, .png or .webp)' if image is None else f'{key}.{label_member} (its label)'
        raise DataError(
            f'sample {key} in {shard} has no {missing}; its files: '
            f'{", ".join(key + "." + extension for extension in members)}'
        )
    offset, size = members[label_member]
    text = tar[offset : offset + size]
    try:
        label = int(json.loads(text)[target_key] if target_key else text)
    except (ValueError, KeyError, TypeError):
        raise DataError(
            f'sample {key} in {shard}: no integer label in {key}.{label_member}'
            f'{f" under {target_key!r}" if target_key else ""} ({text[:60]!r})'
        ) from None
    return image[0], image[1], label


def _tar_members(tar):
    """Yield (name, data offset, size) of each file in a tar (POSIX ustar, pax or GNU long names)."""
    offset = 0
    long_name = None
    while True:
        header = tar[offset : offset + 512]
        if len(header) < 512:
            raise BadShard(f'it ends at byte {len(tar)}, inside a tar header (truncated?)')
        if not any(header):
            return
        try:
            size = int(header[124:136].strip(b' \0') or 0, 8)
            checksum = int(header[148:156].strip(b' \0'), 8)
        except ValueError:
            checksum = -1
            size = -1
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32 or size < 0:
            raise BadShard(f'a damaged tar header at byte {offset}')
        data_offset = offset + 512
        kind = header[156:157]
        if data_offset + size > len(tar):
            raise BadShard(f'it ends at byte {len(tar)}, inside a member (truncated?)')
        if kind == b'x':  # a pax header: its path= record names the next member
            found = re.search(rb'\d+ path=([^\n]*)\n', tar[data_offset : data_offset + size])
            long_name = found.group(1) if found else long_name
        elif kind == b'L':  # GNU's long name
            long_name = tar[data_offset : data_offset + size].rstrip(b'\0')
        elif kind in (b'0', b'\0'):
            yield os.fsdecode(long_name) if long_name else _header_name(header), data_offset, size
            long_name = None
        offset = data_offset + (size + 511) // 512 * 512


def _header_name(header):
    prefix = header[345:500].rstrip(b'\0')  # ustar splits long names into prefix/name
    return os.fsdecode((prefix + b'/' if prefix else b'') + header[:100].rstrip(b'\0'))
