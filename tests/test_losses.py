"""Class-imbalance losses (focal, soft Dice, Lovász-softmax, OHEM, weighted sums), each checked
against a direct numpy reference; the cross-entropy default is checked in test_optim_losses."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.default import get_config as default_config
from refinenet_jax import config_rules, losses, sharding
from refinenet_jax.models.layers import resize_bilinear

IGNORE = 255
C = 4


def _inputs(seed=0, shape=(2, 5, 7), scale=2.0):
  """Random logits (N, H, W, C) and labels with a few ignored pixels and class 3 absent."""
  rng = np.random.default_rng(seed)
  logits = (scale * rng.normal(size=(*shape, C))).astype(np.float32)
  labels = rng.integers(0, C - 1, size=shape).astype(np.int32)
  labels[0, 0, :3] = IGNORE
  labels[-1, -1, -1] = IGNORE
  return logits, labels


def _softmax(logits):
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _pixels(logits, labels):
  """(probabilities, labels) of the labelled pixels, flattened over the batch."""
  probs, labels = _softmax(logits).reshape(-1, C), np.asarray(labels).reshape(-1)
  keep = labels != IGNORE
  return probs[keep], labels[keep]


# ---------------------------------------------------------------- numpy references, by loops

def _focal_ref(logits, labels, gamma, weights=None):
  num = den = 0.0
  for p, y in zip(*_pixels(logits, labels)):
    w = 1.0 if weights is None else weights[y]
    num += w * (1 - p[y]) ** gamma * -np.log(p[y])
    den += w
  return num / den if den else 0.0


def _class_mean_ref(per_class, weights=None):
  if not per_class:
    return 0.0
  w = {c: 1.0 if weights is None else weights[c] for c in per_class}
  return sum(w[c] * v for c, v in per_class.items()) / sum(w.values())


def _dice_ref(logits, labels, weights=None):
  probs, ys = _pixels(logits, labels)
  per_class = {}
  for c in range(C):
    truth = ys == c
    if truth.any():
      inter = sum(p[c] for p, t in zip(probs, truth) if t)
      per_class[c] = 1 - 2 * inter / (probs[:, c].sum() + truth.sum())
  return _class_mean_ref(per_class, weights)


def _jaccard_loss_of(mistakes, truth):
  """Berman et al.'s set function: |M| / |G u M| for mispredicted set M, ground truth G."""
  return len(mistakes) / len(set(np.flatnonzero(truth)) | mistakes) if mistakes else 0.0


def _lovasz_ref(logits, labels, weights=None):
  probs, ys = _pixels(logits, labels)
  per_class = {}
  for c in range(C):
    truth = ys == c
    if not truth.any():
      continue
    errors = np.abs(truth - probs[:, c])
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    total, previous = 0.0, 0.0
    for k in range(len(order)):
      now = _jaccard_loss_of(set(order[:k + 1]), truth)
      total += errors[order[k]] * (now - previous)
      previous = now
    per_class[c] = total
  return _class_mean_ref(per_class, weights)


def _ohem_kept_ref(logits, labels, thresh, min_kept):
  probs = _softmax(logits)
  n = labels.shape[0]
  valid = [i for i in np.ndindex(labels.shape) if labels[i] != IGNORE]
  p_true = {i: probs[i][labels[i]] for i in valid}
  kept = {i for i in valid if p_true[i] < thresh}
  kept |= set(sorted(valid, key=lambda i: p_true[i])[:min_kept * n])
  return kept


def _ohem_ref(logits, labels, thresh, min_kept, weights=None):
  probs = _softmax(logits)
  num = den = 0.0
  for i in _ohem_kept_ref(logits, labels, thresh, min_kept):
    y = labels[i]
    w = 1.0 if weights is None else weights[y]
    num += -w * np.log(probs[i][y])
    den += w
  return num / den if den else 0.0


_KW = dict(mode='upsample', ignore_label=IGNORE)  # logits at label size: compared as they are
_jit = functools.partial(jax.jit, static_argnames=('mode', 'ignore_label', 'reduction'))
_focal = _jit(losses.focal_loss, static_argnames=('mode', 'ignore_label', 'focal_gamma'))
_dice = _jit(losses.dice_loss)
_lovasz = _jit(losses.lovasz_loss)


def test_focal_matches_reference_and_gamma_zero_is_cross_entropy():
  logits, labels = _inputs()
  weights = (2.0, 0.5, 1.0, 3.0)
  for gamma in (2.0, 0.5):
    np.testing.assert_allclose(_focal(logits, labels, focal_gamma=gamma, **_KW)[0],
                               _focal_ref(logits, labels, gamma), rtol=1e-5)
  np.testing.assert_allclose(
      _focal(logits, labels, focal_gamma=2.0, class_weights=jnp.array(weights), **_KW)[0],
      _focal_ref(logits, labels, 2.0, weights), rtol=1e-5)
  ce = losses.segmentation_loss(logits, labels, **_KW)[0]
  np.testing.assert_allclose(losses.focal_loss(logits, labels, focal_gamma=0.0, **_KW)[0], ce,
                             rtol=1e-6)


