"""Benchmark the training step and the input pipeline, ours against timm's (the Ascend ModelZoo recipe's
code), in one process.

    python bench.py                    # CPU: step at 96 px batch 16, pipeline at 288 px, workers 0 1 2
    python bench.py --compare-timm     # the same for timm's pieces, interleaved; ours/timm per row
    python bench.py --compare-timm --channels-last defaults   # each as it runs out of the box
    python bench.py --device cuda --img-size 288 -b 256 --precision bfloat16 --channels-last \
        --no-pipeline --compare-timm [--compile]           # one GPU: what tools/gpu_check.sh runs
    python bench.py --no-step --jpeg-dir /data/imagenet --workers 4 8 --compare-timm

The last line is always `summary: step ours/timm X.XX, pipeline ours/timm Y.YY` (n/a without timm);
the table is printed above it and everything, every window included, goes to --json.

- step: one training step on a synthetic uint8 batch on the CPU, as the loader gives it: copy images and
  labels to the device, normalize, forward (autocast unless --precision float32), label-smoothing loss,
  backward, RMSpropTF, EMA update.
  Ours: train.py's own train_step over the parts train.py builds (build_model, create_optimizer,
  precision.create_precision, optim.ModelEma) with the ModelZoo recipe's flags. timm: timm.create_model,
  its RMSpropTF looping over tensors (timm 0.5.4, the ModelZoo's; timm 1.0 picks foreach on CUDA) and
  ModelEmaV2, normalization as its prefetcher does it, zero_grad after the forward (timm's train.py).
  --channels-last on/off/auto applies to both; `defaults` gives ours train.py's default for the device and
  timm NCHW (the ModelZoo's command).
  After --warmup steps (compilation included), images/s is the median of --windows timed windows;
  each window synchronizes the device before reading the clock, and windows of ours and timm
  alternate (ABBA) so a change in machine load hits both. The optimizer and EMA alone are timed alike.
- peak memory of the step, from before the model is built (weights, gradients, optimizer state and
  EMA count): max_memory_allocated on CUDA/NPU. On the CPU (Linux) the growth of the peak resident set
  (VmHWM, reset through /proc/self/clear_refs) in a child forked per implementation before this
  process allocates anything big: an allocator that has served one model would flatter the next.
- pipeline: images/s from JPEG files to a normalized float batch on --device (decode,
  RandomResizedCrop, flip, RandAugment --aa, collate, normalize). Ours: data.py's ImageFolder and
  create_loader, transforms.py's train_transform and normalize. timm: PIL decode, create_transform(is_training,
  use_prefetcher=True), fast_collate, normalize: timm 0.5.4's default loader. Each window starts a
  fresh loader and leaves the first two batches of every worker untimed (start-up: a new process's
  imports, lookup tables and first-touch memory, which train.py pays once an epoch); with 0 workers torch
  runs one thread, as in a DataLoader worker, so rows compare per core. Without --jpeg-dir, 64
  500x375 JPEGs are cut from scikit-learn's two sample photos. The summary's pipeline ratio is the
  geometric mean over the worker counts.
On a CPU shared with other jobs, --threads 1 gives steadier numbers: two OpenMP threads wait for each
other at every parallel region whenever one of them is descheduled. timm is imported only with
--compare-timm.
"""

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import data
import devices
import model as models
import optim
import precision as mixed_precision
import transforms

EMA_DECAY = 0.9999
LABEL_SMOOTHING = 0.1


