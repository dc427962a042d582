"""Train EfficientNetV2 with the seed's recipe (timm 0.5.4's train.py semantics), 1 to N devices.

    python train.py                                   # zero-setup demo: digits on the CPU
    python train.py /data/imagenet --model efficientnetv2_rw_t -b 256 --sched step --epochs 350 \
        --decay-epochs 2.4 --decay-rate .97 --opt rmsproptf --opt-eps .001 -j 8 --warmup-lr 4e-6 \
        --weight-decay 1e-5 --drop 0.3 --drop-connect 0.2 --aa rand-m9-mstd0.5 --lr .014 \
        --log-interval 1 --img-size 288 --apex-amp --model-ema --model-ema-decay 0.9999 --mixup 0.2
    torchrun --nproc_per_node=8 train.py /data/imagenet ... --lr .112     # 1 node x 8 devices
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
        train.py /data/imagenet ... --lr .224         # 2 nodes: the same on HOST1 with --node_rank=1
    python -m torch.distributed.launch --nproc_per_node=8 train.py ...   # the seed's launcher
    bash test/train_full_8p.sh --data_path=/data/imagenet    # the seed's scripts: see the README

`-b` is per device and logged images/s are global; the seed's lr is .014 per 256 images. A launcher's
environment (WORLD_SIZE) turns on distributed mode; --device auto picks cuda (nccl), npu (hccl, with
torch_npu) or cpu (gloo). Rank 0 logs and writes checkpoints to --output (put it where every node can
read it, to resume). When one process fails, all stop, and its error is printed once, with its rank.
Bad input ends with a one-line `error:` message and exit status 2.
"""
import argparse
import glob
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import model as models
import utils

# The zero-setup demo (python train.py): the smallest variant, AdamW, 15 epochs at 32 px; measured on
# this project's 2-core CPU in README, Training (10 epochs reached 95.8%, too close to the 95% promised).
DEMO_DEFAULTS = dict(model='tf_efficientnetv2_b0', img_size=32, batch_size=64, epochs=15, opt='adamw',
                     lr=2e-3, sched='cosine', warmup_epochs=0, weight_decay=0.05, min_lr=1e-5,
                     scale=(0.5, 1.0), hflip=0.0, color_jitter=0.0, log_interval=10, workers=0,
                     model_ema_decay=0.99, prog_min_size=24)
# `python train.py --progressive`: stages at 26, 28, 30, 32 px (from 16, a network trained at 20 px was
# at chance evaluated at 32) and 30 epochs: with 15, the epochs at smaller sizes left it at 94.2-95.8%.
DEMO_PROGRESSIVE = dict(epochs=30)
# timm 0.5.4's defaults for everything the user leaves unset on a real dataset.
TIMM_DEFAULTS = dict(model='efficientnetv2_rw_t', batch_size=128, epochs=300, opt='sgd', lr=0.05, sched='cosine',
                     warmup_epochs=3, weight_decay=2e-5, min_lr=1e-6, scale=(0.08, 1.0), hflip=0.5,
                     color_jitter=0.4, log_interval=50, workers=4, model_ema_decay=0.9998, prog_min_size=128)
