"""Progressive learning, the EfficientNetV2 paper's method (section 4), beside the copy: training is split into
--prog-stages stages, and the image size, RandAugment's magnitude, mixup and dropout rise from stage to stage.
train.py imports this only for --progressive.

    settings = stage_settings(args, epoch)   # size, magnitude, mixup, drop; the stage and its epochs; its line
"""


def stage_settings(args, epoch, first_epoch=0):
    """What `epoch` trains with, a pure function of the epoch (resuming needs nothing else), and at a stage's first
    epoch (or the run's first) the `line` that says so."""
    stages = args.prog_stages

    def stage_of(e):
        return min(e * stages // args.epochs, stages - 1)

    stage = stage_of(epoch)
    in_stage = [e for e in range(args.epochs) if stage_of(e) == stage]
    # The size's first stage is already a step up from the minimum (the paper's V2-S: 171, 214, 257, 300);
    # the others start at their minimum and reach the flag's value in the last stage.
    size = args.prog_min_size + (args.img_size - args.prog_min_size) * (stage + 1) // stages
    ratio = stage / max(stages - 1, 1)

    def lerp(low, high):
        return low + (high - low) * ratio

    magnitude = args.rand_augment['magnitude'] if args.rand_augment else None
    if magnitude is not None:  # a minimum above the flag's value is capped to it: regularization never falls
        magnitude = lerp(min(args.prog_min_aa, magnitude), magnitude)
    settings = dict(
        stage=stage,
        size=size,
        magnitude=magnitude,
        mixup=lerp(0.0, args.mixup),
        drop=lerp(min(args.prog_min_drop, args.drop), args.drop),
        epochs=(in_stage[0], in_stage[-1]),
    )
    settings['line'] = describe_stage(settings, args) if epoch in (first_epoch, in_stage[0]) else None
    return settings


def describe_stage(settings, args):
    first, last = settings['epochs']
    magnitude = 'off' if settings['magnitude'] is None else f'{settings["magnitude"]:.2f}'
    compiles = ', torch.compile compiles once for this size' if args.compile else ''
    return (
        f'Stage {settings["stage"] + 1}/{args.prog_stages}: epochs {first}-{last}, image size '
        f'{settings["size"]} (eval {args.eval_size}), RandAugment magnitude {magnitude}, mixup '
        f'{settings["mixup"]:.3f}, dropout {settings["drop"]:.3f}{compiles}'
    )
