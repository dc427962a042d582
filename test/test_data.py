"""data.py, transforms.py and randaugment.py as a specification: what the datasets, the sampler, the transforms,
RandAugment and the batch augmentations promise.

timm (test-only) is the oracle for RandAugment's ops and spec grammar, the transforms and the Mixup targets.
Run: .venv/bin/python -m pytest test/test_data.py -q
"""

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import model  # noqa: E402
import randaugment  # noqa: E402
import random_erasing  # noqa: E402
import transforms  # noqa: E402
from data import DataError  # noqa: E402

timm_aa = pytest.importorskip('timm.data.auto_augment')

# torchvision 0.29 deprecates its decoders and warns on every call; data.py silences that, pytest re-enables it.
pytestmark = pytest.mark.filterwarnings('ignore:The image decoding and encoding capabilities:DeprecationWarning')


def natural_image(height=48, width=64, seed=0):
    """A uint8 HWC image with smooth gradients, edges and noise (a spread-out histogram, like a photo)."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + 1) * np.cos(4 * y), x * y, np.cos(9 * x * y + 2)], axis=-1)
    base[height // 3 : height // 2, width // 4 : width // 2] += 0.7  # a sharp-edged block
    pixels = (base - base.min()) / (base.max() - base.min()) * 230 + rng.normal(0, 8, base.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def to_tensor(pixels):
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()


def to_numpy(image):
    return image.permute(1, 2, 0).numpy().astype(int)


def steps(transform, kind):
    """The steps of a v2.Compose that are of this kind."""
    return [step for step in transform.transforms if isinstance(step, kind)]


# ------------------------------------------------------------------------------------------------------------------
# RandAugment: spec grammar and op semantics, against timm
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'spec, expected',
    [
        ('rand-m9-mstd0.5', dict(magnitude=9, num_ops=2, magnitude_std=0.5, increasing=False)),
        ('rand-m9-mstd0.5-inc1', dict(magnitude=9, num_ops=2, magnitude_std=0.5, increasing=True)),
        ('rand-n3-m7', dict(magnitude=7, num_ops=3, magnitude_std=0.0, increasing=False)),
        ('rand-mstd1', dict(magnitude=10, num_ops=2, magnitude_std=1.0, increasing=False)),
        ('rand', dict(magnitude=10, num_ops=2, magnitude_std=0.0, increasing=False, magnitude_max=10, prob=0.5)),
        ('rand-m15-mmax20-p0.7', dict(magnitude=15, magnitude_max=20, prob=0.7)),
        ('rand-m9-mstd101', dict(magnitude_std=float('inf'))),
    ],
)
def test_parse_rand_augment_reads_timm_specs_with_timm_defaults(spec, expected):
    options = randaugment.parse_rand_augment(spec)
    for key, value in expected.items():
        assert options[key] == value, key
    timm_transform = timm_aa.rand_augment_transform(spec, {})
    assert options['num_ops'] == timm_transform.num_layers
    assert options['magnitude'] == timm_transform.ops[0].magnitude
    assert options['magnitude_std'] == timm_transform.ops[0].magnitude_std
    assert options['prob'] == timm_transform.ops[0].prob
    assert options['magnitude_max'] == (timm_transform.ops[0].magnitude_max or 10)
    assert [op.name for op in timm_transform.ops] == list(
        randaugment.RAND_AUGMENT_INCREASING_OPS if options['increasing'] else randaugment.RAND_AUGMENT_OPS
    )


@pytest.mark.parametrize(
    'spec, bad_part',
    [
        ('rnd-m9', 'rnd-m9'),
        ('rand-x9', 'x9'),
        ('rand-m', "'m'"),
        ('rand-mabc', 'mabc'),
        ('rand-n2.5', 'n2.5'),
        ('rand-inc2', 'inc2'),
        ('rand-m9-', "''"),
        ('rand-tweights', 'tweights'),
        ('rand-mnan', 'mnan'),
    ],
)
def test_parse_rand_augment_rejects_bad_specs_with_a_one_line_error(spec, bad_part):
    with pytest.raises(DataError) as error:
        randaugment.parse_rand_augment(spec)
    message = str(error.value)
    assert '\n' not in message and bad_part in message and 'rand-m9-mstd0.5' in message


def test_rand_augment_op_lists_are_timms():
    assert list(randaugment.RAND_AUGMENT_OPS) == timm_aa._RAND_TRANSFORMS
    assert list(randaugment.RAND_AUGMENT_INCREASING_OPS) == timm_aa._RAND_INCREASING_TRANSFORMS


def timm_level_args(name, level, sign, monkeypatch):
    """timm's level -> args with its random sign fixed (it negates when random.random() > 0.5)."""
    monkeypatch.setattr(timm_aa.random, 'random', lambda: 0.9 if sign < 0 else 0.1)
    level_to_arg = timm_aa.LEVEL_TO_ARG[name]
    return tuple(level_to_arg(level, {})) if level_to_arg else ()


