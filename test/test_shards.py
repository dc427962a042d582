"""--dataset wds: WebDataset tar shards in timm's layout (imagenet1k-train-NNNN.tar + _info.json), made here
with webdataset's ShardWriter (no network). They train on 1 and 2 processes, resume bitwise after SIGKILL and
validate every image once, because shards.py reads them as a map-style dataset through an index of member
offsets. Bad shards: a corrupt image is skipped, named and counted; a truncated shard is one error line naming
it, or with --skip-bad-shards a warning saying how many images are lost; a sample without a label is one line.

The shards hold the images of conftest's 7-class folder (14 train, 7 val) in the folder's own order, so a wds run
computes exactly what a folder run does. About a minute on 2 busy CPU cores.
"""

import csv
import json
import os
import re
import signal
import sys

import pytest
import torch

from conftest import load, make_image_folder, run_train, summary_rows
from test_distributed import EXACT, losses, torchrun

webdataset = pytest.importorskip('webdataset')
import data  # noqa: E402
import shards  # noqa: E402

RECIPE = ['--dataset', 'wds', '--model', 'tf_efficientnetv2_b0', *EXACT, '--checkpoint-interval', '1']


def write_shards(folder, output, per_shard=4, prefix='imagenet1k', info=True, spoil=None):
    """The folder's train/ and val/ images as PREFIX-train-NNNN.tar and PREFIX-validation-NNNN.tar (+ _info.json),
    in the order data.ImageFolder lists them; spoil(key, sample) may change a sample before it is written."""
    os.makedirs(output, exist_ok=True)
    train_set, val_set, _ = data.load_datasets('folder', folder)
    splits = {}
    for split, dataset in (('train', train_set), ('validation', val_set)):
        with webdataset.ShardWriter(
            os.path.join(output, f'{prefix}-{split}-%04d.tar'), maxcount=per_shard, verbose=0
        ) as writer:
            for index in range(len(dataset)):
                key = f'{split}_{index:04d}'
                with open(dataset.path(index), 'rb') as file:
                    sample = {'__key__': key, 'jpg': file.read(), 'cls': int(dataset.labels[index])}
                writer.write(spoil(key, sample) if spoil else sample)
        names = sorted(name for name in os.listdir(output) if f'-{split}-' in name)
        splits[split] = dict(
            name=split,
            num_samples=len(dataset),
            filenames=names,
            shard_lengths=[min(per_shard, len(dataset) - i * per_shard) for i in range(len(names))],
        )
    if info:
        with open(os.path.join(output, '_info.json'), 'w') as file:
            json.dump(dict(name=prefix, splits=splits), file)
    return str(output)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """14 training images (not a multiple of 4 or 3), 7 validation images (prime), as in test_distributed."""
    return make_image_folder(
        tmp_path_factory.mktemp('shards') / 'folder', classes=7, train_per_class=2, val_per_class=1
    )


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    """The index cache for train.py runs ($XDG_CACHE_HOME), away from the user's."""
    return {'XDG_CACHE_HOME': str(tmp_path_factory.mktemp('cache')), 'OMP_NUM_THREADS': '1'}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, 'CACHE', str(tmp_path / 'index-cache'))


@pytest.fixture(scope='module')
def shard_dir(folder, tmp_path_factory):
    return write_shards(folder, tmp_path_factory.mktemp('wds') / 'in1k')


@pytest.fixture(scope='module')
def one_process(shard_dir, cache, tmp_path_factory):
    output = tmp_path_factory.mktemp('one') / 'run'
    result = run_train(shard_dir, *RECIPE, '-b', '4', '--output', output, env=cache)
    return dict(output=str(output), stdout=result.stdout)


def test_shards_in_timms_layout_train_exactly_like_the_same_images_in_a_folder(one_process, folder, tmp_path):
    result = run_train(folder, *RECIPE[2:], '-b', '4', '--output', tmp_path / 'run', env={'OMP_NUM_THREADS': '1'})
    assert '14 train / 7 val images' in one_process['stdout']
    assert losses(result.stdout) == losses(one_process['stdout']) and len(losses(result.stdout)) == 6
    ours, theirs = load(os.path.join(one_process['output'], 'last.pth.tar')), load(tmp_path / 'run' / 'last.pth.tar')
    assert all(torch.equal(ours['model'][key], theirs['model'][key]) for key in theirs['model'])


