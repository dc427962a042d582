"""train.py's command line: timm 0.5.4's flags (README, "Flags"), every default, the variant's settings, and the
checks of bad values, each a one-line error. It parses and checks; it reads no file (run.parse_command_line adds
the flags of -c FILE and what a --resume checkpoint names). Tests and bench.py use get_args_parser and resolve_args.
"""

import argparse
import importlib.util

import torch

import data
import devices
import distributed
import errors
import model as models
import optim
import transforms

# Every default is here, none in the parser. BY_DATA's pairs are (timm 0.5.4's, the zero-setup demo's): the demo's
# apply to `python train.py` without data (96-98% top-1, README), timm's to real data. Then DEFAULTS: augmentation
# and regularization; the optimizer and its schedule; the run; progressive learning.
BY_DATA = dict(
    model=('efficientnetv2_rw_t', 'tf_efficientnetv2_b0'),
    img_size=(None, 32),  # None: the variant's train size
    batch_size=(128, 64),
    epochs=(300, 15),
    opt=('sgd', 'adamw'),
    lr=(0.05, 2e-3),
    sched=('cosine', 'cosine'),
    warmup_epochs=(3, 0),
    weight_decay=(2e-5, 0.05),
    min_lr=(1e-6, 1e-5),
    scale=((0.08, 1.0), (0.5, 1.0)),
    hflip=(0.5, 0.0),
    color_jitter=(0.4, 0.0),
    log_interval=(50, 10),
    workers=(4, 0),  # timm's 4 loader processes per device: at most the cores per device
    model_ema_decay=(0.9998, 0.99),
    prog_min_size=(128, 24),
)
DEMO_PROGRESSIVE_EPOCHS = 30  # the demo's stages at 26, 28, 30, 32 px (with 15 epochs it ended at 94-96%)
DEFAULTS = dict(ratio=(3 / 4, 4 / 3), reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1, drop=0.0, drop_path=0.0)
DEFAULTS.update(momentum=0.9, warmup_lr=1e-4, decay_epochs=100, decay_rate=0.1, grad_accum_steps=1, lr_base_size=256)
DEFAULTS.update(device='auto', dist_timeout=30, seed=42, perf_steps=0, checkpoint_interval=0, checkpoint_hist=0)
DEFAULTS.update(prog_stages=4, prog_min_aa=5.0, prog_min_drop=0.1)
MIN_IMAGE_SIZE = 32  # the network's total stride


def default(key):
    """The help text's '(default: ...)' for a flag, from the tables above."""
    if key in BY_DATA:
        return f'(default: {BY_DATA[key][0]}; the demo: {BY_DATA[key][1]})'
    return f'(default: {DEFAULTS[key]})'