ALL_OP_NAMES = sorted(set(randaugment.RAND_AUGMENT_OPS + randaugment.RAND_AUGMENT_INCREASING_OPS))


@pytest.mark.parametrize('name', ALL_OP_NAMES)
def test_rand_augment_level_to_args_match_timm(name, monkeypatch):
    for level in (0, 2.4, 5, 7.3, 9, 10):
        for sign in (1, -1):
            assert randaugment.LEVEL_TO_ARGS[name](level, sign) == timm_level_args(name, level, sign, monkeypatch)


GEOMETRIC_CASES = [
    (name, interpolation)
    for name in ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
    for interpolation in ('bicubic', 'bilinear')
]
COLOUR_CASES = [(name, 'bicubic') for name in ALL_OP_NAMES if name not in dict(GEOMETRIC_CASES)]


@pytest.mark.parametrize('name, interpolation', COLOUR_CASES + GEOMETRIC_CASES)
def test_rand_augment_ops_on_tensors_equal_timms_pil_ops(name, interpolation, monkeypatch):
    """Each op at a fixed level and sign, on a uint8 tensor, against timm's op on the same PIL image: colour ops
    bit-exact; geometric ops (PIL's truncating resampler redone in float32) off by at most 1 on < 3% of values."""
    pixels = natural_image()
    fill = (124, 116, 104)
    resample = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR}[interpolation]
    rand_augment = randaugment.RandAugment(fill=fill, interpolation=interpolation)
    for level, sign in ((7.3, 1), (7.3, -1), (3, 1)):
        args = timm_level_args(name, level, sign, monkeypatch)
        expected = np.asarray(
            timm_aa.NAME_TO_OP[name](Image.fromarray(pixels), *args, fillcolor=fill, resample=resample)
        ).astype(int)
        ours = to_numpy(rand_augment.apply(name, to_tensor(pixels), level, sign))
        difference = np.abs(ours - expected)
        assert difference.max() <= (1 if (name, interpolation) in GEOMETRIC_CASES else 0), (level, sign)
        assert (difference > 0).mean() < 0.03, (level, sign)


def test_rand_augment_draws_ops_with_replacement_each_applied_with_prob_half(monkeypatch):
    """timm: num_ops ops chosen with replacement, each applied with p 0.5 at level ~ N(m, mstd) clipped to 0..10."""
    applied = []
    monkeypatch.setattr(
        randaugment.RandAugment,
        'apply',
        lambda self, name, image, level, sign: applied[-1].append((name, level, sign)) or image,
    )
    rand_augment = randaugment.RandAugment(**randaugment.parse_rand_augment('rand-m9-mstd0.5'))
    torch.manual_seed(0)
    for _ in range(3000):
        applied.append([])
        rand_augment(torch.zeros(3, 4, 4, dtype=torch.uint8))
    counts = np.bincount([len(ops) for ops in applied], minlength=3)
    assert np.allclose(counts / 3000, [0.25, 0.5, 0.25], atol=0.03)
    assert any(len(ops) == 2 and ops[0][0] == ops[1][0] for ops in applied)  # with replacement
    names, levels, signs = zip(*[op for ops in applied for op in ops])
    assert set(names) == set(randaugment.RAND_AUGMENT_OPS)
    assert abs(np.mean(levels) - 9) < 0.05 and abs(np.std(levels) - 0.5) < 0.05 and max(levels) <= 10
    assert abs(np.mean(signs)) < 0.1
    rand_augment.magnitude = 5  # progressive learning changes it between stages
    applied.clear()
    for _ in range(300):
        applied.append([])
        rand_augment(torch.zeros(3, 4, 4, dtype=torch.uint8))
    assert abs(np.mean([level for ops in applied for _, level, _ in ops]) - 5) < 0.15


