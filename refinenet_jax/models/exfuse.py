"""GCN ("Large Kernel Matters", Peng et al., CVPR 2017) and ExFuse (Zhang et al., ECCV 2018).

One class, :class:`ExFuse`, whose ExFuse components are switches, so ExFuse's ablation ladder is
a set of configs (configs/exfuse_ladder.py). With every switch off it is the GCN baseline: per
encoder stage a Global Convolutional Network module (k x 1 -> 1 x k plus 1 x k -> k x 1, summed,
no normalisation or activation) straight to C class channels and a boundary-refinement residual
block (BR); the coarse path is upsampled 2x, added to the next level and refined; nine BRs and
five 2x upsamplings give C-channel scores at the input resolution.

docs/exfuse.md describes the components and every choice the papers leave open.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from refinenet_jax.models.backbones import ENCODERS, ModuleDef, _bn
from refinenet_jax.models.layers import RESIZE_MODES, conv, decoder_init, resize_bilinear

Dtype = Any

UPSAMPLE_MODES = ('deconv', 'bilinear')
ECRE_SOURCES = ('conv', 'gcn')
SEB_INITS = ('identity', 'random')


def dense_adjacent_prediction(z: jnp.ndarray, k: int = 3) -> jnp.ndarray:
  """DAP: (N, H, W, C*k*k) -> (N, H, W, C); zero padding at the borders.

  out[i, j, c] = mean over l, m in [0, k) of z[i + l - k//2, j + m - k//2, (k*l + m) * C + c]:
  each position predicts its k x k neighbourhood, one channel group per neighbour offset, and
  every score averages the predictions the neighbours made for it.
  """
  n, h, w, kc = z.shape
  if k % 2 == 0 or kc % (k * k):
    raise ValueError(f'DAP needs an odd k and C*k^2 channels; got k={k}, {kc} channels')
  c, r = kc // (k * k), k // 2
  zp = jnp.pad(z, ((0, 0), (r, r), (r, r), (0, 0)))
  out = None
  for l in range(k):
    for m in range(k):
      g = k * l + m
      part = jax.lax.slice(zp, (0, l, m, g * c), (n, l + h, m + w, (g + 1) * c))
      out = part if out is None else out + part
  return out * (1.0 / (k * k))


def pixel_shuffle(x: jnp.ndarray, r: int = 2) -> jnp.ndarray:
  """PyTorch ``PixelShuffle(r)`` on NHWC: out[r*i + a, r*j + b, c] = x[i, j, c*r*r + a*r + b]."""
  n, h, w, cr = x.shape
  if cr % (r * r):
    raise ValueError(f'pixel shuffle x{r} needs a multiple of {r * r} channels, got {cr}')
  x = x.reshape(n, h, w, cr // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(n, h * r, w * r, cr // (r * r))


def bilinear_deconv_init(key, shape, dtype=jnp.float32):
  """(k, k, C, C) transposed-conv kernel doing per-channel bilinear upsampling (FCN's kernel)."""
  k, _, cin, cout = shape
  f = (k + 1) // 2
  centre = f - 1 if k % 2 else f - 0.5
  w1 = 1 - np.abs(np.arange(k) - centre) / f
  kernel = np.zeros(shape, np.float32)
  for i in range(min(cin, cout)):
    kernel[:, :, i, i] = np.outer(w1, w1)
  return jnp.asarray(kernel, dtype)


class Upsample2x(nn.Module):
  """2x upsampling cropped to ``size``: a learned 4x4 stride-2 transposed conv (C -> C, no bias)
  initialised bilinear, or fixed half-pixel bilinear; both map cell i to 2i, 2i + 1."""
  mode: str = 'deconv'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, size):
    h, w, c = x.shape[1:]
    if self.mode == 'deconv':
      kernel = self.param('kernel', bilinear_deconv_init, (4, 4, c, c)).astype(self.dtype)
      x = jax.lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)),
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    else:
      x = resize_bilinear(x, (2 * h, 2 * w), 'half_pixel')
    return jax.lax.slice(x, (0, 0, 0, 0), (x.shape[0], size[0], size[1], x.shape[3]))


class GlobalConv(nn.Module):
  """GCN module: (k x 1 -> 1 x k) + (1 x k -> k x 1) + one bias.

  Equal to a dense k x k conv whose kernel, per (input, output) channel pair, is a sum of
  rank-1 products through ``features`` middle channels (rank <= 2 with one middle channel), at
  2k instead of k^2 weights per pair. Intermediate biases are left out: with zero padding they
  would add a border-dependent constant that no dense conv has.
  """
  features: int
  kernel: int = 15
  bn: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    k, p = self.kernel, self.kernel // 2
    if k % 2 == 0:
      raise ValueError(f'gcn_kernel must be odd, got {k}')
    kw = {} if self.kernel_init is None else {'kernel_init': self.kernel_init}

    def c(shape, name):
      pad = ((p, p), (0, 0)) if shape[0] > 1 else ((0, 0), (p, p))
      return nn.Conv(self.features, shape, padding=pad, use_bias=False, dtype=self.dtype,
                     param_dtype=jnp.float32, name=name, **kw)

    y = c((k, 1), 'left_kx1')(x)
    y = c((1, k), 'left_1xk')(y)
    z = c((1, k), 'right_1xk')(x)
    y = y + c((k, 1), 'right_kx1')(z)
    if self.bn:
      return _bn('bn', not train, self.dtype, 0.9)(y)
    return y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)


