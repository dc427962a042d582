"""A full disk while saving a checkpoint: one `error:` line naming the folder, the bytes needed and free,
exit status 2; the previous last.pth.tar stays whole, loads and resumes.

Each save writes the checkpoint once (last.pth.tar; model_best.pth.tar and checkpoint-E.pth.tar are hard
links to it), so a folder with room for one checkpoint holds a run. Two ways to fill the disk: tools/faults.py
makes the second save's writes fail with ENOSPC (works anywhere), and a real 100 MB tmpfs, where one b0
checkpoint (71 MB) fits and the next one's temporary file does not (needs root and mount; skipped elsewhere).
"""

import glob
import os
import re
import subprocess

import pytest
import torch

from conftest import load, run_train, summary_rows

ENV = {'OMP_NUM_THREADS': '1'}  # bitwise resume needs a fixed thread count
# 4 steps an epoch and a save at each epoch's end, of 71 MB (the weights and AdamW's two averages)
RECIPE = (
    '--model tf_efficientnetv2_b0 -b 4 --img-size 32 -j 0 --epochs 2 --opt adamw --lr 1e-3 --warmup-epochs 0 --seed 3'
).split()
ERROR = re.compile(
    r'^error: no space left in (\S+) for last\.pth\.tar: it needs about ([\d.]+) MB, ([\d.]+) MB are '
    r'free; free some space there or choose another --output$'
)


@pytest.fixture(scope='module')
def uninterrupted(resume_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp('uninterrupted') / 'out'
    run_train(resume_folder, *RECIPE, '--output', output, env=ENV)
    return output


def assert_one_line_error(result, folder):
    """-> (MB needed, MB free) from the run's only stderr line."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    match = ERROR.match(lines[0])
    assert match and match.group(1) == str(folder), lines[0]
    return float(match.group(2)), float(match.group(3))


def assert_epoch_0_checkpoint_kept(folder):
    """The second save failed: its temporary file is gone and last.pth.tar is epoch 0's, whole, the very
    file model_best.pth.tar was linked to then (the first epoch is the best so far)."""
    assert glob.glob(os.path.join(folder, '.*.tmp')) == []
    checkpoint = load(folder / 'last.pth.tar')  # weights_only: a whole file
    assert [checkpoint[key] for key in ('epoch', 'step', 'num_updates', 'best_epoch')] == [1, 0, 4, 0]
    assert os.stat(folder / 'model_best.pth.tar').st_ino == os.stat(folder / 'last.pth.tar').st_ino


def assert_same_run(output, reference):
    ours, theirs = load(output / 'last.pth.tar'), load(reference / 'last.pth.tar')
    assert (ours['epoch'], ours['num_updates']) == (theirs['epoch'], theirs['num_updates']) == (2, 8)
    assert all(torch.equal(ours['model'][name], tensor) for name, tensor in theirs['model'].items())
    assert summary_rows(output) == summary_rows(reference)


def test_a_disk_that_fills_at_the_second_save_ends_in_one_line_and_the_run_resumes_from_the_first(
    resume_folder, uninterrupted, tmp_path
):
    output = tmp_path / 'out'
    full = run_train(
        resume_folder, *RECIPE, '--output', output, env=ENV, check=False, faults=['--disk-full-at-save', '2']
    )
    needed, _ = assert_one_line_error(full, output)
    assert_epoch_0_checkpoint_kept(output)
    assert abs(needed * 1e6 - os.path.getsize(output / 'last.pth.tar')) < 0.01 * needed * 1e6  # its tensors
    resumed = run_train(resume_folder, *RECIPE, '--output', output, '--resume', 'auto', env=ENV)
    assert f'Resumed from {output / "last.pth.tar"}: epoch 1, step 0' in resumed.stdout
    assert_same_run(output, uninterrupted)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 100 MB tmpfs, unmounted afterwards; skipped where mounting is not allowed (not root, a container)."""
    folder = tmp_path / 'tmpfs'
    folder.mkdir()
    try:
        mount = subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', 'size=100m', 'tmpfs', str(folder)], capture_output=True, text=True
        )
    except OSError as error:  # no mount command
        pytest.skip(f'cannot mount a tmpfs here: {error}')
    if mount.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {mount.stderr.strip()}')
    yield folder
    subprocess.run(['umount', str(folder)], check=True)


def test_a_run_on_a_100_mb_filesystem_saves_one_checkpoint_and_resumes_from_it_elsewhere(
    resume_folder, uninterrupted, small_filesystem, tmp_path
):
    output = small_filesystem / 'out'
    full = run_train(resume_folder, *RECIPE, '--output', output, env=ENV, check=False)
    needed, free = assert_one_line_error(full, output)
    assert free < needed
    assert_epoch_0_checkpoint_kept(output)
    elsewhere = tmp_path / 'elsewhere'
    resumed = run_train(resume_folder, *RECIPE, '--output', elsewhere, '--resume', output / 'last.pth.tar', env=ENV)
    assert 'epoch 1, step 0' in resumed.stdout
    ours, theirs = load(elsewhere / 'last.pth.tar'), load(uninterrupted / 'last.pth.tar')
    assert all(torch.equal(ours['model'][name], tensor) for name, tensor in theirs['model'].items())


@pytest.mark.parametrize('links', ['hard links', 'no links'])
def test_a_save_under_several_names_gives_each_the_same_bytes_and_leaves_no_temporary_file(
    links, tmp_path, monkeypatch
):
    """model_best and checkpoint-E are hard links of last.pth.tar's bytes, or copies on a filesystem without
    links (FAT, some network and FUSE filesystems); replacing one later leaves the others' bytes as they were."""
    import checkpoint

    if links == 'no links':

        def refuse(source, target):
            raise OSError(1, 'Operation not permitted')

        monkeypatch.setattr(os, 'link', refuse)
    (tmp_path / 'model_best.pth.tar').write_bytes(b'an older best')
    names = [tmp_path / name for name in ('model_best.pth.tar', 'checkpoint-3.pth.tar', 'last.pth.tar')]
    checkpoint.atomic_save({'step': torch.arange(5)}, names[-1], links=names[:-1])
    assert {name.read_bytes() for name in names} == {names[-1].read_bytes()}
    assert torch.equal(torch.load(names[0], weights_only=True)['step'], torch.arange(5))
    assert (names[0].stat().st_ino == names[-1].stat().st_ino) == (links == 'hard links')
    checkpoint.atomic_write(names[-1], lambda f: f.write(b'the next epoch'))
    assert names[-1].read_bytes() == b'the next epoch' and torch.load(names[1], weights_only=True)['step'].numel() == 5
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(name.name for name in names)