# ------------------------------------------------------------------------------------------------------------------
# Per-image transforms and seeding
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('height, width', [(48, 64), (8, 8), (300, 17)])
def test_train_transform_gives_uint8_images_of_the_requested_size_even_from_tiny_images(height, width):
    transform = transforms.train_transform(32, aa='rand-m9-mstd0.5-n4')
    image = to_tensor(natural_image(height, width))
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    out = transforms.eval_transform(32, crop_pct=0.875)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_rand_augment_fills_with_the_given_mean_like_timm_and_with_timms_grey_by_default():
    from timm.data import create_transform

    (timm_rand_augment,) = [
        t
        for t in create_transform(32, is_training=True, auto_augment='rand-m9').transforms
        if type(t).__name__ == 'RandAugment'
    ]  # mean: ImageNet's, timm's default
    (ours,) = steps(transforms.train_transform(32, aa='rand-m9', mean=model.IMAGENET_MEAN), randaugment.RandAugment)
    assert ours.fill == timm_rand_augment.ops[0].hparams['img_mean'] == (124, 116, 104)
    (grey,) = steps(transforms.train_transform(32, aa='rand-m9'), randaugment.RandAugment)
    assert grey.fill == timm_aa._HPARAMS_DEFAULT['img_mean']


def test_progressive_learning_gives_each_stage_its_size_and_rand_augment_magnitude():
    image = to_tensor(natural_image())
    first, last = (
        transforms.train_transform(24, aa='rand-m5-mstd0.5'),
        transforms.train_transform(40, aa='rand-m5-mstd0.5', magnitude=10),
    )
    assert first(image).shape == (3, 24, 24) and last(image).shape == (3, 40, 40)
    (first_augment,), (last_augment,) = (steps(transform, randaugment.RandAugment) for transform in (first, last))
    assert first_augment.magnitude == 5 and last_augment.magnitude_std == 0.5 and last_augment.sample_level() > 8
    with pytest.raises(DataError, match='interpolation'):
        transforms.train_transform(24, interpolation='random')


def test_train_transform_without_augmentation_matches_timm_resize():
    """Full-image crop, no flip: our uint8 tensor resize agrees with timm's PIL bicubic resize."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    pixels = natural_image(64, 64)
    ours = transforms.train_transform(40, scale=(1, 1), ratio=(1, 1), hflip=0)(to_tensor(pixels))
    timm_crop = RandomResizedCropAndInterpolation(40, scale=(1, 1), ratio=(1, 1), interpolation='bicubic')
    expected = np.asarray(timm_crop(Image.fromarray(pixels))).astype(int)
    assert np.abs(to_numpy(ours) - expected).mean() < 1.0


def test_train_transform_is_a_v2_compose_where_hflip_0_draws_no_flip():
    """One line adds a v2 transform; the demo's --hflip 0 keeps the random stream of the crop alone."""
    names = [type(step).__name__ for step in transforms.train_transform(32, aa='rand-m9').transforms]
    assert names == ['RandomResizedCrop', 'RandomHorizontalFlip', 'RandAugment']
    image, crop = (
        to_tensor(natural_image()),
        v2.RandomResizedCrop(32, (0.5, 1), antialias=True, interpolation=v2.InterpolationMode.BICUBIC),
    )
    for seed in range(5):
        torch.manual_seed(seed)
        ours, after_ours = transforms.train_transform(32, scale=(0.5, 1), hflip=0)(image), torch.rand(())
        torch.manual_seed(seed)
        assert torch.equal(ours, crop(image)) and torch.equal(after_ours, torch.rand(()))


def test_colour_jitter_is_timms_and_only_without_rand_augment():
    """timm 0.5.4 adds ColorJitter(c, c, c) to training when there is no --aa; the same factors here."""
    from timm.data import create_transform

    (timm_jitter,) = [
        t
        for t in create_transform(32, is_training=True, color_jitter=0.4).transforms
        if type(t).__name__ == 'ColorJitter'
    ]
    (ours,) = steps(transforms.train_transform(32, color_jitter=0.4), v2.ColorJitter)
    for factor in ('brightness', 'contrast', 'saturation', 'hue'):
        assert getattr(ours, factor) == getattr(timm_jitter, factor)
    assert not steps(transforms.train_transform(32, color_jitter=0.4, aa='rand-m9'), v2.ColorJitter)
    assert not steps(transforms.train_transform(32), v2.ColorJitter)
    image = to_tensor(natural_image(48, 48))
    torch.manual_seed(0)
    jittered = transforms.train_transform(32, scale=(1, 1), ratio=(1, 1), hflip=0, color_jitter=0.4)(image)
    torch.manual_seed(0)
    plain = transforms.train_transform(32, scale=(1, 1), ratio=(1, 1), hflip=0)(image)
    assert jittered.dtype == torch.uint8 and not torch.equal(jittered, plain)


