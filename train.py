"""Train EfficientNetV2 with the Ascend ModelZoo recipe (timm 0.5.4's train.py), on 1 to N devices.

    python train.py                                     # zero-setup demo: handwritten digits, CPU
    python train.py DATA --model efficientnetv2_rw_t --pretrained ...   # fine-tune: README's recipe
    python train.py /data/imagenet --model efficientnetv2_rw_t -b 256 --sched step --epochs 350 \
        --decay-epochs 2.4 --decay-rate .97 --opt rmsproptf --opt-eps .001 -j 8 --warmup-lr 4e-6 \
        --weight-decay 1e-5 --drop 0.3 --drop-connect 0.2 --aa rand-m9-mstd0.5 --lr .014 \
        --log-interval 1 --img-size 288 --apex-amp --model-ema --model-ema-decay 0.9999 --mixup 0.2
    torchrun --nproc_per_node=8 train.py /data/imagenet ... --lr .112     # 1 node x 8 devices
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
        train.py /data/imagenet ... --lr .224         # 2 nodes: the same on HOST1 with --node_rank=1
    python -m torch.distributed.launch --nproc_per_node=8 train.py ...   # the ModelZoo's launcher
    bash test/train_full_8p.sh --data_path=/data/imagenet    # the ModelZoo's scripts (README)

`-b` is per device, and the logged images/s are global; a launcher's WORLD_SIZE turns on distributed mode.
Top to bottom: the three places a copy changes first (datasets, create_optimizer with its schedule, train_loss);
main; train, the epoch loop; train_one_epoch; train_step; validate; then the set-up. The flags are flags.py's.
run.Supervisor keeps the run's bookkeeping: resume, checkpoints, stop signals, the non-finite guard.
"""

import contextlib
import functools
import importlib.util
import math
import sys
import warnings

import torch
import torch.nn.functional as F

import data
import devices
import distributed
import errors
import flags
import logs
import model as models
import optim
import precision as mixed_precision
import run
import transforms
from checkpoint import plain_args

# fp16's GradScaler skips the optimizer step when gradients overflow; the schedule moves on all the same.
warnings.filterwarnings('ignore', message=r'Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`')


# The three places a copy of this recipe changes first: the data, the optimizer, the loss


def datasets(args):
    """Returns the training set, the validation set and the class names. Any map-style dataset of (image, label)
    works, the image a PIL image, a uint8 tensor or array: torchvision.datasets.*, yours, a Hugging Face split
    (hugging_face.Rows(split))."""
    return data.load_datasets(
        args.dataset,
        args.data_path,
        strict_data=args.strict_data,
        synthetic_size=args.img_size,
        num_classes=args.num_classes,
        splits=(args.train_split, args.val_split),
        keys=(args.input_key, args.target_key),
        skip_bad_shards=args.skip_bad_shards,
    )


def create_optimizer(model, args, steps_per_epoch):
    """Returns the optimizer and its lr scheduler, stepped after every optimizer step: timm's parameter groups (no
    weight decay on biases and BatchNorm) and its schedules, which change the lr once per epoch (optim.py)."""
    groups = optim.param_groups(model, args.weight_decay)
    if args.opt == 'rmsproptf':  # TensorFlow's RMSprop as timm has it (optim.py says how it differs from torch's)
        optimizer = optim.RMSpropTF(groups, lr=args.lr, alpha=0.9, eps=args.opt_eps, momentum=args.momentum)
    elif args.opt == 'sgd':  # timm's 'sgd' is Nesterov momentum
        optimizer = torch.optim.SGD(groups, args.lr, momentum=args.momentum, nesterov=args.momentum > 0, foreach=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, eps=args.opt_eps, foreach=True)
    warmup = (args.warmup_lr, args.warmup_epochs)
    decay = (args.decay_epochs, args.decay_rate)
    scheduler = optim.TimmSchedule(optimizer, steps_per_epoch, args.sched, args.epochs, warmup, decay, args.min_lr)
    return optimizer, scheduler


def train_loss(output, targets, args):
    """timm's: soft-target cross entropy after mixup/cutmix (their targets hold the smoothing), else label-smoothing
    cross entropy; in float32. validate() reports plain cross entropy whatever this returns (timm's eval loss)."""
    smoothing = 0.0 if targets.ndim == 2 else args.smoothing
    return F.cross_entropy(output.float(), targets, label_smoothing=smoothing)


# The recipe


