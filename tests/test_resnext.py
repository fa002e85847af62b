"""ResNeXt encoders: torchvision parameter counts, grouped-conv layout, strict torchvision import
with output parity (stored torchvision outputs; experiments/make_parity_fixtures_resnext.py),
and ExFuse's layer-rearranged ResNeXt-101."""
import ast
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refinenet_jax as rj
from refinenet_jax.convert import CheckpointMismatchError, export_state_dict, import_state_dict
from refinenet_jax.models.backbones import ENCODERS, RESNET_STAGES, RESNEXT_LR_STAGES, ResNet
from refinenet_jax.testing import synthetic_state_dict

FIX = os.path.join(os.path.dirname(__file__), 'fixtures')
RESNEXT = dict(groups=32, width_per_group=4)
FC = 2048 * 1000 + 1000  # the ImageNet classifier torchvision counts in


def _n_params(module, shape=(1, 64, 64, 3)):
  v = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(v['params']))


@pytest.mark.parametrize('stages,want', [
    (RESNET_STAGES[50], 25_028_904),    # torchvision resnext50_32x4d
    (RESNET_STAGES[101], 44_177_704),   # torchvision ResNet(Bottleneck, [3,4,23,3], 32, 4)
    (RESNEXT_LR_STAGES, 52_381_480),    # the same with blocks [8, 8, 9, 8]
])
def test_parameter_counts_equal_torchvision(stages, want):
  assert _n_params(ResNet(stages, **RESNEXT)) + FC == want


def test_grouped_conv_layout_and_plain_resnet_unchanged():
  v = jax.eval_shape(lambda: ResNet(RESNET_STAGES[50], **RESNEXT).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))['params']
  # torchvision width = int(planes * 4 / 64) * 32: 128 / 256 / 512 / 1024, 4 / 8 / 16 / 32 per group
  for s, inner in enumerate((128, 256, 512, 1024)):
    blk = v[f'layer{s + 1}_0']
    assert blk['conv1']['kernel'].shape[-1] == inner
    assert blk['conv2']['kernel'].shape == (3, 3, inner // 32, inner)
    assert blk['conv3']['kernel'].shape[-1] == 256 * 2 ** s
  plain = jax.eval_shape(lambda: ResNet(RESNET_STAGES[50]).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))['params']
  assert plain['layer1_0']['conv2']['kernel'].shape == (3, 3, 64, 64)


def test_layer_rearranged_encoder_keeps_stage_shapes():
  x = jnp.zeros((1, 64, 96, 3))
  std, lr = ResNet(RESNET_STAGES[101], **RESNEXT), ResNet(RESNEXT_LR_STAGES, **RESNEXT)
  shapes = lambda m: [f.shape for f in jax.eval_shape(
      lambda: m.apply(m.init(jax.random.key(0), x), x))]
  assert shapes(lr) == shapes(std) == [(1, 16, 24, 256), (1, 8, 12, 512), (1, 4, 6, 1024),
                                       (1, 2, 3, 2048)]
  assert sum(RESNEXT_LR_STAGES) == sum(RESNET_STAGES[101]) == 33  # still 101 layers
  params = jax.eval_shape(lambda: lr.init(jax.random.key(0), x))['params']
  assert {'layer1_7', 'layer2_7', 'layer3_8', 'layer4_7'} <= set(params)
  assert 'layer1_8' not in params and 'layer3_9' not in params


def test_refinenet_on_resnext_is_one_registry_entry():
  # torchvision resnext101_32x8d: 88,791,336 with its fc; the decoder is refinenet_r101's
  # (118,052,437 minus its ResNet-101 encoder, 42,500,160): the stage widths are the same
  model = rj.create_model('refinenet_resnext101_32x8d', 21)
  assert model.encoder == ENCODERS['resnext101_32x8d']
  assert rj.create_model('refinenet_r101', 21, encoder='resnext101_32x8d') == model
  assert _n_params(model.encoder()) + FC == 88_791_336
  assert _n_params(model) == 118_052_437 - 42_500_160 + 88_791_336 - FC
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))['params']
  # torchvision width = int(planes * 8 / 64) * 32: 256 / 512 / 1024 / 2048, 8 / 16 / 32 / 64 a group
  for s, inner in enumerate((256, 512, 1024, 2048)):
    blk = v['encoder'][f'layer{s + 1}_0']
    assert blk['conv2']['kernel'].shape == (3, 3, inner // 32, inner)
    assert blk['conv3']['kernel'].shape[-1] == 256 * 2 ** s
  assert {f'layer3_{b}' for b in range(23)} <= set(v['encoder']) and 'layer3_23' not in v['encoder']


def test_torchvision_resnext50_import_is_strict_and_matches_torchvision():
  z = np.load(os.path.join(FIX, 'parity_resnext50_encoder.npz'))
  keys = list(zip(z['keys'].tolist(), [ast.literal_eval(s) for s in z['shapes']]))
  sd = synthetic_state_dict(keys, int(z['seed']))
  assert 'fc.weight' in sd and 'layer1.0.conv2.weight' in sd
  assert sd['layer1.0.conv2.weight'].shape == (128, 4, 3, 3)  # grouped: in/groups = 4
  model = rj.create_model('gcn_resnext50', 21)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  variables = import_state_dict(model, sd, 'torchvision_resnet', init_variables=abstract)
  enc = ResNet(RESNET_STAGES[50], **RESNEXT)
  feats = jax.jit(enc.apply)({c: variables[c]['encoder'] for c in ('params', 'batch_stats')},
                             z['input_nhwc'])
  for i, f in enumerate(feats):
    ref = z[f'c{i + 2}_nhwc']
    assert f.shape == ref.shape
    rel = float(np.abs(np.asarray(f) - ref).max() / np.abs(ref).max())
    assert rel < 1e-4, f'c{i + 2}: relative error {rel:.2e} vs {z["reference"]}'  # measured <1e-6
  # strict: a checkpoint of another depth or cardinality is refused, naming the keys
  bad = dict(sd)
  bad['layer1.0.conv2.weight'] = np.zeros((128, 128, 3, 3), np.float32)  # an ungrouped 3x3
  del bad['layer4.2.bn3.running_var']
  with pytest.raises(CheckpointMismatchError) as e:
    import_state_dict(model, bad, 'torchvision_resnet', init_variables=abstract)
  assert 'layer1.0.conv2.weight: (128, 128, 3, 3)' in str(e.value)
  assert e.value.missing == ['layer4.2.bn3.running_var']


def test_layer_rearranged_model_refuses_standard_weights():
  # the LR encoder has no published weights: a standard-layout checkpoint must not half-load
  small = dict(base_width=8, groups=2, width_per_group=16)
  enc = ResNet((1, 1, 1, 1), **small)
  v = jax.jit(enc.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  sd = export_state_dict({c: {'encoder': v[c]} for c in v}, 'torchvision_resnet')
  shapes = lambda m: jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  model = rj.create_model('gcn_tiny', 3, stage_sizes=(2, 1, 1, 1))
  with pytest.raises(CheckpointMismatchError, match=r'layer1\.1\.conv2\.weight'):
    import_state_dict(model, sd, 'torchvision_resnet', init_variables=shapes(model))
  same = rj.create_model('gcn_tiny', 3)
  out = import_state_dict(same, sd, 'torchvision_resnet', init_variables=shapes(same))
  np.testing.assert_array_equal(out['params']['encoder']['layer1_0']['conv2']['kernel'],
                                v['params']['layer1_0']['conv2']['kernel'])
