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
    srun --ntasks-per-node=8 --gpus-per-node=8 python train.py ...     # Slurm: ranks from SLURM_* variables
    torchrun --max-restarts 3 ... train.py ... --output DIR --resume auto  # a dead worker: restart, resume
    bash test/train_full_8p.sh --data_path=/data/imagenet    # the ModelZoo's scripts (README)

`-b` is per device, logged images/s are global; a launcher's WORLD_SIZE turns on distributed mode. Top to
bottom: the three places a copy changes first (datasets, create_optimizer with its schedule, train_loss); main,
train (the epoch loop), train_one_epoch, train_step, validate; the set-up. The flags are flags.py's; checkpoints,
resume, stop signals and the non-finite guard run.py's (run.Supervisor); processes and devices distributed.py's.
"""

import contextlib
import copy
import math
import sys
import warnings

import torch
import torch.nn.functional as F

import data
import distributed
import errors
import flags
import logs
import model as models
import optim
import run
import transforms
import weights

SMALL_TRAINING_SET_STEPS = 10  # steps per epoch at or below which timm's ImageNet-length defaults are warned of
# fp16's GradScaler skips the optimizer step when gradients overflow; the schedule moves on all the same.
warnings.filterwarnings('ignore', message=r'Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`')


# ----------------------------------------------------------------------------------------------
# The three places a copy of this recipe changes first: the data, the optimizer, the loss


def datasets(args):
    """-> (train_set, val_set, class names): any map-style datasets of (image, label), the image a PIL image, a
    uint8 tensor or array (torchvision.datasets.*, yours, a Hugging Face split); data.Transformed augments them."""
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
    """-> (optimizer, lr scheduler stepped after every optimizer step). timm's parameter groups (no weight
    decay on biases and BatchNorm) and its schedules, which change the lr once per epoch (optim.py)."""
    groups = optim.param_groups(model, args.weight_decay)
    if args.opt == 'rmsproptf':  # TensorFlow's RMSprop as timm has it (optim.py says how it differs from torch's)
        optimizer = optim.RMSpropTF(groups, lr=args.lr, alpha=0.9, eps=args.opt_eps, momentum=args.momentum)
    elif args.opt == 'sgd':  # timm's 'sgd' is Nesterov momentum
        optimizer = torch.optim.SGD(groups, args.lr, momentum=args.momentum, nesterov=args.momentum > 0, foreach=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, eps=args.opt_eps, foreach=True)
    scheduler = optim.TimmSchedule(
        optimizer,
        steps_per_epoch,
        args.sched,
        args.epochs,
        args.warmup_lr,
        args.warmup_epochs,
        args.decay_epochs,
        args.decay_rate,
        args.min_lr,
    )
    return optimizer, scheduler


def train_loss(output, targets, args):
    """timm's: soft-target cross entropy after mixup/cutmix (their targets hold the smoothing), else label-smoothing
    cross entropy; in float32. validate() reports plain cross entropy whatever this returns (timm's eval loss)."""
    smoothing = 0.0 if targets.ndim == 2 else args.smoothing
    return F.cross_entropy(output.float(), targets, label_smoothing=smoothing)


# ----------------------------------------------------------------------------------------------
# The recipe


def main(argv=None):
    with distributed.one_line_errors(alike_on_every_rank=True):
        args = flags.resolve_args(flags.parse_args(argv))
    with distributed.one_line_errors():
        stopped_by = train(args)
    if not args.evaluate:
        distributed.say(f'Output: {args.output}')
    distributed.destroy_distributed()
    if stopped_by:  # as a process killed by the signal would: a scheduler tells a stopped run from a finished one
        sys.exit(128 + stopped_by)


def train(args):
    """Set up, then the epoch loop: train, validate, report, save. -> the signal that stopped it, or None."""
    device = setup_processes(args)
    train_set, val_set, classes = datasets(args)
    num_classes = args.num_classes or len(classes)
    steps_per_epoch = count_steps(train_set, args)
    model_without_ddp = build_model(args, device, num_classes)
    optimizer, scheduler = create_optimizer(model_without_ddp, args, steps_per_epoch)
    precision, model_without_ddp, optimizer = optim.create_precision(
        device, model_without_ddp, optimizer, args.amp, args.amp_dtype, args.apex_amp, say=distributed.say
    )
    model_ema = optim.ModelEma(model_without_ddp, args.model_ema_decay) if args.model_ema else None
    model = distribute(model_without_ddp, device, precision, args)
    val_loader = make_val_loader(val_set, args)
    if args.evaluate:
        return evaluate(model_without_ddp, val_loader, precision, args)
    parts = dict(
        model=model_without_ddp,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=precision,
        model_ema=model_ema.module if model_ema else None,
    )
    meta = dict(arch=args.model, num_classes=num_classes, classes=list(classes), args=run.plain_args(args))
    progress = run.Supervisor(args, parts, meta, device, logs.EpochLogger(args.output))
    if args.log_tensorboard and distributed.is_main_process():  # a resumed run redraws from its first step
        logs.open_tensorboard(args.output, first_step=progress.state.num_updates)
    distributed.say(
        describe_run(args, model_without_ddp, train_set, val_set, meta, steps_per_epoch, optimizer, scheduler)
    )
    for epoch in range(progress.state.epoch, args.epochs):
        distributed.reset_peak_memory(device)  # the Epoch line's peak_memory_mib is this epoch's
        settings = optim.stage_settings(args, epoch)
        if args.progressive and epoch in (progress.first_epoch, settings['epochs'][0]):
            distributed.say(optim.describe_stage(settings, args))
        sampler = train_sampler(train_set, args, epoch, start_batch=progress.state.step * args.grad_accum_steps)
        loader = make_loader(train_set, train_transform(settings, args), sampler, args)
        mixup = (
            transforms.MixupCutmix(settings['mixup'], args.cutmix, args.smoothing, num_classes)
            if settings['mixup'] > 0 or args.cutmix > 0
            else None
        )
        model_without_ddp.drop_rate = settings['drop']
        images_per_sec = train_one_epoch(
            model, optimizer, scheduler, precision, loader, args, progress, model_ema, mixup
        )
        if progress.ends_before_validation():  # a stop signal (saved, said how to go on), or --perf-steps done
            return progress.stop.signal
        evaluation, ema_evaluation = evaluate_epoch(model_without_ddp, model_ema, val_loader, precision, args)
        if not progress.end_epoch(evaluation, ema_evaluation, images_per_sec):  # a stop signal while validating
            return progress.stop.signal
    progress.report_best()


def train_one_epoch(model, optimizer, scheduler, precision, loader, args, progress, model_ema=None, mixup=None):
    """The epoch from optimizer step progress.state.step (0 unless resumed mid-epoch), timm's `Train:` line every
    --log-interval steps; progress (run.Supervisor) counts, guards, saves and stops. -> the epoch's images/s."""
    model.train()
    if args.freeze_bn:
        models.freeze_batchnorm(model)
    state = progress.state
    if state.step == 0 or state.epoch_lr is None:  # the lr the epoch begins with (None: an older checkpoint)
        state.epoch_lr = optimizer.param_groups[0]['lr']
    num_steps = len(loader.batch_sampler) // args.grad_accum_steps
    last_step = num_steps - 1
    if args.perf_steps:  # the ModelZoo's throughput runs stop after --perf-steps steps
        last_step = min(last_step, state.step + args.perf_steps - state.num_updates - 1)
    logger = logs.TrainLogger(state.epoch, num_steps, last_step, args.log_interval, state, progress.device)
    for batches in logger.log_every(loader, args.grad_accum_steps):
        loss, skipped = train_step(model, optimizer, precision, batches, args, model_ema, mixup)
        state.count_step(loss, bad_images=sum(int(bad.sum()) for *_, bad in batches))
        at_log_step = logger.update(loss, sum(len(labels) for _, labels, _ in batches), optimizer.param_groups[0]['lr'])
        scheduler.step()
        if progress.after_step(loss, skipped, at_log_step, last_of_epoch=state.step == num_steps):
            break
    return logger.images_per_sec


def train_step(model, optimizer, precision, batches, args, model_ema=None, mixup=None):
    """One optimizer step over --grad-accum-steps micro-batches: forward, loss, backward each; step; EMA update.
    -> (the global batch's mean loss, the same on every rank: one all-reduce, no sync; whether fp16 skipped it)."""
    optimizer.zero_grad(set_to_none=True)  # frees the last step's gradients before the activations
    losses = []
    for index, (images, labels, _) in enumerate(batches):
        images, labels = to_device(images, labels, model, args)
        targets = labels
        if mixup is not None:
            images, targets = mixup(images, labels)
        if args.reprob > 0:
            images = transforms.random_erase(images, args.reprob)
        with gradients_stay_local(model, accumulating=index < len(batches) - 1):
            with precision.autocast():
                output = model(images)
            loss = train_loss(output, targets, args)
            precision.backward(loss / len(batches))  # the step's gradient: the mean over its micro-batches
        losses.append(loss.detach().float())
    skipped = precision.step(optimizer, args.clip_grad)
    if model_ema is not None:
        model_ema.update_parameters(model)
    return distributed.mean_over_ranks(torch.stack(losses).mean()), skipped


def gradients_stay_local(model, accumulating):
    """DDP's no_sync (spanning the forward, where DDP decides) on micro-batches before a step's last: no all-reduce."""
    return model.no_sync() if accumulating and hasattr(model, 'no_sync') else contextlib.nullcontext()


@torch.no_grad()
def validate(model, loader, precision, args, log_suffix=''):
    """Loss, top-1, top-5 over the validation set, each image once over all ranks; timm's `Test:` lines."""
    model.eval()
    device = next(model.parameters()).device
    logger = logs.EvalLogger(args.log_interval, device, 'Test' + log_suffix)
    empty_batch = (
        torch.zeros(0, 3, args.eval_size, args.eval_size, dtype=torch.uint8),
        torch.zeros(0, dtype=torch.long),
    )
    for images, labels, *_ in logger.log_every(loader, empty_batch):
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


def evaluate(model, val_loader, precision, args):
    """--evaluate: validate the weights of --pretrained, or of --resume (and its EMA, if it has one)."""
    nets = {'': model}
    if args.resume:
        checkpoint = weights.read_checkpoint(args.resume)
        arch = checkpoint.get('arch')
        if isinstance(arch, str) and arch.split('.')[0] != args.model.split('.')[0]:
            raise errors.UsageError(
                f'{args.resume} holds {arch}, not --model {args.model}: leave --model out to '
                f"evaluate it as the checkpoint's, or give --model {arch}"
            )
        load_weights(model, checkpoint, use_ema=False)
        if checkpoint.get('model_ema'):
            nets[' (EMA)'] = load_weights(copy.deepcopy(model), checkpoint)
    for suffix, net in nets.items():
        result = validate(net, val_loader, precision, args, suffix)
        distributed.say(
            f'Evaluation{suffix}: loss {result["loss"]:.4f}  top1 {result["top1"]:.4f}  top5 {result["top5"]:.4f}'
        )


# ----------------------------------------------------------------------------------------------
# Set-up


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


def describe_run(args, model, train_set, val_set, meta, steps_per_epoch, optimizer, scheduler):
    """The run in two lines (three when drop_last leaves images out), with a warning when timm's ImageNet-length
    defaults meet a small training set, and when timm's warm-up never ends (not for a copy's own schedule)."""
    world_size = distributed.get_world_size()
    timm_length = (args.epochs, args.batch_size) == (flags.TIMM_DEFAULTS['epochs'], flags.TIMM_DEFAULTS['batch_size'])
    if timm_length and not args.pretrained and steps_per_epoch <= SMALL_TRAINING_SET_STEPS:
        distributed.say(
            f"warning: timm's ImageNet defaults on {len(train_set)} images: {args.epochs} epochs of "
            f'{steps_per_epoch} step{"s" * (steps_per_epoch > 1)} (batch {args.batch_size}) from random '
            f"weights; a small folder learns far more from published weights: see the README's recipe "
            f'(Training on your own images: --pretrained --epochs 15 -b 64 ...)',
            file=sys.stderr,
        )
    lr = f'lr {args.lr:.4g}' + (
        f' (--lr-base {args.lr_base:g} per {args.lr_base_size} images, {args.lr_base_scale})'
        if args.lr_base is not None
        else ''
    )
    accumulated = f' x {args.grad_accum_steps} accumulated' if args.grad_accum_steps > 1 else ''
    if isinstance(scheduler, optim.TimmSchedule) and 0 < args.epochs <= args.warmup_epochs:
        distributed.say(
            f'warning: the warm-up (--warmup-epochs {args.warmup_epochs}) covers the whole run (--epochs '
            f'{args.epochs}): the lr rises from --warmup-lr {args.warmup_lr:g} and never reaches '
            f'{args.lr:g}; give --warmup-epochs 0, or fewer than --epochs',
            file=sys.stderr,
        )
    return (
        f'Training {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on '
        f'{args.data_path or args.dataset}: {len(train_set)} train / {len(val_set)} val images '
        f'({getattr(train_set, "source", type(train_set).__name__)}), {meta["num_classes"]} classes; '
        f'{args.device}, {world_size} process{"es" * (world_size > 1)}\n'
        f'{args.epochs} epoch{"s" * (args.epochs != 1)} of {steps_per_epoch} step{"s" * (steps_per_epoch != 1)}, '
        f'batch {flags.global_batch(args)} ({args.batch_size} per process{accumulated}), {lr}, '
        f'{type(optimizer).__name__}, {getattr(scheduler, "sched", type(scheduler).__name__)} schedule'
        f'{left_out_images(len(train_set), steps_per_epoch, args)}'
    )


def left_out_images(dataset_len, steps_per_epoch, args):
    """A start line counting the images drop_last leaves out of each epoch, with the -b that would use them all."""
    left_out = dataset_len - steps_per_epoch * flags.global_batch(args)
    if left_out <= 0 or args.evaluate:
        return ''
    per_process = math.ceil(dataset_len / distributed.get_world_size())
    fits = [
        b for b in range(args.batch_size // 2, args.batch_size + 1) if per_process % (b * args.grad_accum_steps) == 0
    ]
    hint = f'-b {fits[-1]} uses them all' if fits else 'the next epoch leaves out others'
    return f'\n{left_out} of {dataset_len} training images are left out of each epoch (drop_last): {hint}'


def setup_processes(args):
    """This process's device and, under a launcher, the process group; seeds the initialization."""
    rank, world_size, local_rank = distributed.distributed_env()
    device = distributed.select_device(args.device, local_rank)
    if world_size > 1:
        distributed.init_distributed(device, timeout_minutes=args.dist_timeout)
    torch.manual_seed(args.seed)
    return device


def build_model(args, device, num_classes):
    """The network on its device, from --pretrained weights if given: what checkpoints and the EMA hold."""
    model = models.create_model(args.model, num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    if args.pretrained:
        path = weights.published().fetch(args.model) if args.pretrained is True else args.pretrained
        load_weights(model, weights.read_checkpoint(path))
    if args.sync_bn and distributed.get_world_size() > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once (timm too)
    return model


def distribute(model_without_ddp, device, precision, args):
    """The module that trains: DDP with several processes, compiled with --compile."""
    model = model_without_ddp
    if distributed.get_world_size() > 1:
        ids = [device.index] if device.type in ('cuda', 'npu') else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if args.compile:
        model = compile_model(model, precision, args)
    if distributed.get_rank() > 0:  # the same initial weights above; from here on dropout, drop path, mixup and
        # random erasing draw per rank (timm seeds seed + rank), or the ranks would repeat one another
        torch.manual_seed(data.mix_seed(args.seed, distributed.get_rank()))
    return model


def load_weights(net, checkpoint, use_ema=True):
    """weights.load_pretrained; rank 0 says its notes (a torchvision conversion, a new classifier)."""
    for note in weights.load_pretrained(net, checkpoint, use_ema):
        distributed.say(note)
    return net


def compile_model(model, precision, args):
    """Only the training forward/backward is compiled: EMA, evaluation and checkpoints use the plain
    module (no `_orig_mod.` in saved keys). Static shapes: --progressive recompiles once per stage."""
    if precision.apex_optimizer is not None:
        raise errors.UsageError("--compile does not work with apex's patched functions; use --amp")
    config = torch._dynamo.config
    limit = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'  # torch < 2.7
    setattr(config, limit, max(getattr(config, limit), args.prog_stages + 1))
    return torch.compile(model, dynamic=False)


def train_transform(settings, args):  # progressive learning: the stage's size and RandAugment magnitude
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
    sampler = data.EpochBatchSampler(
        len(dataset),
        args.batch_size,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
        rank=distributed.get_rank(),
        world_size=distributed.get_world_size(),
    )
    sampler.set_epoch(epoch, start_batch)
    return sampler


def make_val_loader(dataset, args):
    """Every image once over all ranks (rank r takes r, r + world_size, ...; no padding)."""
    transform = transforms.eval_transform(args.eval_size, crop_pct=args.crop_pct, interpolation=args.interpolation)
    sampler = data.EpochBatchSampler(
        len(dataset),
        args.batch_size,
        shuffle=False,
        rank=distributed.get_rank(),
        world_size=distributed.get_world_size(),
        drop_last=False,
    )
    return make_loader(dataset, transform, sampler, args)


def make_loader(dataset, transform, sampler, args):
    return data.create_loader(
        data.transformed(dataset, transform), sampler, workers=args.workers, pin_memory=args.device != 'cpu'
    )  # page-locked: copies to a GPU/NPU overlap


def to_device(images, labels, model, args):
    """A batch from the loader (uint8 images, labels) on the model's device, without waiting for it; the images
    normalized to float32 in the run's memory format."""
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    return transforms.normalize(images, args.mean, args.std, channels_last=args.channels_last), labels


if __name__ == '__main__':
    main()
