"""Bad data and a diverging loss, through train.py's CLI: unreadable images are skipped, named and
counted (or, with --strict-data, an error naming the file); a loss that stays non-finite stops the
run with one line and keeps the last good checkpoint, while steps fp16's GradScaler skips do not
count. About a minute and a half on 2 busy CPU cores.
"""

import csv
import os
import re

import torch

from conftest import make_image_folder, run_train

TINY = ['--model', 'tf_efficientnetv2_b0', '--img-size', '32', '-b', '4']


def spoil(data_dir):
    """Replace some images with broken files; -> {path: what is wrong}."""

    def path(split, label, name):
        return os.path.join(data_dir, split, f'class_{label}', name)

    whole = open(path('train', 0, '0.jpg'), 'rb').read()
    broken = {
        path('train', 0, '3.jpg'): os.urandom(2000),  # not an image
        path('train', 0, '5.jpg'): whole[: len(whole) // 2],  # truncated JPEG
        path('train', 1, '2.jpg'): b'',  # empty
        path('train', 1, '6.jpg'): b'class,label\nthis is text\n',  # text with .jpg
        path('val', 1, '0.jpg'): whole[: len(whole) // 3],
    }  # truncated, in val
    for file, content in broken.items():
        with open(file, 'wb') as f:
            f.write(content)
    return broken


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    assert 'Traceback' not in result.stdout + result.stderr
    errors = [line for line in lines if line.startswith('error: ')]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-2000:]
    return errors[0]


def test_corrupt_and_truncated_images_are_skipped_named_and_counted(tmp_path):
    data_dir = make_image_folder(tmp_path / 'data', classes=2, train_per_class=8, val_per_class=3)
    broken = spoil(data_dir)
    result = run_train(data_dir, *TINY, '-j', '2', '--epochs', '1', '--log-interval', '1', '--output', tmp_path / 'out')
    warnings = [line for line in result.stderr.splitlines() if line.startswith('warning: skipping')]
    for file in broken:  # each named once, although two loader workers read the folder
        assert sum(file in line for line in warnings) == 1, (file, result.stderr[-2000:])
    with open(tmp_path / 'out' / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert rows[0]['bad_images'] == '4'  # the 4 training files, each replaced once in the epoch
    assert re.search(r'^Epoch 0: .*skipped_images 4$', result.stdout, re.M)
    assert result.stdout.count('Train:') == 4  # 16 images / batch 4: every batch full


def test_strict_data_makes_an_unreadable_image_an_error_naming_it(tmp_path):
    data_dir = make_image_folder(tmp_path / 'data', classes=2, train_per_class=8, val_per_class=3)
    broken = spoil(data_dir)
    result = run_train(
        data_dir, *TINY, '-j', '2', '--epochs', '1', '--strict-data', '--output', tmp_path / 'out', check=False
    )
    line = one_error_line(result)  # raised in a loader worker, said in one line by the main process
    assert 'unreadable image' in line and any(file in line for file in broken), line


def test_a_loss_that_stays_non_finite_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr 1e8: the first step is finite, every later one NaN; the fifth NaN comes in epoch 1
    (4 steps an epoch), so the count also runs across the epoch's end."""
    data_dir = make_image_folder(tmp_path / 'data', classes=2, train_per_class=8, val_per_class=3)
    output = tmp_path / 'out'
    result = run_train(
        data_dir,
        *TINY,
        *'-j 0 --epochs 3 --lr 1e8 --opt sgd --warmup-epochs 0 --log-interval 1 --checkpoint-interval 1'.split(),
        *'--output'.split(),
        output,
        check=False,
    )
    line = one_error_line(result)
    assert 'the loss was not finite for 5 consecutive steps (epoch 1' in line, line
    last = torch.load(output / 'last.pth.tar', weights_only=True)
    assert (last['epoch'], last['step']) == (0, 1)  # after the one finite step
    assert all(torch.isfinite(t).all() for t in last['model'].values() if t.is_floating_point())
    assert not (output / 'model_best.pth.tar').exists()  # epoch 0 ended non-finite: not kept


def test_steps_skipped_by_the_fp16_grad_scaler_do_not_count_as_non_finite(tmp_path):
    """tools/faults.py makes steps 2-6 infinite: five in a row,
    the limit, but fp16's GradScaler skips each of them, so training goes on (fp16 on the CPU is
    slow: 6 steps of batch 2, no validation)."""
    data_dir = make_image_folder(tmp_path / 'data', classes=2, train_per_class=8, val_per_class=3)
    result = run_train(
        data_dir,
        *TINY,
        *'-b 2 -j 0 --amp --amp-dtype float16 --perf-steps 6 --log-interval 1 --output'.split(),
        tmp_path / 'out',
        faults=['--inf-loss-steps', '2,3,4,5,6'],
    )
    losses = re.findall(r'^Train: .*?Loss: (\S+)', result.stdout, re.M)
    assert losses[1:] == ['inf'] * 5 and losses[0] != 'inf', losses
