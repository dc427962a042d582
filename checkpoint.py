"""Checkpoints, and files written whole. A checkpoint is one dict: each named part's state_dict (model, optimizer,
scheduler, scaler, model_ema), the TrainState's fields, the run's facts (arch, classes, args) and, per rank, its
random streams and BatchNorm statistics, so a resumed run ends bit for bit as an uninterrupted one (the data order
and augmentations are functions of seed, epoch and index: data.py). atomic_write never leaves half a file, whether
the process is killed or the disk is full.

    save_checkpoint(folder, ['model_best.pth.tar', 'last.pth.tar'], parts, state, meta)   # written once, linked
    load_checkpoint(path, parts, state, args, num_classes)
"""

import argparse
import contextlib
import errno
import os
import random
import shutil
import sys
import zipfile
from dataclasses import fields

import torch
import torch.distributed as dist

import data
import devices
from distributed import get_rank, get_world_size, is_main_process, say
from errors import CheckpointError, UsageError, one_line

RESUME_FREE_ARGS = {  # flags that do not change what the run computes: they may differ on resume without a warning
    *'data_dir data_path output resume config workers log_interval device num_classes checkpoint_interval'.split(),
    *'checkpoint_hist dist_timeout local_rank evaluate perf_steps pretrained strict_data log_tensorboard'.split(),
}
# What a checkpoint says of its run's images, for a run that names no --model (run.parse_command_line).
VARIANT_SETTINGS = ('img_size', 'eval_size', 'crop_pct', 'interpolation', 'mean', 'std')
# timm's train.py stores its arguments, an argparse.Namespace (a plain attribute bag), in every checkpoint; allow that
# one class as timm does. torch < 2.5 has no allow-list and refuses them.
_allow_globals = getattr(torch.serialization, 'safe_globals', lambda _: contextlib.nullcontext())


def read_checkpoint(path, mmap=False):
    """A checkpoint file's dict, tensors and plain Python types only, never code: torch.load with
    weights_only=True, or the safetensors package for a .safetensors file (timm's hub). A missing,
    broken or unsafe file is a CheckpointError of one line. mmap: tensors read only where used."""
    is_safetensors = str(path).endswith('.safetensors')
    try:
        if is_safetensors:
            import safetensors.torch  # timm's published files only

            return safetensors.torch.load_file(path)
        with _allow_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f'checkpoint not found: {path}') from None
    except Exception as e:  # unpickling errors, truncated files, foreign formats
        if is_safetensors:
            raise CheckpointError(f'cannot read {path} as a safetensors file: {one_line(e)}') from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        if lines[0].startswith('Weights only load failed'):  # torch names the refused callable
            detail = next((line for line in lines if 'GLOBAL' in line), lines[-1])
            raise CheckpointError(
                f'refused to load {path}: it holds Python objects beyond tensors and plain types, which '
                f'unpickling could run as code ({detail.rstrip(".")}); load it with '
                f'torch.load(weights_only=False) only if you trust its source'
            ) from None
        raise CheckpointError(
            f'cannot read checkpoint {path} as a weights-only file (tensors and plain types): {lines[0]}'
        ) from None


def save_checkpoint(folder, names, parts, state, meta):
    """A collective: state.ranks gets each rank's random streams and, with several processes, its BatchNorm
    statistics (each rank updates its own with its batches; the EMA's are never synced); rank 0 writes
    {part: its state_dict or None, the state's fields, meta} once, as the last of `names`, the others linked."""
    several = get_world_size() > 1
    mine = dict(rng=rng_state(next(parts['model'].parameters()).device))
    for key, module in (('buffers', parts['model']), ('ema_buffers', parts.get('model_ema'))):
        if several and module is not None:
            mine[key] = {name: b.cpu() for name, b in module.named_buffers()}
    state.ranks = [None] * get_world_size() if several else [mine]
    if several:
        dist.all_gather_object(state.ranks, mine)
    if not is_main_process():
        return
    checkpoint = {name: part.state_dict() if part is not None else None for name, part in parts.items()}
    state_fields = {f.name: getattr(state, f.name) for f in fields(state)} | dict(loss_sum=float(state.loss_sum))
    paths = [os.path.join(folder, name) for name in names]
    atomic_save(checkpoint | state_fields | meta, paths[-1], links=paths[:-1])


def load_checkpoint(path, parts, state, args, num_classes):
    """Continue from a train.py checkpoint; every rank reads the file and restores its random streams and BatchNorm
    statistics. In another world size rank 0 goes on with the saved streams, the others start new ones."""
    checkpoint = read_checkpoint(path)
    check_resumable(path, checkpoint, args, num_classes, state)
    for name, part in parts.items():
        if part is None:
            continue
        if name == 'model_ema' and not checkpoint.get('model_ema'):  # resumed with --model-ema added
            part.load_state_dict(checkpoint['model'])
        elif name == 'scheduler' and isinstance(part, torch.optim.lr_scheduler.LambdaLR):
            # timm's schedules are a function of the step: this run's at the saved step, so a resume with
            # another --epochs trains its first step at the new schedule's lr
            part.last_epoch = checkpoint['num_updates'] - 1
            part.step()
        else:
            part.load_state_dict(checkpoint[name])
    for field in fields(state):
        setattr(state, field.name, checkpoint[field.name])
    rank = get_rank()
    same_world = len(state.ranks) == get_world_size()
    saved = state.ranks[rank if same_world else 0]
    torch.set_rng_state(saved['rng']['torch'])
    random.setstate(saved['rng']['python'])
    device = next(parts['model'].parameters()).device
    if device.type in saved['rng']:
        devices.accelerator_module(device).set_rng_state(saved['rng'][device.type])
    if not same_world and rank > 0:
        data.seed_torch(args.seed, rank, state.epoch, state.step)
    with torch.no_grad():
        for module, key in ((parts['model'], 'buffers'), (parts.get('model_ema'), 'ema_buffers')):
            for name, buffer in module.named_buffers() if same_world and module is not None and key in saved else ():
                buffer.copy_(saved[key][name])
    say(f'Resumed from {path}: epoch {state.epoch}, step {state.step}')


