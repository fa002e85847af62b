"""jax.export artifacts: symbolic shapes, a round trip in a fresh process with jax only, inputs
refused, files never half-written."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import refinenet_jax as rj
from refinenet_jax import export, inference, serving, steps
from refinenet_jax.convert import orbax_io
from refinenet_jax.testing import random_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 5
# (batch, height, width): odd sizes and batches, all from one artifact
SHAPES = [(1, 33, 47), (2, 21, 64)]
# model, test-time scales, flip, probs dtype; the TTA and bfloat16 forms on the cheaper models
CASES = [('refinenet_tiny', (1.0,), False, 'float32'),
         ('lw_refinenet_tiny', (0.75, 1.0), True, 'float32'),
         ('fcn8s_tiny', (1.0,), False, 'float32'),
         ('fcn_resnet_tiny', (1.0,), True, 'bfloat16'),
         ('exfuse_tiny', (1.0,), False, 'float32')]


def _readme_loader() -> str:
  """The README's loader lines (Deploy section), reading the folder given on the command line."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  start = text.index('```python\nimport hashlib, json, jax\n') + len('```python\n')
  snippet = text[start:text.index('```', start)]
  assert "folder = 'exported/refinenet'\n" in snippet
  return snippet.replace("folder = 'exported/refinenet'", 'folder = sys.argv[1]')


# The README's loader, run where neither this library nor flax can be imported.
CHILD = """
import sys
sys.modules['refinenet_jax'] = sys.modules['flax'] = None  # importing either now fails
import numpy as np
""" + _readme_loader() + """
x = np.load(sys.argv[2])
out = {}
for k in x.files:
  r = predict(x[k])
  out[k + '/labels'], out[k + '/probs'] = np.asarray(r['labels']), np.asarray(r['probs'], np.float32)
np.savez(sys.argv[3], **out)
"""


def _source(name):
  model = rj.create_model(name, NUM_CLASSES)
  v = random_variables(model)
  v = {'params': v['params'], 'batch_stats': v.get('batch_stats', {})}
  return export.Source(model=model, variables=v, name=name,
                       class_names=tuple(f'c{i}' for i in range(NUM_CLASSES)),
                       palette=np.arange(3 * NUM_CLASSES, dtype=np.uint8).reshape(-1, 3) * 10,
                       ignore_label=255, origin='test')


def _library(source, x, scales, flip):
  """The library's own evaluation path (steps.logits_fn + inference.predict_probs)."""
  fn = jax.jit(lambda x: inference.predict_probs(steps.logits_fn(source.variables, source.model), x,
                                                 scales=scales, flip=flip))
  return np.asarray(fn(x.astype(np.float32)))