def get_args_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument('--model', default='efficientnetv2_rw_t')
    p.add_argument('--device', default='auto', choices=('auto', 'cuda', 'npu', 'cpu'))
    p.add_argument('--img-size', type=int, help='step image size; default 96 on the CPU, else 288')
    p.add_argument('-b', '--batch-size', type=int, help='step batch; default 16 on the CPU, else 256')
    p.add_argument('--precision', default='float32', choices=('float32', 'bfloat16', 'float16'))
    p.add_argument(
        '--channels-last',
        nargs='?',
        const='on',
        default='off',
        choices=('off', 'on', 'auto', 'defaults'),
        help="NHWC for both (bare flag: on); auto: train.py's choice for the device, for "
        'both; defaults: ours as train.py defaults, timm NCHW as the ModelZoo runs it',
    )
    p.add_argument('--compile', action='store_true', help='torch.compile the models (not the optimizer)')
    p.add_argument('--warmup', type=int, help='untimed steps first; default 3 on the CPU, else 10')
    p.add_argument(
        '--windows',
        type=int,
        default=9,
        help='timed windows per implementation (with 5, pipeline rows moved 20%% between runs)',
    )
    p.add_argument('--steps', type=int, help='steps per window; default 3 on the CPU, else 10')
    p.add_argument('--step', action=argparse.BooleanOptionalAction, default=True, help='bench the step')
    p.add_argument('--pipeline', action=argparse.BooleanOptionalAction, default=True, help='bench the input pipeline')
    p.add_argument(
        '--memory',
        action=argparse.BooleanOptionalAction,
        default=True,
        help='measure peak memory (on the CPU: one child process per implementation)',
    )
    p.add_argument('--jpeg-dir', help='DIR/train/<class>/*.jpg; made from sample photos if missing')
    p.add_argument('--pipeline-size', type=int, default=288)
    p.add_argument('--pipeline-batch', type=int, default=32)
    p.add_argument('--pipeline-batches', type=int, default=16, help='timed batches per window')
    p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--aa', default='rand-m9-mstd0.5', help='RandAugment spec of the pipeline')
    p.add_argument('--compare-timm', action='store_true')
    p.add_argument('--json', default='bench.json', help='where the results go')
    p.add_argument('--threads', type=int, help="torch's CPU threads; default: torch's choice")
    p.add_argument('--seed', type=int, default=0)
    return p


def resolve_args(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = devices.select_device(args.device, 0)
    on_cpu = args.device.type == 'cpu'
    args.img_size = args.img_size or (96 if on_cpu else 288)
    args.batch_size = args.batch_size or (16 if on_cpu else 256)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_cpu else 10)
    args.steps = args.steps or (3 if on_cpu else 10)
    auto = devices.default_channels_last(args.device)
    ours = {'off': False, 'on': True, 'auto': auto, 'defaults': auto}[args.channels_last]
    args.nhwc = dict(ours=ours, timm=ours if args.channels_last != 'defaults' else False)
    if args.compare_timm:
        try:
            import timm  # noqa: F401
        except ImportError:
            raise SystemExit(
                'error: --compare-timm needs timm: pip install timm (or pip install -r requirements-test.txt)'
            ) from None
    args.impls = ('ours', 'timm') if args.compare_timm else ('ours',)
    return args


# ----------------------------------------------------------------------------------------------
# The training step


def memory_format(impl, args):
    return torch.channels_last if args.nhwc[impl] else torch.contiguous_format


def build_trainer(impl, args, images, labels):
    """Closures by name: 'step' (one training step), 'optimizer' and 'ema' (those parts alone)."""
    torch.manual_seed(args.seed)
    return our_trainer(args, images, labels) if impl == 'ours' else timm_trainer(args, images, labels)


def our_trainer(args, images, labels):
    """train.py's own parts and its train_step (one micro-batch), with the ModelZoo recipe's flags."""
    import flags
    import train

    argv = [
        '--dataset',
        'synthetic',
        '--model',
        args.model,
        '--img-size',
        str(args.img_size),
        '-b',
        str(args.batch_size),
        *'--num-classes 1000 --opt rmsproptf --opt-eps 1e-3 --lr 0.014 --weight-decay 1e-5 --drop 0.3'.split(),
        *'--drop-path 0.2 --model-ema --model-ema-decay'.split(),
        str(EMA_DECAY),
        '--smoothing',
        str(LABEL_SMOOTHING),
        '--device',
        args.device.type,
        '--channels-last' if args.nhwc['ours'] else '--no-channels-last',
    ]
    argv += ['--amp', '--amp-dtype', args.precision] if args.precision != 'float32' else []
    argv += ['--compile'] if args.compile else []
    recipe = flags.resolve_args(flags.get_args_parser().parse_args(argv))
    net = train.build_model(recipe, args.device, num_classes=1000)
    optimizer, _ = train.create_optimizer(net, recipe, steps_per_epoch=1)
    precision, net, optimizer = mixed_precision.create_precision(
        args.device, net, optimizer, recipe.amp, recipe.amp_dtype
    )
    ema = optim.ModelEma(net, recipe.model_ema_decay)
    model = train.distribute(net, args.device, precision, recipe)  # compiled with --compile
    batch = [(images, labels, torch.zeros_like(labels))]
    step = lambda: train.train_step(model, optimizer, precision, batch, recipe, ema)  # noqa: E731
    return dict(step=step, optimizer=optimizer.step, ema=lambda: ema.update_parameters(net))


