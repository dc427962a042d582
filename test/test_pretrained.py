"""Published ImageNet weights by name, as a specification: the table, the download, the caches,
reading .safetensors and predict.py and train.py without a checkpoint.

Nothing here reaches the network. huggingface_hub's real client runs against a Hugging Face stand-in
on 127.0.0.1 (http.server in threads; HF_ENDPOINT points at it) that speaks the hub's protocol for a
large file: HEAD on /<repo>/resolve/main/<file> answers 302 to a CDN on another host, with the
commit (X-Repo-Commit), the size (X-Linked-Size) and the SHA-256 (X-Linked-Etag); the client then
GETs the file from the CDN. torch.hub's downloader runs against a file:// folder standing for
download.pytorch.org. The weights are written here: timm's randomly initialised tf_efficientnetv2_b0
saved with the safetensors package, and a torchvision-style .pth named with its SHA-256 prefix.
Both caches (HF_HOME, TORCH_HOME) are temporary folders, so the user's are never read or written.

    .venv/bin/python -m pytest test/test_pretrained.py -q
"""

import hashlib
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from huggingface_hub import constants as hub_constants

import errors
import model
import predict
import published
import weights
from conftest import ROOT, make_image_folder, run_train
from test_model import assert_same, images, timm_reference

ARCH, HUB_ID = 'tf_efficientnetv2_b0', 'tf_efficientnetv2_b0.in1k'
REPO, HUB_PATH, CDN_PATH = f'timm/{HUB_ID}', f'/timm/{HUB_ID}/resolve/main/model.safetensors', '/cdn/blob'
COMMIT = '0123456789abcdef0123456789abcdef01234567'  # the commit 'main' resolves to
DOWNLOAD = [f'HEAD {HUB_PATH}', f'GET {CDN_PATH}']  # what the client asks for one download


# ----------------------------------------------------------------------------------------------
# The caches, and a Hugging Face stand-in on 127.0.0.1


@pytest.fixture(autouse=True)
def caches(monkeypatch, tmp_path):
    """Hugging Face's and torch's caches in a temporary folder, the hub client online and without its
    once-a-day telemetry request. Subprocesses read the environment; huggingface_hub reads it once, at
    its import (timm imported it here), so this process also gets its constants set."""
    settings = dict(
        HF_HOME=str(tmp_path / 'hf'),
        HF_HUB_CACHE=str(tmp_path / 'hf' / 'hub'),
        HF_HUB_OFFLINE='0',
        HF_HUB_DISABLE_TELEMETRY='1',
        TORCH_HOME=str(tmp_path / 'torch'),
    )
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(hub_constants, 'HF_HUB_CACHE', settings['HF_HUB_CACHE'])
    monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(hub_constants, 'HF_HUB_DISABLE_TELEMETRY', True)


def use_endpoint(monkeypatch, endpoint):
    """HF_ENDPOINT, for subprocesses and for this process's huggingface_hub (which strips a trailing /)."""
    monkeypatch.setenv('HF_ENDPOINT', endpoint)
    endpoint = endpoint.rstrip('/')
    monkeypatch.setattr(hub_constants, 'ENDPOINT', endpoint)
    monkeypatch.setattr(
        hub_constants, 'HUGGINGFACE_CO_URL_TEMPLATE', endpoint + '/{repo_id}/resolve/{revision}/{filename}'
    )


@pytest.fixture
def no_retry_waits(monkeypatch):
    """huggingface_hub waits before it retries: 1+2+4+8+8 s for a host that does not answer, 1 s per
    retry of a cut transfer. In this process the waits are skipped."""
    monkeypatch.setattr(time, 'sleep', lambda seconds: None)


@pytest.fixture
def no_retry_waits_in_subprocesses(tmp_path, monkeypatch):
    """The same for the programs the test starts: a sitecustomize module on their PYTHONPATH skips the waits
    (the retries themselves still run, against the closed port)."""
    folder = tmp_path / 'no_waits'
    folder.mkdir()
    (folder / 'sitecustomize.py').write_text('import time\ntime.sleep = lambda seconds: None\n')
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [str(folder), os.environ.get('PYTHONPATH')])))


