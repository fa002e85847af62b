"""Optimizer and loss semantics, each checked against a hand-computed reference."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from refinenet_jax import losses, optim
from refinenet_jax.models.layers import resize_bilinear

# Jitted: one compile beats dozens of eager dispatches on a busy 2-core machine.
_seg_loss = jax.jit(losses.segmentation_loss, static_argnames=('mode', 'ignore_label'))


def _config(**kw):
  c = ml_collections.ConfigDict(dict(
      optimizer='sgd', learning_rate=0.1, warmup_steps=0, num_steps=100, poly_power=0.9,
      momentum=0.0, nesterov=False, weight_decay=0.0, encoder_lr_mult=1.0, grad_clip_norm=0.0,
      grad_accum_steps=1))
  c.update(kw)
  return c


def _params():
  return {'encoder': {'w': jnp.full((2, 2), 3.0)},
          'head': {'w': jnp.full((2, 2), 2.0), 'b': jnp.ones(2)}}


def _step(config, grads, params=None, n=1):
  """Updates of ``n`` optimizer calls with the same gradient (the last one's)."""
  params = _params() if params is None else params
  tx = optim.make_optimizer(config)
  state = tx.init(params)
  for _ in range(n):
    updates, state = tx.update(grads, state, params)
  return updates


def _close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


# ---------------------------------------------------------------- schedule

def test_schedule_warmup_then_poly():
  f = optim.learning_rate_fn(_config(warmup_steps=10, num_steps=110))
  np.testing.assert_allclose([f(0), f(5), f(10)], [0.0, 0.05, 0.1], rtol=1e-6)
  np.testing.assert_allclose(f(60), 0.1 * 0.5 ** 0.9, rtol=1e-6)
  np.testing.assert_allclose(f(110), 0.0, atol=1e-9)
  g = optim.learning_rate_fn(_config(warmup_steps=0, num_steps=10, poly_power=2.0))
  np.testing.assert_allclose([g(0), g(5)], [0.1, 0.1 * 0.25], rtol=1e-6)
  with pytest.raises(ValueError, match='warmup'):
    optim.learning_rate_fn(_config(warmup_steps=20, num_steps=10))


def test_param_labels():
  p = {'encoder': {'a': 1.0}, 'encoder1': {'b': {'c': 2.0}}, 'classifier': {'d': 3.0}}
  assert optim.param_labels(p) == {'encoder': {'a': 'encoder'}, 'encoder1': {'b': {'c': 'encoder'}},
                                   'classifier': {'d': 'decoder'}}


# ---------------------------------------------------------------- SGD

def test_sgd_encoder_lr_mult():
  g = jax.tree.map(jnp.ones_like, _params())
  u = _step(_config(encoder_lr_mult=0.1), g)
  _close(u['head'], {'w': jnp.full((2, 2), -0.1), 'b': jnp.full(2, -0.1)}, rtol=1e-6)
  _close(u['encoder']['w'], 0.1 * u['head']['w'], rtol=1e-6)


def test_sgd_weight_decay_kernels_only_and_scaled_by_encoder_mult():
  g = jax.tree.map(jnp.zeros_like, _params())
  u = _step(_config(weight_decay=0.01, encoder_lr_mult=0.1), g)
  _close(u['head']['w'], -0.1 * 0.01 * 2.0 * jnp.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(u['head']['b'], 0.0)
  _close(u['encoder']['w'], -0.1 * 0.1 * 0.01 * 3.0 * jnp.ones((2, 2)), rtol=1e-6)


def test_sgd_momentum_and_nesterov():
  g = jax.tree.map(jnp.ones_like, _params())
  lr1 = 0.1 * (1 - 1 / 100) ** 0.9  # the schedule's value at the second update
  u = _step(_config(momentum=0.9), g, n=2)
  _close(u['head']['b'], -lr1 * 1.9 * jnp.ones(2), rtol=1e-6)
  u = _step(_config(momentum=0.9, nesterov=True), g, n=2)
  _close(u['head']['b'], -lr1 * (1 + 0.9 * 1.9) * jnp.ones(2), rtol=1e-6)


# ---------------------------------------------------------------- AdamW

def test_adamw_decoupled_decay_on_kernels_only():
  zero = jax.tree.map(jnp.zeros_like, _params())
  u = _step(_config(optimizer='adamw', weight_decay=0.05, encoder_lr_mult=0.5), zero)
  _close(u['head']['w'], -0.1 * 0.05 * 2.0 * jnp.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(u['head']['b'], 0.0)
  _close(u['encoder']['w'], -0.5 * 0.1 * 0.05 * 3.0 * jnp.ones((2, 2)), rtol=1e-6)
  # first Adam step is lr * sign(g) whatever the gradient's size (not SGD's lr * g)
  g = {'encoder': {'w': jnp.full((2, 2), 7.0)}, 'head': {'w': jnp.zeros((2, 2)),
                                                          'b': jnp.array([-3.0, 0.02])}}
  u = _step(_config(optimizer='adamw'), g)
  _close(u['head']['b'], jnp.array([0.1, -0.1]), rtol=1e-5)
  _close(u['encoder']['w'], jnp.full((2, 2), -0.1), rtol=1e-5)


def test_unknown_optimizer_raises():
  with pytest.raises(ValueError, match='lamb'):
    optim.make_optimizer(_config(optimizer='lamb'))


# ---------------------------------------------------------------- clipping

def test_global_norm_clipping():
  g = {'encoder': {'w': jnp.full((2, 2), 2.0)},  # global norm sqrt(4*4 + 4*9 + 48) = 10
       'head': {'w': jnp.full((2, 2), 3.0), 'b': jnp.array([4.0, jnp.sqrt(32.0)])}}
  clipped = _step(_config(grad_clip_norm=1.0), g)
  _close(clipped, _step(_config(), jax.tree.map(lambda x: x / 10, g)), rtol=1e-6)
  small = jax.tree.map(lambda x: x / 20, g)  # norm 0.5: untouched
  _close(_step(_config(grad_clip_norm=1.0), small), _step(_config(), small), rtol=1e-6)


# ---------------------------------------------------------------- accumulation

def test_grad_accumulation_equals_big_batch():
  rng = np.random.default_rng(0)
  x, y = jnp.asarray(rng.normal(size=(8, 3))), jnp.asarray(rng.normal(size=(8,)))
  p0 = {'encoder': {'kernel': jnp.asarray(rng.normal(size=(3, 1)))},
        'head': {'bias': jnp.zeros(1)}}

  def loss(p, xb, yb):
    return jnp.mean((xb @ p['encoder']['kernel'] + p['head']['bias'] - yb[:, None]) ** 2)

  grad = jax.jit(jax.grad(loss))
  kw = dict(momentum=0.9, weight_decay=0.01, encoder_lr_mult=0.5, num_steps=10)

  def run(k, batch):
    tx = optim.make_optimizer(_config(grad_accum_steps=k, **kw))
    p, s, history, update = p0, tx.init(p0), [], jax.jit(tx.update)
    for i in range(2 * k):  # two optimizer updates
      sl = slice((i % k) * batch, (i % k + 1) * batch)
      u, s = update(grad(p, x[sl], y[sl]), s, p)
      p = jax.tree.map(jnp.add, p, u)
      history.append(p)
    return history

  big, small = run(1, 8), run(4, 2)
  for i in (0, 1, 2):  # micro-steps 1..3 leave params alone
    _close(small[i], p0, rtol=0, atol=0)
  _close(small[3], big[0], rtol=1e-6, atol=1e-6)
  # the second update uses the schedule's second value (counts updates, not micro-batches)
  _close(small[7], big[1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(big[0]['encoder']['kernel'], p0['encoder']['kernel'])


# ---------------------------------------------------------------- losses

def _ce_ref(logits, label):
  logits = np.asarray(logits, np.float64)
  return np.log(np.exp(logits).sum()) - logits[label]


_LOGITS = jnp.array([[[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [9.0, 9.0, 9.0]]]])  # (1, 1, 3, 3)


def test_cross_entropy_by_hand_and_ignore():
  labels = jnp.array([[[0, 2, 255]]], jnp.uint8)
  total, norm = losses.cross_entropy(_LOGITS, labels)
  want = _ce_ref(_LOGITS[0, 0, 0], 0) + _ce_ref(_LOGITS[0, 0, 1], 2)
  np.testing.assert_allclose(total, want, rtol=1e-6)
  assert float(norm) == 2.0
  # the ignored pixel's logits do not matter
  other = _LOGITS.at[0, 0, 2].set(jnp.array([-50.0, 0.0, 50.0]))
  np.testing.assert_allclose(losses.cross_entropy(other, labels)[0], want, rtol=1e-6)
  # a different ignore label turns pixel 0 off instead
  total, norm = losses.cross_entropy(_LOGITS, jnp.array([[[0, 2, 1]]]), ignore_label=0)
  np.testing.assert_allclose(total, _ce_ref(_LOGITS[0, 0, 1], 2) + _ce_ref(_LOGITS[0, 0, 2], 1),
                             rtol=1e-6)
  assert float(norm) == 2.0


def test_cross_entropy_class_weights():
  labels = jnp.array([[[0, 1, 255]]], jnp.int32)
  total, norm = losses.cross_entropy(_LOGITS, labels, class_weights=[2.0, 0.5, 10.0])
  want = 2.0 * _ce_ref(_LOGITS[0, 0, 0], 0) + 0.5 * _ce_ref(_LOGITS[0, 0, 1], 1)
  np.testing.assert_allclose(total, want, rtol=1e-6)
  np.testing.assert_allclose(norm, 2.5)
  loss, _ = losses.segmentation_loss(_LOGITS, labels, mode='upsample',
                                     class_weights=jnp.array([2.0, 0.5, 10.0]))
  np.testing.assert_allclose(loss, want / 2.5, rtol=1e-6)
  unweighted = losses.cross_entropy(_LOGITS, labels)
  _close(losses.cross_entropy(_LOGITS, labels, class_weights=()), unweighted, rtol=1e-6)


def test_nearest_downsample_takes_cell_centre():
  labels = jnp.arange(16).reshape(1, 4, 4)
  np.testing.assert_array_equal(losses.nearest_downsample(labels, (2, 2)), [[[5, 7], [13, 15]]])


def _random_logits(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_quarter_mode_uses_cell_centre_labels():
  logits = _random_logits((1, 2, 2, 3))
  centre = np.array([[[1, 2], [0, 1]]])
  labels = np.zeros((1, 8, 8), np.uint8)  # top-left of each 4x4 cell stays 0, centre differs
  labels[0, 2::4, 2::4] = centre[0]
  loss, parts = losses.segmentation_loss(logits, jnp.asarray(labels))
  total, norm = losses.cross_entropy(logits, jnp.asarray(centre))
  np.testing.assert_allclose(loss, total / norm, rtol=1e-6)
  top_left = losses.cross_entropy(logits, jnp.zeros((1, 2, 2), jnp.int32))
  assert not np.isclose(loss, top_left[0] / top_left[1])
  assert set(parts) == {'loss/main'}


def test_upsample_mode_compares_at_full_resolution():
  logits = _random_logits((2, 2, 3, 4))
  labels = jnp.asarray(np.random.default_rng(1).integers(0, 4, size=(2, 5, 7)))
  labels = labels.at[0, 0, :3].set(255)
  loss, _ = losses.segmentation_loss(logits, labels, mode='upsample')
  total, norm = losses.cross_entropy(resize_bilinear(logits, (5, 7), 'align_corners'), labels)
  assert float(norm) == 2 * 35 - 3
  np.testing.assert_allclose(loss, total / norm, rtol=1e-6)


def test_aux_terms_add_with_their_weights():
  logits, aux0, aux1 = (_random_logits(s, i) for i, s in
                        enumerate([(1, 2, 2, 3), (1, 4, 4, 3), (1, 1, 1, 3)]))
  labels = jnp.asarray(np.random.default_rng(3).integers(0, 3, size=(1, 8, 8)))
  for mode in losses.LOSS_MODES:
    single = lambda lg: _seg_loss(lg, labels, mode=mode)[0]
    loss, parts = _seg_loss(logits, labels, mode=mode, aux_logits=[aux0, aux1],
                                           aux_weights=[0.4, 0.1])
    _close(parts, {'loss/main': single(logits), 'loss/aux0': single(aux0),
                   'loss/aux1': single(aux1)}, rtol=1e-6)
    np.testing.assert_allclose(loss, single(logits) + 0.4 * single(aux0) + 0.1 * single(aux1),
                               rtol=1e-6)


def test_all_ignored_gives_zero_loss_and_finite_grad():
  labels = jnp.full((1, 4, 4), 255, jnp.uint8)
  f = lambda lg: losses.segmentation_loss(lg, labels)[0]
  logits = _random_logits((1, 2, 2, 3))
  assert float(f(logits)) == 0.0
  assert np.all(np.isfinite(jax.grad(f)(logits)))


def test_loss_argument_errors():
  logits, labels = _random_logits((1, 2, 2, 3)), jnp.zeros((1, 8, 8), jnp.int32)
  with pytest.raises(ValueError, match="'quarter', 'upsample'"):
    losses.segmentation_loss(logits, labels, mode='bilinear')
  with pytest.raises(ValueError, match='aux'):
    losses.segmentation_loss(logits, labels, aux_logits=[logits], aux_weights=[])


def test_sum_reduction_is_the_unnormalised_total_and_mean_is_unchanged():
  logits, aux = _random_logits((2, 3, 4, 3)), _random_logits((2, 2, 2, 3), 1)
  labels = jnp.asarray(np.random.default_rng(2).integers(0, 3, size=(2, 6, 8)))
  labels = labels.at[0, :2].set(255)
  weights = jnp.array([1.0, 2.0, 0.5])
  kw = dict(mode='upsample', class_weights=weights, aux_logits=[aux], aux_weights=[0.4])
  mean, mean_parts = losses.segmentation_loss(logits, labels, **kw)
  # 'mean' is the default and the same computation as before the switch existed
  default, _ = losses.segmentation_loss(logits, labels, reduction='mean', **kw)
  assert float(default) == float(mean)
  total, parts = losses.segmentation_loss(logits, labels, reduction='sum', **kw)
  for name, lg in (('loss/main', logits), ('loss/aux0', aux)):
    s, n = losses.cross_entropy(resize_bilinear(lg, (6, 8), 'align_corners'), labels,
                                class_weights=weights)
    np.testing.assert_allclose(parts[name], s, rtol=1e-6)  # Caffe normalize=False
    np.testing.assert_allclose(mean_parts[name], s / n, rtol=1e-6)
  np.testing.assert_allclose(total, parts['loss/main'] + 0.4 * parts['loss/aux0'], rtol=1e-6)
  # all-ignored: the sum is 0 as well, with a finite gradient
  ignored = jnp.full((1, 4, 4), 255, jnp.uint8)
  f = lambda lg: losses.segmentation_loss(lg, ignored, reduction='sum')[0]
  assert float(f(logits[:1])) == 0.0 and np.all(np.isfinite(jax.grad(f)(logits[:1])))
  with pytest.raises(ValueError, match="'mean', 'sum'"):
    losses.segmentation_loss(logits, labels, reduction='none')


def test_train_step_threads_the_loss_reduction():
  import flax.linen as nn
  import optax
  from refinenet_jax import steps

  class PixelClassifier(nn.Module):
    normalization: str = 'imagenet'

    @nn.compact
    def __call__(self, x, train=False):
      return nn.Conv(3, (1, 1))(x)

  model = PixelClassifier()
  state = steps.init_train_state(jax.random.key(0), model=model, tx=optax.sgd(0.0),
                                 input_shape=(1, 8, 8, 3))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.integers(0, 255, (2, 8, 8, 3)), jnp.uint8),
           'label': jnp.asarray(rng.integers(0, 3, (2, 8, 8)), jnp.int32)}
  run = lambda **kw: steps.train_step(state, batch, model=model, loss_fn=functools.partial(
      losses.segmentation_loss, mode='upsample', **kw))[1]
  mean, default, summed = run(reduction='mean'), run(), run(reduction='sum')
  assert float(mean['loss']) == float(default['loss'])
  np.testing.assert_allclose(summed['loss'], mean['loss'] * 2 * 8 * 8, rtol=1e-5)
  np.testing.assert_allclose(summed['grad_norm'], mean['grad_norm'] * 2 * 8 * 8, rtol=1e-4)


def test_config_loss_picks_a_registered_loss_with_the_config_settings_bound(monkeypatch):
  calls = []

  def recording(logits, labels, **kwargs):
    calls.append(kwargs)
    return jnp.float32(0.0), {'loss/main': jnp.float32(0.0)}

  monkeypatch.setitem(losses.LOSSES, 'recording', recording)
  c = ml_collections.ConfigDict(dict(loss='recording', loss_mode='upsample',
                                     class_weights=(1., 2.), aux_weights=(0.4,),
                                     loss_reduction='sum'))
  fn = losses.from_config(c, ignore_label=7)
  fn(_LOGITS, jnp.zeros((1, 8, 8), jnp.int32), aux_logits=())
  assert calls == [dict(ignore_label=7, mode='upsample', class_weights=(1., 2.),
                        aux_weights=(0.4,), reduction='sum', aux_logits=())]
  # the default binds segmentation_loss itself: the trainer's loss is what the tests above check
  c.loss, c.class_weights = 'cross_entropy', ()
  assert losses.from_config(c).func is losses.segmentation_loss
  assert losses.from_config(c).keywords['class_weights'] is None
  c.loss = 'tversky'
  with pytest.raises(ValueError, match="unknown loss 'tversky'"):
    losses.from_config(c)
