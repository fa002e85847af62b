"""RefineNet (Lin et al., CVPR 2017) and Light-Weight RefineNet (Nekrasov et al., BMVC 2018).

Default topology = the released code (what the published weights are): per encoder tap a no-bias
path-adaptation conv (512 wide for 1/32, 256 otherwise) and 2 RCUs; per block multi-resolution
fusion, 4-stage chained residual pooling (pool -> conv) and 3 output RCUs; dropout 0.5 on the
1/16 and 1/32 taps and before the 3x3 classifier. Logits come out at the finest tap's resolution
(1/4 of the input) in float32.

Wiring is data: ``path_groups[k]`` names the block (1-based, coarse to fine) that consumes the
stage-k tap (k=0 is 1/32). (1, 2, 3, 4) is the standard 4-cascade, (1, 1, 1, 1) the single
block, (1, 1, 2, 2) the 2-cascade. ``input_scales`` with two entries builds the 2-scale model:
one independent encoder per scale, and block g fuses the stage-g taps of every scale. The encoder
is any entry of ``backbones.ENCODERS``, so a RefineNet on another encoder is one registry entry.

Decoder weights start from N(0, 0.01) as in the official code (``decoder_init='official'``):
the decoder has no normalisation, and default fan-in inits make its residual sums blow up the
initial logits (std ~7 on the tiny model), which diverges SGD.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from refinenet_jax.models.backbones import ENCODERS, ModuleDef
from refinenet_jax.models.layers import RCUStack, RefineBlock, conv, decoder_init

Dtype = Any


class RefineNet(nn.Module):
  num_classes: int
  # encoder: its architecture, then how this model runs it
  encoder: ModuleDef = ENCODERS['resnet101']
  output_stride: int = 32
  freeze_encoder_bn: bool = False
  # decoder (index 0 = the 1/32 tap)
  path_widths: Sequence[int] = (512, 256, 256, 256)
  path_groups: Sequence[int] = (1, 2, 3, 4)
  input_scales: Sequence[float] = (1.0,)
  decoder_kernel: int = 3
  adapt_rcus: int = 2
  crp_stages: int = 4
  crp_order: str = 'pool_conv'
  output_rcus: int = 3
  head_rcus: int = 0
  tap_dropout: float = 0.5
  head_dropout: float = 0.5
  resize_mode: str = 'align_corners'
  decoder_init: str = 'official'  # 'official' N(0, 0.01) | 'pytorch'
  # numerics / memory
  dtype: Dtype = jnp.float32
  remat: bool = False
  # the input statistics the weights expect (see models/preprocessing.py)
  normalization: str = 'imagenet'

  def _check(self, n: int):
    if len(self.path_widths) != n or len(self.path_groups) != n:
      raise ValueError(f'path_widths {tuple(self.path_widths)} and path_groups '
                       f'{tuple(self.path_groups)} need one entry per encoder stage ({n})')
    groups = sorted(set(self.path_groups))
    if groups != list(range(1, len(groups) + 1)) or list(self.path_groups) != sorted(
        self.path_groups):
      raise ValueError(f'path_groups must be non-decreasing from 1 with no gaps (coarse taps '
                       f'first), got {tuple(self.path_groups)}')

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images: (N, H, W, 3) normalised as ``self.normalization``; any H, W >= 1."""
    k_init = decoder_init(self.decoder_init)
    taps = []  # (tap id, stage index k (0 = coarsest), feature map)
    for si, scale in enumerate(self.input_scales):
      x = images
      if scale != 1.0:
        # MATLAB imresize semantics of the official code: ceil(size * scale), antialiased.
        size = (math.ceil(images.shape[1] * scale), math.ceil(images.shape[2] * scale))
        x = jax.image.resize(images, (images.shape[0], *size, images.shape[3]), 'bilinear')
      name = 'encoder' if len(self.input_scales) == 1 else f'encoder{si}'
      encoder = self.encoder(name=name, dtype=self.dtype, remat=self.remat,
                             freeze_bn=self.freeze_encoder_bn, output_stride=self.output_stride)
      n_stages = len(encoder.stage_sizes)
      self._check(n_stages)
      feats = encoder(x.astype(self.dtype), train)
      for k, f in enumerate(reversed(feats)):
        if k < 2 and self.tap_dropout:  # the 1/32 and 1/16 taps, as in the released code
          f = nn.Dropout(self.tap_dropout, deterministic=not train)(f)
        taps.append((si * n_stages + k, k, f))

    def path(t, k, f):
      f = conv(self.path_widths[k], self.decoder_kernel, use_bias=False, name=f'path{t}_adapt',
               dtype=self.dtype, kernel_init=k_init)(f)
      if self.adapt_rcus:
        f = RCUStack(self.adapt_rcus, self.path_widths[k], self.decoder_kernel, self.dtype,
                     k_init, name=f'path{t}_rcu')(f)
      return f

    adapted = {t: (k, path(t, k, f)) for t, k, f in taps}
    x, width = None, None
    for g in sorted(set(self.path_groups)):
      ids = [t for t, (k, _) in adapted.items() if self.path_groups[k] == g]
      widths = [self.path_widths[adapted[t][0]] for t in ids] + ([width] if x is not None else [])
      width = min(widths)
      x = RefineBlock(width, ids, self.crp_stages, self.crp_order, self.output_rcus,
                      self.decoder_kernel, self.resize_mode, self.dtype, k_init,
                      name=f'block{g}')(x, [adapted[t][1] for t in ids])
    if self.head_rcus:
      x = RCUStack(self.head_rcus, width, self.decoder_kernel, self.dtype, k_init,
                   name='head_rcu')(x)
    if self.head_dropout:
      x = nn.Dropout(self.head_dropout, deterministic=not train)(x)
    x = conv(self.num_classes, 3, use_bias=True, name='classifier', dtype=self.dtype,
             kernel_init=k_init)(x)
    return x.astype(jnp.float32)


