"""The EfficientNetV2 network: the whole family as tables, numerically identical to timm's, with timm's
names, parameter counts and state-dict keys (so timm's weights load as they are; weights.py loads them).
`python published.py` lists the variants with their sizes and published weights.

    net = create_model('efficientnetv2_rw_t', num_classes=1000, drop_rate=0.3, drop_path_rate=0.2)

Paper: Tan & Le, "EfficientNetV2: Smaller Models and Faster Training" (2021), Table 4. Imports only torch and
torchvision (its StochasticDepth is the blocks' drop path, as timm's: a whole sample's branch, survivors scaled)."""

import difflib
import math
from functools import partial

import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth

# Architecture tables, one row per stage (the paper's Table 4). Blocks: 'cn' ConvBlock (one conv),
# 'er' FusedMBConv, 'ir' MBConv (the classes below); stride is the stage's first block's.
#         block repeats kernel stride expand channels se
V2_S = (
    ('cn', 2, 3, 1, 1, 24, 0),
    ('er', 4, 3, 2, 4, 48, 0),
    ('er', 4, 3, 2, 4, 64, 0),
    ('ir', 6, 3, 2, 4, 128, 0.25),
    ('ir', 9, 3, 1, 6, 160, 0.25),
    ('ir', 15, 3, 2, 6, 256, 0.25),
)
# Ross Wightman's variant, drawn from the paper's figure before the official code was released.
V2_RW_S = (('er', 2, 3, 1, 1, 24, 0),) + V2_S[1:5] + (('ir', 15, 3, 2, 6, 272, 0.25),)
V2_M = (
    ('cn', 3, 3, 1, 1, 24, 0),
    ('er', 5, 3, 2, 4, 48, 0),
    ('er', 5, 3, 2, 4, 80, 0),
    ('ir', 7, 3, 2, 4, 160, 0.25),
    ('ir', 14, 3, 1, 6, 176, 0.25),
    ('ir', 18, 3, 2, 6, 304, 0.25),
    ('ir', 5, 3, 1, 6, 512, 0.25),
)
V2_L = (
    ('cn', 4, 3, 1, 1, 32, 0),
    ('er', 7, 3, 2, 4, 64, 0),
    ('er', 7, 3, 2, 4, 96, 0),
    ('ir', 10, 3, 2, 4, 192, 0.25),
    ('ir', 19, 3, 1, 6, 224, 0.25),
    ('ir', 25, 3, 2, 6, 384, 0.25),
    ('ir', 7, 3, 1, 6, 640, 0.25),
)
V2_XL = (
    ('cn', 4, 3, 1, 1, 32, 0),
    ('er', 8, 3, 2, 4, 64, 0),
    ('er', 8, 3, 2, 4, 96, 0),
    ('ir', 16, 3, 2, 4, 192, 0.25),
    ('ir', 24, 3, 1, 6, 256, 0.25),
    ('ir', 32, 3, 2, 6, 512, 0.25),
    ('ir', 8, 3, 1, 6, 640, 0.25),
)
V2_BASE = (
    ('cn', 1, 3, 1, 1, 16, 0),
    ('er', 2, 3, 2, 4, 32, 0),
    ('er', 2, 3, 2, 4, 48, 0),
    ('ir', 3, 3, 2, 4, 96, 0.25),
    ('ir', 5, 3, 1, 6, 112, 0.25),
    ('ir', 8, 3, 2, 6, 192, 0.25),
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)


def _variant(table, stem, head, width, depth, train_size, test_size, crop_pct=1.0, **options):
    """A VARIANTS entry: EfficientNetV2's arguments (options: tf, round_limit), and in `config` the image settings
    timm gives the variant (options: mean and std, ImageNet's by default)."""
    config = dict(train_size=train_size, test_size=test_size, crop_pct=crop_pct, interpolation='bicubic')
    config['mean'] = options.pop('mean', IMAGENET_MEAN)
    config['std'] = options.pop('std', IMAGENET_STD)
    return dict(table=table, stem=stem, head=head, width=width, depth=depth, **options, config=config)


