"""--dataset hf: a Hugging Face dataset as train.py's data, made here offline with the datasets package,
in the two forms users have: the hub's layout of parquet files (data/train-*.parquet,
data/validation-*.parquet) and a DatasetDict saved with save_to_disk. Images go through the same
transforms, sampler and exact resume as a folder's. HF_HOME points at a temporary folder: the
user's cache is never touched, and nothing reaches the network.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COLOURS, ROOT, summary_rows, train_command

datasets = pytest.importorskip('datasets')

import data  # noqa: E402
import transforms  # noqa: E402

CLASSES = ['red', 'blue', 'green']
COARSE = ['warm', 'cool']  # blue is cool
RECIPE = [
    *'--dataset hf --model tf_efficientnetv2_b0 --img-size 32 -b 4 --epochs 2 --warmup-epochs 0 --opt adamw'.split(),
    *'--lr 1e-3 --aa rand-m9 --mixup 0.2 --model-ema --log-interval 1 --checkpoint-interval 1 -j 0'.split(),
]


def make_split(count, seed):
    """Noisy images of one colour per class, under the column names CIFAR-100 uses on the hub."""
    rng = np.random.RandomState(seed)
    images = [
        Image.fromarray(
            np.clip(np.array(COLOURS[i % 3]) + rng.normal(0, 30, (30 + i % 5, 40, 3)), 0, 255).astype(np.uint8)
        )
        for i in range(count)
    ]
    features = datasets.Features(
        img=datasets.Image(),
        fine_label=datasets.ClassLabel(names=CLASSES),
        coarse_label=datasets.ClassLabel(names=COARSE),
        id=datasets.Value('int32'),
    )
    return datasets.Dataset.from_dict(
        dict(
            img=images,
            fine_label=[i % 3 for i in range(count)],
            coarse_label=[int(i % 3 == 1) for i in range(count)],
            id=list(range(count)),
        ),
        features=features,
    )


@pytest.fixture(scope='module')
def hub_layout(tmp_path_factory):
    root = tmp_path_factory.mktemp('hub') / 'colours'
    (root / 'data').mkdir(parents=True)
    for name, count, seed in (('train', 16, 0), ('validation', 6, 1)):
        make_split(count, seed).to_parquet(str(root / 'data' / f'{name}-00000-of-00001.parquet'))
    return root


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
    return dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', HF_HOME=str(tmp_path / 'hf_home'))


def run(args, env, faults=()):
    return subprocess.run(
        train_command(*args, faults=faults), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_parquet_files_in_the_hubs_layout_train_and_resume_bitwise(hub_layout, hf_home, tmp_path):
    whole = run([hub_layout, *RECIPE, '--output', tmp_path / 'whole'], hf_home)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert (
        '16 train / 6 val images (splits train, validation, columns img, fine_label (other class labels: '
        'coarse_label; --target-key picks one)), 3 classes'
    ) in whole.stdout
    assert '\r' not in whole.stdout + whole.stderr  # no progress bars in the log
    killed = run([hub_layout, *RECIPE, '--output', tmp_path / 'cut'], hf_home, faults=['--kill-at-loss', '6'])
    assert killed.returncode == -9 and killed.stdout.count('Train:') == 5  # epoch 1, step 1 saved
    resumed = run([hub_layout, *RECIPE, '--output', tmp_path / 'cut', '--resume', 'auto'], hf_home)
    assert resumed.returncode == 0 and 'Resumed from' in resumed.stdout, resumed.stderr[-3000:]
    ours, theirs = (torch.load(tmp_path / name / 'last.pth.tar', weights_only=True) for name in ('whole', 'cut'))
    assert ours['classes'] == CLASSES
    for part in ('model', 'model_ema'):
        assert all(torch.equal(ours[part][key], theirs[part][key]) for key in ours[part]), part
    assert summary_rows(tmp_path / 'whole') == summary_rows(tmp_path / 'cut')
    assert len(summary_rows(tmp_path / 'whole')) == 2


def test_a_dataset_saved_to_disk_loads_its_class_names_and_images_through_the_same_transforms(tmp_path, hf_home):
    datasets.DatasetDict(train=make_split(6, 0), val=make_split(3, 1)).save_to_disk(str(tmp_path / 'saved'))
    train_set, val_set, classes = data.load_datasets('hf', str(tmp_path / 'saved'))
    assert classes == CLASSES and (len(train_set), len(val_set)) == (6, 3)
    assert train_set.split.column_names == ['image', 'label']
    image, label, bad_count = data.Transformed(train_set, transforms.train_transform(24, aa='rand-m9'))[(4, 9)]
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8 and (label, bad_count) == (1, 0)
    assert torch.equal(
        data.Transformed(val_set)[2][0], torch.from_numpy(np.array(make_split(3, 1)[2]['img'])).permute(2, 0, 1)
    )  # the decoded pixels, untouched without a transform


def one_line_error(path, **options):
    with pytest.raises(data.DataError) as error:
        data.load_datasets('hf', str(path), **options)
    assert '\n' not in str(error.value)
    return str(error.value)


def test_train_and_test_splits_train_with_no_flag_and_the_flags_pick_other_splits_and_columns(tmp_path, hf_home):
    """CIFAR-100's layout on the hub: train and test splits, fine_label and coarse_label."""
    datasets.DatasetDict(train=make_split(8, 0), test=make_split(4, 1)).save_to_disk(str(tmp_path / 'cifar'))
    args = [
        tmp_path / 'cifar',
        *'--dataset hf --model tf_efficientnetv2_b0 --img-size 32 -b 4 --epochs 1 -j 0 --warmup-epochs 0'.split(),
    ]
    fine = run([*args, '--output', tmp_path / 'fine'], hf_home)
    assert fine.returncode == 0, fine.stderr[-3000:]
    assert (
        '8 train / 4 val images (splits train, test, columns img, fine_label (other class labels: coarse_label; '
        '--target-key picks one)), 3 classes'
    ) in fine.stdout
    coarse = run(
        [
            *args,
            '--output',
            tmp_path / 'coarse',
            *'--train-split test --val-split train --target-key coarse_label'.split(),
        ],
        hf_home,
    )
    assert coarse.returncode == 0, coarse.stderr[-3000:]
    assert (
        '4 train / 8 val images (splits test, train, columns img, coarse_label (other class labels: fine_label; '
        '--target-key picks one)), 2 classes'
    ) in coarse.stdout
    assert torch.load(tmp_path / 'coarse' / 'last.pth.tar', weights_only=True)['classes'] == COARSE