# Light-Weight RefineNet: 1x1 decoder convs, no RCUs, no dropout before the classifier.
_LW = dict(decoder_kernel=1, adapt_rcus=0, output_rcus=0, head_dropout=0.0)
# CVPR-paper form: 2 CRP stages, 1 RCU per block plus 2 before the classifier.
_CVPR = dict(crp_stages=2, output_rcus=1, head_rcus=2)
# Test-sized decoder (16 wide) on the test-sized encoder (1 block per stage, 8-channel stem).
_TINY = dict(encoder=ENCODERS['resnet_tiny'], path_widths=(32, 16, 16, 16))

VARIANTS = {}
for _d in (50, 101, 152):
  _enc = dict(encoder=ENCODERS[f'resnet{_d}'])
  VARIANTS[f'refinenet_r{_d}'] = functools.partial(RefineNet, **_enc)
  VARIANTS[f'lw_refinenet_r{_d}'] = functools.partial(RefineNet, **_enc, **_LW)
  VARIANTS[f'refinenet_improved_r{_d}'] = functools.partial(RefineNet, **_enc,
                                                            crp_order='conv_pool')
  VARIANTS[f'refinenet_cvpr_r{_d}'] = functools.partial(RefineNet, **_enc, **_CVPR)
# The paper's variant study (Table 9) uses ResNet-50; other encoders via encoder=... overrides.
_R50 = dict(encoder=ENCODERS['resnet50'])
VARIANTS['refinenet_single_r50'] = functools.partial(RefineNet, **_R50, path_groups=(1, 1, 1, 1))
VARIANTS['refinenet_2cascade_r50'] = functools.partial(RefineNet, **_R50,
                                                       path_groups=(1, 1, 2, 2))
VARIANTS['refinenet_2scale_r50'] = functools.partial(RefineNet, **_R50, input_scales=(1.2, 0.6))
# torchvision's ResNeXt-101 32x8d (published ImageNet weights, 'torchvision_resnet' layout)
VARIANTS['refinenet_resnext101_32x8d'] = functools.partial(
    RefineNet, encoder=ENCODERS['resnext101_32x8d'])
VARIANTS['refinenet_tiny'] = functools.partial(RefineNet, **_TINY)
VARIANTS['lw_refinenet_tiny'] = functools.partial(RefineNet, **_TINY, **_LW)

# create_model overrides that shrink any variant to test size (encoder fields go to its encoder).
TINY_OVERRIDES = dict(**ENCODERS['resnet_tiny'].keywords, path_widths=_TINY['path_widths'])
