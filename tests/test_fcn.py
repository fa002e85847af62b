"""FCN-VGG16: exact output size for any input, reference parameter counts, logit parity with
wkentaro/pytorch-fcn (stored outputs; experiments/make_parity_fixtures.py), the frozen bilinear
upsampling, strict weight import, staged 32s -> 16s -> 8s initialisation, and training steps."""
import ast
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import refinenet_jax as rj
from refinenet_jax import losses, steps, train
from refinenet_jax.convert import CheckpointMismatchError, save_converted
from refinenet_jax.convert.fcn_torch import export_state_dict, import_state_dict
from refinenet_jax.models import fcn
from refinenet_jax.testing import bare_run, synthetic_state_dict

FIX = os.path.join(os.path.dirname(__file__), 'fixtures')
FULL = ('fcn32s', 'fcn16s', 'fcn8s', 'fcn8s_atonce')


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _abstract(model, hw=(32, 32)):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *hw, 3))))


# ------------------------------------------------------------------------ shapes and counts

@pytest.mark.parametrize('name', FULL)
def test_full_models_output_the_input_size(name):
  model = rj.create_model(name, 21)
  variables = _abstract(model)
  for hw in [(1, 1), (33, 33), (64, 64), (224, 224), (375, 500), (500, 375), (500, 500),
             (1, 500)]:
    out = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32))
    assert out.shape == (2, *hw, 21) and out.dtype == jnp.float32, (hw, out.shape)


@pytest.mark.parametrize('name,sizes', [
    ('fcn32s_tiny', [(1, 1), (33, 64)]),
    ('fcn16s_tiny', [(1, 7), (64, 64)]),
    ('fcn8s_tiny', [(1, 1), (33, 33), (64, 33)]),
])
def test_tiny_models_forward_small_sizes(name, sizes):
  model = rj.create_model(name, 3)
  v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  # zero-initialised score convs would make every output 0: give them values
  v = jax.tree_util.tree_map_with_path(lambda p, a: a + 0.3 if p[1].key != 'encoder' else a, v)
  apply = jax.jit(model.apply)
  for hw in sizes:
    x = jax.random.normal(jax.random.key(1), (1, *hw, 3)) * 50
    out = apply(v, x)
    assert out.shape == (1, *hw, 3), (name, hw)
    assert np.all(np.isfinite(out)) and np.abs(out).max() > 0


# wkentaro/pytorch-fcn, 21 classes (counted from the reference's state dicts): every parameter,
# and without the frozen upscore* deconvolutions (which its optimizer never sees).
REFERENCE_COUNTS = {  # name: (learnable, with frozen bilinear kernels)
    'fcn32s': (134_346_581, 136_152_917),
    'fcn16s': (134_357_354, 134_815_994),
    'fcn8s': (134_362_751, 134_489_759),
    'fcn8s_atonce': (134_362_751, 134_489_759),
}


@pytest.mark.parametrize('name', FULL)
def test_parameter_counts_match_the_reference(name):
  learnable, with_frozen = REFERENCE_COUNTS[name]
  model = rj.create_model(name, 21)
  assert _count(_abstract(model)['params']) == learnable
  frozen = sum(21 * 21 * k * k for k, _, _ in fcn.UPSAMPLING[model.output_stride])
  assert learnable + frozen == with_frozen
  # CVPR variant: the intermediate 2x deconvolutions (21 x 21 x 4 x 4 each) become parameters
  learned = rj.create_model(name, 21, learned_upsampling=True)
  n_learned = len(fcn.UPSAMPLING[model.output_stride]) - 1
  assert _count(_abstract(learned)['params']) == learnable + n_learned * 21 * 21 * 16


# ------------------------------------------------------------------------ parity

@pytest.fixture(scope='module')
def wkentaro_case():
  z = np.load(os.path.join(FIX, 'parity_fcn_vgg16.npz'))
  keys = list(zip(z['keys'].tolist(), [ast.literal_eval(s) for s in z['shapes']]))
  return z, synthetic_state_dict(keys, int(z['seed']))


@pytest.mark.parametrize('name,ref', [('fcn32s', 'FCN32s'), ('fcn16s', 'FCN16s'),
                                      ('fcn8s', 'FCN8s'), ('fcn8s_atonce', 'FCN8sAtOnce')])
