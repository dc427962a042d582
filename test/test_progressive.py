"""Progressive learning (REFERENCE §4) and training curves, as a specification.

The stage schedule is checked as a function of the epoch; small runs on a generated image folder
check the log, resuming across a stage boundary, two processes, curves.png and running without
matplotlib.
"""

import os
import re
import socket
import struct
import subprocess
import sys

import pytest
import torch

import curves
import errors
import flags  # tests reuse train.py's parser (torchvision references' habit)
import progressive
from conftest import ROOT, make_image_folder, run_train, summary_rows


def resolved(*argv):
    return flags.resolve_args(flags.get_args_parser().parse_args(list(argv)))


def schedule(args):
    return [progressive.stage_settings(args, epoch) for epoch in range(args.epochs)]


def stage_rows(args):
    """One row per stage: (first epoch, last epoch, size, magnitude, mixup, dropout)."""
    rows = {}
    for s in schedule(args):
        rows.setdefault(s['stage'], (*s['epochs'], s['size'], s['magnitude'], s['mixup'], s['drop']))
    return [rows[stage] for stage in sorted(rows)]


# ----------------------------------------------------------------------------------------------
# The schedule


def test_v2_s_like_schedule_is_the_papers_four_stages():
    # The paper's S at 300 px: sizes 128 + 172 (i + 1) / 4, magnitude 5 -> 10; an M-like mixup
    # 0 -> 0.2 and dropout 0.1 -> 0.3 over 350 epochs.
    args = resolved(
        *'--dataset synthetic --model efficientnetv2_s --progressive --img-size 300 --aa rand-m10-mstd0.5'.split(),
        *'--mixup 0.2 --drop 0.3 --epochs 350'.split(),
    )
    rows = stage_rows(args)
    assert [row[:3] for row in rows] == [(0, 87, 171), (88, 174, 214), (175, 262, 257), (263, 349, 300)]
    assert [row[3] for row in rows] == pytest.approx([5, 5 + 5 / 3, 5 + 10 / 3, 10])
    assert [row[4] for row in rows] == pytest.approx([0, 0.2 / 3, 0.4 / 3, 0.2])
    assert [row[5] for row in rows] == pytest.approx([0.1, 0.1 + 0.2 / 3, 0.1 + 0.4 / 3, 0.3])
    sizes = [s['size'] for s in schedule(args)]
    assert sizes == sorted(sizes) and sizes.count(171) == 88  # rising, stage by stage


def test_digits_demo_schedule_rises_from_24_to_32_pixels():
    args = resolved('--progressive')  # the demo's defaults: 30 epochs (15 without --progressive), 32 px
    assert stage_rows(args) == [
        (0, 7, 26, None, 0.0, 0.0),
        (8, 14, 28, None, 0.0, 0.0),
        (15, 22, 30, None, 0.0, 0.0),
        (23, 29, 32, None, 0.0, 0.0),
    ]
    assert args.eval_size == 32  # the demo chose its size: evaluate there, not at the model's test size
    assert resolved().epochs == 15 and resolved('--progressive', '--epochs', '8').epochs == 8


def test_minimums_above_the_final_values_are_capped_so_regularization_never_falls():
    args = resolved(
        *'--dataset synthetic --progressive --img-size 64 --prog-min-size 32 --aa rand-m3 --drop 0.05'.split(),
        *'--epochs 8 --prog-stages 2'.split(),
    )
    assert stage_rows(args) == [(0, 3, 48, 3.0, 0.0, 0.05), (4, 7, 64, 3.0, 0.0, 0.05)]


def test_without_progressive_every_epoch_trains_with_the_flags():
    import train

    args = resolved(*'--dataset synthetic --img-size 64 --aa rand-m9 --mixup 0.2 --drop 0.3 --epochs 3'.split())
    settings = [train.epoch_settings(args, epoch, 0) for epoch in range(args.epochs)]
    assert {(s['size'], s['magnitude'], s['mixup'], s['drop']) for s in settings} == {(64, 9, 0.2, 0.3)}


def test_progressive_evaluates_at_the_models_test_size_unless_a_size_is_given():
    assert resolved('--dataset', 'synthetic', '--progressive').eval_size == 288  # rw_t: 224 / 288
    assert resolved('--dataset', 'synthetic', '--progressive', '--img-size', '256').eval_size == 256
    assert resolved('--dataset', 'synthetic').eval_size == 224  # timm: --img-size sets both


def test_a_minimum_size_above_the_image_size_is_a_usage_error():
    with pytest.raises(errors.UsageError, match='--prog-min-size 128'):
        resolved('--dataset', 'synthetic', '--progressive', '--img-size', '64')


# ----------------------------------------------------------------------------------------------
# Runs: one uninterrupted, one resumed at a stage boundary (and without matplotlib)

RUN = (
    *'--model tf_efficientnetv2_b0 --progressive --img-size 64 --prog-min-size 32 --aa rand-m9-mstd0.5'.split(),
    *'--mixup 0.2 --drop 0.2 --model-ema --model-ema-decay 0.9 -b 4 --epochs 4 -j 0 --opt adamw --lr 1e-3'.split(),
    *'--warmup-epochs 1'.split(),
)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('progressive')
    data_dir = make_image_folder(root / 'data', classes=2, train_per_class=8, val_per_class=3)
    whole = run_train(data_dir, *RUN, '--checkpoint-hist', '4', '--output', root / 'whole')
    # A fake matplotlib that fails to import stands for a machine without it.
    fake = root / 'no_matplotlib' / 'matplotlib'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text("raise ImportError('no matplotlib here')\n")
    resumed = run_train(
        data_dir,
        *RUN,
        '--resume',
        root / 'whole' / 'checkpoint-1.pth.tar',
        '--output',
        root / 'resumed',
        env=dict(PYTHONPATH=str(fake.parent)),
    )
    return dict(root=root, whole=whole.stdout, resumed=resumed.stdout)