@pytest.mark.parametrize('name,scales,flip,probs_dtype', CASES, ids=[c[0] for c in CASES])
def test_round_trip_in_a_fresh_process_with_jax_only(tmp_path, name, scales, flip, probs_dtype):
  source = _source(name)
  folder = export.write_artifact(source, str(tmp_path / 'art'), scales=scales, flip=flip,
                                 probs_dtype=probs_dtype)
  manifest = json.loads((tmp_path / 'art' / 'manifest.json').read_text())
  data = (tmp_path / 'art' / export.FILE).read_bytes()
  assert manifest['sha256'] == hashlib.sha256(data).hexdigest()
  assert manifest['platforms'] == ['cpu', 'cuda', 'tpu']
  assert manifest['palette'] == source.palette.tolist() and manifest['num_classes'] == 5
  assert manifest['normalization'] == source.model.normalization
  assert (manifest['scales'], manifest['flip']) == (list(scales), flip)
  assert manifest['outputs']['probs']['dtype'] == probs_dtype
  exported = jax.export.deserialize(bytearray(data))
  assert exported.platforms == ('cpu', 'cuda', 'tpu')
  assert [str(a) for a in exported.in_avals] == ['uint8[b,h,w,3]']  # weights are inside

  rng = np.random.default_rng(0)
  inputs = {f'{b}x{h}x{w}': rng.integers(0, 256, (b, h, w, 3), np.uint8) for b, h, w in SHAPES}
  np.savez(tmp_path / 'in.npz', **inputs)
  proc = subprocess.run([sys.executable, '-c', CHILD, folder, str(tmp_path / 'in.npz'),
                         str(tmp_path / 'out.npz')], cwd=tmp_path,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / 'out.npz')
  for key, x in inputs.items():
    want = _library(source, x, scales, flip)
    probs, labels = got[key + '/probs'], got[key + '/labels']
    assert probs.shape == want.shape and labels.shape == x.shape[:3]
    if probs_dtype == 'float32':
      np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-7, err_msg=key)
    else:  # bfloat16 keeps 8 bits of mantissa
      np.testing.assert_allclose(probs, want, rtol=1e-2, atol=1e-3, err_msg=key)
    # labels are the argmax of the float32 probabilities (before any bfloat16 rounding)
    top2 = np.sort(want, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-5  # a near-tie may go either way
    np.testing.assert_array_equal(labels[clear], want.argmax(-1)[clear], err_msg=key)
    assert clear.mean() > 0.95


def test_wrong_inputs_damaged_files_and_existing_outputs_are_refused(tmp_path):
  source = _source('fcn8s_tiny')
  folder = export.write_artifact(source, str(tmp_path / 'art'), platforms=('cpu',))
  predict = export.load(folder)
  with pytest.raises(TypeError, match='uint8'):
    predict(np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r'\(N, H, W, 3\).*\(1, 8, 8, 4\)'):
    predict(np.zeros((1, 8, 8, 4), np.uint8))
  with pytest.raises(ValueError, match='shape'):
    predict(np.zeros((8, 8, 3), np.uint8))
  # the program itself checks too, for callers of the raw jax.export object
  raw = jax.export.deserialize(bytearray((tmp_path / 'art' / export.FILE).read_bytes()))
  with pytest.raises(Exception, match='uint8'):
    raw.call(np.zeros((1, 8, 8, 3), np.float32))
  # an existing folder is never replaced unasked; asked, it is replaced whole
  before = (tmp_path / 'art' / export.FILE).read_bytes()
  with pytest.raises(FileExistsError, match='already exists'):
    export.write_artifact(source, folder, platforms=('cpu',))
  assert (tmp_path / 'art' / export.FILE).read_bytes() == before
  export.write_artifact(source, folder, platforms=('cpu',), flip=True, overwrite=True)
  assert serving.read_manifest(folder)['flip'] is True
  assert sorted(os.listdir(tmp_path)) == ['art']  # no temporary folder left behind
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep')
  with pytest.raises(FileExistsError, match='not an exported model'):
    export.write_artifact(source, str(tmp_path / 'mine'), platforms=('cpu',), overwrite=True)
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep'
  # a damaged program is refused by its hash, naming the file
  path = tmp_path / 'art' / export.FILE
  path.write_bytes(path.read_bytes()[:-10] + b'0' * 10)
  with pytest.raises(ValueError, match=f'{export.FILE}.*sha256'):
    export.load(folder)
  with pytest.raises(FileNotFoundError, match='no manifest.json'):
    export.load(str(tmp_path))


def test_cli_exports_converted_weights(tmp_path, capsys):
  source = _source('gcn_tiny')
  orbax_io.save_converted(str(tmp_path / 'conv'), source.variables, model_name='gcn_tiny',
                          num_classes=NUM_CLASSES)
  rc = export.main(['--init_checkpoint', str(tmp_path / 'conv'), '--output',
                    str(tmp_path / 'art'), '--platforms=cpu', '--scales=1,0.5'])
  assert rc == 0
  assert 'exported gcn_tiny' in capsys.readouterr().out
  manifest = serving.read_manifest(str(tmp_path / 'art'))
  assert manifest['class_names'] == [f'class_{i}' for i in range(NUM_CLASSES)]  # none stored
  assert len(manifest['palette']) == NUM_CLASSES and manifest['scales'] == [1.0, 0.5]
  out = export.load(str(tmp_path / 'art'))(np.full((1, 19, 23, 3), 128, np.uint8))
  want = _library(source, np.full((1, 19, 23, 3), 128, np.uint8), (1.0, 0.5), False)
  np.testing.assert_allclose(out['probs'], want, rtol=1e-5, atol=1e-7)
  # refused, with one line naming the problem, not a traceback
  assert export.main(['--init_checkpoint', str(tmp_path / 'conv'), '--output',
                      str(tmp_path / 'art'), '--platforms=cpu']) == 1
  assert 'already exists' in capsys.readouterr().err
  assert export.main(['--init_checkpoint', str(tmp_path / 'nothing'), '--output',
                      str(tmp_path / 'art2')]) == 1
  assert 'not a converted checkpoint' in capsys.readouterr().err
  if importlib.util.find_spec('jax2onnx') is None:  # the main venv: onnx is an extra
    assert export.main(['--init_checkpoint', str(tmp_path / 'conv'), '--output',
                        str(tmp_path / 'art3'), '--format=onnx']) == 1
    assert "'onnx' extra" in capsys.readouterr().err
    assert not (tmp_path / 'art3').exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith('.export-')] == []