MIN_IMAGE_SIZE = 32       # the network's total stride
AVERAGE_AFTER_STEP = 3    # leave warm-up steps out of the running images/s, as the seed's parser wants
NONFINITE_LIMIT = 5       # consecutive non-finite losses before we stop
SIGNAL_REPEAT_SECONDS = 2  # a SIGTERM/SIGINT this soon after the first repeats it (a relay)
# Fault injection for test/test_distributed.py: the process of this rank raises after its first step.
FAIL_RANK = int(os.environ.get('EFFNET_FAIL_RANK', -1))
# Fault injection for test/test_bad_data.py: these optimizer steps (1-based) get an infinite loss.
INF_LOSS_STEPS = {int(s) for s in os.environ.get('EFFNET_INF_LOSS_STEPS', '').split(',') if s}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data_dir', nargs='?', help='ImageFolder root holding train/ and val/ (timm style)')
    p.add_argument('--data-path', '--data_path', '--data-dir', dest='data_path')
    p.add_argument('--dataset', choices=data.DATASETS,
                   help='default: folder when a data path is given, else the digits demo')
    p.add_argument('--model', help='default: efficientnetv2_rw_t (the seed); the digits demo: '
                   'tf_efficientnetv2_b0')
    p.add_argument('--num-classes', type=int, help='default: from the data')
    p.add_argument('--pretrained', metavar='PATH', help='timm / torchvision / own weights to start from')
    p.add_argument('--img-size', type=int, help='train and eval size; default: the model\'s train size')
    p.add_argument('--crop-pct', type=float, help='eval resize = img_size / crop_pct')
    p.add_argument('--interpolation', choices=('bilinear', 'bicubic'))
    p.add_argument('--scale', type=float, nargs=2, help='RandomResizedCrop area range')
    p.add_argument('--ratio', type=float, nargs=2, default=(3 / 4, 4 / 3))
    p.add_argument('--hflip', type=float)
    p.add_argument('--aa', help="RandAugment, timm grammar, e.g. rand-m9-mstd0.5")
    p.add_argument('--color-jitter', type=float, help='colour jitter factor, used without --aa (timm: 0.4)')
    p.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    p.add_argument('--mixup', type=float, default=0.0)
    p.add_argument('--cutmix', type=float, default=0.0)
    p.add_argument('--smoothing', type=float, default=0.1)
    p.add_argument('--drop', type=float, default=0.0, help='classifier dropout')
    p.add_argument('--drop-path', '--drop-connect', dest='drop_path', type=float, default=0.0)
    p.add_argument('-b', '--batch-size', type=int, help='per device')
    p.add_argument('--epochs', type=int)
    p.add_argument('--opt', choices=('rmsproptf', 'sgd', 'adamw'))
    p.add_argument('--opt-eps', type=float)
    p.add_argument('--momentum', type=float, default=0.9)
    p.add_argument('--weight-decay', type=float)
    p.add_argument('--clip-grad', type=float, help='max gradient norm')
    p.add_argument('--sched', choices=('step', 'cosine', 'const'))
    p.add_argument('--lr', type=float)
    p.add_argument('--warmup-lr', type=float, default=1e-4)
    p.add_argument('--warmup-epochs', type=int)
    p.add_argument('--min-lr', type=float)
    p.add_argument('--decay-epochs', type=float, default=100)
    p.add_argument('--decay-rate', type=float, default=0.1)
    p.add_argument('--model-ema', action='store_true')
    p.add_argument('--model-ema-decay', type=float)
    p.add_argument('--amp', action='store_true', help='native mixed precision')
    p.add_argument('--amp-dtype', choices=('float16', 'bfloat16'))
    p.add_argument('--apex-amp', action='store_true', help='NVIDIA apex if importable, else --amp')
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction,
                   help='NHWC activations; default: on for CUDA and the CPU (faster there: '
                        '+30%% on GPUs, 1.2-1.6x on a 2-core CPU, see README), off for the NPU')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the model (the first steps compile; checkpoints unchanged)')
    p.add_argument('--sync-bn', action='store_true', help='BN batch statistics over all devices')
    p.add_argument('--freeze-bn', action='store_true',
                   help='BN normalizes with its running statistics and keeps them; scale and shift '
                        'still train (fine-tuning with small per-device batches)')
    p.add_argument('--device', default='auto', choices=('auto', 'cuda', 'npu', 'cpu'),
                   help='auto: cuda, else npu (if torch_npu is installed), else cpu')
    p.add_argument('--dist-timeout', type=float, default=30,
                   help='minutes a process waits for the others in a collective before failing')
    p.add_argument('-j', '--workers', type=int)
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--log-interval', type=int)
    p.add_argument('--perf-steps', type=int, default=0, help='stop after N steps, no validation')
    p.add_argument('--output', help='run folder; default output/train/<time>-<model>-<size>')
    p.add_argument('--resume', metavar='PATH|auto', help='continue a run; auto: newest in --output')
    p.add_argument('--checkpoint-interval', type=int, default=0, help='also save every N steps')
    p.add_argument('--checkpoint-hist', type=int, default=0, help='keep the last K epoch files')
    p.add_argument('--evaluate', action='store_true', help='validate --resume/--pretrained only')
    p.add_argument('--strict-data', action='store_true', help='unreadable images are errors')
    p.add_argument('--progressive', action='store_true', help='the paper\'s progressive learning')
    p.add_argument('--prog-stages', type=int, default=4)
    p.add_argument('--prog-min-size', type=int)
    p.add_argument('--prog-min-aa', type=float, default=5.0)
    p.add_argument('--prog-min-drop', type=float, default=0.1)
    p.add_argument('--local-rank', '--local_rank', dest='local_rank', type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by torch.distributed.launch; env wins
    return p


def resolve_args(args):
    """Fill unset flags (demo or timm defaults, the model's config) and reject bad values."""
    args.data_path = args.data_path or args.data_dir
    args.img_size_given = args.img_size is not None
    if args.dataset is None:
        args.dataset = 'folder' if args.data_path else 'digits'
    defaults = DEMO_DEFAULTS if args.dataset == 'digits' else TIMM_DEFAULTS
    if args.dataset == 'digits' and args.progressive:
        defaults = {**defaults, **DEMO_PROGRESSIVE}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model not in models.VARIANTS:
        try:
            models.create_model(args.model)
        except ValueError as e:  # names the close matches
            raise utils.UsageError(str(e)) from None
    config = models.VARIANTS[args.model]['config']
    # Progressive learning trains up to the train size and evaluates at the model's test size,
    # unless a size was chosen (on the command line, or by the demo's defaults).
    size_chosen = args.img_size is not None
    args.img_size = args.img_size or config['train_size']
    args.eval_size = config['test_size'] if args.progressive and not size_chosen else args.img_size
    args.crop_pct = args.crop_pct or config['crop_pct']
    args.interpolation = args.interpolation or config['interpolation']
    args.mean, args.std = config['mean'], config['std']
    args.apex_amp_used = False
    for name in ('batch_size', 'epochs', 'workers', 'log_interval', 'prog_stages'):
        if getattr(args, name) < (0 if name == 'workers' else 1):
            raise utils.UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.img_size < MIN_IMAGE_SIZE:
        raise utils.UsageError(f"--img-size {args.img_size} is below the minimum of {MIN_IMAGE_SIZE}")
    if args.progressive and not 0 < args.prog_min_size <= args.img_size:
        raise utils.UsageError(f"--prog-min-size {args.prog_min_size} must be between 1 and --img-size "
                               f"{args.img_size}; give a smaller --prog-min-size")
    if args.aa:
        data.parse_rand_augment(args.aa)  # raises DataError with a one-line message
    if args.color_jitter < 0:
        raise utils.UsageError(f"--color-jitter must be 0 or more, got {args.color_jitter}")
    if args.evaluate and not (args.resume or args.pretrained):
        raise utils.UsageError("--evaluate needs a checkpoint: give --resume PATH or --pretrained PATH")
    if args.resume == 'auto' and not args.output:
        raise utils.UsageError("--resume auto needs --output DIR (the run folder to continue)")
    args.device = utils.device_type(args.device)  # 'auto' resolved, recorded in args.yaml
    if args.sync_bn and args.device == 'cpu':
        raise utils.UsageError("--sync-bn needs GPUs or NPUs: torch's SyncBatchNorm does not run on "
                               "the CPU (BN statistics are still averaged across ranks before eval)")
    return args


# ----------------------------------------------------------------------------------------------
# Set-up

def setup(args):
    """Processes, device, data, model, optimizer, EMA, precision: everything a step needs."""
    rank, world_size, local_rank = utils.distributed_env()
    device = utils.select_device(args.device, local_rank)
    if world_size > 1:
        utils.init_distributed(device, timeout_minutes=args.dist_timeout)
    is_main = rank == 0
    torch.manual_seed(args.seed)

    train_set, val_set, classes = data.load_datasets(
        args.dataset, args.data_path, strict_data=args.strict_data, synthetic_size=args.img_size,
        num_classes=args.num_classes)
    args.num_classes = args.num_classes or len(classes)
    net = models.create_model(args.model, num_classes=args.num_classes, drop_rate=args.drop,
                              drop_path_rate=args.drop_path)
    if args.pretrained:
        models.load_pretrained(net, args.pretrained)
    if args.sync_bn and world_size > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if args.channels_last is None:
        args.channels_last = utils.default_channels_last(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=memory_format)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once (timm too)
    optimizer = utils.create_optimizer(args.opt, net, args.lr, args.weight_decay, args.momentum,
                                       args.opt_eps)
    amp, amp_dtype, optimizer, net = setup_precision(args, device, net, optimizer, is_main)
    ema = utils.ModelEma(net, args.model_ema_decay) if args.model_ema else None
    ddp = net
    if world_size > 1:
        ids = [device.index] if device.type in ('cuda', 'npu') else None
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    if args.compile:
        if args.apex_amp_used:
            raise utils.UsageError("--compile does not work with apex's patched functions; use --amp")
        # Only the training forward/backward is compiled. `net` stays the plain module: EMA,
        # evaluation and checkpoints use it (no `_orig_mod.` in saved keys).
        # Static shapes: --progressive then recompiles once per stage, for its image size, rather
        # than switching to a slower dynamic-shape graph at the first change of size.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   args.prog_stages + 1)
        ddp = torch.compile(ddp, dynamic=False)
    if rank > 0:  # same initial weights above; from here on dropout, drop path, mixup and random
        # erasing draw per rank (timm seeds seed + rank), or the ranks would repeat one another
        torch.manual_seed(data.mix_seed(args.seed, rank))
    return SimpleNamespace(
        args=args, rank=rank, world_size=world_size, is_main=is_main, device=device, model=net,
        ddp=ddp, ema=ema, optimizer=optimizer, memory_format=memory_format,
        autocast=(lambda: torch.autocast(device.type, amp_dtype)) if amp else nullcontext,
        scaler=torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16),
        train_set=train_set, val_set=val_set, classes=classes, epoch=0, step=0, num_updates=0,
        best_metric=None, best_epoch=None, loss_sum=0.0, loss_count=0, bad_images=0,
        nonfinite=torch.zeros((), device=device, dtype=torch.long), stop_signal=None,
        draw_curves=is_main)


