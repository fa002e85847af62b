"""Test-time inference against hand-computed references with small toy models."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refinenet_jax.inference import (OFFICIAL_SCALES, predict_labels, predict_probs, scaled_size,
                                     window_starts)
from refinenet_jax.models.layers import resize_bilinear

C = 5
_W = jnp.asarray(np.random.default_rng(0).normal(0, 0.02, (3, C)), jnp.float32)
_B = jnp.asarray(np.random.default_rng(1).normal(0, 0.5, (C,)), jnp.float32)
_G = jnp.asarray(np.random.default_rng(2).normal(0, 1.0, (3, C)), jnp.float32)


def pointwise(x):
  """Full-resolution, translation-invariant logits: a 1x1 conv with a nonlinearity."""
  return jnp.tanh(x @ _W + _B) * 3.0


def pool4(x):
  """Pointwise, then a 4x mean-pool with edge padding: RefineNet's ceil(size / 4) output."""
  y = pointwise(x)
  n, h, w, c = y.shape
  hp, wp = -(-h // 4), -(-w // 4)
  y = jnp.pad(y, ((0, 0), (0, 4 * hp - h), (0, 4 * wp - w), (0, 0)), mode='edge')
  return y.reshape(n, hp, 4, wp, 4, c).mean((2, 4))


def with_x_ramp(x):
  """Depends on the absolute column, so it is not flip-equivariant."""
  y = pool4(x)
  ramp = jnp.linspace(-2.0, 2.0, y.shape[2])[None, None, :, None]
  return y + ramp * jnp.arange(C, dtype=jnp.float32)


def with_global_mean(x):
  """Every output depends on the whole input: shows what padding and window boundaries see."""
  return pool4(x) + (jnp.mean(x, axis=(1, 2), keepdims=True) - 127.5) / 16.0 @ _G


def _images(h, w, n=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 255, (n, h, w, 3)), jnp.float32)


@partial(jax.jit, static_argnums=(0, 2, 3))
def _ref(f, x, out_size, mode='half_pixel'):
  return jax.nn.softmax(resize_bilinear(f(x), out_size, mode), axis=-1)


def _probs(f, x, **kw):
  """predict_probs under one jit: compiling op by op costs more than the tests themselves."""
  return jax.jit(partial(predict_probs, f, **kw))(x)


@pytest.mark.parametrize('hw', [(32, 48), (33, 47)])
def test_single_scale_is_softmax_of_resized_logits(hw):
  x = _images(*hw)
  got = _probs(pool4, x, out_size=hw)
  assert got.shape == (2, *hw, C) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _ref(pool4, x, hw), atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(jax.jit(partial(predict_labels, pool4, out_size=hw))(x),
                                jnp.argmax(_ref(pool4, x, hw), -1))
  np.testing.assert_allclose(_probs(pool4, x, out_size=(20, 30), resize_mode='align_corners'),
                             _ref(pool4, x, (20, 30), 'align_corners'), atol=1e-6)


def test_flip_averages_with_mirrored_prediction():
  x, hw = _images(33, 47), (33, 47)
  want = 0.5 * (_ref(with_x_ramp, x, hw) + _ref(with_x_ramp, x[:, :, ::-1], hw)[:, :, ::-1])
  got = _probs(with_x_ramp, x, out_size=hw, flip=True)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert np.abs(got - _ref(with_x_ramp, x, hw)).max() > 1e-2  # the flip really changes things


def test_multiscale_is_equal_weight_mean():
  x, out = _images(32, 48), (20, 30)
  scales = (0.5, 1.0, 1.5)
  sizes = [(16, 24), (32, 48), (48, 72)]
  want = sum(_ref(pool4, resize_bilinear(x, s, 'half_pixel'), out) for s in sizes) / 3
  got = _probs(pool4, x, out_size=out, scales=scales)
  assert got.shape == (2, 20, 30, C)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_official_scales_on_odd_size():
  assert OFFICIAL_SCALES == (0.4, 0.6, 0.8, 1.0, 1.2)
  assert [scaled_size((33, 47), s) for s in OFFICIAL_SCALES] == [
      (13, 19), (20, 28), (26, 38), (33, 47), (40, 56)]
  assert scaled_size((33, 47), 0.5) == (17, 24)  # half rounds up, as MATLAB round
  x = _images(33, 47, n=1)
  got = _probs(pool4, x, out_size=(33, 47), scales=OFFICIAL_SCALES)
  assert got.shape == (1, 33, 47, C)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize('size,window,stride,want', [
    (37, 16, 10, [0, 10, 20, 21]), (53, 24, 15, [0, 15, 29]), (32, 16, 16, [0, 16]),
    (16, 16, 5, [0]), (10, 16, 5, [0])])
