"""Pod dry run: the trainer's steps compiled for TPU topologies on this CPU host (libtpu), and
the pieces it reports with (collective counting, batch search, per-process shares)."""
from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from configs.tiny import get_config
from refinenet_jax import dryrun, hardware, sharding, xla_stats
from refinenet_jax.models import create_model

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU topology to compile for")


def _tiny(model='lw_refinenet_tiny'):
  c = get_config()
  c.model = model
  return c


@needs_libtpu
def test_tiny_train_and_eval_steps_compile_for_a_multi_host_slice():
  # v5e:4x4 is 16 chips on 4 hosts: one process compiles the whole program
  small = dryrun.run(_tiny(), 'v5e:4x4', batch_per_chip=1)
  big = dryrun.run(_tiny(), 'v5e:4x4', batch_per_chip=4, eval_batch_per_chip=0)
  assert (small['devices'], small['chips'], small['processes']) == (16, 16, 4)
  assert small['device_kind'] == 'TPU v5 lite' and small['platform'] == 'tpu'
  assert small['global_batch'] == 16 and big['global_batch'] == 64
  assert 'eval' in small and 'eval' not in big
  train_small, train_big = small['train'], big['train']
  # data parallel: gradients and BatchNorm statistics are all-reduced every step
  for rec in (train_small, train_big):
    assert rec['collectives']['all-reduce']['count'] > 0
    assert rec['collectives']['all-reduce']['bytes'] > 0
  # the eval step all-reduces its confusion matrix: 5 x 5 int32 at least
  assert small['eval']['collectives']['all-reduce']['bytes'] >= 5 * 5 * 4
  # more images per chip: more temporaries, the same replicated state, ~the same FLOPs/image
  assert train_big['memory']['temp_bytes'] > train_small['memory']['temp_bytes']
  assert train_big['memory']['total_bytes'] > train_small['memory']['total_bytes']
  assert train_big['flops'] > 2 * train_small['flops']
  assert train_big['fits'] and small['hbm_bytes_per_device'] == 16 * 10**9
  roof = train_small['roofline']
  assert roof['step_s'] == max(roof['compute_s'], roof['hbm_s']) > 0


@needs_libtpu
def test_tpu_program_keeps_native_grouped_convolutions():
  """The per-group split is XLA:CPU's workaround; a TPU program compiled here must not get it."""
  def grouped(hlo):
    return [int(g) for g in re.findall(r'feature_group_count = (\d+)', hlo) if int(g) > 1]

  c = _tiny('exfuse_tiny')
  c.model_overrides = ml_collections.ConfigDict()
  c.aux_weights = (0.1,) * len(create_model('exfuse_tiny', 5).aux_names)
  texts = {}
  for name in ('v5e:2x2', 'cpu'):
    jitted, args = dryrun.programs(c, dryrun.topology(name), 1)['train']
    texts[name] = jitted.lower(*args).as_text()
  n_groups = len(grouped(texts['v5e:2x2']))
  assert n_groups >= 4  # ResNeXt 3x3s: forward and gradients keep one grouped conv each
  assert grouped(texts['cpu']) == []  # split into per-group convolutions on CPU


def test_topology_names_are_checked():
  with pytest.raises(ValueError, match='expected KIND:AxB'):
    dryrun.topology('v5litepod-16')
  cpu = dryrun.topology('cpu')
  assert cpu.devices_per_chip == 1 and cpu.processes == 1


def test_cpu_dry_run_reports_the_steps_the_trainer_runs():
  r = dryrun.run(_tiny(), 'cpu', batch_per_chip=1)
  assert r['devices'] == jax.device_count() == 8 and r['global_batch'] == 8
  assert r['crop'] == [32, 32] and r['chip'] is None and r['train']['roofline'] == {}
  assert r['train']['memory']['total_bytes'] > 0 and r['train']['flops_per_image'] > 0
  # 8 devices of one process: the batch statistics and gradients are all-reduced
  assert r['train']['collectives']['all-reduce']['count'] > 0
  assert '| lw_refinenet_tiny | cpu | 8 (1) |' in dryrun.table([r])


