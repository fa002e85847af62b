"""experiments/benchmark.py: records for both modes and both parallel styles on the 8 fake
devices, the per-device (shard_map) step against the trainer's global step, the output tables
and the PyTorch reference registry.

The PyTorch side by side runs only where torch is: ``RJ_TORCH_PYTHON`` (an interpreter with
torch + torchvision; else this one if it has torch) and, for the reference-checkout path,
``RJ_LIGHT_WEIGHT_REFINENET`` (a checkout of DrSleep/light-weight-refinenet).
"""
import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

from experiments import benchmark, torch_reference
from refinenet_jax import xla_stats

MODEL = 'lw_refinenet_tiny'
KW = dict(num_classes=3, size=(32, 32), model_overrides={'tap_dropout': 0.0},
          config_overrides={'warmup_steps': 0})  # no warm-up: the first step already moves
BATCH = 8
PEAK = 1e11


@pytest.fixture(scope='module', autouse=True)
def quick_compiles():
  # what is tested is the tool's plumbing, not XLA's speed: compile with few optimisations
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


@pytest.fixture(scope='module')
def records():
  return {(mode, par): benchmark.run(MODEL, batch=BATCH, mode=mode, parallel=par, iters=2,
                                     repeats=2, warmup=1, peak_flops=PEAK, **KW)
          for mode in benchmark.MODES for par in benchmark.PARALLEL}


def test_records_are_complete_json(records):
  assert len(records) == 4
  for (mode, par), r in records.items():
    assert json.loads(json.dumps(r)) == r
    assert (r['model'], r['mode'], r['parallel'], r['batch']) == (MODEL, mode, par, BATCH)
    assert r['num_devices'] == jax.device_count() == 8
    assert r['compile_s'] > 0 and r['lower_s'] > 0
    ips, step = r['images_per_s'], r['step_s']
    assert 0 < ips['min'] <= ips['median'] <= ips['max']
    assert ips['median'] == pytest.approx(BATCH / step['median'])
    assert r['flops_per_step'] > 0 and r['flops_per_image'] == r['flops_per_step'] / BATCH
    assert r['achieved_flops_per_s'] == pytest.approx(r['flops_per_step'] / step['median'])
    # CPU has no table entry: the peak is the override, summed over the devices
    assert r['peak_source'] == '--peak_flops' and r['peak_flops_per_s'] == PEAK * 8
    assert r['mfu'] == pytest.approx(r['achieved_flops_per_s'] / (PEAK * 8))
    mem = r['memory_per_device']
    assert mem['total_bytes'] > 0 and mem['peak_bytes_in_use'] is None  # CPU: no stats
    assert r['params'] > 0 and r['aux_heads'] == 0
    assert r['xla_flags'] == os.environ.get('XLA_FLAGS', '')  # what the process ran with


def test_flops_count_the_global_step(records):
  inf, trn = records['inference', 'jit'], records['train', 'jit']
  # forward + backward of the same batch: between 2x and 5x the forward alone
  assert 2 < trn['flops_per_step'] / inf['flops_per_step'] < 5
  # both styles compute the same global batch, so the per-device programs' sums agree
  for mode in benchmark.MODES:
    a, b = records[mode, 'jit']['flops_per_step'], records[mode, 'shard_map']['flops_per_step']
    assert b == pytest.approx(a, rel=0.1)


