"""FCN-ResNet (torchvision design): sizes, parameter counts, logit parity with torchvision,
strict weight import and training with the auxiliary head."""
import ast
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import refinenet_jax as rj
from refinenet_jax import losses, steps
from refinenet_jax.convert import CheckpointMismatchError, refinenet_torch
from refinenet_jax.convert.torchvision_seg import export_state_dict, import_state_dict
from refinenet_jax.data import synthetic
from refinenet_jax.testing import synthetic_state_dict

FIX = os.path.join(os.path.dirname(__file__), 'fixtures')

# torchvision 0.28 fcn_resnet{50,101}(num_classes=21, aux_loss=...): sum of requires_grad numel.
TORCHVISION_PARAMS = {
    ('fcn_resnet50', True): 35_322_218, ('fcn_resnet50', False): 32_957_013,
    ('fcn_resnet101', True): 54_314_346, ('fcn_resnet101', False): 51_949_141,
}
SIZES = [(1, 1), (33, 33), (64, 64), (224, 224), (375, 500), (500, 375), (33, 64)]


def _abstract(model, shape=(1, 64, 64, 3)):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def _train_apply(model, v, x):
  return model.apply(v, x, train=True, rngs={'dropout': jax.random.key(1)},
                     mutable=['batch_stats'])[0]


@pytest.mark.parametrize('name,aux', sorted(TORCHVISION_PARAMS))
def test_parameter_counts_equal_torchvision(name, aux):
  v = _abstract(rj.create_model(name, 21, aux_head=aux))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(v['params'])) == \
      TORCHVISION_PARAMS[name, aux]
  assert ('aux_classifier' in v['params']) == aux


def test_full_size_outputs_have_the_input_size():
  model = rj.create_model('fcn_resnet50', 21)
  v = _abstract(model)
  for h, w in SIZES:
    x = jnp.zeros((2, h, w, 3))
    out, (aux,) = jax.eval_shape(lambda v: model.apply(v, x, return_aux=True), v)
    assert out.shape == aux.shape == (2, h, w, 21) and out.dtype == aux.dtype == jnp.float32
  out, (aux,) = jax.eval_shape(lambda v: _train_apply(model, v, x), v)
  assert out.shape == aux.shape == (2, *SIZES[-1], 21)
  half = rj.create_model('fcn_resnet50', 21, dtype=jnp.bfloat16)  # float32 params and logits
  assert jax.eval_shape(lambda v: half.apply(v, x), v).dtype == jnp.float32


