"""train.py end to end through its CLI: the ModelZoo recipe's command, its log contract, evaluate, pretrained."""

import csv
import os
import re
import subprocess

import pytest
import torch

from conftest import run_train

# The Ascend ModelZoo recipe's command (README), verbatim, with CPU-sized overrides appended (argparse: last wins).
MODELZOO_COMMAND = (
    '--model efficientnetv2_rw_t -b 256 --sched step --epochs 350 --decay-epochs 2.4 '
    '--decay-rate .97 --opt rmsproptf --opt-eps .001 -j 8 --warmup-lr 4e-6 '
    '--weight-decay 1e-5 --drop 0.3 --drop-connect 0.2 --aa rand-m9-mstd0.5 --lr .014 '
    '--log-interval 1 --img-size 288 --apex-amp --model-ema --model-ema-decay 0.9999 '
    '--mixup 0.2'
).split()
CPU_OVERRIDES = '-b 4 --img-size 32 -j 0 --epochs 2 --log-tensorboard'.split()  # and the live view

# The ModelZoo's own parsers (test/train_*.sh), run by bash on the log.
MODELZOO_FPS = "grep -a 'Train:' {log} | awk 'END {{print}}' | awk -F \"/s\" '{{print $2}}' | awk '{{print $2}}'"
MODELZOO_LOSS = 'grep Train: {log} | awk -F "Loss: " \'{{print $NF}}\' | awk -F " " \'{{print $1}}\''
MODELZOO_ACC = "grep -a '*** Best metric: ' {log} | awk 'END {{print}}' | awk '{{print $4}}'"


def shell(command):
    return subprocess.run(['bash', '-c', command], capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope='module')
def modelzoo_run(tmp_path_factory):
    """One 2-epoch run of the ModelZoo recipe's command on a tiny JPEG folder, shared by the tests below."""
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp('modelzoo')
    data_dir = make_image_folder(root / 'data', classes=2, train_per_class=8, val_per_class=3)
    output = root / 'out'
    result = run_train(data_dir, *MODELZOO_COMMAND, *CPU_OVERRIDES, '--output', output)
    log = root / 'train.log'
    log.write_text(result.stdout)
    return dict(data=data_dir, output=output, log=log, stdout=result.stdout, stderr=result.stderr)


def test_modelzoo_command_log_parses_with_the_seed_scripts_commands(modelzoo_run):
    fps = shell(MODELZOO_FPS.format(log=modelzoo_run['log']))
    losses = shell(MODELZOO_LOSS.format(log=modelzoo_run['log'])).split()
    accuracy = shell(MODELZOO_ACC.format(log=modelzoo_run['log']))
    assert float(fps) > 0
    assert len(losses) == 2 * 4  # 16 images / batch 4, every step logged (--log-interval 1)
    assert all(float(loss) > 0 for loss in losses)
    assert 0.0 <= float(accuracy) <= 100.0
    assert '\r' not in modelzoo_run['stdout'] and '\x1b' not in modelzoo_run['stdout']


def test_modelzoo_command_train_lines_follow_timms_format(modelzoo_run):
    train_line = re.compile(
        r'^Train: \d+ \[ *\d+/\d+ \( *\d+%\)\]  Loss: \S+ \(\S+\)  Time: \d+\.\d{3}s, +\d+\.\d\d/s  '
        r'\(\d+\.\d{3}s, +\d+\.\d\d/s\)  LR: \d\.\d{3}e[-+]\d\d  Data: \d+\.\d{3} \(\d+\.\d{3}\)$'
    )
    lines = [line for line in modelzoo_run['stdout'].splitlines() if line.startswith('Train:')]
    assert lines and all(train_line.match(line) for line in lines), lines[:2]
    assert 'apex is not available' in modelzoo_run['stdout']  # --apex-amp falls back with a notice
    assert re.search(r'^\*\*\* Best metric: \d+\.\d+ \(epoch \d+\)$', modelzoo_run['stdout'], re.M)