def test_dice_matches_reference_over_present_classes():
  logits, labels = _inputs()
  np.testing.assert_allclose(_dice(logits, labels, **_KW)[0], _dice_ref(logits, labels),
                             rtol=1e-5)
  weights = (2.0, 0.5, 1.0, 3.0)  # class 3 is absent: its weight does not count
  np.testing.assert_allclose(_dice(logits, labels, class_weights=jnp.array(weights), **_KW)[0],
                             _dice_ref(logits, labels, weights), rtol=1e-5)


def test_lovasz_matches_reference():
  logits, labels = _inputs()
  np.testing.assert_allclose(_lovasz(logits, labels, **_KW)[0], _lovasz_ref(logits, labels),
                             rtol=1e-5)
  weights = (2.0, 0.5, 1.0, 3.0)
  np.testing.assert_allclose(_lovasz(logits, labels, class_weights=jnp.array(weights), **_KW)[0],
                             _lovasz_ref(logits, labels, weights), rtol=1e-5)
  # a perfect prediction costs (almost) nothing
  sure = 30.0 * np.eye(C, dtype=np.float32)[np.where(labels == IGNORE, 0, labels)]
  assert float(_lovasz(sure, labels, **_KW)[0]) < 1e-6


def test_lovasz_gradient_matches_finite_differences():
  logits, labels = _inputs(seed=1, shape=(1, 3, 4), scale=1.0)
  labels[0, 1, 1] = IGNORE
  grad = np.asarray(jax.jit(jax.grad(lambda lg: losses.lovasz_loss(lg, labels, **_KW)[0]))(
      logits))
  x, eps = logits.astype(np.float64), 1e-6
  fd = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[i] += eps
    down[i] -= eps
    fd[i] = (_lovasz_ref(up, labels) - _lovasz_ref(down, labels)) / (2 * eps)
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)
  np.testing.assert_array_equal(grad[0, 1, 1], 0.0)  # an ignored pixel gets no gradient
  assert np.abs(grad).max() > 1e-3


_OHEM_CASES = ((0.5, 1), (0.5, 7), (0.5, 12), (0.0, 5), (0.5, 1000))  # (thresh, min_kept)


@jax.jit
def _ohem_cases(logits, labels, weights):
  """One program for every case (each min_kept is a static top-k size)."""
  kept = [losses.ohem_kept(logits, labels, thresh=t, min_kept=k) for t, k in _OHEM_CASES]
  values = [losses.ohem_loss(logits, labels, ohem_thresh=t, ohem_min_kept=k, **_KW)[0]
            for t, k in _OHEM_CASES]
  weighted = losses.ohem_loss(logits, labels, ohem_thresh=0.5, ohem_min_kept=1,
                              class_weights=weights, **_KW)[0]
  every = losses.ohem_loss(logits, labels, ohem_thresh=1.0, ohem_min_kept=0, **_KW)[0]
  return kept, values, weighted, every, losses.segmentation_loss(logits, labels, **_KW)[0]


def test_ohem_keeps_below_threshold_or_the_min_kept_hardest():
  logits, labels = _inputs()
  probs, ys = _pixels(logits, labels)
  p_true = probs[np.arange(len(ys)), ys]
  assert 4 < (p_true < 0.5).sum() < len(ys) - 4
  weights = (2.0, 0.5, 1.0, 3.0)
  kept, values, weighted, every, ce = _ohem_cases(logits, labels, jnp.array(weights))
  for (thresh, min_kept), mask, value in zip(_OHEM_CASES, kept, values):
    mask = np.asarray(mask)
    # at least min_kept per image (a batch of 2), exactly the ones below thresh when more
    assert mask.sum() == max((p_true < thresh).sum(), min(2 * min_kept, len(ys)))
    assert {tuple(i) for i in np.argwhere(mask)} == _ohem_kept_ref(logits, labels, thresh,
                                                                   min_kept)
    np.testing.assert_allclose(value, _ohem_ref(logits, labels, thresh, min_kept), rtol=1e-5)
  np.testing.assert_allclose(weighted, _ohem_ref(logits, labels, 0.5, 1, weights), rtol=1e-5)
  np.testing.assert_allclose(every, ce, rtol=1e-6)  # keeping every pixel is cross-entropy


