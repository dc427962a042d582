"""Published ImageNet weights by name, as a specification: the table, the download, the cache, the
safetensors reader and predict.py without a checkpoint.

Nothing here reaches the network. The real download code runs against a Hugging Face stand-in on
127.0.0.1 (http.server in a thread; HF_ENDPOINT points at it) and against file:// URLs, serving
weights written here: timm's randomly initialised tf_efficientnetv2_b0 saved with the safetensors
package, and a torchvision-style .pth named with its SHA-256 prefix. TORCH_HOME is a temporary
folder, so the user's cache is never written.

    .venv/bin/python -m pytest test/test_pretrained.py -q
"""
import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
import safetensors.torch
import timm
import torch
import torchvision

from conftest import ROOT, make_image_folder, run_train
from test_model import assert_same, images, timm_reference

import model
import predict

ARCH, HUB_ID = 'tf_efficientnetv2_b0', 'tf_efficientnetv2_b0.in1k'
HUB_PATH = f'/timm/{HUB_ID}/resolve/main/model.safetensors'


# ----------------------------------------------------------------------------------------------
# A Hugging Face stand-in on 127.0.0.1

class Hub(http.server.BaseHTTPRequestHandler):
    """Answers GET with the server's `routes[path]` = (status, headers, body, bytes to send) and
    records each path asked for. Content-Length always announces the whole body."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path not in self.server.routes:
            self.send_error(404)
            return
        status, headers, body, sent = self.server.routes[self.path]
        self.send_response(status)
        for key, value in {**headers, 'Content-Length': str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[:sent])  # HTTP/1.0: the connection closes after this, early if cut

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(autouse=True)
def torch_home(monkeypatch, tmp_path):
    """torch.hub.get_dir() in a temporary folder: the user's cache is never read or written."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))


class HubServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # clients hanging up early are part of the tests
        pass


@pytest.fixture
def hub(monkeypatch):
    server = HubServer(('127.0.0.1', 0), Hub)
    server.routes, server.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv('HF_ENDPOINT', f'http://127.0.0.1:{server.server_port}')
    yield server
    server.shutdown()
    server.server_close()


def publish(hub, body, stated_sha256='the right one', cut=None):
    """Serve `body` as huggingface.co serves an LFS file: the resolve URL answers 302 to a CDN
    address and states the file's SHA-256 in X-Linked-Etag (None: no such header, as a mirror
    might); the CDN's own ETag, 64 hex digits here, is no file hash. `cut`: bytes sent of the body."""
    if stated_sha256 == 'the right one':
        stated_sha256 = hashlib.sha256(body).hexdigest()
    stated = {'X-Linked-Etag': f'"{stated_sha256}"'} if stated_sha256 else {}
    hub.routes[HUB_PATH] = (302, {'Location': '/cdn/blob', **stated}, b'', 0)
    hub.routes['/cdn/blob'] = (200, {'ETag': '"' + '0' * 64 + '"'}, body, len(body) if cut is None else cut)


@pytest.fixture(scope='module')
def timm_b0():
    """timm's tf_efficientnetv2_b0, randomly initialised, with BN statistics that keep it O(1)."""
    return timm_reference(ARCH)


@pytest.fixture(scope='module')
def timm_b0_file(timm_b0):
    return safetensors.torch.save(timm_b0.state_dict())


def cache_dir():
    return os.path.join(torch.hub.get_dir(), 'checkpoints')


def cache_contents():
    return sorted(os.listdir(cache_dir())) if os.path.isdir(cache_dir()) else []


def one_line(error):
    message = str(error.value)
    assert '\n' not in message and message, message
    return message


# ----------------------------------------------------------------------------------------------
# Download and cache

def test_published_timm_weights_download_into_the_hub_cache_and_give_timms_outputs(hub, timm_b0,
                                                                                   timm_b0_file):
    publish(hub, timm_b0_file)
    path = model.published_weights(ARCH, progress=False)
    assert path == os.path.join(os.environ['TORCH_HOME'], 'hub', 'checkpoints', HUB_ID + '.safetensors')
    assert hub.requests == [HUB_PATH, '/cdn/blob'] and cache_contents() == [HUB_ID + '.safetensors']
    net = model.load_pretrained(model.create_model(ARCH), path).eval()
    with torch.no_grad():
        x = images((64, 64))
        assert_same(net(x), timm_b0(x))


