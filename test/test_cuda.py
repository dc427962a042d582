"""The recipe on a CUDA GPU: numerics against the CPU, fp16 loss scaling, bf16, torch.compile,
torchrun (nccl with 2 GPUs), exact validation counts, and SIGTERM + --resume auto with fp16 (and apex).

    python -m pytest test -q -m cuda                 # these tests only; on one H100/H200 estimated at
                                                     # 1-1.5 minutes (the compiled run is the longest)
    python -m pytest test/test_cuda.py -q -rs        # without a CUDA GPU: all skipped, with the reason
    bash tools/gpu_check.sh                           # these tests, then the throughput measurements

Every test carries the `cuda` marker (registered in conftest.py) and skips where
torch.cuda.is_available() is False, so the plain suite passes on a CPU. Runs go through train.py's
command line in a subprocess, as users start it (tools/faults.py where a fault is injected), on
tf_efficientnetv2_b0 at 32 px, batch 4, tiny generated image folders. The runs that depend on no
other are started together when the module's first test begins (the `runs` fixture): each is tiny,
so one GPU runs them side by side and the file takes about as long as its slowest run.

Tolerances, and why results are not bitwise equal here as they are on the CPU (test_resume.py):
cuDNN convolutions round float32 inputs to TF32 by default (10-bit mantissa, Ampere and later),
train.py turns on cudnn.benchmark (each process times and picks its own algorithms), and some
backward kernels accumulate with atomics. The CPU comparisons below switch TF32 off, so they
compare float32 with float32; the run-against-run comparisons allow for the rest.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, make_image_folder, train_command

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (torch.cuda.is_available() is False)'),
]

TINY = '--model tf_efficientnetv2_b0 --img-size 32 -b 4 -j 0 --device cuda --log-interval 1'.split()
TIMEOUT = 300
FP16_INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's and apex's first loss scale
# Run against run (eager/compiled, plain/torchrun, resumed/uninterrupted): per-step losses (printed
# to 4 digits) and every weight, BN statistic and optimizer tensor within 1e-2 of its norm. TF32 and
# each process's choice of cuDNN algorithms move them by ~1e-3 in 8-16 steps; a lost state moves
# them by 10% or more (e.g. RMSpropTF's square average: 0.9**8 against 0.9**4 of its start).
RUN_TO_RUN_RTOL = 1e-2


def apex_amp_imports():
    """NVIDIA apex's mixed precision (the PyPI package named apex is an unrelated web toolkit)."""
    try:
        from apex import amp  # noqa: F401
    except Exception:  # ImportError, or a build of apex that fails while importing
        return False
    return True


def fewer_than_two_gpus():
    """(On a CPU the module's own skip applies, and its reason is the one reported.)"""
    return torch.cuda.is_available() and torch.cuda.device_count() < 2


def torchrun(processes):
    return [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        f'--nproc_per_node={processes}',
        os.path.join(ROOT, 'train.py'),
    ]


def losses(stdout):
    """The Loss value of every Train line, as printed ('inf' stays a string)."""
    return re.findall(r'^Train: .*?Loss: (\S+)', stdout, re.M)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_tensors_close(ours, theirs, rtol, what):
    """Each floating-point tensor within rtol of its norm (plus a floor of 1e-5 per element for
    tensors that are mathematically zero, e.g. the gradient of a BN bias followed by a BN); integer
    tensors (BN's num_batches_tracked) and plain values equal."""
    assert ours.keys() == theirs.keys(), what
    for key, tensor in theirs.items():
        if isinstance(tensor, dict):
            assert_tensors_close(ours[key], tensor, rtol, f'{what}.{key}')
        elif not isinstance(tensor, torch.Tensor):
            assert ours[key] == tensor, f'{what}.{key}'
        elif not tensor.is_floating_point():
            assert torch.equal(ours[key], tensor), f'{what}.{key}'
        else:
            error = (ours[key].double() - tensor.double()).norm().item()
            bound = rtol * tensor.double().norm().item() + 1e-5 * tensor.numel() ** 0.5
            assert error <= bound, f'{what}.{key}: |difference| {error:.3g} > {bound:.3g}'


