"""Building blocks shared by the segmentation models (NHWC, linen).

The decoder blocks follow the *released* RefineNet code (DrSleep/refinenet-pytorch and the
official MatConvNet graphs); options expose the CVPR-paper and "improved pooling" forms.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

Dtype = Any

RESIZE_MODES = ('align_corners', 'half_pixel')


@functools.lru_cache(maxsize=256)
def _interp_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
  """(n_out, n_in) linear-interpolation weights along one axis.

  'align_corners' reproduces PyTorch ``F.interpolate(..., align_corners=True)``;
  'half_pixel' reproduces ``align_corners=False`` (no antialiasing, also when shrinking).
  As a matrix the resize is a plain matmul, which XLA maps onto the MXU/tensor cores.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f'unknown resize mode {mode!r}; expected one of {RESIZE_MODES}')
  out = np.arange(n_out, dtype=np.float64)
  if mode == 'align_corners':
    src = out * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(out)
  else:
    src = np.maximum((out + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def _traced_interp_matrix(n_in, n_out, mode: str) -> jnp.ndarray:
  """:func:`_interp_matrix` built in the graph, for symbolic sizes (``jax.export`` with any
  height and width); float32 arithmetic, so it may differ from the float64 table by ~1e-7."""
  if mode not in RESIZE_MODES:
    raise ValueError(f'unknown resize mode {mode!r}; expected one of {RESIZE_MODES}')
  out = lax.broadcasted_iota(jnp.float32, (n_out, n_in), 0)
  col = lax.broadcasted_iota(jnp.int32, (n_out, n_in), 1)
  f_in, f_out = jnp.asarray(n_in, jnp.float32), jnp.asarray(n_out, jnp.float32)
  if mode == 'align_corners':
    src = out * ((f_in - 1) / jnp.maximum(f_out - 1, 1))
  else:
    src = jnp.maximum((out + 0.5) * (f_in / f_out) - 0.5, 0.0)
  lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), n_in - 1)
  hi = jnp.minimum(lo + 1, n_in - 1)
  frac = src - lo
  return jnp.where(col == lo, 1.0 - frac, 0.0) + jnp.where(col == hi, frac, 0.0)


def is_static(*dims) -> bool:
  """Whether every size is a plain integer (not a ``jax.export`` symbolic dimension)."""
  return all(isinstance(d, (int, np.integer)) for d in dims)


def resize_bilinear(x: jnp.ndarray, size: Sequence[int], mode: str = 'align_corners',
                    precision=None) -> jnp.ndarray:
  """Bilinear resize of an NHWC tensor to the exact spatial ``size`` (H, W)."""
  h_out, w_out = size
  h_in, w_in = x.shape[1], x.shape[2]
  if (h_in, w_in) == (h_out, w_out):  # symbolic sizes: equal only if provably so
    return x
  if is_static(h_in, w_in, h_out, w_out):
    mh, mw = _interp_matrix(h_in, int(h_out), mode), _interp_matrix(w_in, int(w_out), mode)
  else:
    mh, mw = _traced_interp_matrix(h_in, h_out, mode), _traced_interp_matrix(w_in, w_out, mode)
  mh, mw = jnp.asarray(mh, x.dtype), jnp.asarray(mw, x.dtype)
  x = jnp.einsum('oh,nhwc->nowc', mh, x, precision=precision)
  return jnp.einsum('pw,nowc->nopc', mw, x, precision=precision)


def _provably_ge(a, b) -> bool:
  """``a >= b`` for every value of the symbolic sizes (``jax.export``) in them; plain ints as
  usual. An undecidable comparison (true only for some sizes) counts as False."""
  try:
    return bool(a >= b)
  except jax.errors.InconclusiveDimensionOperation:
    return False


def largest_size(sizes):
  """The (H, W) that is at least every other in both dimensions, compared per dimension: the
  finest input of a fusion, also for ``jax.export``'s symbolic sizes (where a coarser map can
  tie with a finer one at small sizes, so only the finest is provably the largest)."""
  for size in sizes:
    if all(_provably_ge(size[0], s[0]) and _provably_ge(size[1], s[1]) for s in sizes):
      return size
  raise ValueError(f'no input is the largest in both dimensions: {sizes}')


# Platforms on which a separable max pool's gradient comes from window_max_1d's comparisons;
# elsewhere XLA differentiates its reduce-windows (only XLA:CPU was measured).
COMPARE_POOL_GRAD_BACKENDS = ('cpu',)


def max_pool(x: jnp.ndarray, window: Sequence[int], strides: Sequence[int],
             padding: Sequence[tuple[int, int]]) -> jnp.ndarray:
  """NHWC max pool with -inf padding; overlapping windows as a pass along W, then one along H.

  Max is separable, so the values are exactly those of one 2-D window, and pooling W first keeps
  the gradient's choice among tied maxima: the first in row-major order, as ``nn.max_pool`` and
  PyTorch pick. On XLA:CPU the CRP's 5x5 stride-1 pool runs 3x faster this way, 2.4x with its
  gradient (BENCHMARKS.md section 4), and faster still with ``window_max_1d``'s gradient
  (section 7). Non-overlapping windows (stride >= window, FCN's 2x2/2) stay one 2-D window.
  """
  if all(s >= w for s, w in zip(strides, window)):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                             ((0, 0), *padding, (0, 0)))
  x = window_max_1d(x, 2, window[1], strides[1], tuple(padding[1]))
  return window_max_1d(x, 1, window[0], strides[0], tuple(padding[0]))


