"""How an ImageNet-sized folder costs memory in DataLoader workers: train.py itself, data.py's loader alone, and
torchvision's ImageFolder. A benchmark, not a test: it prints what it measured, on this machine.

    python tools/bench_folder_memory.py /tmp/imagenet-links            # made on first use (hard links)
    python tools/bench_folder_memory.py DIR --files-per-class 1281 --classes 1000 --images 160000 --workers 2

The folder is ImageNet's shape, DIR/train/<class>/<name>.JPEG: 1000 classes x 1281 files (1.28 M) and
DIR/val with one file per class, every file a hard link to its class's small JPEG (no disk space, real
directory entries). For each implementation, in a fresh process: the listing time, then a DataLoader
(2 workers, shuffled, batch 64) reads --images images, and each worker's private memory (USS: the
Private_Clean + Private_Dirty of /proc/PID/smaps_rollup, pages no other process shares) is read after
its first batches and at the end; so is the main process's (its pages become private as the workers
copy them). A file list of Python objects is copied page by page into every
worker as the workers touch its reference counts (copy-on-write); numpy arrays of bytes are not.
'train.py' runs the real thing (tf_efficientnetv2_b0, 32 px, -b 256, -j 2, --perf-steps STEPS) and reads its
workers' private memory after its first log line and at its last; there the workers' garbage collector would
copy the interpreter's whole heap, which data.FrozenHeapLoader prevents (gc.freeze before the fork).
Linux only.
"""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_folder(root, classes, files_per_class):
    """root/{train,val}/<class>/ of hard links, to one small 64x48 JPEG per class (a file takes at most
    65,000 links on ext4)."""
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.join(root, 'sources'), exist_ok=True)
    for label in range(classes):
        source = os.path.join(root, 'sources', f'{label}.jpg')
        pixels = np.random.RandomState(label).randint(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(source, quality=90)
        name = f'n{label:08d}'
        for split, count in (('train', files_per_class), ('val', 1)):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for index in range(count):
                os.link(source, os.path.join(folder, f'{name}_{index}.JPEG'))


def private_mib(pid):
    with open(f'/proc/{pid}/smaps_rollup') as f:
        fields = dict(line.split(':', 1) for line in f if ':' in line)
    return sum(int(fields[key].split()[0]) for key in ('Private_Clean', 'Private_Dirty')) / 1024


def read_through(batches, images, workers):
    """Reads `images` images from a started loader -> (images read, images/s after the workers' first batches,
    private MiB of [main, *workers] after those first batches, the same at the end)."""
    read = 0
    for _ in range(2 * workers):
        read += len(next(batches)[0])
    pids = [worker.pid for worker in batches._workers]
    at_start = [private_mib(pid) for pid in [os.getpid(), *pids]]
    start = time.perf_counter()
    while read < images:
        read += len(next(batches)[0])
    rate = read / (time.perf_counter() - start)
    return read, rate, at_start, [private_mib(pid) for pid in [os.getpid(), *pids]]


def listed(implementation, root):
    """-> (dataset for the loader, seconds to list the folder)."""
    import torchvision
    from torchvision.transforms import v2

    import data
    import transforms

    start = time.perf_counter()
    if implementation == 'ours':
        train_set = data.load_datasets('folder', root)[0]
        dataset = data.Transformed(train_set, transforms.eval_transform(32))
    else:
        dataset = torchvision.datasets.ImageFolder(
            os.path.join(root, 'train'), transform=v2.Compose([v2.PILToTensor(), v2.Resize(32), v2.CenterCrop(32)])
        )
    return dataset, time.perf_counter() - start


def measure(implementation, root, images, workers, batch):
    dataset, seconds = listed(implementation, root)
    generator = torch.Generator().manual_seed(0)
    sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    if implementation == 'ours':  # our loop hands the dataset (index, seed) keys
        sampler = [(index, index) for index in torch.randperm(len(dataset), generator=generator)[:images].tolist()]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers)
    batches = iter(loader)
    read, rate, at_start, at_end = read_through(batches, images, workers)
    result = dict(
        implementation=implementation,
        files=len(dataset),
        listing_seconds=round(seconds, 2),
        images_read=read,
        images_per_sec=round(rate),
        main_private_mib=[round(at_start[0], 1), round(at_end[0], 1)],  # at start, at the end
        worker_private_mib=[[round(a, 1), round(b, 1)] for a, b in zip(at_start[1:], at_end[1:])],
    )
    del batches
    return result


def measure_train_py(root, images, workers, batch):
    """train.py on the folder; its workers are its child processes, sampled while it trains."""
    import subprocess
    import tempfile

    steps = max(images // batch, 2)
    with tempfile.TemporaryDirectory() as output:
        command = [
            sys.executable,
            os.path.join(ROOT, 'train.py'),
            root,
            *'--model tf_efficientnetv2_b0 --img-size 32 -b'.split(),
            str(batch),
            '-j',
            str(workers),
            '--perf-steps',
            str(steps),
            '--log-interval',
            '20',
            '--output',
            os.path.join(output, 'run'),
        ]
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        samples = []
        listed_after = None
        for line in process.stdout:
            if line.startswith('Training ') and listed_after is None:
                listed_after = time.perf_counter() - start
            if line.startswith('Train:'):
                with open(f'/proc/{process.pid}/task/{process.pid}/children') as f:
                    pids = [int(pid) for pid in f.read().split()]
                try:
                    samples.append([private_mib(pid) for pid in [process.pid, *pids]])
                except OSError:  # a worker that just ended (the last step)
                    pass
                rate = float(line.split('/s')[1].split()[1])  # the running average, as the ModelZoo parser reads it
        process.wait()
    first = samples[0]
    last = samples[-1]
    assert process.returncode == 0 and len(first) == len(last) == workers + 1, (process.returncode, samples)
    return dict(
        implementation='train.py',
        seconds_to_start_line=round(listed_after, 1),
        images_read=steps * batch,
        images_per_sec=round(rate),
        main_private_mib=[round(first[0], 1), round(last[0], 1)],
        worker_private_mib=[[round(a, 1), round(b, 1)] for a, b in zip(first[1:], last[1:])],
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('root')
    p.add_argument('--classes', type=int, default=1000)
    p.add_argument('--files-per-class', type=int, default=1281)
    p.add_argument('--images', type=int, default=160_000)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--only', choices=('ours', 'torchvision', 'train.py'), help='one implementation in this process')
    args = p.parse_args()
    if not os.path.isdir(os.path.join(args.root, 'train')):
        start = time.perf_counter()
        make_folder(args.root, args.classes, args.files_per_class)
        print(f'made {args.root}: {args.classes} x {args.files_per_class} files in {time.perf_counter() - start:.0f} s')
    if args.only == 'train.py':
        print(json.dumps(measure_train_py(args.root, args.images, args.workers, 256)))
        return
    if args.only:
        print(json.dumps(measure(args.only, args.root, args.images, args.workers, args.batch)))
        return
    import subprocess

    torch.set_num_threads(1)
    for implementation in ('torchvision', 'ours', 'train.py'):  # each in a fresh process: no allocator history
        command = [
            sys.executable,
            __file__,
            args.root,
            '--only',
            implementation,
            '--images',
            str(args.images),
            '--workers',
            str(args.workers),
            '--batch',
            str(args.batch),
        ]
        print(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip(), flush=True)


if __name__ == '__main__':
    main()