def setup_precision(args, device, net, optimizer, is_main):
    """--apex-amp uses NVIDIA apex O1 where it imports; otherwise (and for --amp) native autocast.
    float16 gets a GradScaler; bfloat16 needs none. The CPU autocasts to bfloat16 by default."""
    amp = args.amp or args.apex_amp
    default_dtype = 'bfloat16' if device.type == 'cpu' else 'float16'
    amp_dtype = getattr(torch, args.amp_dtype or default_dtype)
    if args.apex_amp and device.type != 'cpu':
        try:
            from apex import amp as apex_amp
            net, optimizer = apex_amp.initialize(net, optimizer, opt_level='O1')
            args.apex_amp_used = True
            return False, amp_dtype, optimizer, net
        except ImportError:
            pass
    if args.apex_amp and is_main:
        print(f"--apex-amp: NVIDIA apex is not available here; using native mixed precision "
              f"({str(amp_dtype).replace('torch.', '')})", flush=True)
    return amp, amp_dtype, optimizer, net


def stage_settings(args, epoch):
    """What the epoch trains with. Without --progressive: the flags. With it, the paper's
    progressive learning: image size, RandAugment magnitude, mixup and dropout rise by stage."""
    base = dict(stage=0, size=args.img_size, magnitude=None, mixup=args.mixup, drop=args.drop,
                epochs=(0, args.epochs - 1))
    if args.aa:
        base['magnitude'] = data.parse_rand_augment(args.aa)['magnitude']
    if not args.progressive:
        return base
    stages = args.prog_stages
    stage_of = lambda e: min(e * stages // args.epochs, stages - 1)  # noqa: E731
    stage = stage_of(epoch)  # a pure function of the epoch: resuming needs nothing else
    in_stage = [e for e in range(args.epochs) if stage_of(e) == stage]
    # The size's first stage is already a step up from the minimum (REFERENCE §4: S 171 ... 300);
    # the others start at their minimum and reach the flag's value in the last stage.
    size = args.prog_min_size + (args.img_size - args.prog_min_size) * (stage + 1) // stages
    ratio = stage / max(stages - 1, 1)
    lerp = lambda low, high: low + (high - low) * ratio  # noqa: E731
    magnitude = base['magnitude']
    if args.aa:  # a minimum above the flag's value is capped to it: regularization never falls
        magnitude = lerp(min(args.prog_min_aa, magnitude), magnitude)
    return dict(stage=stage, size=size, magnitude=magnitude, mixup=lerp(0.0, args.mixup),
                drop=lerp(min(args.prog_min_drop, args.drop), args.drop),
                epochs=(in_stage[0], in_stage[-1]))


def make_train_loader(run, settings, epoch, start_batch):
    args = run.args
    transform = data.train_transform(
        settings['size'], scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
        aa=args.aa, interpolation=args.interpolation, mean=args.mean, color_jitter=args.color_jitter)
    if transform.rand_augment is not None:  # progressive learning: the stage's magnitude
        transform.rand_augment.magnitude = settings['magnitude']
    run.train_set.transform = transform
    sampler = data.EpochBatchSampler(len(run.train_set), args.batch_size, shuffle=True,
                                     seed=args.seed, rank=run.rank, world_size=run.world_size,
                                     drop_last=True)
    sampler.set_epoch(epoch, start_batch)
    return data.create_loader(run.train_set, sampler, workers=args.workers,
                              pin_memory=run.device.type == 'cuda'), len(sampler)


def make_val_loader(run, size):
    args = run.args
    run.val_set.transform = data.eval_transform(size, crop_pct=args.crop_pct,
                                                interpolation=args.interpolation)
    sampler = data.EpochBatchSampler(len(run.val_set), args.batch_size, shuffle=False,
                                     rank=run.rank, world_size=run.world_size, drop_last=False)
    return data.create_loader(run.val_set, sampler, workers=args.workers,
                              pin_memory=run.device.type == 'cuda')


def to_device(run, images):
    images = images.to(run.device, non_blocking=True)
    return data.normalize(images, run.args.mean, run.args.std,
                          channels_last=run.memory_format == torch.channels_last)


# ----------------------------------------------------------------------------------------------
# Training

def train_one_epoch(run, epoch, settings, loader, num_batches, start_batch):
    args, log = run.args, run.is_main
    mixup = data.mixup_cutmix(settings['mixup'], args.cutmix, args.smoothing, args.num_classes)
    run.model.drop_rate = settings['drop']
    run.ddp.train()
    if args.freeze_bn:  # eval mode: normalize with the running statistics, leave them unchanged
        for module in run.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    step_time, data_time = utils.AverageMeter(), utils.AverageMeter()
    images_per_sec = 0.0
    # Summed on the device (no sync per step), in float32 from the checkpoint's partial sum: a
    # resumed epoch adds the same numbers in the same order as an uninterrupted one.
    loss_sum = torch.tensor(run.loss_sum, device=run.device)
    bad_images, last_log, steps_since_log = run.bad_images, time.perf_counter(), 0
    data_start = time.perf_counter()
    for batch_idx, (images, labels, bad) in enumerate(loader, start=start_batch):
        data_time.update(time.perf_counter() - data_start)
        bad_images += int(bad.sum())
        loss, skipped = train_step(run, images, labels, mixup)
        if run.rank == FAIL_RANK:
            raise RuntimeError(f"EFFNET_FAIL_RANK={FAIL_RANK}: failure injected after step {run.step + 1}")
        # The global batch's loss: every rank logs, sums and checks the same number, so all of
        # them stop together on a non-finite loss (an all-reduce of one number, no host sync).
        loss = utils.all_reduce_mean(loss.detach().float(), run.world_size)
        loss_sum += loss
        if not skipped:  # a step fp16's GradScaler skipped left the weights alone: it does not count
            run.nonfinite = (run.nonfinite + 1) * (~torch.isfinite(loss))
        run.step, steps_since_log = batch_idx + 1, steps_since_log + 1
        last_batch = batch_idx == num_batches - 1
        perf_done = args.perf_steps and run.num_updates >= args.perf_steps
        if last_batch or perf_done or batch_idx % args.log_interval == 0:
            utils.synchronize(run.device)
            now = time.perf_counter()
            seconds = (now - last_log) / steps_since_log
            last_log, steps_in_interval, steps_since_log = now, steps_since_log, 0
            global_batch = images.shape[0] * run.world_size
            if batch_idx - start_batch >= AVERAGE_AFTER_STEP:
                step_time.update(seconds, steps_in_interval)
            average = step_time.avg if step_time.count else seconds
            loss_now = loss.item()
            if log:
                avg_loss = float(loss_sum) / (run.loss_count + batch_idx - start_batch + 1)
                print(f"Train: {epoch} [{batch_idx:>4d}/{num_batches} "
                      f"({100.0 * batch_idx / max(num_batches - 1, 1):>3.0f}%)]  "
                      f"Loss: {loss_now:#.4g} ({avg_loss:#.3g})  "
                      f"Time: {seconds:.3f}s, {global_batch / seconds:>7.2f}/s  "
                      f"({average:.3f}s, {global_batch / average:>7.2f}/s)  "
                      f"LR: {run.optimizer.param_groups[0]['lr']:.3e}  "
                      f"Data: {data_time.val:.3f} ({data_time.avg:.3f})", flush=True)
            images_per_sec = global_batch / average
            check_finite(run)
        if stop_requested(run, at_log_step=steps_since_log == 0):
            break
        if args.checkpoint_interval and run.step % args.checkpoint_interval == 0 and not last_batch:
            save_mid_epoch(run, epoch, float(loss_sum), run.loss_count + batch_idx - start_batch + 1,
                           bad_images)
        if perf_done:
            break
        data_start = time.perf_counter()
    steps = run.step - start_batch if run.step > start_batch else 0
    check_finite(run)
    total_steps = run.loss_count + steps
    return dict(train_loss=float(loss_sum) / max(total_steps, 1), images_per_sec=images_per_sec,
                bad_images=bad_images, loss_sum=float(loss_sum), loss_count=total_steps)


def train_step(run, images, labels, mixup):
    args = run.args
    # Free the last step's gradients before this forward builds its activations: a lower peak.
    run.optimizer.zero_grad(set_to_none=True)
    images, labels = to_device(run, images), labels.to(run.device, non_blocking=True)
    targets = labels
    if mixup is not None:
        images, targets = mixup(images, labels)
    if args.reprob > 0:
        images = data.random_erase(images, args.reprob)
    with run.autocast():
        output = run.ddp(images)
    if targets.ndim == 2:  # soft targets from mixup/cutmix already hold the label smoothing
        loss = F.cross_entropy(output.float(), targets)
    else:
        loss = F.cross_entropy(output.float(), targets, label_smoothing=args.smoothing)
    if run.num_updates + 1 in INF_LOSS_STEPS:
        loss = loss * float('inf')
    if args.apex_amp_used:
        from apex import amp as apex_amp
        with apex_amp.scale_loss(loss, run.optimizer) as scaled_loss:
            scaled_loss.backward()
    else:
        run.scaler.scale(loss).backward()
    if args.clip_grad:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.clip_grad)
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
    run.scaler.step(run.optimizer)
    run.scaler.update()
    # fp16's GradScaler skips a step with non-finite gradients and halves its scale (it syncs to
    # decide, so reading the scale costs nothing more); bf16 and fp32 have no scaler and no skips.
    skipped = scale is not None and run.scaler.get_scale() < scale
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    run.num_updates += 1
    return loss, skipped