@contextlib.contextmanager
def float32_convolutions():
    """cuDNN in true float32 for the block: by default it rounds convolution inputs to TF32."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------
# Data and the runs, started together


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """2 classes x 16 training images: 8 steps of batch 4 per epoch; 2 x 2 validation images."""
    return make_image_folder(tmp_path_factory.mktemp('cuda') / 'data', classes=2, train_per_class=16, val_per_class=2)


# A val folder whose class sizes make any image dropped or counted twice change top-1: a model that
# always predicts class 0 scores exactly 5 of 21 (23.8095%), whatever the device's rounding.
VAL_SIZES = (5, 7, 9)
CONSTANT_LOGITS = (2.0, 1.0, 0.0)


@pytest.fixture(scope='module')
def constant_model(tmp_path_factory):
    """(val folder, weights file): b0 whose classifier ignores its input (zero weights) and outputs
    CONSTANT_LOGITS, exact in float16 too."""
    import model as models

    root = tmp_path_factory.mktemp('counts')
    data = make_image_folder(root / 'data', classes=3, train_per_class=1, val_per_class=max(VAL_SIZES))
    for label, size in enumerate(VAL_SIZES):
        for index in range(size, max(VAL_SIZES)):
            os.remove(os.path.join(data, 'val', f'class_{label}', f'{index}.jpg'))
    net = models.create_model('tf_efficientnetv2_b0', num_classes=3)
    with torch.no_grad():
        net.classifier.weight.zero_()
        net.classifier.bias.copy_(torch.tensor(CONSTANT_LOGITS))
    weights = root / 'constant.pth'
    torch.save(net.state_dict(), weights)
    return data, weights


# What makes two runs comparable step by step: the same --seed (initial weights, data order) and
# augmentation drawn per image from (seed, epoch, index), so both see the same pixels; dropout and
# drop path at 0 (torch.compile draws random numbers with its own generator, so masks would differ);
# no mixup, cutmix or random erasing; float32 (both with cuDNN's TF32 convolutions); SGD without
# warm-up, so the weights move enough in 8 steps for a difference to show.
COMPARABLE = [
    *TINY,
    *'--epochs 1 --seed 5 --opt sgd --lr 0.05 --warmup-epochs 0 --drop 0 --drop-path 0'.split(),
]

# test_resume.py's recipe (every random stream a step draws from; here dropout, drop path and random
# erasing draw on the GPU) with fp16 and the reference recipe's RMSpropTF. Steps 2 and 3 of the first
# process get an infinite loss, so the GradScaler's scale is 2**14 when SIGTERM arrives: a resume that
# lost it would go on at 2**16. 2 epochs x 8 steps.
RESUME = [
    *TINY,
    *'--epochs 2 --seed 7 --opt rmsproptf --opt-eps .001 --lr 0.01 --warmup-epochs 0 --aa rand-m9-mstd0.5'.split(),
    *'--mixup 0.2 --reprob 0.25 --drop 0.2 --drop-path 0.2 --model-ema --model-ema-decay 0.9 --amp'.split(),
    *'--amp-dtype float16'.split(),
]
RESUME_FAULTS = ['--inf-loss-steps', '2,3']


class Run:
    """A command started now, read later: .stdout() waits for it and checks it ended with status 0."""

    def __init__(self, command, output=None):
        self.output = output
        self.files = [tempfile.TemporaryFile('w+') for _ in range(2)]
        self.process = subprocess.Popen(
            [str(part) for part in command],
            cwd=ROOT,
            text=True,
            stdout=self.files[0],
            stderr=self.files[1],
            env=dict(os.environ, PYTHONUNBUFFERED='1'),
        )
        self.text = None

    def stdout(self):
        if self.text is None:
            try:
                self.process.wait(timeout=TIMEOUT)
            finally:
                self.stop()
            for f in self.files:
                f.seek(0)
            self.text, self.errors = (f.read() for f in self.files)
        assert self.process.returncode == 0, f'{self.process.args}\n{self.text[-3000:]}\n{self.errors[-5000:]}'
        return self.text

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope='module', autouse=True)
def runs(data_dir, constant_model, tmp_path_factory):
    """Every run that depends on no other, started at once when the module's first test begins
    (autouse: the in-process tests below then run while these do)."""

    def train(name, *args, faults=(), launcher=None):
        output = tmp_path_factory.mktemp(name) / 'out'
        command = launcher + [*map(str, args)] if launcher else train_command(*args, faults=faults)
        return Run([*command, '--output', output], output)

    val_data, weights = constant_model
    started = dict(
        fp16_inf=train(
            'fp16_inf',
            data_dir,
            *TINY,
            *'--amp --amp-dtype float16 --epochs 1'.split(),
            faults=['--inf-loss-steps', '2,3,4,5,6,7'],
        ),
        bf16=train('bf16', data_dir, *TINY, '--amp', '--amp-dtype', 'bfloat16', '--epochs', '1'),
        eager=train('eager', data_dir, *COMPARABLE),
        compiled=train('compiled', data_dir, *COMPARABLE, '--compile'),
        torchrun_1=train('torchrun_1', data_dir, *COMPARABLE, launcher=torchrun(1)),
        validation=Run(train_command(val_data, *TINY, '--amp', '--evaluate', '--pretrained', weights)),
        reference_fp16=train('reference_fp16', data_dir, *RESUME, faults=RESUME_FAULTS),
    )
    if not fewer_than_two_gpus():
        started.update(
            nccl_2=train('nccl_2', data_dir, *COMPARABLE, '-b', '2', '--sync-bn', launcher=torchrun(2)),
            validation_nccl_2=Run(
                torchrun(2) + [str(arg) for arg in (val_data, *TINY, '--amp', '--evaluate', '--pretrained', weights)]
            ),
        )
    yield started
    for run in started.values():
        run.stop()


# ----------------------------------------------------------------------------------------------
# The model on CUDA against the CPU, in float32


def test_squeeze_excite_pools_in_the_autocast_dtype_on_cuda():
    """timm's mean, not sum, which CUDA's autocast runs in float32: under float16 autocast every SE block
    pools its expanded activation in float16, without a float32 copy of it."""
    import model as models

    net = models.create_model('tf_efficientnetv2_b0', num_classes=10).cuda()
    dtypes = []
    for module in net.modules():
        if isinstance(module, models.SqueezeExcite):
            module.conv_reduce.register_forward_pre_hook(lambda _, inputs: dtypes.append(inputs[0].dtype))
    with torch.autocast('cuda', torch.float16):
        net(torch.randn(2, 3, 64, 64, device='cuda'))
    assert dtypes and set(dtypes) == {torch.float16}


@pytest.mark.parametrize('memory_format', ['nchw', 'channels_last'])
def test_model_outputs_on_cuda_match_the_cpu_in_float32(memory_format):
    """Eval mode, rw_t at 64 px. Tolerance 1e-4 of the largest logit: float32 itself differs from a
    float64 forward by 4e-6 (NCHW) to 7e-6 (channels_last) of it on the CPU, so 1e-4 leaves room
    for another summation order while a wrong kernel (or TF32 left on: ~1e-3) fails."""
    import model as models

    torch.manual_seed(0)
    net = models.create_model('efficientnetv2_rw_t', num_classes=10).eval()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = net(images)
        layout = torch.channels_last if memory_format == 'channels_last' else torch.contiguous_format
        net = net.cuda().to(memory_format=layout)
        with float32_convolutions():
            output = net(images.cuda().to(memory_format=layout)).cpu()
    scale = expected.abs().max().item()
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4 * scale)


def test_training_gradients_on_cuda_match_the_cpu_in_float32():
    """Train mode (batch statistics), channels_last on CUDA: every parameter's gradient within 1e-3
    of the norm of all gradients (float32 differs from float64 by 4e-5 of it on the CPU), and the
    BN running statistics within 1e-4 of their largest value."""
    import model as models

    torch.manual_seed(0)
    net = models.create_model('efficientnetv2_rw_t', num_classes=10).train()
    on_cuda = models.create_model('efficientnetv2_rw_t', num_classes=10)
    on_cuda.load_state_dict(net.state_dict())
    on_cuda = on_cuda.train().cuda().to(memory_format=torch.channels_last)
    images, labels = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    F.cross_entropy(net(images), labels).backward()
    with float32_convolutions():
        F.cross_entropy(on_cuda(images.cuda().to(memory_format=torch.channels_last)), labels.cuda()).backward()
    expected = {name: p.grad for name, p in net.named_parameters()}
    total = torch.cat([g.flatten() for g in expected.values()]).norm().item()
    for name, p in on_cuda.named_parameters():
        error = (p.grad.cpu() - expected[name]).norm().item()
        assert error <= 1e-3 * total, f'{name}: |difference| {error:.3g}, all gradients {total:.3g}'
    for (name, buffer), cuda_buffer in zip(net.named_buffers(), on_cuda.buffers()):
        if buffer.is_floating_point():
            torch.testing.assert_close(
                cuda_buffer.cpu(), buffer, rtol=1e-4, atol=1e-4 * buffer.abs().max().item(), msg=name
            )


# ----------------------------------------------------------------------------------------------
# Mixed precision


def test_fp16_steps_the_grad_scaler_skips_do_not_count_as_non_finite(runs):
    """Steps 2-7 get an infinite loss (tools/faults.py): six in a row, over run.py's limit of five.
    fp16's GradScaler skips each of them (halving its scale), so they are not counted and the
    epoch runs to its end, validates and saves finite weights."""
    run = runs['fp16_inf']
    stdout = run.stdout()
    logged = losses(stdout)
    assert len(logged) == 8 and logged[1:7] == ['inf'] * 6, logged
    assert all(float(loss) < float('inf') for loss in logged[:1] + logged[7:]), logged
    assert re.search(r'^Epoch 0: ', stdout, re.M), stdout[-2000:]
    assert 'not finite' not in run.errors and 'Traceback' not in run.errors, run.errors[-2000:]
    last = load(run.output / 'last.pth.tar')
    assert last['scaler']['scale'] <= FP16_INITIAL_SCALE / 2**6  # halved once per skipped step
    assert all(torch.isfinite(t).all() for t in last['model'].values() if t.is_floating_point())


def test_bf16_autocast_trains_with_finite_losses_and_keeps_no_loss_scale(runs):
    logged = [float(loss) for loss in losses(runs['bf16'].stdout())]
    assert len(logged) == 8 and all(0 < loss < float('inf') for loss in logged), logged
    assert load(runs['bf16'].output / 'last.pth.tar')['scaler'] == {}  # bfloat16 needs no GradScaler


# ----------------------------------------------------------------------------------------------
# torch.compile and launchers against the plain eager run


def assert_same_training(run, reference):
    expected = [float(loss) for loss in losses(reference.stdout())]
    assert len(expected) == 8
    assert [float(loss) for loss in losses(run.stdout())] == pytest.approx(expected, rel=RUN_TO_RUN_RTOL)
    ours, theirs = load(run.output / 'last.pth.tar'), load(reference.output / 'last.pth.tar')
    assert_tensors_close(ours['model'], theirs['model'], RUN_TO_RUN_RTOL, 'model')


def test_compiled_training_matches_eager_within_rounding(runs):
    """--compile: the same losses step by step and the same weights and BN running statistics at
    the end (a compiled graph that dropped the BN buffer updates would fail here)."""
    assert_same_training(runs['compiled'], runs['eager'])
    assert not any(key.startswith('_orig_mod.') for key in load(runs['compiled'].output / 'last.pth.tar')['model'])


def test_torchrun_with_one_process_trains_on_cuda_like_a_plain_run(runs):
    """torchrun sets WORLD_SIZE=1: train.py then starts no process group (distributed.init_distributed is
    for world sizes above 1), so no nccl; this checks the launcher's environment on CUDA (LOCAL_RANK
    picks cuda:0, rank 0 logs and saves). nccl itself needs 2 GPUs: the test after this one."""
    assert_same_training(runs['torchrun_1'], runs['eager'])


@pytest.mark.skipif(fewer_than_two_gpus(), reason='needs 2 CUDA GPUs: nccl runs one rank per GPU')
def test_two_nccl_ranks_of_batch_2_train_like_one_process_of_batch_4(runs):
    """With --sync-bn, BatchNorm normalizes over both ranks' images, so 2 ranks x batch 2 see what
    1 process x batch 4 sees (EpochBatchSampler deals the same batch out across ranks); DDP averages
    the gradients. One process ignores --sync-bn: the eager run is the reference."""
    assert_same_training(runs['nccl_2'], runs['eager'])


# ----------------------------------------------------------------------------------------------
# Validation: every image counted once


def assert_every_image_counted_once(stdout):
    labels = torch.cat([torch.full((size,), label) for label, size in enumerate(VAL_SIZES)])
    logits = torch.tensor(CONSTANT_LOGITS).expand(len(labels), -1)
    top1 = 100 * VAL_SIZES[0] / sum(VAL_SIZES)
    last_test_line = [line for line in stdout.splitlines() if line.startswith('Test:')][-1]
    average_top1 = re.search(r'Acc@1: +\S+ \( *(\S+)\)', last_test_line).group(1)
    assert average_top1 == f'{top1:.4f}', last_test_line
    loss, printed_top1, top5 = re.search(r'^Evaluation: loss (\S+)  top1 (\S+)  top5 (\S+)$', stdout, re.M).groups()
    assert (printed_top1, top5) == (f'{top1:.4f}', '100.0000')
    assert float(loss) == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-4)


def test_validation_on_cuda_counts_every_image_once(runs):
    """21 images in batches of 4 (the last holds 1), fp16 autocast: the CPU's count, exactly."""
    assert_every_image_counted_once(runs['validation'].stdout())