def test_window_starts(size, window, stride, want):
  assert window_starts(size, window, stride) == want


def test_window_starts_cover_every_pixel_once_or_more():
  for size in range(1, 40):
    for window in (1, 4, 7, 16):
      for stride in range(1, window + 1):
        starts = window_starts(size, window, stride)
        count = np.zeros(max(size, window), int)
        for s in starts:
          count[s:s + window] += 1
        assert (count[:size] > 0).all() and starts == sorted(set(starts))
        assert starts[-1] == max(size - window, 0)
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
  with pytest.raises(ValueError):
    window_starts(40, 8, 9)


@pytest.mark.parametrize('hw,window,stride', [
    ((37, 53), (16, 24), (10, 15)),  # strides divide neither side
    ((37, 53), (16, 24), None),      # default stride, 2/3 of the window
    ((12, 20), (16, 24), None),      # smaller than the window: padded, then cropped back
    ((37, 20), (16, 24), (10, 15)),  # smaller in one dimension only
])
def test_window_equals_full_image_for_pointwise_model(hw, window, stride):
  x = _images(*hw)
  got = _probs(pointwise, x, out_size=hw, window=window, stride=stride)
  np.testing.assert_allclose(got, _ref(pointwise, x, hw), atol=1e-5)


def test_window_averages_overlaps_hand_computed():
  x = _images(20, 28, n=1)
  ys, xs = [0, 4], [0, 8, 12]
  acc, cnt = np.zeros((1, 20, 28, C)), np.zeros((20, 28, 1))
  for y0 in ys:
    for x0 in xs:
      acc[:, y0:y0 + 16, x0:x0 + 16] += _ref(with_global_mean, x[:, y0:y0 + 16, x0:x0 + 16],
                                             (16, 16))
      cnt[y0:y0 + 16, x0:x0 + 16] += 1
  got = _probs(with_global_mean, x, out_size=(20, 28), window=(16, 16), stride=(8, 8))
  np.testing.assert_allclose(got, acc / cnt, atol=1e-6)
  assert np.abs(got - _ref(with_global_mean, x, (20, 28))).max() > 1e-3


def test_small_image_padded_with_pad_value():
  x, mean = _images(10, 13, n=1), jnp.asarray([120.0, 110.0, 100.0])
  padded = jnp.broadcast_to(mean, (1, 16, 16, 3)).at[:, :10, :13].set(x)
  want = _ref(with_global_mean, padded, (16, 16))[:, :10, :13]
  got = _probs(with_global_mean, x, out_size=(10, 13), window=(16, 16), pad_value=mean)
  np.testing.assert_allclose(got, want, atol=1e-6)
  zero = _probs(with_global_mean, x, out_size=(10, 13), window=(16, 16))
  assert np.abs(zero - want).max() > 1e-3


def test_jit_matches_eager():
  x = _images(33, 47)
  kw = dict(out_size=(33, 47), scales=(0.75, 1.0), flip=True, window=(16, 24))
  eager = predict_probs(with_x_ramp, x, **kw)
  jitted = jax.jit(partial(predict_probs, with_x_ramp, **kw))(x)
  assert jitted.shape == (2, 33, 47, C)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)


def test_rejects_bad_arguments():
  x = _images(8, 8, n=1)
  with pytest.raises(ValueError):
    predict_probs(pool4, x, scales=())
  with pytest.raises(ValueError):
    predict_probs(pool4, x, window=(4, 4), stride=(5, 2))


@pytest.mark.parametrize('window_batch', [3, 8])
def test_windows_batched_over_the_mesh_equal_one_at_a_time(window_batch):
  """predict's large-image path: every device takes some of one image's windows at once (the
  last group filled up with blank windows), with the same probabilities as one window at a
  time on one device."""
  from refinenet_jax import sharding
  mesh = sharding.make_mesh(8)
  seen = []

  def logits_fn(x):  # records the batch layout the model sees
    jax.debug.inspect_array_sharding(x, callback=lambda s: seen.append(s))
    return with_global_mean(x)

  x = jax.random.uniform(jax.random.key(3), (1, 70, 90, 3)) * 255
  kw = dict(window=(32, 40), stride=(20, 25), scales=(1.0, 0.75), flip=True)
  one = jax.jit(partial(predict_probs, with_global_mean, **kw))(x)
  spread = jax.jit(partial(predict_probs, logits_fn, window_batch=window_batch,
                           place=sharding.window_placement(mesh), **kw))(x)
  np.testing.assert_allclose(spread, one, rtol=1e-5, atol=1e-6)
  assert seen and all(s.spec[0] == sharding.DATA_AXIS for s in seen)
  assert any(len(s.device_set) == 8 for s in seen)