# tf_*: ports of Google's weights, so BN eps 1e-3 and TensorFlow 'SAME' padding.
# The b-series rounds channels without timm's "+8 if 10% below" correction (round_limit 0).
_tf = dict(tf=True, mean=TF_MEAN, std=TF_STD)
_base = dict(tf=True, round_limit=0.0)
RW_M_DEPTH = (1.2, 1.2, 1.2, 1.2, 1.6, 1.6)  # efficientnetv2_rw_m's depth multiplier per stage
# each row: stage table, stem and head channels, width and depth multipliers, train and test size[, crop]
VARIANTS = {
    'efficientnetv2_rw_t': _variant(V2_S, 24, 1280, 0.8, 0.9, 224, 288),
    'efficientnetv2_rw_s': _variant(V2_RW_S, 24, 1792, 1.0, 1.0, 288, 384),
    'efficientnetv2_rw_m': _variant(V2_RW_S, 24, 1792, 1.2, RW_M_DEPTH, 320, 416),
    'efficientnetv2_s': _variant(V2_S, 24, 1280, 1.0, 1.0, 288, 384),
    'efficientnetv2_m': _variant(V2_M, 24, 1280, 1.0, 1.0, 320, 416),
    'efficientnetv2_l': _variant(V2_L, 32, 1280, 1.0, 1.0, 384, 480),
    'efficientnetv2_xl': _variant(V2_XL, 32, 1280, 1.0, 1.0, 384, 512),
    'tf_efficientnetv2_s': _variant(V2_S, 24, 1280, 1.0, 1.0, 300, 384, **_tf),
    'tf_efficientnetv2_m': _variant(V2_M, 24, 1280, 1.0, 1.0, 384, 480, **_tf),
    'tf_efficientnetv2_l': _variant(V2_L, 32, 1280, 1.0, 1.0, 384, 480, **_tf),
    'tf_efficientnetv2_xl': _variant(V2_XL, 32, 1280, 1.0, 1.0, 384, 512, **_tf),
    'tf_efficientnetv2_b0': _variant(V2_BASE, 32, 1280, 1.0, 1.0, 192, 224, 0.875, **_base),
    'tf_efficientnetv2_b1': _variant(V2_BASE, 32, 1280, 1.0, 1.1, 192, 240, 0.882, **_base),
    'tf_efficientnetv2_b2': _variant(V2_BASE, 32, 1280, 1.1, 1.2, 208, 260, 0.890, **_base),
    'tf_efficientnetv2_b3': _variant(V2_BASE, 32, 1280, 1.2, 1.4, 240, 300, 0.904, **_base),
}


def make_divisible(channels, divisor=8, round_limit=0.9):
    """timm's channel rounding: nearest multiple of 8, bumped up if that lost more than 10%."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * channels else rounded


# Layers


class Conv2dSame(nn.Conv2d):
    """TensorFlow 'SAME' padding for strided convs (Google's weights were trained with it): computed from the input
    size at run time, the odd extra pixel at the bottom/right."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads = [total // 2, total - total // 2] + pads  # F.pad wants the last dim first
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, 1, self.groups)


def conv2d(in_chs, out_chs, kernel, stride=1, groups=1, tf_same=False):
    if tf_same and stride > 1:  # stride 1 'SAME' equals symmetric padding for odd kernels
        return Conv2dSame(in_chs, out_chs, kernel, stride, groups=groups, bias=False)
    return nn.Conv2d(in_chs, out_chs, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)


class SqueezeExcite(nn.Module):
    def __init__(self, chs, reduced_chs):
        super().__init__()
        self.conv_reduce = nn.Conv2d(chs, reduced_chs, 1)
        self.conv_expand = nn.Conv2d(reduced_chs, chs, 1)

    def forward(self, x):  # (N, C, H, W) -> same, each channel gated by a global summary
        # mean, not sum: CUDA's autocast runs sum in float32, which would copy every expanded activation
        pooled = x.mean((2, 3), keepdim=True)
        scale = self.conv_expand(F.silu(self.conv_reduce(pooled)))
        return x * scale.sigmoid()


class ConvBlock(nn.Module):
    """'cn': conv-BN-SiLU, residual when the shape allows."""

    def __init__(self, in_chs, out_chs, kernel, stride, bn, tf_same, drop_path):
        super().__init__()
        self.conv = conv2d(in_chs, out_chs, kernel, stride, tf_same=tf_same)
        self.bn1 = bn(out_chs)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.drop_path = StochasticDepth(drop_path, 'row')

    def forward(self, x):
        out = F.silu(self.bn1(self.conv(x)))
        return self.drop_path(out) + x if self.has_skip else out


class FusedMBConv(nn.Module):
    """'er': k x k conv to expand_ratio * in channels, BN, SiLU, 1x1 conv down, BN."""

    def __init__(self, in_chs, out_chs, kernel, stride, expand_ratio, bn, tf_same, drop_path):
        super().__init__()
        mid_chs = make_divisible(in_chs * expand_ratio)
        self.conv_exp = conv2d(in_chs, mid_chs, kernel, stride, tf_same=tf_same)
        self.bn1 = bn(mid_chs)
        self.conv_pwl = conv2d(mid_chs, out_chs, 1)
        self.bn2 = bn(out_chs)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.drop_path = StochasticDepth(drop_path, 'row')

    def forward(self, x):
        out = self.bn2(self.conv_pwl(F.silu(self.bn1(self.conv_exp(x)))))
        return self.drop_path(out) + x if self.has_skip else out


