"""train.py's command line: timm 0.5.4's flags (README, "Flags"), the demo's and timm's defaults, the variant's
settings, the checks of bad values (one line each). Tests and bench.py use get_args_parser() and resolve_args()."""

import argparse
import importlib.util
import os

import torch

import data
import distributed
import errors
import model as models
import optim
import run
import transforms
import weights

# The zero-setup demo (python train.py), measured in the README: 96-98% top-1 (10 epochs: 95.8%).
DEMO_DEFAULTS = dict(
    model='tf_efficientnetv2_b0',
    img_size=32,
    batch_size=64,
    epochs=15,
    opt='adamw',
    lr=2e-3,
    sched='cosine',
    warmup_epochs=0,
    weight_decay=0.05,
    min_lr=1e-5,
    scale=(0.5, 1.0),
    hflip=0.0,
    color_jitter=0.0,
    log_interval=10,
    workers=0,
    model_ema_decay=0.99,
    prog_min_size=24,
)
# `--progressive` on the demo: stages at 26, 28, 30, 32 px over 30 epochs (with 15 it ended at 94-96%).
DEMO_PROGRESSIVE = dict(epochs=30)
# timm 0.5.4's defaults for what the user leaves unset on real data; workers: at most the cores.
TIMM_DEFAULTS = dict(
    model='efficientnetv2_rw_t',
    batch_size=128,
    epochs=300,
    opt='sgd',
    lr=0.05,
    sched='cosine',
    warmup_epochs=3,
    weight_decay=2e-5,
    min_lr=1e-6,
    scale=(0.08, 1.0),
    hflip=0.5,
    color_jitter=0.4,
    log_interval=50,
    workers=4,
    model_ema_decay=0.9998,
    prog_min_size=128,
)
MIN_IMAGE_SIZE = 32  # the network's total stride


def default(key):
    return f'(default: {TIMM_DEFAULTS[key]}; the demo: {DEMO_DEFAULTS[key]})'


