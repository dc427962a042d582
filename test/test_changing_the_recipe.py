"""Copy and modify, kept true: the README's "Changing the recipe" section shows the three changes people make
first (the loss, the optimizer with its schedule, the dataset) as diffs of train.py. Each applies with
`git apply` to a fresh copy of the files the README's "What to copy" lists, and `python train.py --epochs 1`
then trains. A torchvision dataset and a user's own datasets of (PIL image or numpy array, label) plug in the
same way and keep what makes the recipe exact: a run killed mid-epoch and resumed ends bit for bit as an
uninterrupted one.
"""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import BESIDE_FILES, ROOT, RUNTIME_FILES, summary_rows

ENV = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')  # bitwise needs a fixed thread count
TIMEOUT = 300


def readme_section(title):
    with open(os.path.join(ROOT, 'README.md')) as f:
        text = f.read()
    start = text.index(f'\n## {title}\n')
    end = text.find('\n## ', start + 1)
    return text[start : end if end > 0 else None]


def readme_diffs():
    """{first line of the diff's explanation: diff} for the ```diff blocks of 'Changing the recipe'."""
    return re.findall(r'```diff\n(.*?)```', readme_section('Changing the recipe'), re.S)


def fresh_copy(folder, beside=()):
    """The files a copy takes, as the README lists them, and of the files beside them only `beside`."""
    listed = re.findall(r'^- `(\w+\.py)`', readme_section('What to copy'), re.M)
    assert sorted(listed) == sorted(RUNTIME_FILES)
    folder.mkdir()
    for name in [*listed, *beside]:
        shutil.copy(os.path.join(ROOT, name), folder)
    return folder


