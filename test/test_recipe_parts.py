"""The recipe's parts against timm, the oracle: RMSpropTF, the lr schedules, EMA, mixed precision (native and
apex's), the non-finite guard, meters, atomic saves."""

import copy
import errno
import math
import os
import shutil
import types
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

import apex_amp
import checkpoint
import errors
import logs
import optim
import precision as mixed_precision
import run

timm = pytest.importorskip('timm')


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def run_steps(net, optimizer, steps=20):
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net


def test_rmsproptf_matches_timm_over_20_steps_with_weight_decay_groups():
    from timm.optim import RMSpropTF as TimmRMSpropTF

    ours, theirs = small_net(), small_net()
    settings = dict(lr=0.01, weight_decay=1e-2)
    run_steps(
        ours,
        optim.RMSpropTF(
            optim.param_groups(ours, settings['weight_decay']), lr=settings['lr'], alpha=0.9, eps=1e-3, momentum=0.9
        ),
    )
    run_steps(
        theirs,
        TimmRMSpropTF(
            optim.param_groups(theirs, settings['weight_decay']), lr=settings['lr'], alpha=0.9, eps=1e-3, momentum=0.9
        ),
    )
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_create_optimizer_rmsproptf_is_timms_configuration():
    from timm.optim import create_optimizer_v2

    import flags
    import train

    ours, theirs = small_net(), small_net()
    argv = '--opt rmsproptf --lr 0.016 --weight-decay 1e-5 --opt-eps 1e-3 --sched step --epochs 3 --warmup-epochs 0'
    args = flags.resolve_args(flags.get_args_parser().parse_args(argv.split()))
    run_steps(ours, train.create_optimizer(ours, args, steps_per_epoch=100)[0])
    run_steps(theirs, create_optimizer_v2(theirs, 'rmsproptf', lr=0.016, weight_decay=1e-5, eps=1e-3))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_rmsproptf_updates_in_cpu_chunks_exactly_as_in_one_piece():
    whole, chunked = small_net(), small_net()
    optimizers = [
        optim.RMSpropTF(optim.param_groups(net, 1e-2), lr=0.01, eps=1e-3, momentum=0.9) for net in (whole, chunked)
    ]
    optimizers[1].cpu_chunk_numel = 100  # every tensor of small_net alone, some pairs together
    for net, optimizer in zip((whole, chunked), optimizers):
        run_steps(net, optimizer, steps=5)
    for a, b in zip(whole.parameters(), chunked.parameters()):
        assert torch.equal(a, b)


def test_no_weight_decay_on_biases_and_1d_parameters():
    groups = optim.param_groups(small_net(), 1e-5)
    no_decay, decay = groups
    assert no_decay['weight_decay'] == 0 and decay['weight_decay'] == 1e-5
    assert all(p.ndim <= 1 for p in no_decay['params']) and all(p.ndim > 1 for p in decay['params'])
    assert len(no_decay['params']) == 4  # conv bias, BN weight and bias, linear bias


def timm_lrs(scheduler, epochs):
    lrs = []
    for epoch in range(epochs):
        scheduler.step(epoch)
        lrs.append(scheduler.optimizer.param_groups[0]['lr'])
    return lrs


def test_step_schedule_matches_timm_step_scheduler_with_warmup():
    from timm.scheduler import StepLRScheduler

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.014)
    # timm 0.5.4 (the ModelZoo recipe) counted decay from epoch 0; timm >= 0.9 needs warmup_prefix=False for that
    sched = StepLRScheduler(opt, decay_t=2.4, decay_rate=0.97, warmup_lr_init=4e-6, warmup_t=3, warmup_prefix=False)
    expected = timm_lrs(sched, 40)
    ours = [optim.learning_rate(e, 'step', 0.014, 40, 4e-6, 3, 2.4, 0.97, 1e-6) for e in range(40)]
    assert ours == pytest.approx(expected, rel=1e-12)
    assert ours[0] == 4e-6 and ours[3] == pytest.approx(0.014 * 0.97)  # 3 // 2.4 = 1 decay