def get_args_parser():
    p = ArgumentParser(
        description="Train EfficientNetV2 with the Ascend ModelZoo recipe (timm 0.5.4's train.py)",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        '-c',
        '--config',
        metavar='FILE',
        help="flags from a YAML file (timm's -c), e.g. a run's args.yaml to repeat that run; the command "
        'line overrides them; output, resume and local_rank are not taken from it',
    )
    p.add_argument('data_dir', nargs='?', help='folder holding train/<class>/ and val/<class>/ (none: the demo)')
    p.add_argument('--data-path', '--data_path', '--data-dir', dest='data_path', help='the same as DATA_DIR')
    p.add_argument(
        '--dataset',
        choices=data.DATASETS,
        help='where images come from (default: folder with a data path, else the digits demo)',
    )
    p.add_argument('--train-split', help='folder or split to train on (default: train)')
    p.add_argument('--val-split', help=f'held-out folder or split (default: the first of {", ".join(data.VAL_SPLITS)})')
    p.add_argument('--input-key', help='--dataset hf: the image column (default: the Image one)')
    p.add_argument('--target-key', help='--dataset hf: the label column (default: the first ClassLabel one)')
    p.add_argument('--model', help=f'variant or VARIANT.TAG (weights), see python published.py {default("model")}')
    p.add_argument('--num-classes', type=int, help='classifier outputs (default: the number of class folders)')
    p.add_argument(
        '--pretrained',
        nargs='?',
        const=True,
        metavar='PATH',
        help='start from weights: no value: the published weights --model names '
        '(downloaded once); PATH: a timm, torchvision or train.py file',
    )
    p.add_argument('--img-size', type=int, help="train size (default: the variant's; the demo: 32)")
    p.add_argument('--eval-size', type=int, help='validation size (default: --img-size; --progressive: the test size)')
    p.add_argument('--crop-pct', type=float, help="eval resize = size / crop_pct (default: the variant's)")
    p.add_argument('--interpolation', choices=transforms.INTERPOLATIONS, help="resize (default: the variant's)")
    p.add_argument('--mean', type=float, nargs=3, help="normalization (default: the variant's)")
    p.add_argument('--std', type=float, nargs=3, help="normalization (default: the variant's)")
    p.add_argument('--scale', type=float, nargs=2, help=f'RandomResizedCrop area range {default("scale")}')
    p.add_argument(
        '--ratio', type=float, nargs=2, default=(3 / 4, 4 / 3), help='RandomResizedCrop aspect range (default: 3/4 4/3)'
    )
    p.add_argument('--hflip', type=float, help=f'horizontal flip probability {default("hflip")}')
    p.add_argument('--aa', help="RandAugment in timm's grammar, e.g. rand-m9-mstd0.5 (default: none)")
    p.add_argument('--color-jitter', type=float, help=f'colour jitter, without --aa {default("color_jitter")}')
    p.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    p.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (0: off)')
    p.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (0: off)')
    p.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    p.add_argument('--drop', type=float, default=0.0, help='classifier dropout')
    p.add_argument(
        '--drop-path',
        '--drop-connect',
        dest='drop_path',
        type=float,
        default=0.0,
        help='stochastic depth rate of the last block',
    )
    p.add_argument('-b', '--batch-size', type=int, help=f'per device {default("batch_size")}')
    p.add_argument(
        '--grad-accum-steps',
        type=int,
        default=1,
        help='micro-batches of -b per optimizer step: global batch = b x devices x this',
    )
    p.add_argument('--epochs', type=int, help=f'epochs to train {default("epochs")}')
    p.add_argument('--opt', choices=('rmsproptf', 'sgd', 'adamw'), help=f'sgd is Nesterov {default("opt")}')
    p.add_argument('--opt-eps', type=float, help='optimizer epsilon (default: 1e-10 for rmsproptf, 1e-8 for adamw)')
    p.add_argument('--momentum', type=float, default=0.9, help='rmsproptf and sgd')
    p.add_argument('--weight-decay', type=float, help=f'none on biases and BN {default("weight_decay")}')
    p.add_argument('--clip-grad', type=float, help='max gradient norm (default: no clipping)')
    p.add_argument('--sched', choices=optim.SCHEDULES, help=f'lr per epoch {default("sched")}')
    p.add_argument('--lr', type=float, help=f'learning rate, as given {default("lr")}')
    p.add_argument(
        '--lr-base',
        type=float,
        help="instead of --lr: the lr for a global batch of --lr-base-size, scaled to this run's",
    )
    p.add_argument('--lr-base-size', type=int, default=256, help='the global batch --lr-base is given for')
    p.add_argument(
        '--lr-base-scale',
        choices=('linear', 'sqrt'),
        help='how --lr-base scales with the global batch (default: sqrt for adamw, else linear)',
    )
    p.add_argument('--warmup-lr', type=float, default=1e-4, help='lr of the first warm-up epoch')
    p.add_argument('--warmup-epochs', type=int, help=f'linear warm-up from --warmup-lr {default("warmup_epochs")}')
    p.add_argument('--min-lr', type=float, help=f'end of the cosine {default("min_lr")}')
    p.add_argument('--decay-epochs', type=float, default=100, help='step schedule: epochs per decay')
    p.add_argument('--decay-rate', type=float, default=0.1, help='step schedule: lr factor per decay')
    p.add_argument('--model-ema', action='store_true', help='keep, validate and report an EMA of the weights')
    p.add_argument('--model-ema-decay', type=float, help=f'EMA decay per step {default("model_ema_decay")}')
    p.add_argument('--amp', action='store_true', help='native mixed precision')
    p.add_argument('--amp-dtype', choices=('float16', 'bfloat16'), help='(default: float16; on the CPU bfloat16)')
    p.add_argument('--apex-amp', action='store_true', help='NVIDIA apex O1 where it imports, else --amp')
    p.add_argument(
        '--channels-last',
        action=argparse.BooleanOptionalAction,
        help='NHWC activations (default: on for CUDA and the CPU, off for the NPU)',
    )
    p.add_argument('--compile', action='store_true', help='torch.compile the training forward/backward')
    p.add_argument('--sync-bn', action='store_true', help='BN batch statistics over all GPUs/NPUs')
    p.add_argument('--freeze-bn', action='store_true', help='BN uses and keeps its running statistics')
    p.add_argument(
        '--device',
        default='auto',
        choices=('auto', 'cuda', 'npu', 'cpu'),
        help='auto: cuda, else npu (with torch_npu), else cpu',
    )
    p.add_argument('--dist-timeout', type=float, default=30, help='minutes a collective may wait')
    p.add_argument(
        '-j',
        '--workers',
        type=int,
        help='loader processes per device (default: 4, at most the cores per device; the demo: 0)',
    )
    p.add_argument('--seed', type=int, default=42, help='data order, augmentation and initialization')
    p.add_argument('--log-interval', type=int, help=f'steps between log lines {default("log_interval")}')
    p.add_argument(
        '--log-tensorboard',
        action='store_true',
        help='also write TensorBoard scalars into --output (pip install tensorboard)',
    )
    p.add_argument('--perf-steps', type=int, default=0, help='stop after N steps, no validation (0: off)')
    p.add_argument('--output', help='run folder (default: output/train/<time>-<model>-<size>)')
    p.add_argument(
        '--resume',
        metavar='PATH|auto',
        help="continue from a checkpoint; auto: --output's last.pth.tar, or a fresh start if there is none",
    )
    p.add_argument('--checkpoint-interval', type=int, default=0, help='also save every N steps (0: off)')
    p.add_argument('--checkpoint-hist', type=int, default=0, help='keep the last K epoch checkpoints')
    p.add_argument('--evaluate', action='store_true', help='validate --resume or --pretrained only')
    p.add_argument('--strict-data', action='store_true', help='an unreadable image is an error')
    p.add_argument('--skip-bad-shards', action='store_true', help='--dataset wds: leave out unreadable shards')
    p.add_argument('--progressive', action='store_true', help="the paper's progressive learning")
    p.add_argument('--prog-stages', type=int, default=4, help='progressive learning: stages')
    p.add_argument('--prog-min-size', type=int, help=f'progressive: first size {default("prog_min_size")}')
    p.add_argument('--prog-min-aa', type=float, default=5.0, help='progressive: first RandAugment magnitude')
    p.add_argument('--prog-min-drop', type=float, default=0.1, help='progressive: first dropout')
    p.add_argument('--local-rank', '--local_rank', type=int, help=argparse.SUPPRESS)  # torch.distributed.launch
    return p


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's whole usage
        choices_in_code = message.startswith(('argument --opt:', 'argument --sched:'))
        where = '; another goes in create_optimizer() in train.py' if choices_in_code else ''
        self.exit(2, f'error: {message}{where} (python train.py --help lists the flags)\n')


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only: flags resolved after parsing say theirs in their help text."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or '(default' in action.help:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    """The command line over -c FILE's flags: the file's values replace the parser's defaults."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**read_config(args.config, {action.dest for action in parser._actions}))
        args = parser.parse_args(argv)
    return args


