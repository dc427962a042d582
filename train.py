"""Train EfficientNetV2 with the Ascend ModelZoo recipe (timm 0.5.4's train.py), on 1 to N devices.

    python train.py                                     # zero-setup demo: handwritten digits, CPU
    python train.py DATA --model efficientnetv2_rw_t --pretrained ...   # fine-tune: README's recipe
    python train.py /data/imagenet --model efficientnetv2_rw_t -b 256 --sched step --epochs 350 \
        --decay-epochs 2.4 --decay-rate .97 --opt rmsproptf --opt-eps .001 -j 8 --warmup-lr 4e-6 \
        --weight-decay 1e-5 --drop 0.3 --drop-connect 0.2 --aa rand-m9-mstd0.5 --lr .014 \
        --log-interval 1 --img-size 288 --apex-amp --model-ema --model-ema-decay 0.9999 --mixup 0.2
    torchrun --nproc_per_node=8 train.py /data/imagenet ... --lr .112     # 1 node x 8 devices
    torchrun --nproc_per_node=2 train.py /data/imagenet ... --grad-accum-steps 4 --lr-base .014
                                                  # the 8-device batch (8 x 256) on 2 devices, lr from it
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
        train.py /data/imagenet ... --lr .224         # 2 nodes: the same on HOST1 with --node_rank=1
    python -m torch.distributed.launch --nproc_per_node=8 train.py ...   # the ModelZoo's launcher
    srun --ntasks-per-node=8 --gpus-per-node=8 python train.py ...     # Slurm: ranks from SLURM_* variables
    torchrun --max-restarts 3 ... train.py ... --output DIR --resume auto  # a dead worker: restart, resume
    bash test/train_full_8p.sh --data_path=/data/imagenet    # the ModelZoo's scripts (README)

`-b` is per device and logged images/s are global; a launcher's WORLD_SIZE turns on distributed mode.
Top to bottom: the flags; the three places a copy changes first: datasets(), create_optimizer() (with
its schedule) and train_loss(); main(), train() (the epoch loop), train_one_epoch, train_step,
validate; then the set-up. Checkpoints, exact resume, stop signals and the non-finite guard live in
run.py; the log lines and one-line errors in utils.py.
"""
import argparse
import contextlib
import copy
import functools
import importlib.util
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F

import data
import model as models
import run
import transforms
import utils
import weights

# The zero-setup demo (python train.py), measured in the README: 96-98% top-1 (10 epochs: 95.8%).
DEMO_DEFAULTS = dict(model='tf_efficientnetv2_b0', img_size=32, batch_size=64, epochs=15, opt='adamw',
                     lr=2e-3, sched='cosine', warmup_epochs=0, weight_decay=0.05, min_lr=1e-5,
                     scale=(0.5, 1.0), hflip=0.0, color_jitter=0.0, log_interval=10, workers=0,
                     model_ema_decay=0.99, prog_min_size=24)
# `--progressive` on the demo: stages at 26, 28, 30, 32 px over 30 epochs (with 15 it ended at 94-96%).
DEMO_PROGRESSIVE = dict(epochs=30)
# timm 0.5.4's defaults for what the user leaves unset on real data; workers: at most the cores.
TIMM_DEFAULTS = dict(model='efficientnetv2_rw_t', batch_size=128, epochs=300, opt='sgd', lr=0.05,
                     sched='cosine', warmup_epochs=3, weight_decay=2e-5, min_lr=1e-6, scale=(0.08, 1.0),
                     hflip=0.5, color_jitter=0.4, log_interval=50, workers=4, model_ema_decay=0.9998,
                     prog_min_size=128)
MIN_IMAGE_SIZE = 32  # the network's total stride
# fp16's GradScaler skips the optimizer step when gradients overflow; the schedule moves on all the same.
warnings.filterwarnings('ignore', message=r'Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`')


def default(key):
    return f"(default: {TIMM_DEFAULTS[key]}; the demo: {DEMO_DEFAULTS[key]})"


