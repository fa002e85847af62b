"""Registry, full-size shapes/parameter counts (eval_shape only) and tiny forward/backward."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import refinenet_jax as rj
from refinenet_jax.testing import random_variables
from refinenet_jax.models import ENCODER_PREFIX, aux_names
from refinenet_jax.models.backbones import ResNet, encoder_def
from refinenet_jax.models import refinenet
from refinenet_jax.models.refinenet import TINY_OVERRIDES

# Published PyTorch code (DrSleep / best-of-acrv definitions), 21 classes, to the unit.
PUBLISHED_PARAMS = {
    'refinenet_r50': 99_060_309, 'refinenet_r101': 118_052_437, 'refinenet_r152': 133_696_085,
    'lw_refinenet_r50': 27_357_525, 'lw_refinenet_r101': 46_349_653,
    'lw_refinenet_r152': 61_993_301,
    # improved pooling only reorders conv/pool: same count as the released order.
    'refinenet_improved_r101': 118_052_437,
}
# RefineNet's own variants; FCN and ExFuse have their own test files.
REFINENET = sorted(refinenet.VARIANTS)
FULL = [n for n in REFINENET if 'tiny' not in n]


def _abstract(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def _n_params(variables):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(variables['params']))


def _quarter(n):
  return -(-(-(-n // 2)) // 2)  # ceil(ceil(n / 2) / 2)


def test_registry_lists_required_variants():
  names = set(rj.list_models())
  for n in ['refinenet_r50', 'refinenet_r101', 'refinenet_r152', 'lw_refinenet_r50',
            'lw_refinenet_r101', 'lw_refinenet_r152', 'refinenet_single_r50',
            'refinenet_2cascade_r50', 'refinenet_2scale_r50', 'refinenet_improved_r101',
            'refinenet_cvpr_r101', 'refinenet_tiny', 'lw_refinenet_tiny']:
    assert n in names


def test_unknown_name_lists_valid_names():
  with pytest.raises(KeyError, match='refinenet_r101'):
    rj.create_model('refinenet_r99', 21)


def test_unknown_override_is_an_error():
  with pytest.raises(TypeError, match='crp_stagez'):
    rj.create_model('refinenet_r101', 21, crp_stagez=2)


def test_encoder_overrides_go_to_the_encoder_definition():
  tiny = rj.create_model('refinenet_tiny', 3)
  # encoder fields replace those of the variant's encoder; a name picks another definition
  assert rj.create_model('refinenet_r50', 3, **TINY_OVERRIDES) == tiny
  assert hash(rj.create_model('refinenet_r50', 3, **TINY_OVERRIDES).encoder) == hash(tiny.encoder)
  assert rj.create_model('refinenet_r101', 3, encoder='resnet_tiny',
                         path_widths=tiny.path_widths) == tiny
  assert rj.create_model('refinenet_tiny', 3, stride_style='v1').encoder == encoder_def(
      'resnet_tiny', stride_style='v1')
  with pytest.raises(KeyError, match="'resnet99'.*resnext101_32x8d"):
    rj.create_model('refinenet_r101', 3, encoder='resnet99')
  # what the model sets when it instantiates its encoder is a model field, not an encoder one
  for name, kw in [('refinenet_r101', dict(freeze_bn=True)), ('gcn_tiny', dict(output_stride=16)),
                   ('fcn_resnet_tiny', dict(stage_sizez=(1, 1, 1, 1)))]:
    with pytest.raises(TypeError, match=f'{name}: unknown override.*{next(iter(kw))}'):
      rj.create_model(name, 3, **kw)
  with pytest.raises(TypeError, match='set by the model'):
    encoder_def('resnet50', freeze_bn=True)


def test_model_protocol():
  # encoder parameters under ENCODER_PREFIX* keys (one per input scale), aux_names in output order
  x = jnp.zeros((1, 32, 32, 3))
  for name, encoders, aux in [('refinenet_tiny', {'encoder'}, ()),
                              ('fcn_resnet_tiny', {'encoder'}, ()),
                              ('exfuse_tiny', {'encoder'},
                               ('ss_res2', 'ss_res3', 'ss_res4', 'ss_res5', 'ecre'))]:
    model = rj.create_model(name, 3)
    params = jax.eval_shape(model.init, jax.random.key(0), x)['params']
    assert {k for k in params if k.startswith(ENCODER_PREFIX)} == encoders
    assert aux_names(model) == aux
  two = rj.create_model('refinenet_2scale_r50', 3, **TINY_OVERRIDES)
  params = jax.eval_shape(two.init, jax.random.key(0), x)['params']
  assert {k for k in params if k.startswith(ENCODER_PREFIX)} == {'encoder0', 'encoder1'}


@pytest.mark.parametrize('name', sorted(PUBLISHED_PARAMS))
def test_parameter_counts_equal_published_code(name):
  assert _n_params(_abstract(rj.create_model(name, 21), (1, 64, 64, 3))) == PUBLISHED_PARAMS[name]


def test_parameter_count_structure():
  # classes only touch the 3x3 classifier: 2304*C + C; the paper form's decoder is ~53.14 M.
  a = _n_params(_abstract(rj.create_model('refinenet_r101', 21), (1, 64, 64, 3)))
  b = _n_params(_abstract(rj.create_model('refinenet_r101', 40), (1, 64, 64, 3)))
  assert b - a == 19 * 2305
  enc = _n_params(jax.eval_shape(lambda: ResNet().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))))
  assert enc == 42_500_160  # torchvision resnet101 without fc
  cvpr = _n_params(_abstract(rj.create_model('refinenet_cvpr_r101', 21), (1, 64, 64, 3)))
  assert abs((cvpr - enc) / 1e6 - 53.14) < 0.01


@pytest.mark.parametrize('name', FULL)
def test_full_size_output_shapes(name):
  h, w = 97, 130  # not multiples of 32
  model = rj.create_model(name, 21)
  out, v = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, h, w, 3))))
  scale = max(model.input_scales)
  assert out.shape == (2, _quarter(math.ceil(h * scale)), _quarter(math.ceil(w * scale)), 21)
  assert out.dtype == jnp.float32
  assert set(v) == {'params', 'batch_stats'}


def _tiny_variants():
  """Every registered wiring at test size; depth-only variants collapse to one config."""
  seen, out = set(), []
  for name in REFINENET:
    kw = {} if 'tiny' in name else dict(TINY_OVERRIDES)
    m = rj.create_model(name, 5, **kw)
    key = repr(dataclasses.replace(m))
    if key not in seen:
      seen.add(key)
      out.append(pytest.param(name, kw, id=name))
  return out


@pytest.mark.parametrize('name,kw', _tiny_variants())
def test_tiny_forward_backward(name, kw):
  model = rj.create_model(name, 5, **kw)
  x = jax.random.normal(jax.random.key(0), (2, 33, 47, 3))
  v = random_variables(model, x.shape, seed=1)
  s = max(model.input_scales)
  out_hw = (_quarter(math.ceil(33 * s)), _quarter(math.ceil(47 * s)))
  labels = jax.random.randint(jax.random.key(2), (2, *out_hw), 0, 5)

  def loss_fn(params):
    logits, new = model.apply({'params': params, 'batch_stats': v['batch_stats']}, x, train=True,
                              rngs={'dropout': jax.random.key(3)}, mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, new)

  (loss, (logits, new)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(v['params'])
  assert logits.shape == (2, *out_hw, 5)
  assert np.isfinite(float(loss))
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  nonzero = sum(bool(jnp.any(g != 0)) for g in leaves)
  assert nonzero >= 0.9 * len(leaves), f'{len(leaves) - nonzero} parameters got no gradient'
  # train mode updates BN statistics (unless frozen)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), v['batch_stats'], new['batch_stats'])
  assert any(jax.tree.leaves(changed))


def test_frozen_encoder_bn_keeps_statistics_and_trains_affine():
  model = rj.create_model('refinenet_tiny', 3, freeze_encoder_bn=True, tap_dropout=0.0,
                          head_dropout=0.0)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  v = random_variables(model, x.shape, seed=1)
  train_apply = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))
  y_train, new = train_apply(v, x)
  np.testing.assert_array_equal(y_train, jax.jit(model.apply)(v, x))
  jax.tree.map(np.testing.assert_array_equal, new['batch_stats'], v['batch_stats'])
  g = jax.jit(jax.grad(lambda p: train_apply({**v, 'params': p}, x)[0].sum()))(v['params'])
  assert float(jnp.abs(g['encoder']['bn1']['scale']).sum()) > 0


def test_stride_styles_and_output_stride():
  x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
  small = dict(stage_sizes=(1, 1, 1, 1), base_width=8)
  v15, v1 = ResNet(**small), ResNet(**small, stride_style='v1')
  var = v15.init(jax.random.key(1), x)
  a, b = v15.apply(var, x), v1.apply(var, x)  # same parameter tree, different numerics
  assert [f.shape for f in a] == [f.shape for f in b] == [(1, 16, 16, 32), (1, 8, 8, 64),
                                                          (1, 4, 4, 128), (1, 2, 2, 256)]
  assert not np.allclose(a[1], b[1])
  for os_, sizes in [(16, [16, 8, 4, 4]), (8, [16, 8, 8, 8])]:
    m = ResNet(**small, output_stride=os_)
    feats = m.apply(m.init(jax.random.key(1), x), x)
    assert [f.shape[1] for f in feats] == sizes
    # dilation changes no parameter shapes (weights stay importable)
    assert jax.tree.map(jnp.shape, m.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, var)


def test_remat_gives_same_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  m, mr = (rj.create_model('refinenet_tiny', 3, remat=r) for r in (False, True))
  v = random_variables(m, x.shape, seed=1)
  f = lambda mod: jax.grad(lambda p: mod.apply({**v, 'params': p}, x).sum())(v['params'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max()),
               f(m), f(mr))


def test_bfloat16_compute_close_to_float32():
  # Measured: 1.4e-2 relative (max abs diff / max |logit|) here; 1.6e-2 on full RefineNet-101.
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  m32 = rj.create_model('refinenet_tiny', 5)
  m16 = rj.create_model('refinenet_tiny', 5, dtype=jnp.bfloat16)
  v = random_variables(m32, x.shape, seed=1)
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(jax.eval_shape(m16.init, jax.random.key(1), x)))
  a, b = jax.jit(m32.apply)(v, x), jax.jit(m16.apply)(v, x)
  assert b.dtype == jnp.float32
  rel = float(jnp.abs(a - b).max() / jnp.abs(a).max())
  assert 0 < rel < 0.05, rel


def test_bad_wiring_is_rejected():
  with pytest.raises(ValueError, match='path_groups'):
    rj.create_model('refinenet_tiny', 3, path_groups=(1, 3, 3, 4)).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_decoder_init_defaults_to_official_and_rejects_unknown():
  m = rj.create_model('refinenet_tiny', 3)
  assert m.decoder_init == 'official'
  v = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  k = v['params']['block1']['crp']['conv0']['kernel']
  assert abs(float(k.std()) - 0.01) < 0.002  # N(0, 0.01) as in the official code
  with pytest.raises(ValueError, match='decoder_init'):
    rj.create_model('refinenet_tiny', 3, decoder_init='xavier').init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_normalization_is_part_of_the_model():
  assert rj.create_model('refinenet_r101', 21).normalization == 'imagenet'
  img = np.full((1, 2, 2, 3), 255, np.uint8)
  out = rj.normalize_images(img, 'imagenet')
  np.testing.assert_allclose(out[0, 0, 0], (np.ones(3) - [0.485, 0.456, 0.406]) /
                             [0.229, 0.224, 0.225], rtol=1e-5)
  with pytest.raises(ValueError, match='unknown normalization'):
    rj.normalize_images(img, 'nope')