def check_finite(run):
    """Stop after NONFINITE_LIMIT consecutive non-finite losses (the streak runs across epochs).
    Returns whether the last step's loss was finite: checkpoints are only written when it was."""
    streak = int(run.nonfinite)
    if streak >= NONFINITE_LIMIT:
        raise FloatingPointError(
            f"the loss was not finite for {streak} consecutive steps (epoch {run.epoch}, step "
            f"{run.step}); lower --lr or use --clip-grad; the last good checkpoint is kept")
    return streak == 0


# ----------------------------------------------------------------------------------------------
# Validation: every image counted exactly once, whatever the world size

@torch.no_grad()
def validate(run, net, loader, suffix=''):
    net.eval()
    totals = torch.zeros(4, device=run.device, dtype=torch.float64)  # loss, top1, top5, count
    num_batches, timer = len(loader), time.perf_counter()
    for batch_idx, (images, labels, _) in enumerate(loader):
        images, labels = to_device(run, images), labels.to(run.device)
        with run.autocast():
            output = net(images)
        loss = F.cross_entropy(output.float(), labels, reduction='sum')
        hits = utils.accuracy(output, labels)
        totals += torch.stack([loss.double(), *hits.double(), torch.tensor(
            labels.shape[0], device=run.device, dtype=torch.float64)])
        if run.is_main and (batch_idx % run.args.log_interval == 0 or batch_idx == num_batches - 1):
            n = max(totals[3].item(), 1)
            print(f"Test{suffix}: [{batch_idx:>4d}/{num_batches - 1}]  "
                  f"Time: {time.perf_counter() - timer:.3f}  Loss: {totals[0].item() / n:>6.4f}  "
                  f"Acc@1: {100 * totals[1].item() / n:>7.4f}  "
                  f"Acc@5: {100 * totals[2].item() / n:>7.4f}", flush=True)
    utils.all_reduce_sum(totals)
    loss, top1, top5, count = totals.tolist()
    return dict(loss=loss / count, top1=100 * top1 / count, top5=100 * top5 / count)


