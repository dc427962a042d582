"""Nothing lost: a run stopped by SIGKILL, SIGTERM or SIGINT and continued with --resume auto ends
with the same weights, optimizer state and metrics, bit for bit, as a run that was never stopped;
a kill during a checkpoint write leaves the previous checkpoint whole.

Every run goes through train.py's command line in a subprocess and is stopped with a real signal.
Three lineages of the same recipe share the module (about 3 minutes on 2 busy CPU cores):
- reference: never interrupted (workers 0);
- killed: SIGKILL at a random step, resumed; SIGKILL in the middle of a checkpoint write,
  resumed to the end (workers 0);
- signalled: SIGTERM to the whole process group, DataLoader workers included (what Slurm, Kubernetes
  and `timeout` send), and once more to the main process (as launchers relay it), at a random step,
  resumed; SIGINT to the whole process group (what Ctrl-C in a terminal sends) at another, resumed to
  the end (workers 2: the worker count does not change the numbers). A stopped run exits with
  128 + the signal's number.
The recipe draws from every random stream a step uses: RandomResizedCrop, flip and RandAugment
(per-image seeds), mixup/cutmix, random erasing, dropout and drop path (the global torch RNG),
with EMA, AdamW and a warm-up epoch, checkpointing every step.
"""

import glob
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import EVERY_RANDOM_STREAM, ROOT, load, make_image_folder, run_train, summary_rows, train_command

ENV = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')  # bitwise needs a fixed thread count
RECIPE = [*EVERY_RANDOM_STREAM, '-b', '4', '--checkpoint-hist', '1']
STEPS = 2 * 4  # 2 epochs x (16 train images / batch 4)
TIMEOUT = 300
CHOOSE = random.Random(5)  # the interruption points: random, but the same on every run of the suite


def command(resume_folder, output, workers, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, 'train.py'),
        resume_folder,
        *RECIPE,
        '-j',
        str(workers),
        '--output',
        output,
        *extra,
    ]