def test_the_second_call_is_a_cache_hit_without_a_request(hub, timm_b0_file):
    publish(hub, timm_b0_file)
    first = model.published_weights(ARCH, progress=False)
    requests = list(hub.requests)
    hub.routes.clear()  # were the network asked again, the download would fail
    assert model.published_weights(ARCH) == first and hub.requests == requests


def test_a_sha256_mismatch_is_refused_in_one_line_and_nothing_stays_in_the_cache(hub, timm_b0_file):
    publish(hub, timm_b0_file, stated_sha256='f' * 64)
    with pytest.raises(model.CheckpointError) as error:
        model.published_weights(ARCH, progress=False)
    assert 'SHA-256' in one_line(error) and 'ffffffff' in str(error.value)
    assert cache_contents() == []


def test_without_a_stated_sha256_the_file_is_kept_when_complete_and_a_cdn_etag_is_no_hash(hub, timm_b0_file):
    publish(hub, timm_b0_file, stated_sha256=None)
    path = model.published_weights(ARCH, progress=False)
    assert open(path, 'rb').read() == timm_b0_file


def test_an_interrupted_transfer_leaves_no_partial_file_and_says_so_in_one_line(hub, timm_b0_file):
    publish(hub, timm_b0_file, cut=len(timm_b0_file) // 2)
    with pytest.raises(model.CheckpointError) as error:
        model.published_weights(ARCH, progress=False)
    assert f'ended after {len(timm_b0_file) // 2} of {len(timm_b0_file)} bytes' in one_line(error)
    assert cache_contents() == []


def test_ctrl_c_during_the_transfer_leaves_no_partial_file(hub, timm_b0_file, monkeypatch):
    def interrupted(response, out, *args):
        out.write(response.read(1000))
        raise KeyboardInterrupt
    monkeypatch.setattr(model, '_copy', interrupted)
    publish(hub, timm_b0_file)
    with pytest.raises(KeyboardInterrupt):
        model.published_weights(ARCH, progress=False)
    assert cache_contents() == []


def test_an_unreachable_hub_is_one_line_naming_the_url_the_cache_path_and_a_local_file(monkeypatch):
    port = closed_port()
    monkeypatch.setenv('HF_ENDPOINT', f'http://127.0.0.1:{port}/')  # a trailing slash, as often typed
    with pytest.raises(model.CheckpointError) as error:
        model.published_weights(ARCH, progress=False)
    message = one_line(error)
    assert f'http://127.0.0.1:{port}{HUB_PATH}' in message
    assert os.path.join(cache_dir(), HUB_ID + '.safetensors') in message and '--pretrained PATH' in message
    assert cache_contents() == []


def test_a_missing_file_on_the_hub_names_the_http_status(hub):
    with pytest.raises(model.CheckpointError, match='HTTP 404'):
        model.published_weights(ARCH, progress=False)
    assert cache_contents() == []


def closed_port():
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def torchvision_style(monkeypatch, tmp_path):
    """b0's weights as a .pth named like torchvision's (first 8 hex of its SHA-256), served from a
    file:// folder standing for download.pytorch.org; b0's row points at it."""
    folder = tmp_path / 'download.pytorch.org'
    folder.mkdir()
    weights = model.create_model(ARCH).state_dict()
    torch.save(weights, folder / 'weights.pth')
    sha256 = hashlib.sha256((folder / 'weights.pth').read_bytes()).hexdigest()
    monkeypatch.setattr(model, 'TORCHVISION_MODELS', folder.as_uri())
    return dict(folder=folder, weights=weights, sha256=sha256)


def test_torchvision_style_weights_are_checked_against_the_hash_prefix_in_their_name(torchvision_style,
                                                                                       monkeypatch):
    folder, sha256 = torchvision_style['folder'], torchvision_style['sha256']
    (folder / 'weights.pth').rename(folder / f'b0-{sha256[:8]}.pth')
    monkeypatch.setitem(model.PUBLISHED_WEIGHTS, ARCH, ('torchvision', f'b0-{sha256[:8]}.pth', 0.0, {}))
    path = model.published_weights(ARCH, progress=False)
    assert path == os.path.join(cache_dir(), f'b0-{sha256[:8]}.pth')  # torchvision's own cache name
    net = model.load_pretrained(model.create_model(ARCH), path)
    for key, value in net.state_dict().items():
        assert torch.equal(value, torchvision_style['weights'][key]), key


def test_torchvision_weights_whose_hash_differs_from_their_name_are_refused(torchvision_style):
    """The real row: efficientnet_v2_s-dd5fe13b.pth, here holding other bytes."""
    (torchvision_style['folder'] / 'weights.pth').rename(
        torchvision_style['folder'] / 'efficientnet_v2_s-dd5fe13b.pth')
    with pytest.raises(model.CheckpointError) as error:
        model.published_weights('efficientnetv2_s', progress=False)
    assert 'expected dd5fe13b' in one_line(error)
    assert cache_contents() == []


def test_a_variant_without_published_weights_is_refused_in_one_line():
    for call in (model.published_weights, model.published_config):
        with pytest.raises(model.CheckpointError) as error:
            call('efficientnetv2_xl')
        assert 'efficientnetv2_xl has no published ImageNet weights' in one_line(error)
    assert cache_contents() == []
    with pytest.raises(ValueError, match='did you mean'):
        model.published_weights('efficientnetv2_rwt')


# ----------------------------------------------------------------------------------------------
# The table, against timm's and torchvision's own records

def test_every_variant_has_a_row_and_timm_rows_name_timms_imagenet_weights_and_their_eval_config():
    assert set(model.PUBLISHED_WEIGHTS) == set(model.VARIANTS)
    for name, row in model.PUBLISHED_WEIGHTS.items():
        if row is None or row[0] != 'timm':
            continue
        hub_id = row[1]
        assert hub_id.split('.')[0] == name and hub_id in timm.list_pretrained(name + '.*'), name
        expected = timm.models.get_pretrained_cfg(hub_id)
        assert expected.hf_hub_id == f'timm/{hub_id}' and expected.num_classes == 1000, name
        config = model.published_config(name)
        assert config['test_size'] == (expected.test_input_size or expected.input_size)[-1], name
        assert (config['crop_pct'], config['interpolation']) == (expected.crop_pct, expected.interpolation)
        assert (config['mean'], config['std']) == (expected.mean, expected.std), name


@pytest.mark.parametrize('name, weights', [('efficientnetv2_s', 'EfficientNet_V2_S_Weights'),
                                           ('efficientnetv2_m', 'EfficientNet_V2_M_Weights'),
                                           ('efficientnetv2_l', 'EfficientNet_V2_L_Weights')])
def test_torchvision_rows_carry_torchvisions_file_top1_and_eval_transform(name, weights):
    published = getattr(torchvision.models, weights).IMAGENET1K_V1
    _, file, top1, _ = model.PUBLISHED_WEIGHTS[name]
    assert f'{model.TORCHVISION_MODELS}/{file}' == published.url
    assert top1 == published.meta['_metrics']['ImageNet-1K']['acc@1']
    transform, config = published.transforms(), model.published_config(name)
    assert transform.resize_size == [config['test_size']] == transform.crop_size  # crop_pct 1
    assert config['crop_pct'] == 1.0 and config['interpolation'] == transform.interpolation.value
    assert (list(config['mean']), list(config['std'])) == (transform.mean, transform.std)


def test_torchvision_weights_without_batch_counters_still_convert():
    """Published files may leave out BatchNorm's num_batches_tracked; torch loads 0 for them."""
    torch.manual_seed(0)
    reference = torchvision.models.efficientnet_v2_s(weights=None)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith('num_batches_tracked')}
    with torch.device('meta'):
        net = model.create_model('efficientnetv2_s')
    net = model.load_pretrained(net.to_empty(device='cpu'), state)
    ours = [(k, v) for k, v in net.state_dict().items() if not k.endswith('num_batches_tracked')]
    assert len(ours) == len(state)
    for (key, value), expected in zip(ours, state.values()):
        assert torch.equal(value, expected), key
    assert all(v == 0 for k, v in net.state_dict().items() if k.endswith('num_batches_tracked'))