def validation_lines(stdout):
    """-> [(loss, 'Acc@1: ... Acc@5: ...')] of the Test lines (the batch's and the running averages)."""
    return [
        (float(re.search(r'Loss: +(\S+)', line).group(1)), line[line.index('Acc@1') :])
        for line in stdout.splitlines()
        if line.startswith('Test:')
    ]


def test_two_processes_train_like_one_and_validate_every_image_once(one_process, shard_dir, cache, tmp_path):
    result = torchrun(2, [shard_dir, *RECIPE, '-b', '2', '--output', tmp_path / 'run'], env=cache)
    assert losses(result.stdout) == pytest.approx(losses(one_process['stdout']), rel=2e-3)
    # 7 images: counted once each, the accuracies are sevenths, as on one process (padding to 8 would change them)
    ours, theirs = validation_lines(result.stdout), validation_lines(one_process['stdout'])
    assert len(theirs) == 4 and [acc for _, acc in ours] == [acc for _, acc in theirs]
    assert [loss for loss, _ in ours] == pytest.approx([loss for loss, _ in theirs], rel=2e-3)
    assert [row['eval_top1'] for row in summary_rows(tmp_path / 'run')] == [
        row['eval_top1'] for row in summary_rows(one_process['output'])
    ]


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_runs_bits(one_process, shard_dir, cache, tmp_path):
    output = tmp_path / 'run'
    killed = run_train(
        shard_dir, *RECIPE, '-b', '4', '--output', output, env=cache, check=False, faults=['--kill-at-loss', '5']
    )  # epoch 1, its second step
    assert killed.returncode == -signal.SIGKILL
    assert (load(output / 'last.pth.tar')['epoch'], load(output / 'last.pth.tar')['step']) == (1, 1)
    resumed = run_train(shard_dir, *RECIPE, '-b', '4', '--output', output, '--resume', 'auto', '-j', '2', env=cache)
    assert 'Resumed from' in resumed.stdout
    ours, theirs = load(output / 'last.pth.tar'), load(os.path.join(one_process['output'], 'last.pth.tar'))
    for key in ('model', 'model_ema'):
        assert all(torch.equal(ours[key][name], theirs[key][name]) for name in theirs[key]), key
    assert summary_rows(output) == summary_rows(one_process['output'])


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith('error: ') and sum(line.startswith('error: ') for line in lines) == 1
    return lines[-1]


