"""Defining properties of the decoder building blocks, each against an independent reference."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from refinenet_jax.models.layers import (ChainedResidualPool, RCUStack, RefineBlock, max_pool,
                                         max_pool_same, resize_bilinear)


def _torch_bilinear_align_corners(x, out_h, out_w):
  """Loop reference of PyTorch bilinear(align_corners=True) on NHWC numpy."""
  n, h, w, c = x.shape
  y = np.zeros((n, out_h, out_w, c), np.float64)
  for i in range(out_h):
    sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
    for j in range(out_w):
      sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
      y[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                    + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return y


@pytest.mark.parametrize('src,dst', [((13, 17), (25, 33)), ((4, 4), (16, 16)), ((1, 5), (3, 9)),
                                     ((9, 7), (4, 3))])
def test_resize_align_corners_matches_pytorch_semantics(src, dst):
  x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
  got = resize_bilinear(jnp.asarray(x), dst, 'align_corners')
  np.testing.assert_allclose(got, _torch_bilinear_align_corners(x, *dst), rtol=1e-5, atol=1e-5)


def test_resize_half_pixel_matches_jax_image_for_upsampling():
  x = np.random.default_rng(1).normal(size=(1, 7, 9, 2)).astype(np.float32)
  got = resize_bilinear(jnp.asarray(x), (15, 20), 'half_pixel')
  ref = jax.image.resize(x, (1, 15, 20, 2), 'linear', antialias=False)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_resize_rejects_unknown_mode():
  with pytest.raises(ValueError, match='resize mode'):
    resize_bilinear(jnp.zeros((1, 3, 3, 1)), (5, 5), 'bicubic')


def test_max_pool_pads_with_minus_infinity():
  x = -jnp.arange(1.0, 26.0).reshape(1, 5, 5, 1)  # all negative: zero padding would leak 0
  y = max_pool_same(x, 5)
  assert float(y.max()) < 0
  assert float(y[0, 0, 0, 0]) == -1.0  # window clipped to the image, as MatConvNet/PyTorch


@pytest.mark.parametrize('window,strides,padding', [
    ((5, 5), (1, 1), ((2, 2), (2, 2))),  # CRP
    ((3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet stem
    ((2, 2), (2, 2), ((0, 1), (0, 1))),  # FCN's ceil-rounded pool on odd sizes
])
@pytest.mark.parametrize('gradient', ['comparisons', 'xla'])
def test_separable_max_pool_matches_2d_pool_and_its_gradient_at_ties(window, strides, padding,
                                                                     gradient, monkeypatch):
  from refinenet_jax.models import layers
  if gradient == 'xla':
    monkeypatch.setattr(layers, 'COMPARE_POOL_GRAD_BACKENDS', ())
  # Integer inputs in 0..3 tie in nearly every window, so a different choice among tied maxima
  # would move whole upstream gradients; integer cotangents make every sum exact.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 4, (2, 13, 11, 3)), jnp.float32)
  ref_fn = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)
  new_fn = lambda x: max_pool(x, window, strides, padding)
  y = new_fn(x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref_fn(x)))
  dy = jnp.asarray(rng.integers(-50, 50, y.shape), jnp.float32)
  grad = lambda f: np.asarray(jax.vjp(f, x)[1](dy)[0])
  np.testing.assert_array_equal(grad(new_fn), grad(ref_fn))
  assert np.count_nonzero(grad(new_fn)) < x.size  # one winner per window, not shared


def test_max_pool_gradient_on_cpu_has_no_index_carrying_reduce_window(monkeypatch):
  from refinenet_jax.models import layers
  x = jnp.zeros((1, 16, 16, 4))
  f = lambda x: jnp.sum(max_pool_same(x, 5) ** 2)

  def reduce_windows():  # in XLA's optimised program; a new function each time: traced again
    return jax.jit(jax.grad(lambda x: f(x))).lower(x).compile().as_text().count(' reduce-window(')
  assert reduce_windows() == 2  # the forward's two 1-D windows; the gradient compares
  monkeypatch.setattr(layers, 'COMPARE_POOL_GRAD_BACKENDS', ())
  assert reduce_windows() > 2


def test_grouped_conv_per_group_on_cpu_matches_one_grouped_conv(monkeypatch):
  from refinenet_jax.models import layers
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 9, 7, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 2, 12)), jnp.float32)  # 4 groups: 2 in, 3 out each
  dn = ('NHWC', 'HWIO', 'NHWC')

  def run():
    def f(x, w):  # a new function each time: jit must trace it again
      y = layers.grouped_conv_general_dilated(x, w, (2, 1), ((2, 2), (2, 2)),
                                              rhs_dilation=(2, 2), dimension_numbers=dn,
                                              feature_group_count=4)
      return jnp.sum(jnp.sin(y))
    hlo = jax.jit(f).lower(x, w).as_text()
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w), hlo

  (split_val, split_grads), split_hlo = run()
  monkeypatch.setattr(layers, 'SPLIT_GROUPED_CONV_BACKENDS', ())
  (val, grads), hlo = run()
  assert 'feature_group_count = 4' in hlo and 'feature_group_count = 4' not in split_hlo
  np.testing.assert_allclose(split_val, val, rtol=1e-6)
  for a, b in zip(split_grads, grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _conv_nhwc(x, kernel):
  p = kernel.shape[0] // 2
  return lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('order', ['pool_conv', 'conv_pool'])
def test_crp_is_chained_not_parallel(order):
  x = jax.random.normal(jax.random.key(0), (1, 9, 11, 4))
  crp = ChainedResidualPool(stages=3, features=4, order=order)
  v = crp.init(jax.random.key(1), x)
  got = crp.apply(v, x)
  r = jax.nn.relu(x)
  top, want = r, r
  for j in range(3):
    k = v['params'][f'conv{j}']['kernel']
    top = (_conv_nhwc(max_pool_same(top, 5), k) if order == 'pool_conv'
           else max_pool_same(_conv_nhwc(top, k), 5))
    want = want + top
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert set(v['params']) == {'conv0', 'conv1', 'conv2'}
  assert all('bias' not in p for p in v['params'].values())


def test_crp_orders_differ():
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  a = ChainedResidualPool(2, 4, order='pool_conv')
  b = ChainedResidualPool(2, 4, order='conv_pool')
  v = a.init(jax.random.key(1), x)
  assert not np.allclose(a.apply(v, x), b.apply(v, x))


def test_rcu_structure_and_preactivation():
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 4))
  rcu = RCUStack(num_units=2, features=4)
  v = rcu.init(jax.random.key(1), x)
  p = v['params']
  assert 'bias' in p['rcu0_conv1'] and 'bias' not in p['rcu0_conv2']
  y = rcu.apply(v, x)
  # with the second conv of every unit zeroed the stack is the identity: the skip is not ReLU'd.
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.zeros_like(a) if 'conv2' in jax.tree_util.keystr(path) else a, v)
  np.testing.assert_array_equal(rcu.apply(zeroed, x), x)
  x1 = x
  for i in range(2):
    h = _conv_nhwc(jax.nn.relu(x1), p[f'rcu{i}_conv1']['kernel']) + p[f'rcu{i}_conv1']['bias']
    x1 = x1 + _conv_nhwc(jax.nn.relu(h), p[f'rcu{i}_conv2']['kernel'])
  np.testing.assert_allclose(y, x1, rtol=1e-5, atol=1e-5)


def test_refine_block_fuses_odd_sizes_to_largest_input():
  prev = jax.random.normal(jax.random.key(0), (2, 7, 9, 8))
  path = jax.random.normal(jax.random.key(1), (2, 13, 17, 4))
  block = RefineBlock(features=4, path_ids=[2], crp_stages=2, output_rcus=1)
  v = block.init(jax.random.key(2), prev, [path])
  y = block.apply(v, prev, [path])
  assert y.shape == (2, 13, 17, 4)
  assert v['params']['mrf_prev']['kernel'].shape == (3, 3, 8, 4)  # conv at the low resolution
  assert v['params']['mrf_path2']['kernel'].shape == (3, 3, 4, 4)


def test_single_input_block_has_no_fusion_conv():
  x = jax.random.normal(jax.random.key(0), (1, 5, 5, 8))
  block = RefineBlock(features=8, path_ids=[0])
  v = block.init(jax.random.key(1), None, [x])
  assert not any(k.startswith('mrf') for k in v['params'])
  assert set(v['params']) == {'crp', 'out_rcu'}