# ----------------------------------------------------------------------------------------------
# The safetensors reader

def test_the_safetensors_reader_matches_the_safetensors_package_for_every_dtype(tmp_path):
    generator = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, 7, generator=generator)
    tensors = {'f64': floats.double(), 'f32': floats, 'f16': floats.half(), 'bf16': floats.bfloat16(),
               'i64': torch.randint(-2**62, 2**62, (4, 3), generator=generator),
               'i32': torch.randint(-2**31, 2**31 - 1, (6,), dtype=torch.int32, generator=generator),
               'i16': torch.randint(-2**15, 2**15 - 1, (2, 2), dtype=torch.int16, generator=generator),
               'i8': torch.randint(-128, 127, (9,), dtype=torch.int8, generator=generator),
               'u8': torch.randint(0, 255, (1, 9), dtype=torch.uint8, generator=generator),
               'bool': floats[0] > 0, 'scalar': torch.tensor(7), 'empty': torch.zeros(0, 4)}
    path = tmp_path / 'mixed.safetensors'
    safetensors.torch.save_file(tensors, path, metadata={'format': 'pt'})
    ours, theirs = model.read_safetensors(path), safetensors.torch.load_file(path)
    assert ours.keys() == theirs.keys() == tensors.keys()
    for key in tensors:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert model.read_checkpoint(str(path)).keys() == tensors.keys()  # chosen by the extension