def test_eval_transform_resizes_the_shorter_side_then_centre_crops_like_timm():
    from timm.data import create_transform

    pixels = natural_image(60, 90)
    ours = transforms.eval_transform(32, crop_pct=0.875)(to_tensor(pixels))  # shorter side -> floor(32 / 0.875) = 36
    timm_eval = create_transform(
        32, is_training=False, crop_pct=0.875, interpolation='bicubic', use_prefetcher=True
    )  # uint8 output, no normalisation
    expected = np.asarray(timm_eval(Image.fromarray(pixels))).transpose(1, 2, 0).astype(int)
    assert ours.shape == (3, 32, 32)
    assert np.abs(to_numpy(ours) - expected).mean() < 1.5


@pytest.fixture(scope='module')
def digits():
    return data.load_datasets('digits')


def test_an_items_augmentation_is_a_pure_function_of_index_and_seed(digits):
    train_set = data.Transformed(digits[0], transforms.train_transform(32, aa='rand-m9-mstd0.5', mean=(0.5, 0.5, 0.5)))
    rng_state = torch.get_rng_state()
    first, again, other_seed = train_set[(5, 123)], train_set[(5, 123)], train_set[(5, 124)]
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other_seed[0])
    assert first[1:] == (int(digits[0][5][1]), 0)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is untouched
    assert torch.equal(train_set[5][0], train_set[(5, 0)][0])  # a plain index means seed 0


def test_loader_batches_are_identical_with_0_and_2_workers_and_leave_the_global_rng_alone(digits):
    train_set = data.Transformed(digits[0], transforms.train_transform(32, aa='rand-m9-mstd0.5', mean=(0.5, 0.5, 0.5)))
    sampler = data.EpochBatchSampler(len(train_set), 16, shuffle=True, drop_last=True, seed=3)
    sampler.set_epoch(2, start_batch=len(sampler) - 4)
    rng_state = torch.get_rng_state()
    in_process = list(data.create_loader(train_set, sampler, workers=0))
    assert torch.equal(torch.get_rng_state(), rng_state)
    with_workers = list(data.create_loader(train_set, sampler, workers=2))
    assert len(in_process) == 4
    for (images, labels, bad_counts), (images2, labels2, _) in zip(in_process, with_workers):
        assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, images2) and torch.equal(labels, labels2) and bad_counts.sum() == 0


# ------------------------------------------------------------------------------------------------------------------
# EpochBatchSampler
# ------------------------------------------------------------------------------------------------------------------


def batches(dataset_len, batch_size, epoch=0, start_batch=0, **kwargs):
    kwargs = dict(dict(shuffle=True, drop_last=True, seed=7), **kwargs)
    sampler = data.EpochBatchSampler(dataset_len, batch_size, **kwargs)
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


def test_sampler_is_a_pure_function_of_seed_and_epoch():
    assert batches(50, 8, epoch=1) == batches(50, 8, epoch=1)
    assert batches(50, 8, epoch=1) != batches(50, 8, epoch=2)
    assert batches(50, 8, epoch=1) != batches(50, 8, epoch=1, seed=8)
    epoch = batches(50, 8, epoch=1)
    assert len(epoch) == 6 and all(len(batch) == 8 for batch in epoch)
    assert len({index for batch in epoch for index, _ in batch}) == 48  # a permutation, the last 2 dropped
    seeds = [seed for batch in epoch for _, seed in batch]
    assert len(set(seeds)) == 48 and all(0 <= seed < 2**63 for seed in seeds)


def test_start_batch_skips_exactly_the_first_batches_and_len_still_counts_the_whole_epoch():
    sampler = data.EpochBatchSampler(50, 8, shuffle=True, drop_last=True, seed=7)
    sampler.set_epoch(3, start_batch=4)
    assert list(sampler) == batches(50, 8, epoch=3)[4:] and len(sampler) == 6


@pytest.mark.parametrize('world_size, dataset_len', [(2, 37), (2, 64), (3, 50), (4, 103)])
def test_the_ranks_kth_batches_together_are_the_single_process_kth_batch(world_size, dataset_len):
    single = batches(dataset_len, 4 * world_size, epoch=5)
    per_rank = [batches(dataset_len, 4, epoch=5, rank=rank, world_size=world_size) for rank in range(world_size)]
    assert len({len(rank_batches) for rank_batches in per_rank}) == 1  # ranks step in lockstep
    for k, single_batch in enumerate(single):
        union = [pair for rank_batches in per_rank for pair in rank_batches[k]]
        assert sorted(union) == sorted(single_batch)  # same images and the same augmentation seeds


