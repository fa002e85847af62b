"""FCN-32s/16s/8s on VGG16 (Long, Shelhamer, Darrell, CVPR 2015 / PAMI 2017), as released.

The graph is the released Caffe one (shelhamer/fcn.berkeleyvision.org, also wkentaro/pytorch-fcn):
conv1_1 padded by 100 and 2x2 max pools in Caffe's ceil mode, fc6/fc7 as 7x7 (valid) and 1x1
convs with element-wise dropout 0.5, zero-initialised score convs, bilinear transposed
convolutions and crops at the offsets Caffe's ``coord_map`` derives (19 / 27 / 31 for the final
upsampling of 32s / 16s / 8s, 5 and 9 for the pool4 and pool3 scores). The pad of 100 is what
makes the output exactly the input's size for every input from 1x1 up, with no per-size offsets.

The released models keep every upsampling fixed to bilinear, so here they are constants, not
parameters: the optimizer, weight decay and parameter counts never see them. A frozen bilinear
transposed conv is separable and acts per class, so it (and the crop after it) is applied as
two small interpolation matmuls instead of a dense (C, C, k, k) deconvolution.
``learned_upsampling=True`` is the CVPR variant: the intermediate 2x deconvolutions become
(bilinear-initialised) parameters; the final one stays fixed.

Staged training (32s -> 16s -> 8s) starts a finer net from the coarser one's weights with its new
skip scores at zero (:func:`upgrade_variables`); FCN-8s "at-once" instead scales pool4 by 0.01
and pool3 by 1e-4 before their score convs so all streams can train together from VGG16.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax
from refinenet_jax.models.layers import is_static, max_pool
from refinenet_jax.tree_check import check_tree

Dtype = Any

VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_DEPTHS = (2, 2, 3, 3, 3)

# output stride -> (kernel, stride, crop offset) of each upsampling, coarse to fine; the last one
# brings the scores to the input size. Skip crop offsets: pool4 5, pool3 9.
UPSAMPLING = {32: ((64, 32, 19),), 16: ((4, 2, 0), (32, 16, 27)),
              8: ((4, 2, 0), (4, 2, 0), (16, 8, 31))}
SKIP_CROPS = (5, 9)  # pool4, pool3
# Caffe/wkentaro names of the upsamplings, coarse to fine.
UPSCORE_NAMES = {32: ('upscore',), 16: ('upscore2', 'upscore16'),
                 8: ('upscore2', 'upscore_pool4', 'upscore8')}


def bilinear_1d(kernel: int) -> np.ndarray:
  """The 1-D factor of Caffe's bilinear deconvolution filter (``surgery.upsample_filt``)."""
  factor = (kernel + 1) // 2
  centre = factor - 1 if kernel % 2 == 1 else factor - 0.5
  return 1 - np.abs(np.arange(kernel) - centre) / factor


def bilinear_kernel(kernel: int, channels: int) -> np.ndarray:
  """(kernel, kernel, channels, channels) float32: the 2-D filter on the class diagonal."""
  f = bilinear_1d(kernel)
  w = np.zeros((kernel, kernel, channels, channels), np.float32)
  w[:, :, np.arange(channels), np.arange(channels)] = np.outer(f, f)[:, :, None]
  return w


def _bilinear_init(key, shape, dtype=jnp.float32):
  del key
  kh, kw, cin, cout = shape
  if kh != kw or cin != cout:
    raise ValueError(f'bilinear init needs a square kernel and in == out channels, got {shape}')
  return jnp.asarray(bilinear_kernel(kh, cin), dtype)


@functools.lru_cache(maxsize=256)
def _upsampling_matrix(n_in: int, kernel: int, stride: int, offset: int, n_out: int) -> np.ndarray:
  """(n_out, n_in): a 1-D bilinear transposed conv ((n_in-1)*stride + kernel outputs) cropped
  to ``[offset, offset + n_out)``."""
  full = (n_in - 1) * stride + kernel
  if offset + n_out > full:
    raise ValueError(f'crop [{offset}, {offset + n_out}) exceeds the {full} upsampled positions')
  m = np.zeros((full, n_in), np.float32)
  f = bilinear_1d(kernel).astype(np.float32)
  for i in range(n_in):
    m[i * stride:i * stride + kernel, i] = f
  return m[offset:offset + n_out]


def bilinear_upsample(x, kernel: int, stride: int, offset: int = 0, size=None):
  """Frozen Caffe bilinear deconvolution of NHWC ``x`` (per channel), then a crop to ``size``
  (H, W) at ``offset``; ``size=None`` keeps the whole (in-1)*stride + kernel output."""
  h, w = x.shape[1:3]
  if size is None:
    size = ((h - 1) * stride + kernel, (w - 1) * stride + kernel)
  matrix = _upsampling_matrix if is_static(h, w, *size) else _traced_upsampling_matrix
  mh = jnp.asarray(matrix(h, kernel, stride, offset, size[0]), x.dtype)
  mw = jnp.asarray(matrix(w, kernel, stride, offset, size[1]), x.dtype)
  x = jnp.einsum('oh,nhwc->nowc', mh, x)
  return jnp.einsum('pw,nowc->nopc', mw, x)


