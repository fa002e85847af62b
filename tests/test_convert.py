"""PyTorch weight import: torch-free file I/O, strictness, and logit parity with the
published PyTorch code (stored reference outputs; see experiments/make_parity_fixtures.py)."""
import ast
import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refinenet_jax as rj
from refinenet_jax.convert import (CheckpointFormatError, CheckpointMismatchError,
                                   export_state_dict, import_state_dict, load_converted,
                                   load_torch_checkpoint, save_torch_state_dict,
                                   unwrap_state_dict)
from refinenet_jax.convert.__main__ import main as convert_main
from refinenet_jax.testing import synthetic_state_dict

FIX = os.path.join(os.path.dirname(__file__), 'fixtures')


def _parity_case(fixture):
  z = np.load(os.path.join(FIX, fixture))
  keys = list(zip(z['keys'].tolist(), [ast.literal_eval(s) for s in z['shapes']]))
  return z, synthetic_state_dict(keys, int(z['seed']))


@pytest.mark.parametrize('name,fixture', [
    ('refinenet_r101', 'parity_refinenet_r101.npz'),   # DrSleep/refinenet-pytorch rf101
    ('lw_refinenet_r50', 'parity_lw_refinenet_r50.npz'),  # DrSleep/light-weight-refinenet rf_lw50
])
def test_logits_match_published_pytorch_code(name, fixture):
  z, sd = _parity_case(fixture)
  assert any(k.endswith('running_var') for k in sd)  # BN statistics are not at their defaults
  model = rj.create_model(name, 21)
  variables = import_state_dict(model, sd)
  x, ref = z['input_nhwc'], z['logits_nhwc']
  assert x.shape[1] % 32 and x.shape[2] % 32
  out = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, x))
  assert out.shape == ref.shape
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert rel < 1e-4, f'{name}: relative error {rel:.2e} vs {z["reference"]}'  # measured 2e-6


def test_export_is_the_inverse_of_import():
  z, sd = _parity_case('parity_lw_refinenet_r50.npz')
  model = rj.create_model('lw_refinenet_r50', 21)
  back = export_state_dict(import_state_dict(model, sd))
  assert set(back) == set(sd)
  for k in sd:
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[k], sd[k])


def test_reads_real_torch_files_zip_and_legacy():
  want = dict(np.load(os.path.join(FIX, 'torch_io_expected.npz')))
  zipped = load_torch_checkpoint(os.path.join(FIX, 'torch_io_zip.pth'))
  legacy = load_torch_checkpoint(os.path.join(FIX, 'torch_io_legacy.pth'))
  assert legacy['epoch_start'] == 3
  legacy = unwrap_state_dict(legacy)  # {'segmenter': {'module.*': ...}}
  for got in (zipped, legacy):
    assert list(got) == list(want)
    for k, v in want.items():
      assert got[k].shape == v.shape, k
      np.testing.assert_array_equal(np.asarray(got[k], v.dtype), v, err_msg=k)


def test_writer_roundtrip(tmp_path):
  sd = {'a.weight': np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, ::2],
        'b.num_batches_tracked': np.array(3, np.int64), 'c': np.zeros((0, 3), np.float32)}
  save_torch_state_dict(sd, tmp_path / 'x.pth')
  got = load_torch_checkpoint(tmp_path / 'x.pth')
  assert list(got) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(got[k], sd[k])
    assert got[k].shape == sd[k].shape


def test_corrupt_and_truncated_files_fail_clearly(tmp_path):
  src = os.path.join(FIX, 'torch_io_zip.pth')
  with open(src, 'rb') as f:
    data = f.read()
  (tmp_path / 'trunc.pth').write_bytes(data[:len(data) // 2])
  (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint at all')
  for f in ('trunc.pth', 'junk.pth'):
    with pytest.raises(CheckpointFormatError, match=f):
      load_torch_checkpoint(tmp_path / f)
  with open(os.path.join(FIX, 'torch_io_legacy.pth'), 'rb') as f:
    legacy = f.read()
  (tmp_path / 'trunc_legacy.pth').write_bytes(legacy[:-40])
  with pytest.raises(CheckpointFormatError, match='truncated|corrupt'):
    load_torch_checkpoint(tmp_path / 'trunc_legacy.pth')
  with pytest.raises(FileNotFoundError):
    load_torch_checkpoint(tmp_path / 'missing.pth')


def test_refuses_to_execute_code_from_a_checkpoint(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))
  with zipfile.ZipFile(tmp_path / 'evil.pth', 'w') as zf:
    zf.writestr('evil/data.pkl', pickle.dumps({'x': Evil()}, protocol=2))
  with pytest.raises(CheckpointFormatError, match='refusing to load global'):
    load_torch_checkpoint(tmp_path / 'evil.pth')


def _tiny(name='refinenet_tiny', classes=3):
  model = rj.create_model(name, classes)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 40, 40, 3)))