@pytest.fixture(scope='module')
def damaged(folder, cache, tmp_path_factory):
    """Shards with a truncated image (train_0005, in shard 0001) and a truncated shard (0002, train_0008..11):
    a run without --skip-bad-shards, and one epoch with it (2 loader workers)."""

    def spoil(key, sample):
        return dict(sample, jpg=sample['jpg'][: len(sample['jpg']) // 2]) if key == 'train_0005' else sample

    root = tmp_path_factory.mktemp('damaged')
    shard_dir = write_shards(folder, root / 'in1k', spoil=spoil)
    shard = os.path.join(shard_dir, 'imagenet1k-train-0002.tar')
    with open(shard, 'r+b') as file:
        file.truncate(os.path.getsize(shard) // 2)
    stopped = run_train(shard_dir, *RECIPE, '--output', root / 'stopped', env=cache, check=False)
    # -b 2: the 10 images left (14, less the 4 of the truncated shard) fill whole batches, so the epoch reads
    # every one of them, the damaged one included, whatever order the sampler draws
    skipped = run_train(
        shard_dir,
        *RECIPE,
        *'-b 2 --epochs 1 -j 2 --skip-bad-shards --output'.split(),
        root / 'run',
        env=cache,
    )
    return dict(shard=shard, stopped=stopped, skipped=skipped, output=root / 'run')


def test_a_corrupt_image_is_skipped_named_and_counted_in_skipped_images(damaged):
    stderr = damaged['skipped'].stderr
    warnings = [line for line in stderr.splitlines() if line.startswith('warning: skipping unreadable image')]
    assert len(warnings) == 1 and 'imagenet1k-train-0001.tar:train_0005.jpg: ' in warnings[0], stderr[-2000:]
    with open(damaged['output'] / 'summary.csv') as file:
        assert next(csv.DictReader(file))['bad_images'] == '1'
    assert re.search(r'^Epoch 0: .*skipped_images 1$', damaged['skipped'].stdout, re.M)


def test_a_truncated_shard_is_one_error_line_naming_it(damaged):
    line = one_error_line(damaged['stopped'])
    assert line.startswith(f'error: unreadable shard {damaged["shard"]}: it ends at byte ') and 'truncated' in line
    assert '--skip-bad-shards' in line, line


def test_skip_bad_shards_leaves_a_truncated_shard_out_and_says_how_many_images_are_lost(damaged):
    assert f'warning: skipping unreadable shard {damaged["shard"]}: ' in damaged['skipped'].stderr
    assert '; 4 images lost' in damaged['skipped'].stderr  # _info.json's count for the shard
    assert '10 train / 7 val images' in damaged['skipped'].stdout


def test_a_sample_without_a_label_is_one_error_naming_its_key(folder, tmp_path):
    def spoil(key, sample):
        return {k: v for k, v in sample.items() if k != 'cls'} if key == 'validation_0003' else sample

    shard_dir = write_shards(folder, tmp_path / 'in1k', spoil=spoil)
    shard = os.path.join(shard_dir, 'imagenet1k-validation-0000.tar')
    with pytest.raises(
        data.DataError,
        match=f'^sample validation_0003 in {re.escape(shard)} has no '
        r'validation_0003\.cls \(its label\); its files: validation_0003\.jpg$',
    ):
        shards.load_shards(shard_dir)


def test_splits_come_from_shard_names_without_info_json_and_from_brace_patterns(folder, tmp_path):
    shard_dir = write_shards(folder, tmp_path / 'wds', per_shard=3, prefix='my-data', info=False)
    train_set, val_set, classes = shards.load_shards(shard_dir)
    assert (len(train_set), len(val_set), classes) == (14, 7, [str(label) for label in range(7)])
    reference, _, _ = data.load_datasets('folder', folder)
    assert [train_set[i][1] for i in range(14)] == reference.labels.tolist()
    assert torch.equal(train_set[13][0], reference[13][0])
    pattern = os.path.join(shard_dir, 'my-data-{train-{0000..0001},validation-0000}.tar')
    train_set, val_set, _ = shards.load_shards(pattern)
    assert (len(train_set), len(val_set)) == (6, 3)
    train_set, val_set, _ = shards.load_shards(shard_dir, 'my-data-train-{0003..0004}.tar', 'train')
    assert (len(train_set), len(val_set)) == (5, 14)
    with pytest.raises(data.DataError, match=r'has no test split; its splits: train, validation; .*--val-split'):
        shards.load_shards(shard_dir, val_split='test')


def test_labels_from_a_json_field_and_png_and_webp_images(folder, tmp_path):
    import io

    from PIL import Image

    def recode(key, sample):
        image = Image.open(io.BytesIO(sample['jpg']))
        kind = ('png', 'webp')[int(key[-1]) % 2]
        encoded = io.BytesIO()
        image.save(encoded, kind.upper(), lossless=True) if kind == 'webp' else image.save(encoded, 'PNG')
        return {'__key__': key, kind: encoded.getvalue(), 'json': {'label': sample['cls'] + 10}}

    shard_dir = write_shards(folder, tmp_path / 'wds', spoil=recode)
    train_set, val_set, classes = shards.load_shards(shard_dir, target_key='label')
    assert len(classes) == 17 and [train_set[i][1] for i in range(3)] == [10, 10, 11]
    reference, _, _ = data.load_datasets('folder', folder)
    for index in (4, 5):  # a PNG, a lossless WebP of the same pixels
        assert torch.equal(train_set[index][0], reference[index][0])


def test_the_index_is_made_once_and_again_when_a_shard_changes(folder, tmp_path):
    shard_dir = write_shards(folder, tmp_path / 'wds')

    def cached():
        return {
            name: os.stat(os.path.join(shards.CACHE, name)).st_mtime_ns
            for name in os.listdir(shards.CACHE)
            if name.endswith('.npy')
        }

    shards.load_shards(shard_dir)
    first = cached()
    assert len(first) == 6  # 4 train + 2 validation shards
    shards.load_shards(shard_dir)
    assert cached() == first
    os.utime(os.path.join(shard_dir, 'imagenet1k-train-0000.tar'), ns=(0, 0))
    train_set, _, _ = shards.load_shards(shard_dir)
    assert len(cached()) == 7 and len(train_set) == 14


def test_a_hub_dataset_id_that_cannot_be_fetched_is_one_error_line(cache, tmp_path):
    result = run_train(
        'someone/no-such-shards',
        *RECIPE,
        '--output',
        tmp_path / 'run',
        check=False,
        env=dict(cache, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf')),
    )
    line = one_error_line(result)
    assert 'someone/no-such-shards is no folder here and cannot be downloaded from the Hugging Face hub' in line


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))