def _window_max_1d(x, axis: int, window: int, stride: int, pad: tuple[int, int]):
  """Max over windows along one axis of x padded with -inf (XLA's reduce-window)."""
  along = lambda v, rest: tuple(v if a == axis else rest for a in range(x.ndim))
  return lax.reduce_window(x, -jnp.inf, lax.max, along(window, 1), along(stride, 1),
                           along(tuple(pad), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def window_max_1d(x, axis: int, window: int, stride: int, pad: tuple[int, int]):
  """``_window_max_1d``; on COMPARE_POOL_GRAD_BACKENDS its gradient goes to the first maximum of
  each window, found by one comparison per window tap and gathered back per input. XLA:CPU's own
  gradient carries (value, index) pairs through a reduce-window and scatters: slower, and more
  memory (BENCHMARKS.md section 7)."""
  return _window_max_1d(x, axis, window, stride, pad)


def _window_max_1d_fwd(x, axis, window, stride, pad):
  y = _window_max_1d(x, axis, window, stride, pad)
  return y, (x, y)


def _window_max_1d_bwd(axis, window, stride, pad, res, dy):
  def xla(x, y, dy):
    return jax.vjp(lambda x: _window_max_1d(x, axis, window, stride, pad), x)[1](dy)[0]

  def compare(x, y, dy):
    # the first tap of each window that holds its maximum, then each input gathers dy from the
    # (at most window) outputs whose chosen tap it is: two fused passes, no scatter
    pads = [(0, 0)] * x.ndim
    pads[axis] = pad
    xp = jnp.pad(x, pads, constant_values=-jnp.inf)
    n, length = y.shape[axis], x.shape[axis]
    tap_dtype = jnp.int8 if window < 127 else jnp.int32
    tap = jnp.full(y.shape, -1, tap_dtype)
    for j in reversed(range(window)):  # output i's tap j reads xp[i * stride + j]
      at_j = lax.slice_in_dim(xp, j, j + (n - 1) * stride + 1, stride, axis) == y
      tap = jnp.where(at_j, jnp.asarray(j, tap_dtype), tap)
    # outputs spread to stride spacing and padded: the output whose tap j is input k then sits
    # at k + window - 1 - j + pad[0]
    spread = [(0, 0, 0)] * x.ndim
    spread[axis] = (window - 1, pad[0] + length - (n - 1) * stride - 1, stride - 1)
    tap = lax.pad(tap, jnp.asarray(-1, tap_dtype), spread)
    dy = lax.pad(dy, jnp.zeros((), dy.dtype), spread)
    dx = jnp.zeros(x.shape, dy.dtype)
    for j in range(window):
      start = window - 1 - j + pad[0]
      chose = lax.slice_in_dim(tap, start, start + length, axis=axis) == j
      dx = dx + jnp.where(chose, lax.slice_in_dim(dy, start, start + length, axis=axis), 0)
    return dx
  # chosen here, not in the forward, so that inference programs hold no platform switch
  return (lax.platform_dependent(*res, dy, default=xla,
                                 **{p: compare for p in COMPARE_POOL_GRAD_BACKENDS}),)


window_max_1d.defvjp(_window_max_1d_fwd, _window_max_1d_bwd)


def max_pool_same(x: jnp.ndarray, window: int) -> jnp.ndarray:
  """Stride-1 max pool with -inf padding (PyTorch ``MaxPool2d(k, 1, k // 2)``)."""
  p = window // 2
  return max_pool(x, (window, window), (1, 1), ((p, p), (p, p)))


DECODER_INITS = {
    # official MatConvNet RefineNet: decoder and classifier weights ~ N(0, 0.01), biases 0
    'official': nn.initializers.normal(0.01),
    # PyTorch ports (nn.Conv2d default, kaiming_uniform(a=sqrt(5)))
    'pytorch': nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
}


def decoder_init(name: str):
  if name not in DECODER_INITS:
    raise ValueError(f'unknown decoder_init {name!r}; known: {sorted(DECODER_INITS)}')
  return DECODER_INITS[name]


# Platforms on which grouped convolutions run as one convolution per group. XLA:CPU lowers a
# grouped convolution's weight gradient ~90x slower than the per-group convolutions (ResNeXt's
# 32-group 3x3 at 1/4 resolution: 12.1 s vs 0.13 s), its forward ~6x (BENCHMARKS.md section 4);
# GPUs and TPUs have native grouped kernels, so they keep one grouped convolution.
SPLIT_GROUPED_CONV_BACKENDS = ('cpu',)


def grouped_conv_general_dilated(lhs, rhs, window_strides, padding, *, dimension_numbers=None,
                                 feature_group_count: int = 1, **kwargs):
  """``lax.conv_general_dilated`` (flax ``nn.Conv``'s ``conv_general_dilated`` hook) that runs a
  grouped convolution as one per group on SPLIT_GROUPED_CONV_BACKENDS: the same parameters and
  the same arithmetic per output, only a different lowering.

  The choice is ``lax.platform_dependent``: it follows the platform the program is lowered for,
  not the process's default backend, so a TPU program compiled on a CPU host keeps the native
  grouped convolution.
  """
  run = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                          padding=padding, dimension_numbers=dimension_numbers, **kwargs)
  g = feature_group_count
  if g == 1:
    return run(lhs, rhs)

  def per_group(lhs, rhs):
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    parts = zip(jnp.split(lhs, g, axis=dn.lhs_spec[1]), jnp.split(rhs, g, axis=dn.rhs_spec[0]))
    return jnp.concatenate([run(x, w) for x, w in parts], axis=dn.out_spec[1])

  native = lambda lhs, rhs: run(lhs, rhs, feature_group_count=g)
  return lax.platform_dependent(lhs, rhs, default=native,
                                **{p: per_group for p in SPLIT_GROUPED_CONV_BACKENDS})


def conv(features: int, kernel: int, *, use_bias: bool, name: str, dtype: Dtype,
         stride: int = 1, dilation: int = 1, kernel_init=None) -> nn.Conv:
  """Conv with PyTorch-style symmetric padding, so odd input sizes match exactly."""
  pad = dilation * (kernel - 1) // 2
  kwargs = {} if kernel_init is None else {'kernel_init': kernel_init}
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name, **kwargs)


