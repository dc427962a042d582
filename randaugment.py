"""timm's RandAugment on uint8 (3, H, W) tensors: its policy, spec grammar and 15 ops, giving timm 0.5.4's PIL
results (the Ascend ModelZoo recipe's `--aa rand-m9-mstd0.5`). transforms.train_transform uses it.

    rand_augment = RandAugment(**parse_rand_augment('rand-m9-mstd0.5'), fill=(124, 116, 104))
    image = rand_augment(image)              # randomness from torch's global RNG (data.py seeds it per image)
    image = rand_augment.apply('ShearX', image, level=9, sign=1)   # one op, no randomness

test/test_data.py checks the policy against timm's and each op against PIL's (colour ops bit-exact, geometric
within 1). An op is torchvision's v2 op where exact and no slower, else PIL's or a kernel here, each commented
with why it is kept (times: docs/measurements.md, RandAugment's ops).
"""

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms.functional import InterpolationMode, pil_modes_mapping

from errors import DataError

RAND_AUGMENT_OPS = tuple(
    'AutoContrast Equalize Invert Rotate Posterize Solarize SolarizeAdd Color Contrast Brightness Sharpness '
    'ShearX ShearY TranslateXRel TranslateYRel'.split()
)
_ENHANCE_OPS = ('Color', 'Contrast', 'Brightness', 'Sharpness')
_GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def _signed(scale):  # sign * scale at level 10: the geometric ops go either way
    return lambda level, sign: (sign * level / 10 * scale,)


# An op's arguments at a level on timm's 0..10 scale; `sign` is a fresh random +-1 per op application.
# An *Increasing variant grows stronger with the level (its plain op weakens or flips at high levels).
LEVEL_TO_ARGS = {
    'AutoContrast': lambda level, sign: (),
    'Equalize': lambda level, sign: (),
    'Invert': lambda level, sign: (),
    'Rotate': _signed(30),
    'ShearX': _signed(0.3),
    'ShearY': _signed(0.3),  # degrees; shear factor
    'TranslateXRel': _signed(0.45),
    'TranslateYRel': _signed(0.45),  # fraction of the size
    'Posterize': lambda level, sign: (int(level / 10 * 4),),  # bits kept, 0..4
    'PosterizeIncreasing': lambda level, sign: (4 - int(level / 10 * 4),),
    'Solarize': lambda level, sign: (min(256, int(level / 10 * 256)),),  # threshold
    'SolarizeIncreasing': lambda level, sign: (256 - min(256, int(level / 10 * 256)),),
    'SolarizeAdd': lambda level, sign: (min(128, int(level / 10 * 110)),),  # added below 128
    **{name: lambda level, sign: (level / 10 * 1.8 + 0.1,) for name in _ENHANCE_OPS},  # 0.1..1.9; 1.0: no change
    **{
        name + 'Increasing': lambda level, sign: (max(0.1, 1.0 + sign * level / 10 * 0.9),)  # 1.0 -/+ up to 0.9
        for name in _ENHANCE_OPS
    },
}
RAND_AUGMENT_INCREASING_OPS = tuple(
    name + 'Increasing' if name + 'Increasing' in LEVEL_TO_ARGS else name for name in RAND_AUGMENT_OPS
)


@dataclass
class RandAugment:
    """timm's RandAugment on uint8 CHW tensors: num_ops ops drawn with replacement, each applied with
    probability `prob` at a level ~ N(magnitude, magnitude_std) clipped to [0, magnitude_max] (uniform on
    [0, magnitude] when magnitude_std is infinite). `magnitude` may be changed between epochs."""

    magnitude: float = 10
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = 10
    prob: float = 0.5
    increasing: bool = False
    fill: tuple = (128, 128, 128)  # of the geometric ops' empty corners
    interpolation: str = 'bicubic'

    @property
    def op_names(self):
        return RAND_AUGMENT_INCREASING_OPS if self.increasing else RAND_AUGMENT_OPS

    def sample_level(self):
        if self.magnitude_std == float('inf'):
            level = float(torch.empty(()).uniform_(0, self.magnitude))
        else:
            level = self.magnitude + self.magnitude_std * float(torch.randn(()))
        return max(0.0, min(level, self.magnitude_max))

    def __call__(self, image):
        for _ in range(self.num_ops):
            name = self.op_names[int(torch.randint(len(self.op_names), ()))]
            if float(torch.rand(())) > self.prob:
                continue
            sign = -1 if float(torch.rand(())) < 0.5 else 1
            image = self.apply(name, image, self.sample_level(), sign)
        return image

    def apply(self, name, image, level, sign):
        """One op at a given level and sign (no randomness): what the tests compare with timm."""
        args = LEVEL_TO_ARGS[name](level, sign)
        if name in _GEOMETRIC_OPS:
            return OPS[name](image, *args, fill=self.fill, interpolation=self.interpolation)
        return OPS[name.replace('Increasing', '')](image, *args)