_ALL = ('cross_entropy', 'focal', 'dice', 'lovasz', 'ohem')


@functools.partial(jax.jit, static_argnames='name')
def _all_ignored(logits, aux, name):
  """(value, gradients) of the loss on an all-ignored batch with an aux head, per mode."""
  labels = jnp.full((2, 10, 14), IGNORE, jnp.int32)
  out = {}
  for mode in losses.LOSS_MODES:
    f = lambda lg, ax: losses.LOSSES[name](lg, labels, mode=mode, aux_logits=[ax],  # noqa: B023
                                           aux_weights=[0.4], ignore_label=IGNORE)[0]
    out[mode] = jax.value_and_grad(f, argnums=(0, 1))(logits, aux)
  return out


@pytest.mark.parametrize('name', _ALL)
def test_all_ignored_gives_zero_and_finite_gradient(name):
  logits, _ = _inputs()
  for mode, (value, grads) in _all_ignored(logits, logits[:, ::2, ::2], name).items():
    assert float(value) == 0.0, (name, mode)
    assert all(np.all(np.isfinite(g)) for g in grads), (name, mode)


@functools.partial(jax.jit, static_argnames='name')
def _by_mode(logits, aux, labels, full, name):
  fn = functools.partial(losses.LOSSES[name], mode='quarter')
  with_aux = fn(logits, full, aux_logits=[aux], aux_weights=[0.3])
  up = resize_bilinear(logits, (12, 16), 'align_corners')
  return (with_aux, fn(logits, labels)[0], fn(aux, losses.nearest_downsample(full, (6, 8)))[0],
          losses.LOSSES[name](logits, full, mode='upsample')[0],
          losses.LOSSES[name](up, full, mode='upsample')[0])


@pytest.mark.parametrize('name', _ALL)
def test_every_loss_honours_the_mode_and_aux_heads(name):
  """'quarter' compares with cell-centre labels, 'upsample' resizes the logits like
  cross-entropy does, and aux heads add with their weights."""
  logits, labels = _inputs(shape=(2, 3, 4))
  full = np.repeat(np.repeat(labels, 4, 1), 4, 2)  # every 4x4 cell one label
  aux = _inputs(seed=2, shape=(2, 6, 8))[0]
  (loss, parts), main, aux_alone, upsampled, at_size = _by_mode(logits, aux, labels, full, name)
  np.testing.assert_allclose(parts['loss/main'], main, rtol=1e-6)
  np.testing.assert_allclose(parts['loss/aux0'], aux_alone, rtol=1e-6)
  np.testing.assert_allclose(loss, main + 0.3 * aux_alone, rtol=1e-6)
  np.testing.assert_allclose(upsampled, at_size, rtol=1e-6)


def test_ratio_losses_refuse_sum_reduction():
  logits, labels = _inputs()
  for name in losses.MEAN_ONLY:
    with pytest.raises(ValueError, match=f"'{name}' is a ratio"):
      losses.LOSSES[name](logits, labels, reduction='sum')
  for name in set(_ALL) - set(losses.MEAN_ONLY):
    assert np.isfinite(losses.LOSSES[name](logits, labels, reduction='sum')[0])


# ---------------------------------------------------------------- config: names and sums

def test_parse_loss():
  assert losses.parse_loss('cross_entropy') == (('cross_entropy', 1.0),)
  assert losses.parse_loss(' cross_entropy + 0.5 * dice+lovasz') == (
      ('cross_entropy', 1.0), ('dice', 0.5), ('lovasz', 1.0))
  for spec, match in (('tversky', "term 'tversky': unknown loss 'tversky'"),
                      ('cross_entropy+x*dice', "term 'x\\*dice'.*number > 0"),
                      ('cross_entropy+0*dice', "term '0\\*dice'.*number > 0"),
                      ('cross_entropy+', "term '': unknown loss ''"),
                      ('dice+2*dice', "'dice' appears twice"), ('', 'a LOSSES name')):
    with pytest.raises(ValueError, match=match):
      losses.parse_loss(spec)


def _run_config(**kw):
  c = default_config()
  c.update(kw)
  return c


def test_config_rules_name_the_bad_loss_term_and_settings():
  assert config_rules.errors(_run_config(loss='cross_entropy+0.5*dice')) == []
  (err,) = config_rules.errors(_run_config(loss='cross_entropy+0.5*dcie'))
  assert err.startswith("loss='cross_entropy+0.5*dcie'") and "unknown loss 'dcie'" in err
  (err,) = config_rules.errors(_run_config(loss='ohem+lovasz', loss_reduction='sum'))
  assert err.startswith("loss_reduction='sum'") and 'lovasz' in err
  assert config_rules.errors(_run_config(loss='ohem+focal', loss_reduction='sum')) == []
  (err,) = config_rules.errors(_run_config(loss='ohem', ohem_thresh=0.0, ohem_min_kept=0))
  assert err.startswith('ohem_thresh=0.0') and 'no pixel' in err
  assert config_rules.errors(_run_config(ohem_thresh=0.0, ohem_min_kept=0)) == []  # unused