def test_modelzoo_command_writes_summary_args_and_checkpoints(modelzoo_run):
    output = modelzoo_run['output']
    with open(output / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [row['epoch'] for row in rows] == ['0', '1']
    for column in ('train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'ema_top1', 'lr', 'images_per_sec'):
        assert all(float(row[column]) >= 0 for row in rows), column
    assert (output / 'args.yaml').read_text().count('\n') > 40
    checkpoint = torch.load(output / 'last.pth.tar', weights_only=True)
    assert {'model', 'model_ema', 'optimizer', 'scaler', 'epoch', 'args'} <= set(checkpoint)
    assert checkpoint['epoch'] == 2 and checkpoint['args']['lr'] == 0.014
    assert (output / 'model_best.pth.tar').exists()


def test_step_schedule_lr_per_epoch_is_the_modelzoo_recipes(modelzoo_run):
    with open(modelzoo_run['output'] / 'summary.csv') as f:
        lrs = [float(row['lr']) for row in csv.DictReader(f)]
    warmup = 4e-6 + (0.014 - 4e-6) / 3
    assert lrs == pytest.approx([4e-6, warmup], rel=1e-5)


def test_evaluate_reproduces_the_logged_best_metric(modelzoo_run):
    best = float(shell(MODELZOO_ACC.format(log=modelzoo_run['log'])))
    result = run_train(
        modelzoo_run['data'],
        '--evaluate',
        '--resume',
        modelzoo_run['output'] / 'model_best.pth.tar',
        *'--img-size 32 -j 0 -b 4'.split(),
    )
    ema_top1 = re.search(r'Evaluation \(EMA\): .*top1 (\d+\.\d+)', result.stdout).group(1)
    assert float(ema_top1) == pytest.approx(best, abs=1e-3)


def test_pretrained_timm_weights_load_with_a_new_classifier(tmp_path, image_folder):
    timm = pytest.importorskip('timm')
    weights = tmp_path / 'rw_t.pth'
    torch.save(timm.create_model('efficientnetv2_rw_t').state_dict(), weights)
    result = run_train(
        image_folder,
        '--pretrained',
        weights,
        *'--perf-steps 1 -b 4 --img-size 32 -j 0 --output'.split(),
        tmp_path / 'out',
    )
    assert 'classifier left as initialised (checkpoint has 1000 classes, model 2)' in result.stdout


def test_synthetic_dataset_runs_without_any_data(tmp_path):
    result = run_train(
        *'--dataset synthetic --perf-steps 2 -b 2 --img-size 32 -j 0 --output'.split(),
        tmp_path / 'out',
    )
    assert result.stdout.count('Train:') == 2


def test_tensorboard_holds_train_scalars_at_log_steps_and_evaluations_at_epoch_ends(modelzoo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(modelzoo_run['output']))
    events.Reload()
    scalars = {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()['scalars']}
    train_lines = re.findall(r'^Train: .*Loss: (\S+) .*LR: (\S+)', modelzoo_run['stdout'], re.M)
    assert [step for step, _ in scalars['train/loss']] == list(range(1, 9))  # --log-interval 1, 2 x 4 steps
    assert [f'{value:#.4g}' for _, value in scalars['train/loss']] == [loss for loss, _ in train_lines]
    assert [f'{value:.3e}' for _, value in scalars['train/lr']] == [lr for _, lr in train_lines]
    assert len(scalars['train/images_per_sec']) == 8 and all(value > 0 for _, value in scalars['train/images_per_sec'])
    with open(modelzoo_run['output'] / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    for prefix, column in (('eval', 'eval'), ('eval_ema', 'ema')):
        assert [step for step, _ in scalars[f'{prefix}/top1']] == [4, 8]  # at each epoch's end
        assert [f'{value:.4f}' for _, value in scalars[f'{prefix}/top1']] == [row[f'{column}_top1'] for row in rows]
        assert len(scalars[f'{prefix}/loss']) == len(scalars[f'{prefix}/top5']) == 2


def test_log_tensorboard_without_the_package_is_a_one_line_error(monkeypatch):
    import importlib.util

    import errors
    import flags

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, 'find_spec', lambda name, *a: None if name == 'tensorboard' else real_find_spec(name, *a)
    )
    with pytest.raises(errors.UsageError, match='pip install tensorboard'):
        flags.resolve_args(flags.get_args_parser().parse_args(['--log-tensorboard']))


def test_the_demos_first_lines_say_the_model_the_data_the_device_and_the_epochs(tmp_path):
    result = run_train('--perf-steps', '1', '--output', tmp_path / 'out')
    first = result.stdout.splitlines()[:3]
    assert first[0] == f'Output: {tmp_path / "out"}'
    assert first[1].startswith('Training tf_efficientnetv2_b0 (5.87M parameters) on digits: 1437 train / 360 val')
    assert first[1].endswith('10 classes; cpu, 1 process')
    assert first[2].startswith('15 epochs of 22 steps, batch 64 (64 per process), lr 0.002, AdamW, cosine schedule')
    assert 'warning' not in result.stderr


def test_a_short_run_on_a_folder_warns_that_the_warm_up_covers_it(tmp_path, image_folder):
    result = run_train(
        image_folder,
        *'--epochs 1 --model tf_efficientnetv2_b0 --img-size 32 -b 4 -j 0 --perf-steps 1 --output'.split(),
        tmp_path / 'out',
    )
    assert result.stderr.count('warning: the warm-up (--warmup-epochs 3) covers the whole run (--epochs 1)') == 1
    assert 'give --warmup-epochs 0' in result.stderr


def test_a_folder_with_train_and_valid_trains_with_no_flag_and_names_its_folders(tmp_path, image_folder):
    os.rename(os.path.join(image_folder, 'val'), os.path.join(image_folder, 'valid'))
    result = run_train(
        image_folder,
        *'--epochs 1 --model tf_efficientnetv2_b0 --img-size 32 -b 4 -j 0 --warmup-epochs 0 --output'.split(),
        tmp_path / 'out',
    )
    assert ': 16 train / 6 val images (folders train/ and valid/), 2 classes; cpu, 1 process' in result.stdout
    assert result.stdout.count('Test: [') >= 1 and 'Epoch 0:' in result.stdout


def test_the_epoch_lines_and_summary_carry_the_epochs_peak_memory(modelzoo_run):
    """The process's peak resident set on the CPU (allocated memory on a GPU), in MiB: more than torch itself."""
    lines = [line for line in modelzoo_run['stdout'].splitlines() if line.startswith('Epoch')]
    assert len(lines) == 2 and all(int(re.search(r'  peak_memory_mib (\d+)  ', line).group(1)) > 100 for line in lines)
    with open(modelzoo_run['output'] / 'summary.csv') as f:
        assert [int(row['peak_memory_mib']) > 100 for row in csv.DictReader(f)] == [True, True]


@pytest.fixture(scope='module')
def b0_run(tmp_path_factory):
    """A run of tf_efficientnetv2_b0, not the folder default (rw_t): 1 epoch of 4 steps at 32 px."""
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp('b0')
    data_dir = make_image_folder(root / 'data', classes=2, train_per_class=8, val_per_class=3)
    output = root / 'out'
    result = run_train(
        data_dir,
        *'--model tf_efficientnetv2_b0 --img-size 32 -b 4 -j 0 --epochs 1 --warmup-epochs 0 --lr 1e-3 --output'.split(),
        output,
    )
    return dict(data=data_dir, output=output, stdout=result.stdout)


def test_evaluate_resume_without_model_evaluates_the_checkpoint_as_the_variant_it_names(b0_run):
    """Its variant and image size come from the checkpoint: the numbers of the run's own validation."""
    result = run_train(b0_run['data'], '--evaluate', '--resume', b0_run['output'] / 'last.pth.tar', '-j', '0')
    evaluated = re.search(r'^Evaluation: loss (\S+)  top1 (\S+)', result.stdout, re.M).groups()
    logged = re.search(r'^Epoch 0: train_loss \S+  eval_loss (\S+)  top1 (\S+)', b0_run['stdout'], re.M).groups()
    assert float(evaluated[0]) == pytest.approx(float(logged[0]), rel=1e-4) and evaluated[1] == logged[1]


def test_a_runs_args_yaml_given_to_c_repeats_the_run(b0_run, tmp_path):
    """-c RUN/args.yaml (the run folder's record of every flag) into another folder: the same summary.csv."""
    from conftest import summary_rows

    result = run_train('-c', b0_run['output'] / 'args.yaml', '--output', tmp_path / 'again')
    assert 'Training tf_efficientnetv2_b0' in result.stdout
    assert summary_rows(tmp_path / 'again') == summary_rows(b0_run['output'])


def test_flags_on_the_command_line_override_the_config_file(tmp_path):
    """-c FILE's flags become the parser's defaults; its output (a run's own) is not taken."""
    import run

    config = tmp_path / 'recipe.yaml'
    config.write_text('model: tf_efficientnetv2_b0\nlr: 0.5\nmodel_ema: true\noutput: somewhere\n')
    args = run.parse_command_line(['-c', str(config), '--lr', '0.25', '--output', str(tmp_path / 'run')])
    assert (args.model, args.lr, args.model_ema, args.output) == (
        'tf_efficientnetv2_b0',
        0.25,
        True,
        str(tmp_path / 'run'),
    )


def test_timms_defaults_on_a_small_folder_warn_and_the_start_lines_count_what_drop_last_leaves_out(
    image_folder, capsys
):
    """240 images: 1 step of 128 an epoch (112 left out; -b 120 uses them all) for 300 epochs, from random weights."""
    import flags
    import train

    args = flags.resolve_args(flags.get_args_parser().parse_args([image_folder]))
    train_set, net = list(range(240)), torch.nn.Linear(2, 2)
    steps = train.count_steps(train_set, args)
    optimizer, scheduler = train.create_optimizer(net, args, steps)
    lines = train.describe_run(args, net, train_set, train_set, dict(num_classes=2), steps, optimizer, scheduler)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: timm's ImageNet defaults on 240 images: 300 epochs of 1 step (batch 128) from random weights"
    )
    assert 'README' in warnings[0]
    assert lines.splitlines()[2] == (
        '112 of 240 training images are left out of each epoch (drop_last): -b 120 uses them all'
    )