def run_to_end(resume_folder, output, workers, *extra):
    result = subprocess.run(
        command(resume_folder, output, workers, *extra),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    return result


def run_and_interrupt(resume_folder, output, workers, when, interrupt, *extra):
    """Start a run, call when(line) on each stdout line until it returns True, then
    interrupt(process); -> (return code, stdout, stderr) of the stopped run."""
    process = subprocess.Popen(
        command(resume_folder, output, workers, *extra),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # its own process group, as in a terminal
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if when(line):
                interrupt(process)
                break
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, ''.join(lines) + out, err


def after_train_lines(count):
    """A `when` for run_and_interrupt: true on the count-th 'Train:' line."""
    seen = []

    def when(line):
        if line.startswith('Train:'):
            seen.append(line)
        return len(seen) == count

    return when


def sigterm_to_the_job(process):
    """What a scheduler does: SIGTERM to every process of the job; then once more to the main process, as when a
    launcher relays it (torchrun, Slurm): one stop request delivered twice at once."""
    os.killpg(process.pid, signal.SIGTERM)
    os.kill(process.pid, signal.SIGTERM)


def resumed_step(stdout):
    """(epoch, step) from 'Resumed from ...: epoch E, step S'."""
    line = next(line for line in stdout.splitlines() if line.startswith('Resumed from'))
    epoch, step = line.rsplit(': ', 1)[1].split(', ')
    return int(epoch.split()[1]), int(step.split()[1])


@pytest.fixture(scope='module')
def reference(resume_folder, tmp_path_factory):
    """The uninterrupted run; started with --resume auto on an empty folder, which starts fresh."""
    output = str(tmp_path_factory.mktemp('reference') / 'out')
    result = run_to_end(resume_folder, output, 0, '--resume', 'auto')
    return dict(output=output, stdout=result.stdout)


@pytest.fixture(scope='module')
def killed(resume_folder, tmp_path_factory):
    output = str(tmp_path_factory.mktemp('killed') / 'out')
    kill_at = CHOOSE.randint(2, STEPS - 1)
    print(f'SIGKILL after Train line {kill_at} of {STEPS}')
    code, stdout, _ = run_and_interrupt(
        resume_folder, output, 0, after_train_lines(kill_at), lambda p: os.kill(p.pid, signal.SIGKILL)
    )
    assert code == -signal.SIGKILL
    first = load(os.path.join(output, 'last.pth.tar'))

    # Resume, and SIGKILL again while the first checkpoint after the resume is being written:
    # the step's Train line is printed just before its save; the temporary file then grows for
    # ~0.5 s (70 MB). Kill as soon as it holds data, then check it was left behind unrenamed.
    def temporary_file_appears(line):
        if not line.startswith('Train:'):
            return False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            partial = glob.glob(os.path.join(output, '.last.pth.tar.*.tmp'))
            if partial and os.path.getsize(partial[0]) > 0:
                return True
            time.sleep(0.001)
        raise AssertionError('no checkpoint write began within 60 s of a step')

    code, stdout_2, _ = run_and_interrupt(
        resume_folder, output, 0, temporary_file_appears, lambda p: os.kill(p.pid, signal.SIGKILL), '--resume', 'auto'
    )
    assert code == -signal.SIGKILL
    partial = glob.glob(os.path.join(output, '.last.pth.tar.*.tmp'))
    after_write_kill = load(os.path.join(output, 'last.pth.tar'))  # weights_only: a whole file
    result = run_to_end(resume_folder, output, 0, '--resume', 'auto')
    return dict(
        output=output,
        kill_at=kill_at,
        first=first,
        first_resume=stdout_2,
        partial=partial,
        after_write_kill=after_write_kill,
        stdout=result.stdout,
        leftovers=glob.glob(os.path.join(output, '.*.tmp')),
    )


@pytest.fixture(scope='module')
def signalled(resume_folder, tmp_path_factory):
    output = str(tmp_path_factory.mktemp('signalled') / 'out')
    term_at = CHOOSE.randint(1, STEPS - 3)
    print(f'SIGTERM to the process group after Train line {term_at} of {STEPS}')
    term = run_and_interrupt(resume_folder, output, 2, after_train_lines(term_at), sigterm_to_the_job)
    term_checkpoint = load(os.path.join(output, 'last.pth.tar'))
    int_after = CHOOSE.randint(1, STEPS - 1 - (term_checkpoint['epoch'] * 4 + term_checkpoint['step']))
    print(f'SIGINT to the process group after Train line {int_after} of the resumed run')
    interrupt = run_and_interrupt(
        resume_folder,
        output,
        2,
        after_train_lines(int_after),
        lambda p: os.killpg(p.pid, signal.SIGINT),
        '--resume',
        'auto',
    )
    int_checkpoint = load(os.path.join(output, 'last.pth.tar'))
    result = run_to_end(resume_folder, output, 2, '--resume', 'auto')
    return dict(
        output=output,
        term=term,
        term_checkpoint=term_checkpoint,
        interrupt=interrupt,
        int_checkpoint=int_checkpoint,
        stdout=result.stdout,
    )


def assert_same_run(output, reference_output):
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-1.pth.tar'):
        ours, theirs = load(os.path.join(output, name)), load(os.path.join(reference_output, name))
        for key in ('model', 'model_ema'):
            differ = [k for k in theirs[key] if not torch.equal(ours[key][k], theirs[key][k])]
            assert not differ, f'{name} {key}: {len(differ)} tensors differ, e.g. {differ[:3]}'
        for index, state in theirs['optimizer']['state'].items():
            for k, tensor in state.items():
                assert torch.equal(ours['optimizer']['state'][index][k], tensor), (name, index, k)
        for key in ('epoch', 'step', 'num_updates', 'best_metric', 'best_epoch'):
            assert ours[key] == theirs[key], (name, key)
    assert summary_rows(output) == summary_rows(reference_output)


def test_resume_after_sigkill_at_a_random_step_matches_the_uninterrupted_run(killed, reference):
    epoch, step = resumed_step(killed['first_resume'])
    done = epoch * 4 + step  # the kill came after Train line kill_at: its step may not be saved yet
    assert killed['kill_at'] - 1 <= done <= killed['kill_at'], (killed['kill_at'], epoch, step)
    assert_same_run(killed['output'], reference['output'])


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_whole(killed):
    assert killed['partial'], 'the kill did not land during a write'
    before, after = killed['first'], killed['after_write_kill']
    assert (after['epoch'], after['step']) == (before['epoch'], before['step'])
    assert all(torch.equal(after['model'][k], before['model'][k]) for k in before['model'])


def test_a_resumed_run_clears_the_partial_files_of_a_killed_write(killed):
    assert killed['leftovers'] == []


def test_sigterm_to_the_job_with_loader_workers_saves_the_current_step_says_how_to_resume_and_exits_143(signalled):
    """The loader workers ignore the signal and leave the stop to the main process, which says at once that it
    stops after this step, saves, and exits as a process killed by SIGTERM would (128 + 15)."""
    code, stdout, stderr = signalled['term']
    assert code == 143, stderr[-2000:]
    checkpoint = signalled['term_checkpoint']
    assert stdout.count('SIGTERM: stopping after this step, with a checkpoint') == 1, stdout[-1500:]
    message = [line for line in stdout.splitlines() if line.startswith('Stopped by SIGTERM')]
    assert len(message) == 1, stdout[-1500:]
    assert f'at epoch {checkpoint["epoch"]}, step {checkpoint["step"]}' in message[0]
    assert '--resume auto' in message[0]
    assert 'Traceback' not in stderr and 'DataLoader worker' not in stderr, stderr[-2000:]


def test_sigint_to_the_process_group_with_workers_stops_cleanly_and_exits_130(signalled):
    code, stdout, stderr = signalled['interrupt']
    assert code == 130, stderr[-2000:]
    assert any(line.startswith('Stopped by SIGINT') for line in stdout.splitlines()), stdout[-1500:]
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr[-2000:]
    before, after = signalled['term_checkpoint'], signalled['int_checkpoint']
    assert (after['epoch'], after['step']) > (before['epoch'], before['step'])


def test_resume_after_sigterm_and_sigint_with_workers_matches_the_uninterrupted_run(signalled, reference):
    assert_same_run(signalled['output'], reference['output'])


def test_resume_auto_on_an_empty_folder_starts_fresh(reference):
    assert 'Resumed from' not in reference['stdout']
    assert reference['stdout'].count('Train:') == STEPS


def test_checkpoints_are_plain_tensors_and_types_holding_all_that_decides_the_future(reference):
    checkpoint = load(os.path.join(reference['output'], 'last.pth.tar'))  # weights_only=True
    assert {
        'model',
        'model_ema',
        'optimizer',
        'scaler',
        'epoch',
        'step',
        'num_updates',
        'ranks',
        'best_metric',
        'best_epoch',
        'loss_sum',
        'loss_count',
        'args',
    } <= set(checkpoint)
    assert (checkpoint['epoch'], checkpoint['step'], checkpoint['num_updates']) == (2, 0, STEPS)
    assert {'torch', 'python'} <= set(checkpoint['ranks'][0]['rng'])


def test_checkpoint_hist_keeps_the_last_k_epoch_files(reference):
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(reference['output'], '*.pth.tar')))
    assert names == ['checkpoint-1.pth.tar', 'last.pth.tar', 'model_best.pth.tar']


