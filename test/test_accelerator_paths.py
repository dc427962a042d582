"""The training loop as a GPU or NPU runs it, checked on the CPU: the model on PyTorch's meta device.

A meta tensor has a shape and a dtype but no data, and an operation that mixes it with a CPU tensor
raises, as CUDA does when a tensor was left on the CPU. So train.train() with the model on `meta`
(devices.select_device patched to return it; autocast, which has no meta kernels, left out) shows
that every tensor the loop makes follows the model. HostReads answers each read of a meta tensor by
the host (.item(), .tolist(), a copy to the CPU) with zeros and records where it happened: each is a
place where a GPU would make the host wait. The tests pin those places: a training step reads nothing
but fp16's GradScaler check, and validation reads its sums once per `Test:` line, not per batch.

    python -m pytest test/test_accelerator_paths.py -q
"""

import contextlib
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import devices
import precision as mixed_precision
import predict
import run
import train
from conftest import ROOT, make_image_folder

# load_state_dict into a meta model warns for every tensor that the copy does nothing
pytestmark = pytest.mark.filterwarnings('ignore:.*to a meta parameter in the current model')

aten = torch.ops.aten
META = torch.device('meta')
# 4 steps an epoch, 3 validation batches
TINY = '--model tf_efficientnetv2_b0 --img-size 32 -b 2 -j 0 --epochs 2 --warmup-epochs 0 --log-interval 100'.split()


class HostReads(TorchDispatchMode):
    """Answers the host's reads of meta tensors with zeros, recording the project's functions on the stack."""

    def __init__(self):
        super().__init__()
        self.stacks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].is_meta:  # .item(), int(), float(), bool()
            self.record()
            return torch.zeros((), dtype=args[0].dtype).item()
        if func is aten._to_copy.default and args[0].is_meta and kwargs.get('device') == torch.device('cpu'):
            self.record()  # .cpu(), .tolist(), .to('cpu')
            return torch.zeros(args[0].shape, dtype=kwargs.get('dtype') or args[0].dtype)
        if func is aten.copy_.default and args[1].is_meta and not args[0].is_meta:  # cpu_tensor.copy_(meta)
            self.record()
            return args[0]
        return func(*args, **kwargs)

    def record(self):
        self.stacks.append(
            [frame.name for frame in traceback.extract_stack() if os.path.dirname(frame.filename) == ROOT]
        )

    def count(self, function):
        """Reads made while `function` (a name) was running."""
        return sum(function in stack for stack in self.stacks)

    def where(self):
        return '\n'.join(' > '.join(stack) for stack in self.stacks)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """2 classes x 4 training images (4 steps of batch 2), 2 x 3 validation images (3 batches)."""
    return make_image_folder(tmp_path_factory.mktemp('meta') / 'data', classes=2, train_per_class=4, val_per_class=3)


@pytest.fixture
def on_meta(monkeypatch):
    """train.py and predict.py put their model on the meta device; -> a counter of train_step's calls."""
    monkeypatch.setattr(devices, 'select_device', lambda name, local_rank: META)
    monkeypatch.setattr(mixed_precision.Precision, 'autocast', lambda self: contextlib.nullcontext())
    steps, train_step = [], train.train_step

    def counted_train_step(*args, **kwargs):
        steps.append(1)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(train, 'train_step', counted_train_step)
    return steps


def train_on_meta(*argv):
    """train.train() with the given flags under HostReads; -> the HostReads."""
    args = run.parse_command_line([str(arg) for arg in argv])
    reads = HostReads()
    with reads:
        train.train(args)
    return reads


def count_test_lines(output):
    return sum(line.startswith('Test') for line in output.splitlines())