def test_truncated_or_mismatched_state_dict_names_the_keys():
  model, v = _tiny()
  sd = export_state_dict(v)
  bad = dict(sd)
  del bad['layer4.0.bn3.running_var']
  bad['clf_conv.weight'] = np.zeros((7, 16, 3, 3), np.float32)  # 7 classes, model has 3
  bad['aux_head.weight'] = np.zeros((3,), np.float32)
  with pytest.raises(CheckpointMismatchError) as e:
    import_state_dict(model, bad)
  msg = str(e.value)
  assert 'layer4.0.bn3.running_var' in msg and 'aux_head.weight' in msg
  assert 'clf_conv.weight: (7, 16, 3, 3)' in msg and 'nothing was loaded' in msg
  assert e.value.missing == ['layer4.0.bn3.running_var']
  assert e.value.unexpected == ['aux_head.weight']


def test_wrappers_and_module_prefix_are_unwrapped():
  model, v = _tiny('lw_refinenet_tiny')
  sd = export_state_dict(v)
  wrapped = {'segmenter': {'module.' + k: a for k, a in sd.items()}, 'epoch_start': 5}
  x = jax.random.normal(jax.random.key(1), (1, 37, 45, 3))
  # LW training checkpoints, best-of-acrv pretrained files and best-of-acrv snapshots
  for w in (wrapped, {'model': sd}, {'weights': sd, 'global_iteration': 10}):
    out = import_state_dict(model, w)
    np.testing.assert_array_equal(model.apply(out, x), model.apply(v, x))
  with pytest.raises(ValueError, match='holds no state dict'):
    unwrap_state_dict({'optimizer': 1})


def test_torchvision_encoder_only_import():
  model, v = _tiny()
  sd = {k: a for k, a in export_state_dict(v).items() if k.split('.')[0] in
        ('conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4')}
  sd['fc.weight'] = np.zeros((1000, 256), np.float32)  # the ImageNet classifier is discarded
  sd['fc.bias'] = np.zeros((1000,), np.float32)
  out = import_state_dict(model, sd, 'torchvision_resnet', rng=jax.random.key(7))
  np.testing.assert_array_equal(out['params']['encoder']['conv1']['kernel'],
                                v['params']['encoder']['conv1']['kernel'])
  fresh = model.init(jax.random.key(7), jnp.zeros((1, 64, 64, 3)))
  np.testing.assert_allclose(out['params']['classifier']['kernel'],  # decoder: fresh init
                             fresh['params']['classifier']['kernel'], rtol=1e-6)
  sd['clf_conv.weight'] = np.zeros((3, 16, 3, 3), np.float32)  # decoder keys are unexpected here
  with pytest.raises(CheckpointMismatchError, match='clf_conv.weight'):
    import_state_dict(model, sd, 'torchvision_resnet')


def test_two_scale_model_takes_imagenet_weights_in_both_encoders():
  model = rj.create_model('refinenet_2scale_r50', 3, **rj.models.refinenet.TINY_OVERRIDES)
  v = model.init(jax.random.key(0), jnp.zeros((1, 40, 40, 3)))
  enc = {k: a for k, a in export_state_dict({'params': {'encoder': v['params']['encoder0']},
                                             'batch_stats': {'encoder': v['batch_stats']['encoder0']}},
                                            'torchvision_resnet').items()}
  out = import_state_dict(model, enc, 'torchvision_resnet')
  for e in ('encoder0', 'encoder1'):
    np.testing.assert_array_equal(out['params'][e]['layer2_0']['conv2']['kernel'],
                                  v['params']['encoder0']['layer2_0']['conv2']['kernel'])


