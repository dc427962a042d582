"""predict.py as a specification: classifying images with a trained checkpoint, exporting to ONNX.

Checkpoints: one written by a short train.py run, one of a model overfit here to a generated
folder of two colours. The commands are run as the README shows them.
"""

import os
import subprocess
import sys

import pytest
import torch

import data
import model as models
import predict
import transforms
from conftest import ROOT, make_image_folder, run_train

# torchvision 0.29 deprecates its decoders and warns on every call; data.py silences that, pytest re-enables it.
pytestmark = pytest.mark.filterwarnings('ignore:The image decoding and encoding capabilities:DeprecationWarning')


def run_predict(*args):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'predict.py'), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


ARCH = 'tf_efficientnetv2_b0'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A checkpoint as train.py writes it: one short epoch of tf_efficientnetv2_b0 at 32 px."""
    root = tmp_path_factory.mktemp('predict')
    data_dir = make_image_folder(root / 'data', classes=2, train_per_class=8, val_per_class=3)
    run_train(
        data_dir, '--model', ARCH, '--img-size', '32', '-b', '8', '--epochs', '1', '-j', '0', '--output', root / 'run'
    )
    return dict(root=root, data=data_dir, checkpoint=root / 'run' / 'last.pth.tar')


@pytest.fixture(scope='module')
def overfit(tmp_path_factory):
    """tf_efficientnetv2_b0 overfit to two colour classes (red, blue) at 32 px, saved as train.py
    saves its checkpoints. A dozen full-batch steps fit the training images; BN statistics are
    then computed exactly over them: after so few steps the running averages are still far from
    the batch statistics (flat-colour images have a tiny spread), which only a long run fixes."""
    root = tmp_path_factory.mktemp('overfit')
    data_dir = make_image_folder(root / 'data', classes=2, train_per_class=16, val_per_class=3)
    size, config = 32, models.VARIANTS[ARCH]['config']
    train_set, _, classes = data.load_datasets('folder', data_dir)
    train_set = data.Transformed(
        train_set, transforms.eval_transform(size, crop_pct=config['crop_pct'], interpolation=config['interpolation'])
    )
    images, labels, _ = zip(*(train_set[i] for i in range(len(train_set))))
    images, labels = transforms.normalize(torch.stack(images), config['mean'], config['std']), torch.tensor(labels)
    torch.manual_seed(0)
    net = models.create_model(ARCH, num_classes=len(classes)).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one pass gives the exact statistics
    with torch.no_grad():
        net(images)
    checkpoint = root / 'overfit.pth.tar'
    torch.save(
        dict(
            model=net.state_dict(),
            model_ema=None,
            arch=ARCH,
            num_classes=len(classes),
            classes=classes,
            args=dict(img_size=size, eval_size=size),
        ),
        checkpoint,
    )
    return dict(data=data_dir, checkpoint=checkpoint)


def parse(stdout):
    """{path: [(class, percent)]} from classify's lines: PATH  class 91.20%  class 6.31% ..."""
    results = {}
    for line in stdout.splitlines():
        path, *pairs = line.split('  ')
        results[path] = [(name, float(percent.rstrip('%'))) for name, percent in (p.split(' ') for p in pairs)]
    return results


def test_classify_a_folder_names_each_images_class_for_an_overfit_model(overfit):
    results = parse(
        run_predict('classify', overfit['checkpoint'], os.path.join(overfit['data'], 'val'), '--device', 'cpu')
    )
    assert len(results) == 6
    for path, top in results.items():
        assert top[0][0] == os.path.basename(os.path.dirname(path))  # the class folder's name
        assert len(top) == 2  # top-5 of a 2-class model: both, best first
        assert top[0][1] >= top[1][1] and sum(p for _, p in top) == pytest.approx(100, abs=0.02)


def test_classify_files_with_topk_one(overfit):
    image = os.path.join(overfit['data'], 'val', 'class_1', '0.jpg')
    results = parse(run_predict('classify', overfit['checkpoint'], image, '--topk', '1'))
    assert list(results) == [image] and results[image][0][0] == 'class_1' and len(results[image]) == 1


def test_classify_uses_the_runs_eval_transform_and_classes(trained):
    net, info = predict.load_model(trained['checkpoint'])
    assert info['size'] == 32 and info['classes'] == ['class_0', 'class_1'] and not info['ema']
    config = models.VARIANTS['tf_efficientnetv2_b0']['config']  # crop_pct 0.875: resize 36, crop 32
    assert (info['crop_pct'], info['interpolation']) == (config['crop_pct'], config['interpolation'])
    assert not net.training


def test_export_round_trip_matches_pytorch(trained, tmp_path):
    onnx = pytest.importorskip('onnx')
    onnxruntime = pytest.importorskip('onnxruntime')
    out = tmp_path / 'model.onnx'
    stdout = run_predict('export', trained['checkpoint'], out, '--size', '48')
    difference = float(stdout.split('max difference ')[1].split()[0])
    assert difference < 1e-4, stdout
    metadata = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert metadata['classes'].split('\n') == ['class_0', 'class_1'] and metadata['size'] == '48'
    # Batch size is free: the exported network classifies a batch of 5 as PyTorch does.
    net, _ = predict.load_model(trained['checkpoint'])
    images = torch.randn(5, 3, 48, 48)
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    logits = session.run(None, {'images': images.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(logits), net(images), atol=1e-4)


def test_export_and_classify_take_the_ema_weights_when_present(tmp_path):
    torch.manual_seed(0)
    live, ema = (models.create_model('tf_efficientnetv2_b0', num_classes=3) for _ in range(2))
    checkpoint = tmp_path / 'ema.pth.tar'
    torch.save(
        dict(
            model=live.state_dict(),
            model_ema=ema.state_dict(),
            arch='tf_efficientnetv2_b0',
            num_classes=3,
            classes=['a', 'b', 'c'],
            args=dict(img_size=32, eval_size=40),
        ),
        checkpoint,
    )
    net, info = predict.load_model(checkpoint)
    assert info['ema'] and info['size'] == 40
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(net(images), ema.eval()(images))


def test_bare_weights_need_a_model_name(tmp_path):
    weights = tmp_path / 'bare.pth'
    torch.save(models.create_model('tf_efficientnetv2_b0', num_classes=4).state_dict(), weights)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'predict.py'), 'classify', weights, ROOT], capture_output=True, text=True
    )
    assert result.returncode == 2 and 'give --model NAME' in result.stderr
    net, info = predict.load_model(weights, 'tf_efficientnetv2_b0')
    assert info['classes'] == ['0', '1', '2', '3'] and info['size'] == 224  # the model's test size


def test_export_without_the_onnx_packages_is_one_error_line_naming_the_pip_line(trained, tmp_path):
    (tmp_path / 'onnx').mkdir()  # a package that fails to import, first on the path
    (tmp_path / 'onnx' / '__init__.py').write_text("raise ImportError('No module named onnx')\n")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'predict.py'), 'export', trained['checkpoint'], tmp_path / 'model.onnx'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
    )
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.strip().splitlines() == [
        'error: export needs onnx, onnxscript and onnxruntime: pip install onnx onnxscript onnxruntime'
    ]