def get_args_parser():
    p = ArgumentParser(description=__doc__.split('\n')[0], formatter_class=HelpFormatter)
    p.add_argument('data_dir', nargs='?', help='folder holding train/<class>/ and val/<class>/ (none: the demo)')
    p.add_argument('--data-path', '--data_path', '--data-dir', dest='data_path', help='the same as DATA_DIR')
    p.add_argument('--dataset', choices=data.DATASETS,
                   help='where images come from (default: folder with a data path, else the digits demo)')
    p.add_argument('--train-split', help='folder or split to train on (default: train)')
    p.add_argument('--val-split', help=f"held-out folder or split (default: the first of {', '.join(data.VAL_SPLITS)})")
    p.add_argument('--input-key', help='--dataset hf: the image column (default: the Image one)')
    p.add_argument('--target-key', help='--dataset hf: the label column (default: the first ClassLabel one)')
    p.add_argument('--model', help=f'variant, see python model.py {default("model")}')
    p.add_argument('--num-classes', type=int, help='classifier outputs (default: the number of class folders)')
    p.add_argument('--pretrained', nargs='?', const=True, metavar='PATH',
                   help="start from weights: no value: the variant's published ImageNet weights "
                        "(downloaded once); PATH: a timm, torchvision or train.py file")
    p.add_argument('--img-size', type=int, help="train size (default: the variant's; the demo: 32)")
    p.add_argument('--eval-size', type=int,
                   help='validation size (default: --img-size; with --progressive the test size)')
    p.add_argument('--crop-pct', type=float, help="eval resize = size / crop_pct (default: the variant's)")
    p.add_argument('--interpolation', choices=transforms.INTERPOLATIONS,
                   help="resize interpolation (default: the variant's)")
    p.add_argument('--mean', type=float, nargs=3, help="normalization (default: the variant's)")
    p.add_argument('--std', type=float, nargs=3, help="normalization (default: the variant's)")
    p.add_argument('--scale', type=float, nargs=2, help=f'RandomResizedCrop area range {default("scale")}')
    p.add_argument('--ratio', type=float, nargs=2, default=(3 / 4, 4 / 3),
                   help='RandomResizedCrop aspect range (default: 3/4 4/3)')
    p.add_argument('--hflip', type=float, help=f'horizontal flip probability {default("hflip")}')
    p.add_argument('--aa', help='RandAugment in timm\'s grammar, e.g. rand-m9-mstd0.5 (default: none)')
    p.add_argument('--color-jitter', type=float,
                   help=f'colour jitter strength, used without --aa {default("color_jitter")}')
    p.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    p.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (0: off)')
    p.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (0: off)')
    p.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    p.add_argument('--drop', type=float, default=0.0, help='classifier dropout')
    p.add_argument('--drop-path', '--drop-connect', dest='drop_path', type=float, default=0.0,
                   help='stochastic depth rate of the last block')
    p.add_argument('-b', '--batch-size', type=int, help=f'per device {default("batch_size")}')
    p.add_argument('--grad-accum-steps', type=int, default=1,
                   help='micro-batches of -b per optimizer step: global batch = b x devices x this')
    p.add_argument('--epochs', type=int, help=f'epochs to train {default("epochs")}')
    p.add_argument('--opt', choices=('rmsproptf', 'sgd', 'adamw'), help=f'sgd is Nesterov {default("opt")}')
    p.add_argument('--opt-eps', type=float, help='optimizer epsilon (default: 1e-10 for rmsproptf, 1e-8 for adamw)')
    p.add_argument('--momentum', type=float, default=0.9, help='rmsproptf and sgd')
    p.add_argument('--weight-decay', type=float, help=f'none on biases and BN {default("weight_decay")}')
    p.add_argument('--clip-grad', type=float, help='max gradient norm (default: no clipping)')
    p.add_argument('--sched', choices=utils.SCHEDULES, help=f'lr per epoch {default("sched")}')
    p.add_argument('--lr', type=float, help=f'learning rate, as given {default("lr")}')
    p.add_argument('--lr-base', type=float,
                   help='instead of --lr: the lr for a global batch of --lr-base-size, scaled to this run\'s')
    p.add_argument('--lr-base-size', type=int, default=256, help='the global batch --lr-base is given for')
    p.add_argument('--lr-base-scale', choices=('linear', 'sqrt'),
                   help='how --lr-base scales with the global batch (default: sqrt for adamw, else linear)')
    p.add_argument('--warmup-lr', type=float, default=1e-4, help='lr of the first warm-up epoch')
    p.add_argument('--warmup-epochs', type=int,
                   help=f'epochs of linear warm-up from --warmup-lr {default("warmup_epochs")}')
    p.add_argument('--min-lr', type=float, help=f'end of the cosine {default("min_lr")}')
    p.add_argument('--decay-epochs', type=float, default=100, help='step schedule: epochs per decay')
    p.add_argument('--decay-rate', type=float, default=0.1, help='step schedule: lr factor per decay')
    p.add_argument('--model-ema', action='store_true', help='keep, validate and report an EMA of the weights')
    p.add_argument('--model-ema-decay', type=float, help=f'EMA decay per step {default("model_ema_decay")}')
    p.add_argument('--amp', action='store_true', help='native mixed precision')
    p.add_argument('--amp-dtype', choices=('float16', 'bfloat16'),
                   help='autocast dtype (default: float16; on the CPU bfloat16)')
    p.add_argument('--apex-amp', action='store_true', help='NVIDIA apex O1 where it imports, else --amp')
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction,
                   help='NHWC activations (default: on for CUDA and the CPU, off for the NPU)')
    p.add_argument('--compile', action='store_true', help='torch.compile the training forward/backward')
    p.add_argument('--sync-bn', action='store_true', help='BN batch statistics over all GPUs/NPUs')
    p.add_argument('--freeze-bn', action='store_true', help='BN uses and keeps its running statistics')
    p.add_argument('--device', default='auto', choices=('auto', 'cuda', 'npu', 'cpu'),
                   help='auto: cuda, else npu (with torch_npu), else cpu')
    p.add_argument('--dist-timeout', type=float, default=30, help='minutes a collective may wait')
    p.add_argument('-j', '--workers', type=int, help='loader processes per device (default: 4, at most '
                                                      'the cores per device; the demo: 0)')
    p.add_argument('--seed', type=int, default=42, help='data order, augmentation and initialization')
    p.add_argument('--log-interval', type=int, help=f'steps between log lines {default("log_interval")}')
    p.add_argument('--log-tensorboard', action='store_true',
                   help='also write TensorBoard scalars into --output (pip install tensorboard)')
    p.add_argument('--perf-steps', type=int, default=0, help='stop after N steps, no validation (0: off)')
    p.add_argument('--output', help='run folder (default: output/train/<time>-<model>-<size>)')
    p.add_argument('--resume', metavar='PATH|auto', help="continue from a checkpoint; auto: --output's "
                                                         "last.pth.tar, or a fresh start if there is none")
    p.add_argument('--checkpoint-interval', type=int, default=0, help='also save every N steps (0: off)')
    p.add_argument('--checkpoint-hist', type=int, default=0, help='keep the last K epoch checkpoints')
    p.add_argument('--evaluate', action='store_true', help='validate --resume or --pretrained only')
    p.add_argument('--strict-data', action='store_true', help='an unreadable image is an error')
    p.add_argument('--progressive', action='store_true', help="the paper's progressive learning")
    p.add_argument('--prog-stages', type=int, default=4, help='progressive learning: stages')
    p.add_argument('--prog-min-size', type=int, help=f'progressive: first size {default("prog_min_size")}')
    p.add_argument('--prog-min-aa', type=float, default=5.0, help='progressive: first RandAugment magnitude')
    p.add_argument('--prog-min-drop', type=float, default=0.1, help='progressive: first dropout')
    p.add_argument('--local-rank', '--local_rank', type=int, help=argparse.SUPPRESS)  # torch.distributed.launch
    return p


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's whole usage
        where = '; another goes in create_optimizer() in train.py' if message.startswith(('argument --opt:',
                                                                                           'argument --sched:')) else ''
        self.exit(2, f"error: {message}{where} (python train.py --help lists the flags)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only: flags resolved after parsing say theirs in their help text."""
    def _get_help_string(self, action):
        if action.default is None or action.default is False or '(default' in action.help:
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------------------------
# The three places a copy of this recipe changes first: the data, the optimizer, the loss

def datasets(args):
    """-> (train_set, val_set, class names). Any map-style datasets of (image, label) fit here, the image a
    PIL image, a uint8 tensor or numpy array (torchvision.datasets.*, your own, a Hugging Face split): the loop
    wraps them in data.Transformed, which adds this recipe's per-image seeded augmentation."""
    return data.load_datasets(args.dataset, args.data_path, strict_data=args.strict_data,
                              synthetic_size=args.img_size, num_classes=args.num_classes,
                              splits=(args.train_split, args.val_split), keys=(args.input_key, args.target_key))


def create_optimizer(model, args, steps_per_epoch):
    """-> (optimizer, lr scheduler stepped after every optimizer step). timm's parameter groups (no weight
    decay on biases and BatchNorm) and its schedules, which change the lr once per epoch (utils.py)."""
    groups = utils.param_groups(model, args.weight_decay)
    if args.opt == 'rmsproptf':  # TensorFlow's RMSprop as timm has it (utils.py says how it differs from torch's)
        optimizer = utils.RMSpropTF(groups, lr=args.lr, alpha=0.9, eps=args.opt_eps, momentum=args.momentum)
    elif args.opt == 'sgd':  # timm's 'sgd' is Nesterov momentum
        optimizer = torch.optim.SGD(groups, args.lr, momentum=args.momentum, nesterov=args.momentum > 0, foreach=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, eps=args.opt_eps, foreach=True)
    scheduler = utils.TimmSchedule(optimizer, steps_per_epoch, args.sched, args.epochs, args.warmup_lr,
                                   args.warmup_epochs, args.decay_epochs, args.decay_rate, args.min_lr)
    return optimizer, scheduler


def train_loss(output, targets, args):
    """timm's: soft-target cross entropy after mixup/cutmix (their targets hold the smoothing), else
    label-smoothing cross entropy; in float32 whatever the autocast dtype. validate() reports plain cross
    entropy whatever this returns (timm's eval loss): after a change the two loss curves differ in kind."""
    smoothing = 0.0 if targets.ndim == 2 else args.smoothing
    return F.cross_entropy(output.float(), targets, label_smoothing=smoothing)


# ----------------------------------------------------------------------------------------------
# The recipe

def main(argv=None):
    with utils.one_line_errors(alike_on_every_rank=True):
        args = resolve_args(get_args_parser().parse_args(argv))
        run.check_output(args)
    with utils.one_line_errors():
        train(args)
    if utils.is_main_process() and not args.evaluate:
        print(f"Output: {args.output}", flush=True)
    utils.destroy_distributed()


def train(args):
    """Set up, then the epoch loop: train, validate, report, save."""
    device = setup_processes(args)
    train_set, val_set, classes = datasets(args)
    args.num_classes = args.num_classes or len(classes)
    steps_per_epoch = count_steps(train_set, args)
    model_without_ddp = build_model(args, device)
    optimizer, scheduler = create_optimizer(model_without_ddp, args, steps_per_epoch)
    precision, model_without_ddp, optimizer = utils.create_precision(
        device, model_without_ddp, optimizer, args.amp, args.amp_dtype, args.apex_amp, say=say)
    model_ema = utils.ModelEma(model_without_ddp, args.model_ema_decay) if args.model_ema else None
    model = distribute(model_without_ddp, device, precision, args)
    if args.evaluate:
        return evaluate(model_without_ddp, val_set, device, precision, args)
    state = run.TrainState()  # what a checkpoint holds besides these parts: epoch, step, best metric ...
    parts = dict(model=model_without_ddp, optimizer=optimizer, scheduler=scheduler, scaler=precision,
                 model_ema=model_ema.module if model_ema else None)
    if args.resume:
        run.load_checkpoint(args.resume, parts, state, args)
    run.create_output(args, utils.is_main_process())
    say(describe_run(args, model_without_ddp, train_set, val_set, device, steps_per_epoch, optimizer, scheduler))
    save = functools.partial(run.save_checkpoint, args.output, parts=parts, state=state, meta=dict(
        arch=args.model, num_classes=args.num_classes, classes=list(classes), args=run.plain_args(args)))
    stop, guard = run.StopSignals(device), run.NonFiniteGuard(device)
    epoch_logger = utils.EpochLogger(args.output, utils.is_main_process())
    if args.log_tensorboard and utils.is_main_process():
        utils.open_tensorboard(args.output, first_step=state.num_updates)
    val_loader = make_val_loader(val_set, device, args)
    first_epoch = state.epoch
    for epoch in range(first_epoch, args.epochs):
        settings = stage_settings(args, epoch)
        if args.progressive and epoch in (first_epoch, settings['epochs'][0]):
            say(describe_stage(settings, args))
        sampler = train_sampler(train_set, args, epoch, start_batch=state.step * args.grad_accum_steps)
        loader = make_loader(train_set, train_transform(settings, args), sampler, device, args)
        mixup = (transforms.MixupCutmix(settings['mixup'], args.cutmix, args.smoothing, args.num_classes)
                 if settings['mixup'] > 0 or args.cutmix > 0 else None)
        model_without_ddp.drop_rate = settings['drop']
        if state.step == 0 or state.epoch_lr is None:  # None: a checkpoint from before it was saved
            state.epoch_lr = optimizer.param_groups[0]['lr']
        images_per_sec = train_one_epoch(model, optimizer, scheduler, precision, loader, device, args, state,
                                         model_ema, mixup, guard, stop, save)
        if stop.signal:
            return run.stopped(stop, guard, state, save, args.output)
        if args.perf_steps and state.num_updates >= args.perf_steps:
            return
        evaluation, ema_evaluation = evaluate_epoch(model_without_ddp, model_ema, val_loader, device, precision,
                                                    args)
        finite = guard.check(state)  # after a non-finite loss: no new best metric, no checkpoint
        epoch_logger.log(epoch, float(state.loss_sum) / max(state.loss_count, 1), evaluation, ema_evaluation,
                         state.epoch_lr, images_per_sec, state.bad_images, step=state.num_updates)
        is_best = state.finish_epoch((ema_evaluation or evaluation)['top1'], finite)
        if finite:
            save(run.epoch_checkpoint_names(epoch, is_best, args.checkpoint_hist))
            if args.checkpoint_hist:
                run.remove_epoch_checkpoint(args.output, epoch - args.checkpoint_hist)
        if epoch + 1 < args.epochs and stop.requested():  # a signal during validation
            return run.stopped(stop, guard, state, save, args.output, saved=True)
    if state.best_metric is not None:
        say(f"*** Best metric: {state.best_metric} (epoch {state.best_epoch})")


def train_one_epoch(model, optimizer, scheduler, precision, loader, device, args, state, model_ema, mixup,
                    guard, stop, save):
    """The epoch from optimizer step state.step (0 unless resumed mid-epoch), timm's `Train:` line every
    --log-interval steps, a checkpoint every --checkpoint-interval steps; -> the epoch's images/s."""
    model.train()
    if args.freeze_bn:
        utils.freeze_batchnorm(model)
    num_steps = len(loader.batch_sampler) // args.grad_accum_steps
    last_step = num_steps - 1
    if args.perf_steps:  # the ModelZoo's throughput runs stop after --perf-steps steps
        last_step = min(last_step, state.step + args.perf_steps - state.num_updates - 1)
    logger = utils.TrainLogger(state.epoch, num_steps, last_step, args.log_interval, state, device)
    for batches in logger.log_every(loader, args.grad_accum_steps):
        loss, skipped = train_step(model, optimizer, precision, batches, device, args, model_ema, mixup)
        state.count_step(loss, bad_images=sum(int(bad.sum()) for *_, bad in batches))
        at_log_step = logger.update(loss, sum(len(labels) for _, labels, _ in batches),
                                    optimizer.param_groups[0]['lr'])
        scheduler.step()
        guard.update(loss, skipped)
        if at_log_step:
            guard.check(state)  # raises after too many non-finite losses in a row
        if stop.requested(at_log_step):
            break
        if args.checkpoint_interval and state.step % args.checkpoint_interval == 0 and state.step < num_steps \
                and guard.check(state):
            save(['last.pth.tar'])
    return logger.images_per_sec


def train_step(model, optimizer, precision, batches, device, args, model_ema=None, mixup=None):
    """One optimizer step over --grad-accum-steps micro-batches of (uint8 images, labels, bad counts):
    forward, loss, backward each; optimizer step; EMA update. -> (the global batch's mean loss, whether fp16's
    GradScaler skipped the step). Every rank gets the same loss (one all-reduce, no sync)."""
    optimizer.zero_grad(set_to_none=True)  # frees the last step's gradients before the activations
    losses = []
    for index, (images, labels, _) in enumerate(batches):
        images, labels = to_device(images, device, args), labels.to(device, non_blocking=True)
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
    return utils.mean_over_ranks(torch.stack(losses).mean()), skipped


def gradients_stay_local(model, accumulating):
    """DDP all-reduces the gradients in every backward; on the micro-batches before a step's last that would
    be wasted, so there they stay local (DDP's no_sync: its forward decides, so it spans the forward)."""
    return model.no_sync() if accumulating and hasattr(model, 'no_sync') else contextlib.nullcontext()


@torch.no_grad()
def validate(model, loader, device, precision, args, log_suffix=''):
    """Loss, top-1 and top-5 over the validation set, every image counted once whatever the number of
    processes; timm's `Test:` line, values over all ranks, every --log-interval batches."""
    model.eval()
    logger = utils.EvalLogger(args.log_interval, device, 'Test' + log_suffix, utils.is_main_process())
    empty_batch = (torch.zeros(0, 3, args.eval_size, args.eval_size, dtype=torch.uint8),
                   torch.zeros(0, dtype=torch.long))
    for images, labels, *_ in logger.log_every(loader, empty_batch):
        images, labels = to_device(images, device, args), labels.to(device)
        with precision.autocast():
            output = model(images)
        loss_sum = F.cross_entropy(output.float(), labels, reduction='sum')
        logger.update(loss_sum, utils.accuracy(output, labels), labels.shape[0])
    return logger.result()


def evaluate_epoch(model, model_ema, val_loader, device, precision, args):
    """timm's epoch end: each rank's BN statistics averaged, then the model and its EMA validated."""
    utils.average_bn_stats(model)
    evaluation = validate(model, val_loader, device, precision, args)
    if model_ema is None:
        return evaluation, None
    utils.average_bn_stats(model_ema.module)
    return evaluation, validate(model_ema.module, val_loader, device, precision, args, ' (EMA)')


def evaluate(model, val_set, device, precision, args):
    """--evaluate: validate the weights of --pretrained, or of --resume (and its EMA, if it has one)."""
    nets = {'': model}
    if args.resume:
        checkpoint = weights.read_checkpoint(args.resume)
        load_weights(model, checkpoint, use_ema=False)
        if checkpoint.get('model_ema'):
            nets[' (EMA)'] = load_weights(copy.deepcopy(model), checkpoint)
    loader = make_val_loader(val_set, device, args)
    for suffix, net in nets.items():
        result = validate(net, loader, device, precision, args, suffix)
        say(f"Evaluation{suffix}: loss {result['loss']:.4f}  top1 {result['top1']:.4f}  top5 {result['top5']:.4f}")


# ----------------------------------------------------------------------------------------------
# Set-up

def resolve_args(args):
    """Fill unset flags (the demo's or timm's defaults, the variant's config) and reject bad values."""
    args.data_path = args.data_path or args.data_dir
    if args.dataset is None:
        args.dataset = 'folder' if args.data_path else 'digits'
    if args.lr is not None and args.lr_base is not None:
        raise utils.UsageError(f"give --lr or --lr-base, not both (--lr {args.lr}, --lr-base {args.lr_base})")
    defaults = DEMO_DEFAULTS if args.dataset == 'digits' else {**TIMM_DEFAULTS, 'workers': utils.default_workers()}
    if args.dataset == 'digits' and args.progressive:
        defaults = {**defaults, **DEMO_PROGRESSIVE}
    if args.lr_base is not None:
        defaults = {key: value for key, value in defaults.items() if key != 'lr'}
    size_chosen = args.img_size is not None or 'img_size' in defaults
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    models.check_model_name(args.model, error=utils.UsageError)
    # Published weights are evaluated and fine-tuned with the settings they were measured with.
    published = args.pretrained is True
    config = models.published_config(args.model) if published else models.VARIANTS[args.model]['config']
    args.img_size = args.img_size or config['train_size']
    # Progressive learning trains up to the train size and evaluates at the test size, as does
    # --evaluate --pretrained (to compare with the published top-1).
    test_size = args.progressive or (args.evaluate and published)
    args.eval_size = args.eval_size or (config['test_size'] if test_size and not size_chosen else args.img_size)
    for key in ('crop_pct', 'interpolation', 'mean', 'std'):
        if getattr(args, key) is None:
            setattr(args, key, config[key])
    if args.opt_eps is None:  # timm's
        args.opt_eps = {'rmsproptf': 1e-10, 'adamw': 1e-8}.get(args.opt)
    if args.lr_base is not None:
        args.lr_base_scale = args.lr_base_scale or ('sqrt' if args.opt == 'adamw' else 'linear')  # timm 1.x's
        ratio = global_batch(args) / args.lr_base_size
        args.lr = args.lr_base * (ratio ** 0.5 if args.lr_base_scale == 'sqrt' else ratio)
    args.device = utils.device_type(args.device)  # 'auto' resolved: the same answer on every rank
    check_args(args)
    return args


def global_batch(args):
    """Images per optimizer step over all processes (the launcher's WORLD_SIZE: known before they meet)."""
    return args.batch_size * utils.distributed_env()[1] * args.grad_accum_steps


def check_args(args):
    for name in ('batch_size', 'grad_accum_steps', 'epochs', 'workers', 'log_interval', 'prog_stages',
                 'lr_base_size'):
        if getattr(args, name) < (0 if name == 'workers' else 1):
            raise utils.UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not args.lr > 0:
        raise utils.UsageError(f"the learning rate must be positive, got {args.lr}")
    for name in ('img_size', 'eval_size'):
        if getattr(args, name) < MIN_IMAGE_SIZE:
            raise utils.UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} is below the minimum "
                                   f"of {MIN_IMAGE_SIZE}")
    if args.progressive and not 0 < args.prog_min_size <= args.img_size:
        raise utils.UsageError(f"--prog-min-size {args.prog_min_size} must be between 1 and --img-size "
                               f"{args.img_size}; give a smaller --prog-min-size")
    if args.aa:
        transforms.parse_rand_augment(args.aa)  # raises DataError with a one-line message
    if args.color_jitter < 0:
        raise utils.UsageError(f"--color-jitter must be 0 or more, got {args.color_jitter}")
    if isinstance(args.pretrained, str) and os.path.isdir(args.pretrained):
        raise utils.UsageError(f"--pretrained takes a weights file or no value, and {args.pretrained} is a "
                               f"folder: put the data folder before --pretrained")
    if args.evaluate and not (args.resume or args.pretrained):
        raise utils.UsageError("--evaluate needs weights: give --resume PATH or --pretrained [PATH]")
    if args.resume == 'auto' and not args.output:
        raise utils.UsageError("--resume auto needs --output DIR (the run folder to continue)")
    if args.log_tensorboard and importlib.util.find_spec('tensorboard') is None:
        raise utils.UsageError("--log-tensorboard needs the tensorboard package: pip install tensorboard")
    if args.sync_bn and args.device == 'cpu':
        raise utils.UsageError("--sync-bn needs GPUs or NPUs: torch's SyncBatchNorm does not run on the "
                               "CPU (BN statistics are still averaged across ranks before eval)")