NOT_FROM_CONFIG = ('output', 'resume', 'local_rank', 'config')  # they name one run, not a recipe


def read_config(path, flag_names):
    """A YAML mapping of flags by their argparse names (batch_size: 256), as args.yaml holds them."""
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as error:
        raise errors.UsageError(f'cannot read -c {path}: {error.strerror}') from None
    except yaml.YAMLError as error:
        raise errors.UsageError(f'-c {path} is not YAML: {errors.one_line(error)}') from None
    if not isinstance(config, dict):
        raise errors.UsageError(f"-c {path} holds no flags: give one per line, e.g. 'lr: 0.014'")
    unknown = sorted(set(config) - set(flag_names) - {'rand_augment'})  # args.yaml's --aa, parsed
    if unknown:
        raise errors.UsageError(f'-c {path}: unknown flags {", ".join(unknown)} (python train.py --help lists them)')
    if config.get('lr_base') is not None:
        config.pop('lr', None)  # args.yaml's lr is the one --lr-base gave: --lr-base again gives it
    return {key: value for key, value in config.items() if key in flag_names and key not in NOT_FROM_CONFIG}


def resolve_args(args):
    """Fill unset flags (the demo's or timm's defaults, the variant's config) and reject bad values."""
    args.data_path = args.data_path or args.data_dir
    if args.dataset is None:
        args.dataset = 'folder' if args.data_path else 'digits'
    if args.lr is not None and args.lr_base is not None:
        raise errors.UsageError(f'give --lr or --lr-base, not both (--lr {args.lr}, --lr-base {args.lr_base})')
    timm_defaults = {**TIMM_DEFAULTS, 'workers': distributed.default_workers()}
    defaults = DEMO_DEFAULTS if args.dataset == 'digits' else timm_defaults
    if args.dataset == 'digits' and args.progressive:
        defaults = {**defaults, **DEMO_PROGRESSIVE}
    if args.lr_base is not None:
        defaults = {key: value for key, value in defaults.items() if key != 'lr'}
    run.resolve_resume(args)  # --resume auto: the run folder's last.pth.tar, or none
    if args.model is None and args.resume:  # the checkpoint's variant and image settings, where not given
        for key, value in run.checkpoint_settings(args.resume).items():
            setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    size_chosen = args.img_size is not None or 'img_size' in defaults
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    models.check_model_name(args.model, error=errors.UsageError)
    # Published weights are evaluated and fine-tuned with the settings they were measured with.
    published = args.pretrained is True
    config = weights.model_config(args.model, published)
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
        args.lr = args.lr_base * (ratio**0.5 if args.lr_base_scale == 'sqrt' else ratio)
    args.rand_augment = transforms.parse_rand_augment(args.aa) if args.aa else None  # --aa's options, or None
    args.device = distributed.device_type(args.device)  # 'auto' resolved: the same answer on every rank
    if args.channels_last is None:
        args.channels_last = distributed.default_channels_last(torch.device(args.device))
    check_args(args)
    run.check_output(args)  # the run folder's name
    return args


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
            raise errors.UsageError(
                f'--{name.replace("_", "-")} {getattr(args, name)} is below the minimum of {MIN_IMAGE_SIZE}'
            )
    if args.progressive and not 0 < args.prog_min_size <= args.img_size:
        raise errors.UsageError(
            f'--prog-min-size {args.prog_min_size} must be between 1 and --img-size '
            f'{args.img_size}; give a smaller --prog-min-size'
        )
    if args.color_jitter < 0:
        raise errors.UsageError(f'--color-jitter must be 0 or more, got {args.color_jitter}')
    if isinstance(args.pretrained, str) and os.path.isdir(args.pretrained):
        raise errors.UsageError(
            f'--pretrained takes a weights file or no value, and {args.pretrained} is a '
            f'folder: put the data folder before --pretrained'
        )
    if args.evaluate and not (args.resume or args.pretrained):
        raise errors.UsageError('--evaluate needs weights: give --resume PATH or --pretrained [PATH]')
    if args.log_tensorboard and importlib.util.find_spec('tensorboard') is None:
        raise errors.UsageError('--log-tensorboard needs the tensorboard package: pip install tensorboard')
    if args.sync_bn and args.device == 'cpu':
        raise errors.UsageError(
            "--sync-bn needs GPUs or NPUs: torch's SyncBatchNorm does not run on the "
            'CPU (BN statistics are still averaged across ranks before eval)'
        )