def main(argv=None):
    with distributed.one_line_errors(alike_on_every_rank=True):
        args = run.parse_command_line(argv)
    with distributed.one_line_errors():
        stopped_by = train(args)
    if not args.evaluate:
        distributed.say(f'Output: {args.output}')
    distributed.destroy_distributed()
    if stopped_by:  # as a process killed by the signal would: a scheduler tells a stopped run from a finished one
        sys.exit(128 + stopped_by)


def train(args):
    """Set up, then the epoch loop: train, validate, report, save. Returns the signal that stopped it, or None."""
    device = setup_processes(args)
    train_set, val_set, classes = datasets(args)
    num_classes = args.num_classes or len(classes)
    steps_per_epoch = count_steps(train_set, args)
    model_without_ddp = build_model(args, device, num_classes)
    optimizer, scheduler = create_optimizer(model_without_ddp, args, steps_per_epoch)
    precision, model_without_ddp, optimizer = mixed_precision.create_precision(
        device, model_without_ddp, optimizer, args.amp, args.amp_dtype, args.apex_amp, say=distributed.say
    )
    model_ema = optim.ModelEma(model_without_ddp, args.model_ema_decay) if args.model_ema else None
    model = distribute(model_without_ddp, device, precision, args)
    val_loader = make_val_loader(val_set, args)
    if args.evaluate:  # evaluate.py, beside the copy
        validation = functools.partial(validate, loader=val_loader, precision=precision, args=args)
        return errors.import_beside('evaluate', '--evaluate').evaluate(model_without_ddp, validation, args)
    ema_module = model_ema.module if model_ema else None
    parts = dict(
        model=model_without_ddp, optimizer=optimizer, scheduler=scheduler, scaler=precision, model_ema=ema_module
    )
    meta = dict(arch=args.model, num_classes=num_classes, classes=list(classes), args=plain_args(args))
    progress = run.Supervisor(args, parts, meta, device, logs.EpochLogger(args.output))
    progress.start()
    logs.tensorboard = None
    if args.log_tensorboard and distributed.is_main_process():  # a resumed run redraws from its first step
        scalars = errors.import_beside('tensorboard_scalars', '--log-tensorboard')
        logs.tensorboard = scalars.Scalars(args.output, first_step=progress.state.num_updates)
    distributed.say(
        describe_run(args, model_without_ddp, train_set, val_set, num_classes, steps_per_epoch, optimizer, scheduler)
    )
    for epoch in range(progress.state.epoch, args.epochs):
        devices.reset_peak_memory(device)  # the Epoch line's peak_memory_mib is this epoch's
        settings = epoch_settings(args, epoch, progress.first_epoch)
        sampler = train_sampler(train_set, args, epoch, start_batch=progress.batches_done())
        loader = make_loader(train_set, train_transform(settings, args), sampler, args)
        mixup = transforms.mixup_cutmix(settings['mixup'], args.cutmix, args.smoothing, num_classes)
        model_without_ddp.drop_rate = settings['drop']
        images_per_sec = train_one_epoch(
            model, optimizer, scheduler, precision, loader, args, progress, model_ema, mixup
        )
        if progress.should_stop_before_validation():
            return progress.stop.signal
        evaluation, ema_evaluation = evaluate_epoch(model_without_ddp, model_ema, val_loader, precision, args)
        if progress.should_stop_after_epoch(evaluation, ema_evaluation, images_per_sec):
            return progress.stop.signal
    progress.report_best()


def train_one_epoch(model, optimizer, scheduler, precision, loader, args, progress, model_ema=None, mixup=None):
    """The epoch from optimizer step progress.state.step (0 unless resumed mid-epoch), timm's `Train:` line every
    --log-interval steps; progress (run.Supervisor) counts, guards, saves and stops. Returns the images/s."""
    model.train()
    if args.freeze_bn:
        errors.import_beside('weights', '--freeze-bn').freeze_batchnorm(model)
    state = progress.state
    num_steps = len(loader.batch_sampler) // args.grad_accum_steps
    last_step = progress.begin_epoch(optimizer.param_groups[0]['lr'], num_steps)
    logger = logs.TrainLogger(state.epoch, num_steps, last_step, args.log_interval, state, progress.device)
    for batches in logger.log_every(loader, args.grad_accum_steps):
        loss, skipped = train_step(model, optimizer, precision, batches, args, model_ema, mixup)
        state.count_step(loss, bad_images=sum(int(bad.sum()) for *_, bad in batches))
        at_log_step = logger.update(loss, sum(len(labels) for _, labels, _ in batches), optimizer.param_groups[0]['lr'])
        scheduler.step()
        if progress.should_stop_after_step(loss, skipped, at_log_step, last_of_epoch=state.step == num_steps):
            break
    return logger.images_per_sec