def train(copy, *args):
    result = subprocess.run(
        [sys.executable, 'train.py', *map(str, args)],
        cwd=copy,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    return result.stdout


def train_lines(stdout, epoch=0):
    """(loss, lr) of each `Train:` line of the epoch."""
    return [
        (float(loss), float(lr)) for loss, lr in re.findall(rf'^Train: {epoch} .*Loss: (\S+) .*LR: (\S+)', stdout, re.M)
    ]


@pytest.fixture(scope='module')
def unchanged(tmp_path_factory):
    """The copy as it is, with the demo (demo_data.py), one epoch of it: the baseline each change is seen against."""
    copy = fresh_copy(tmp_path_factory.mktemp('unchanged') / 'project', beside=['demo_data.py'])
    return train(copy, '--epochs', '1', '--output', copy / 'run')


def test_the_readme_shows_the_three_changes_as_diffs_of_train_py():
    diffs = readme_diffs()
    assert len(diffs) == 3
    assert all(diff.startswith('--- a/train.py\n+++ b/train.py\n') for diff in diffs)


@pytest.mark.parametrize('index, change', [(0, 'loss'), (1, 'optimizer'), (2, 'dataset')])
def test_each_readme_diff_applies_to_a_fresh_copy_and_trains_an_epoch(index, change, unchanged, tmp_path):
    copy = fresh_copy(tmp_path / 'project', beside=['demo_data.py'])
    subprocess.run(
        ['git', 'apply', '-'], input=readme_diffs()[index], cwd=copy, text=True, check=True, capture_output=True
    )
    stdout = train(copy, '--epochs', '1', '--output', copy / 'run')
    assert re.search(r'^Epoch 0: train_loss \S+  eval_loss', stdout, re.M)
    assert (copy / 'run' / 'last.pth.tar').exists() and (copy / 'run' / 'summary.csv').exists()
    if change == 'loss':  # the focal loss weighs every image by (1 - p)^2 < 1: below cross entropy from step 0
        assert train_lines(stdout)[0][0] < train_lines(unchanged)[0][0]
    if change == 'optimizer':  # OneCycle moves the lr at every step; timm's schedules once an epoch
        assert len({lr for _, lr in train_lines(stdout)}) == len(train_lines(stdout)) > 2
        assert len({lr for _, lr in train_lines(unchanged)}) == 1
        assert 'SGD, OneCycleLR schedule' in stdout
    if change == 'dataset':
        assert '640 train / 160 val images (FakeData), 10 classes' in stdout


# ------------------------------------------------------------------------------------------------
# Other datasets keep exact resume

USER_DATASET = '''"""A user's dataset as torchvision's tutorials write one: (PIL image, label), here drawn per index."""
import random

import numpy as np
import torch
from PIL import Image, ImageDraw


class Shapes(torch.utils.data.Dataset):
    """A disc (label 0) or a square (label 1) of a random colour and place on a grey background."""

    def __init__(self, size, seed):
        self.size = size
        self.seed = seed

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        rng = random.Random(self.seed * 100003 + index)
        label = index % 2
        image = Image.new('RGB', (40, 40), (128, 128, 128))
        left = rng.randint(0, 15)
        top = rng.randint(0, 15)
        width = rng.randint(12, 24)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        draw = ImageDraw.Draw(image)
        (draw.ellipse if label == 0 else draw.rectangle)((left, top, left + width, top + width), fill=colour)
        return image, label


class ShapeArrays(Shapes):
    """The same as (H, W, 3) uint8 numpy arrays, as OpenCV and albumentations give images."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return np.asarray(image), label
'''
DATASETS = {
    'torchvision FakeData': """    import torchvision
    train_set = torchvision.datasets.FakeData(size=96, image_size=(3, 40, 40), num_classes=3)
    val_set = torchvision.datasets.FakeData(size=24, image_size=(3, 40, 40), num_classes=3, random_offset=96)
    return train_set, val_set, ['a', 'b', 'c']
""",
    "a user's Dataset of (PIL image, label)": """    import shapes
    return shapes.Shapes(96, seed=0), shapes.Shapes(24, seed=1), ['disc', 'square']
""",
    "a user's Dataset of (numpy HWC uint8 array, label)": """    import shapes
    return shapes.ShapeArrays(96, seed=0), shapes.ShapeArrays(24, seed=1), ['disc', 'square']
""",
}
RECIPE = '--epochs 2 -b 16 --log-interval 1 --checkpoint-interval 1 --aa rand-m9 --mixup 0.2 --drop-path 0.1'.split()
RECIPE += ['--model-ema']


def copy_with_dataset(folder, body):
    copy = fresh_copy(folder)
    (copy / 'shapes.py').write_text(USER_DATASET)
    source = (copy / 'train.py').read_text()
    (copy / 'train.py').write_text(with_datasets_returning(source, body))
    return copy


def with_datasets_returning(source, body):
    """train.py with the last statement of its datasets() (the call into data.py) replaced by `body`."""
    import ast

    function = next(node for node in ast.parse(source).body if getattr(node, 'name', None) == 'datasets')
    returned = function.body[-1]
    assert isinstance(returned, ast.Return) and ast.unparse(returned.value).startswith('data.load_datasets(')
    lines = source.splitlines(keepends=True)
    return ''.join(lines[: returned.lineno - 1]) + body + ''.join(lines[returned.end_lineno :])


@pytest.mark.parametrize('dataset', DATASETS)
def test_other_datasets_resume_bitwise_after_a_kill_mid_epoch(dataset, tmp_path):
    copy = copy_with_dataset(tmp_path / 'project', DATASETS[dataset])
    train(copy, *RECIPE, '--output', 'whole')
    process = subprocess.Popen(
        [sys.executable, 'train.py', *RECIPE, '--output', 'cut'],
        cwd=copy,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in process.stdout:  # 6 steps an epoch; killed after a checkpoint in the second epoch
        if line.startswith('Train: 1 [   2/'):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=TIMEOUT)
    assert process.returncode == -signal.SIGKILL
    resumed = train(copy, *RECIPE, '--output', 'cut', '--resume', 'auto')
    assert 'Resumed from' in resumed and 'epoch 1, step ' in resumed
    whole, cut = (torch.load(copy / run / 'last.pth.tar', weights_only=True) for run in ('whole', 'cut'))
    for part in ('model', 'model_ema'):
        assert all(torch.equal(whole[part][key], cut[part][key]) for key in whole[part]), part
    assert summary_rows(copy / 'whole') == summary_rows(copy / 'cut')


# ------------------------------------------------------------------------------------------------
# A copy stays small: the budgets the README states, computed


def test_the_copy_keeps_its_budgets_and_the_readme_states_its_size():
    """As ruff format lays the lines out (pyproject.toml; .ci/run checks every file is so laid out): each file of
    "What to copy" <= 400 lines, train.py <= 450, <= 3,000 together, and the README says how many; train.py reads
    as the recipe: train() <= 50 lines, the epoch loop in its first 200, train_one_epoch with at most
    torchvision's 9 parameters."""
    import ast

    listed = re.findall(r'^- `(\w+\.py)`', readme_section('What to copy'), re.M)
    formatted = subprocess.run(
        [sys.executable, '-m', 'ruff', 'format', '--check', *listed], cwd=ROOT, capture_output=True, text=True
    )
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
    lines = {name: len(open(os.path.join(ROOT, name)).read().splitlines()) for name in listed}
    assert all(count <= (450 if name == 'train.py' else 400) for name, count in lines.items()), lines
    stated = re.search(r'copy them together \(([\d,]+) lines\)', readme_section('What to copy')).group(1)
    assert int(stated.replace(',', '')) == sum(lines.values()) <= 3000, lines
    with open(os.path.join(ROOT, 'train.py')) as f:
        source = f.read()
    functions = {node.name: node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}
    assert functions['train'].end_lineno - functions['train'].lineno + 1 <= 50
    assert len(functions['train_one_epoch'].args.args) <= 9
    assert source[: source.index('    for epoch in range(')].count('\n') < 200


def test_the_readme_keeps_to_300_lines_its_history_in_docs_measurements():
    with open(os.path.join(ROOT, 'README.md')) as f:
        assert len(f.read().splitlines()) <= 300


def test_no_line_of_the_project_assigns_several_names_unless_it_unpacks_one_value():
    """`a, b = f()` and `for a, b in pairs` unpack one value; `a, b = x, y` and `a = b = x` pack two statements
    into one line, which is how a label once stayed on the CPU (`images, labels = to_device(images),
    labels.to(images.device)` evaluates its right side first)."""
    import ast

    packed = []
    tools = [os.path.join('tools', name) for name in os.listdir(os.path.join(ROOT, 'tools'))]
    for name in sorted([*os.listdir(ROOT), *tools]):
        if name.endswith('.py'):
            for node in ast.walk(ast.parse(open(os.path.join(ROOT, name)).read())):
                several_targets = isinstance(node, ast.Assign) and len(node.targets) > 1
                several_values = isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List))
                tuple_target = several_values and isinstance(node.targets[0], (ast.Tuple, ast.List))
                if several_targets or tuple_target:
                    packed.append(f'{name}:{node.lineno}: {ast.unparse(node)[:80]}')
    assert not packed, '\n'.join(packed)