def stage_lines(log):
    return re.findall(
        r'^Stage (\d)/4: epochs (\d+)-(\d+), image size (\d+) \(eval 64\), RandAugment '
        r'magnitude (\S+), mixup (\S+), dropout (\S+)$',
        log,
        re.M,
    )


def test_progressive_run_logs_one_line_per_stage_with_rising_sizes(runs):
    assert stage_lines(runs['whole']) == [
        ('1', '0', '0', '40', '5.00', '0.000', '0.100'),
        ('2', '1', '1', '48', '6.33', '0.067', '0.133'),
        ('3', '2', '2', '56', '7.67', '0.133', '0.167'),
        ('4', '3', '3', '64', '9.00', '0.200', '0.200'),
    ]


def test_progressive_run_resumed_at_a_stage_boundary_equals_the_uninterrupted_run(runs):
    assert stage_lines(runs['resumed'])[0][:4] == ('3', '2', '2', '56')  # the stage follows the epoch
    whole = torch.load(runs['root'] / 'whole' / 'last.pth.tar', weights_only=True)
    resumed = torch.load(runs['root'] / 'resumed' / 'last.pth.tar', weights_only=True)
    for part in ('model', 'model_ema'):
        for key, value in whole[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)
    assert summary_rows(runs['root'] / 'whole')[-1] == summary_rows(runs['root'] / 'resumed')[-1]


def test_curves_png_is_drawn_each_epoch_with_one_point_per_epoch(runs):
    path = runs['root'] / 'whole' / 'curves.png'
    header = path.read_bytes()[:24]
    assert header[:8] == b'\x89PNG\r\n\x1a\n'
    width, height = struct.unpack('>II', header[16:24])
    assert width > 600 and height > 400
    figure = curves.plot_curves([runs['root'] / 'whole'], runs['root'] / 'again.png')
    lines = {line.get_label(): list(line.get_xdata()) for ax in figure.axes for line in ax.lines}
    assert set(lines) == {'train_loss', 'eval_loss', 'eval_top1', 'ema_top1', 'lr', 'images_per_sec'}
    assert all(xs == [0, 1, 2, 3] for xs in lines.values())


def test_plot_command_overlays_several_runs(runs):
    out = runs['root'] / 'both.png'
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'curves.py'),
            runs['root'] / 'whole',
            runs['root'] / 'resumed',
            '--out',
            out,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    figure = curves.plot_curves([runs['root'] / 'whole', runs['root'] / 'resumed'], out)
    points = {line.get_label(): len(line.get_xdata()) for line in figure.axes[0].lines}
    assert points == {'whole: train_loss': 4, 'whole: eval_loss': 4, 'resumed: train_loss': 2, 'resumed: eval_loss': 2}


def test_without_matplotlib_training_goes_on_and_says_so_once(runs):
    assert runs['resumed'].count('no curves.png is drawn') == 1
    assert not (runs['root'] / 'resumed' / 'curves.png').exists()
    assert (runs['root'] / 'resumed' / 'last.pth.tar').exists()


# ----------------------------------------------------------------------------------------------
# Several processes: the stage follows the epoch on every rank


def test_two_processes_of_batch_b_follow_the_stages_like_one_process_of_batch_2b(runs, tmp_path):
    # test/test_distributed.py explains the exact recipe: BN frozen, no per-rank random draws but
    # RandAugment's, which is seeded per image.
    exact = (
        *'--model tf_efficientnetv2_b0 --progressive --prog-stages 2 --img-size 64 --prog-min-size 32'.split(),
        *'--aa rand-m9-mstd0.5 --epochs 2 -j 0 --log-interval 1 --freeze-bn --warmup-epochs 0 --opt sgd'.split(),
        *'--lr 0.01 --clip-grad 1 --seed 3'.split(),
    )
    data_dir = runs['root'] / 'data'
    one = run_train(data_dir, *exact, '-b', '4', '--output', tmp_path / 'one', env={'OMP_NUM_THREADS': '1'})
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    two = subprocess.run(
        [
            sys.executable,
            '-m',
            'torch.distributed.run',
            '--nproc_per_node=2',
            f'--master_port={port}',
            'train.py',
            data_dir,
            *exact,
            '-b',
            '2',
            '--output',
            tmp_path / 'two',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1'),
    )
    assert two.returncode == 0, two.stderr[-3000:]
    stages = re.compile(r'^Stage .*$', re.M)
    assert stages.findall(two.stdout) == stages.findall(one.stdout)  # rank 0 alone logs them
    assert [line.split(', ')[:2] for line in stages.findall(one.stdout)] == [
        ['Stage 1/2: epochs 0-0', 'image size 48 (eval 64)'],
        ['Stage 2/2: epochs 1-1', 'image size 64 (eval 64)'],
    ]
    loss = re.compile(r'^Train: .*?Loss: (\S+)', re.M)
    assert [float(x) for x in loss.findall(two.stdout)] == pytest.approx(
        [float(x) for x in loss.findall(one.stdout)], rel=2e-3
    )