def test_collectives_are_counted_once_per_async_pair_with_their_bytes():
  hlo = '''
  %ar = f32[64,3]{1,0} all-reduce(f32[64,3]{1,0} %p), replica_groups={}, to_apply=%add
  %ars = (f32[10]{0}, bf16[4,4]{1,0}) all-reduce-start(f32[10]{0} %a, bf16[4,4]{1,0} %b)
  %ard = (f32[10]{0}, bf16[4,4]{1,0}) all-reduce-done((f32[10]{0}, bf16[4,4]{1,0}) %ars)
  %ags = (f32[8]{0}, f32[32]{0}) all-gather-start(f32[8]{0} %x), dimensions={0}
  %agd = f32[32]{0} all-gather-done((f32[8]{0}, f32[32]{0}) %ags)
  %cp = u8[16]{0} collective-permute(u8[16]{0} %y), source_target_pairs={{0,1}}
  %add.1 = f32[64,3]{1,0} add(f32[64,3]{1,0} %ar, f32[64,3]{1,0} %ar)
  '''
  assert xla_stats.collectives(hlo) == {
      'all-reduce': {'count': 2, 'bytes': 64 * 3 * 4 + 10 * 4 + 16 * 2},
      'all-gather': {'count': 1, 'bytes': 32 * 4},
      'collective-permute': {'count': 1, 'bytes': 16}}


def test_largest_batch_search(monkeypatch):
  """Doubling then bisection against a fake compiler whose memory is linear in the batch."""
  compiled = []

  def fake_programs(config, topo, batch):
    return {'train': (batch, None)}

  def fake_compile(batch, args, label='', cache_dir=None):
    compiled.append(batch)
    if batch > 100:
      raise dryrun.OutOfMemory('RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm')
    return {'memory': {'total_bytes': 1000 + 37 * batch}}

  monkeypatch.setattr(dryrun, 'programs', fake_programs)
  monkeypatch.setattr(dryrun, 'compile_stats', fake_compile)
  topo = dryrun.Topology('fake', (), 1)
  found = dryrun.largest_batch(None, topo, hbm_per_device=1000 + 37 * 50, start=8)
  # 8 and 16 fit, their line predicts 50, and 51 confirms it: 4 compiles, not a bisection
  assert found['batch'] == 50 and not found['reached_limit']
  assert compiled == [8, 16, 50, 51] and found['memory'] == {'total_bytes': 1000 + 37 * 50}
  compiled.clear()
  found = dryrun.largest_batch(None, topo, hbm_per_device=1000 + 37 * 5, start=8)
  assert found['batch'] == 5 and compiled == [8, 4, 5, 6]
  found = dryrun.largest_batch(None, topo, hbm_per_device=10**9, start=8, limit=64)
  assert found['batch'] == 64 and found['reached_limit']  # compile errors only past 100
  found = dryrun.largest_batch(None, topo, hbm_per_device=10, start=8)
  assert found['batch'] == 0 and found['memory'] is None
  compiled.clear()  # out-of-memory compiles report no memory: bisection between 64 and 128
  found = dryrun.largest_batch(None, topo, hbm_per_device=10**9, start=64)
  assert found['batch'] == 100 and compiled[:2] == [64, 128] and len(compiled) <= 9

  def broken(batch, args, label='', cache_dir=None):
    raise RuntimeError('INVALID_ARGUMENT: something else')
  monkeypatch.setattr(dryrun, 'compile_stats', broken)
  with pytest.raises(RuntimeError, match='something else'):  # only OOM means "does not fit"
    dryrun.largest_batch(None, topo, hbm_per_device=10**9, start=8)


def _sum_over_devices(n):
  mesh = sharding.make_mesh(n)
  x = jax.ShapeDtypeStruct((n, 64), jnp.float32, sharding=sharding.batch_sharding(mesh))
  return jax.jit(lambda a: a.sum(0)), (x,)


def test_compile_results_are_reused_only_for_the_same_program(tmp_path, monkeypatch, capsys):
  cache = str(tmp_path / 'cache')
  first = dryrun.compile_stats(*_sum_over_devices(4), cache_dir=cache)
  again = dryrun.compile_stats(*_sum_over_devices(4), cache_dir=cache)
  assert not first['cached'] and again['cached'] and 'compiled before' in capsys.readouterr().out
  for key in ('memory', 'flops', 'compile_s', 'collectives'):
    assert again[key] == first[key]
  assert first['collectives']['all-reduce']['count'] >= 1  # counted again from the stored HLO
  assert not dryrun.compile_stats(*_sum_over_devices(8), cache_dir=cache)['cached']  # new mesh
  version = dryrun.importlib.metadata.version
  monkeypatch.setattr(dryrun.importlib.metadata, 'version',
                      lambda d: '0.0.0' if d == 'jaxlib' else version(d))
  assert not dryrun.compile_stats(*_sum_over_devices(4), cache_dir=cache)['cached']  # compiler


