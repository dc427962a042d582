"""bench.py end to end on a tiny configuration: it prints its table, writes its JSON and ends with the
summary line scripts parse. Timings are never checked here: they belong to benchmarks, not to tests."""

import json
import re
import sys

import pytest
import torch

import model as models
import optim
import precision as mixed_precision

SUMMARY = re.compile(r'summary: step ours/timm (\d+\.\d\d), pipeline ours/timm (\d+\.\d\d)')
TINY = (
    '--device cpu --img-size 32 -b 2 --steps 1 --warmup 1 --threads 1'.split()
)  # one thread: on a busy 2-core machine parallel regions wait for descheduled peers


def run_bench(argv):
    """bench.main(argv) in this process (saves importing torch and timm again)."""
    import bench

    threads = torch.get_num_threads()
    try:
        bench.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_tiny_bench_against_timm_ends_with_summary_line_and_writes_json(tmp_path, capsys):
    pytest.importorskip('timm')
    out = tmp_path / 'bench.json'
    run_bench(
        TINY
        + [
            *'--windows 2 --workers 0 --pipeline-size 32 --pipeline-batch 2 --pipeline-batches 1 --jpeg-dir'.split(),
            str(tmp_path / 'jpegs'),
            '--compare-timm',
            '--json',
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    last = stdout.strip().splitlines()[-1]
    match = SUMMARY.fullmatch(last)
    assert match, f'last line is not the summary: {last!r}'
    assert all(float(ratio) > 0 for ratio in match.groups())
    assert 'train step img/s' in stdout and 'pipeline img/s' in stdout

    results = json.loads(out.read_text())
    names = [row['name'].strip() for row in results['rows']]
    assert names[0].startswith('train step img/s') and 'peak memory MiB' in names  # measured in children
    for row in results['rows']:
        assert row['ours'] > 0 and row['timm'] > 0, row
        assert row['ratio'] == pytest.approx(row['ours'] / row['timm'])
    assert results['summary']['step'] == pytest.approx(float(match.group(1)), abs=0.006)
    assert results['environment']['torch'] and results['environment']['timm']
    assert len(list((tmp_path / 'jpegs' / 'train').glob('*/*.jpg'))) == 64  # cut from the sample photos


def test_without_compare_timm_the_summary_says_na_and_timm_is_never_imported(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'timm', None)  # from here on, importing timm raises
    out = tmp_path / 'bench.json'
    run_bench(TINY + ['--windows', '1', '--no-pipeline', '--no-memory', '--json', str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == 'summary: step ours/timm n/a, pipeline ours/timm n/a'
    step = json.loads(out.read_text())['rows'][0]
    assert step['ours'] > 0 and step['timm'] is None and step['ratio'] is None


# ----------------------------------------------------------------------------------------------
# train.py's speed switches, checked on the run it sets up (no training step: compiling is slow)


def build(*extra):
    """train.py's set-up on the CPU (build_model, distribute) -> (args, model_without_ddp, model, model_ema)."""
    import flags
    import train

    args = flags.resolve_args(
        flags.get_args_parser().parse_args(
            [
                *'--model tf_efficientnetv2_b0 --img-size 32 --device cpu --model-ema --num-classes 10'.split(),
                *extra,
            ]
        )
    )
    model_without_ddp = train.build_model(args, torch.device('cpu'), num_classes=10)
    precision = mixed_precision.Precision('cpu')
    model_ema = optim.ModelEma(model_without_ddp, 0.99)
    model = train.distribute(model_without_ddp, torch.device('cpu'), precision, args)
    return args, model_without_ddp, model, model_ema


def test_compile_wraps_only_the_training_forward_and_checkpoints_keep_plain_keys():
    _, model_without_ddp, model, model_ema = build('--compile')
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)  # what train_step calls
    assert model._orig_mod is model_without_ddp  # checkpoints, evaluation and the EMA use this one
    plain = models.create_model('tf_efficientnetv2_b0', num_classes=10)
    for saved in (model_without_ddp.state_dict(), model_ema.module.state_dict()):
        assert saved.keys() == plain.state_dict().keys()  # no '_orig_mod.' prefixes


def test_channels_last_is_the_cpu_default_and_can_be_switched_off():
    args, model_without_ddp, _, _ = build()
    assert args.channels_last is True
    assert model_without_ddp.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    args, model_without_ddp, _, _ = build('--no-channels-last')
    assert args.channels_last is False
    assert not model_without_ddp.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