class MBConv(nn.Module):
    """'ir': 1x1 expand, BN, SiLU, depthwise k x k, BN, SiLU, SE, 1x1 project, BN."""

    def __init__(self, in_chs, out_chs, kernel, stride, expand_ratio, se_ratio, bn, tf_same, drop_path):
        super().__init__()
        mid_chs = make_divisible(in_chs * expand_ratio)
        self.conv_pw = conv2d(in_chs, mid_chs, 1)
        self.bn1 = bn(mid_chs)
        self.conv_dw = conv2d(mid_chs, mid_chs, kernel, stride, groups=mid_chs, tf_same=tf_same)
        self.bn2 = bn(mid_chs)
        self.se = SqueezeExcite(mid_chs, round(in_chs * se_ratio))  # SE width from the block's input, as TF's
        self.conv_pwl = conv2d(mid_chs, out_chs, 1)
        self.bn3 = bn(out_chs)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.drop_path = StochasticDepth(drop_path, 'row')

    def forward(self, x):
        out = F.silu(self.bn1(self.conv_pw(x)))
        out = self.se(F.silu(self.bn2(self.conv_dw(out))))
        out = self.bn3(self.conv_pwl(out))
        return self.drop_path(out) + x if self.has_skip else out


# The network


class EfficientNetV2(nn.Module):
    """The stem conv (stride 2), the stages of the table, a 1x1 head conv, then pooling, dropout and a linear layer."""

    def __init__(
        self,
        table,
        stem,
        head,
        width=1.0,
        depth=1.0,
        tf=False,
        round_limit=0.9,
        num_classes=1000,
        drop_rate=0.0,
        drop_path_rate=0.0,
        in_chans=3,
        config=None,
    ):
        super().__init__()
        bn = partial(nn.BatchNorm2d, eps=1e-3 if tf else 1e-5)
        chs = lambda c: make_divisible(c * width, round_limit=round_limit)  # noqa: E731
        depths = depth if isinstance(depth, (tuple, list)) else (depth,) * len(table)
        repeats = [math.ceil(row[1] * d) for row, d in zip(table, depths)]
        self.config = dict(config or {})
        self.drop_rate = drop_rate

        self.conv_stem = conv2d(in_chans, chs(stem), 3, 2, tf_same=tf)
        self.bn1 = bn(chs(stem))
        in_chs = chs(stem)
        index = 0
        stages = []
        for (kind, _, kernel, stride, expand, out, se), n in zip(table, repeats):
            block = {
                'cn': ConvBlock,
                'er': partial(FusedMBConv, expand_ratio=expand),
                'ir': partial(MBConv, expand_ratio=expand, se_ratio=se),
            }[kind]
            blocks = []
            for i in range(n):
                drop_path = drop_path_rate * index / sum(repeats)  # grows linearly over the whole network
                blocks.append(
                    block(in_chs, chs(out), kernel, stride if i == 0 else 1, bn=bn, tf_same=tf, drop_path=drop_path)
                )
                in_chs = chs(out)
                index = index + 1
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.num_features = chs(head)
        self.conv_head = conv2d(in_chs, self.num_features, 1)
        self.bn2 = bn(self.num_features)
        self.reset_classifier(num_classes)
        if not self.conv_stem.weight.is_meta:  # a shape-only model has nothing to fill (python published.py)
            self.apply(init_weights)

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        init_weights(self.classifier)

    def forward_features(self, x):  # (N, 3, H, W) -> (N, num_features, H/32, W/32)
        x = self.blocks(F.silu(self.bn1(self.conv_stem(x))))
        return F.silu(self.bn2(self.conv_head(x)))

    def forward(self, x):  # (N, 3, H, W) -> (N, num_classes)
        x = self.forward_features(x).mean((2, 3))
        x = F.dropout(x, self.drop_rate, self.training) if self.drop_rate > 0 else x
        return self.classifier(x)


def init_weights(m):
    """TF/timm init: conv ~ N(0, sqrt(2 / fan_out)), fan_out = k*k*out/groups; linear ~ U(+-1/sqrt(out));
    biases 0. BatchNorm keeps PyTorch's own init (scale 1, shift 0), which is timm's."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        bound = 1.0 / math.sqrt(m.weight.shape[0])
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.zeros_(m.bias)


def list_models():
    return sorted(VARIANTS)


def check_model_name(name, error=ValueError):
    """Raise `error`, naming close variants, unless `name` is a variant or VARIANT.TAG (published.py checks the tag)."""
    if name.split('.')[0] not in VARIANTS:
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
        hint = f'did you mean {", ".join(close)}?' if close else f'choose from {", ".join(list_models())}'
        raise error(f"unknown model '{name}': {hint}")


def create_model(name, num_classes=1000, drop_rate=0.0, drop_path_rate=0.0, **overrides):
    """Build a variant by timm's name (VARIANT.TAG builds VARIANT); `overrides` replace fields of its
    VARIANTS entry (e.g. table=..., width=..., tf=...) for copy-and-modify experiments."""
    check_model_name(name)
    spec = {**VARIANTS[name.split('.')[0]], **overrides}
    return EfficientNetV2(num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate, **spec)