def test_logits_match_wkentaro_pytorch_fcn(wkentaro_case, name, ref):
  z, shared = wkentaro_case
  model = rj.create_model(name, int(z['num_classes']))
  # the reference's state dict: its own keys of the shared synthetic set, plus the bilinear
  # upscore* filters its deconvolutions hold
  skips = {32: (), 16: ('score_pool4',), 8: ('score_pool4', 'score_pool3')}[model.output_stride]
  sd = {k: a for k, a in shared.items() if not k.startswith('score_pool') or
        k.split('.')[0] in skips}
  sd.update(export_state_dict({}, model))
  variables = import_state_dict(model, sd)
  x, want = z['input_nhwc'], z[f'logits_{ref}']
  assert x.shape[1] % 2 and x.shape[2] % 2
  out = np.asarray(jax.jit(model.apply)(variables, x))
  assert out.shape == want.shape
  rel = np.abs(out - want).max() / np.abs(want).max()
  assert rel < 1e-4, f'{name}: relative error {rel:.2e} vs {z["reference"]}'  # measured <3e-6


# ------------------------------------------------------------------------ building blocks

def _caffe_deconv_1d(x, kernel, stride):
  """Per-channel transposed conv along axis 1 by its definition: out[s*i + p] += x[i] * f[p]."""
  f = fcn.bilinear_1d(kernel)
  out = np.zeros((x.shape[0], (x.shape[1] - 1) * stride + kernel) + x.shape[2:])
  for i in range(x.shape[1]):
    for p in range(kernel):
      out[:, stride * i + p] += x[:, i] * f[p]
  return out


@pytest.mark.parametrize('kernel,stride,offset', [(64, 32, 19), (4, 2, 0), (32, 16, 27),
                                                  (16, 8, 31), (63, 32, 18)])
def test_frozen_upsampling_is_the_caffe_bilinear_deconvolution(kernel, stride, offset):
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 5))
  full = _caffe_deconv_1d(_caffe_deconv_1d(x, kernel, stride).swapaxes(1, 2), kernel,
                          stride).swapaxes(1, 2)
  size = (full.shape[1] - offset - 1, full.shape[2] - offset)
  want = full[:, offset:offset + size[0], offset:offset + size[1]]
  got = fcn.bilinear_upsample(jnp.asarray(x, jnp.float32), kernel, stride, offset, size)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the 2-D filter on the class diagonal is the outer product (surgery.upsample_filt)
  w = fcn.bilinear_kernel(kernel, 3)
  np.testing.assert_array_equal(w[:, :, 0, 1], 0)
  np.testing.assert_allclose(w[:, :, 2, 2], np.outer(fcn.bilinear_1d(kernel),
                                                     fcn.bilinear_1d(kernel)))
  if kernel == 4:
    np.testing.assert_allclose(fcn.bilinear_1d(4), [0.25, 0.75, 0.75, 0.25])
  with pytest.raises(ValueError, match='exceeds'):
    fcn.bilinear_upsample(jnp.asarray(x), kernel, stride, offset,
                          (full.shape[1] - offset + 1, 1))


def test_max_pool_rounds_up_like_caffe():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 4, 2)), jnp.float32)
  got = fcn.max_pool_ceil(x)
  assert got.shape == (1, 3, 2, 2)
  padded = np.full((1, 6, 4, 2), -np.inf, np.float32)
  padded[:, :5] = x
  np.testing.assert_array_equal(got, padded.reshape(1, 3, 2, 2, 2, 2).max(axis=(2, 4)))