def get_args_parser():
    p = ArgumentParser(description="Train EfficientNetV2 with the Ascend ModelZoo recipe (timm 0.5.4's train.py)")
    p.add_argument('-c', '--config', metavar='FILE', help="flags from a YAML file, e.g. a run's args.yaml (timm's -c)")
    p.add_argument('data_dir', nargs='?', help='folder holding train/<class>/ and val/<class>/ (none: the demo)')
    p.add_argument('--data-path', '--data_path', '--data-dir', dest='data_path', help='the same as DATA_DIR')
    p.add_argument('--dataset', choices=data.DATASETS, help='(default: folder with a data path, else digits: the demo)')
    p.add_argument('--train-split', help='folder or split to train on (default: train)')
    p.add_argument('--val-split', help=f'held-out folder or split (default: the first of {", ".join(data.VAL_SPLITS)})')
    p.add_argument('--input-key', help='--dataset hf: the image column (default: the Image one)')
    p.add_argument('--target-key', help='--dataset hf: the label column (default: the first ClassLabel one)')
    p.add_argument('--model', help=f'variant or VARIANT.TAG, see python published.py {default("model")}')
    p.add_argument('--num-classes', type=int, help='classifier outputs (default: the number of class folders)')
    p.add_argument('--pretrained', nargs='?', const=True, metavar='PATH', help='initial weights (none: published)')
    p.add_argument('--img-size', type=int, help="train size (default: the variant's; the demo: 32)")
    p.add_argument('--eval-size', type=int, help='validation size (default: --img-size; --progressive: the test size)')
    p.add_argument('--crop-pct', type=float, help="eval resize = size / crop_pct (default: the variant's)")
    p.add_argument('--interpolation', choices=transforms.INTERPOLATIONS, help="resize (default: the variant's)")
    p.add_argument('--mean', type=float, nargs=3, help="normalization (default: the variant's)")
    p.add_argument('--std', type=float, nargs=3, help="normalization (default: the variant's)")
    p.add_argument('--scale', type=float, nargs=2, help=f'RandomResizedCrop area range {default("scale")}')
    p.add_argument('--ratio', type=float, nargs=2, help='RandomResizedCrop aspect range (default: 3/4 4/3)')
    p.add_argument('--hflip', type=float, help=f'horizontal flip probability {default("hflip")}')
    p.add_argument('--aa', help="RandAugment in timm's grammar, e.g. rand-m9-mstd0.5 (default: none)")
    p.add_argument('--color-jitter', type=float, help=f'colour jitter, without --aa {default("color_jitter")}')
    p.add_argument('--reprob', type=float, help=f'random erasing probability {default("reprob")}')
    p.add_argument('--mixup', type=float, help=f'mixup alpha, 0: off {default("mixup")}')
    p.add_argument('--cutmix', type=float, help=f'cutmix alpha, 0: off {default("cutmix")}')
    p.add_argument('--smoothing', type=float, help=f'label smoothing {default("smoothing")}')
    p.add_argument('--drop', type=float, help=f'classifier dropout {default("drop")}')
    p.add_argument('--drop-path', '--drop-connect', type=float, help=f"last block's drop rate {default('drop_path')}")
    p.add_argument('-b', '--batch-size', type=int, help=f'per device {default("batch_size")}')
    p.add_argument('--grad-accum-steps', type=int, help=f'micro-batches per step {default("grad_accum_steps")}')
    p.add_argument('--epochs', type=int, help=f'epochs to train {default("epochs")}')
    p.add_argument('--opt', choices=('rmsproptf', 'sgd', 'adamw'), help=f'sgd is Nesterov {default("opt")}')
    p.add_argument('--opt-eps', type=float, help='optimizer epsilon (default: 1e-10 for rmsproptf, 1e-8 for adamw)')
    p.add_argument('--momentum', type=float, help=f'rmsproptf and sgd {default("momentum")}')
    p.add_argument('--weight-decay', type=float, help=f'none on biases and BN {default("weight_decay")}')
    p.add_argument('--clip-grad', type=float, help='max gradient norm (default: no clipping)')
    p.add_argument('--sched', choices=optim.SCHEDULES, help=f'lr per epoch {default("sched")}')
    p.add_argument('--lr', type=float, help=f'learning rate, as given {default("lr")}')
    p.add_argument('--lr-base', type=float, help='instead of --lr: the lr for a global batch of --lr-base-size')
    p.add_argument('--lr-base-size', type=int, help=f'the global batch --lr-base is for {default("lr_base_size")}')
    p.add_argument('--lr-base-scale', choices=('linear', 'sqrt'), help='(default: sqrt for adamw, else linear)')
    p.add_argument('--warmup-lr', type=float, help=f'lr of the first warm-up epoch {default("warmup_lr")}')
    p.add_argument('--warmup-epochs', type=int, help=f'linear warm-up from --warmup-lr {default("warmup_epochs")}')
    p.add_argument('--min-lr', type=float, help=f'end of the cosine {default("min_lr")}')
    p.add_argument('--decay-epochs', type=float, help=f'step schedule: epochs per decay {default("decay_epochs")}')
    p.add_argument('--decay-rate', type=float, help=f'step schedule: lr factor per decay {default("decay_rate")}')
    p.add_argument('--model-ema', action='store_true', help='keep, validate and report an EMA of the weights')
    p.add_argument('--model-ema-decay', type=float, help=f'EMA decay per step {default("model_ema_decay")}')
    p.add_argument('--amp', action='store_true', help='native mixed precision')
    p.add_argument('--amp-dtype', choices=('float16', 'bfloat16'), help='(default: float16; on the CPU bfloat16)')
    p.add_argument('--apex-amp', action='store_true', help='NVIDIA apex O1 where it imports, else --amp')
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, help='NHWC (default: on but on NPUs)')
    p.add_argument('--compile', action='store_true', help='torch.compile the training forward/backward')
    p.add_argument('--sync-bn', action='store_true', help='BN batch statistics over all GPUs/NPUs')
    p.add_argument('--freeze-bn', action='store_true', help='BN uses and keeps its running statistics')
    p.add_argument('--device', choices=('auto', 'cuda', 'npu', 'cpu'), help='auto: cuda, else npu, else cpu')
    p.add_argument('--dist-timeout', type=float, help=f'minutes a collective may wait {default("dist_timeout")}')
    p.add_argument('-j', '--workers', type=int, help=f'loader processes per device {default("workers")}')
    p.add_argument('--seed', type=int, help=f'data order, augmentation and initialization {default("seed")}')
    p.add_argument('--log-interval', type=int, help=f'steps between log lines {default("log_interval")}')
    p.add_argument('--log-tensorboard', action='store_true', help='TensorBoard scalars in --output too')
    p.add_argument('--perf-steps', type=int, help='stop after N steps, no validation (default: 0, off)')
    p.add_argument('--output', help='run folder (default: output/train/<time>-<model>-<size>)')
    p.add_argument('--resume', metavar='PATH|auto', help="continue from a checkpoint; auto: --output's, if any")
    p.add_argument('--checkpoint-interval', type=int, help='also save every N steps (default: 0, off)')
    p.add_argument('--checkpoint-hist', type=int, help='keep the last K epoch checkpoints (default: 0)')
    p.add_argument('--evaluate', action='store_true', help='validate --resume or --pretrained only')
    p.add_argument('--strict-data', action='store_true', help='an unreadable image is an error')
    p.add_argument('--skip-bad-shards', action='store_true', help='--dataset wds: leave out unreadable shards')
    p.add_argument('--progressive', action='store_true', help="the paper's progressive learning (progressive.py)")
    p.add_argument('--prog-stages', type=int, help=f'progressive learning: stages {default("prog_stages")}')
    p.add_argument('--prog-min-size', type=int, help=f'progressive: first size {default("prog_min_size")}')
    p.add_argument('--prog-min-aa', type=float, help=f'progressive: first RandAugment m {default("prog_min_aa")}')
    p.add_argument('--prog-min-drop', type=float, help=f'progressive: first dropout {default("prog_min_drop")}')
    p.add_argument('--local-rank', '--local_rank', type=int, help=argparse.SUPPRESS)  # torch.distributed.launch's
    return p


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's whole usage
        choices_in_code = message.startswith(('argument --opt:', 'argument --sched:'))
        where = '; another goes in create_optimizer() in train.py' if choices_in_code else ''
        self.exit(2, f'error: {message}{where} (python train.py --help lists the flags)\n')


