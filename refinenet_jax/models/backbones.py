"""ResNet / ResNeXt encoders (bottleneck) returning the four stage outputs at strides 4/8/16/32.

Names mirror torchvision (``layer{s}_{b}/conv1`` ...) so that weight import is a fixed rule.
ResNeXt only changes the 3x3 (grouped) and the inner width, so it keeps the same names.

:data:`ENCODERS` names the architectures (as flax's ImageNet example's ``ResNet50 =
partial(ResNet, ...)``). A model holds one as its ``encoder`` field and instantiates it with the
settings that are the model's own choice (:data:`MODEL_ENCODER_ARGS`), so the encoder definition
fixes exactly what decides the weights: depth, widths, cardinality, stride placement.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from refinenet_jax.models.layers import conv, grouped_conv_general_dilated, max_pool

Dtype = Any
ModuleDef = Callable[..., nn.Module]

RESNET_STAGES = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
# ExFuse's layer rearrangement of ResNeXt-101: the same 33 blocks moved towards the early stages.
RESNEXT_LR_STAGES = (8, 8, 9, 8)

STRIDE_STYLES = ('v1.5', 'v1')


def _bn(name, use_running_average, dtype, momentum, scale_init=nn.initializers.ones):
  # PyTorch momentum 0.1 == flax momentum 0.9; eps as torchvision / MatConvNet.
  return nn.BatchNorm(use_running_average=use_running_average, momentum=momentum, epsilon=1e-5,
                      dtype=dtype, param_dtype=jnp.float32, scale_init=scale_init, name=name)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 bottleneck with ``width * 4`` outputs.

  stride_style 'v1.5' (torchvision, both PyTorch RefineNet ports) puts the stride on the 3x3;
  'v1' (MSRA/Caffe weights, official MatConvNet RefineNet) puts it on the first 1x1.
  ResNeXt (``groups`` > 1) groups the 3x3; the inner width is torchvision's
  ``int(width * width_per_group / 64) * groups`` (= ``width`` for a plain ResNet).
  """
  width: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  stride_style: str = 'v1.5'
  use_running_average: bool = True
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  groups: int = 1
  width_per_group: int = 64

  @nn.compact
  def __call__(self, x):
    s1, s3 = (1, self.stride) if self.stride_style == 'v1.5' else (self.stride, 1)
    bn = lambda n, **kw: _bn(n, self.use_running_average, self.dtype, self.bn_momentum, **kw)
    inner = int(self.width * self.width_per_group / 64) * self.groups
    if inner < self.groups:
      raise ValueError(f'width {self.width} x width_per_group {self.width_per_group} / 64 leaves '
                       f'no channel per group ({self.groups} groups)')
    y = conv(inner, 1, stride=s1, use_bias=False, name='conv1', dtype=self.dtype)(x)
    y = nn.relu(bn('bn1')(y))
    d = self.dilation
    y = nn.Conv(inner, (3, 3), strides=(s3, s3), padding=((d, d), (d, d)), kernel_dilation=(d, d),
                feature_group_count=self.groups, use_bias=False, dtype=self.dtype,
                param_dtype=jnp.float32, conv_general_dilated=grouped_conv_general_dilated,
                name='conv2')(y)
    y = nn.relu(bn('bn2')(y))
    y = conv(self.width * 4, 1, use_bias=False, name='conv3', dtype=self.dtype)(y)
    y = bn('bn3')(y)
    if self.downsample:
      x = conv(self.width * 4, 1, stride=self.stride, use_bias=False, name='downsample_conv',
               dtype=self.dtype)(x)
      x = bn('downsample_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Bottleneck ResNet / ResNeXt without pooling/fc; returns (C2, C3, C4, C5).

  output_stride 16/8 replaces the stride of the last one/two stages by dilation exactly as
  torchvision's ``replace_stride_with_dilation`` does (first block keeps the previous dilation).
  freeze_bn keeps the stored statistics in training too (the official RefineNet recipe) while
  scale/bias stay trainable. remat rematerialises each block in the backward pass.
  ``base_width`` is the stem width and the first stage's ``planes`` (torchvision's 64);
  ``groups``/``width_per_group`` are torchvision's (ResNeXt 32x4d: 32, 4).
  """
  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  base_width: int = 64
  stride_style: str = 'v1.5'
  output_stride: int = 32
  freeze_bn: bool = False
  bn_momentum: float = 0.9
  remat: bool = False
  dtype: Dtype = jnp.float32
  groups: int = 1
  width_per_group: int = 64

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.stride_style not in STRIDE_STYLES:
      raise ValueError(f'stride_style must be one of {STRIDE_STYLES}, got {self.stride_style!r}')
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f'output_stride must be 8, 16 or 32, got {self.output_stride}')
    use_ra = (not train) or self.freeze_bn
    x = conv(self.base_width, 7, stride=2, use_bias=False, name='conv1', dtype=self.dtype)(x)
    x = nn.relu(_bn('bn1', use_ra, self.dtype, self.bn_momentum)(x))
    x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    block_cls = nn.remat(Bottleneck) if self.remat else Bottleneck
    dilated_stages = {32: 0, 16: 1, 8: 2}[self.output_stride]
    in_features, dilation, feats = self.base_width, 1, []
    for s, n_blocks in enumerate(self.stage_sizes):
      width = self.base_width * 2 ** s
      stride = 1 if s == 0 else 2
      prev_dilation = dilation
      if s >= len(self.stage_sizes) - dilated_stages:
        dilation, stride = dilation * stride, 1
      for b in range(n_blocks):
        x = block_cls(
            width=width, groups=self.groups, width_per_group=self.width_per_group,
            stride=stride if b == 0 else 1,
            dilation=prev_dilation if b == 0 else dilation,
            downsample=(b == 0 and (stride != 1 or in_features != width * 4)),
            stride_style=self.stride_style, use_running_average=use_ra,
            bn_momentum=self.bn_momentum, dtype=self.dtype, name=f'layer{s + 1}_{b}')(x)
        in_features = width * 4
      feats.append(x)
    return tuple(feats)


# Encoder fields a model passes when it instantiates its encoder (or leaves at ResNet's default):
# how it runs, not which weights it has. An encoder definition never fixes them.
MODEL_ENCODER_ARGS = ('name', 'parent', 'dtype', 'remat', 'freeze_bn', 'output_stride')


class EncoderDef(functools.partial):
  """A ``functools.partial`` of an encoder class that compares and hashes by value.

  Flax modules compare field by field, so two models built with the same settings stay equal
  (a plain partial compares by identity).
  """

  def _key(self):
    freeze = lambda v: tuple(v) if isinstance(v, list) else v
    return self.func, self.args, tuple(sorted((k, freeze(v)) for k, v in self.keywords.items()))

  def __eq__(self, other):
    return isinstance(other, EncoderDef) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())


def encoder_def(encoder: str | ModuleDef, **fields) -> EncoderDef:
  """``encoder`` (a name in :data:`ENCODERS` or a partial of an encoder class) with ``fields``
  replaced; :data:`MODEL_ENCODER_ARGS` are refused (the model sets them)."""
  if isinstance(encoder, str):
    if encoder not in ENCODERS:
      raise KeyError(f'unknown encoder {encoder!r}; valid names: {", ".join(sorted(ENCODERS))}')
    encoder = ENCODERS[encoder]
  fixed = sorted(set(fields) & set(MODEL_ENCODER_ARGS))
  if fixed:
    raise TypeError(f'encoder fields {fixed} are set by the model, not the encoder definition; '
                    f'override the model field instead (e.g. freeze_encoder_bn, output_stride)')
  return EncoderDef(encoder, **fields)


_RESNEXT_32X4D = dict(groups=32, width_per_group=4)
ENCODERS = {
    'resnet50': EncoderDef(ResNet, stage_sizes=RESNET_STAGES[50]),
    'resnet101': EncoderDef(ResNet, stage_sizes=RESNET_STAGES[101]),
    'resnet152': EncoderDef(ResNet, stage_sizes=RESNET_STAGES[152]),
    'resnext50_32x4d': EncoderDef(ResNet, stage_sizes=RESNET_STAGES[50], **_RESNEXT_32X4D),
    'resnext101_32x4d': EncoderDef(ResNet, stage_sizes=RESNET_STAGES[101], **_RESNEXT_32X4D),
    'resnext101_32x8d': EncoderDef(ResNet, stage_sizes=RESNET_STAGES[101], groups=32,
                                   width_per_group=8),
    # ExFuse's layer-rearranged ResNeXt-101 (no published weights)
    'resnext101_lr_32x4d': EncoderDef(ResNet, stage_sizes=RESNEXT_LR_STAGES, **_RESNEXT_32X4D),
    # test-sized: one block per stage, 8-channel stem; the ResNeXt one has 2 groups of 4
    'resnet_tiny': EncoderDef(ResNet, stage_sizes=(1, 1, 1, 1), base_width=8),
    'resnext_tiny': EncoderDef(ResNet, stage_sizes=(1, 1, 1, 1), base_width=8, groups=2,
                               width_per_group=16),
}