def timm_trainer(args, images, labels):
    """timm's parts in timm 0.5.4's train loop: its RMSpropTF looping over tensors, ModelEmaV2, the batch
    normalized on the device as its prefetcher does, zero_grad after the forward."""
    import timm
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV2

    net = timm.create_model(args.model, drop_rate=0.3, drop_path_rate=0.2)
    net = net.to(args.device, memory_format=memory_format('timm', args)).train()
    optimizer = create_optimizer_v2(
        net, 'rmsproptf', lr=0.014, weight_decay=1e-5, eps=1e-3, foreach=False
    )  # timm 0.5.4's loop over tensors
    ema = ModelEmaV2(net, decay=EMA_DECAY)
    forward = torch.compile(net) if args.compile else net
    dtype = getattr(torch, args.precision)
    autocast = (lambda: torch.autocast(args.device.type, dtype)) if dtype != torch.float32 else nullcontext
    scaler = torch.amp.GradScaler(args.device.type, enabled=dtype == torch.float16)
    mean = torch.tensor([255 * m for m in models.IMAGENET_MEAN], device=args.device).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in models.IMAGENET_STD], device=args.device).view(1, 3, 1, 1)

    def step():  # timm's prefetcher copies each batch to the device without blocking, then normalizes it
        on_device = images.to(args.device, non_blocking=True)
        targets = labels.to(args.device, non_blocking=True)
        normalized = on_device.to(dtype=torch.float32, memory_format=memory_format('timm', args)).sub_(mean).div_(std)
        with autocast():
            output = forward(normalized)
        loss = F.cross_entropy(output.float(), targets, label_smoothing=LABEL_SMOOTHING)
        optimizer.zero_grad(set_to_none=True)  # timm's train.py: after the forward
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        ema.update(net)

    return dict(step=step, optimizer=optimizer.step, ema=lambda: ema.update(net))


def synthetic_batch(impl, args):
    """A batch of random uint8 images and its labels on the CPU, as the loader hands them over (in page-locked
    memory on an accelerator, as train.py's loader pins them): each step copies them to the device."""
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randint(
        0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, generator=generator
    )
    labels = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    if args.device.type != 'cpu':
        return images.pin_memory(), labels.pin_memory()
    return images, labels


def build_and_warm_up(impl, args, images, labels, steps=None):
    """Build one implementation and run its warm-up steps; on an accelerator also return its peak
    memory (MiB) counted from just before it was built."""
    backend = devices.accelerator_module(args.device)  # torch.cuda, torch.npu: the same memory statistics
    if backend is not None:
        devices.synchronize(args.device)
        backend.reset_peak_memory_stats(args.device)
        base = backend.memory_allocated(args.device)
    trainer = build_trainer(impl, args, images, labels)
    for _ in range(max(args.warmup, 1) if steps is None else steps):
        trainer['step']()
    devices.synchronize(args.device)
    peak = (backend.max_memory_allocated(args.device) - base) / 2**20 if backend is not None else None
    return trainer, peak