def test_cosine_schedule_matches_timm_cosine_scheduler():
    from timm.scheduler import CosineLRScheduler

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05)
    sched = CosineLRScheduler(opt, t_initial=30, lr_min=1e-5, warmup_lr_init=1e-4, warmup_t=3)
    expected = timm_lrs(sched, 30)
    ours = [optim.learning_rate(e, 'cosine', 0.05, 30, 1e-4, 3, 0, 0, 1e-5) for e in range(30)]
    assert ours == pytest.approx(expected, rel=1e-9)


def test_ema_matches_timm_model_ema_every_step_including_bn_buffers():
    from timm.utils import ModelEmaV2

    net = small_net()
    ours, theirs = optim.ModelEma(net, 0.9), ModelEmaV2(net, decay=0.9)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.manual_seed(2)
    for _ in range(5):
        optimizer.zero_grad()
        net(torch.randn(4, 3, 8, 8)).sum().backward()  # train mode: BN buffers move too
        optimizer.step()
        ours.update_parameters(net)
        theirs.update(net)
    for (name, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    first = copy.deepcopy(net.state_dict())
    assert not torch.equal(ours.module.state_dict()['4.weight'], first['4.weight'])


def test_ema_first_update_decays_instead_of_copying():
    net = small_net()
    ema = optim.ModelEma(net, 0.5)
    before = net[4].weight.detach().clone()
    with torch.no_grad():
        net[4].weight.add_(1.0)
    ema.update_parameters(net)
    torch.testing.assert_close(ema.module[4].weight, before + 0.5)


def test_accuracy_counts_topk_hits():
    output = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 1])  # hit at 1, miss, hit at 2
    assert logs.accuracy(output, target, topk=(1, 2)).tolist() == [1, 2]


def test_atomic_save_leaves_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth.tar'
    checkpoint.atomic_save({'epoch': 1}, str(path))

    def broken_save(obj, f):
        f.write(b'half a checkpoint')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        checkpoint.atomic_save({'epoch': 2}, str(path))
    assert torch.load(path, weights_only=True) == {'epoch': 1}
    assert os.listdir(tmp_path) == ['last.pth.tar']


def test_atomic_save_writes_once_and_links_the_other_names_which_a_later_save_leaves_alone(tmp_path):
    last, best = str(tmp_path / 'last.pth.tar'), str(tmp_path / 'model_best.pth.tar')
    checkpoint.atomic_save({'epoch': 1}, last, links=[best])
    assert os.stat(last).st_ino == os.stat(best).st_ino and os.stat(last).st_nlink == 2
    checkpoint.atomic_save({'epoch': 2}, last)  # a new file renamed over last.pth.tar: best keeps its bytes
    assert torch.load(last, weights_only=True) == {'epoch': 2}
    assert torch.load(best, weights_only=True) == {'epoch': 1}
    assert os.stat(best).st_nlink == 1 and sorted(os.listdir(tmp_path)) == ['last.pth.tar', 'model_best.pth.tar']


def test_atomic_save_copies_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError(1, 'Operation not permitted')  # what FAT and some FUSE filesystems answer

    monkeypatch.setattr(os, 'link', no_links)
    last, best = str(tmp_path / 'last.pth.tar'), str(tmp_path / 'model_best.pth.tar')
    checkpoint.atomic_save({'epoch': 1}, last, links=[best])
    assert os.stat(last).st_ino != os.stat(best).st_ino
    assert torch.load(best, weights_only=True) == {'epoch': 1}
    assert sorted(os.listdir(tmp_path)) == ['last.pth.tar', 'model_best.pth.tar']


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_or_quota_while_saving_says_the_folder_the_bytes_needed_and_free(tmp_path, monkeypatch, code):
    """The OSError as torch's zip writer passes it on: a RuntimeError raised while handling it."""
    path = tmp_path / 'last.pth.tar'
    checkpoint.atomic_save({'epoch': 1}, str(path))
    save = torch.save

    def filling_save(obj, f):
        f.write(b'half a checkpoint')
        try:
            raise OSError(code, os.strerror(code))
        except OSError:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598') from None

    monkeypatch.setattr(torch, 'save', filling_save)
    asked = []
    monkeypatch.setattr(
        shutil,
        'disk_usage',
        lambda folder: asked.append(folder) or shutil._ntuple_diskusage(10**9, 10**9 - 1_234_567, 1_234_567),
    )
    with pytest.raises(errors.UsageError) as error:
        checkpoint.atomic_save({'epoch': 2, 'weights': torch.zeros(500_000)}, str(path))
    assert str(error.value) == (
        f'no space left in {tmp_path} for last.pth.tar: it needs about 2.0 MB, 1.2 MB are '
        f'free; free some space there or choose another --output'
    )
    assert asked == [str(tmp_path)]
    monkeypatch.setattr(torch, 'save', save)
    assert torch.load(path, weights_only=True) == {'epoch': 1}
    assert os.listdir(tmp_path) == ['last.pth.tar']