@pytest.mark.parametrize('content', [b'', b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}',
                                     b'\xff' * 8 + b'{}', b'PK\x03\x04 a zip, as torch.save writes'])
def test_a_broken_safetensors_file_is_refused_in_one_line(tmp_path, content):
    path = tmp_path / 'broken.safetensors'
    path.write_bytes(content)
    with pytest.raises(model.CheckpointError) as error:
        model.load_pretrained(model.create_model(ARCH), str(path))
    assert 'safetensors' in one_line(error)


def test_timm_safetensors_without_batch_counters_load(tmp_path, timm_b0):
    state = {k: v for k, v in timm_b0.state_dict().items() if not k.endswith('num_batches_tracked')}
    safetensors.torch.save_file(state, tmp_path / 'b0.safetensors')
    net = model.load_pretrained(model.create_model(ARCH), str(tmp_path / 'b0.safetensors')).eval()
    with torch.no_grad():
        assert_same(net(images((64, 64))), timm_b0(images((64, 64))))


# ----------------------------------------------------------------------------------------------
# predict.py without a checkpoint

def run_predict(*args, env):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'predict.py'), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED='1', **env))


def an_image(tmp_path):
    folder = make_image_folder(tmp_path / 'data', classes=1, train_per_class=1, val_per_class=1)
    return os.path.join(folder, 'val', 'class_0', '0.jpg')


def test_classify_with_a_model_name_downloads_once_and_prints_imagenet_class_names(hub, timm_b0_file,
                                                                                   tmp_path):
    publish(hub, timm_b0_file)
    image = an_image(tmp_path)
    env = dict(HF_ENDPOINT=os.environ['HF_ENDPOINT'], TORCH_HOME=os.environ['TORCH_HOME'])
    for _ in range(2):
        result = run_predict('classify', '--model', ARCH, image, '--topk', '3', '--device', 'cpu', env=env)
        assert result.returncode == 0 and '\r' not in result.stderr, result.stderr  # plain log lines
        path, *top = result.stdout.strip().split('  ')
        assert path == image and len(top) == 3
        assert all(name in predict.imagenet_classes() for name, _ in (pair.split(' ') for pair in top))
    assert hub.requests == [HUB_PATH, '/cdn/blob']  # the second run read the cache