def resolve_args(args):
    """Fill unset flags (the tables above, the variant's config) and reject bad values."""
    args.data_path = args.data_path or args.data_dir
    if args.dataset is None:
        args.dataset = 'folder' if args.data_path else 'digits'
    if args.lr is not None and args.lr_base is not None:
        raise errors.UsageError(f'give --lr or --lr-base, not both (--lr {args.lr}, --lr-base {args.lr_base})')
    demo = args.dataset == 'digits'
    by_data = {key: pair[demo] for key, pair in BY_DATA.items()}
    if demo and args.progressive:
        by_data['epochs'] = DEMO_PROGRESSIVE_EPOCHS
    if not demo:
        by_data['workers'] = devices.default_workers()
    if args.lr_base is not None:
        del by_data['lr']
    size_chosen = args.img_size is not None or by_data['img_size'] is not None
    for key, value in {**DEFAULTS, **by_data}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    models.check_model_name(args.model, error=errors.UsageError)
    resolve_image_settings(args, size_chosen)
    if args.opt_eps is None:  # timm's
        args.opt_eps = {'rmsproptf': 1e-10, 'adamw': 1e-8}.get(args.opt)
    if args.lr_base is not None:
        args.lr_base_scale = args.lr_base_scale or ('sqrt' if args.opt == 'adamw' else 'linear')  # timm 1.x's
        ratio = global_batch(args) / args.lr_base_size
        args.lr = args.lr_base * (ratio**0.5 if args.lr_base_scale == 'sqrt' else ratio)
    args.rand_augment = transforms.parse_rand_augment(args.aa) if args.aa else None  # --aa's options, or None
    args.device = devices.device_type(args.device)  # 'auto' resolved: the same answer on every rank
    if args.channels_last is None:
        args.channels_last = devices.default_channels_last(torch.device(args.device))
    check_args(args)
    return args