def learned_deconv(features: int, kernel: int, stride: int, dtype: Dtype = jnp.float32,
                   name: str | None = None) -> nn.ConvTranspose:
  """A trainable, bilinear-initialised transposed conv ((in-1)*stride + kernel outputs)."""
  return nn.ConvTranspose(features, (kernel, kernel), (stride, stride), 'VALID', use_bias=False,
                          kernel_init=_bilinear_init, dtype=dtype, param_dtype=jnp.float32,
                          name=name)


def _traced_upsampling_matrix(n_in, kernel: int, stride: int, offset: int, n_out):
  """:func:`_upsampling_matrix` built in the graph, for symbolic sizes (``jax.export``); exact,
  as it only looks the filter taps up."""
  o = lax.broadcasted_iota(jnp.int32, (n_out, n_in), 0)
  i = lax.broadcasted_iota(jnp.int32, (n_out, n_in), 1)
  tap = o + offset - i * stride
  taps = jnp.asarray(bilinear_1d(kernel), jnp.float32)
  return jnp.where((tap >= 0) & (tap < kernel), taps[jnp.clip(tap, 0, kernel - 1)], 0.0)


def max_pool_ceil(x):
  """2x2/2 max pool with Caffe's ceil rounding: an odd last row/column is pooled alone. One row
  and column of -inf padding gives ceil(n / 2) windows for any n, and an even n never reaches
  it, so the padding needs no size (and works for ``jax.export``'s symbolic ones)."""
  return max_pool(x, (2, 2), (2, 2), ((0, 1), (0, 1)))


def _crop(x, offset: int, size):
  if is_static(*size, *x.shape[1:3]) and (offset + size[0] > x.shape[1]
                                          or offset + size[1] > x.shape[2]):
    raise ValueError(f'cannot crop {size} at offset {offset} from {x.shape[1:3]}')
  return x[:, offset:offset + size[0], offset:offset + size[1]]


class VGGTrunk(nn.Module):
  """VGG16 convs (conv1_1 padded by ``first_pad``), ceil-mode pools and convolutionalised
  fc6/fc7; returns (pool3, pool4, fc7 output)."""
  widths: Sequence[int] = VGG16_WIDTHS
  depths: Sequence[int] = VGG16_DEPTHS
  fc_width: int = 4096
  first_pad: int = 100
  dropout: float = 0.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=jnp.float32)
    pools = []
    for b, (width, depth) in enumerate(zip(self.widths, self.depths), 1):
      for i in range(1, depth + 1):
        p = self.first_pad if (b, i) == (1, 1) else 1
        x = nn.relu(conv(width, (3, 3), padding=((p, p), (p, p)), name=f'conv{b}_{i}')(x))
      x = max_pool_ceil(x)
      pools.append(x)
    for name, k in (('fc6', 7), ('fc7', 1)):  # fc6 sees pool5's 7x7 window (VGG's classifier)
      x = nn.relu(conv(self.fc_width, (k, k), padding='VALID', name=name)(x))
      # element-wise as in Caffe (wkentaro's port uses channel-wise Dropout2d)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return pools[2], pools[3], x


