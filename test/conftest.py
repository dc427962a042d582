"""Shared test helpers: the repo root on sys.path, tiny generated image folders, CLI runs.

Tests import the project's top-level files (model, data, ...) from the repo root and run
train.py as users do, in a subprocess.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# What a copy of the recipe takes (README, "What to copy"): train.py and the files it imports.
RUNTIME_FILES = tuple(
    'train.py flags.py model.py data.py transforms.py randaugment.py optim.py precision.py run.py checkpoint.py '
    'logs.py distributed.py devices.py errors.py'.split()
)
# Beside the copy, each imported only for its feature (README, "What to copy").
BESIDE_FILES = tuple(
    'published.py weights.py evaluate.py config.py demo_data.py cifar.py hugging_face.py shards.py progressive.py '
    'random_erasing.py tensorboard_scalars.py curves.py cluster.py apex_amp.py npu.py compiling.py advice.py'.split()
)
COLOURS = [(220, 40, 40), (40, 60, 220), (40, 200, 60), (230, 200, 40)]
# Every random stream a training step draws from, over two epochs: test_resume.py's and test_elastic.py's bitwise
# comparisons of an interrupted run with an uninterrupted one (each adds its batch size and how it is interrupted).
EVERY_RANDOM_STREAM = (
    '--model tf_efficientnetv2_b0 --img-size 32 --epochs 2 --opt adamw --lr 1e-3 --warmup-epochs 1 --seed 7 '
    '--aa rand-m9-mstd0.5 --mixup 0.2 --cutmix 1.0 --reprob 0.25 --drop 0.2 --drop-path 0.2 --model-ema '
    '--model-ema-decay 0.9 --log-interval 1 --checkpoint-interval 1'
).split()


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'cuda: needs a CUDA GPU, skipped without one (test/test_cuda.py; python -m pytest test -m cuda)'
    )


def make_image_folder(root, classes=2, train_per_class=8, val_per_class=3, size=(40, 48), fmt='JPEG', seed=0):
    """DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg: noisy images of one colour per
    class, so a model can learn them in a few steps."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    ext = {'JPEG': 'jpg', 'PNG': 'png'}[fmt]
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f'class_{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = np.array(COLOURS[c % len(COLOURS)], dtype=np.float32)
                pixels = pixels + rng.normal(0, 30, size=(size[1], size[0], 3))
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(os.path.join(folder, f'{i}.{ext}'), fmt)
    return str(root)


@pytest.fixture(scope='module')
def resume_folder(tmp_path_factory):
    """2 classes x 8 training images, 2 x 3 validation images: the interrupted-and-resumed runs' folder."""
    return make_image_folder(tmp_path_factory.mktemp('resume') / 'data', classes=2, train_per_class=8, val_per_class=3)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / 'data')


def train_command(*args, faults=()):
    """python train.py ARGS, or with faults injected (tools/faults.py) when `faults` are given."""
    if faults:
        return [sys.executable, os.path.join(ROOT, 'tools', 'faults.py'), *faults, '--', *map(str, args)]
    return [sys.executable, os.path.join(ROOT, 'train.py'), *map(str, args)]


def run_train(*args, timeout=600, check=True, env=None, faults=()):
    """python train.py ARGS in the repo root; returns the CompletedProcess (text output)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    result = subprocess.run(
        train_command(*args, faults=faults), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f'train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
        )
    return result


def load(path):
    """A checkpoint as train.py reads it: tensors and plain types only."""
    import torch

    return torch.load(path, map_location='cpu', weights_only=True)


def summary_rows(output):
    """summary.csv's rows without the images/s and peak memory columns (measurements, different in every run)."""
    import csv

    with open(os.path.join(output, 'summary.csv')) as f:
        return [
            {k: v for k, v in row.items() if k not in ('images_per_sec', 'peak_memory_mib')}
            for row in csv.DictReader(f)
        ]