def test_the_per_epoch_schedule_as_a_torch_scheduler_steps_per_step_and_keeps_group_ratios():
    """optim.TimmSchedule: stepped after every optimizer step, the lr moves at epoch boundaries only, to
    learning_rate(epoch); a group created with another lr keeps its ratio (not overwritten)."""
    net = small_net()
    optimizer = torch.optim.SGD(
        [dict(params=net[0].parameters()), dict(params=net[4].parameters(), lr=0.007)], lr=0.014
    )
    scheduler = optim.TimmSchedule(optimizer, 3, 'step', 10, (4e-6, 2), (2.4, 0.97), 0.0)
    seen = []
    for _ in range(3 * 6):
        seen.append([group['lr'] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for step, (first, second) in enumerate(seen):
        expected = optim.learning_rate(step // 3, 'step', 0.014, 10, 4e-6, 2, 2.4, 0.97, 0.0)
        assert first == pytest.approx(expected, rel=1e-12) and second == pytest.approx(expected / 2, rel=1e-12)


def test_an_unknown_schedule_name_is_an_error_not_a_constant_lr():
    with pytest.raises(errors.UsageError, match="unknown schedule 'onecycle'"):
        optim.learning_rate(0, 'onecycle', 0.1, 10, 0.0, 0, 0, 0, 0)
    with pytest.raises(errors.UsageError):
        optim.TimmSchedule(torch.optim.SGD(small_net().parameters(), lr=0.1), 5, 'linear', 10, (0, 0), (0, 0), 0)


def test_learning_rate_is_constant_lr_after_warmup_for_const():
    assert optim.learning_rate(5, 'const', 0.1, 10, 0.0, 2, 0, 0, 0) == 0.1
    assert math.isclose(optim.learning_rate(1, 'const', 0.1, 10, 0.0, 2, 0, 0, 0), 0.05)


def fp16_step(precision, net, optimizer, loss_factor=1.0, clip_grad=None):
    optimizer.zero_grad()
    with precision.autocast():
        output = net(torch.randn(4, 3, 8, 8))
    loss = nn.functional.cross_entropy(output.float(), torch.randint(0, 5, (4,))) * loss_factor
    precision.backward(loss)
    return precision.step(optimizer, clip_grad)


def test_precision_fp16_skips_a_non_finite_step_halves_the_scale_and_saves_it():
    """Native float16 (the GradScaler also runs on the CPU): an infinite loss is skipped, weights
    untouched, the scale halves; state_dict/load_state_dict carry the scale into a new run."""
    net = small_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    precision = mixed_precision.Precision('cpu', torch.float16)
    skipped = fp16_step(precision, net, optimizer)
    assert isinstance(skipped, torch.Tensor) and skipped.device == torch.device('cpu')  # not read back: no sync
    assert not skipped
    before = copy.deepcopy(list(net.parameters()))
    assert fp16_step(precision, net, optimizer, loss_factor=float('inf'))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert precision.scaler.get_scale() == 2.0**15
    restored = mixed_precision.Precision('cpu', torch.float16)
    restored.load_state_dict(precision.state_dict())
    assert restored.scaler.get_scale() == 2.0**15
    restored.load_state_dict({})  # a checkpoint saved without fp16: the scale starts afresh
    assert restored.scaler.get_scale() == 2.0**15


def test_precision_clips_the_unscaled_gradients_under_fp16():
    net = small_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    precision = mixed_precision.Precision('cpu', torch.float16)
    assert not fp16_step(precision, net, optimizer, clip_grad=1e-3)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()]))
    assert norm == pytest.approx(1e-3, rel=1e-3)  # clipped once unscaled (scaled, it would end 65536x smaller)