class FCN(nn.Module):
  num_classes: int
  output_stride: int = 8  # 32, 16 or 8: fuse no skip, pool4, or pool4 and pool3
  skip_scales: Sequence[float] = (1.0, 1.0)  # pool4, pool3 multipliers; at-once: (0.01, 1e-4)
  learned_upsampling: bool = False  # CVPR: intermediate 2x deconvs learned (none in 32s)
  # trunk (VGG16 by default; the tiny variants shrink the widths)
  widths: Sequence[int] = VGG16_WIDTHS
  depths: Sequence[int] = VGG16_DEPTHS
  fc_width: int = 4096
  first_pad: int = 100
  dropout: float = 0.5
  dtype: Dtype = jnp.float32
  # Caffe VGG16 / released FCN weights expect BGR minus mean; torchvision VGG16 'imagenet'
  normalization: str = 'caffe_bgr'

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images: (N, H, W, 3) normalised as ``self.normalization``; logits (N, H, W, C)."""
    if self.output_stride not in UPSAMPLING:
      raise ValueError(f'output_stride must be one of {sorted(UPSAMPLING)}, '
                       f'got {self.output_stride}')
    size = images.shape[1:3]
    pool3, pool4, x = VGGTrunk(self.widths, self.depths, self.fc_width, self.first_pad,
                               self.dropout, self.dtype, name='encoder')(
                                   images.astype(self.dtype), train)
    # Caffe leaves score layers to its default constant-0 filler: a fresh (or freshly upgraded)
    # net predicts exactly what its initialisation or coarser parent did.
    score = functools.partial(nn.Conv, self.num_classes, (1, 1), dtype=self.dtype,
                              param_dtype=jnp.float32, kernel_init=nn.initializers.zeros)
    x = score(name='classifier')(x)  # Caffe's score_fr
    ups = UPSAMPLING[self.output_stride]
    names = UPSCORE_NAMES[self.output_stride]
    skips = (('score_pool4', pool4), ('score_pool3', pool3))
    for j, ((kernel, stride, _), name) in enumerate(zip(ups[:-1], names)):
      if self.learned_upsampling:
        x = learned_deconv(self.num_classes, kernel, stride, self.dtype, name=name)(x)
      else:
        x = bilinear_upsample(x, kernel, stride)
      skip_name, feats = skips[j]
      if self.skip_scales[j] != 1.0:
        feats = feats * jnp.asarray(self.skip_scales[j], self.dtype)
      x = x + _crop(score(name=skip_name)(feats), SKIP_CROPS[j], x.shape[1:3])
    kernel, stride, offset = ups[-1]
    x = bilinear_upsample(x, kernel, stride, offset, size)
    return x.astype(jnp.float32)


_TRUNK_FIELDS = ('widths', 'depths', 'fc_width', 'first_pad')


def _stride(name: str) -> int | None:
  ctor = VARIANTS.get(name)
  return ctor.keywords.get('output_stride') if isinstance(ctor, functools.partial) else None


def is_coarser(source: str, target: str) -> bool:
  """Whether registered model ``source`` is a coarser FCN with ``target``'s trunk (e.g.
  'fcn32s' for 'fcn16s'), so :func:`upgrade_variables` can start ``target`` from it."""
  a, b = _stride(source), _stride(target)
  if a is None or b is None or a <= b:
    return False
  trunk = lambda n: {k: v for k, v in VARIANTS[n].keywords.items() if k in _TRUNK_FIELDS}
  return trunk(source) == trunk(target)


def head_init(path, shape, dtype=jnp.float32):
  """The deterministic initial value of a non-trunk leaf (``path`` from the collection down):
  zero for the score convs, bilinear for learned deconvolutions."""
  top, leaf = path[-2], path[-1]
  if top in ('classifier', 'score_pool4', 'score_pool3'):
    return np.zeros(shape, dtype)
  if top in UPSCORE_NAMES[8] and leaf == 'kernel':
    return np.asarray(_bilinear_init(None, shape, dtype))
  raise KeyError(f'{"/".join(path)} is not an FCN head variable')


def upgrade_variables(variables, model: FCN, source: FCN | None = None):
  """A coarser FCN's variables -> ``model``'s (staged training: 32s -> 16s -> 8s).

  Everything the coarser net has (trunk, score_fr, learned deconvs) is copied; the new skip
  score convs start at zero and new learned deconvs at bilinear. The skips then add exactly
  zero, so at step 0 the finer net outputs the coarser net's score map through its own
  upsampling chain, aligned identically; a chain of bilinear steps (2x then 16x) is not one 32x
  bilinear step, so logits differ slightly where the score map curves (argmax rarely).
  Anything missing, left over or mis-shaped raises and nothing is returned; so does a
  ``source`` model (the coarser net) that expects a different input normalisation.
  """
  if source is not None and source.normalization != model.normalization:
    raise ValueError(f'the coarser FCN expects {source.normalization!r} input, this model '
                     f'{model.normalization!r}')
  have = traverse_util.flatten_dict(dict(variables['params']))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  want = traverse_util.flatten_dict(dict(abstract['params']))
  new = lambda p: p[0] in ('score_pool4', 'score_pool3') or p[0] in UPSCORE_NAMES[8]
  expected = {p: v for p, v in want.items() if p in have or not new(p)}
  check_tree(variables['params'], traverse_util.unflatten_dict(expected),
             ' (coarser FCN -> finer FCN)')
  out = {p: have[p] if p in have else head_init(p, v.shape, v.dtype) for p, v in want.items()}
  return {'params': traverse_util.unflatten_dict(out)}


def start_from(source: str, target: str, variables, model: FCN):
  """The registry hook (``models.start_from``): a coarser FCN starts a finer one; None for any
  other source."""
  return upgrade_variables(variables, model) if is_coarser(source, target) else None


_AT_ONCE = dict(output_stride=8, skip_scales=(0.01, 0.0001))
# Test-sized trunk: the same graph (pad 100, 7x7 fc6, all crops) with a few channels.
_TINY = dict(widths=(4, 8, 8, 16, 16), fc_width=32)

VARIANTS = {
    'fcn32s': functools.partial(FCN, output_stride=32),
    'fcn16s': functools.partial(FCN, output_stride=16),
    'fcn8s': functools.partial(FCN, output_stride=8),
    'fcn8s_atonce': functools.partial(FCN, **_AT_ONCE),
    'fcn32s_tiny': functools.partial(FCN, output_stride=32, **_TINY),
    'fcn16s_tiny': functools.partial(FCN, output_stride=16, **_TINY),
    'fcn8s_tiny': functools.partial(FCN, output_stride=8, **_TINY),
    'fcn8s_atonce_tiny': functools.partial(FCN, **_AT_ONCE, **_TINY),
}