def count_steps(train_set, args):
    """Optimizer steps per epoch; a training set smaller than one global batch is refused before the model is
    built (said once: every rank finds the same)."""
    steps = len(train_sampler(train_set, args)) // args.grad_accum_steps
    if steps == 0:
        per_process = math.ceil(len(train_set) / utils.get_world_size()) // args.grad_accum_steps
        fix = f"give -b {per_process} or less" if per_process else "use fewer processes or --grad-accum-steps"
        with utils.one_line_errors(alike_on_every_rank=True):
            raise utils.UsageError(f"the training set has {len(train_set)} images, fewer than one global batch of "
                                   f"{global_batch(args)} (-b {args.batch_size} x {utils.get_world_size()} process"
                                   f"{'es' * (utils.get_world_size() > 1)} x --grad-accum-steps "
                                   f"{args.grad_accum_steps}); {fix}")
    return steps


def say(message):
    """Rank 0 prints (it alone logs)."""
    if utils.is_main_process():
        print(message, flush=True)


def describe_run(args, model, train_set, val_set, device, steps_per_epoch, optimizer, scheduler):
    """The run in two lines (rank 0), and a warning when the warm-up never ends."""
    world_size = utils.get_world_size()
    lr = f"lr {args.lr:.4g}" + (f" (--lr-base {args.lr_base:g} per {args.lr_base_size} images, {args.lr_base_scale})"
                                if args.lr_base is not None else '')
    accumulated = f" x {args.grad_accum_steps} accumulated" if args.grad_accum_steps > 1 else ''
    if utils.is_main_process() and 0 < args.epochs <= args.warmup_epochs:
        print(f"warning: the warm-up (--warmup-epochs {args.warmup_epochs}) covers the whole run (--epochs "
              f"{args.epochs}): the lr rises from --warmup-lr {args.warmup_lr:g} and never reaches {args.lr:g}; "
              f"give --warmup-epochs 0, or fewer than --epochs", file=sys.stderr, flush=True)
    return (f"Training {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on "
            f"{args.data_path or args.dataset}: {len(train_set)} train / {len(val_set)} val images "
            f"({getattr(train_set, 'source', type(train_set).__name__)}), {args.num_classes} classes; "
            f"{device.type}, {world_size} process{'es' * (world_size > 1)}\n"
            f"{args.epochs} epoch{'s' * (args.epochs != 1)} of {steps_per_epoch} steps, "
            f"batch {global_batch(args)} ({args.batch_size} per process{accumulated}), {lr}, "
            f"{type(optimizer).__name__}, {getattr(scheduler, 'sched', type(scheduler).__name__)} schedule")


