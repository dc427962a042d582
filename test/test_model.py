"""Specification of model.py: every variant is timm's network, number for number.

timm and torchvision are test-only oracles. Their randomly initialised models are the reference:
ours loads their weights with `load_pretrained` and must compute the same outputs, batch statistics
and gradients. The rest pins down what parity cannot see: stochastic depth, init, checkpoint
handling, ONNX export, channels_last and odd input sizes.

    .venv/bin/python -m pytest test/test_model.py -q   # 3.5 min on 2 busy CPU cores (85 s of CPU)
"""

import argparse
import math
import os
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402
import published  # noqa: E402
import weights  # noqa: E402
from errors import CheckpointError  # noqa: E402
from model import create_model, list_models  # noqa: E402
from weights import load_pretrained  # noqa: E402

SQUARE = (64, 64)
ODD = (67, 75)  # TF 'same' padding of a stride-2 conv is asymmetric here, and differs per side
# One of each kind: 'cn' stage 0 (rw_t), 'er' stage 0 with head 1792 (rw_s), TF padding and BN eps
# (tf_s), and the b-series' rounding without the 10% correction (tf_b0).
REPRESENTATIVE = ['efficientnetv2_rw_t', 'efficientnetv2_rw_s', 'tf_efficientnetv2_s', 'tf_efficientnetv2_b0']


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Inputs here are tiny: a second thread costs more in synchronisation than it saves, and
    several times more when other processes share the cores (rw_t at 67x75: 0.2 s vs 1-7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Helpers


def images(size, batch=2, seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def num_params(net):
    return sum(p.numel() for p in net.parameters())


def calibrate_batchnorm(net, seed=1):
    """Random BN scale and shift, and running statistics that keep eval-mode activations O(1):
    means measured on one batch of noise, variances the layer's measured average times a random
    factor per channel. timm's 0/1 statistics let the big variants' activations grow to 1e17,
    hiding any error under the output's scale; per-channel variances measured on a few samples are
    sometimes near zero, and dividing by them amplifies float32 rounding to O(1)."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.normal_(0.0, 0.1, generator=generator)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: after one batch, exactly its statistics
        net.train()(images(SQUARE, seed=seed))
        for bn in norms:
            bn.momentum = 0.1
            factor = torch.empty_like(bn.running_var).uniform_(0.5, 2.0, generator=generator)
            bn.running_var.copy_(bn.running_var.mean() * factor)
    return net.eval()


def timm_reference(name, **kwargs):
    torch.manual_seed(0)  # timm's init, random but the same on every run
    return calibrate_batchnorm(timm.create_model(name, **kwargs))


def loaded_from(state_dict, name, **kwargs):
    """Our `name` holding `state_dict`. Built on meta and materialised empty, so every value must
    come from the checkpoint (and the XL variants skip seconds of init)."""
    with torch.device('meta'):
        net = create_model(name, **kwargs)
    return loaded(net.to_empty(device='cpu'), state_dict)


def loaded(net, checkpoint, **kwargs):
    """`net` after load_pretrained, which loads in place and returns its notes."""
    load_pretrained(net, checkpoint, **kwargs)
    return net


def assert_same(ours, theirs, rtol=1e-5):
    """Equal within rtol of each value, and rtol of the largest value for those near zero."""
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * theirs.abs().max().item())


def quoted_keys(message):
    return re.findall(r"'([\w.]+)'", message)


# ----------------------------------------------------------------------------------------------
# Parity with timm (and torchvision)


@pytest.mark.parametrize('name', list_models())
def test_every_variant_matches_timm_outputs_after_loading_its_weights(name):
    reference = timm_reference(name)
    ours = loaded_from(reference.state_dict(), name).eval()
    assert num_params(ours) == num_params(reference)
    with torch.no_grad():
        for size in (SQUARE, ODD):
            x = images(size)
            assert_same(ours(x), reference(x))


@pytest.mark.parametrize('name', REPRESENTATIVE)
def test_features_match_timm_at_the_odd_size(name):
    reference = timm_reference(name)
    ours = loaded_from(reference.state_dict(), name).eval()
    assert ours.num_features == reference.num_features
    with torch.no_grad():
        x = images(ODD)
        assert_same(ours.forward_features(x), reference.forward_features(x))


@pytest.mark.parametrize('name', REPRESENTATIVE)
def test_train_mode_uses_and_updates_batch_statistics_like_timm(name):
    reference = timm_reference(name, drop_rate=0.0, drop_path_rate=0.0).train()
    ours = loaded_from(reference.state_dict(), name, drop_rate=0.0, drop_path_rate=0.0).train()
    x = images(ODD)
    with torch.no_grad():
        assert_same(ours(x), reference(x))
    theirs = reference.state_dict()
    for key, value in ours.state_dict().items():  # running mean/var and num_batches_tracked
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize('name', REPRESENTATIVE)
def test_gradients_match_timm_for_input_and_every_parameter(name):
    reference = timm_reference(name).train()
    ours = loaded_from(reference.state_dict(), name).train()
    target = torch.arange(2) * 7
    grads = []
    for net in (ours, reference):
        x = images(ODD).requires_grad_()
        F.cross_entropy(net(x), target).backward()
        grads.append({'input': x.grad, **{k: p.grad for k, p in net.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        assert_same(grads[0][key], grads[1][key], rtol=1e-4)


def test_stochastic_depth_and_dropout_draw_the_same_samples_as_timm_given_the_same_seed():
    """Same blocks drop in the same order with the same rates: only residual blocks draw."""
    name, rates = 'efficientnetv2_rw_t', dict(drop_rate=0.2, drop_path_rate=0.2)
    reference = timm_reference(name, **rates).train()
    ours = loaded_from(reference.state_dict(), name, **rates).train()
    x = images(SQUARE)
    with torch.no_grad():
        outputs = []
        for net in (ours, reference):
            torch.manual_seed(123)
            outputs.append(net(x))
        assert_same(*outputs)
        ours.apply(lambda m: setattr(m, 'p', 0.0) if isinstance(m, model.StochasticDepth) else None)
        ours.drop_rate = 0.0
        assert not torch.allclose(ours(x), outputs[0])  # something was dropped


@pytest.mark.parametrize(
    'tv_name, name',
    [
        ('efficientnet_v2_s', 'efficientnetv2_s'),
        ('efficientnet_v2_m', 'efficientnetv2_m'),
        ('efficientnet_v2_l', 'efficientnetv2_l'),
    ],
)
def test_torchvision_weights_load_and_give_torchvision_outputs(tv_name, name):
    torch.manual_seed(0)
    reference = calibrate_batchnorm(getattr(torchvision.models, tv_name)(weights=None))
    with torch.device('meta'):
        ours = create_model(name).to_empty(device='cpu')
    notes = load_pretrained(ours, reference.state_dict())
    assert len(notes) == 1 and 'eps' in notes[0]  # says it changed BN eps to torchvision's 1e-3
    ours.eval()
    assert {m.eps for m in ours.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}
    with torch.no_grad():
        x = images(SQUARE)  # non-tf padding is symmetric in both, so one size says it all
        assert_same(ours(x), reference(x))


def test_every_variant_carries_timms_preprocessing_config():
    for name in list_models():
        # timm's config for the ImageNet-1k weights, or its default where there are none.
        tags = [t for t in timm.list_pretrained(name + '.*') if t.endswith('in1k') and 'in21k' not in t]
        expected = timm.models.get_pretrained_cfg(tags[0] if tags else name)
        config = model.VARIANTS[name]['config']
        assert config['train_size'] == expected.input_size[-1], name
        assert config['test_size'] == (expected.test_input_size or expected.input_size)[-1], name
        assert config['crop_pct'] == expected.crop_pct, name
        assert config['interpolation'] == expected.interpolation, name
        assert (config['mean'], config['std']) == (expected.mean, expected.std), name


def test_channel_rounding_matches_timm():
    for channels in [c / 10 for c in range(10, 40000, 7)]:
        for round_limit in (0.9, 0.0):
            assert model.make_divisible(channels, round_limit=round_limit) == timm.layers.make_divisible(
                channels, round_limit=round_limit
            ), channels


# ----------------------------------------------------------------------------------------------
# Stochastic depth and init


def test_drop_path_is_the_identity_in_eval_mode():
    """The blocks' drop path is torchvision's StochasticDepth in 'row' mode: timm's DropPath."""
    x = torch.randn(64, 8, 4, 4)
    assert torch.equal(model.StochasticDepth(0.5, 'row').eval()(x), x)


def test_drop_path_keeps_each_sample_with_probability_one_minus_rate_and_scales_it_by_1_over_keep():
    rate, samples = 0.3, 20000
    torch.manual_seed(0)
    out = model.StochasticDepth(rate, 'row').train()(torch.ones(samples, 4, 2, 2))
    per_sample = out.flatten(1)
    kept = per_sample[:, 0] != 0
    assert torch.equal(per_sample, per_sample[:, :1].expand_as(per_sample))  # whole samples only
    assert torch.equal(per_sample[kept], torch.full_like(per_sample[kept], 1 / (1 - rate)))
    # std of the kept fraction is sqrt(0.21 / 20000) = 0.003; allow 5 of them
    assert abs(kept.float().mean().item() - (1 - rate)) < 0.016


def test_drop_path_rate_grows_linearly_over_all_blocks_as_in_timm():
    with torch.device('meta'):
        ours = create_model('efficientnetv2_rw_t', drop_path_rate=0.2)
        reference = timm.create_model('efficientnetv2_rw_t', drop_path_rate=0.2)
    blocks = [block for stage in ours.blocks for block in stage]
    assert [b.drop_path.p for b in blocks] == [0.2 * i / len(blocks) for i in range(len(blocks))]
    timm_blocks = [block for stage in reference.blocks for block in stage]
    assert [getattr(b.drop_path, 'drop_prob', 0.0) for b in timm_blocks] == pytest.approx(
        [b.drop_path.p for b in blocks]
    )


def test_conv_init_is_normal_with_std_sqrt_2_over_fan_out_for_depthwise_and_pointwise():
    torch.manual_seed(0)
    net = create_model('efficientnetv2_rw_t')
    # Layers with fewer weights are too few samples for a 10% bound on the std.
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() >= 1000]
    depthwise = [c for c in convs if c.groups == c.in_channels > 1]
    pointwise = [c for c in convs if c.kernel_size == (1, 1)]  # SE's reduce and expand among them
    assert len(depthwise) >= 10 and len(pointwise) >= 10
    for conv in depthwise + pointwise:
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels / conv.groups
        std = conv.weight.std().item()
        assert abs(std / math.sqrt(2 / fan_out) - 1) < 0.1, (conv, std)
        assert abs(conv.weight.mean().item()) < 0.1 * std
        assert conv.bias is None or not conv.bias.any()
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.weight.eq(1).all() and not m.bias.any() for m in norms)


