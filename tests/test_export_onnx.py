"""ONNX export (the optional 'onnx' extra, its own venv): one artifact per model with symbolic
batch, height and width, run in ONNX Runtime against the library's serving function."""
import hashlib
import json
import sys

import jax
import numpy as np
import pytest

import refinenet_jax as rj
from refinenet_jax import export, export_onnx
from refinenet_jax.testing import random_variables

MODELS = ['refinenet_tiny', 'lw_refinenet_tiny', 'fcn8s_tiny', 'fcn_resnet_tiny', 'exfuse_tiny']
SIZES = [(1, 33, 47), (2, 41, 29), (3, 32, 32)]  # (batch, height, width), one artifact for all
NUM_CLASSES = 5


@pytest.fixture(scope='module')
def ort():
  pytest.importorskip('jax2onnx')
  return pytest.importorskip('onnxruntime')


def _variables(model, seed=0):
  v = random_variables(model, seed=seed)  # non-trivial BN statistics, no compiled init
  return {'params': v['params'], 'batch_stats': v.get('batch_stats', {})}


def _check(ort, fn, path, sizes, seed=0):
  session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  assert [i.name for i in session.get_inputs()] == ['images']
  assert session.get_inputs()[0].type == 'tensor(uint8)'
  assert session.get_inputs()[0].shape == ['b', 'h', 'w', 3]
  outputs = {o.name: o for o in session.get_outputs()}
  assert outputs['labels'].type == 'tensor(int32)'
  assert outputs['probs'].shape == ['b', 'h', 'w', NUM_CLASSES]
  rng = np.random.default_rng(seed)
  reference = jax.jit(fn)
  for b, h, w in sizes:
    images = rng.integers(0, 256, (b, h, w, 3), np.uint8)
    want = jax.tree.map(np.asarray, reference(images))
    labels, probs = session.run(['labels', 'probs'], {'images': images})
    assert labels.shape == (b, h, w) and labels.dtype == np.int32
    np.testing.assert_allclose(probs, want['probs'], rtol=1e-4, atol=1e-6,
                               err_msg=f'probs at {(b, h, w)}')
    # the argmax may flip only between classes that tie within the tolerance
    top2 = np.sort(want['probs'], axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 1e-4 * top2[..., 1]
    np.testing.assert_array_equal(labels[decided], want['labels'][decided],
                                  err_msg=f'labels at {(b, h, w)}')


@pytest.mark.parametrize('name', MODELS)
def test_onnx_runtime_matches_the_library_at_any_size(ort, tmp_path, name):
  model = rj.create_model(name, NUM_CLASSES)
  source = export.Source(model=model, variables=_variables(model), name=name,
                         class_names=tuple('abcde'), palette=np.zeros((5, 3), np.uint8),
                         ignore_label=255, origin='test')
  folder = export.write_artifact(source, str(tmp_path / 'art'), format='onnx')  # --format=onnx
  manifest = json.loads((tmp_path / 'art' / 'manifest.json').read_text())
  data = (tmp_path / 'art' / 'model.onnx').read_bytes()
  assert manifest['format'] == 'onnx' and manifest['file'] == 'model.onnx'
  assert manifest['sha256'] == hashlib.sha256(data).hexdigest()
  assert manifest['class_names'] == list('abcde') and manifest['model'] == name
  with pytest.raises(ValueError, match='onnxruntime'):
    export.load(folder)  # the jax loader does not pretend to run it
  fn = export.serving_function(model, source.variables)
  _check(ort, fn, tmp_path / 'art' / 'model.onnx', SIZES)


def test_scales_and_flip_export_too(ort, tmp_path):
  model = rj.create_model('lw_refinenet_tiny', NUM_CLASSES)
  fn = export.serving_function(model, _variables(model, 1), scales=(0.75, 1.0), flip=True)
  path = export_onnx.to_onnx(fn, NUM_CLASSES, tmp_path / 'lw.onnx')
  _check(ort, fn, path, [(1, 37, 45), (2, 30, 26)], seed=1)


def test_a_wrong_class_count_is_refused_before_conversion(ort, tmp_path):
  model = rj.create_model('fcn8s_tiny', NUM_CLASSES)
  fn = export.serving_function(model, _variables(model))
  with pytest.raises(ValueError, match=f'probs \\(b, h, w, {NUM_CLASSES + 1}\\)'):
    export_onnx.to_onnx(fn, NUM_CLASSES + 1, tmp_path / 'x.onnx')
  assert not (tmp_path / 'x.onnx').exists()


def test_without_the_extra_the_error_names_it(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)  # import jax2onnx -> ImportError
  with pytest.raises(ImportError, match="'onnx' extra"):
    export_onnx.to_onnx(lambda x: x, NUM_CLASSES, tmp_path / 'x.onnx')