# The spec's sections and the options they set; longest first, so 'mstd0.5' is not read as 'm' with value 'std0.5'.
SPEC_SECTIONS = dict(mstd='magnitude_std', mmax='magnitude_max', inc='increasing', m='magnitude', n='num_ops', p='prob')


def parse_rand_augment(spec):
    """RandAugment's keyword arguments from timm's spec: 'rand' then dash-separated m<magnitude> n<num_ops>
    mstd<std> (over 100: uniform) mmax<max level> p<prob> inc<0|1>, e.g. 'rand-m9-mstd0.5'; defaults timm's."""
    example = "e.g. 'rand-m9-mstd0.5' (sections m, n, mstd, mmax, p, inc)"
    sections = str(spec).split('-')
    if sections[0] != 'rand':
        raise DataError(f'RandAugment spec {spec!r} must start with "rand"; {example}')
    options = {field.name: field.default for field in fields(RandAugment) if field.name in SPEC_SECTIONS.values()}
    for section in sections[1:]:
        key = next((key for key in SPEC_SECTIONS if section.startswith(key)), None)
        if key is None:
            raise DataError(f'unknown section {section!r} in RandAugment spec {spec!r}; {example}')
        parse = int if key in ('n', 'inc') else float
        try:
            value = parse(section[len(key) :])
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < 0 or (key == 'inc' and value > 1):
            raise DataError(f'bad number in section {section!r} of RandAugment spec {spec!r}; {example}')
        options[SPEC_SECTIONS[key]] = value
    options['increasing'] = bool(options['increasing'])
    if options['magnitude_std'] > 100:  # timm's convention for "uniform in [0, magnitude]"
        options['magnitude_std'] = float('inf')
    return options


# The ops, uint8 CHW in and out. Per-value maps are 256-entry numpy lookup tables (np.take is faster than torch
# indexing, which needs int64); elementwise work is in place (fresh buffers cost more in page faults).


def _apply_lut(image, lut):
    """out = lut[image]; lut is a (256,) uint8 array, or (3, 256) for one table per channel."""
    pixels = image.numpy()
    if lut.ndim == 1:
        return torch.from_numpy(np.take(lut, pixels, mode='clip'))  # 'clip': no bounds check (uint8 < 256)
    return torch.from_numpy(
        np.stack([np.take(channel_lut, channel, mode='clip') for channel_lut, channel in zip(lut, pixels)])
    )


_IDENTITY_LUT = np.arange(256, dtype=np.uint8)


# kept: TF.autocontrast scales in float32, PIL's table in float64: off by 1 on many values
def auto_contrast(image):
    """PIL's ImageOps.autocontrast: stretch each channel so its min becomes 0 and its max 255."""
    luts = []
    for low, high in zip(image.amin(dim=(1, 2)).tolist(), image.amax(dim=(1, 2)).tolist()):
        if high <= low:
            luts.append(_IDENTITY_LUT)
        else:
            scale = 255.0 / (high - low)
            luts.append(np.clip(np.trunc(np.arange(256) * scale - low * scale), 0, 255).astype(np.uint8))
    return _apply_lut(image, np.stack(luts))


# PIL's own ImageOps.equalize (timm's op): exact by definition, faster than a numpy kernel or TF.equalize
def equalize(image):
    return _with_pil(image, ImageOps.equalize)


# kept: faster than TF.solarize, which also refuses timm's threshold 256 (a no-op)
def solarize(image, threshold):
    return _apply_lut(image, np.where(_IDENTITY_LUT < threshold, _IDENTITY_LUT, 255 - _IDENTITY_LUT))


# kept: v2 has no SolarizeAdd
def solarize_add(image, add, threshold=128):
    values = np.arange(256)
    return _apply_lut(image, np.where(values < threshold, np.minimum(values + add, 255), values).astype(np.uint8))