@pytest.mark.parametrize('num_classes', [1000, 10])
def test_linear_init_is_uniform_within_1_over_sqrt_fan_out(num_classes):
    torch.manual_seed(0)
    net = create_model('tf_efficientnetv2_b0')
    net.reset_classifier(num_classes)  # re-initialised for its own fan_out
    weight, bound = net.classifier.weight, 1 / math.sqrt(num_classes)
    assert weight.abs().max() <= bound and weight.abs().max() > 0.99 * bound
    assert abs(weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    assert not net.classifier.bias.any()


# ----------------------------------------------------------------------------------------------
# Loading checkpoints


@pytest.fixture(scope='module')
def b0_weights():
    return timm_reference('tf_efficientnetv2_b0').state_dict()


def assert_holds(net, state_dict):
    for key, value in net.state_dict().items():
        assert torch.equal(value, state_dict[key]), key


@pytest.mark.parametrize(
    'wrap',
    [
        lambda sd: sd,
        lambda sd: {'state_dict': sd, 'epoch': 3},  # timm train.py checkpoint
        lambda sd: {'state_dict_ema': sd},
        lambda sd: {'model': sd, 'optimizer': {}},  # torchvision references / this project
        lambda sd: {'module.' + k: v for k, v in sd.items()},  # DistributedDataParallel
        lambda sd: {'_orig_mod.' + k: v for k, v in sd.items()},  # torch.compile
    ],
    ids=['bare', 'state_dict', 'state_dict_ema', 'model', 'module.', '_orig_mod.'],
)
def test_timm_weights_load_from_every_usual_wrapper(wrap, b0_weights, tmp_path):
    net = create_model('tf_efficientnetv2_b0')
    assert load_pretrained(net, wrap(b0_weights)) == []  # nothing to note
    assert_holds(net, b0_weights)
    path = tmp_path / 'checkpoint.pth'  # and from a file, read weights-only
    torch.save(wrap(b0_weights), path)
    net = create_model('tf_efficientnetv2_b0')
    assert_holds(loaded(net, weights.read_checkpoint(str(path))), b0_weights)


def test_a_timm_train_py_checkpoint_loads_its_ema_weights(b0_weights, tmp_path):
    """What timm's train.py writes: optimizer state, EMA weights and its argparse.Namespace."""
    reference = timm.create_model('tf_efficientnetv2_b0')
    reference.load_state_dict(b0_weights)
    ema = timm.utils.ModelEmaV3(reference)
    with torch.no_grad():
        reference.conv_stem.weight.add_(1.0)  # the trained weights move on; the EMA lags behind
    saver = timm.utils.CheckpointSaver(
        reference,
        torch.optim.SGD(reference.parameters(), lr=0.1),
        model_ema=ema,
        args=argparse.Namespace(model='tf_efficientnetv2_b0', lr=0.1),
        checkpoint_dir=str(tmp_path),
    )
    saver.save_checkpoint(epoch=0, metric=50.0)
    net = loaded(create_model('tf_efficientnetv2_b0'), weights.read_checkpoint(tmp_path / 'last.pth.tar'))
    assert_holds(net, b0_weights)


def test_ema_weights_are_preferred_unless_use_ema_is_false(b0_weights):
    plain = create_model('tf_efficientnetv2_b0').state_dict()
    checkpoint = {'state_dict': plain, 'state_dict_ema': b0_weights}
    assert_holds(loaded(create_model('tf_efficientnetv2_b0'), checkpoint), b0_weights)
    net = loaded(create_model('tf_efficientnetv2_b0'), checkpoint, use_ema=False)
    assert_holds(net, plain)


@pytest.mark.parametrize(
    'other',
    [
        'efficientnetv2_rw_s',  # other blocks: keys differ
        'efficientnetv2_s',
    ],
)  # same blocks, other widths: shapes differ
def test_weights_of_another_variant_are_refused_naming_a_key(other):
    torch.manual_seed(0)
    state_dict = timm.create_model(other).state_dict()
    net = create_model('efficientnetv2_rw_t')
    with pytest.raises(CheckpointError) as error:
        load_pretrained(net, state_dict)
    assert set(quoted_keys(str(error.value))) & (set(state_dict) | set(net.state_dict()))


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / 'notes.txt'
    path.write_text('not a checkpoint\n')
    with pytest.raises(CheckpointError):
        weights.read_checkpoint(str(path))
    with pytest.raises(CheckpointError):
        weights.read_checkpoint(str(tmp_path / 'missing.pth'))
    with pytest.raises(CheckpointError, match='not a state dict'):  # a path where the dict belongs
        load_pretrained(create_model('tf_efficientnetv2_b0'), str(path))


class MakesDirectoryWhenUnpickled:
    """A harmless stand-in for os.system in a malicious checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(b0_weights, tmp_path):
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': b0_weights, 'payload': MakesDirectoryWhenUnpickled(str(marker))}, path)
    with pytest.raises(CheckpointError):
        weights.read_checkpoint(str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.exists()


@pytest.mark.parametrize('checkpoint_classes, model_classes', [(10, 1000), (1000, 10)])
def test_a_classifier_of_another_size_is_left_as_initialised_and_reported_in_one_line(
    checkpoint_classes, model_classes
):
    state_dict = timm_reference('tf_efficientnetv2_b0', num_classes=checkpoint_classes).state_dict()
    net = create_model('tf_efficientnetv2_b0', num_classes=model_classes)
    classifier = {k: v.clone() for k, v in net.classifier.state_dict().items()}
    notes = load_pretrained(net, state_dict)
    assert len(notes) == 1 and 'classifier' in notes[0] and '\n' not in notes[0], notes
    for key, value in net.state_dict().items():
        if key.startswith('classifier.'):
            assert torch.equal(value, classifier[key.removeprefix('classifier.')]), key
        else:
            assert torch.equal(value, state_dict[key]), key


# ----------------------------------------------------------------------------------------------
# Using the model: heads, sizes, memory formats, export


def test_unknown_variant_name_is_an_error_that_suggests_close_names():
    with pytest.raises(ValueError, match='efficientnetv2_rw_t'):
        create_model('efficientnetv2_rwt')

    class UsageError(ValueError):  # a caller's own error: train.py and predict.py pass errors.UsageError
        pass

    with pytest.raises(UsageError, match="unknown model 'efficientnetv2_rwt': did you mean efficientnetv2_rw_t"):
        model.check_model_name('efficientnetv2_rwt', error=UsageError)
    model.check_model_name('efficientnetv2_rw_t', error=UsageError)  # a known name passes


def test_reset_classifier_replaces_the_head_and_zero_classes_give_pooled_features():
    torch.manual_seed(0)
    net = calibrate_batchnorm(create_model('tf_efficientnetv2_b0'))
    x = images(SQUARE)
    with torch.no_grad():
        net.reset_classifier(10)
        assert net(x).shape == (2, 10)
        net.reset_classifier(0)
        assert_same(net(x), net.forward_features(x).mean((2, 3)))
        assert net(x).shape == (2, net.num_features)


@pytest.mark.parametrize('name', ['efficientnetv2_rw_t', 'tf_efficientnetv2_b0'])
@pytest.mark.parametrize('size', [(32, 32), (33, 47)])
def test_any_input_side_of_at_least_32_works_with_one_feature_pixel_per_32_rounded_up(name, size):
    torch.manual_seed(0)
    net = create_model(name).eval()
    with torch.no_grad():
        x = images(size, batch=1)
        features = net.forward_features(x)
        height, width = (math.ceil(side / 32) for side in size)
        assert features.shape == (1, net.num_features, height, width)
        assert net(x).shape == (1, 1000) and net(x).isfinite().all()


@pytest.mark.parametrize('name', ['efficientnetv2_rw_t', 'tf_efficientnetv2_b0'])
def test_channels_last_gives_the_same_output_as_contiguous(name):
    torch.manual_seed(0)
    net = calibrate_batchnorm(create_model(name))
    with torch.no_grad():
        for size in ((33, 47), ODD):
            x = images(size)
            expected = net(x)
            net.to(memory_format=torch.channels_last)
            assert_same(net(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4)
            net.to(memory_format=torch.contiguous_format)


def test_count_macs_agrees_with_torchs_flop_counter_at_an_odd_size():
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device('meta'):
        net = create_model('tf_efficientnetv2_b0')
    with FlopCounterMode(display=False) as counter:
        net(torch.empty(1, 3, 75, 75, device='meta'))
    assert published.count_macs(net, 75) == counter.get_total_flops() // 2


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # the TorchScript exporter's own notice
def test_onnx_export_runs_in_onnxruntime_with_pytorchs_outputs(tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    net = calibrate_batchnorm(create_model('efficientnetv2_rw_t'))
    x = images(SQUARE, batch=1)
    path = tmp_path / 'rw_t.onnx'
    # The TorchScript-based exporter: seconds, where dynamo=True takes most of a minute on a CPU.
    torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=['images'], output_names=['logits'])
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (logits,) = session.run(None, {'images': x.numpy()})
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


def test_torch_compile_captures_every_block_kind_as_one_graph():
    """Dynamo with the eager backend on a one-block-per-kind network: no graph breaks, TF 'same'
    padding included. Inductor's code generation is torch's business and takes minutes on a CPU,
    as does tracing a whole variant, so neither is run here."""
    torch.manual_seed(0)
    table = (('cn', 1, 3, 1, 1, 16, 0), ('er', 1, 3, 2, 4, 24, 0), ('ir', 2, 3, 2, 4, 32, 0.25))
    net = calibrate_batchnorm(create_model('tf_efficientnetv2_b0', table=table))
    compiled = torch.compile(net, backend='eager', fullgraph=True)
    x = images(ODD)
    with torch.no_grad():
        assert_same(compiled(x), net(x))