def time_interleaved(functions, calls, windows, device):
    """For each name of `functions`, the seconds per call, one per window. The order of the names
    alternates window by window (ABBA), so a drift in machine load hits all of them alike."""
    seconds = {name: [] for name in functions}
    names = list(functions)
    for window in range(windows):
        for name in names if window % 2 == 0 else names[::-1]:
            devices.synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                functions[name]()
            devices.synchronize(device)
            seconds[name].append((time.perf_counter() - start) / calls)
    return seconds


def bench_step(args):
    trainers = {}
    peaks = {}
    for impl in args.impls:
        trainers[impl], peaks[impl] = build_and_warm_up(impl, args, *synthetic_batch(impl, args))
    if args.device.type == 'cpu':
        peaks = args.cpu_peaks
    elif not args.memory:
        peaks = {impl: None for impl in args.impls}
    step = time_interleaved({i: t['step'] for i, t in trainers.items()}, args.steps, args.windows, args.device)
    opt = time_interleaved({i: t['optimizer'] for i, t in trainers.items()}, args.steps, args.windows, args.device)
    ema = time_interleaved({i: t['ema'] for i, t in trainers.items()}, args.steps, args.windows, args.device)
    where = f'{args.img_size} px, batch {args.batch_size}'
    return [
        row(f'train step img/s ({where})', 'img/s', {i: [args.batch_size / s for s in step[i]] for i in step}),
        row('  optimizer step ms', 'ms', {i: [1e3 * s for s in opt[i]] for i in opt}),
        row('  EMA update ms', 'ms', {i: [1e3 * s for s in ema[i]] for i in ema}),
        row('  peak memory MiB', 'MiB', {i: [peaks[i]] for i in peaks}),
    ]


# ----------------------------------------------------------------------------------------------
# Peak memory on the CPU: a forked child per implementation


def status_kib(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise OSError(f'no {field} in /proc/self/status')


def cpu_peak_memories(args):
    """{impl: MiB}: each implementation is built in a child forked from this process before it
    allocated anything big (an allocator that has already served one model would flatter the next).
    The child's VmHWM is reset to its RSS through /proc/self/clear_refs (Linux >= 4.0); the peak is
    the growth of VmHWM over the RSS before the build. None where /proc is missing."""
    import multiprocessing

    if not os.path.exists('/proc/self/clear_refs'):
        return {impl: None for impl in args.impls}
    context = multiprocessing.get_context('fork')
    peaks = {}
    for impl in args.impls:
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_memory_child, args=(impl, args, sender))
        child.start()
        child.join()
        peaks[impl] = receiver.recv() if receiver.poll() else None
    return peaks


def _memory_child(impl, args, sender):
    torch.set_num_threads(1)  # threads are not memory; and OpenMP's pool does not survive a fork
    if impl == 'timm':  # imports are not the model's memory
        import timm.optim  # noqa: F401
        import timm.utils  # noqa: F401
    images, labels = synthetic_batch(impl, args)
    cpu = torch.device('cpu')
    devices.reset_peak_memory(cpu)
    base = status_kib('VmRSS')
    build_and_warm_up(impl, args, images, labels, steps=max(args.warmup, 2))
    sender.send(devices.peak_memory_mib(cpu) - base / 1024)


# ----------------------------------------------------------------------------------------------
# The input pipeline: JPEG files to normalized batches


