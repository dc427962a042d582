"""Bad input ends train.py with one line, `error: <what is wrong and what to do>`, exit status 2, no
traceback, and never touches the checkpoints already in --output.

Each case is one CLI run in a subprocess; they start together (a module fixture, 4 at a time), so
the file takes about as long as its slowest few cases (~1-2 minutes on 2 busy CPU cores).
Every case that can points --output at a folder holding a run and passes --resume auto, and the
folder's files are compared byte for byte before and after all of them.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import devices
import distributed
import errors
from conftest import ROOT, make_image_folder

ENV = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
BASE = ['--model', 'tf_efficientnetv2_b0', '--img-size', '32', '-b', '2', '-j', '0', '--epochs', '1']


class MakesDirectoryWhenUnpickled:
    """A harmless stand-in for os.system in a malicious checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def fake_checkpoint(arch='tf_efficientnetv2_b0', num_classes=2):
    """A train.py checkpoint's keys; resume checks the architecture and class count first."""
    return dict(
        model={},
        model_ema=None,
        optimizer={},
        scaler={},
        epoch=1,
        step=0,
        num_updates=8,
        epoch_lr=None,
        best_metric=50.0,
        best_epoch=0,
        loss_sum=0.0,
        loss_count=0,
        bad_images=0,
        ranks=[],
        arch=arch,
        num_classes=num_classes,
        classes=['class_0', 'class_1'],
        args={},
    )


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad_input')
    good = make_image_folder(root / 'good', classes=2, train_per_class=2, val_per_class=1)
    made = dict(good=good, root=str(root))
    for name in ('no_train', 'no_val', 'empty_class', 'other_classes'):
        made[name] = shutil.copytree(good, root / name)
    shutil.rmtree(made['no_train'] / 'train')
    shutil.rmtree(made['no_val'] / 'val')
    for image in (made['empty_class'] / 'train' / 'class_1').iterdir():
        image.unlink()
    os.rename(made['other_classes'] / 'val' / 'class_1', made['other_classes'] / 'val' / 'class_9')

    existing = root / 'existing_run'  # what a run leaves behind
    existing.mkdir()
    torch.save(fake_checkpoint(), existing / 'last.pth.tar')
    torch.save(fake_checkpoint(), existing / 'model_best.pth.tar')
    (existing / 'summary.csv').write_text('epoch,train_loss\n0,0.5\n')
    made['existing'] = existing

    torch.save(fake_checkpoint(arch='efficientnetv2_rw_t'), root / 'rw_t.pth.tar')
    torch.save(fake_checkpoint(num_classes=5), root / 'five_classes.pth.tar')
    torch.save(dict(fake_checkpoint(), args={'opt': 'rmsproptf'}), root / 'rmsproptf.pth.tar')
    torch.save({'conv_stem.weight': torch.zeros(24, 3, 3, 3)}, root / 'bare_weights.pth')
    torch.save({'model': torch.zeros(100_000)}, root / 'whole.pth')
    whole = (root / 'whole.pth').read_bytes()
    (root / 'truncated.pth.tar').write_bytes(whole[: len(whole) // 2])
    for flag in ('resume', 'pretrained'):
        marker = root / f'code_ran_{flag}'
        torch.save(
            {'model': MakesDirectoryWhenUnpickled(str(marker)), 'arch': 'tf_efficientnetv2_b0'},
            root / f'evil_{flag}.pth.tar',
        )
        made[f'marker_{flag}'] = marker
    (root / 'a_file').write_text('not a folder\n')
    (root / 'unknown_flag.yaml').write_text('lr: 0.01\nlayer_decay: 0.8\n')  # a timm flag not here
    (root / 'a_list.yaml').write_text('- lr\n- 0.01\n')
    return made


# id -> (arguments, a piece of the message). {name} is a path from the `files` fixture.
# RESUME: the run continues the existing run folder, whose files must survive unchanged.
RESUME = ['--output', '{existing}', '--resume', 'auto']
CASES = {
    'missing_data_path': (['{root}/no_such_folder', *RESUME], 'does not exist'),
    'missing_train_folder': (['{no_train}', *RESUME], 'no train/ folder'),
    'missing_val_folder': (['{no_val}', *RESUME], 'no held-out folder (validation/, val/, valid/, test/)'),
    'empty_class_folder': (['{empty_class}', *RESUME], 'has no images'),
    'val_classes_differ_from_train': (['{other_classes}', *RESUME], "only in val: ['class_9']"),
    'unknown_model_suggests_close_names': (
        ['{good}', *RESUME, '--model', 'efficientnetv2_rw_tt'],
        'efficientnetv2_rw_t',
    ),
    'bad_rand_augment_string': (['{good}', *RESUME, '--aa', 'rand-m9-x3'], 'RandAugment spec'),
    'zero_batch_size': (['{good}', *RESUME, '-b', '0'], '--batch-size must be positive'),
    'negative_epochs': (['{good}', *RESUME, '--epochs', '-3'], '--epochs must be positive'),
    'image_size_below_minimum': (['{good}', *RESUME, '--img-size', '16'], 'below the minimum of 32'),
    'checkpoint_of_another_model': (
        ['{good}', '--output', '{existing}', '--resume', '{root}/rw_t.pth.tar'],
        'holds efficientnetv2_rw_t with 2 classes, this run is tf_efficientnetv2_b0 '
        'with 2; resume with --model efficientnetv2_rw_t and the same data, or start '
        'from its weights with --pretrained',
    ),
    'resume_auto_of_a_run_of_another_model': (
        ['{good}', *RESUME, '--model', 'efficientnetv2_rw_t'],
        'resume with --model tf_efficientnetv2_b0 and the same data, or choose another --output',
    ),
    'checkpoint_of_another_class_count': (
        ['{good}', '--output', '{existing}', '--resume', '{root}/five_classes.pth.tar'],
        'with 5 classes',
    ),
    'checkpoint_of_another_optimizer': (
        ['{good}', '--output', '{existing}', '--resume', '{root}/rmsproptf.pth.tar', '--opt', 'sgd'],
        'holds rmsproptf optimizer state',
    ),
    'weights_that_are_not_a_train_checkpoint': (
        ['{good}', '--output', '{existing}', '--resume', '{root}/bare_weights.pth'],
        'not a train.py checkpoint',
    ),
    'truncated_checkpoint': (
        ['{good}', '--output', '{existing}', '--resume', '{root}/truncated.pth.tar'],
        'cannot read checkpoint',
    ),
    'missing_checkpoint': (
        ['{good}', '--output', '{existing}', '--resume', '{root}/nothing.pth.tar'],
        'checkpoint not found',
    ),
    'resume_pickle_that_runs_code': (
        ['{good}', '--output', '{existing}', '--resume', '{root}/evil_resume.pth.tar'],
        'could run as code',
    ),
    'pretrained_pickle_that_runs_code': (
        ['{good}', '--output', '{root}/fresh', '--pretrained', '{root}/evil_pretrained.pth.tar'],
        'could run as code',
    ),
    'output_that_cannot_be_written': (['{good}', '--output', '{root}/a_file/run'], 'cannot write to --output'),
    'new_run_into_a_folder_holding_a_run': (['{good}', '--output', '{existing}'], 'already holds a run'),
    'resume_auto_without_output': (['{good}', '--resume', 'auto'], '--resume auto needs --output'),
    'cuda_without_a_gpu': (['{good}', *RESUME, '--device', 'cuda'], 'no CUDA GPU is visible'),
    'training_set_smaller_than_the_accumulated_batch': (
        ['{good}', *RESUME, '--grad-accum-steps', '3'],
        'the training set has 4 images, fewer than one global batch '
        'of 6 (-b 2 x 1 process x --grad-accum-steps 3); give -b 1',
    ),
    'optimizer_that_is_not_a_choice': (
        ['{good}', *RESUME, '--opt', 'adam'],
        "argument --opt: invalid choice: 'adam' (choose from 'rmsproptf', 'sgd', "
        "'adamw'); another goes in create_optimizer() in train.py",
    ),
    'flag_that_does_not_exist': (['{good}', *RESUME, '--layer-decay', '0.8'], 'unrecognized arguments: --layer-decay'),
    'config_with_a_flag_that_does_not_exist': (
        ['{good}', *RESUME, '-c', '{root}/unknown_flag.yaml'],
        'unknown_flag.yaml: unknown flags layer_decay',
    ),
    'config_that_is_not_a_mapping': (['{good}', *RESUME, '-c', '{root}/a_list.yaml'], 'holds no flags'),
    'config_that_is_missing': (['{good}', *RESUME, '-c', '{root}/nothing.yaml'], 'cannot read -c'),
    'evaluate_a_checkpoint_of_another_variant': (
        ['{good}', '--evaluate', '--resume', '{root}/rw_t.pth.tar'],
        'holds efficientnetv2_rw_t, not --model tf_efficientnetv2_b0: leave --model out',
    ),
    # New runs: no folder may be left behind (NEW_RUNS), nor one in the default output/train/.
    'missing_data_path_new_run': (['{root}/no_such_folder', '--output', '{root}/new_run_1'], 'does not exist'),
    'missing_checkpoint_new_run': (
        ['{good}', '--output', '{root}/new_run_2', '--resume', '{root}/nothing.pth'],
        'checkpoint not found',
    ),
    'missing_data_path_default_output': (['{root}/no_such_folder'], 'does not exist'),
}
NEW_RUNS = ('new_run_1', 'new_run_2', 'fresh')


def snapshot(folder):
    return {
        name: (hashlib.sha256((folder / name).read_bytes()).hexdigest(), os.stat(folder / name).st_mtime_ns)
        for name in sorted(os.listdir(folder))
    }


@pytest.fixture(scope='module')
def results(files):
    before = snapshot(files['existing'])

    def run(case):
        args = [arg.format(**files) for arg in CASES[case][0]]
        return case, subprocess.run(
            [sys.executable, os.path.join(ROOT, 'train.py'), *BASE, *args],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )

    default_output = os.path.join(ROOT, 'output', 'train')
    runs_before = set(os.listdir(default_output)) if os.path.isdir(default_output) else set()
    with ThreadPoolExecutor(4) as pool:
        done = dict(pool.map(run, CASES))
    done['existing folder'] = (before, snapshot(files['existing']))
    done['default output'] = (runs_before, set(os.listdir(default_output)) if os.path.isdir(default_output) else set())
    return done


@pytest.mark.parametrize('case', CASES)
def test_bad_input_gives_one_error_line_and_exit_status_2(case, results):
    result = results[case]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
    assert CASES[case][1] in lines[0], lines[0]
    assert 'Traceback' not in result.stdout + result.stderr


def test_bad_input_never_touches_the_checkpoints_in_output(results):
    before, after = results['existing folder']
    assert after == before


def test_bad_input_leaves_no_run_folder_behind(results, files):
    for name in NEW_RUNS:
        assert not os.path.exists(os.path.join(files['root'], name)), name
    before, after = results['default output']
    assert after == before


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(results, files):
    for flag in ('resume', 'pretrained'):
        assert results[f'{flag}_pickle_that_runs_code'].returncode == 2
        assert not files[f'marker_{flag}'].exists(), f'--{flag} ran the pickled code'


def test_a_folder_of_48_images_with_timms_batch_of_128_is_one_error_line_before_the_model_is_built(tmp_path):
    data_dir = make_image_folder(tmp_path / 'data', classes=2, train_per_class=24, val_per_class=2, size=(8, 8))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'train.py'), data_dir, '--output', tmp_path / 'out'],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and result.stderr.splitlines() == [
        'error: the training set has 48 images, fewer than one global batch of 128 (-b 128 x 1 process x '
        '--grad-accum-steps 1); give -b 48 or less'
    ], result.stderr[-2000:]
    assert not (tmp_path / 'out').exists() and 'Training' not in result.stdout