def test_model_without_a_source_layout_is_refused():
  model, v = _tiny()
  paper = rj.create_model('refinenet_cvpr_r101', 3, **rj.models.refinenet.TINY_OVERRIDES)
  pv = paper.init(jax.random.key(0), jnp.zeros((1, 40, 40, 3)))
  with pytest.raises(CheckpointMismatchError, match='head_rcu'):
    import_state_dict(paper, export_state_dict(v), init_variables=pv)


def test_normalization_mismatch_is_refused():
  model = rj.create_model('refinenet_tiny', 3, normalization='minus128')
  with pytest.raises(ValueError, match='expect .imagenet'):
    import_state_dict(model, {})


def test_convert_cli_writes_an_orbax_checkpoint(tmp_path, capsys):
  model, v = _tiny('lw_refinenet_tiny')
  save_torch_state_dict({'module.' + k: a for k, a in export_state_dict(v).items()},
                        tmp_path / 'w.pth')
  out = tmp_path / 'ckpt'
  assert convert_main(['--model=lw_refinenet_tiny', '--num_classes=3', '--layout=drsleep',
                       f'--checkpoint={tmp_path / "w.pth"}', f'--output={out}']) == 0
  assert "input normalisation 'imagenet'" in capsys.readouterr().out
  model2, v2 = load_converted(out, expect_model='lw_refinenet_tiny', expect_num_classes=3)
  x = jax.random.normal(jax.random.key(1), (1, 37, 45, 3))
  np.testing.assert_array_equal(model2.apply(v2, x), model.apply(v, x))
  with pytest.raises(ValueError, match='has 3 classes'):
    load_converted(out, expect_num_classes=21)
  # a checkpoint whose description no longer fits its arrays is refused with the leaves named
  meta = json.loads((out / 'refinenet_jax_model.json').read_text())
  meta['num_classes'] = 5
  (out / 'refinenet_jax_model.json').write_text(json.dumps(meta))
  with pytest.raises(CheckpointMismatchError, match='params/classifier/kernel'):
    load_converted(out)


def test_convert_cli_fails_on_partial_checkpoint(tmp_path):
  model, v = _tiny()
  sd = export_state_dict(v)
  sd.pop('clf_conv.bias')
  save_torch_state_dict(sd, tmp_path / 'w.pth')
  with pytest.raises(CheckpointMismatchError, match='clf_conv.bias'):
    convert_main(['--model=refinenet_tiny', '--num_classes=3', '--layout=drsleep',
                  f'--checkpoint={tmp_path / "w.pth"}', f'--output={tmp_path / "out"}'])
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('name,layout', [('fcn8s_tiny', 'wkentaro_fcn'),
                                         ('fcn_resnet_tiny', 'torchvision_fcn')])
def test_cli_converts_every_model_family(tmp_path, capsys, name, layout):
  """One CLI and one ``import_state_dict`` for every layout: the FCN families round-trip too."""
  from refinenet_jax.convert import LAYOUTS, fcn_torch, torchvision_seg
  assert {'drsleep', 'torchvision_resnet', 'wkentaro_fcn', 'wkentaro_vgg16',
          'torchvision_vgg16', 'torchvision_fcn'} <= set(LAYOUTS)
  model = rj.create_model(name, 3)
  x = jax.random.normal(jax.random.key(1), (1, 37, 45, 3))
  v = model.init(jax.random.key(0), x)
  v = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(2), a.shape), v)
  sd = (fcn_torch.export_state_dict(v, model, layout) if layout == 'wkentaro_fcn'
        else torchvision_seg.export_state_dict(v, layout))
  save_torch_state_dict(sd, tmp_path / 'w.pth')
  assert convert_main([f'--model={name}', '--num_classes=3', f'--layout={layout}',
                       f'--checkpoint={tmp_path / "w.pth"}', f'--output={tmp_path / "c"}']) == 0
  model2, v2 = load_converted(tmp_path / 'c', expect_model=name, expect_num_classes=3)
  np.testing.assert_allclose(model2.apply(v2, x), model.apply(v, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='unknown layout'):
    import_state_dict(model, sd, 'no_such_layout')