def test_learned_upsampling_starts_bilinear_and_imports_torch_semantics():
  model = rj.create_model('fcn8s_tiny', 3, learned_upsampling=True)
  frozen = rj.create_model('fcn8s_tiny', 3)
  v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  v = jax.tree_util.tree_map_with_path(  # non-zero score convs
      lambda p, a: a if p[1].key.startswith('upscore') else a + 0.05, v)
  np.testing.assert_array_equal(v['params']['upscore2']['kernel'], fcn.bilinear_kernel(4, 3))
  x = jax.random.normal(jax.random.key(1), (1, 37, 29, 3)) * 50
  fv = {'params': {k: a for k, a in v['params'].items() if not k.startswith('upscore')}}
  np.testing.assert_allclose(model.apply(v, x), frozen.apply(fv, x), rtol=1e-5, atol=1e-5)
  # a torch ConvTranspose2d (I, O, kh, kw) kernel that is neither symmetric nor diagonal
  sd = export_state_dict(v, model)
  w = np.random.default_rng(2).normal(size=(3, 3, 4, 4)).astype(np.float32)
  sd['upscore2.weight'] = w
  got = import_state_dict(model, sd)
  np.testing.assert_array_equal(export_state_dict(got, model)['upscore2.weight'], w)
  y = np.random.default_rng(3).normal(size=(1, 3, 5, 3)).astype(np.float32)
  want = np.zeros((1, 8, 12, 3))  # out[o, 2i + p, 2j + q] += y[c, i, j] * w[c, o, p, q]
  for i in range(3):
    for j in range(5):
      want[0, 2 * i:2 * i + 4, 2 * j:2 * j + 4] += np.einsum('c,copq->pqo', y[0, i, j], w)
  deconv = fcn.learned_deconv(3, 4, 2, jnp.float32)
  out = deconv.apply({'params': got['params']['upscore2']}, y)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # the final 8x layer stays a constant: a checkpoint where it was learned is refused
  sd['upscore8.weight'] = sd['upscore8.weight'] * 1.01
  with pytest.raises(CheckpointMismatchError, match='upscore8.weight: not the bilinear'):
    import_state_dict(model, sd)


# ------------------------------------------------------------------------ weight import

def _tiny(name='fcn16s_tiny', classes=3, seed=0, **kw):
  """A tiny FCN with random (non-zero) weights everywhere."""
  model = rj.create_model(name, classes, **kw)
  v = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)))
  leaves, tree = jax.tree.flatten(v)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return model, jax.tree.unflatten(tree, [
      jax.random.normal(k, a.shape) * (0.3 if a.ndim == 4 else 0.1) for k, a in zip(keys, leaves)])


def test_wkentaro_layout_roundtrip_and_strictness():
  model, v = _tiny('fcn16s_tiny')
  sd = export_state_dict(v, model)
  assert sorted(k for k in sd if 'score' in k) == [
      'score_fr.bias', 'score_fr.weight', 'score_pool4.bias', 'score_pool4.weight',
      'upscore16.weight', 'upscore2.weight']
  assert sd['conv1_1.weight'].shape == (4, 3, 3, 3) and sd['fc6.weight'].shape == (32, 16, 7, 7)
  x = jax.random.normal(jax.random.key(5), (1, 41, 23, 3)) * 50
  back = import_state_dict(model, {'state_dict': {'module.' + k: a for k, a in sd.items()}})
  np.testing.assert_array_equal(model.apply(back, x), model.apply(v, x))
  bad = dict(sd)
  del bad['fc7.bias']
  bad['score_pool3.weight'] = np.zeros((3, 8, 1, 1), np.float32)  # an FCN-8s key
  bad['score_fr.weight'] = np.zeros((7, 32, 1, 1), np.float32)  # 7 classes
  with pytest.raises(CheckpointMismatchError) as e:
    import_state_dict(model, bad)
  assert e.value.missing == ['fc7.bias'] and e.value.unexpected == ['score_pool3.weight']
  assert 'score_fr.weight: (7, 32, 1, 1)' in str(e.value) and 'nothing was loaded' in str(e.value)
  # an FCN-16s checkpoint does not load into FCN-32s (and the other way round)
  m32, _ = _tiny('fcn32s_tiny')
  with pytest.raises(CheckpointMismatchError, match='score_pool4.weight'):
    import_state_dict(m32, sd)
  no_upscore = {k: a for k, a in sd.items() if k != 'upscore16.weight'}
  with pytest.raises(CheckpointMismatchError, match='upscore16.weight'):
    import_state_dict(model, no_upscore)
  with pytest.raises(ValueError, match="expect 'caffe_bgr'"):
    import_state_dict(rj.create_model('fcn16s_tiny', 3, normalization='imagenet'), sd)


@pytest.mark.parametrize('layout,normalization', [('wkentaro_vgg16', 'caffe_bgr'),
                                                  ('torchvision_vgg16', 'imagenet')])