def test_sum_of_terms_equals_the_weighted_sum_with_aux_heads():
  logits, labels = _inputs()
  aux = _inputs(seed=3)[0]
  config = _run_config(loss='cross_entropy+0.5*dice', loss_mode='upsample', aux_weights=(0.4,))
  fn = losses.from_config(config, IGNORE)
  loss, parts = jax.jit(fn)(logits, labels, aux_logits=(aux,))
  kw = dict(_KW, aux_logits=[aux], aux_weights=[0.4])
  ce, ce_parts = losses.segmentation_loss(logits, labels, **kw)
  dice, dice_parts = losses.dice_loss(logits, labels, **kw)
  np.testing.assert_allclose(loss, ce + 0.5 * dice, rtol=1e-6)
  np.testing.assert_allclose(parts['loss/cross_entropy'], ce, rtol=1e-6)
  np.testing.assert_allclose(parts['loss/dice'], dice, rtol=1e-6)
  for key in ('loss/main', 'loss/aux0'):
    np.testing.assert_allclose(parts[key], ce_parts[key] + 0.5 * dice_parts[key], rtol=1e-6)
  np.testing.assert_allclose(loss, parts['loss/main'] + 0.4 * parts['loss/aux0'], rtol=1e-6)


def test_from_config_binds_each_loss_own_settings():
  fn = losses.from_config(_run_config(loss='focal', focal_gamma=0.5))
  assert fn.func is losses.focal_loss and fn.keywords['focal_gamma'] == 0.5
  fn = losses.from_config(_run_config(loss='ohem', ohem_thresh=0.6, ohem_min_kept=7))
  assert fn.func is losses.ohem_loss
  assert (fn.keywords['ohem_thresh'], fn.keywords['ohem_min_kept']) == (0.6, 7)
  fn = losses.from_config(_run_config(loss='dice'))
  assert fn.func is losses.dice_loss and 'focal_gamma' not in fn.keywords
  # a partial config (a notebook's) leaves the loss's own defaults
  c = ml_collections.ConfigDict(dict(loss='focal', loss_mode='quarter', class_weights=(),
                                     aux_weights=(), loss_reduction='mean'))
  assert 'focal_gamma' not in losses.from_config(c).keywords


@pytest.mark.parametrize('spec', [*_ALL, 'cross_entropy+0.5*dice'])
def test_each_config_loss_runs_jitted_like_the_train_step_calls_it(spec):
  config = _run_config(loss=spec, aux_weights=(0.4,), ohem_min_kept=4,
                       class_weights=(1.0, 2.0, 0.5, 1.0, 1.0))
  fn = losses.from_config(config, IGNORE)
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
  aux = jnp.asarray(rng.normal(size=(2, 6, 8, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, size=(2, 12, 16)), jnp.uint8).at[0, :4].set(IGNORE)

  @jax.jit
  def step(lg, ax):
    return jax.value_and_grad(lambda a, b: fn(a, labels, aux_logits=(b,))[0], (0, 1))(lg, ax)

  value, grads = step(logits, aux)
  assert np.isfinite(value) and float(value) > 0
  assert all(np.all(np.isfinite(g)) and np.abs(g).max() > 0 for g in grads)


def test_batch_quantities_are_global_under_a_data_mesh():
  """Sharded over ('data',), Dice, Lovász and OHEM still see the whole batch as one."""
  spec = 'cross_entropy+0.5*focal+0.5*dice+0.2*lovasz+ohem'
  fn = losses.from_config(_run_config(loss=spec, loss_mode='upsample', ohem_thresh=0.5,
                                      ohem_min_kept=3), IGNORE)
  logits, labels = _inputs(shape=(4, 5, 7))
  mesh = sharding.make_mesh(4)
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
  loss, parts = jax.jit(fn)(put(logits), put(labels))
  assert len(put(labels).sharding.device_set) == 4
  np.testing.assert_allclose(parts['loss/dice'], _dice_ref(logits, labels), rtol=1e-5)
  np.testing.assert_allclose(parts['loss/lovasz'], _lovasz_ref(logits, labels), rtol=1e-5)
  np.testing.assert_allclose(parts['loss/ohem'], _ohem_ref(logits, labels, 0.5, 3), rtol=1e-5)
  np.testing.assert_allclose(loss, jax.jit(fn)(logits, labels)[0], rtol=1e-6)
