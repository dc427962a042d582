"""ImageNet-sized WebDataset shards through the project's loader (shards.py), against the same images in a folder.
A benchmark, not a test: it prints what it measured, on this machine.

    python tools/bench_shards.py /tmp/bench-shards              # made on first use: ~9 GB of shards, hard links
    python tools/bench_shards.py DIR --shards 1000 --per-shard 1281 --images 40000 --workers 2
    python tools/bench_shards.py /tmp/bench-shards-128 --shards 128 --per-shard 1000 --copies   # a file per image

DIR/shards: timm's layout, imagenet1k-train-0000.tar ... (ShardWriter, --per-shard samples each: KEY.jpg +
KEY.cls, class = sample number modulo 1000) and one imagenet1k-validation-0000.tar, with _info.json;
DIR/folder: the same images as DIR/folder/{train,val}/<class>/<key>.jpg, hard links to one small 64x48 JPEG per
class (the shards hold the same bytes; --copies: a copy per image). Measured, each in a fresh process: the time
to index the shards (an empty index cache: every tar header read once) and to open them again (the cached
index), the folder's listing time; then a DataLoader as train.py makes it (data.transformed + EpochBatchSampler +
create_loader, 2 workers, batch 64, the shuffled epoch order over all the images) reads --images images, and each
process's private memory (USS: Private_Clean + Private_Dirty of /proc/PID/smaps_rollup) is read after its first
batches and at the end. Last, images/s of both in one process, alternating for --rounds rounds (the machine's
load varies). Linux only.
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench_folder_memory import read_through  # noqa: E402  (tools/, this script's folder)


def make(root, shards, per_shard, classes, copies=False):
    import numpy as np
    import webdataset
    from PIL import Image

    jpegs = []
    for label in range(classes):
        pixels = np.random.RandomState(label).randint(0, 256, (48, 64, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, 'JPEG', quality=90)
        jpegs.append(buffer.getvalue())
    for label in range(classes):  # the folder's files: hard links to one file per class
        os.makedirs(os.path.join(root, 'sources'), exist_ok=True)
        with open(os.path.join(root, 'sources', f'{label}.jpg'), 'wb') as file:
            file.write(jpegs[label])
    os.makedirs(os.path.join(root, 'shards'), exist_ok=True)
    info = {'name': 'bench', 'splits': {}}
    for split, count in (('train', shards * per_shard), ('validation', classes)):
        pattern = os.path.join(root, 'shards', f'imagenet1k-{split}-%04d.tar')
        with webdataset.ShardWriter(pattern, maxcount=per_shard, verbose=0) as writer:
            for index in range(count):
                writer.write({'__key__': f'{split}_{index:08d}', 'jpg': jpegs[index % classes], 'cls': index % classes})
        files = sorted(name for name in os.listdir(os.path.join(root, 'shards')) if f'-{split}-' in name)
        lengths = [min(per_shard, count - i * per_shard) for i in range(len(files))]
        info['splits'][split] = dict(name=split, num_samples=count, filenames=files, shard_lengths=lengths)
        for index in range(count):
            folder = os.path.join(root, 'folder', 'val' if split == 'validation' else split, f'n{index % classes:08d}')
            os.makedirs(folder, exist_ok=True)
            source = os.path.join(root, 'sources', f'{index % classes}.jpg')
            (shutil.copyfile if copies else os.link)(source, os.path.join(folder, f'{index:08d}.jpg'))
    with open(os.path.join(root, 'shards', '_info.json'), 'w') as file:
        json.dump(info, file)


def measure(source, root, images, workers, batch):
    import data
    import transforms

    result = dict(source=source)
    if source == 'shards':
        shutil.rmtree(os.path.join(root, 'cache'), ignore_errors=True)
        for label in ('index_seconds', 'open_seconds'):  # first with an empty index cache, then with it
            start = time.perf_counter()
            train_set = data.load_datasets('wds', os.path.join(root, 'shards'))[0]
            result[label] = round(time.perf_counter() - start, 2)
    else:
        start = time.perf_counter()
        train_set = data.load_datasets('folder', os.path.join(root, 'folder'))[0]
        result['listing_seconds'] = round(time.perf_counter() - start, 2)
    sampler = data.EpochBatchSampler(len(train_set), batch, shuffle=True, seed=0, drop_last=True)
    loader = data.create_loader(data.transformed(train_set, transforms.eval_transform(32)), sampler, workers=workers)
    batches = iter(loader)
    read, rate, at_start, at_end = read_through(batches, images, workers)
    result.update(
        images=len(train_set),
        images_read=read,
        images_per_sec=round(rate),
        main_private_mib=[round(at_start[0], 1), round(at_end[0], 1)],  # after the first batches, at the end
        worker_private_mib=[[round(a, 1), round(b, 1)] for a, b in zip(at_start[1:], at_end[1:])],
    )
    del batches
    return result


def rates(root, images, workers, batch, rounds):
    """images/s of both sources in one process, alternating (the machine's load changes from minute to minute):
    each round reads `images` images from each, the epoch's order of a new epoch each round."""
    import data
    import transforms

    sources = {
        'folder': data.load_datasets('folder', os.path.join(root, 'folder'))[0],
        'shards': data.load_datasets('wds', os.path.join(root, 'shards'))[0],
    }
    found = {source: [] for source in sources}
    for epoch in range(rounds):
        for source, train_set in sources.items():
            sampler = data.EpochBatchSampler(len(train_set), batch, shuffle=True, seed=0, drop_last=True)
            sampler.set_epoch(epoch)
            loader = data.create_loader(
                data.transformed(train_set, transforms.eval_transform(32)), sampler, workers=workers
            )
            batches = iter(loader)
            read = 0
            next(batches)  # the workers have started
            start = time.perf_counter()
            while read < images:
                read += len(next(batches)[0])
            found[source].append(round(read / (time.perf_counter() - start)))
            del batches
    return {
        source: dict(images_per_sec=values, median=sorted(values)[len(values) // 2]) for source, values in found.items()
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('root')
    p.add_argument('--shards', type=int, default=1000)
    p.add_argument('--per-shard', type=int, default=1281)
    p.add_argument('--classes', type=int, default=1000)
    p.add_argument('--images', type=int, default=40_000)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--copies', action='store_true', help='the folder of copies, not hard links (a file per image)')
    p.add_argument('--rounds', type=int, default=5, help='images/s: rounds of --images images from each source')
    p.add_argument('--only', choices=('shards', 'folder', 'rates'), help='one measurement in this process')
    args = p.parse_args()
    os.environ['XDG_CACHE_HOME'] = os.path.join(args.root, 'cache')  # the index cache here, emptied per run
    if not os.path.isdir(os.path.join(args.root, 'folder')):
        start = time.perf_counter()
        make(args.root, args.shards, args.per_shard, args.classes, args.copies)
        print(f'made {args.root}: {args.shards} x {args.per_shard} images in {time.perf_counter() - start:.0f} s')
    if args.only == 'rates':
        print(json.dumps(rates(args.root, args.images, args.workers, args.batch, args.rounds)))
        return
    if args.only:
        print(json.dumps(measure(args.only, args.root, args.images, args.workers, args.batch)))
        return
    torch.set_num_threads(1)
    for source in ('folder', 'shards', 'folder', 'shards', 'rates'):  # each in a fresh process
        command = [
            sys.executable,
            __file__,
            args.root,
            '--only',
            source,
            '--images',
            str(args.images),
            '--workers',
            str(args.workers),
            '--batch',
            str(args.batch),
            '--rounds',
            str(args.rounds),
        ]
        print(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip(), flush=True)


if __name__ == '__main__':
    main()