def setup_processes(args):
    """This process's device and, under a launcher, the process group; seeds the initialization."""
    rank, world_size, local_rank = utils.distributed_env()
    device = utils.select_device(args.device, local_rank)
    if world_size > 1:
        utils.init_distributed(device, timeout_minutes=args.dist_timeout)
    torch.manual_seed(args.seed)
    return device


def build_model(args, device):
    """The network on its device, from --pretrained weights if given: what checkpoints and the EMA hold."""
    model = models.create_model(args.model, num_classes=args.num_classes, drop_rate=args.drop,
                                drop_path_rate=args.drop_path)
    if args.pretrained:
        path = fetch_published_weights(args.model) if args.pretrained is True else args.pretrained
        load_weights(model, weights.read_checkpoint(path))
    if args.sync_bn and utils.get_world_size() > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last is None:
        args.channels_last = utils.default_channels_last(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once (timm too)
    return model


def distribute(model_without_ddp, device, precision, args):
    """The module that trains: DDP with several processes, compiled with --compile."""
    model = model_without_ddp
    if utils.get_world_size() > 1:
        ids = [device.index] if device.type in ('cuda', 'npu') else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if args.compile:
        model = compile_model(model, precision, args)
    if utils.get_rank() > 0:  # the same initial weights above; from here on dropout, drop path, mixup and
        # random erasing draw per rank (timm seeds seed + rank), or the ranks would repeat one another
        torch.manual_seed(data.mix_seed(args.seed, utils.get_rank()))
    return model


def fetch_published_weights(name):
    """The variant's published weights, downloaded once per node: local rank 0 fetches them while
    the others wait, then find them in the cache."""
    local_rank = utils.distributed_env()[2]
    if local_rank == 0:
        path = weights.published_weights(name)
    utils.barrier()
    return path if local_rank == 0 else weights.published_weights(name, progress=False)


def load_weights(net, checkpoint, use_ema=True):
    """models.load_pretrained; rank 0 says its notes (a torchvision conversion, a new classifier)."""
    for note in models.load_pretrained(net, checkpoint, use_ema):
        say(note)
    return net


def compile_model(model, precision, args):
    """Only the training forward/backward is compiled: EMA, evaluation and checkpoints use the plain
    module (no `_orig_mod.` in saved keys). Static shapes: --progressive recompiles once per stage."""
    if precision.apex_optimizer is not None:
        raise utils.UsageError("--compile does not work with apex's patched functions; use --amp")
    config = torch._dynamo.config
    limit = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'  # torch < 2.7
    setattr(config, limit, max(getattr(config, limit), args.prog_stages + 1))
    return torch.compile(model, dynamic=False)


def stage_settings(args, epoch):
    """What the epoch trains with. Without --progressive: the flags. With it, the paper's progressive
    learning: image size, RandAugment magnitude, mixup and dropout rise by stage."""
    base = dict(stage=0, size=args.img_size, magnitude=None, mixup=args.mixup, drop=args.drop,
                epochs=(0, args.epochs - 1))
    if args.aa:
        base['magnitude'] = transforms.parse_rand_augment(args.aa)['magnitude']
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
                drop=lerp(min(args.prog_min_drop, args.drop), args.drop), epochs=(in_stage[0], in_stage[-1]))


