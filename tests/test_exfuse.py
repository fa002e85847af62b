"""GCN / ExFuse: each component's defining property, the full-size parameter structure, and the
ablation-ladder configs (resolve, eval_shape, a few real train steps at test size)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refinenet_jax as rj
from refinenet_jax.testing import random_variables
from configs import exfuse_ladder
from refinenet_jax import losses, optim, steps, train
from refinenet_jax.models import exfuse as ex
from refinenet_jax.models.layers import resize_bilinear

LADDER = [f'{d},{r}' for d in exfuse_ladder.DATASETS for r in exfuse_ladder.RUNGS]


def _n_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract(model, shape=(1, 64, 64, 3)):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def _init(model, x, seed=0):
  """The model's own initialisation (for tests of its initial values); XLA's RngBitGenerator
  compiles ~3x faster on CPU than threefry for a many-leaf init."""
  return jax.jit(model.init)(jax.random.key(seed, impl='rbg'), x)


# --- DAP -------------------------------------------------------------------------------------

def _dap_naive(z, k):
  """The formula, one output value at a time."""
  n, h, w, kc = z.shape
  c, r = kc // (k * k), k // 2
  out = np.zeros((n, h, w, c), np.float32)
  for b in range(n):
    for i in range(h):
      for j in range(w):
        for ch in range(c):
          s = np.float32(0)
          for l in range(k):
            for m in range(k):
              ii, jj = i + l - r, j + m - r
              if 0 <= ii < h and 0 <= jj < w:  # zero padding
                s += z[b, ii, jj, (k * l + m) * c + ch]
          out[b, i, j, ch] = s * np.float32(1 / (k * k))  # the mean
  return out


def _shuffle_avgpool(z, k):
  """What the public ports call DAP: PixelShuffle(k) then AvgPool(k, stride k)."""
  y = np.asarray(ex.pixel_shuffle(jnp.asarray(z), k))
  n, hk, wk, c = y.shape
  return y.reshape(n, hk // k, k, wk // k, k, c).mean((2, 4))


@pytest.mark.parametrize('k,c', [(3, 4), (5, 2)])
def test_dap_equals_naive_loop_exactly(k, c):
  z = np.random.default_rng(k).standard_normal((2, 5, 7, k * k * c)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(ex.dense_adjacent_prediction(jnp.asarray(z), k)),
                                _dap_naive(z, k))


def test_dap_reads_neighbours_and_the_pixel_shuffle_shortcut_does_not():
  k, c = 3, 2
  z = np.random.default_rng(0).standard_normal((1, 6, 6, k * k * c)).astype(np.float32)
  dap = np.asarray(ex.dense_adjacent_prediction(jnp.asarray(z), k))
  short = _shuffle_avgpool(z, k)
  # the shortcut is the mean of the channel groups at the same position (torch order c*k*k + g)
  np.testing.assert_allclose(short, z.reshape(1, 6, 6, c, k * k).mean(-1), atol=1e-6)
  # ... and differs from DAP whichever group-major/class-major order one assumes
  as_groups = z.reshape(1, 6, 6, k * k, c).transpose(0, 1, 2, 4, 3).reshape(z.shape)
  for zz in (z, as_groups):
    assert np.abs(_shuffle_avgpool(zz, k) - dap).max() > 0.1
  # changing a neighbour's prediction for (2, 2) moves DAP there, never the shortcut
  bumped = z.copy()
  bumped[0, 3, 3, 8 * c:9 * c] += 9.0  # group (l, m) = (2, 2) is read at (2, 2) + (1, 1)
  d2 = np.asarray(ex.dense_adjacent_prediction(jnp.asarray(bumped), k))
  np.testing.assert_allclose(d2[0, 2, 2] - dap[0, 2, 2], [1.0, 1.0], rtol=1e-5)
  np.testing.assert_array_equal(_shuffle_avgpool(bumped, k)[0, 2, 2], short[0, 2, 2])


# --- ECRE ------------------------------------------------------------------------------------

def test_pixel_shuffle_channel_to_space_mapping():
  x = np.random.default_rng(0).standard_normal((2, 3, 4, 3 * 4)).astype(np.float32)
  y = np.asarray(ex.pixel_shuffle(jnp.asarray(x), 2))
  assert y.shape == (2, 6, 8, 3)
  for i in range(3):
    for j in range(4):
      for a in range(2):
        for b in range(2):
          for c in range(3):  # torch PixelShuffle: channel c*4 + 2a + b -> (2i + a, 2j + b, c)
            assert y[:, 2 * i + a, 2 * j + b, c].tolist() == x[:, i, j, c * 4 + 2 * a + b].tolist()


def test_ecre_aux_is_the_pixel_shuffled_top_map():
  model = rj.create_model('gcn_tiny', 3, ecre=True)
  x = jax.random.normal(jax.random.key(0), (1, 45, 61, 3))
  v = random_variables(model, x.shape)
  (logits, aux), state = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda mdl, _: mdl.name == 'ecre'))(v, x)
  pre = state['intermediates']['ecre']['__call__'][0]  # the 3x3 conv to 4C at res-5
  assert model.aux_names == ('ecre',) and len(aux) == 1
  assert pre.shape == (1, 2, 2, 12) and aux[0].shape == (1, 3, 4, 3)  # res-5 2x2 -> res-4 3x4
  np.testing.assert_array_equal(aux[0], ex.pixel_shuffle(pre, 2)[:, :3, :4])
  assert logits.shape == (1, 45, 61, 3)
  assert 'up_res5' not in v['params']  # ECRE replaces the first deconvolution
  # ecre_source='gcn': the top GCN itself gives the 4C channels, no extra conv
  p = _abstract(rj.create_model('gcn_tiny', 3, ecre=True, ecre_source='gcn'))['params']
  assert p['gcn_res5']['bias'].shape == (12,) and 'ecre' not in p


# --- GCN, BR, upsampling -----------------------------------------------------------------------

def _dense_kernel(p):
  """The k x k kernel of a GCN module: sum of the two separable branches."""
  left = jnp.einsum('yim,xmo->yxio', p['left_kx1']['kernel'][:, 0], p['left_1xk']['kernel'][0])
  right = jnp.einsum('xim,ymo->yxio', p['right_1xk']['kernel'][0], p['right_kx1']['kernel'][:, 0])
  return left + right


@pytest.mark.parametrize('cin,cout', [(1, 1), (3, 4)])
def test_gcn_equals_a_dense_conv_of_rank_two_per_middle_channel(cin, cout):
  k = 7
  m = ex.GlobalConv(cout, k)
  x = jax.random.normal(jax.random.key(0), (2, 11, 13, cin))
  v = m.init(jax.random.key(1), x)
  v = {'params': {**v['params'], 'bias': jax.random.normal(jax.random.key(2), (cout,))}}
  kernel = _dense_kernel(v['params'])
  dense = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((k // 2, k // 2),) * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST) + v['params']['bias']
  out = m.apply(v, x)
  np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5 * float(jnp.abs(dense).max()))
  ranks = {int(np.linalg.matrix_rank(np.asarray(kernel[:, :, i, o]), tol=1e-6))
           for i in range(cin) for o in range(cout)}
  assert max(ranks) <= min(2 * cout, k)
  if cout == 1:
    assert ranks == {2}  # one middle channel: u1 v1^T + v2 u2^T, a rank-2 k x k kernel
  assert _n_params(v) == 2 * k * cout * (cin + cout) + cout  # 2k per pair instead of k^2


def test_boundary_refinement_is_a_residual_block():
  m = ex.BoundaryRefine()
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 4))
  v = m.init(jax.random.key(1), x)
  zero = jax.tree.map(jnp.zeros_like, v)
  np.testing.assert_array_equal(m.apply(zero, x), x)
  assert v['params']['conv2']['kernel'].shape == (3, 3, 4, 4)


def test_deconv_starts_as_bilinear_upsampling():
  x = jax.random.normal(jax.random.key(0), (2, 7, 9, 3))
  deconv, bilinear = ex.Upsample2x('deconv'), ex.Upsample2x('bilinear')
  v = deconv.init(jax.random.key(0), x, (14, 18))
  a, b = deconv.apply(v, x, (14, 18)), bilinear.apply({}, x, (14, 18))
  assert a.shape == b.shape == (2, 14, 18, 3)
  np.testing.assert_allclose(a[:, 1:-1, 1:-1], b[:, 1:-1, 1:-1], atol=1e-6)  # borders: zero pad
  assert deconv.apply(v, x, (13, 17)).shape == (2, 13, 17, 3)  # cropped to an odd next level
  p = _abstract(rj.create_model('gcn_tiny', 3))['params']
  assert p['up_res5']['kernel'].shape == (4, 4, 3, 3)
  assert sum(n.startswith('up_') for n in p) == 5  # five 2x upsamplings
  assert sum(n.startswith('br_') for n in p) == 9  # nine BRs
  assert not any(n.startswith('up_') for n in _abstract(
      rj.create_model('gcn_tiny', 3, upsample='bilinear'))['params'])


# --- SEB -------------------------------------------------------------------------------------

def test_seb_multiplies_by_every_higher_level():
  low = jax.random.normal(jax.random.key(0), (1, 8, 10, 4))
  highs = [jax.random.normal(jax.random.key(1), (1, 4, 5, 6)),
           jax.random.normal(jax.random.key(2), (1, 2, 3, 5))]
  seb = ex.SemanticEmbedding(['res3', 'res4'], factor_init='random')
  v = seb.init(jax.random.key(3), low, highs)
  v = jax.tree.map(lambda a: a + 0.3, v)  # non-zero biases
  want = low
  for name, h in zip(('res3', 'res4'), highs):
    p = v['params'][f'conv_from_{name}']
    g = jax.lax.conv_general_dilated(h, p['kernel'], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision=jax.lax.Precision.HIGHEST) + p['bias']
    assert g.shape[-1] == 4  # each conv outputs the low level's channels
    want = want * resize_bilinear(g, (8, 10), 'half_pixel')
  np.testing.assert_allclose(seb.apply(v, low, highs), want, rtol=1e-4, atol=1e-5)
  ident = ex.SemanticEmbedding(['res3', 'res4'])
  np.testing.assert_array_equal(ident.apply(ident.init(jax.random.key(3), low, highs), low, highs),
                                low)


def test_seb_routes_every_higher_level_into_each_lower_one():
  p = _abstract(rj.create_model('gcn_tiny', 3, seb=True))['params']
  assert sorted(p['seb_res2']) == ['conv_from_res3', 'conv_from_res4', 'conv_from_res5']
  assert sorted(p['seb_res3']) == ['conv_from_res4', 'conv_from_res5']
  assert sorted(p['seb_res4']) == ['conv_from_res5']
  assert 'seb_res5' not in p


def test_seb_and_dap_rungs_start_from_the_previous_model():
  # the new parameters freshly initialised, every shared one equal
  x = jax.random.normal(jax.random.key(0), (2, 40, 52, 3))
  base = rj.create_model('gcn_tiny', 3)
  new = rj.create_model('gcn_tiny', 3, seb=True, dap=True)
  vb, vn = _init(base, x, 1), _init(new, x, 2)
  shared = {c: {**vn[c], **vb[c]} for c in vn}
  a, b = jax.jit(base.apply)(vb, x), jax.jit(new.apply)(shared, x)
  # SEB factors start at exactly 1, DAP as a 3x3 box filter (zero padded)
  box = jax.lax.reduce_window(a, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0))) / 9
  np.testing.assert_allclose(b, box, rtol=1e-5, atol=1e-6)


# --- whole model -----------------------------------------------------------------------------

def test_tiny_output_and_aux_shapes_at_odd_sizes():
  model = rj.create_model('exfuse_tiny', 5)
  x = jnp.zeros((2, 45, 61, 3))  # not multiples of 32
  v = _abstract(model, x.shape)
  logits, aux = jax.eval_shape(
      lambda v: model.apply(v, x, train=True, mutable=['batch_stats'])[0], v)
  assert model.aux_names == ('ss_res2', 'ss_res3', 'ss_res4', 'ss_res5', 'ecre')
  assert logits.shape == (2, 45, 61, 5) and logits.dtype == jnp.float32
  assert [a.shape for a in aux] == [(2, 12, 16, 5), (2, 6, 8, 5), (2, 3, 4, 5), (2, 2, 2, 5),
                                    (2, 3, 4, 5)]
  assert jax.eval_shape(model.apply, v, x).shape == (2, 45, 61, 5)  # eval: main logits only


def test_tiny_forward_backward_with_the_other_options():
  # the all-default components train in the ladder test below
  kw = dict(upsample='bilinear', decoder_bn=True, ecre_source='gcn', seb_init='random',
            ss_stages=(1, 2))
  model = rj.create_model('exfuse_tiny', 5, **kw)
  x = jax.random.normal(jax.random.key(0), (2, 45, 61, 3))  # odd, not multiples of 32
  v = random_variables(model, x.shape, seed=1)
  labels = jax.random.randint(jax.random.key(2), (2, 45, 61), 0, 5)

  def loss_fn(params):
    out, new = model.apply({'params': params, 'batch_stats': v['batch_stats']}, x, train=True,
                           mutable=['batch_stats'])
    logits, aux = steps.split_outputs(out)
    loss, _ = losses.segmentation_loss(logits, labels, aux_logits=aux,
                                       aux_weights=(0.3,) * len(aux))
    return loss, (logits, aux)

  (loss, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(v['params'])
  assert logits.shape == (2, 45, 61, 5) and logits.dtype == jnp.float32
  assert model.aux_names == ('ss_res3', 'ss_res4', 'ecre')
  assert [a.shape for a in aux] == [(2, 6, 8, 5), (2, 3, 4, 5), (2, 3, 4, 5)]
  assert np.isfinite(float(loss))
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(bool(jnp.any(g != 0)) for g in leaves) == len(leaves)


def test_bad_settings_are_rejected():
  x = jnp.zeros((1, 32, 32, 3))
  for kw, msg in [(dict(gcn_kernel=4), 'odd'), (dict(upsample='nearest'), 'upsample'),
                  (dict(ss_stages=(2, 0)), 'ss_stages'), (dict(ecre_source='x'), 'ecre_source'),
                  (dict(stage_sizes=(1, 1, 1)), '4 encoder stages')]:
    with pytest.raises(ValueError, match=msg):
      jax.eval_shape(rj.create_model('gcn_tiny', 3, **kw).init, jax.random.key(0), x)


# --- full size ---------------------------------------------------------------------------------

def _gcn_decoder_params(c, k, channels=(256, 512, 1024, 2048)):
  gcn = sum(2 * k * c * (cin + c) + c for cin in channels)
  return gcn + 9 * 2 * (9 * c * c + c) + 5 * 16 * c * c  # + 9 BRs + 5 deconvs


def test_full_size_parameter_structure():
  c, k, enc101 = 21, 15, 44_177_704 - 2_049_000  # torchvision ResNeXt-101 32x4d without fc
  gcn = _n_params(_abstract(rj.create_model('gcn_resnext101', c))['params'])
  assert gcn == enc101 + _gcn_decoder_params(c, k) == 44_708_008
  full = rj.create_model('exfuse_resnext101', c)
  p = _abstract(full)['params']
  ch = (256, 512, 1024, 2048)
  lr = 52_381_480 - 44_177_704
  ss = sum(9 * cin * 256 + 9 * 256 * 256 + 4 * 256 + 256 * c + c for cin in ch)
  seb = sum(9 * ch[i] * ch[l] + ch[l] for l in range(3) for i in range(l + 1, 4))
  ecre = (9 * c * 4 * c + 4 * c) - 16 * c * c  # sub-pixel conv replaces one deconv
  dap = c * 9 * c + 9 * c
  assert _n_params(p) == gcn + lr + ss + seb + ecre + dap
  assert _n_params(p['encoder']) == enc101 + lr


# --- the ladder configs ------------------------------------------------------------------------

def test_ladder_covers_every_rung_and_the_last_is_exfuse():
  assert len(LADDER) == 12
  for prev, spec in zip(LADDER, LADDER[1:]):  # each rung adds switches to the previous one
    if prev.split(',')[0] == spec.split(',')[0]:
      before = exfuse_ladder.get_config(prev).model_overrides.to_dict()
      after = exfuse_ladder.get_config(spec).model_overrides.to_dict()
      assert before.items() < after.items()
  with pytest.raises(ValueError, match="'voc'.*DATASET,RUNG"):
    exfuse_ladder.get_config('voc')
  last = train.build_model(exfuse_ladder.get_config('voc,dap'))
  want = rj.create_model('exfuse_resnext101', 21, freeze_encoder_bn=True,
                         dtype=jnp.dtype('bfloat16'))
  assert last == want


def _tiny_ladder():
  """The ladder's distinct models at test size (the LR rung's depth collapses to tiny)."""
  seen, out = set(), []
  for name in LADDER:
    config = exfuse_ladder.get_config(name)
    kw = {**config.model_overrides.to_dict(), **ex.TINY_OVERRIDES}
    key = repr(sorted(kw.items()))
    if key not in seen:
      seen.add(key)
      out.append(pytest.param(name, kw, id=name))
  return out


TINY_LADDER = _tiny_ladder()
# The first and last rungs train for real; the ones between (each adds one component the last
# one has too) are traced, not compiled: their metrics' names and shapes are checked.
COMPILED_RUNGS = {TINY_LADDER[0].values[0], TINY_LADDER[-1].values[0]}


@pytest.mark.parametrize('name,kw', TINY_LADDER)
def test_ladder_trains_a_few_steps_and_logs_weighted_aux_losses(name, kw):
  config = exfuse_ladder.get_config(name)
  # no weight decay: then a parameter changes only if it got a gradient
  config.num_steps, config.warmup_steps, config.weight_decay = 3, 1, 0.0
  model = rj.create_model(config.model, config.num_classes, **kw)
  tx = optim.make_optimizer(config)
  compiled = name in COMPILED_RUNGS

  def make_state(v):
    return steps.TrainState.create(
        apply_fn=model.apply, params=v['params'], batch_stats=v['batch_stats'], tx=tx,
        rng=jax.random.key_data(jax.random.key(1)))

  if compiled:
    state0 = state = make_state(_init(model, jnp.zeros((1, 32, 32, 3))))
  else:
    state = jax.eval_shape(lambda: make_state(model.init(jax.random.key(0, impl='rbg'),
                                                         jnp.zeros((1, 32, 32, 3)))))
  rng = np.random.default_rng(0)
  loss_fn = functools.partial(losses.segmentation_loss, aux_weights=tuple(config.aux_weights))
  step = functools.partial(steps.train_step, model=model, loss_fn=loss_fn)
  step = jax.jit(step) if compiled else functools.partial(jax.eval_shape, step)
  for _ in range(3 if compiled else 1):
    batch = {'image': rng.integers(0, 256, (2, 32, 32, 3), np.uint8),
             'label': rng.integers(0, config.num_classes, (2, 32, 32), np.uint8)}
    state, m = step(state, batch)
    assert {f'loss/aux{i}' for i in range(len(model.aux_names))} <= set(m)
    assert f'loss/aux{len(model.aux_names)}' not in m
    # what the trainer logs: every head by name, unweighted
    logged = train.loss_parts(jax.device_get(m) if compiled else m, model)
    assert set(logged) == {'train/loss/main'} | {f'train/loss/{n}' for n in model.aux_names}
    if not compiled:
      assert all(m[k].shape == () for k in m)
      continue
    want = m['loss/main'] + sum(w * m[f'loss/aux{i}'] for i, w in enumerate(config.aux_weights))
    np.testing.assert_allclose(m['loss'], want, rtol=1e-5)
    assert np.isfinite(float(m['loss'])) and float(m['grad_norm']) > 0
    if model.aux_names:
      assert logged[f'train/loss/{model.aux_names[-1]}'] == m[f'loss/aux{len(model.aux_names) - 1}']
  if compiled:
    assert int(state.step) == 3
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, state0.params)
    assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize('name', sorted(ex.VARIANTS))
def test_registered_variants_full_size_shapes(name):
  model = rj.create_model(name, 21)
  h, w = 97, 130  # not multiples of 32
  out, _ = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, h, w, 3))))
  assert out.shape == (2, h, w, 21) and out.dtype == jnp.float32