@pytest.mark.skipif(fewer_than_two_gpus(), reason='needs 2 CUDA GPUs: nccl runs one rank per GPU')
def test_validation_over_two_nccl_ranks_counts_every_image_once(runs):
    """21 images over 2 ranks (11 + 10; the shorter shard's last batch is an empty one)."""
    assert_every_image_counted_once(runs['validation_nccl_2'].stdout())


# ----------------------------------------------------------------------------------------------
# SIGTERM and --resume auto with fp16

SIGTERM_AFTER_TRAIN_LINE = 3  # after the two skipped steps; the run stops after this step or a later one


@pytest.fixture(scope='module')
def sigterm_fp16(data_dir, tmp_path_factory):
    """The reference_fp16 run stopped by SIGTERM after its third Train line, then resumed to the end."""
    output = tmp_path_factory.mktemp('sigterm_fp16') / 'out'
    process = subprocess.Popen(
        train_command(data_dir, *RESUME, '--output', output, faults=RESUME_FAULTS),
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED='1'),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if sum(line.startswith('Train:') for line in lines) == SIGTERM_AFTER_TRAIN_LINE:
                process.send_signal(signal.SIGTERM)
                break
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    stopped = dict(
        code=process.returncode, stdout=''.join(lines) + out, stderr=err, checkpoint=load(output / 'last.pth.tar')
    )
    resumed = Run(train_command(data_dir, *RESUME, '--output', output, '--resume', 'auto'), output)
    return dict(stopped=stopped, resumed=resumed)