class BoundaryRefine(nn.Module):
  """BR: x + conv3x3(relu(conv3x3(x))), width preserving."""
  bn: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    f = x.shape[-1]
    y = conv(f, 3, use_bias=not self.bn, name='conv1', dtype=self.dtype,
             kernel_init=self.kernel_init)(x)
    if self.bn:
      y = _bn('bn1', not train, self.dtype, 0.9)(y)
    y = conv(f, 3, use_bias=not self.bn, name='conv2', dtype=self.dtype,
             kernel_init=self.kernel_init)(nn.relu(y))
    if self.bn:
      y = _bn('bn2', not train, self.dtype, 0.9)(y)
    return x + y


class SemanticEmbedding(nn.Module):
  """SEB: x_low * prod_i resize(conv3x3_i(x_high_i)) with one conv per higher level."""
  high_names: Sequence[str]
  factor_init: str = 'identity'
  bn: bool = False
  resize_mode: str = 'half_pixel'
  dtype: Dtype = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def __call__(self, low, highs, train: bool = False):
    if self.factor_init not in SEB_INITS:
      raise ValueError(f'seb_init must be one of {SEB_INITS}, got {self.factor_init!r}')
    f = low.shape[-1]
    if self.factor_init == 'identity':
      inits = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.ones)
    else:
      inits = {} if self.kernel_init is None else dict(kernel_init=self.kernel_init)
    out = low
    for name, h in zip(self.high_names, highs):
      g = nn.Conv(f, (3, 3), padding=((1, 1), (1, 1)), use_bias=True, dtype=self.dtype,
                  param_dtype=jnp.float32, name=f'conv_from_{name}', **inits)(h)
      if self.bn:
        g = _bn(f'bn_from_{name}', not train, self.dtype, 0.9)(g)
      out = out * resize_bilinear(g, low.shape[1:3], self.resize_mode)
    return out


class SSBranch(nn.Module):
  """Semantic-supervision branch trunk: two 3x3 convs (+ BatchNorm) + ReLU.

  Shared by the segmentation deep-supervision heads and the classification pre-training heads
  (pretrain.py), so pre-trained branches carry over by name.
  """
  width: int = 256
  bn: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(2):
      x = conv(self.width, 3, use_bias=not self.bn, name=f'conv{i}', dtype=self.dtype)(x)
      if self.bn:
        x = _bn(f'bn{i}', not train, self.dtype, 0.9)(x)
      x = nn.relu(x)
    return x