def test_out_of_memory_verdict_is_kept(tmp_path):
  """A compile that runs out of memory is an answer too; the next search does not repeat it."""
  calls = []

  class Lowered:
    def as_text(self):
      return 'module @too_big'

    def compile(self):
      calls.append(1)
      raise RuntimeError('RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20G')

  class Jitted:
    def lower(self, *args):
      return Lowered()

  args = _sum_over_devices(2)[1]
  for _ in range(2):
    with pytest.raises(dryrun.OutOfMemory, match='Used 20G'):
      dryrun.compile_stats(Jitted(), args, cache_dir=str(tmp_path))
  assert calls == [1]

  class Broken(Lowered):
    def compile(self):
      raise RuntimeError('INVALID_ARGUMENT: not a memory problem')
  Jitted.lower = lambda self, *a: Broken()
  with pytest.raises(RuntimeError, match='INVALID_ARGUMENT'):
    dryrun.compile_stats(Jitted(), args, cache_dir=str(tmp_path / 'b'))
  assert not list((tmp_path / 'b').rglob('*.json'))  # other errors are not remembered


def test_state_is_laid_out_by_the_config_sharding_rules():
  specs = {}
  for rules in ('replicated', 'fsdp'):
    c = _tiny()
    c.sharding_rules = rules
    _, (state, _) = dryrun.programs(c, dryrun.topology('cpu'), 1)['train']
    specs[rules] = [x.sharding.spec for x in jax.tree.leaves((state.params, state.opt_state))]
  assert all(spec == P() for spec in specs['replicated'])
  assert any(sharding.DATA_AXIS in spec for spec in specs['fsdp'])


def test_one_process_feeds_the_whole_batch():
  mesh = sharding.make_mesh(4)  # the first 4 of 8 devices, one process
  sharding.check_batch_size(8, mesh)
  assert sharding.process_rows(mesh, 8) == {0: 8}


@needs_libtpu
def test_processes_must_feed_equal_shares_of_a_multi_host_batch():
  topo = dryrun.topology('v4:2x2x2')  # 2 hosts
  assert topo.processes == 2
  whole = sharding.make_mesh(-1, topo.devices)
  rows = sharding.process_rows(whole, 8 * len(topo.devices))
  assert sorted(rows) == [0, 1] and len(set(rows.values())) == 1
  sharding.check_batch_size(8 * len(topo.devices), whole, all_devices=topo.devices)
  part = sharding.make_mesh(len(topo.devices) - 2, topo.devices)  # 2 devices fewer
  with pytest.raises(ValueError, match='unequal shares'):
    sharding.check_batch_size(part.size, part, all_devices=topo.devices)


def test_chip_table():
  assert hardware.chip_for('TPU v5 lite').name == 'TPU v5e'
  assert hardware.chip_for('TPU v5').name == 'TPU v5p'
  assert hardware.chip_for('TPU v6 lite').peak_flops['bfloat16'] == 918e12
  assert hardware.chip_for('NVIDIA H100 80GB HBM3').name == 'NVIDIA H100 SXM5'
  assert hardware.chip_for('cpu') is None


def test_eval_step_is_compiled_with_the_config_eval_settings():
  """The dry run's eval step is the trainer's: multi-scale and flip from the config cost more."""
  def eval_flops(scales, flip):
    c = _tiny()
    c.eval_scales, c.eval_flip = scales, flip
    jitted, args = dryrun.programs(c, dryrun.topology('cpu'), 1, 1)['eval']
    assert jax.eval_shape(jitted, *args).shape == (c.num_classes, c.num_classes)
    return xla_stats.cost(jitted.lower(*args).compile())['flops']

  single, multi = eval_flops((1.0,), False), eval_flops((0.5, 1.0), True)
  assert multi > 2 * single