def test_vgg16_trunk_import(layout, normalization):
  src, v = _tiny('fcn32s_tiny', normalization=normalization)
  sd = export_state_dict(v, src, layout)
  assert sorted(sd)[:4] == ['classifier.0.bias', 'classifier.0.weight', 'classifier.3.bias',
                            'classifier.3.weight']
  assert sd['features.0.weight'].shape == (4, 3, 3, 3)
  assert sd['features.28.weight'].shape == (16, 16, 3, 3)  # conv5_3, torchvision's index
  assert sd['classifier.0.weight'].shape == (32, 16 * 7 * 7)
  sd['classifier.6.weight'] = np.zeros((1000, 32), np.float32)  # ImageNet classifier: discarded
  sd['classifier.6.bias'] = np.zeros((1000,), np.float32)
  model = rj.create_model('fcn8s_tiny', 3, normalization=normalization)
  out = import_state_dict(model, sd, layout)
  # fc6 as a 7x7 conv computes what torchvision's Linear does on the NCHW-flattened pool5
  feats = np.random.default_rng(0).normal(size=(1, 7, 7, 16)).astype(np.float32)
  fc6 = out['params']['encoder']['fc6']
  conv = jax.lax.conv_general_dilated(feats, fc6['kernel'], (1, 1), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))[0, 0, 0]
  linear = feats.transpose(0, 3, 1, 2).reshape(-1) @ sd['classifier.0.weight'].T
  np.testing.assert_allclose(conv + fc6['bias'], linear + sd['classifier.0.bias'], rtol=1e-5,
                             atol=1e-5)
  for name in ('conv1_1', 'conv5_3', 'fc7'):
    np.testing.assert_array_equal(out['params']['encoder'][name]['kernel'],
                                  v['params']['encoder'][name]['kernel'])
  for head in ('classifier', 'score_pool4', 'score_pool3'):  # Caffe's zero-filled score convs
    assert not np.any(out['params'][head]['kernel']) and not np.any(out['params'][head]['bias'])
  sd['score_fr.weight'] = np.zeros((3, 32, 1, 1), np.float32)
  with pytest.raises(CheckpointMismatchError, match='score_fr.weight'):
    import_state_dict(model, sd, layout)


# ------------------------------------------------------------------------ staged training

def _capture_scores(model, v, x):
  _, inter = model.apply(v, x, capture_intermediates=lambda m, _: m.name == 'classifier')
  return inter['intermediates']['classifier']['__call__'][0]


def test_staged_initialisation_keeps_the_coarser_predictions():
  m32, v32 = _tiny('fcn32s_tiny', classes=4)
  x = jax.random.normal(jax.random.key(1), (2, 150, 170, 3)) * 50
  o32 = np.asarray(m32.apply(v32, x))
  m16, m8 = rj.create_model('fcn16s_tiny', 4), rj.create_model('fcn8s_tiny', 4)
  v16 = fcn.upgrade_variables(v32, m16)
  v8 = fcn.upgrade_variables(v16, m8)
  for v in (v16, v8):
    np.testing.assert_array_equal(v['params']['encoder']['fc6']['kernel'],
                                  v32['params']['encoder']['fc6']['kernel'])
    np.testing.assert_array_equal(v['params']['classifier']['bias'],
                                  v32['params']['classifier']['bias'])
    assert not np.any(v['params']['score_pool4']['kernel'])
  assert not np.any(v8['params']['score_pool3']['kernel'])
  score = _capture_scores(m32, v32, x)
  up = fcn.bilinear_upsample
  o16 = np.asarray(m16.apply(v16, x))
  o8 = np.asarray(m8.apply(v8, x))
  # exactly: the zero skips add nothing; the finer net upsamples the same score map its way
  np.testing.assert_allclose(o16, up(up(score, 4, 2), 32, 16, 27, x.shape[1:3]), atol=1e-5)
  np.testing.assert_allclose(o8, up(up(up(score, 4, 2), 4, 2), 16, 8, 31, x.shape[1:3]),
                             atol=1e-5)
  # and that is the coarser net's output up to 2x+16x (2x+2x+8x) vs 32x bilinear interpolation
  for o in (o16, o8):
    assert np.abs(o - o32).max() < 0.25 * np.abs(o32).max()  # measured 0.20
    assert np.mean(o.argmax(-1) == o32.argmax(-1)) > 0.98  # measured 1.0
  # not an upgrade: 8s -> 16s would drop score_pool3
  with pytest.raises(CheckpointMismatchError, match='score_pool3'):
    fcn.upgrade_variables(v8, m16)
  assert fcn.is_coarser('fcn32s', 'fcn16s') and fcn.is_coarser('fcn16s', 'fcn8s_atonce')
  assert not fcn.is_coarser('fcn8s', 'fcn16s') and not fcn.is_coarser('fcn32s_tiny', 'fcn8s')
  assert not fcn.is_coarser('refinenet_tiny', 'fcn8s') and not fcn.is_coarser(None, 'fcn8s')