def test_sigterm_on_cuda_saves_the_fp16_loss_scale_it_lowered(sigterm_fp16):
    stopped = sigterm_fp16['stopped']
    assert stopped['code'] == 128 + signal.SIGTERM, stopped['stderr'][-2000:]
    assert 'Stopped by SIGTERM' in stopped['stdout'], stopped['stdout'][-1500:]
    checkpoint = stopped['checkpoint']
    assert checkpoint['step'] >= SIGTERM_AFTER_TRAIN_LINE or checkpoint['epoch'] > 0
    assert checkpoint['scaler']['scale'] <= FP16_INITIAL_SCALE / 4  # the two skipped steps
    assert 'cuda' in checkpoint['ranks'][0]['rng']  # dropout, drop path and erasing draw there


def test_resume_after_sigterm_on_cuda_matches_the_uninterrupted_fp16_run(sigterm_fp16, runs):
    """Model, EMA and optimizer state within RUN_TO_RUN_RTOL of each tensor's norm (cuDNN is not
    bitwise deterministic); the GradScaler's state (scale, growth tracker) and the counters exact.
    (Not best_epoch: 4 validation images, one prediction flipped by rounding could move it.)"""
    resumed, reference = sigterm_fp16['resumed'], runs['reference_fp16']
    assert 'Resumed from' in resumed.stdout()
    reference.stdout()
    ours, theirs = load(resumed.output / 'last.pth.tar'), load(reference.output / 'last.pth.tar')
    assert ours['scaler'] == theirs['scaler'] and ours['scaler']['scale'] < FP16_INITIAL_SCALE
    for key in ('epoch', 'step', 'num_updates'):
        assert ours[key] == theirs[key], key
    for key in ('model', 'model_ema'):
        assert_tensors_close(ours[key], theirs[key], RUN_TO_RUN_RTOL, key)
    assert_tensors_close(ours['optimizer']['state'], theirs['optimizer']['state'], RUN_TO_RUN_RTOL, 'optimizer')