FLAG_SETS = {
    'plain': '',
    'ema, mixup, cutmix, random erasing, drop path': (
        '--model-ema --model-ema-decay 0.9 --mixup 0.2 --cutmix 1.0 --reprob 0.5 --drop-path 0.2 --drop 0.3'
    ),
    'accumulation, clipping, rmsproptf': (
        '--grad-accum-steps 2 --clip-grad 1 --opt rmsproptf --opt-eps 1e-3 --sched step --aa rand-m9-mstd0.5'
    ),
    'bf16': '--amp --amp-dtype bfloat16',
    'fp16 scaler, checkpoint interval': '--amp --amp-dtype float16 --checkpoint-interval 3',
    'freeze-bn, NCHW': '--freeze-bn --no-channels-last',
    'progressive': '--progressive --prog-stages 2 --img-size 64 --prog-min-size 32',
}


@pytest.mark.parametrize('flag_set', FLAG_SETS)
def test_training_on_the_meta_device_keeps_every_tensor_there_and_reads_back_only_at_log_lines(
    flag_set, data_dir, on_meta, tmp_path, capfd
):
    """The whole loop runs (a tensor left on the CPU raises), a step reads nothing back but fp16's GradScaler
    check (once a step), and validation reads once per `Test:` line however many batches it has."""
    output = tmp_path / 'run'
    reads = train_on_meta(data_dir, *TINY, *FLAG_SETS[flag_set].split(), '--output', output)
    fp16 = 'float16' in FLAG_SETS[flag_set].split()
    assert (output / 'last.pth.tar').exists()
    assert len(on_meta) == 8 // (2 if '--grad-accum-steps' in FLAG_SETS[flag_set] else 1)
    assert reads.count('train_step') == len(on_meta) * fp16, reads.where()
    assert reads.count('validate') == count_test_lines(capfd.readouterr().out), reads.where()


def test_a_resume_on_the_device_from_a_checkpoint_written_on_the_cpu_moves_the_optimizer_state_there(
    data_dir, on_meta, tmp_path, monkeypatch, capfd
):
    """The CPU run's RMSpropTF buffers, EMA and fp16 loss scale are loaded onto the meta device (a buffer left on
    the CPU would make the first step raise), and the resumed epoch reads no more than a fresh one."""
    output = tmp_path / 'run'
    recipe = '--opt rmsproptf --model-ema --amp --amp-dtype float16'.split()
    monkeypatch.setattr(devices, 'select_device', lambda name, local_rank: torch.device('cpu'))
    train.train(run.parse_command_line([data_dir, *TINY, *recipe, '--epochs', '1', '--output', str(output)]))
    monkeypatch.setattr(devices, 'select_device', lambda name, local_rank: META)
    optimizers, create_optimizer = [], train.create_optimizer
    monkeypatch.setattr(train, 'create_optimizer', lambda *a: optimizers.append(create_optimizer(*a)) or optimizers[-1])
    capfd.readouterr()
    reads = train_on_meta(data_dir, *TINY, *recipe, '--output', output, '--resume', 'auto')
    assert 'Resumed from' in capfd.readouterr().out
    optimizer = optimizers[0][0]
    assert all(value.is_meta for state in optimizer.state.values() for value in state.values())
    assert len(on_meta) == 8  # 4 on the CPU, 4 on meta
    assert reads.count('train_step') == 4, reads.where()


def test_evaluate_and_classify_on_the_meta_device(data_dir, on_meta, tmp_path, monkeypatch, capfd):
    """--evaluate --resume (model and EMA) and predict.py classify run with the model on the device."""
    output = tmp_path / 'run'
    train_on_meta(data_dir, *TINY, '--model-ema', '--epochs', '1', '--output', output)
    capfd.readouterr()
    reads = train_on_meta(data_dir, *TINY, '--evaluate', '--resume', output / 'last.pth.tar')
    printed = capfd.readouterr().out
    assert 'Evaluation (EMA):' in printed
    assert reads.count('validate') == count_test_lines(printed), reads.where()
    with HostReads():
        predict.main(['classify', str(output / 'last.pth.tar'), os.path.join(data_dir, 'val'), '--topk', '2'])
    assert len([line for line in capfd.readouterr().out.splitlines() if '.jpg  ' in line]) == 6
