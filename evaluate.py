"""--evaluate, beside the copy (as timm keeps validate.py beside its train.py): the `Test:` lines and one
`Evaluation` line for given weights, a train.py checkpoint's (--resume: the model's and its EMA's) or any others
(--pretrained, loaded as training loads them). train.py imports this only for that flag.
"""

import copy

from checkpoint import read_checkpoint
from distributed import say
from errors import CheckpointError, UsageError, one_line


def evaluate(model, validate, args):
    """Validates `model` (holding --pretrained's weights, if given) or --resume's weights and EMA, each with
    validate(net, log_suffix=...), which returns a dict of loss, top1 and top5."""
    nets = {'': model}
    if args.resume:
        checkpoint = read_checkpoint(args.resume)
        arch = checkpoint.get('arch')
        if not isinstance(arch, str) or 'model' not in checkpoint:
            raise CheckpointError(f'{args.resume} is not a train.py checkpoint: give --pretrained PATH')
        if arch.split('.')[0] != args.model.split('.')[0]:
            raise UsageError(
                f'{args.resume} holds {arch}, not --model {args.model}: leave --model out to '
                f"evaluate it as the checkpoint's, or give --model {arch}"
            )
        load_state(model, checkpoint, 'model', args.resume)
        if checkpoint.get('model_ema'):
            nets[' (EMA)'] = load_state(copy.deepcopy(model), checkpoint, 'model_ema', args.resume)
    for suffix, net in nets.items():
        result = validate(net, log_suffix=suffix)
        say(f'Evaluation{suffix}: loss {result["loss"]:.4f}  top1 {result["top1"]:.4f}  top5 {result["top5"]:.4f}')


def load_state(net, checkpoint, key, path):
    """A train.py checkpoint's weights (`key`: 'model' or 'model_ema') into `net`; a mismatch is one line."""
    try:
        net.load_state_dict(checkpoint[key])
    except RuntimeError as error:  # another class count
        raise CheckpointError(f'{path} does not fit this model: {one_line(error).strip()}') from None
    return net