def check_resumable(path, checkpoint, args, num_classes, state):
    """A train.py checkpoint of this variant, class count and optimizer; a warning for other flags that change what
    the run computes."""
    required = ['model', 'optimizer', 'scaler', 'arch', 'num_classes', *(f.name for f in fields(state))]
    missing = [key for key in required if key not in checkpoint] if isinstance(checkpoint, dict) else ['state']
    if missing:
        raise CheckpointError(
            f'{path} is not a train.py checkpoint (no {", ".join(missing[:3])}); '
            f'to start from its weights use --pretrained {path}'
        )
    saved = checkpoint.get('args') or {}
    own_run = os.path.abspath(path) == os.path.abspath(os.path.join(args.output, 'last.pth.tar'))
    elsewhere = 'or choose another --output' if own_run else f'or start from its weights with --pretrained {path}'
    if checkpoint['arch'] != args.model or checkpoint['num_classes'] != num_classes:
        raise UsageError(
            f'{path} holds {checkpoint["arch"]} with {checkpoint["num_classes"]} classes, this run is '
            f'{args.model} with {num_classes}; resume with --model {checkpoint["arch"]} and the same '
            f'data, {elsewhere}'
        )
    if saved.get('opt', args.opt) != args.opt:
        raise UsageError(
            f'{path} holds {saved["opt"]} optimizer state, this run uses --opt {args.opt}; '
            f'resume with --opt {saved["opt"]}, {elsewhere}'
        )
    changed = [
        f'{key} {value!r} (checkpoint: {saved[key]!r})'
        for key, value in plain_args(args).items()
        if key in saved and key not in RESUME_FREE_ARGS and saved[key] != value
    ]
    if changed:
        say(
            f"warning: resuming with settings that differ from the checkpoint's, so the run will not match an "
            f'uninterrupted one: {", ".join(changed)}',
            file=sys.stderr,
        )


def checkpoint_settings(path):
    """What a train.py checkpoint names of its run: the variant (arch, as --model) and its image settings."""
    checkpoint = read_checkpoint(path, mmap=zipfile.is_zipfile(path))  # train.py's (a zip): tensors left unread
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('arch'), str):
        return {}  # not a train.py checkpoint: check_resumable says so
    saved = checkpoint.get('args') if isinstance(checkpoint.get('args'), dict) else {}
    return dict(model=checkpoint['arch'], **{key: saved[key] for key in VARIANT_SETTINGS if saved.get(key) is not None})


def plain_args(args):
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in vars(args).items()}


def rng_state(device):
    """Every random stream the training step draws from, as tensors and plain types: the CPU's, Python's and,
    under the device's name ('cuda', 'npu'), the device's own (dropout, drop path and random erasing draw there)."""
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    accelerator = devices.accelerator_module(device)
    if hasattr(accelerator, 'get_rng_state'):
        state[device.type] = accelerator.get_rng_state()
    return state


# Files written whole


def atomic_save(obj, path, links=()):
    """torch.save(obj) into `path` once, and `links` made from it (atomic_write); the size a full disk error
    names is that of the tensors' storages, most of the file."""
    tensors = [t for t in torch.utils._pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    atomic_write(path, lambda f: torch.save(obj, f), links, size=sum(storages.values()))


def atomic_write(path, write, links=(), size=None):
    """write(binary file) into a temporary file beside `path` (.NAME.PID.tmp), fsync, give each of `links` the same
    bytes (link_or_copy), rename: a kill leaves the old file or the new one, never half of one. A full disk or
    quota is a UsageError naming the folder, the bytes needed (`size`, else at least those written) and free."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temporary_path(path)
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        for other in links:
            link_or_copy(tmp, other)
        os.replace(tmp, path)
    except Exception as error:
        if not is_disk_full(error):
            raise
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        needs = f'about {size / 1e6:.1f} MB' if size else f'more than {written:,} bytes'
        if os.path.exists(tmp):
            os.remove(tmp)  # before asking what is free
        raise UsageError(
            f'no space left in {folder} for {os.path.basename(path)}: it needs {needs}, '
            f'{shutil.disk_usage(folder).free / 1e6:.1f} MB are free; free some space there or '
            f'choose another --output'
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)


def temporary_path(path):
    return os.path.join(os.path.dirname(os.path.abspath(path)), f'.{os.path.basename(path)}.{os.getpid()}.tmp')


def link_or_copy(source, path):
    """`path` gets `source`'s bytes atomically: a hard link, or a copy (atomic_write) where the filesystem has none.
    The names share one file until one is replaced by a rename, which leaves the other's bytes as they were."""
    tmp = temporary_path(path)
    if os.path.lexists(tmp):
        os.remove(tmp)  # link() does not overwrite, and open() would write through a stale link
    try:
        os.link(source, tmp)
    except OSError:  # FAT, some network and FUSE filesystems
        with open(source, 'rb') as original:
            return atomic_write(path, lambda f: shutil.copyfileobj(original, f))
    os.replace(tmp, path)


def is_disk_full(error):
    """ENOSPC or EDQUOT, also behind torch's zip writer's own RuntimeError ('unexpected pos')."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False