def test_datasets_without_the_splits_or_columns_train_py_needs_say_what_is_missing(tmp_path, hf_home):
    datasets.DatasetDict(train=make_split(3, 0), extra=make_split(3, 1)).save_to_disk(str(tmp_path / 'no_val'))
    assert (
        'has no held-out split (validation, val, valid, test); its splits: train, extra; name the one to use '
        'with --val-split'
    ) in one_line_error(tmp_path / 'no_val')
    assert 'has no other split; its splits: train, extra; name the one to use with --train-split' in one_line_error(
        tmp_path / 'no_val', splits=('other', 'extra')
    )
    assert 'no column label; its columns are img (Image), fine_label (ClassLabel)' in one_line_error(
        tmp_path / 'no_val', splits=('train', 'extra'), keys=(None, 'label')
    )
    plain = make_split(3, 0).cast_column('fine_label', datasets.Value('int64')).remove_columns('coarse_label')
    datasets.DatasetDict(train=plain, validation=plain).save_to_disk(str(tmp_path / 'no_labels'))
    assert 'fine_label (Value)' in one_line_error(tmp_path / 'no_labels')
    assert 'name the one to use with --target-key' in one_line_error(tmp_path / 'no_labels')
    train_set, _, classes = data.load_datasets('hf', str(tmp_path / 'no_labels'), keys=(None, 'fine_label'))
    assert classes == ['0', '1', '2'] and train_set[2][1] == 2  # plain integers: classes 0 .. max
    (tmp_path / 'empty').mkdir()
    assert 'cannot read' in one_line_error(tmp_path / 'empty')


def test_without_the_datasets_package_the_error_names_the_pip_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'datasets', None)  # importing it now fails
    assert 'pip install datasets' in one_line_error(tmp_path)