def test_precision_without_mixed_precision_is_a_plain_backward_and_step():
    net, reference = small_net(), small_net()
    precision = mixed_precision.Precision('cpu')
    assert precision.state_dict() == {} and not precision.scaler.is_enabled()
    torch.manual_seed(3)
    fp16_step(precision, net, torch.optim.SGD(net.parameters(), lr=0.1))
    torch.manual_seed(3)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    nn.functional.cross_entropy(reference(torch.randn(4, 3, 8, 8)), torch.randint(0, 5, (4,))).backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), reference.parameters()))


def apex_stand_in(initial_scale=2.0**16):
    """apex.amp's loss scaling as apex/amp/handle.py does it (O1, dynamic scale): scale_loss yields loss * scale;
    as it exits, gradients with an inf or NaN halve the scale and turn the next optimizer.step() into a no-op,
    others are unscaled. -> the amp module."""
    scaler = types.SimpleNamespace(scale=initial_scale)
    scaler.loss_scale = lambda: scaler.scale

    @contextmanager
    def scale_loss(loss, optimizer):
        yield loss.float() * scaler.scale
        grads = [p.grad for group in optimizer.param_groups for p in group['params'] if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            for g in grads:
                g.div_(scaler.scale)
            return
        scaler.scale /= 2
        step = optimizer.step

        def skip_step():
            optimizer.step = step

        optimizer.step = skip_step

    amp = types.ModuleType('apex.amp')
    amp.scale_loss, amp._amp_state = scale_loss, types.SimpleNamespace(loss_scalers=[scaler])
    amp.state_dict = lambda: {'loss_scaler0': {'loss_scale': scaler.scale}}
    return amp


def test_apex_steps_skipped_for_overflow_never_count_as_non_finite_losses():
    """Six overflowing steps in a row, one more than run.py's limit: apex lowers its scale as scale_loss exits
    and skips each optimizer step; Precision.step reports each as skipped, so the run goes on with the weights
    untouched. Then a finite step trains and ends the streak."""
    net = small_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    precision = apex_amp.ApexPrecision(apex_stand_in(), optimizer, 'cpu')
    guard, state = run.NonFiniteGuard(torch.device('cpu')), run.TrainState()
    before = copy.deepcopy(list(net.parameters()))
    for step in range(run.NONFINITE_LIMIT + 1):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(torch.randn(4, 3, 8, 8)), torch.randint(0, 5, (4,))) * float('inf')
        precision.backward(loss)
        skipped = precision.step(optimizer)
        assert skipped is True, step
        guard.update(loss.detach(), skipped)
        assert guard.check(state) is True  # no error, and the untouched weights may be saved
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert precision.loss_scale() == 2.0**16 / 2 ** (run.NONFINITE_LIMIT + 1)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(net(torch.randn(4, 3, 8, 8)), torch.randint(0, 5, (4,)))
    precision.backward(loss)
    assert precision.step(optimizer) is False
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_the_non_finite_guard_counts_only_steps_not_skipped_whether_told_by_a_bool_or_a_device_tensor():
    """fp16's GradScaler answers with a bool tensor on the device (no sync), apex with a bool."""
    guard, state, inf = run.NonFiniteGuard(torch.device('cpu')), run.TrainState(), torch.tensor(float('inf'))
    for skipped in [torch.tensor(True), True] * run.NONFINITE_LIMIT:
        guard.update(inf, skipped)
    assert guard.check(state) is True
    for skipped in [torch.tensor(False), False] * (run.NONFINITE_LIMIT // 2) + [False]:
        guard.update(inf, skipped)
    with pytest.raises(FloatingPointError, match='not finite for 5 consecutive steps'):
        guard.check(state)