def _grey(image):
    """PIL's conversion from RGB to L (ITU-R 601 weights in 16-bit fixed point), as an int32 (H, W) tensor."""
    red, green, blue = image.numpy().astype(np.int32)
    return torch.from_numpy((red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16)


# kept: TF.adjust_contrast blends towards the unrounded mean of a float grey: off by 1 on most values
def contrast(image, factor):
    """PIL's Image.blend(mean grey, image, factor): float32 math, truncated, clipped, as a lookup table."""
    grey = _grey(image)
    mean = np.float32(int(float(grey.sum()) / grey.numel() + 0.5))  # PIL: int(ImageStat.Stat(L).mean + 0.5)
    blended = mean + np.float32(factor) * (np.arange(256, dtype=np.float32) - mean)
    return _apply_lut(image, np.clip(blended, 0, 255).astype(np.uint8))


# kept: TF.adjust_saturation's float grey differs from PIL's fixed-point L: off by 1 on many values
def color(image, factor):
    """PIL's Image.blend(grey, image, factor), in place on a float32 copy."""
    grey = _grey(image).float()
    pixels = image.float()
    return pixels.sub_(grey).mul_(factor).add_(grey).clamp_(0, 255).to(torch.uint8)


# kept: TF.adjust_sharpness is off by 1 on a few values and several times slower (its conv2d)
def sharpness(image, factor):
    """Blend with PIL's SMOOTH filter (3x3 ones, centre 5, / 13, rounded); the 1-pixel border stays as it is."""
    pixels = image.float()
    vertical_sums = pixels[:, :-2] + pixels[:, 1:-1]
    vertical_sums += pixels[:, 2:]
    box = vertical_sums[:, :, :-2] + vertical_sums[:, :, 1:-1]
    box += vertical_sums[:, :, 2:]
    centre = pixels[:, 1:-1, 1:-1]  # a view: blending it in place blends `pixels`
    smooth = box.add_(centre, alpha=4).div_(13).add_(0.5).floor_()
    centre.sub_(smooth).mul_(factor).add_(smooth)
    return pixels.clamp_(0, 255).to(torch.uint8)


# Geometric ops, PIL's Image.transform(AFFINE): output pixel (x, y) samples the input at the affine image of
# (x + 0.5, y + 0.5), pixel i spanning [i, i + 1); sources outside give `fill`, neighbours are clamped to the edge.


# kept: TF.affine on tensors has no bicubic; its bilinear is far off at the edges, and slower
def _shift_rows(image, shifts, fill, interpolation):
    """Output row y samples input row y at x + shifts[y] (PIL's shear-x, translate-x): one offset and one set of
    tap weights per row, so a gather and 4 multiply-adds (faster than PIL's 2-D resampler); PIL truncates."""
    channels, height, width = image.shape
    source = torch.arange(width) + 0.5 + shifts[:, None]  # each output pixel's source, PIL's coordinates
    outside = (source < 0) | (source >= width)
    frac = (shifts - shifts.floor()).float()
    if interpolation == 'bilinear':
        first_tap = 0
        weights = torch.stack([1 - frac, frac], dim=1)
    else:  # PIL's bicubic (a = -1, sharper than torch's -0.75), for the neighbours at -1, 0, 1, 2
        first_tap = -1
        weights = torch.stack(
            [
                -frac + 2 * frac**2 - frac**3,
                1 - 2 * frac**2 + frac**3,
                frac + frac**2 - frac**3,
                -(frac**2) + frac**3,
            ],
            dim=1,
        )
    taps = weights.shape[1]
    columns = torch.arange(width + taps - 1) + shifts.floor().long()[:, None] + first_tap
    window = image.gather(2, columns.clamp_(0, width - 1).expand(channels, -1, -1)).float()
    shifted = weights[:, 0, None] * window[:, :, :width]
    for tap in range(1, taps):
        shifted.addcmul_(weights[:, tap, None], window[:, :, tap : tap + width])
    shifted = shifted.clamp_(0, 255).to(torch.uint8)
    for channel, value in zip(shifted, fill):  # per channel: cheaper than a broadcast torch.where
        channel.masked_fill_(outside, value)
    return shifted


def shear_x(image, factor, fill, interpolation):  # PIL: transform(AFFINE, (1, factor, 0, 0, 1, 0))
    row_centres = torch.arange(image.shape[1], dtype=torch.float64) + 0.5
    return _shift_rows(image, factor * row_centres, fill, interpolation)


def translate_x_rel(image, fraction, fill, interpolation):  # PIL: (1, 0, fraction * width, 0, 1, 0)
    shifts = torch.full((image.shape[1],), fraction * image.shape[2], dtype=torch.float64)
    return _shift_rows(image, shifts, fill, interpolation)


def _along_y(op_along_x):  # ShearY, TranslateYRel: the x op on the transposed image
    return lambda image, *args, **kwargs: op_along_x(image.transpose(1, 2), *args, **kwargs).transpose(1, 2)


# kept: TF.rotate on tensors has no bicubic; its bilinear, as fast, is far off at the edges
def rotate(image, degrees, fill, interpolation):
    """PIL's Image.rotate: counter-clockwise about the centre, same size, by PIL itself."""
    resample = pil_modes_mapping[InterpolationMode(interpolation)]
    return _with_pil(image, lambda rgb: rgb.rotate(degrees, resample=resample, fillcolor=fill))


def _with_pil(image, op):
    """op(PIL RGB image) on a uint8 CHW tensor, through channel planes (cheaper than transposing to HWC)."""
    rgb = Image.merge('RGB', [Image.fromarray(channel) for channel in image.numpy()])
    return torch.from_numpy(np.stack([np.asarray(band) for band in op(rgb).split()]))


OPS = {
    'AutoContrast': auto_contrast,
    'Equalize': equalize,
    'Invert': TF.invert,
    'Posterize': TF.posterize,
    'Solarize': solarize,
    'SolarizeAdd': solarize_add,
    'Color': color,
    'Contrast': contrast,
    'Brightness': TF.adjust_brightness,
    'Sharpness': sharpness,
    'Rotate': rotate,
    'ShearX': shear_x,
    'ShearY': _along_y(shear_x),
    'TranslateXRel': translate_x_rel,
    'TranslateYRel': _along_y(translate_x_rel),
}