def model_config(name, published_weights=False):
    """--model NAME's settings: a tag's (with its weights or not, as timm's create_model), else the variant's."""
    if published_weights or '.' in name:  # the default weights' settings for a bare name
        return errors.import_beside('published', 'the published weights').published_config(name)
    return models.VARIANTS[name]['config']


def resolve_image_settings(args, size_chosen):
    """Sizes, crop, interpolation and normalization left unset: the variant's (published weights are evaluated and
    fine-tuned with the settings they were measured with). Progressive learning trains up to the train size and
    evaluates at the test size, as does --evaluate --pretrained (to compare with the published top-1)."""
    published = args.pretrained is True
    config = model_config(args.model, published)
    args.img_size = args.img_size or config['train_size']
    test_size = args.progressive or (args.evaluate and published)
    args.eval_size = args.eval_size or (config['test_size'] if test_size and not size_chosen else args.img_size)
    for key in ('crop_pct', 'interpolation', 'mean', 'std'):
        if getattr(args, key) is None:
            setattr(args, key, config[key])


def global_batch(args):
    """Images per optimizer step over all processes (the launcher's WORLD_SIZE: known before they meet)."""
    return args.batch_size * distributed.distributed_env()[1] * args.grad_accum_steps


def check_args(args):
    for name in ('batch_size', 'grad_accum_steps', 'epochs', 'workers', 'log_interval', 'prog_stages', 'lr_base_size'):
        if getattr(args, name) < (0 if name == 'workers' else 1):
            raise errors.UsageError(f'--{name.replace("_", "-")} must be positive, got {getattr(args, name)}')
    if not args.lr > 0:
        raise errors.UsageError(f'the learning rate must be positive, got {args.lr}')
    for name in ('img_size', 'eval_size'):
        if getattr(args, name) < MIN_IMAGE_SIZE:
            size = getattr(args, name)
            raise errors.UsageError(f'--{name.replace("_", "-")} {size} is below the minimum of {MIN_IMAGE_SIZE}')
    if args.progressive and not 0 < args.prog_min_size <= args.img_size:
        raise errors.UsageError(
            f'--prog-min-size {args.prog_min_size} must be between 1 and --img-size {args.img_size}'
        )
    if args.color_jitter < 0:
        raise errors.UsageError(f'--color-jitter must be 0 or more, got {args.color_jitter}')
    if args.evaluate and not (args.resume or args.pretrained):
        raise errors.UsageError('--evaluate needs weights: give --resume PATH or --pretrained [PATH]')
    if args.log_tensorboard and importlib.util.find_spec('tensorboard') is None:
        raise errors.UsageError('--log-tensorboard needs the tensorboard package: pip install tensorboard')
    if args.sync_bn and args.device == 'cpu':
        raise errors.UsageError(
            "--sync-bn needs GPUs or NPUs: torch's SyncBatchNorm does not run on the CPU (BN statistics are "
            'still averaged across ranks before eval)'
        )