@pytest.mark.parametrize('world_size', [1, 2, 3, 4])
@pytest.mark.parametrize('dataset_len', [1, 7, 10, 13])
def test_validation_sharding_counts_every_image_exactly_once(world_size, dataset_len):
    seen = []
    for rank in range(world_size):
        sampler = data.EpochBatchSampler(
            dataset_len, 3, shuffle=False, drop_last=False, rank=rank, world_size=world_size
        )
        rank_batches = list(sampler)
        assert len(rank_batches) == len(sampler)
        seen += [index for batch in rank_batches for index, _ in batch]
    assert sorted(seen) == list(range(dataset_len))


# ------------------------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------------------------


def save_image(path, seed, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(natural_image(size[1], size[0], seed)).save(path)


@pytest.fixture
def image_tree(tmp_path):
    """DATA/{train,val}/{cat,dog}: JPEG, PNG, .jpeg, upper-case extensions, a nested folder, a non-image file."""
    save_image(tmp_path / 'train/cat/a.jpg', 0)
    save_image(tmp_path / 'train/cat/b.JPG', 1)
    save_image(tmp_path / 'train/cat/c.png', 2)
    save_image(tmp_path / 'train/dog/d.jpeg', 3)
    save_image(tmp_path / 'train/dog/nested/e.PNG', 4)
    (tmp_path / 'train/dog/notes.txt').write_text('not an image, and not named like one')
    save_image(tmp_path / 'val/cat/f.jpg', 5)
    save_image(tmp_path / 'val/dog/g.png', 6)
    return tmp_path


def test_folder_dataset_reads_the_imagefolder_layout(image_tree):
    train_set, val_set, classes = data.load_datasets('folder', str(image_tree))
    assert classes == ['cat', 'dog'] and len(train_set) == 5 and len(val_set) == 2
    assert train_set.labels.tolist() == [0, 0, 0, 1, 1]
    assert train_set.path(4) == str(image_tree / 'train/dog/nested/e.PNG')
    assert train_set.paths.dtype.kind == 'S' and train_set.labels.dtype == np.int32  # no Python objects per file
    image, label, bad_count = train_set[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40) and (label, bad_count) == (1, 0)
    assert np.abs(to_numpy(train_set[2][0]) - natural_image(30, 40, 2)).max() == 0  # PNG is lossless
    assert data.Transformed(val_set, transforms.eval_transform(24))[(1, 99)][0].shape == (3, 24, 24)


def test_the_held_out_folder_is_the_first_of_validation_val_valid_test_unless_val_split_names_one(image_tree):
    os.rename(image_tree / 'val', image_tree / 'valid')
    shutil.copytree(image_tree / 'valid', image_tree / 'test')
    save_image(image_tree / 'test/dog/extra.jpg', 7)
    train_set, val_set, _ = data.load_datasets('folder', str(image_tree))
    assert len(val_set) == 2 and val_set.source == 'folders train/ and valid/'
    train_set, val_set, _ = data.load_datasets('folder', str(image_tree), splits=('valid', 'test/'))
    assert (len(train_set), len(val_set)) == (2, 3) and val_set.source == 'folders valid/ and test/'


def one_line_error(*args, **kwargs):
    with pytest.raises(DataError) as error:
        data.load_datasets(*args, **kwargs)
    message = str(error.value)
    assert '\n' not in message
    return message


def test_folder_problems_raise_one_line_data_errors_saying_what_to_fix(image_tree, tmp_path):
    assert 'nowhere' in one_line_error('folder', str(tmp_path / 'nowhere'))
    assert 'needs a data path' in one_line_error('folder', None)
    assert 'unknown dataset' in one_line_error('imagenet', str(image_tree))
    (image_tree / 'val/dog/g.png').rename(image_tree / 'g.png')
    assert 'val/dog has no images' in one_line_error('folder', str(image_tree))
    (image_tree / 'val/bird').mkdir()
    save_image(image_tree / 'val/bird/h.jpg', 7)
    (image_tree / 'g.png').rename(image_tree / 'val/dog/g.png')
    assert "only in val: ['bird']" in one_line_error('folder', str(image_tree))
    os.rename(image_tree / 'val', image_tree / 'held_out')
    assert (
        'no held-out folder (validation/, val/, valid/, test/); its folders: held_out/, train/; name the one '
        'to use with --val-split' in one_line_error('folder', str(image_tree))
    )
    assert 'no heldout/ folder' in one_line_error('folder', str(image_tree), splits=(None, 'heldout'))
    assert 'no training/ folder' in one_line_error('folder', str(image_tree), splits=('training', 'held_out'))
    (tmp_path / 'empty/train').mkdir(parents=True)
    (tmp_path / 'empty/val').mkdir()
    assert 'has no class folders' in one_line_error('folder', str(tmp_path / 'empty'))


def test_missing_cifar_files_raise_a_data_error(tmp_path):
    assert 'cifar-10-batches-py' in one_line_error('cifar10', str(tmp_path))
    assert 'CIFAR100' in one_line_error('cifar100', str(tmp_path))


def test_cifar_arrays_become_uint8_chw_images(tmp_path, monkeypatch):
    import torchvision.datasets

    class FakeCIFAR10(torch.utils.data.Dataset):  # torchvision's CIFAR10 without its files
        def __init__(self, root, train, download):
            assert root == str(tmp_path) and not download
            count = 5 if train else 3
            self.data = np.arange(count * 32 * 32 * 3, dtype=np.int64).reshape(count, 32, 32, 3).astype(np.uint8)
            self.targets, self.classes = list(range(count)), ['airplane', 'automobile', 'bird', 'cat', 'deer']

        def __len__(self):
            return len(self.data)

        def __getitem__(self, index):  # torchvision's: a PIL image of the HWC array
            return Image.fromarray(self.data[index]), self.targets[index]

    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', FakeCIFAR10)
    train_set, val_set, classes = data.load_datasets('cifar10', str(tmp_path))
    assert (len(train_set), len(val_set), classes[1]) == (5, 3, 'automobile')
    image, label, bad_count = data.Transformed(train_set)[4]  # torchvision's PIL images, as the loop loads them
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and (label, bad_count) == (4, 0)
    assert np.array_equal(to_numpy(image), FakeCIFAR10(str(tmp_path), True, False).data[4])


@pytest.fixture
def tree_with_corrupt_files(image_tree):
    cat = image_tree / 'train/cat'
    (cat / 'empty.jpg').write_bytes(b'')
    (cat / 'text.jpg').write_text('this is a text file with a .jpg name')
    save_image(cat / 'whole.jpg', 8, size=(64, 64))
    whole = (cat / 'whole.jpg').read_bytes()
    (cat / 'whole.jpg').unlink()
    (cat / 'truncated.jpg').write_bytes(whole[: len(whole) // 2])
    return image_tree  # train/cat sorted: a b c empty text truncated; then dog: d e


def test_corrupt_files_are_skipped_with_one_warning_each_and_counted(tree_with_corrupt_files, capsys):
    train_set, _, _ = data.load_datasets('folder', str(tree_with_corrupt_files))
    assert [Path(train_set.path(i)).name for i in range(3, 6)] == ['empty.jpg', 'text.jpg', 'truncated.jpg']
    for _ in range(2):
        for index in (3, 4, 5):  # each is replaced by the next readable image: d.jpeg, index 6
            image, label, bad_count = train_set[index]
            assert torch.equal(image, train_set[6][0]) and (label, bad_count) == (1, 1)
    warnings = capsys.readouterr().err.splitlines()  # one per file, though each was met four times
    cat = tree_with_corrupt_files / 'train' / 'cat'
    warned = sorted(line[: line.index('.jpg: ') + 4] for line in warnings)  # the line goes on with the reason
    assert warned == [
        f'warning: skipping unreadable image {cat / name}' for name in ('empty.jpg', 'text.jpg', 'truncated.jpg')
    ]
    sampler = data.EpochBatchSampler(len(train_set), 8, shuffle=False, drop_last=False)
    loader = data.create_loader(data.Transformed(train_set), sampler, workers=0)
    assert next(iter(loader))[2].sum() == 3  # the training loop sums and reports these


def test_strict_data_raises_a_data_error_naming_the_unreadable_file(tree_with_corrupt_files):
    train_set, _, _ = data.load_datasets('folder', str(tree_with_corrupt_files), strict_data=True)
    with pytest.raises(DataError, match='truncated.jpg') as error:
        train_set[5]
    assert '\n' not in str(error.value)


def test_digits_are_1797_images_in_a_fixed_stratified_split(digits):
    train_set, val_set, classes = digits
    assert classes == [str(d) for d in range(10)] and len(train_set) + len(val_set) == 1797
    images, labels = train_set.tensors
    val_labels = val_set.tensors[1].tolist()
    assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.uint8
    assert images.max() == 255 and torch.equal(images[:, 0], images[:, 2])
    for label in range(10):
        in_train, in_val = labels.tolist().count(label), val_labels.count(label)
        assert abs(in_val / (in_train + in_val) - 0.2) < 0.01
    train_again, val_again, _ = data.load_datasets('digits')
    assert torch.equal(train_again.tensors[0], images) and val_again.tensors[1].tolist() == val_labels
    from sklearn.datasets import load_digits

    everything = load_digits()
    expected = np.column_stack([np.rint(everything.images.reshape(1797, -1) * (255 / 16)), everything.target])

    def rows(dataset):  # (64 grey pixels, label) per image
        images, labels = dataset.tensors
        return torch.cat([images[:, 0].flatten(1).long(), labels[:, None].long()], dim=1).tolist()

    assert sorted(rows(train_set) + rows(val_set)) == sorted(expected.astype(int).tolist())  # disjoint and complete


def test_synthetic_images_skip_augmentation_but_take_the_transform_size():
    train_set, val_set, classes = data.load_datasets('synthetic', synthetic_size=16, num_classes=10)
    assert (len(train_set), len(val_set), len(classes)) == (1281167, 1280, 10) and classes[3] == 'class_3'
    image, label, bad_count = train_set[(70, 5)]
    assert image.shape == (3, 16, 16) and (label, bad_count) == (0, 0)
    assert torch.equal(image, train_set[6][0])  # a pool of 64, indexed modulo
    loaded = data.transformed(train_set, transforms.train_transform(24, aa='rand-m9'))
    assert loaded[(70, 5)][0].shape == (3, 24, 24) and torch.equal(loaded[(70, 5)][0], loaded[6][0])
    assert data.transformed(val_set, transforms.eval_transform(20, crop_pct=0.875))[3][0].shape == (3, 20, 20)
    assert len(loaded) == len(train_set) and loaded[(70, 5)][1:] == (0, 0)


class PilImages(torch.utils.data.Dataset):
    """A user's dataset as torchvision's tutorials write them: (PIL image, label), images of any mode and size."""

    def __init__(self, modes=('RGB', 'L', 'RGBA', 'P')):
        self.images = [Image.fromarray(natural_image(30 + i, 40, seed=i)).convert(mode) for i, mode in enumerate(modes)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index % 3


def test_any_dataset_of_pil_images_or_uint8_tensors_loads_as_uint8_rgb_with_seeded_transforms():
    import torchvision

    transform = transforms.train_transform(24, aa='rand-m9-mstd0.5')
    for dataset in (
        PilImages(),
        torchvision.datasets.FakeData(size=6, image_size=(3, 28, 36), num_classes=4),
        torch.utils.data.TensorDataset(torch.randint(0, 256, (4, 1, 20, 20), dtype=torch.uint8), torch.arange(4)),
    ):
        loaded = data.Transformed(dataset, transform)
        image, label, bad_count = loaded[(2, 77)]
        assert image.shape == (3, 24, 24) and image.dtype == torch.uint8 and bad_count == 0
        assert label == int(dataset[2][1]) and torch.equal(loaded[(2, 77)][0], image)  # the item's seed decides
        batch = next(iter(data.create_loader(loaded, [[(0, 1), (1, 2)]], workers=0)))
        assert batch[0].shape == (2, 3, 24, 24) and batch[1].dtype == torch.int64
    grey = data.Transformed(PilImages(modes=('L',)))[0][0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])  # grey converts to equal channels


def test_hugging_face_rows_load_by_their_image_and_label_columns_and_others_say_what_to_rename():
    import hugging_face

    rows = [dict(image=Image.fromarray(natural_image(20, 20, seed=1)), label=1)]
    image, label, _ = data.Transformed(hugging_face.Rows(rows))[0]
    assert image.shape == (3, 20, 20) and label == 1
    with pytest.raises(DataError, match='rename_columns') as error:
        data.Transformed(hugging_face.Rows([dict(img=rows[0]['image'], label=1)]))[0]
    assert "'image' and 'label'" in str(error.value)


def test_numpy_images_as_opencv_and_albumentations_give_them_load_like_pil_images():
    pixels = natural_image(20, 24, seed=3)  # (H, W, 3) uint8
    image, label, _ = data.Transformed([(pixels, 2)])[0]
    assert image.shape == (3, 20, 24) and label == 2 and torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))
    for grey in (pixels[:, :, 0], pixels[:, :, :1], pixels[:, ::2, 0]):  # (H, W), (H, W, 1), not contiguous
        image = data.Transformed([(grey, 0)])[0][0]
        assert torch.equal(image[0], torch.from_numpy(np.ascontiguousarray(grey.reshape(20, -1))))
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    seeded = data.Transformed([(pixels, 0)], transforms.train_transform(16, aa='rand-m9'))
    assert torch.equal(seeded[(0, 5)][0], data.Transformed([(Image.fromarray(pixels), 0)], seeded.transform)[(0, 5)][0])


def test_images_of_other_types_raise_a_one_line_data_error_naming_what_was_given_and_the_conversion():
    for image, given in (
        (torch.zeros(3, 8, 8), 'torch.float32 Tensor of shape (3, 8, 8)'),
        (np.zeros((8, 8, 3), np.float32), 'float32 ndarray of shape (8, 8, 3)'),
        (np.zeros((3, 8, 8), np.uint8), 'uint8 ndarray of shape (3, 8, 8)'),
    ):
        with pytest.raises(DataError, match='PIL images, uint8') as error:
            data.Transformed([(image, 0)])[0]
        assert given in str(error.value) and '\n' not in str(error.value)
        assert 'ToTensor() makes floats: use PILToTensor()' in str(error.value)


# ------------------------------------------------------------------------------------------------------------------
# Per-batch augmentation on the device
# ------------------------------------------------------------------------------------------------------------------


def test_normalize_is_timms_prefetcher_normalisation_in_either_memory_format():
    images = torch.randint(0, 256, (2, 3, 5, 6), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(model.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        model.IMAGENET_STD
    ).view(1, 3, 1, 1)
    for channels_last in (False, True):
        out = transforms.normalize(images, model.IMAGENET_MEAN, model.IMAGENET_STD, channels_last=channels_last)
        assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_random_erase_with_prob_zero_leaves_the_batch_alone():
    images = torch.randn(4, 3, 16, 16)
    assert random_erasing.random_erase(images, 0.0) is images


def test_random_erase_with_prob_one_replaces_exactly_one_rectangle_per_sample():
    torch.manual_seed(0)
    images = torch.full((64, 3, 32, 40), 7.0)
    erased = random_erasing.random_erase(images, 1.0)
    for sample in erased != images:
        changed = sample.all(dim=0)
        assert torch.equal(changed, sample.any(dim=0))  # all channels
        rows, columns = changed.nonzero(as_tuple=True)
        box = changed[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
        assert box.all() and box.sum() == changed.sum()  # one filled rectangle
        assert 0.015 <= changed.float().mean() <= 0.35  # timm: 2% .. 1/3 of the image
    assert abs(float(erased[erased != 7.0].std()) - 1.0) < 0.05  # normal noise


def mixed_lambda(mixed, first, second):
    """The lam of mixed = lam * first + (1 - lam) * second."""
    return float(((mixed - second) / (first - second)).median())


def test_mixup_mixes_each_image_with_its_neighbour_and_folds_smoothing_into_timms_targets():
    from timm.data.mixup import mixup_target

    torch.manual_seed(1)
    mix = transforms.MixupCutmix(mixup=0.8, cutmix=0.0, smoothing=0.1, num_classes=5)
    images, labels = torch.rand(2, 3, 8, 8) + 1, torch.tensor([1, 3])
    mixed, targets = mix(images.clone(), labels)
    lam = mixed_lambda(mixed[0], images[0], images[1])
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-5)
    # With two images, rolling by one is timm's flip, so the targets must be timm's exactly.
    assert torch.allclose(targets, mixup_target(labels, 5, lam=lam, smoothing=0.1), atol=1e-5)
    assert torch.allclose(targets.sum(dim=1), torch.ones(2))


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    torch.manual_seed(2)
    mix = transforms.MixupCutmix(mixup=0.0, cutmix=1.0, smoothing=0.0, num_classes=4)
    images, labels = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)]), torch.tensor([0, 2])
    mixed, targets = mix(images.clone(), labels)
    pasted = float(mixed[0].mean())  # fraction of image 0 covered by image 1
    assert torch.allclose(targets[0], torch.tensor([1 - pasted, 0, pasted, 0]))
    assert torch.allclose(targets.sum(dim=1), torch.ones(2))


def test_mixup_cutmix_is_none_when_both_are_off_and_picks_one_per_batch_when_both_are_on():
    """Both off means no mixer at all, never a mixer that silently does nothing."""
    for mixup, cutmix in ((0, 0), (0.0, -1.0)):
        assert transforms.mixup_cutmix(mixup, cutmix, 0.1, 10) is None
    torch.manual_seed(3)
    mix = transforms.mixup_cutmix(0.2, 1.0, 0.0, 10)
    images, labels = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]), torch.tensor([0, 1])
    kinds = set()
    for _ in range(20):
        mixed = mix(images.clone(), labels)[0][0]
        kinds.add('cutmix' if set(mixed.unique().tolist()) <= {0.0, 1.0} else 'mixup')
    assert kinds == {'mixup', 'cutmix'}