def train_step(model, optimizer, precision, batches, args, model_ema=None, mixup=None):
    """One optimizer step over --grad-accum-steps micro-batches: forward, loss and backward for each, then the
    step and the EMA's update. Returns the global batch's mean loss, the same on every rank (one all-reduce, no
    sync), and whether float16's loss scaling skipped the step."""
    optimizer.zero_grad(set_to_none=True)  # frees the last step's gradients before the activations
    losses = []
    for index, (images, labels, _) in enumerate(batches):
        images, labels = to_device(images, labels, model, args)
        targets = labels
        if mixup is not None:
            images, targets = mixup(images, labels)
        if args.reprob > 0:
            images = errors.import_beside('random_erasing', '--reprob').random_erase(images, args.reprob)
        with gradients_stay_local(model, accumulating=index < len(batches) - 1):
            with precision.autocast():
                output = model(images)
            loss = train_loss(output, targets, args)
            precision.backward(loss / len(batches))  # the step's gradient: the mean over its micro-batches
        losses.append(loss.detach().float())
    skipped = precision.step(optimizer, args.clip_grad)
    if model_ema is not None:
        model_ema.update_parameters(model)
    mean_loss = distributed.all_reduce_sum(torch.stack(losses).mean()) / distributed.get_world_size()
    return mean_loss, skipped


def gradients_stay_local(model, accumulating):
    """DDP's no_sync (spanning the forward, where DDP decides) on micro-batches before a step's last: no all-reduce."""
    return model.no_sync() if accumulating and hasattr(model, 'no_sync') else contextlib.nullcontext()


@torch.no_grad()
def validate(model, loader, precision, args, log_suffix=''):
    """Loss, top-1, top-5 over the validation set, each image once over all ranks; timm's `Test:` lines."""
    model.eval()
    logger = logs.EvalLogger(args.log_interval, next(model.parameters()).device, 'Test' + log_suffix)
    no_images = torch.zeros(0, 3, args.eval_size, args.eval_size, dtype=torch.uint8)
    for images, labels, *_ in logger.log_every(loader, (no_images, torch.zeros(0, dtype=torch.long))):
        images, labels = to_device(images, labels, model, args)
        with precision.autocast():
            output = model(images)
        loss_sum = F.cross_entropy(output.float(), labels, reduction='sum')
        logger.update(loss_sum, logs.accuracy(output, labels), labels.shape[0])
    return logger.result()


def evaluate_epoch(model, model_ema, val_loader, precision, args):
    """timm's epoch end: each rank's BN statistics averaged, then the model and its EMA validated."""
    distributed.average_bn_stats(model)
    evaluation = validate(model, val_loader, precision, args)
    if model_ema is None:
        return evaluation, None
    distributed.average_bn_stats(model_ema.module)
    return evaluation, validate(model_ema.module, val_loader, precision, args, ' (EMA)')


# Set-up


def epoch_settings(args, epoch, first_epoch):
    """What the epoch trains with: the flags' image size, RandAugment magnitude, mixup and dropout, or with
    --progressive the stage's, said at each stage's first epoch (progressive.py, beside the copy)."""
    if not args.progressive:
        magnitude = args.rand_augment['magnitude'] if args.rand_augment else None
        return dict(size=args.img_size, magnitude=magnitude, mixup=args.mixup, drop=args.drop)
    settings = errors.import_beside('progressive', '--progressive').stage_settings(args, epoch, first_epoch)
    if settings['line']:
        distributed.say(settings['line'])
    return settings


def count_steps(train_set, args):
    """Optimizer steps per epoch; a training set smaller than one global batch is refused (unless evaluating)."""
    steps = len(train_sampler(train_set, args)) // args.grad_accum_steps
    if steps == 0 and not args.evaluate:
        world_size = distributed.get_world_size()
        per_process = math.ceil(len(train_set) / world_size) // args.grad_accum_steps
        fix = f'give -b {per_process} or less' if per_process else 'use fewer processes or --grad-accum-steps'
        with distributed.one_line_errors(alike_on_every_rank=True):
            raise errors.UsageError(
                f'the training set has {len(train_set)} images, fewer than one global batch of '
                f'{flags.global_batch(args)} (-b {args.batch_size} x {world_size} process{"es" * (world_size > 1)} '
                f'x --grad-accum-steps {args.grad_accum_steps}); {fix}'
            )
    return max(steps, 1)  # --evaluate trains no step


