"""-c FILE, timm's: flags from a YAML file, beside the copy. A run's args.yaml holds every flag of the run, so
`python train.py -c RUN/args.yaml --output NEW` repeats it; the command line overrides the file. run.py imports this
only for -c.
"""

from errors import UsageError, one_line

NOT_FROM_CONFIG = ('output', 'resume', 'local_rank', 'config')  # a run's own, not its recipe's


def parse_with_config(parser, argv, path):
    """The command line parsed again with the flags of the file at `path` as the parser's defaults."""
    parser.set_defaults(**read_config(path, {action.dest for action in parser._actions}))
    return parser.parse_args(argv)


def read_config(path, flag_names):
    """A YAML mapping of flags by their argparse names (batch_size: 256), as a run's args.yaml holds them, without
    NOT_FROM_CONFIG's."""
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as error:
        raise UsageError(f'cannot read -c {path}: {error.strerror}') from None
    except yaml.YAMLError as error:
        raise UsageError(f'-c {path} is not YAML: {one_line(error)}') from None
    if not isinstance(config, dict):
        raise UsageError(f"-c {path} holds no flags: give one per line, e.g. 'lr: 0.014'")
    config.pop('rand_augment', None)  # args.yaml's --aa, parsed: --aa gives it again
    unknown = sorted(set(config) - flag_names)
    if unknown:
        raise UsageError(f'-c {path}: unknown flags {", ".join(unknown)} (python train.py --help lists them)')
    if config.get('lr_base') is not None:
        config.pop('lr', None)  # args.yaml's lr is the one --lr-base gave: --lr-base gives it again
    return {key: value for key, value in config.items() if key not in NOT_FROM_CONFIG}