def test_resuming_with_other_flags_warns_which_differ(reference, resume_folder, tmp_path):
    """A finished run resumed with other flags: nothing left to train, only the warning."""
    result = subprocess.run(
        command(
            resume_folder,
            str(tmp_path / 'out'),
            2,
            '--resume',
            os.path.join(reference['output'], 'last.pth.tar'),
            '--lr',
            '2e-3',
        ),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    warning = [line for line in result.stderr.splitlines() if line.startswith('warning: resuming')]
    assert len(warning) == 1 and 'lr 0.002 (checkpoint: 0.001)' in warning[0], result.stderr
    assert 'workers' not in warning[0]  # -j 2, not 0: it does not change the numbers, not listed


def test_resuming_a_finished_run_with_more_epochs_trains_at_the_new_schedules_lr(reference, resume_folder, tmp_path):
    """The reference's cosine over 2 epochs ends at --min-lr; run for 3, epoch 2 begins at the 3-epoch cosine's
    lr from its first step, and its summary row says so (the old schedule's last lr would be 1e-06)."""
    output = tmp_path / 'out'
    shutil.copytree(reference['output'], output)
    result = run_to_end(resume_folder, str(output), 0, '--resume', 'auto', '--epochs', '3')
    new_lr = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 2 / 3))  # timm's cosine at epoch 2 of 3
    assert {float(lr) for lr in re.findall(r'^Train: 2 .*LR: (\S+)', result.stdout, re.M)} == {float(f'{new_lr:.3e}')}
    assert float(summary_rows(output)[2]['lr']) == float(f'{new_lr:.6g}')