def test_a_training_set_smaller_than_the_batch_of_all_processes_is_said_once(monkeypatch, capsys):
    import flags
    import train

    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setattr(distributed, 'get_world_size', lambda: 4)
    monkeypatch.setattr(distributed, 'get_rank', lambda: 1)
    args = flags.resolve_args(flags.get_args_parser().parse_args(['-b', '8', '--dataset', 'synthetic']))
    assert train.count_steps(list(range(32)), args) == 1
    for rank in (1, 0):  # only rank 0 says it: every rank finds the same
        monkeypatch.setenv('RANK', str(rank))
        with pytest.raises(SystemExit) as stopped:
            train.count_steps(list(range(27)), args)
        assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        'error (rank 0): the training set has 27 images, fewer than one global batch of 32 (-b 8 x 4 processes x '
        '--grad-accum-steps 1); give -b 7 or less'
    ]


def test_more_processes_on_a_node_than_gpus_is_a_usage_error(monkeypatch):
    """devices.select_device's per-node check (no GPU here: the device count is faked)."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    with pytest.raises(errors.UsageError, match='process 2 has no GPU: 2 visible'):
        devices.select_device('cuda', local_rank=2)


def broken_package(tmp_path, name, error):
    """A folder for PYTHONPATH whose package `name` raises `error` when imported."""
    (tmp_path / name).mkdir()
    (tmp_path / name / '__init__.py').write_text(f'raise {error}\n')
    return dict(ENV, PYTHONPATH=str(tmp_path))


@pytest.mark.parametrize(
    'package, error, message',
    [
        (
            'torchvision',
            "RuntimeError('operator torchvision::nms does not exist')",  # built for another torch
            'error: torchvision ',
        ),
        ('sklearn', "ImportError('No module named sklearn')", 'error: the digits demo needs scikit-learn: pip install'),
    ],
)
def test_a_missing_or_mismatched_package_is_one_error_line_naming_the_fix(package, error, message, tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'train.py'), '--output', tmp_path / 'out'],
        cwd=ROOT,
        env=broken_package(tmp_path, package, error),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]
    assert 'pip install' in lines[0] and not (tmp_path / 'out').exists()


def test_bench_compare_timm_without_timm_says_how_to_install_it(monkeypatch, capsys):
    import bench

    monkeypatch.setitem(sys.modules, 'timm', None)
    with pytest.raises(SystemExit, match='--compare-timm needs timm: pip install timm'):
        bench.main(['--compare-timm', '--no-pipeline', '--device', 'cpu'])