def test_per_device_step_equals_global_step_on_identical_shards():
  # Every device holds the same example, so per-device BatchNorm statistics and mean gradients
  # are the global ones: the steps must agree. A gradient left summed over the 8 devices (the
  # shard_map trap) would make the update 8x larger.
  s = benchmark.setup(MODEL, **KW)
  one = benchmark.make_inputs(1, KW['size'], KW['num_classes'], seed=1)
  batch = benchmark.sharding.put_batch({k: np.repeat(v, BATCH, 0) for k, v in one.items()},
                                       s.mesh)
  init = jax.device_get(s.init(jax.random.key(0)).params)
  results = {}
  for par in benchmark.PARALLEL:
    fn, state = benchmark.make_step(s, 'train', par), s.init(jax.random.key(0))
    for _ in range(2):
      state, metrics = fn(state, batch)
    results[par] = jax.device_get((state, metrics))
  (a, ma), (b, mb) = results['jit'], results['shard_map']
  delta = lambda st: np.concatenate([(p - q).ravel() for p, q in zip(
      jax.tree.leaves(st.params), jax.tree.leaves(init))])
  da, db = delta(a), delta(b)
  assert np.linalg.norm(da) > 1e-4
  assert np.linalg.norm(db - da) < 1e-3 * np.linalg.norm(da)
  np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=1e-5)
  np.testing.assert_allclose(ma['grad_norm'], mb['grad_norm'], rtol=1e-4)
  for x, y in zip(jax.tree.leaves(a.batch_stats), jax.tree.leaves(b.batch_stats)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  assert int(a.step) == int(b.step) == 2


def test_cost_analysis_forms():
  class Fake:
    def __init__(self, analysis):
      self.analysis = analysis

    def cost_analysis(self):
      return self.analysis
  flops = lambda a: xla_stats.cost(Fake(a))['flops']
  assert flops({'flops': 6.0}) == 6.0
  assert flops([{'flops': 2.0}, {'flops': 3.0}]) == 5.0  # older jax
  assert flops({}) is None
  assert flops([None]) is None
  assert xla_stats.cost(Fake({'flops': 1.0, 'bytes accessed': 8.0}))['bytes_accessed'] == 8.0


def test_peak_table_lookup():
  peak = benchmark.peak_flops_per_device
  assert peak('NVIDIA H100 80GB HBM3', 'bfloat16') == (989e12, 'NVIDIA H100 SXM5')
  assert peak('NVIDIA H100 PCIe', 'bfloat16')[0] == 756.5e12
  assert peak('NVIDIA H200', 'float32')[0] == 494.5e12
  assert peak('TPU v5 lite', 'bfloat16')[0] == 197e12  # v5e, not v5p
  assert peak('TPU v5p', 'bfloat16')[0] == 459e12
  assert peak('TPU v4', 'float32')[0] == 275e12
  assert peak('cpu', 'float32') == (None, None)


def test_tables(records):
  rs = list(records.values())
  md = benchmark.table(rs, markdown=True).splitlines()
  assert len(md) == 2 + len(rs)
  assert all(line.count('|') == len(benchmark.COLUMNS) + 1 for line in md)
  assert md[2].startswith(f'| {MODEL} | inference | float32 | jit | 8 | 8 | 32x32 |')
  assert '%' in md[2] and md[2].endswith('| n/a | n/a |')  # MFU given; no torch
  assert len(benchmark.table(rs).splitlines()) == 1 + len(rs)


def test_profile_breakdown_of_the_train_step(tmp_path):
  r = benchmark.run(MODEL, batch=BATCH, mode='train', iters=1, repeats=1, warmup=1,
                    profile_dir=str(tmp_path), **KW)
  b = r['profile']
  assert json.loads(json.dumps(b)) == b
  assert b['devices'] == 8 and b['steps'] == 1 and b['total_us'] > 0
  assert b['phase']['forward'] > 0 and b['phase']['backward'] > 0
  # the time lands on the model's own modules: the backbone and the decoder blocks
  assert b['component']['encoder'] > 0
  assert any(c.startswith('block') and t > 0 for c, t in b['component'].items())
  assert b['hlo']['convolution'] > 0
  for key in ('phase', 'component', 'hlo'):
    assert sum(b[key].values()) == pytest.approx(b['total_us'])


def test_cli_rejects_unknown_names(capsys):
  with pytest.raises(SystemExit):
    benchmark.main(['--models=refinenet_tiny,no_such_model'])
  err = capsys.readouterr().err
  assert "unknown model(s) ['no_such_model']" in err and 'refinenet_tiny' in err
  with pytest.raises(SystemExit):
    benchmark.main(['--modes=inference,backward'])
  assert "unknown ['backward']" in capsys.readouterr().err
  # a missing reference checkout is reported before any model is compiled
  with pytest.raises(SystemExit):
    benchmark.main(['--models=lw_refinenet_r50', '--torch_python=/nonexistent/python'])
  assert '--light_weight_refinenet=<checkout of DrSleep' in capsys.readouterr().err
  with pytest.raises(KeyError, match='unknown config key'):
    benchmark.make_config(MODEL, 3, 'float32', config_overrides={'lerning_rate': 0.1})


def test_torch_registry_without_torch():
  assert torch_reference.resolve('refinenet_r101') == ('refinenet_pytorch', 'rf101')
  assert torch_reference.resolve('lw_refinenet_r50') == ('light_weight_refinenet', 'rf_lw50')
  assert torch_reference.resolve('fcn8s') == ('pytorch_fcn', 'FCN8s')
  assert torch_reference.resolve('fcn_resnet50') == (None, 'fcn_resnet50')
  with pytest.raises(KeyError, match="no PyTorch reference registered for 'refinenet_tiny'.*"
                                     'refinenet_r101'):
    torch_reference.resolve('refinenet_tiny')
  for name in ('exfuse_resnext101', 'gcn_resnet152'):
    with pytest.raises(torch_reference.NoReference, match='has no official code'):
      torch_reference.resolve(name)
  # a reference that needs a checkout names the flag before importing anything
  with pytest.raises(FileNotFoundError, match='--refinenet_pytorch=<checkout of DrSleep'):
    torch_reference.build('refinenet_r101', {}, 21)
  # the parent rejects the name before starting a child interpreter
  with pytest.raises(KeyError):
    benchmark.run_torch('refinenet_tiny', torch_python='/nonexistent/python', repos={},
                        inputs={}, modes=['inference'], dtypes=['float32'])


def test_drsleep_loader_imports_from_the_checkout_without_sys_path(tmp_path, monkeypatch):
  # a stand-in checkout with the DrSleep layout: models/resnet.py imports the sibling utils/
  for name, tag in (('a', 'first'), ('b', 'second')):
    (tmp_path / name / 'models').mkdir(parents=True)
    (tmp_path / name / 'utils').mkdir()
    (tmp_path / name / 'utils' / 'helpers.py').write_text(f'TAG = {tag!r}\n')
    (tmp_path / name / 'models' / 'resnet.py').write_text(
        'from utils.helpers import TAG\n\n\ndef rf101():\n  return TAG\n')
  for mod in [m for m in sys.modules if m.split('.')[0] in ('models', 'utils')]:
    monkeypatch.delitem(sys.modules, mod)  # restored afterwards, as are the stand-ins below
  path = list(sys.path)
  try:
    assert torch_reference._drsleep(str(tmp_path / 'a'), 'rf101')() == 'first'
    # a second checkout replaces the first one's modules
    assert torch_reference._drsleep(str(tmp_path / 'b'), 'rf101')() == 'second'
    assert sys.path == path
  finally:
    for mod in [m for m in sys.modules if m.split('.')[0] in ('models', 'utils')]:
      del sys.modules[mod]


def test_torchfcn_loader_loads_only_the_model_module(tmp_path, monkeypatch):
  # wkentaro's layout: models/__init__ also imports vgg.py, which needs torchvision; the
  # loader must not run it, and fcn8s.py defines both FCN8s and FCN8sAtOnce
  for name, tag in (('a', 'first'), ('b', 'second')):
    models = tmp_path / name / 'torchfcn' / 'models'
    models.mkdir(parents=True)
    (models / '__init__.py').write_text('raise ImportError("torchvision")\n')
    (models / 'fcn32s.py').write_text('import fcn\n\n\ndef get_upsampling_weight():\n'
                                      f'  return {tag!r}\n')
    (models / 'fcn8s.py').write_text(
        'from .fcn32s import get_upsampling_weight\n\n\nclass FCN8s:\n  TAG = '
        'get_upsampling_weight()\n\n\nclass FCN8sAtOnce(FCN8s):\n  pass\n')
  for mod in [m for m in sys.modules if m.split('.')[0] in ('torchfcn_models', 'fcn')]:
    monkeypatch.delitem(sys.modules, mod)
  try:
    assert torch_reference._torchfcn(str(tmp_path / 'a'), 'FCN8sAtOnce').TAG == 'first'
    assert torch_reference._torchfcn(str(tmp_path / 'a'), 'FCN8s').__name__ == 'FCN8s'
    # a second checkout replaces the first one's modules
    assert torch_reference._torchfcn(str(tmp_path / 'b'), 'FCN8s').TAG == 'second'
  finally:
    for mod in [m for m in sys.modules if m.split('.')[0] in ('torchfcn_models', 'fcn')]:
      del sys.modules[mod]


def test_attach_torch_ratio():
  base = {'model': 'm', 'mode': 'train', 'dtype': 'float32', 'batch': 2, 'size': [8, 8]}
  jax_rec = dict(base, images_per_s={'median': 2.0})
  other = dict(base, mode='inference', images_per_s={'median': 9.0})
  benchmark.attach_torch([jax_rec, other], [dict(base, images_per_s={'median': 5.0})])
  assert jax_rec['time_ratio_jax_over_torch'] == 2.5  # JAX takes 2.5x as long per image
  assert 'torch' in jax_rec and 'torch' not in other


def _torch_python():
  if os.environ.get('RJ_TORCH_PYTHON'):
    return os.environ['RJ_TORCH_PYTHON']
  return sys.executable if importlib.util.find_spec('torch') else None


needs_torch = pytest.mark.skipif(_torch_python() is None, reason='no torch (RJ_TORCH_PYTHON)')


@needs_torch
def test_torch_child_torchvision_model():
  inputs = benchmark.make_inputs(2, (32, 32), 3)
  recs = benchmark.run_torch('fcn_resnet50', torch_python=_torch_python(), repos={},
                             inputs=inputs, modes=['inference', 'train'],
                             dtypes=['float32', 'bfloat16'], num_classes=3, iters=1, repeats=2,
                             warmup=0, threads=1)
  assert [(r['mode'], r['dtype']) for r in recs] == [
      ('inference', 'float32'), ('train', 'float32'), ('inference', 'bfloat16'),
      ('train', 'bfloat16')]
  for r in recs:
    assert r['framework'] == 'torch' and r['images_per_s']['median'] > 0
    assert r['threads'] == 1 and r['size'] == [32, 32] and r['batch'] == 2
  assert recs[1]['aux_heads'] == 1  # torchvision's FCN, built with its auxiliary classifier


@needs_torch
@pytest.mark.skipif(not os.path.isdir(os.environ.get('RJ_LIGHT_WEIGHT_REFINENET', '')),
                    reason='no light-weight-refinenet checkout (RJ_LIGHT_WEIGHT_REFINENET)')
def test_side_by_side_cli(tmp_path):
  out = tmp_path / 'bench.jsonl'
  recs = benchmark.main([
      '--models=lw_refinenet_r50', '--size=64', '--batch=1', '--modes=inference',
      '--num_devices=1', '--iters=1', '--repeats=1', '--warmup=0', '--num_classes=3',
      f'--torch_python={_torch_python()}', f'--out={out}',
      f'--light_weight_refinenet={os.environ["RJ_LIGHT_WEIGHT_REFINENET"]}'])
  (r,) = recs
  assert r['torch']['reference'].startswith('DrSleep/light-weight-refinenet@')
  assert r['torch']['params'] == r['params']  # the same architecture on both sides
  assert r['time_ratio_jax_over_torch'] == pytest.approx(
      r['torch']['images_per_s']['median'] / r['images_per_s']['median'])
  assert json.loads(out.read_text().splitlines()[0]) == r


@needs_torch
def test_torch_child_times_the_same_convolutions():
  import jax.numpy as jnp
  from jax import lax

  from experiments import microbench_ops
  keys = [((1, 9, 10, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
          ((1, 9, 10, 4), (3, 3, 2, 6), (1, 1), ((2, 2), (2, 2)), (2, 2), 2),
          ((1, 9, 10, 4), (2, 2, 4, 3), (1, 1), ((0, 1), (0, 1)), (1, 1), 1)]  # asymmetric
  rows = []
  for xs, ws, strides, padding, dilation, groups in keys:
    out = lax.conv_general_dilated(
        jnp.zeros(xs), jnp.zeros(ws), strides, padding, rhs_dilation=dilation,
        feature_group_count=groups, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    rows.append({'key': (xs, ws, strides, padding, dilation, groups), 'output': out.shape})
  microbench_ops.attach_torch_conv_times(rows, _torch_python(), iters=1)  # raises on a shape
  for r in rows:
    assert all(r[f'torch {k}'] > 0 for k in ('forward ms', 'input gradient ms',
                                              'weight gradient ms'))
  wrong = [dict(rows[0], output=(1, 9, 10, 6))]  # as if stride 2 had been dropped
  with pytest.raises(RuntimeError, match='another convolution'):
    microbench_ops.attach_torch_conv_times(wrong, _torch_python(), iters=1)