def make_jpeg_folder(root, count=64, seed=0):
    """root/{train,val}/<class>/*.jpg: `count` 500x375 (or 375x500) JPEGs cut at random from
    scikit-learn's two bundled photos (china.jpg, flower.jpg): real photographs, no download."""
    import importlib.util
    import random

    from PIL import Image

    sklearn_dir = importlib.util.find_spec('sklearn').submodule_search_locations[0]
    photos = [
        Image.open(os.path.join(sklearn_dir, 'datasets', 'images', name)).convert('RGB')
        for name in ('china.jpg', 'flower.jpg')
    ]  # 640x427 each; importing sklearn takes seconds
    rng = random.Random(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        width = rng.randint(320, 640)
        height = rng.randint(240, 427)
        left = rng.randint(0, 640 - width)
        top = rng.randint(0, 427 - height)
        size = (500, 375) if i % 4 else (375, 500)
        crop = photo.crop((left, top, left + width, top + height)).resize(size, Image.BICUBIC)
        for split in ('train', 'val') if i < 4 else ('train',):
            folder = os.path.join(root, split, f'class_{i % 2}')
            os.makedirs(folder, exist_ok=True)
            crop.save(os.path.join(folder, f'{i:03d}.jpg'), quality=90)
    return root


def our_batches(samples, args, workers):
    root = os.path.commonpath([path for path, _ in samples])
    dataset = data.ImageFolder(
        root, [os.path.relpath(path, root) for path, _ in samples], [label for _, label in samples]
    )
    transform = transforms.train_transform(
        args.pipeline_size, aa=args.aa, interpolation='bicubic', mean=models.IMAGENET_MEAN
    )
    sampler = data.EpochBatchSampler(len(dataset), args.pipeline_batch, shuffle=True, seed=args.seed, drop_last=True)
    for images, _, _ in data.create_loader(data.Transformed(dataset, transform), sampler, workers=workers):
        yield transforms.normalize(images.to(args.device), models.IMAGENET_MEAN, models.IMAGENET_STD)


class PilImages(torch.utils.data.Dataset):
    """timm 0.5.4's ImageDataset: PIL decode, convert('RGB'), the transform."""

    def __init__(self, samples, transform):
        self.samples = samples
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        from PIL import Image

        path, label = self.samples[index]
        with open(path, 'rb') as f:
            image = Image.open(f).convert('RGB')
        return self.transform(image), label


def timm_batches(samples, args, workers):
    from timm.data import create_transform
    from timm.data.loader import fast_collate

    transform = create_transform(
        args.pipeline_size, is_training=True, auto_augment=args.aa, interpolation='bicubic', use_prefetcher=True
    )
    loader = torch.utils.data.DataLoader(
        PilImages(samples, transform),
        batch_size=args.pipeline_batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        collate_fn=fast_collate,
        prefetch_factor=2 if workers else None,
    )
    mean = torch.tensor([255 * m for m in models.IMAGENET_MEAN], device=args.device).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in models.IMAGENET_STD], device=args.device).view(1, 3, 1, 1)
    for images, _ in loader:  # timm's PrefetchLoader: normalize on the device
        yield images.to(args.device).float().sub_(mean).div_(std)


def time_pipeline_window(batches, warmup, timed, device):
    """Seconds per image over `timed` batches after `warmup` untimed ones (worker start-up)."""
    for _ in range(warmup):
        next(batches)
    devices.synchronize(device)
    start = time.perf_counter()
    images = 0
    for _ in range(timed):
        images += next(batches).shape[0]
    devices.synchronize(device)
    batches.close()  # shuts the loader's workers down before the next window starts
    return (time.perf_counter() - start) / images


def bench_pipeline(args):
    """One row per worker count; the JPEGs come from --jpeg-dir or a temporary folder."""
    folder = nullcontext(args.jpeg_dir) if args.jpeg_dir else tempfile.TemporaryDirectory(prefix='bench-jpegs-')
    threads = torch.get_num_threads()
    rows = []
    with folder as root:
        if not os.path.isdir(os.path.join(root, 'train')):
            make_jpeg_folder(root, seed=args.seed)
        found = data.load_datasets('folder', root)[0]
        files = [(found.path(index), int(found.labels[index])) for index in range(len(found))]
        needed = (untimed_batches(max(args.workers)) + args.pipeline_batches) * args.pipeline_batch
        samples = files * math.ceil(needed / len(files))  # every window reads distinct batches
        torch.set_num_threads(1)
        try:
            rows = [bench_pipeline_workers(samples, args, workers) for workers in args.workers]
        finally:
            torch.set_num_threads(threads)
    return rows


def untimed_batches(workers):
    return 2 * max(workers, 1)  # every worker delivers twice before the clock starts: start-up is not timed