class Hub(http.server.BaseHTTPRequestHandler):
    """The hub and its CDN (two servers, one handler): HEAD and GET answered from the shared
    `routes[path]` = (status, headers, body), a Range request (a resumed download) with the rest of
    the body, and each request recorded as 'METHOD path'. Content-Length announces the body sent.
    GETs of a body follow `plan`, one entry each while it lasts: dict(send=bytes) ends the body
    early, announce=False leaves out Content-Length (a streaming proxy), interrupt=True presses
    Ctrl-C after the bytes sent (SIGINT to pytest's main thread), then_drop=True drops every later
    connection without an answer (`dropping`)."""

    def do_HEAD(self):
        self.answer()

    def do_GET(self):
        self.answer()

    def answer(self):
        hub = self.server.hub
        hub.requests.append(f'{self.command} {self.path}')
        if hub.dropping:
            self.close_connection = True  # no answer at all
            return
        if self.path not in hub.routes:
            self.send_error(404)
            return
        status, headers, body = hub.routes[self.path]
        start = int(re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range', 'bytes=0-')).group(1))
        if start:
            status, headers = 206, {**headers, 'Content-Range': f'bytes {start}-{len(body) - 1}/{len(body)}'}
        plan = hub.plan.pop(0) if self.command == 'GET' and body and hub.plan else {}
        body = body[start:]
        self.send_response(status)
        if plan.get('announce', True):
            headers = {**headers, 'Content-Length': str(len(body))}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == 'GET':
            self.wfile.write(body[: plan.get('send', len(body))])  # HTTP/1.0: then the connection closes
            hub.dropping = plan.get('then_drop', False)
            if plan.get('interrupt'):
                self.wfile.flush()
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                self.connection.settimeout(10)
                self.connection.recv(1)  # until the client hangs up

    def log_message(self, *args):  # quiet
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # clients hanging up early are part of the tests
        pass


class HubStandIn:
    def __init__(self):
        self.routes, self.requests, self.plan, self.dropping = {}, [], [], False
        self.servers = [QuietServer(('127.0.0.1', 0), Hub) for _ in ('hub', 'cdn')]
        for server in self.servers:
            server.hub = self
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url, self.cdn_url = (f'http://127.0.0.1:{server.server_port}' for server in self.servers)

    def close(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def hub(monkeypatch):
    stand_in = HubStandIn()
    use_endpoint(monkeypatch, stand_in.url)
    yield stand_in
    stand_in.close()


def publish(hub, body, stated_sha256='the right one', hub_id=HUB_ID):
    """Serve `body` as huggingface.co serves timm/<hub_id>'s model.safetensors, an LFS file: the
    resolve URL answers 302 to the CDN and states the commit, the size and the file's SHA-256 in
    X-Linked-Etag (None: no such header, as a mirror might; the client then names the file by the
    ETag, the git hash of the LFS pointer). The CDN's own ETag, 64 hex digits here, is no file hash:
    the client never reads it."""
    if stated_sha256 == 'the right one':
        stated_sha256 = hashlib.sha256(body).hexdigest()
    stated = {'X-Linked-Etag': f'"{stated_sha256}"'} if stated_sha256 else {}
    hub_path, cdn_path = HUB_PATH.replace(HUB_ID, hub_id), CDN_PATH if hub_id == HUB_ID else f'/cdn/{hub_id}'
    hub.routes[hub_path] = (
        302,
        {
            'Location': hub.cdn_url + cdn_path,
            'X-Repo-Commit': COMMIT,
            'ETag': '"' + 'e' * 40 + '"',
            'X-Linked-Size': str(len(body)),
            **stated,
        },
        b'',
    )
    hub.routes[cdn_path] = (200, {'ETag': '"' + '0' * 64 + '"'}, body)


@pytest.fixture(scope='module')
def timm_b0():
    """timm's tf_efficientnetv2_b0, randomly initialised, with BN statistics that keep it O(1)."""
    return timm_reference(ARCH)


@pytest.fixture(scope='module')
def timm_b0_file(timm_b0):
    return safetensors.torch.save(timm_b0.state_dict())


def hub_cache():
    return os.environ['HF_HUB_CACHE']


def torch_cache():
    return os.path.join(torch.hub.get_dir(), 'checkpoints')


def cache_contents():
    """Every file in both caches that holds or could hold weights (partial downloads too), relative to
    the cache; not Hugging Face's bookkeeping: refs/main (the commit 'main' was), lock files, the tag."""
    found = []
    for cache in (hub_cache(), torch_cache()):
        for folder, _, files in os.walk(cache):
            relative = os.path.relpath(folder, cache).split(os.sep)
            if 'refs' in relative or '.locks' in relative:
                continue
            found += [os.path.join(*relative, name) for name in files if name != 'CACHEDIR.TAG']
    return sorted(os.path.normpath(path) for path in found)


def snapshot_and_blob(body):
    """Where huggingface_hub keeps a downloaded file: the snapshot link, and the blob it points to,
    named by the file's SHA-256 (relative to the hub cache)."""
    repo = f'models--timm--{HUB_ID}'
    return (
        os.path.join(repo, 'snapshots', COMMIT, 'model.safetensors'),
        os.path.join(repo, 'blobs', hashlib.sha256(body).hexdigest()),
    )


def one_line(error):
    message = str(error.value)
    assert '\n' not in message and message, message
    return message


# ----------------------------------------------------------------------------------------------
# Download and cache: timm's weights on the Hugging Face hub


def test_published_timm_weights_download_into_the_hub_cache_and_give_timms_outputs(hub, timm_b0, timm_b0_file):
    publish(hub, timm_b0_file)
    path = published.published_weights(ARCH, progress=False)
    snapshot, blob = snapshot_and_blob(timm_b0_file)
    assert path == os.path.join(hub_cache(), snapshot)
    assert os.path.realpath(path) == os.path.realpath(os.path.join(hub_cache(), blob))
    assert hub.requests == DOWNLOAD and cache_contents() == sorted([snapshot, blob])
    # Hugging Face's own cache: its client, as timm and transformers call it, finds the file offline
    assert huggingface_hub.hf_hub_download(REPO, 'model.safetensors', local_files_only=True) == path
    net = model.create_model(ARCH)
    weights.load_pretrained(net, weights.read_checkpoint(path))
    with torch.no_grad():
        x = images((64, 64))
        assert_same(net.eval()(x), timm_b0(x))


def test_the_second_call_is_a_cache_hit_without_a_request(hub, timm_b0_file):
    publish(hub, timm_b0_file)
    first = published.published_weights(ARCH, progress=False)
    hub.routes.clear()  # were the network asked again, the download would fail
    assert published.published_weights(ARCH) == first and hub.requests == DOWNLOAD


def test_offline_mode_uses_the_cache_and_without_it_is_one_line_and_no_request(hub, timm_b0_file, monkeypatch):
    monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', True)  # HF_HUB_OFFLINE=1
    publish(hub, timm_b0_file)
    with pytest.raises(errors.CheckpointError) as error:
        published.published_weights(ARCH, progress=False)
    message = one_line(error)
    assert 'HF_HUB_OFFLINE' in message and hub_cache() in message and '--pretrained PATH' in message
    assert hub.requests == [] and cache_contents() == []
    monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', False)
    path = published.published_weights(ARCH, progress=False)
    monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', True)
    assert published.published_weights(ARCH, progress=False) == path and hub.requests == DOWNLOAD


def test_a_sha256_mismatch_is_refused_in_one_line_and_nothing_stays_in_the_cache(hub, timm_b0_file):
    publish(hub, timm_b0_file, stated_sha256='f' * 64)
    with pytest.raises(errors.CheckpointError) as error:
        published.published_weights(ARCH, progress=False)
    assert 'SHA-256' in one_line(error) and 'ffffffff' in str(error.value)
    assert hub.requests == DOWNLOAD and cache_contents() == []
    publish(hub, timm_b0_file)  # the next try downloads again, and keeps the right file
    path = published.published_weights(ARCH, progress=False)
    assert open(path, 'rb').read() == timm_b0_file


def test_without_a_stated_sha256_the_file_is_kept_when_complete_and_a_cdn_etag_is_no_hash(hub, timm_b0_file):
    publish(hub, timm_b0_file, stated_sha256=None)
    path = published.published_weights(ARCH, progress=False)
    assert open(path, 'rb').read() == timm_b0_file
    assert os.path.basename(os.path.realpath(path)) == 'e' * 40  # named by the pointer's git hash


def test_a_transfer_that_ends_early_leaves_no_partial_file_and_says_so_in_one_line(hub, timm_b0_file):
    """A body without Content-Length (as a streaming proxy sends it) that ends halfway: the client
    compares the bytes with the size the hub stated."""
    half, whole = len(timm_b0_file) // 2, len(timm_b0_file)
    publish(hub, timm_b0_file)
    hub.plan = [dict(send=half, announce=False)]
    with pytest.raises(errors.CheckpointError) as error:
        published.published_weights(ARCH, progress=False)
    message = one_line(error)
    assert message.startswith(f'cannot download {hub.url}{HUB_PATH} into {hub_cache()}')
    assert f'size {whole} but has size {half}' in message and '--pretrained PATH' in message
    assert hub.requests == DOWNLOAD and cache_contents() == []


def test_a_transfer_cut_once_resumes_where_it_stopped_and_the_file_is_whole(hub, timm_b0_file, no_retry_waits):
    publish(hub, timm_b0_file)
    hub.plan = [dict(send=len(timm_b0_file) - 1000)]  # the client keeps what it has read
    path = published.published_weights(ARCH, progress=False)
    assert open(path, 'rb').read() == timm_b0_file and hub.requests == DOWNLOAD + [f'GET {CDN_PATH}']


def test_a_transfer_cut_for_good_leaves_no_partial_file_and_says_so_in_one_line(hub, timm_b0_file, no_retry_waits):
    """Cut halfway, then the CDN drops every connection: the client gives up after 5 more tries."""
    publish(hub, timm_b0_file)
    hub.plan = [dict(send=len(timm_b0_file) // 2, then_drop=True)]
    with pytest.raises(errors.CheckpointError) as error:
        published.published_weights(ARCH, progress=False)
    message = one_line(error)
    assert message.startswith(f'cannot download {hub.url}{HUB_PATH} into {hub_cache()}')
    assert '--pretrained PATH' in message
    assert hub.requests == DOWNLOAD + [f'GET {CDN_PATH}'] * 5 and cache_contents() == []


def test_ctrl_c_during_the_transfer_leaves_no_partial_file(hub, timm_b0_file):
    publish(hub, timm_b0_file)
    hub.plan = [dict(send=1000, interrupt=True)]
    with pytest.raises(KeyboardInterrupt):
        published.published_weights(ARCH, progress=False)
    assert hub.requests == DOWNLOAD and cache_contents() == []


def test_an_unreachable_hub_is_one_line_naming_the_url_the_cache_and_a_local_file(monkeypatch, no_retry_waits):
    port = closed_port()
    use_endpoint(monkeypatch, f'http://127.0.0.1:{port}')
    with pytest.raises(errors.CheckpointError) as error:
        published.published_weights(ARCH, progress=False)
    message = one_line(error)
    assert f'http://127.0.0.1:{port}{HUB_PATH}' in message and hub_cache() in message
    assert '--pretrained PATH' in message and cache_contents() == []


def test_a_missing_file_on_the_hub_names_the_http_status(hub):
    with pytest.raises(errors.CheckpointError, match='HTTP 404'):
        published.published_weights(ARCH, progress=False)
    assert hub.requests == [f'HEAD {HUB_PATH}'] and cache_contents() == []


def closed_port():
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Download and cache: torchvision's weights, with torch.hub


@pytest.fixture
def torchvision_style(monkeypatch, tmp_path):
    """b0's weights as a .pth named like torchvision's (first 8 hex of its SHA-256), served from a
    file:// folder standing for download.pytorch.org."""
    folder = tmp_path / 'download.pytorch.org'
    folder.mkdir()
    state = model.create_model(ARCH).state_dict()
    torch.save(state, folder / 'weights.pth')
    sha256 = hashlib.sha256((folder / 'weights.pth').read_bytes()).hexdigest()
    monkeypatch.setattr(published, 'TORCHVISION_MODELS', folder.as_uri())
    return dict(folder=folder, weights=state, sha256=sha256)


def test_torchvision_style_weights_are_checked_against_the_hash_prefix_in_their_name(torchvision_style, monkeypatch):
    folder, sha256 = torchvision_style['folder'], torchvision_style['sha256']
    (folder / 'weights.pth').rename(folder / f'b0-{sha256[:8]}.pth')
    monkeypatch.setitem(published.PUBLISHED_WEIGHTS, HUB_ID, ('torchvision', 1000, None, {}))
    monkeypatch.setitem(published.TORCHVISION_FILES, HUB_ID, f'b0-{sha256[:8]}.pth')
    path = published.published_weights(ARCH, progress=False)
    assert path == os.path.join(torch_cache(), f'b0-{sha256[:8]}.pth')  # torchvision's own cache name
    assert cache_contents() == [f'b0-{sha256[:8]}.pth']
    net = model.create_model(ARCH)
    weights.load_pretrained(net, weights.read_checkpoint(path))
    for key, value in net.state_dict().items():
        assert torch.equal(value, torchvision_style['weights'][key]), key
    (folder / f'b0-{sha256[:8]}.pth').unlink()  # the second call reads the cache
    assert published.published_weights(ARCH, progress=False) == path


def test_torchvision_weights_whose_hash_differs_from_their_name_are_refused(torchvision_style):
    """The real row: efficientnet_v2_s-dd5fe13b.pth, here holding other bytes."""
    (torchvision_style['folder'] / 'weights.pth').rename(torchvision_style['folder'] / 'efficientnet_v2_s-dd5fe13b.pth')
    with pytest.raises(errors.CheckpointError) as error:
        published.published_weights('efficientnetv2_s', progress=False)
    assert 'expected dd5fe13b' in one_line(error) and torch_cache() in str(error.value)
    assert cache_contents() == []


def test_an_unreachable_torchvision_file_is_one_line_naming_the_url_and_the_cache_path(torchvision_style):
    with pytest.raises(errors.CheckpointError) as error:
        published.published_weights('efficientnetv2_s', progress=False)
    message = one_line(error)
    assert message.startswith(f'cannot download {published.TORCHVISION_MODELS}/efficientnet_v2_s-dd5fe13b.pth')
    assert os.path.join(torch_cache(), 'efficientnet_v2_s-dd5fe13b.pth') in message
    assert '--pretrained PATH' in message and cache_contents() == []


def test_a_variant_without_published_weights_is_refused_in_one_line():
    for call in (published.published_weights, published.published_config):
        with pytest.raises(errors.CheckpointError) as error:
            call('efficientnetv2_xl')
        assert 'efficientnetv2_xl has no published ImageNet weights' in one_line(error)
    assert cache_contents() == []
    with pytest.raises(ValueError, match='did you mean'):
        published.published_weights('efficientnetv2_rwt')


def test_huggingface_hub_is_imported_only_for_a_download():
    code = 'import sys, model, weights, predict, train; assert "huggingface_hub" not in sys.modules, "imported"'
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# The table, against timm's and torchvision's own records

# What --pretrained loaded for each variant before tags; a bare variant name still loads these.
DEFAULT_WEIGHTS = {
    'efficientnetv2_rw_t': 'timm:efficientnetv2_rw_t.ra2_in1k',
    'efficientnetv2_rw_s': 'timm:efficientnetv2_rw_s.ra2_in1k',
    'efficientnetv2_rw_m': 'timm:efficientnetv2_rw_m.agc_in1k',
    'efficientnetv2_s': 'torchvision:efficientnet_v2_s-dd5fe13b.pth',
    'efficientnetv2_m': 'torchvision:efficientnet_v2_m-dc08266a.pth',
    'efficientnetv2_l': 'torchvision:efficientnet_v2_l-59c71312.pth',
    'tf_efficientnetv2_s': 'timm:tf_efficientnetv2_s.in1k',
    'tf_efficientnetv2_m': 'timm:tf_efficientnetv2_m.in1k',
    'tf_efficientnetv2_l': 'timm:tf_efficientnetv2_l.in1k',
    'tf_efficientnetv2_xl': 'timm:tf_efficientnetv2_xl.in21k_ft_in1k',
    'tf_efficientnetv2_b0': 'timm:tf_efficientnetv2_b0.in1k',
    'tf_efficientnetv2_b1': 'timm:tf_efficientnetv2_b1.in1k',
    'tf_efficientnetv2_b2': 'timm:tf_efficientnetv2_b2.in1k',
    'tf_efficientnetv2_b3': 'timm:tf_efficientnetv2_b3.in1k',
}


def test_every_efficientnetv2_tag_timm_publishes_is_a_row_with_timms_classes_and_eval_config():
    timm_tags = {tag for name in model.VARIANTS for tag in timm.list_pretrained(name + '.*')}
    assert {tag for tag, row in published.PUBLISHED_WEIGHTS.items() if row[0] == 'timm'} == timm_tags
    assert len(timm_tags) == 20 and 'tf_efficientnetv2_xl.in21k' in timm_tags
    for tag in timm_tags:
        expected, (_, classes, top1, _) = timm.models.get_pretrained_cfg(tag), published.PUBLISHED_WEIGHTS[tag]
        assert expected.hf_hub_id == f'timm/{tag}' and classes == expected.num_classes, tag
        assert (top1 is None) == (classes == 21843) and classes in (1000, 21843), tag  # 21k: no in1k top-1
        config = published.published_config(tag)
        assert config['train_size'] == expected.input_size[-1], tag
        assert config['test_size'] == (expected.test_input_size or expected.input_size)[-1], tag
        assert (config['crop_pct'], config['interpolation']) == (expected.crop_pct, expected.interpolation), tag
        assert (config['mean'], config['std']) == (expected.mean, expected.std), tag


def test_a_bare_variant_name_means_the_weights_it_meant_before_tags():
    for name in model.VARIANTS:
        if name == 'efficientnetv2_xl':
            continue  # none (test_a_variant_without_published_weights_is_refused_in_one_line)
        tag = published.published_tag(name)
        publisher = published.PUBLISHED_WEIGHTS[tag][0]
        file = tag if publisher == 'timm' else published.TORCHVISION_FILES[tag]
        assert f'{publisher}:{file}' == DEFAULT_WEIGHTS[name] and tag.split('.')[0] == name
        assert published.published_config(name) == published.published_config(tag)
    assert set(DEFAULT_WEIGHTS) == set(model.VARIANTS) - {'efficientnetv2_xl'}


@pytest.mark.parametrize(
    'name, torchvision_weights',
    [
        ('efficientnetv2_s', 'EfficientNet_V2_S_Weights'),
        ('efficientnetv2_m', 'EfficientNet_V2_M_Weights'),
        ('efficientnetv2_l', 'EfficientNet_V2_L_Weights'),
    ],
)
def test_torchvision_rows_carry_torchvisions_file_top1_and_eval_transform(name, torchvision_weights):
    theirs = getattr(torchvision.models, torchvision_weights).IMAGENET1K_V1
    tag = published.published_tag(name)
    publisher, classes, top1, _ = published.PUBLISHED_WEIGHTS[tag]
    assert f'{published.TORCHVISION_MODELS}/{published.TORCHVISION_FILES[tag]}' == theirs.url
    assert (publisher, classes, tag) == ('torchvision', 1000, f'{name}.tv_in1k')
    assert top1 == theirs.meta['_metrics']['ImageNet-1K']['acc@1']
    transform, config = theirs.transforms(), published.published_config(name)
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
    net = net.to_empty(device='cpu')
    assert weights.load_pretrained(net, state) == ['converted torchvision weights; BatchNorm eps set to 1e-3']
    ours = [(k, v) for k, v in net.state_dict().items() if not k.endswith('num_batches_tracked')]
    assert len(ours) == len(state)
    for (key, value), expected in zip(ours, state.values()):
        assert torch.equal(value, expected), key
    assert all(v == 0 for k, v in net.state_dict().items() if k.endswith('num_batches_tracked'))


# ----------------------------------------------------------------------------------------------
# Reading .safetensors (the safetensors package)


def test_safetensors_files_are_read_by_their_extension_with_every_dtype_kept(tmp_path):
    generator = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, 7, generator=generator)
    tensors = {
        'f64': floats.double(),
        'f32': floats,
        'f16': floats.half(),
        'bf16': floats.bfloat16(),
        'i64': torch.randint(-(2**62), 2**62, (4, 3), generator=generator),
        'i32': torch.randint(-(2**31), 2**31 - 1, (6,), dtype=torch.int32, generator=generator),
        'i16': torch.randint(-(2**15), 2**15 - 1, (2, 2), dtype=torch.int16, generator=generator),
        'i8': torch.randint(-128, 127, (9,), dtype=torch.int8, generator=generator),
        'u8': torch.randint(0, 255, (1, 9), dtype=torch.uint8, generator=generator),
        'bool': floats[0] > 0,
        'scalar': torch.tensor(7),
        'empty': torch.zeros(0, 4),
    }
    path = tmp_path / 'mixed.safetensors'
    safetensors.torch.save_file(tensors, path, metadata={'format': 'pt'})
    read = weights.read_checkpoint(str(path))
    assert read.keys() == tensors.keys()
    for key in tensors:
        assert read[key].dtype == tensors[key].dtype and torch.equal(read[key], tensors[key]), key


@pytest.mark.parametrize(
    'content',
    [b'', b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}', b'\xff' * 8 + b'{}', b'PK\x03\x04 a zip, as torch.save writes'],
)
def test_a_broken_safetensors_file_is_refused_in_one_line(tmp_path, content):
    path = tmp_path / 'broken.safetensors'
    path.write_bytes(content)
    with pytest.raises(errors.CheckpointError) as error:
        weights.read_checkpoint(str(path))
    assert 'safetensors' in one_line(error) and str(path) in str(error.value)
    with pytest.raises(errors.CheckpointError, match='not found'):
        weights.read_checkpoint(str(tmp_path / 'missing.safetensors'))


def test_timm_safetensors_without_batch_counters_load(tmp_path, timm_b0):
    state = {k: v for k, v in timm_b0.state_dict().items() if not k.endswith('num_batches_tracked')}
    safetensors.torch.save_file(state, tmp_path / 'b0.safetensors')
    net = model.create_model(ARCH)
    assert weights.load_pretrained(net, weights.read_checkpoint(str(tmp_path / 'b0.safetensors'))) == []
    with torch.no_grad():
        assert_same(net.eval()(images((64, 64))), timm_b0(images((64, 64))))


# ----------------------------------------------------------------------------------------------
# predict.py without a checkpoint


def run_predict(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, 'predict.py'), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONUNBUFFERED='1'),
    )


def an_image(tmp_path):
    folder = make_image_folder(tmp_path / 'data', classes=1, train_per_class=1, val_per_class=1)
    return os.path.join(folder, 'val', 'class_0', '0.jpg')


def test_classify_with_a_model_name_downloads_once_and_prints_imagenet_class_names(hub, timm_b0_file, tmp_path):
    publish(hub, timm_b0_file)
    image = an_image(tmp_path)
    for _ in range(2):
        result = run_predict('classify', '--model', ARCH, image, '--topk', '3', '--device', 'cpu')
        assert result.returncode == 0 and '\r' not in result.stderr, result.stderr  # plain log lines
        path, *top = result.stdout.strip().split('  ')
        assert path == image and len(top) == 3
        assert all(name in predict.imagenet_classes() for name, _ in (pair.split(' ') for pair in top))
    assert hub.requests == DOWNLOAD  # the second run read the cache
    assert cache_contents() == sorted(snapshot_and_blob(timm_b0_file))


def test_published_weights_come_with_their_eval_settings_and_imagenet_class_names(hub, timm_b0_file):
    publish(hub, timm_b0_file)
    net, info = predict.load_published(ARCH)
    config = model.VARIANTS[ARCH]['config']  # timm's weights: the variant's own settings
    assert (info['size'], info['crop_pct'], info['mean']) == (224, 0.875, config['mean']) and not net.training
    assert info['classes'] == predict.imagenet_classes() and info['published'] == f'timm:{HUB_ID}'


def test_an_unknown_model_name_is_a_usage_error_naming_close_matches(tmp_path):
    torch.save(model.create_model(ARCH, num_classes=2).state_dict(), tmp_path / 'bare.pth')
    for load in (
        lambda: predict.load_published('efficientnetv2_rwt'),
        lambda: predict.load_model(tmp_path / 'bare.pth', 'efficientnetv2_rwt'),
    ):
        with pytest.raises(predict.errors.UsageError, match='did you mean efficientnetv2_rw_t'):
            load()


def test_classify_with_an_unreachable_hub_is_one_error_line_with_exit_status_2(
    tmp_path, monkeypatch, no_retry_waits_in_subprocesses
):
    """huggingface_hub retries a host that does not answer (23 s of waits, skipped here) before this one line."""
    port = closed_port()
    monkeypatch.setenv('HF_ENDPOINT', f'http://127.0.0.1:{port}/')  # a trailing slash, as often typed
    result = run_predict('classify', '--model', ARCH, an_image(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == '', result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith(f'error: cannot download http://127.0.0.1:{port}{HUB_PATH}'), lines
    assert '--pretrained PATH' in lines[0] and hub_cache() in lines[0] and 'Traceback' not in result.stderr
    assert cache_contents() == []


def test_classify_offline_without_the_file_cached_is_one_error_line_with_exit_status_2(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    result = run_predict('classify', '--model', ARCH, an_image(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == '', result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith('error: cannot download ') and 'HF_HUB_OFFLINE' in lines[0]
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
    with pytest.raises(predict.errors.UsageError, match='--model NAME'):
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
    assert re.search(
        r'^classifier left as initialised \(checkpoint has 1000 classes, model 2\)$', result.stdout, re.M
    ), result.stdout
    assert f'downloaded {hub.url}{HUB_PATH} to ' in result.stderr and '\r' not in result.stderr
    result = run_train(*tiny, '--evaluate', '--num-classes', '1000')  # at the weights' eval size, 224
    assert re.search(r'^Evaluation: loss \S+  top1 \S+  top5 \S+$', result.stdout, re.M), result.stdout
    assert re.search(r'^Test: \[   0/0\]', result.stdout, re.M)
    assert hub.requests == DOWNLOAD


def test_train_pretrained_with_an_unreachable_hub_is_one_error_line_and_leaves_no_run_folder(
    tmp_path, monkeypatch, no_retry_waits_in_subprocesses
):
    """huggingface_hub retries a host that does not answer (23 s of waits, skipped here) before this one line."""
    monkeypatch.setenv('HF_ENDPOINT', f'http://127.0.0.1:{closed_port()}')
    data_dir = make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1)
    result = run_train(
        data_dir,
        '--model',
        ARCH,
        *'--pretrained --img-size 32 -b 2 -j 0 --output'.split(),
        tmp_path / 'run',
        check=False,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
    assert lines[-1].startswith('error: cannot download http://127.0.0.1:') and '--pretrained PATH' in lines[-1]
    assert hub_cache() in lines[-1] and not (tmp_path / 'run').exists() and cache_contents() == []


# ----------------------------------------------------------------------------------------------
# Weights by tag: --model VARIANT.TAG (timm's spelling)


def test_python_published_py_lists_every_tag_with_its_classes_sizes_and_top1():
    result = subprocess.run([sys.executable, 'published.py'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    for tag, (publisher, classes, top1, _) in published.PUBLISHED_WEIGHTS.items():
        config = published.published_config(tag)
        settings = [
            f'{classes:,}',
            str(config['train_size']),
            str(config['test_size']),
            f'{config["crop_pct"]:.3f}',
            '0.5' if config['mean'] == model.TF_MEAN else 'ImageNet',
            config['interpolation'],
        ]
        top1_words = [f'{top1:.3f}', f'@{config["test_size"]}'] if top1 else ['none:', '21k', 'classes']
        assert rows[tag][1:] == [*settings, *top1_words, f'({publisher})'], rows[tag]
    assert rows['tf_efficientnetv2_s.in21k_ft_in1k'][1:8] == '1,000 300 384 1.000 0.5 bicubic 84.332'.split()
    assert rows['tf_efficientnetv2_l.in21k'][1:8] == ['21,843', '384', '480', '1.000', '0.5', 'bicubic', 'none:']
    # the variants' own table names each variant's default weights
    assert rows['tf_efficientnetv2_s'][-3:] == ['83.900', '@384', 'tf_efficientnetv2_s.in1k']
    assert rows['efficientnetv2_xl'][-1] == 'none'


def test_an_unknown_tag_is_one_line_naming_the_variants_tags():
    import flags

    for call in (
        published.published_tag,
        published.published_config,
        published.published_weights,
        predict.load_published,
        lambda name: flags.resolve_args(flags.get_args_parser().parse_args(['--model', name])),
    ):
        with pytest.raises(errors.CheckpointError) as error:
            call('tf_efficientnetv2_s.in22k')
        message = one_line(error)
        assert message.startswith('no published weights tf_efficientnetv2_s.in22k: tf_efficientnetv2_s has ')
        assert 'tf_efficientnetv2_s.in21k_ft_in1k' in message and 'python published.py' in message
    with pytest.raises(ValueError, match='did you mean tf_efficientnetv2_s'):
        published.published_tag('tf_efficientnetv2_ss.in1k')
    assert cache_contents() == []


def test_a_tag_without_pretrained_trains_from_scratch_with_the_tags_settings():
    """As timm's create_model('VARIANT.TAG') without pretrained=True: the network, the tag's config."""
    import flags

    def resolved(*extra):
        return flags.resolve_args(flags.get_args_parser().parse_args(['--num-classes', '10', *extra]))

    tagged = resolved('--model', 'tf_efficientnetv2_b3.in21k_ft_in1k')
    bare = resolved('--model', 'tf_efficientnetv2_b3')
    assert (tagged.mean, tagged.std, tagged.crop_pct) == (model.TF_MEAN, model.TF_STD, 0.9)
    assert (bare.mean, bare.std, bare.crop_pct) == (model.IMAGENET_MEAN, model.IMAGENET_STD, 0.904)
    net = model.create_model(tagged.model, num_classes=10)
    assert sum(p.numel() for p in net.parameters()) == sum(
        p.numel() for p in model.create_model(bare.model, num_classes=10).parameters()
    )
    assert cache_contents() == []


def test_a_tag_offline_is_one_error_line_naming_its_file_and_once_cached_it_loads(hub, tmp_path):
    tag = 'tf_efficientnetv2_s.in21k_ft_in1k'
    data_dir = make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1)
    tiny = [data_dir, '--model', tag, '--pretrained', '--img-size', '32', '-b', '2', '-j', '0', '--perf-steps', '1']
    offline = dict(HF_HUB_OFFLINE='1')
    result = run_train(*tiny, '--output', tmp_path / 'run', check=False, env=offline)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    assert lines[0].startswith(
        f'error: cannot download {hub.url}/timm/{tag}/resolve/main/model.safetensors '
        f'into {hub_cache()} (HF_HUB_OFFLINE is set and the file is not cached)'
    )
    assert '--pretrained PATH' in lines[0] and not (tmp_path / 'run').exists() and hub.requests == []
    weights_of_timm = model.create_model('tf_efficientnetv2_s')  # stands for the weights timm publishes
    publish(hub, safetensors.torch.save(weights_of_timm.state_dict()), hub_id=tag)
    published.published_weights(tag, progress=False)  # into the cache, online
    result = run_train(*tiny, '--output', tmp_path / 'run', env=offline)
    assert re.search(rf'^Training {re.escape(tag)} \(20\.18M parameters\) on ', result.stdout, re.M), result.stdout
    assert re.search(
        r'^classifier left as initialised \(checkpoint has 1000 classes, model 2\)$', result.stdout, re.M
    ), result.stdout
    assert len(hub.requests) == 2  # this process's download; train.py asked nothing


@pytest.fixture(scope='module')
def in21k_b3_file():
    """tf_efficientnetv2_b3 with ImageNet-21k's classifier (21,843 rows), as timm/...b3.in21k holds it."""
    return safetensors.torch.save(model.create_model('tf_efficientnetv2_b3', num_classes=21843).state_dict())


def test_an_in21k_start_fine_tunes_with_a_new_classifier_and_predict_numbers_its_classes(hub, in21k_b3_file, tmp_path):
    tag = 'tf_efficientnetv2_b3.in21k'
    publish(hub, in21k_b3_file, hub_id=tag)
    data_dir = make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1)
    result = run_train(
        data_dir,
        '--model',
        tag,
        *'--pretrained --img-size 32 -b 2 -j 0 --perf-steps 1 --output'.split(),
        tmp_path / 'run',
    )
    assert re.search(
        r'^classifier left as initialised \(checkpoint has 21843 classes, model 2\)$', result.stdout, re.M
    ), result.stdout
    assert f'downloaded {hub.url}/timm/{tag}/resolve/main/model.safetensors to ' in result.stderr
    with open(tmp_path / 'run' / 'args.yaml') as f:
        saved = f.read()  # the tag's settings: mean/std 0.5 (the variant's are ImageNet's)
    assert 'mean: [0.5, 0.5, 0.5]\n' in saved and 'model: "tf_efficientnetv2_b3.in21k"\n' in saved
    net, info = predict.load_published(tag)  # from the cache
    assert (info['classes'][:2], len(info['classes']), net.num_classes) == (['0', '1'], 21843, 21843)
    assert (info['mean'], info['published']) == (model.TF_MEAN, f'timm:{tag}')
    published = safetensors.torch.load(in21k_b3_file)
    assert all(torch.equal(value, published[key]) for key, value in net.state_dict().items())
    assert len(hub.requests) == 2  # one download