def describe_run(args, model, train_set, val_set, num_classes, steps_per_epoch, optimizer, scheduler):
    """The run in two lines, after advice.py's warnings and with its line on what drop_last leaves out, where they
    apply (beside the copy)."""
    advice = importlib.import_module('advice') if importlib.util.find_spec('advice') else None  # beside the copy
    left_out = advice.advise(args, len(train_set), steps_per_epoch, scheduler) if advice else ''
    world_size = distributed.get_world_size()
    lr = f'lr {args.lr:.4g}'
    if args.lr_base is not None:
        lr += f' (--lr-base {args.lr_base:g} per {args.lr_base_size} images, {args.lr_base_scale})'
    accumulated = f' x {args.grad_accum_steps} accumulated' if args.grad_accum_steps > 1 else ''
    source = getattr(train_set, 'source', type(train_set).__name__)
    schedule = getattr(scheduler, 'sched', type(scheduler).__name__)
    return (
        f'Training {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on '
        f'{args.data_path or args.dataset}: {len(train_set)} train / {len(val_set)} val images ({source}), '
        f'{num_classes} classes; {args.device}, {world_size} process{"es" * (world_size > 1)}\n'
        f'{args.epochs} epoch{"s" * (args.epochs != 1)} of {steps_per_epoch} step{"s" * (steps_per_epoch != 1)}, '
        f'batch {flags.global_batch(args)} ({args.batch_size} per process{accumulated}), {lr}, '
        f'{type(optimizer).__name__}, {schedule} schedule{left_out}'
    )


def setup_processes(args):
    """This process's device and, under a launcher, the process group; then --seed seeds the initial weights."""
    _, world_size, local_rank = distributed.distributed_env()
    device = devices.select_device(args.device, local_rank)
    if world_size > 1:
        distributed.init_distributed(device, timeout_minutes=args.dist_timeout)
    data.seed_torch(args.seed)
    return device


def build_model(args, device, num_classes):
    """The network on its device, from --pretrained weights if given: what checkpoints and the EMA hold."""
    model = models.create_model(args.model, num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    if args.pretrained:  # weights.py, beside the copy
        errors.import_beside('weights', '--pretrained').load_for_training(model, args.model, args.pretrained)
    if args.sync_bn and distributed.get_world_size() > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once (timm too)
    return model


def distribute(model_without_ddp, device, precision, args):
    """The module that trains: DDP with several processes, compiled with --compile. From here on each rank draws its
    own dropout, drop path, mixup and random erasing (timm seeds seed + rank), or the ranks would repeat each other."""
    model = model_without_ddp
    if distributed.get_world_size() > 1:
        ids = [device.index] if device.type in ('cuda', 'npu') else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if args.compile:  # compiling.py, beside the copy
        model = errors.import_beside('compiling', '--compile').compile_model(model, precision, args)
    if distributed.get_rank() > 0:
        data.seed_torch(args.seed, distributed.get_rank())
    return model


def train_transform(settings, args):
    """The epoch's train transform: the flags', at the size and RandAugment magnitude of epoch_settings."""
    return transforms.train_transform(
        settings['size'],
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        aa=args.rand_augment,
        magnitude=settings['magnitude'],
        interpolation=args.interpolation,
        mean=args.mean,
        color_jitter=args.color_jitter,
    )


def train_sampler(dataset, args, epoch=0, start_batch=0):
    sampler = data.EpochBatchSampler(len(dataset), args.batch_size, shuffle=True, drop_last=True, seed=args.seed)
    sampler.set_epoch(epoch, start_batch)
    return sampler


def make_val_loader(dataset, args):
    """Every image once over all ranks (rank r takes r, r + world_size, ...; no padding)."""
    transform = transforms.eval_transform(args.eval_size, crop_pct=args.crop_pct, interpolation=args.interpolation)
    sampler = data.EpochBatchSampler(len(dataset), args.batch_size, shuffle=False, drop_last=False)
    return make_loader(dataset, transform, sampler, args)


def make_loader(dataset, transform, sampler, args):
    pin_memory = args.device != 'cpu'  # page-locked: copies to a GPU or NPU overlap with its work
    return data.create_loader(
        data.transformed(dataset, transform), sampler, workers=args.workers, pin_memory=pin_memory
    )


def to_device(images, labels, model, args):
    """A batch from the loader (uint8 images, labels) on the model's device, without waiting for it; the images
    normalized to float32 in the run's memory format."""
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    return transforms.normalize(images, args.mean, args.std, channels_last=args.channels_last), labels


if __name__ == '__main__':
    main()