def test_tiny_forward_has_the_input_size():
  model = rj.create_model('fcn_resnet_tiny', 3)
  v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  # eval mode skips the aux head unless asked (torchvision's eval output has both)
  outputs = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, return_aux=True),
                                  _train_apply(model, v, x)))
  for h, w in [(1, 1), (33, 64), (61, 83)]:
    x = jax.random.normal(jax.random.key(h * w), (2, h, w, 3))
    out, (same, (aux,)), (logits, (train_aux,)) = outputs(v, x)
    for a in (out, aux, logits, train_aux):
      assert a.shape == (2, h, w, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(same, out)
  assert not np.allclose(aux, out)
  plain = rj.create_model('fcn_resnet_tiny', 3, aux_head=False)
  with pytest.raises(ValueError, match='aux_head=True'):
    jax.eval_shape(lambda: plain.apply(plain.init(jax.random.key(0), x), x, return_aux=True))


def _fixture():
  z = np.load(os.path.join(FIX, 'parity_fcn_resnet50.npz'))
  keys = list(zip(z['keys'].tolist(), [ast.literal_eval(s) for s in z['shapes']]))
  return z, synthetic_state_dict(keys, int(z['seed']))


def _rel(out, ref):
  # Also against the spread around each class's mean: the heads' biases dominate |ref|.
  spread = np.abs(ref - ref.mean(axis=(0, 1, 2))).max()
  err = np.abs(out - ref).max()
  return err / np.abs(ref).max(), err / spread


def test_logits_match_torchvision_fcn_resnet50():
  z, sd = _fixture()
  x = z['input_nhwc'].astype(np.float32)  # stored as float16, exact
  assert x.shape[1] % 8 and x.shape[2] % 8
  model = rj.create_model('fcn_resnet50', 3)
  out, (aux,) = jax.jit(lambda v, x: model.apply(v, x, return_aux=True))(
      import_state_dict(model, sd), x)
  for got, ref in ((out, z['logits_nhwc']), (aux, z['aux_nhwc'])):
    assert got.shape == ref.shape
    rel, rel_spread = _rel(np.asarray(got), ref)
    assert rel < 1e-4 and rel_spread < 1e-3, (rel, rel_spread, str(z['reference']))
  # the same checkpoint without its aux keys fits the model built without the aux head
  plain = rj.create_model('fcn_resnet50', 3, aux_head=False)
  no_aux = {k: a for k, a in sd.items() if not k.startswith('aux_classifier.')}
  got = jax.jit(plain.apply)(import_state_dict(plain, no_aux), x)
  np.testing.assert_allclose(got, out, rtol=0, atol=1e-6)


def test_import_is_strict_about_the_aux_head_and_classes():
  _, sd = _fixture()
  no_aux = {k: a for k, a in sd.items() if not k.startswith('aux_classifier.')}
  aux_keys = sorted(set(sd) - set(no_aux) - {'aux_classifier.1.num_batches_tracked'})
  with pytest.raises(CheckpointMismatchError, match='nothing was loaded') as e:
    import_state_dict(rj.create_model('fcn_resnet50', 3), no_aux)
  assert e.value.missing == aux_keys and not e.value.unexpected
  with pytest.raises(CheckpointMismatchError) as e:
    import_state_dict(rj.create_model('fcn_resnet50', 3, aux_head=False), sd)
  assert e.value.unexpected == sorted(set(sd) - set(no_aux)) and not e.value.missing
  with pytest.raises(CheckpointMismatchError, match=r'classifier\.4\.weight: \(3, 512, 1, 1\)'):
    import_state_dict(rj.create_model('fcn_resnet50', 21), sd)
  with pytest.raises(CheckpointMismatchError, match='backbone.layer4.2.bn3.weight'):
    import_state_dict(rj.create_model('fcn_resnet50', 3),
                      {k: a for k, a in sd.items() if k != 'backbone.layer4.2.bn3.weight'})
  with pytest.raises(ValueError, match='expect .imagenet'):
    import_state_dict(rj.create_model('fcn_resnet50', 3, normalization='caffe_bgr'), sd)


def test_export_is_the_inverse_of_import():
  _, sd = _fixture()
  back = export_state_dict(import_state_dict(rj.create_model('fcn_resnet50', 3), sd))
  assert set(back) == set(sd)
  for k in sd:
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_imagenet_resnet_fills_the_encoder_only():
  model = rj.create_model('fcn_resnet_tiny', 3)
  init = jax.jit(model.init)
  v = init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  enc = refinenet_torch.export_state_dict(
      {c: {'encoder': v[c]['encoder']} for c in ('params', 'batch_stats')}, 'torchvision_resnet')
  enc['fc.weight'] = np.zeros((1000, 256), np.float32)  # the ImageNet classifier is discarded
  enc['fc.bias'] = np.zeros((1000,), np.float32)
  out = refinenet_torch.import_state_dict(model, enc, 'torchvision_resnet', rng=jax.random.key(7))
  fresh = init(jax.random.key(7), jnp.zeros((1, 64, 64, 3)))
  for c in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, out[c]['encoder'], v[c]['encoder'])
  for head in ('head_conv', 'classifier', 'aux_head_conv', 'aux_classifier'):
    jax.tree.map(np.testing.assert_array_equal, out['params'][head], fresh['params'][head])


def test_tiny_model_trains_with_the_aux_loss():
  model = rj.create_model('fcn_resnet_tiny', 5)
  state = steps.init_train_state(jax.random.key(0), model=model, tx=optax.sgd(0.05, 0.9),
                                  input_shape=(1, 32, 32, 3))
  loss_fn = functools.partial(losses.segmentation_loss, mode='upsample', aux_weights=(0.5,))
  step = jax.jit(functools.partial(steps.train_step, model=model, loss_fn=loss_fn))
  images, labels = synthetic.make_synthetic_scenes(8, (32, 32), seed=1)
  batch = {'image': images, 'label': labels}
  first = state
  history = []
  for _ in range(6):
    state, m = step(state, batch)
    history.append(m)
  m0 = history[0]
  np.testing.assert_allclose(m0['loss'], m0['loss/main'] + 0.5 * m0['loss/aux0'], rtol=1e-6)
  assert history[-1]['loss'] < 0.9 * m0['loss'], [float(m['loss']) for m in history]
  assert history[-1]['loss/aux0'] < m0['loss/aux0']
  for col, key in (('params', 'aux_classifier'), ('batch_stats', 'aux_head_bn')):
    before, after = getattr(first, col)[key], getattr(state, col)[key]
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before),
                                                     jax.tree.leaves(after))), (col, key)


def test_voc_configs_follow_the_torchvision_recipe():
  from configs import fcn_resnet50_voc, fcn_resnet101_voc
  for mod, name in ((fcn_resnet50_voc, 'fcn_resnet50'), (fcn_resnet101_voc, 'fcn_resnet101')):
    c = mod.get_config()
    assert c.model == name and tuple(c.aux_weights) == (0.5,) and c.loss_mode == 'upsample'
    assert (c.learning_rate, c.momentum, c.weight_decay, c.batch_size) == (0.02, 0.9, 1e-4, 32)
    assert rj.create_model(c.model, c.num_classes, **c.model_overrides.to_dict()).aux_head