# ----------------------------------------------------------------------------------------------
# Checkpoints, summary, signals

def rank_states(run):
    """What differs between ranks and decides their future, in rank order: random streams and,
    with several processes, BatchNorm running statistics (DDP broadcasts rank 0's before each
    forward, each rank then updates its copy with its own batch; the EMA's copies are never
    broadcast). A collective: every rank calls it at a save."""
    state = dict(rng=utils.rng_state())
    if run.world_size == 1:
        return [state]
    state['buffers'] = {name: b.cpu() for name, b in run.model.named_buffers()}
    if run.ema is not None:
        state['ema_buffers'] = {name: b.cpu() for name, b in run.ema.module.named_buffers()}
    states = [None] * run.world_size
    dist.all_gather_object(states, state)
    return states


def checkpoint_state(run, epoch, step, ranks, loss_sum=0.0, loss_count=0, bad_images=0):
    """Everything that decides the rest of the run, as tensors and plain Python types; `ranks` is
    rank_states(). Mid-epoch (step > 0) it also holds the epoch so far: the float32 loss sum of
    its `step` batches and the bad images met, so the epoch's summary row comes out the same."""
    return dict(
        model=run.model.state_dict(), model_ema=run.ema.module.state_dict() if run.ema else None,
        optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(), epoch=epoch,
        step=step, num_updates=run.num_updates, best_metric=run.best_metric,
        best_epoch=run.best_epoch, loss_sum=loss_sum, loss_count=loss_count,
        bad_images=bad_images, ranks=ranks, arch=run.args.model,
        num_classes=run.args.num_classes, classes=list(run.classes), args=plain_args(run.args))