@pytest.mark.skipif(
    torch.cuda.is_available() and not apex_amp_imports(),
    reason='needs NVIDIA apex with apex.amp (the PyPI package named apex is unrelated)',
)
def test_apex_amp_resume_restores_apexs_loss_scale(data_dir, tmp_path):
    """--apex-amp (O1, fp16): steps 2-7 overflow, six in a row, over run.py's limit of five: apex skips
    them and halves its scale each time, and the run goes on (Precision sees apex's skips as skipped);
    run.py saves precision.state_dict() (apex's amp.state_dict()) under 'scaler'; a second epoch
    resumed from that checkpoint keeps the lowered scale (fresh, it would be 2**16 again)."""
    output = tmp_path / 'out'
    apex = [data_dir, *TINY, '--apex-amp', '--seed', '3', '--output', output]
    Run(train_command(*apex, '--epochs', '1', faults=['--inf-loss-steps', '2,3,4,5,6,7'])).stdout()
    first = load(output / 'last.pth.tar')['scaler']['loss_scaler0']['loss_scale']
    assert first <= FP16_INITIAL_SCALE / 2**6
    assert 'Resumed from' in Run(train_command(*apex, '--epochs', '2', '--resume', 'auto')).stdout()
    assert load(output / 'last.pth.tar')['scaler']['loss_scaler0']['loss_scale'] == first