# What a copy without one of the files beside it says, asked for that file's feature (each needs a tiny folder
# of images, DATA, or nothing; ENV_* add variables).
BESIDE_FEATURES = {
    'hugging_face.py': ['--dataset', 'hf', '.'],
    'shards.py': ['--dataset', 'wds', '.'],
    'cifar.py': ['--dataset', 'cifar10', '--data-path', '.'],
    'demo_data.py': [],
    'published.py': ['--model', 'tf_efficientnetv2_b0.in1k'],
    'weights.py': ['DATA', '--pretrained', 'weights.pth'],
    'evaluate.py': ['DATA', '--evaluate', '--resume', 'last.pth.tar', '--model', 'tf_efficientnetv2_b0'],
    'config.py': ['-c', 'recipe.yaml'],
    'progressive.py': ['DATA', '--progressive', '--prog-min-size', '32'],
    'random_erasing.py': ['DATA', '--reprob', '0.5'],
    'tensorboard_scalars.py': ['DATA', '--log-tensorboard'],
    'compiling.py': ['DATA', '--compile'],
    'npu.py': ['--device', 'npu'],
    'cluster.py': ['ENV_SLURM_STEP_NUM_TASKS=2', 'ENV_SLURM_PROCID=0', 'ENV_SLURM_LOCALID=0'],
}
SMALL = ['--model', 'tf_efficientnetv2_b0', '--img-size', '32', '-b', '4', '-j', '0', '--warmup-epochs', '0']


@pytest.fixture(scope='module')
def bare_copy(tmp_path_factory):
    """The copy alone and a folder of 16 images: it trains an epoch (--apex-amp without apex_amp.py: native mixed
    precision, said once; no curves.py: no curves.png, said once)."""
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp('bare')
    data_dir = make_image_folder(root / 'data', classes=2, train_per_class=8, val_per_class=2)
    copy = fresh_copy(root / 'project')
    stdout = train(copy, data_dir, *SMALL, '--epochs', '1', '--apex-amp', '--output', root / 'run')
    return dict(copy=copy, data=data_dir, stdout=stdout, run=root / 'run')


def test_the_copy_alone_trains_on_a_folder_and_says_what_it_left_out(bare_copy):
    assert re.search(r'^Epoch 0: train_loss \S+  eval_loss', bare_copy['stdout'], re.M)
    assert (bare_copy['run'] / 'last.pth.tar').exists()
    assert bare_copy['stdout'].count('apex is not available here; using native mixed precision') == 1
    assert bare_copy['stdout'].count('no curves.png is drawn') == 1


def test_the_readme_names_every_file_beside_the_copy():
    assert sorted([*BESIDE_FEATURES, 'apex_amp.py', 'curves.py', 'advice.py']) == sorted(BESIDE_FILES)
    assert all(f'`{name}`' in readme_section('What to copy') for name in BESIDE_FILES)


@pytest.mark.parametrize('needed', BESIDE_FEATURES)
def test_a_copy_without_a_file_beside_it_says_in_one_line_which_file_a_feature_needs(needed, bare_copy):
    """The README's "What to copy": a feature whose file a copy left out ends in one line naming that file."""
    flags = [str(bare_copy['data']) if flag == 'DATA' else flag for flag in BESIDE_FEATURES[needed]]
    env = dict(ENV, **{flag[4:].split('=')[0]: flag.split('=')[1] for flag in flags if flag.startswith('ENV_')})
    flags = [flag for flag in flags if not flag.startswith('ENV_')]
    (bare_copy['copy'] / 'recipe.yaml').write_text('lr: 0.01\n')
    result = subprocess.run(
        [sys.executable, 'train.py', *flags, *(SMALL if 'DATA' in BESIDE_FEATURES[needed] else []), '--epochs', '1'],
        cwd=bare_copy['copy'],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and needed in lines[0], result.stdout[-500:] + result.stderr