def plain_args(args):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def save_mid_epoch(run, epoch, loss_sum, loss_count, bad_images):
    # Every rank checks (the loss is all-reduced, so all of them stop together); after a
    # non-finite loss the weights are not worth keeping and the last good checkpoint stays.
    if not check_finite(run):
        return
    ranks = rank_states(run)
    if run.is_main:
        state = checkpoint_state(run, epoch, run.step, ranks, loss_sum, loss_count, bad_images)
        utils.atomic_save(state, os.path.join(run.args.output, 'last.pth.tar'))


# Flags that do not change what the run computes: they may differ on resume without a warning.
RESUME_FREE_ARGS = {'data_dir', 'data_path', 'output', 'resume', 'workers', 'log_interval',
                    'device', 'checkpoint_interval', 'checkpoint_hist', 'dist_timeout',
                    'local_rank', 'evaluate', 'perf_steps', 'pretrained', 'strict_data',
                    'apex_amp_used', 'img_size_given'}
RESUME_KEYS = ('model', 'optimizer', 'scaler', 'epoch', 'step', 'num_updates', 'best_metric',
               'best_epoch', 'loss_sum', 'loss_count', 'ranks', 'arch', 'num_classes')


def load_resume(run, path):
    checkpoint = models.read_checkpoint(path)
    is_dict = isinstance(checkpoint, dict)
    missing = [key for key in RESUME_KEYS if key not in checkpoint] if is_dict else ['state']
    if missing:
        raise models.CheckpointError(f"{path} is not a train.py checkpoint (no "
                                     f"{', '.join(missing[:3])}); to start from its weights use "
                                     f"--pretrained {path}")
    if checkpoint['arch'] != run.args.model or checkpoint['num_classes'] != run.args.num_classes:
        raise utils.UsageError(f"{path} holds {checkpoint['arch']} with {checkpoint['num_classes']} "
                               f"classes, this run is {run.args.model} with {run.args.num_classes}; "
                               f"resume with --model {checkpoint['arch']} and the same data, or "
                               f"choose another --output")
    saved_args = checkpoint.get('args') or {}
    if saved_args.get('opt', run.args.opt) != run.args.opt:
        raise utils.UsageError(f"{path} holds {saved_args['opt']} optimizer state, this run uses "
                               f"--opt {run.args.opt}; resume with --opt {saved_args['opt']}, or "
                               f"start from its weights with --pretrained {path}")
    changed = [f"{key} {value!r} (checkpoint: {saved_args[key]!r})"
               for key, value in plain_args(run.args).items()
               if key in saved_args and key not in RESUME_FREE_ARGS and saved_args[key] != value]
    if changed and run.is_main:
        print(f"warning: resuming with settings that differ from the checkpoint's, so the run will "
              f"not match an uninterrupted one: {', '.join(changed)}", file=sys.stderr, flush=True)
    run.model.load_state_dict(checkpoint['model'])
    if run.ema is not None:
        run.ema.module.load_state_dict(checkpoint.get('model_ema') or checkpoint['model'])
    run.optimizer.load_state_dict(checkpoint['optimizer'])
    if checkpoint['scaler']:  # empty when saved without fp16: a new scaler starts afresh
        run.scaler.load_state_dict(checkpoint['scaler'])
    run.epoch, run.step = checkpoint['epoch'], checkpoint['step']
    run.num_updates = checkpoint['num_updates']
    run.best_metric, run.best_epoch = checkpoint['best_metric'], checkpoint['best_epoch']
    run.loss_sum, run.loss_count = checkpoint['loss_sum'], checkpoint['loss_count']
    run.bad_images = checkpoint.get('bad_images', 0)
    ranks = checkpoint['ranks']
    if len(ranks) == run.world_size:
        mine = ranks[run.rank]
        utils.set_rng_state(mine['rng'])
        ema = run.ema.module if run.ema is not None else None
        with torch.no_grad():  # several processes: this rank's own BatchNorm statistics
            for module, key in ((run.model, 'buffers'), (ema, 'ema_buffers')):
                if module is not None and key in mine:
                    for name, buffer in module.named_buffers():
                        buffer.copy_(mine[key][name])
    else:  # another world size: rank 0 goes on with the saved streams, the others start new ones
        utils.set_rng_state(ranks[0]['rng'])
        if run.rank > 0:
            torch.manual_seed(data.mix_seed(run.args.seed, run.rank, run.epoch, run.step))
    if run.is_main:
        print(f"Resumed from {path}: epoch {run.epoch}, step {run.step}", flush=True)


def write_summary(path, row):
    """Append the epoch's row; rows of this epoch or later (from a run that was cut off and
    resumed) are replaced, so the file always reads as one uninterrupted run."""
    header, rows = list(row), []
    if os.path.exists(path):
        with open(path) as f:
            lines = f.read().splitlines()
        rows = [line for line in lines[1:] if line and int(line.split(',')[0]) < row['epoch']]
    text = '\n'.join([','.join(header), *rows, ','.join(str(row[k]) for k in header)]) + '\n'
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def draw_curves(run):
    """curves.png next to summary.csv, redrawn each epoch; matplotlib is optional."""
    if not run.draw_curves:
        return
    try:
        utils.plot_curves([run.args.output], os.path.join(run.args.output, 'curves.png'))
    except ImportError:
        run.draw_curves = False
        print("matplotlib is not installed: no curves.png is drawn (pip install matplotlib; "
              "python utils.py plot DIR draws it later)", flush=True)