class RCUStack(nn.Module):
  """``num_units`` chained Residual Conv Units: x + conv_b(relu(conv_a(relu(x)))).

  The first conv has a bias and the second none, as in the released models.
  """
  num_units: int
  features: int
  kernel: int = 3
  dtype: Dtype = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_units):
      y = conv(self.features, self.kernel, use_bias=True, name=f'rcu{i}_conv1', dtype=self.dtype,
               kernel_init=self.kernel_init)(nn.relu(x))
      y = conv(self.features, self.kernel, use_bias=False, name=f'rcu{i}_conv2',
               dtype=self.dtype, kernel_init=self.kernel_init)(nn.relu(y))
      x = x + y
    return x


class ChainedResidualPool(nn.Module):
  """Chained residual pooling after a leading ReLU.

  order='pool_conv': released VOC/Cityscapes models and the CVPR paper (each stage pools, then
  convolves). order='conv_pool': the official "improved residual pooling" (NYUDv2, Person-Part,
  PASCAL-Context, SUN-RGBD, ADE20K models). Every stage's output is added to the running sum.
  """
  stages: int
  features: int
  kernel: int = 3
  pool_window: int = 5
  order: str = 'pool_conv'
  dtype: Dtype = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def __call__(self, x):
    if self.order not in ('pool_conv', 'conv_pool'):
      raise ValueError(f"crp order must be 'pool_conv' or 'conv_pool', got {self.order!r}")
    x = nn.relu(x)
    top, out = x, x
    for j in range(self.stages):
      c = conv(self.features, self.kernel, use_bias=False, name=f'conv{j}', dtype=self.dtype,
               kernel_init=self.kernel_init)
      if self.order == 'pool_conv':
        top = c(max_pool_same(top, self.pool_window))
      else:
        top = max_pool_same(c(top), self.pool_window)
      out = out + top
    return out


class RefineBlock(nn.Module):
  """Multi-resolution fusion + chained residual pooling + output RCUs.

  Inputs are ``(prev, *paths)``; ``prev`` (the coarser block's output) may be None. With more
  than one input each gets its own no-bias conv to ``features`` at its own (low) resolution, then
  all are resized to the exact shape of the largest input and summed, so odd sizes work.
  """
  features: int
  path_ids: Sequence[int]
  crp_stages: int = 4
  crp_order: str = 'pool_conv'
  output_rcus: int = 3
  kernel: int = 3
  resize_mode: str = 'align_corners'
  dtype: Dtype = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def __call__(self, prev, paths):
    named = ([('mrf_prev', prev)] if prev is not None else []) + [
        (f'mrf_path{t}', p) for t, p in zip(self.path_ids, paths)]
    if len(named) == 1:
      x = named[0][1]
    else:
      target = largest_size([v.shape[1:3] for _, v in named])
      x = None
      for name, v in named:
        v = conv(self.features, self.kernel, use_bias=False, name=name, dtype=self.dtype,
                 kernel_init=self.kernel_init)(v)
        v = resize_bilinear(v, target, self.resize_mode)
        x = v if x is None else x + v
    if self.crp_stages:
      x = ChainedResidualPool(self.crp_stages, self.features, self.kernel, order=self.crp_order,
                              dtype=self.dtype, kernel_init=self.kernel_init, name='crp')(x)
    # crp_stages=0 (the paper's "no chained pooling" ablation) passes x through, ReLU included,
    # as the official generator skips the whole pool block.
    if self.output_rcus:
      x = RCUStack(self.output_rcus, self.features, self.kernel, self.dtype, self.kernel_init,
                   name='out_rcu')(x)
    return x