def test_init_checkpoint_of_a_coarser_fcn_starts_the_finer_one(tmp_path):
  _, v32 = _tiny('fcn32s_tiny', classes=4)
  save_converted(tmp_path / 'fcn32s', v32, model_name='fcn32s_tiny', num_classes=4)
  config = ml_collections.ConfigDict(dict(init_checkpoint=str(tmp_path / 'fcn32s'), seed=0,
                                          model='fcn16s_tiny', num_classes=4))
  m16 = rj.create_model('fcn16s_tiny', 4)
  state = train.initial_state(config, bare_run(m16))
  want = fcn.upgrade_variables(v32, m16)['params']
  jax.tree.map(np.testing.assert_array_equal, state.params, want)
  # 16s -> 8s at-once; a checkpoint of the same model loads as before
  save_converted(tmp_path / 'fcn16s', {'params': want}, model_name='fcn16s_tiny', num_classes=4)
  config.init_checkpoint = str(tmp_path / 'fcn16s')
  config.model = 'fcn8s_atonce_tiny'
  state = train.initial_state(config, bare_run(rj.create_model('fcn8s_atonce_tiny', 4)))
  assert not np.any(state.params['score_pool3']['kernel'])
  config.model = 'fcn16s_tiny'
  state = train.initial_state(config, bare_run(m16))
  jax.tree.map(np.testing.assert_array_equal, state.params, want)
  # anything else is still refused by name (here: a finer net into a coarser one)
  config.model = 'fcn32s_tiny'
  with pytest.raises(ValueError, match='holds fcn16s_tiny, not fcn32s_tiny'):
    train.initial_state(config, bare_run(rj.create_model('fcn32s_tiny', 4)))


# ------------------------------------------------------------------------ training

@pytest.mark.parametrize('name,reduction', [('fcn32s_tiny', 'mean'), ('fcn16s_tiny', 'mean'),
                                            ('fcn8s_tiny', 'mean'), ('fcn8s_atonce_tiny', 'sum')])
def test_training_steps_reduce_the_loss(name, reduction):
  from refinenet_jax.data.synthetic import make_synthetic_scenes
  images, labels = make_synthetic_scenes(2, (24, 28), seed=0)
  labels = np.minimum(labels, 2)  # 3 classes
  model = rj.create_model(name, 3)
  n_pixels = labels.size
  lr = 1e-3 if reduction == 'mean' else 1e-3 / n_pixels  # a summed loss scales the gradient
  state = steps.init_train_state(jax.random.key(0), model=model, tx=optax.sgd(lr, 0.9),
                                  input_shape=(1, 24, 28, 3))
  loss_fn = functools.partial(losses.segmentation_loss, mode='upsample', reduction=reduction)
  step = jax.jit(functools.partial(steps.train_step, model=model, loss_fn=loss_fn))
  batch = {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}
  history = []
  for _ in range(4):
    new, m = step(state, batch)
    history.append(float(m['loss']))
    if not history[1:]:  # step 0: zero score convs -> uniform logits; only the heads learn
      jax.tree.map(np.testing.assert_array_equal, new.params['encoder'], state.params['encoder'])
    state = new
  assert np.all(np.isfinite(history))
  # zero-initialised score convs: the first loss is exactly log(3) per pixel
  np.testing.assert_allclose(history[0], np.log(3) * (n_pixels if reduction == 'sum' else 1),
                             rtol=1e-5)
  assert history[-1] < history[0], history
  first = rj.create_model(name, 3).init(jax.random.key(0), jnp.zeros((1, 24, 28, 3)))
  assert not np.array_equal(state.params['encoder']['conv1_1']['kernel'],
                            first['params']['encoder']['conv1_1']['kernel'])