def install_signal_handlers(run):
    """SIGTERM / SIGINT ask for a stop at the end of the step, with a checkpoint. One request
    often arrives twice within milliseconds (Ctrl-C reaches torchrun and its workers, and torchrun
    relays it; Slurm signals every process of a job): repeats within SIGNAL_REPEAT_SECONDS are
    that same request. A signal after that stops at once, without saving."""
    run.signal_time = None

    def handler(signum, frame):
        now = time.monotonic()
        if run.signal_time is None:
            run.stop_signal, run.signal_time = signum, now
        elif now - run.signal_time > SIGNAL_REPEAT_SECONDS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def stop_requested(run, at_log_step):
    """One process checks its flag every step; several agree at log steps to stop together:
    a signal to any rank stops all of them (each then holds the signal number)."""
    if run.world_size == 1:
        return run.stop_signal is not None
    if not at_log_step:
        return False
    flag = torch.tensor([float(run.stop_signal or 0)], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    run.stop_signal = int(flag.item()) or None
    return run.stop_signal is not None


# ----------------------------------------------------------------------------------------------

def prepare_output(args, is_main):
    if not args.output:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        args.output = os.path.join('output', 'train', f"{stamp}-{args.model}-{args.img_size}")
    last = os.path.join(args.output, 'last.pth.tar')
    if args.resume == 'auto':
        args.resume = last if os.path.exists(last) else None
    elif not args.resume and not args.evaluate and os.path.exists(last):
        raise utils.UsageError(f"{args.output} already holds a run; continue it with --resume auto or "
                         f"choose another --output")
    if is_main and not args.evaluate:
        try:
            os.makedirs(args.output, exist_ok=True)
            with tempfile.TemporaryFile(dir=args.output):  # a unique name: runs may share a folder
                pass
        except OSError as e:
            raise utils.UsageError(f"cannot write to --output {args.output}: {e.strerror}") from None
        for stale in glob.glob(os.path.join(glob.escape(args.output), '.*.tmp')):
            os.remove(stale)  # a save cut off by a kill (utils.atomic_save's temporary files)


def train(run):
    args = run.args
    if args.resume:
        load_resume(run, args.resume)
    if run.is_main:
        with open(os.path.join(args.output, 'args.yaml'), 'w') as f:
            f.writelines(f"{k}: {json.dumps(v)}\n" for k, v in plain_args(args).items())
    install_signal_handlers(run)
    val_loader = make_val_loader(run, args.eval_size)
    current_stage = None
    for epoch in range(run.epoch, args.epochs):
        run.epoch = epoch
        settings = stage_settings(args, epoch)
        if args.progressive and settings['stage'] != current_stage and run.is_main:
            first, last = settings['epochs']
            magnitude = 'off' if settings['magnitude'] is None else f"{settings['magnitude']:.2f}"
            compiles = ", torch.compile compiles once for this size" if args.compile else ''
            print(f"Stage {settings['stage'] + 1}/{args.prog_stages}: epochs {first}-{last}, "
                  f"image size {settings['size']} (eval {args.eval_size}), "
                  f"RandAugment magnitude {magnitude}, mixup {settings['mixup']:.3f}, "
                  f"dropout {settings['drop']:.3f}{compiles}", flush=True)
        current_stage = settings['stage']
        lr = utils.learning_rate(epoch, args.sched, args.lr, args.epochs, args.warmup_lr,
                                 args.warmup_epochs, args.decay_epochs, args.decay_rate, args.min_lr)
        for group in run.optimizer.param_groups:
            group['lr'] = lr
        start_batch = run.step
        loader, num_batches = make_train_loader(run, settings, epoch, start_batch)
        metrics = train_one_epoch(run, epoch, settings, loader, num_batches, start_batch)
        if run.stop_signal:
            return graceful_stop(run, epoch, metrics)
        if args.perf_steps and run.num_updates >= args.perf_steps:
            return
        end_of_epoch(run, epoch, metrics, val_loader, lr)
        if epoch + 1 < args.epochs and stop_requested(run, at_log_step=True):
            # a signal during validation: the epoch's checkpoint is already written
            return graceful_stop(run, epoch + 1)
    if run.is_main and run.best_metric is not None:
        print(f"*** Best metric: {run.best_metric} (epoch {run.best_epoch})", flush=True)


def end_of_epoch(run, epoch, metrics, val_loader, lr):
    args = run.args
    utils.average_bn_stats(run.model, run.world_size)
    evaluation = validate(run, run.model, val_loader)
    ema_eval = None
    if run.ema is not None:
        utils.average_bn_stats(run.ema.module, run.world_size)
        ema_eval = validate(run, run.ema.module, val_loader, ' (EMA)')
    reported = ema_eval or evaluation  # timm reports the EMA's metric when there is one
    run.step, run.loss_sum, run.loss_count, run.bad_images = 0, 0.0, 0, 0
    finite = check_finite(run)  # after a non-finite loss: no checkpoint, no new best
    is_best = finite and (run.best_metric is None or reported['top1'] > run.best_metric)
    if is_best:
        run.best_metric, run.best_epoch = reported['top1'], epoch
    ranks = rank_states(run) if finite else None
    if not run.is_main:
        return
    row = dict(epoch=epoch, train_loss=f"{metrics['train_loss']:.6g}",
               eval_loss=f"{evaluation['loss']:.6g}", eval_top1=f"{evaluation['top1']:.4f}",
               eval_top5=f"{evaluation['top5']:.4f}",
               ema_top1=f"{ema_eval['top1']:.4f}" if ema_eval else '',
               ema_top5=f"{ema_eval['top5']:.4f}" if ema_eval else '',
               lr=f"{lr:.6g}", images_per_sec=f"{metrics['images_per_sec']:.2f}",
               bad_images=metrics['bad_images'])
    print(f"Epoch {epoch}: train_loss {row['train_loss']}  eval_loss {row['eval_loss']}  "
          f"top1 {row['eval_top1']}  top5 {row['eval_top5']}"
          + (f"  ema_top1 {row['ema_top1']}" if ema_eval else '')
          + f"  lr {row['lr']}  images/s {row['images_per_sec']}"
          + f"  skipped_images {row['bad_images']}", flush=True)
    write_summary(os.path.join(args.output, 'summary.csv'), row)
    draw_curves(run)
    if not finite:
        return
    # last.pth.tar is written last: a kill before it resumes from the previous one and redoes
    # this epoch, rewriting the files before it with the same bytes.
    state = checkpoint_state(run, epoch + 1, 0, ranks)
    if is_best:
        utils.atomic_save(state, os.path.join(args.output, 'model_best.pth.tar'))
    if args.checkpoint_hist:
        utils.atomic_save(state, os.path.join(args.output, f'checkpoint-{epoch}.pth.tar'))
    utils.atomic_save(state, os.path.join(args.output, 'last.pth.tar'))
    if args.checkpoint_hist:
        old = os.path.join(args.output, f'checkpoint-{epoch - args.checkpoint_hist}.pth.tar')
        if os.path.exists(old):
            os.remove(old)


def graceful_stop(run, epoch, metrics=None):
    """After a SIGTERM / SIGINT: rank 0 saves the current step (metrics: the epoch so far), unless
    the epoch-end checkpoint was just written (metrics None); every rank then returns."""
    last = os.path.join(run.args.output, 'last.pth.tar')
    finite = check_finite(run)
    ranks = rank_states(run) if finite and metrics is not None else None
    if run.is_main and ranks is not None:
        state = checkpoint_state(run, epoch, run.step, ranks, metrics['loss_sum'],
                                 metrics['loss_count'], metrics['bad_images'])
        utils.atomic_save(state, last)
    if run.is_main:
        saved = (f"checkpoint saved to {last}" if finite else
                 "the loss was not finite, so the last good checkpoint was kept")
        print(f"Stopped by {signal.Signals(run.stop_signal).name} at epoch {epoch}, step {run.step}; "
              f"{saved}. To continue, run the same command with --output {run.args.output} "
              f"--resume auto", flush=True)


def evaluate_only(run):
    args = run.args
    if args.resume:
        checkpoint = models.read_checkpoint(args.resume)
        models.load_pretrained(run.model, checkpoint, use_ema=False)
        if checkpoint.get('model_ema'):
            run.ema = run.ema or utils.ModelEma(run.model, 0.0)
            run.ema.module.load_state_dict(checkpoint['model_ema'])
    loader = make_val_loader(run, args.eval_size)
    evaluation = validate(run, run.model, loader)
    if run.is_main:
        print(f"Evaluation: loss {evaluation['loss']:.4f}  top1 {evaluation['top1']:.4f}  "
              f"top5 {evaluation['top5']:.4f}", flush=True)
    if run.ema is not None and args.resume:
        ema_eval = validate(run, run.ema.module, loader, ' (EMA)')
        if run.is_main:
            print(f"Evaluation (EMA): loss {ema_eval['loss']:.4f}  top1 {ema_eval['top1']:.4f}  "
                  f"top5 {ema_eval['top5']:.4f}", flush=True)


def one_line(error):
    """The message alone, also when a DataLoader worker wrapped it in its traceback text."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    last = lines[-1]
    for prefix in (f"{type(error).__module__}.{type(error).__name__}: ", f"{type(error).__name__}: "):
        last = last[len(prefix):] if last.startswith(prefix) else last
    return last


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    rank, world_size, _ = utils.distributed_env()
    alike_on_every_rank = True  # errors in the arguments
    try:
        resolve_args(args)
        prepare_output(args, rank == 0)
        alike_on_every_rank = False
        run = setup(args)
        evaluate_only(run) if args.evaluate else train(run)
    except (utils.UsageError, data.DataError, models.CheckpointError, FloatingPointError) as e:
        # Said once: by rank 0 when every rank finds the same (the arguments, the all-reduced
        # loss), else by the rank that hit it. The others stop through the launcher.
        alike_on_every_rank |= isinstance(e, FloatingPointError)
        if rank == 0 or not alike_on_every_rank:
            where = f' (rank {rank})' if world_size > 1 else ''
            print(f"error{where}: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # SIGINT before train() installs its handler (or while evaluating)
        print(f"interrupted{f' (rank {rank})' if world_size > 1 else ''}: no training step had run, "
              f"nothing to save", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:
        if world_size > 1 and utils.is_peer_failure(e):  # another rank failed and says why
            reason = one_line(e).split('] ', 1)[-1].split('. ')[0]  # gloo: "[file:line] What. Hint."
            print(f"rank {rank} stops: another rank failed ({reason})", file=sys.stderr, flush=True)
            sys.exit(1)
        raise  # a bug: the traceback, each line prefixed [rankN] by torch.distributed
    # Only after success: with a rank gone, tearing the group down can block.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