def describe_stage(settings, args):
    first, last = settings['epochs']
    magnitude = 'off' if settings['magnitude'] is None else f"{settings['magnitude']:.2f}"
    compiles = ", torch.compile compiles once for this size" if args.compile else ''
    return (f"Stage {settings['stage'] + 1}/{args.prog_stages}: epochs {first}-{last}, image size "
            f"{settings['size']} (eval {args.eval_size}), RandAugment magnitude {magnitude}, mixup "
            f"{settings['mixup']:.3f}, dropout {settings['drop']:.3f}{compiles}")


def train_transform(settings, args):  # progressive learning: the stage's size and RandAugment magnitude
    return transforms.train_transform(
        settings['size'], scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, aa=args.aa,
        magnitude=settings['magnitude'], interpolation=args.interpolation, mean=args.mean,
        color_jitter=args.color_jitter)


def train_sampler(dataset, args, epoch=0, start_batch=0):
    sampler = data.EpochBatchSampler(len(dataset), args.batch_size, shuffle=True, seed=args.seed,
                                     rank=utils.get_rank(), world_size=utils.get_world_size(), drop_last=True)
    sampler.set_epoch(epoch, start_batch)
    return sampler


def make_val_loader(dataset, device, args):
    """Every image once over all ranks (rank r takes r, r + world_size, ...; no padding)."""
    transform = transforms.eval_transform(args.eval_size, crop_pct=args.crop_pct, interpolation=args.interpolation)
    sampler = data.EpochBatchSampler(len(dataset), args.batch_size, shuffle=False, rank=utils.get_rank(),
                                     world_size=utils.get_world_size(), drop_last=False)
    return make_loader(dataset, transform, sampler, device, args)


def make_loader(dataset, transform, sampler, device, args):
    return data.create_loader(data.transformed(dataset, transform), sampler, workers=args.workers,
                              pin_memory=device.type == 'cuda')


def to_device(images, device, args):
    """A uint8 batch from the loader -> normalized float32 on the device, in the run's memory format."""
    images = images.to(device, non_blocking=True)
    return transforms.normalize(images, args.mean, args.std, channels_last=args.channels_last)


if __name__ == '__main__':
    main()