def bench_pipeline_workers(samples, args, workers):
    makers = dict(ours=our_batches, timm=timm_batches)
    seconds = {impl: [] for impl in args.impls}
    for window in range(args.windows):
        for impl in args.impls if window % 2 == 0 else args.impls[::-1]:
            batches = makers[impl](samples, args, workers)
            seconds[impl].append(
                time_pipeline_window(batches, untimed_batches(workers), args.pipeline_batches, args.device)
            )
    name = f'pipeline img/s ({args.pipeline_size} px, {workers} worker{"s" * (workers != 1)})'
    return row(name, 'img/s', {impl: [1 / s for s in seconds[impl]] for impl in seconds})


# ----------------------------------------------------------------------------------------------
# Results


def row(name, unit, values):
    """One table row: the median of each implementation's windows, and ours/timm."""
    medians = {impl: statistics.median(v) if v and None not in v else None for impl, v in values.items()}
    ours = medians.get('ours')
    timm_value = medians.get('timm')
    ratio = ours / timm_value if ours is not None and timm_value else None
    return dict(name=name, unit=unit, ours=ours, timm=timm_value, ratio=ratio, windows=values)


def environment(args):
    device = args.device
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()
    versions = dict(python=platform.python_version(), torch=torch.__version__)
    if args.compare_timm:
        import timm

        versions['timm'] = timm.__version__
    return dict(
        device=str(device),
        device_name=name or platform.machine(),
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        date=time.strftime('%Y-%m-%d %H:%M'),
        **versions,
    )


def print_table(args, rows, env):
    fmt = lambda v: '-' if v is None else f'{v:.2f}' if v < 100 else f'{v:.0f}'  # noqa: E731
    print(
        f'\n{args.model} on {env["device"]} ({env["device_name"]}, {env["cpus"]} CPUs, '
        f'{env["torch_threads"]} torch threads), torch {env["torch"]}'
        + (f', timm {env["timm"]}' if 'timm' in env else '')
        + f', {env["date"]}'
    )
    formats = {impl: 'channels_last' if args.nhwc[impl] else 'NCHW' for impl in args.impls}
    layout = (
        formats['ours']
        if len(set(formats.values())) == 1
        else ', '.join(f'{impl} {layout}' for impl, layout in formats.items())
    )
    print(
        f'step: {args.precision}, {layout}, {"compiled" if args.compile else "eager"}; median of {args.windows} windows'
    )
    print(f'{"measurement":<44}{"ours":>10}{"timm":>10}{"ours/timm":>11}')
    for r in rows:
        print(f'{r["name"]:<44}{fmt(r["ours"]):>10}{fmt(r["timm"]):>10}{fmt(r["ratio"]):>11}')


def summarize(rows):
    """The step's ratio, and the geometric mean of the pipeline's ratios over worker counts."""
    step = next((r['ratio'] for r in rows if r['name'].startswith('train step')), None)
    ratios = [r['ratio'] for r in rows if r['name'].startswith('pipeline') and r['ratio']]
    pipeline = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
    return dict(step=step, pipeline=pipeline)


def report(args, rows, env):
    print_table(args, rows, env)
    summary = summarize(rows)
    config = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items() if k != 'cpu_peaks'}
    with open(args.json, 'w') as f:
        json.dump(dict(config=config, environment=env, rows=rows, summary=summary), f, indent=1)
    print(f'results written to {args.json}')
    as_text = lambda v: 'n/a' if v is None else f'{v:.2f}'  # noqa: E731
    print(
        f'summary: step ours/timm {as_text(summary["step"])}, pipeline ours/timm {as_text(summary["pipeline"])}',
        flush=True,
    )


def main(argv=None):
    args = resolve_args(get_args_parser().parse_args(argv))
    if args.step and args.device.type == 'cpu':  # first, while this process is small
        args.cpu_peaks = cpu_peak_memories(args) if args.memory else dict.fromkeys(args.impls)
    if args.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: what timm's train.py and ours do
    rows = []
    if args.pipeline:  # first, while the process is small: forking workers is cheap
        rows += bench_pipeline(args)
    if args.step:
        rows = bench_step(args) + rows
    report(args, rows, environment(args))


if __name__ == '__main__':
    main()