class ExFuse(nn.Module):
  """GCN baseline with switchable ExFuse components (LR, SS, SEB, ECRE, DAP).

  In training with auxiliary heads it returns ``(logits, aux)``, ``aux`` ordered as
  :attr:`aux_names` (SS heads from res-2 up, then ECRE); the trainer weights them by the config's
  ``aux_weights``. No official code exists, so every detail the paper leaves open is a field;
  docs/exfuse.md lists what each component does and, per field, the choice made and why.
  """
  num_classes: int
  # encoder (any of backbones.ENCODERS with 4 stages; run at output stride 32)
  encoder: ModuleDef = ENCODERS['resnext101_32x4d']
  freeze_encoder_bn: bool = False
  # GCN decoder
  gcn_kernel: int = 15
  upsample: str = 'deconv'  # 'deconv' (bilinear-initialised, learned) | 'bilinear'
  decoder_bn: bool = False
  decoder_init: str = 'pytorch'
  resize_mode: str = 'half_pixel'
  # ExFuse components (all off = the GCN baseline)
  ss_stages: Sequence[int] = ()  # 0 = res-2 ... 3 = res-5
  ss_width: int = 256
  ss_bn: bool = True
  seb: bool = False
  seb_init: str = 'identity'
  ecre: bool = False
  ecre_source: str = 'conv'
  dap: bool = False
  dap_kernel: int = 3
  # numerics / memory
  dtype: Dtype = jnp.float32
  remat: bool = False
  normalization: str = 'imagenet'

  @property
  def aux_names(self) -> tuple[str, ...]:
    """Names of the auxiliary logits returned in training, in order."""
    return tuple(f'ss_res{s + 2}' for s in self.ss_stages) + (('ecre',) if self.ecre else ())

  def _check(self, n: int):
    if n != 4:
      raise ValueError(f'GCN/ExFuse needs 4 encoder stages, got {n} (encoder {self.encoder})')
    for name, value, valid in (('upsample', self.upsample, UPSAMPLE_MODES),
                               ('ecre_source', self.ecre_source, ECRE_SOURCES),
                               ('seb_init', self.seb_init, SEB_INITS),
                               ('resize_mode', self.resize_mode, RESIZE_MODES)):
      if value not in valid:
        raise ValueError(f'{name} must be one of {valid}, got {value!r}')
    if sorted(set(self.ss_stages)) != list(self.ss_stages) or not set(self.ss_stages) <= set(
        range(n)):
      raise ValueError(f'ss_stages must be increasing stage indices in 0..{n - 1}, got '
                       f'{tuple(self.ss_stages)}')

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images: (N, H, W, 3) normalised as ``self.normalization``; any H, W >= 1.

    Returns float32 logits (N, H, W, C); in training with auxiliary heads ``(logits, aux)``.
    """
    encoder = self.encoder(name='encoder', dtype=self.dtype, remat=self.remat,
                           freeze_bn=self.freeze_encoder_bn, output_stride=32)
    self._check(len(encoder.stage_sizes))
    k_init = decoder_init(self.decoder_init)
    c = self.num_classes
    feats = encoder(images.astype(self.dtype), train)
    sizes = [f.shape[1:3] for f in feats]
    half = (-(-images.shape[1] // 2), -(-images.shape[2] // 2))

    aux = []
    if train or self.is_initializing():
      for s in self.ss_stages:
        y = SSBranch(self.ss_width, self.ss_bn, self.dtype, name=f'ss_res{s + 2}')(feats[s], train)
        aux.append(conv(c, 1, use_bias=True, name=f'ss_res{s + 2}_classifier',
                        dtype=self.dtype)(y))

    if self.seb:
      feats = [SemanticEmbedding([f'res{i + 2}' for i in range(s + 1, 4)], self.seb_init,
                                 self.decoder_bn, self.resize_mode, self.dtype, k_init,
                                 name=f'seb_res{s + 2}')(feats[s], feats[s + 1:], train)
               for s in range(3)] + [feats[3]]

    def level(s, width):
      y = GlobalConv(width, self.gcn_kernel, self.decoder_bn, self.dtype, k_init,
                     name=f'gcn_res{s + 2}')(feats[s], train)
      return BoundaryRefine(self.decoder_bn, self.dtype, k_init, name=f'br_res{s + 2}')(y, train)

    br = lambda name, x: BoundaryRefine(self.decoder_bn, self.dtype, k_init, name=name)(x, train)
    up = lambda name, x, size: Upsample2x(self.upsample, self.dtype, name=name)(x, size)
    if self.ecre:
      x = level(3, 4 * c if self.ecre_source == 'gcn' else c)
      if self.ecre_source == 'conv':
        x = conv(4 * c, 3, use_bias=True, name='ecre', dtype=self.dtype, kernel_init=k_init)(x)
      x = pixel_shuffle(x, 2)
      x = jax.lax.slice(x, (0, 0, 0, 0), (x.shape[0], *sizes[2], x.shape[3]))
      ecre_logits = x
    else:
      x = up('up_res5', level(3, c), sizes[2])
    for s in (2, 1, 0):
      x = br(f'br_fuse_res{s + 2}', x + level(s, c))
      x = up(f'up_res{s + 2}', x, sizes[s - 1] if s else half)
    x = br('br_half', x)
    x = br('br_out', up('up_half', x, images.shape[1:3]))
    if self.dap:
      k2 = self.dap_kernel ** 2
      tiled = lambda key, shape, dtype=jnp.float32: jnp.tile(
          jnp.eye(c, dtype=dtype), (1, k2)).reshape(shape)
      x = conv(c * k2, 1, use_bias=True, name='dap_proj', dtype=self.dtype, kernel_init=tiled)(x)
      x = dense_adjacent_prediction(x, self.dap_kernel)
    if self.ecre:
      aux.append(ecre_logits)
    logits = x.astype(jnp.float32)
    if train and aux:
      return logits, tuple(a.astype(jnp.float32) for a in aux)
    return logits


# every ExFuse component on: the last rung of the ladder (paper Table 3 row 7)
EXFUSE_COMPONENTS = dict(ss_stages=(0, 1, 2, 3), seb=True, ecre=True, dap=True)
# Test-sized: 1 block per stage, 8-channel stem, 2 groups of 4 (ResNeXt-like), k = 5.
_TINY_DECODER = dict(gcn_kernel=5, ss_width=8)
_TINY = dict(encoder=ENCODERS['resnext_tiny'], **_TINY_DECODER)
# create_model overrides that shrink any variant (ladder rungs included) to test size.
TINY_OVERRIDES = {**ENCODERS['resnext_tiny'].keywords, **_TINY_DECODER}

VARIANTS = {
    'gcn_resnext50': functools.partial(ExFuse, encoder=ENCODERS['resnext50_32x4d']),
    'gcn_resnext101': functools.partial(ExFuse, encoder=ENCODERS['resnext101_32x4d']),
    # the GCN paper's own backbone
    'gcn_resnet152': functools.partial(ExFuse, encoder=ENCODERS['resnet152']),
    'exfuse_resnext101': functools.partial(ExFuse, encoder=ENCODERS['resnext101_lr_32x4d'],
                                           **EXFUSE_COMPONENTS),
    'gcn_tiny': functools.partial(ExFuse, **_TINY),
    'exfuse_tiny': functools.partial(ExFuse, **_TINY, **EXFUSE_COMPONENTS),
}