def test_published_weights_come_with_their_eval_settings_and_imagenet_class_names(hub, timm_b0_file):
    publish(hub, timm_b0_file)
    net, info = predict.load_published(ARCH)
    config = model.VARIANTS[ARCH]['config']  # timm's weights: the variant's own settings
    assert (info['size'], info['crop_pct'], info['mean']) == (224, 0.875, config['mean']) and not net.training
    assert info['classes'] == predict.imagenet_classes() and info['published'] == f'timm:{HUB_ID}'


def test_classify_with_an_unreachable_hub_is_one_error_line_with_exit_status_2(tmp_path):
    env = dict(HF_ENDPOINT=f'http://127.0.0.1:{closed_port()}', TORCH_HOME=os.environ['TORCH_HOME'])
    result = run_predict('classify', '--model', ARCH, an_image(tmp_path), env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == '', result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith('error: cannot download http://127.0.0.1:'), lines
    assert '--pretrained PATH' in lines[0] and 'Traceback' not in result.stderr
    assert cache_contents() == []


def test_classify_and_export_arguments_without_a_checkpoint(tmp_path):
    parser = predict.get_args_parser()
    args = parser.parse_args(['export', '--model', ARCH, 'out.onnx'])
    assert (args.checkpoint, args.output) == (None, 'out.onnx')
    args = parser.parse_args(['export', 'run/last.pth.tar', 'out.onnx'])
    assert (args.checkpoint, args.output) == ('run/last.pth.tar', 'out.onnx')
    folder = tmp_path / 'photos'
    folder.mkdir()
    assert predict.split_checkpoint([str(folder), 'a.JPG'], ARCH) == (None, [str(folder), 'a.JPG'])
    assert predict.split_checkpoint(['last.pth.tar', 'a.jpg'], None) == ('last.pth.tar', ['a.jpg'])
    with pytest.raises(predict.utils.UsageError, match='--model NAME'):
        predict.split_checkpoint(['a.jpg'], None)


def test_imagenet_class_names_are_the_thousand_in_torchvisions_order():
    names = predict.imagenet_classes()
    assert len(names) == 1000 and names[0] == 'tench' and names[281:283] == ['tabby', 'tiger_cat']
    assert all(' ' not in name for name in names)


# ----------------------------------------------------------------------------------------------
# train.py --pretrained without a path

def test_train_pretrained_without_a_path_downloads_once_and_starts_from_those_weights(hub, timm_b0_file, tmp_path):
    """Fine-tuning and --evaluate from the published weights; the second run reads the cache."""
    publish(hub, timm_b0_file)
    data_dir = make_image_folder(tmp_path / 'data', classes=2, train_per_class=4, val_per_class=2)
    tiny = [data_dir, '--model', ARCH, '--pretrained', '-b', '4', '-j', '0']
    result = run_train(*tiny, '--img-size', '32', '--perf-steps', '1', '--output', tmp_path / 'run')
    assert 'classifier left as initialised (checkpoint has 1000 classes, model 2)' in result.stdout
    assert 'downloading http://127.0.0.1:' in result.stderr and '\r' not in result.stderr
    result = run_train(*tiny, '--evaluate', '--num-classes', '1000')  # at the weights' eval size, 224
    assert re.search(r'^Evaluation: loss \S+  top1 \S+  top5 \S+$', result.stdout, re.M), result.stdout
    assert re.search(r'^Test: \[   0/0\]', result.stdout, re.M)
    assert hub.requests == [HUB_PATH, '/cdn/blob']


def test_train_pretrained_with_an_unreachable_hub_is_one_error_line_and_leaves_no_run_folder(tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setenv('HF_ENDPOINT', f'http://127.0.0.1:{closed_port()}')
    data_dir = make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1)
    result = run_train(data_dir, '--model', ARCH, '--pretrained', '--img-size', '32', '-j', '0',
                       '--output', tmp_path / 'run', check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
    assert lines[-1].startswith('error: cannot download http://127.0.0.1:') and '--pretrained PATH' in lines[-1]
    assert not (tmp_path / 'run').exists() and cache_contents() == []