def test_resuming_an_fp16_run_restores_the_grad_scalers_loss_scale(tmp_path):
    """Native float16 on the CPU: tools/faults.py makes every step's loss infinite (2 steps an epoch), so
    the GradScaler skips each and halves its scale: 65536 -> 16384 in the first run, whose checkpoint
    holds that scale; the resumed run goes on from it to 4096 (a new scaler would end at 16384)."""
    resume_folder = make_image_folder(tmp_path / 'data', classes=2, train_per_class=4, val_per_class=1)
    output = tmp_path / 'out'
    args = [
        resume_folder,
        *'--model tf_efficientnetv2_b0 -b 4 --img-size 32 -j 0 --amp --amp-dtype float16 --log-interval 1'.split(),
        *'--output'.split(),
        output,
    ]
    run_train(*args, '--epochs', '1', faults=['--inf-loss-steps', '1,2'], env={'OMP_NUM_THREADS': '1'})
    assert load(output / 'last.pth.tar')['scaler']['scale'] == 2.0**14
    result = run_train(
        *args, '--epochs', '2', '--resume', 'auto', faults=['--inf-loss-steps', '1,2'], env={'OMP_NUM_THREADS': '1'}
    )
    assert 'Resumed from' in result.stdout
    final = load(output / 'last.pth.tar')
    assert final['epoch'] == 2 and final['num_updates'] == 4
    assert final['scaler']['scale'] == 2.0**12


def test_a_run_stopped_after_an_epochs_last_step_resumes_into_the_same_summary_row(resume_folder, reference, tmp_path):
    """SIGTERM during the last step of epoch 0: the checkpoint holds all 4 steps but not the epoch's end, so the
    resumed run validates at once; its summary row (the lr the epoch began with, its loss) is the uninterrupted
    run's, although the schedule already moved on to epoch 1's lr."""
    output = str(tmp_path / 'out')
    stopped = subprocess.run(
        train_command(resume_folder, *RECIPE, '-j', '0', '--output', output, faults=['--sigterm-at-loss', '4']),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert stopped.returncode == 143 and 'Stopped by SIGTERM at epoch 0, step 4' in stopped.stdout
    run_to_end(resume_folder, output, 0, '--resume', 'auto')
    assert_same_run(output, reference['output'])


# ------------------------------------------------------------------------------------------------
# Gradient accumulation: a step is --grad-accum-steps micro-batches; a run killed between two of them
# resumes from the last step's checkpoint and ends bit for bit as the uninterrupted run.

ACCUMULATING = ['--grad-accum-steps', '2', '-b', '2']  # after RECIPE's -b 4: 2 micro-batches of 2 per step


def test_an_accumulating_run_killed_between_micro_batches_resumes_bitwise(resume_folder, tmp_path):
    whole, cut = str(tmp_path / 'whole'), str(tmp_path / 'cut')
    reference = run_to_end(resume_folder, whole, 0, *ACCUMULATING)
    assert reference.stdout.count('Train:') == STEPS  # optimizer steps: 16 images / (2 x 2) per epoch
    assert 'batch 4 (2 per process x 2 accumulated)' in reference.stdout
    kill = subprocess.run(
        train_command(
            resume_folder, *RECIPE, *ACCUMULATING, '-j', '0', '--output', cut, faults=['--kill-at-loss', '12']
        ),  # micro-batch 2 of step 6
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert kill.returncode == -signal.SIGKILL and kill.stdout.count('Train:') == 5
    assert load(os.path.join(cut, 'last.pth.tar'))['num_updates'] == 5
    resumed = run_to_end(resume_folder, cut, 0, *ACCUMULATING, '--resume', 'auto')
    assert resumed_step(resumed.stdout) == (1, 1)
    assert_same_run(cut, whole)


def test_a_checkpoint_holds_the_random_stream_of_whatever_accelerator_trains(monkeypatch):
    """Dropout, drop path and random erasing draw from the device's own stream: checkpoint.rng_state saves it under
    the device's name ('npu' as 'cuda', through torch.npu as torch.cuda); the CPU and meta devices have none
    beyond torch's own."""
    import types

    import checkpoint
    import devices

    npu = types.SimpleNamespace(get_rng_state=lambda: torch.tensor([7, 8], dtype=torch.uint8))
    monkeypatch.setattr(torch, 'npu', npu, raising=False)
    saved = checkpoint.rng_state(types.SimpleNamespace(type='npu'))
    assert set(saved) == {'torch', 'python', 'npu'} and saved['npu'].tolist() == [7, 8]
    assert devices.accelerator_module(types.SimpleNamespace(type='npu')) is npu
    for device in ('cpu', 'meta'):
        assert set(checkpoint.rng_state(torch.device(device))) == {'torch', 'python'}
