"""experiments/op_profile.py (a profiler trace joined to the HLO metadata) and
experiments/microbench_ops.py."""
import gzip
import json

import pytest

from experiments import op_profile

HLO = '''HloModule jit_train_step

%fused_computation.1 (param_0: f32[1,4,4,8]) -> f32[1,4,4,8] {
  %param_0 = f32[1,4,4,8]{3,2,1,0} parameter(0)
  ROOT %maximum.1 = f32[1,4,4,8]{3,2,1,0} maximum(%param_0, %param_0), metadata={op_name="jit(train_step)/jvp(Net)/encoder/max" stack_frame_id=1}
}

%fused_computation.2 (param_0.1: f32[1,4,4,2], param_1.1: f32[1,1,2,3]) -> f32[1,4,4,3] {
  %param_0.1 = f32[1,4,4,2]{3,2,1,0} parameter(0)
  %param_1.1 = f32[1,1,2,3]{3,2,1,0} parameter(1)
  ROOT %convolution.2 = f32[1,4,4,3]{3,2,1,0} convolution(%param_0.1, %param_1.1), window={size=1x1}, dim_labels=b01f_01io->b01f
}

ENTRY %main.9 (Arg_0.1: f32[1,4,4,2], w.1: f32[3,3,2,8]) -> f32[1,4,4,8] {
  %Arg_0.1 = f32[1,4,4,2]{3,2,1,0} parameter(0), metadata={op_name="state.params['x']"}
  %w.1 = f32[3,3,2,8]{3,2,1,0} parameter(1), metadata={op_name="state.params['w']"}
  %conv.1 = f32[1,4,4,8]{3,2,1,0} convolution(%Arg_0.1, %w.1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(train_step)/jvp(Net)/block1/conv_general_dilated" stack_frame_id=2}
  %fusion.1 = f32[1,4,4,8]{3,2,1,0} fusion(%conv.1), kind=kLoop, calls=%fused_computation.1
  %fusion.2 = f32[1,4,4,3]{3,2,1,0} fusion(%Arg_0.1, %w.1), kind=kOutput, calls=%fused_computation.2, metadata={op_name="jit(train_step)/jvp(Net)/encoder/conv_general_dilated"}
  %grad.1 = f32[1,4,4,8]{3,2,1,0} select(%fusion.1, %conv.1, %conv.1), metadata={op_name="jit(train_step)/transpose(jvp(Net))/block1/select_n"}
  %copy.1 = f32[2,4,4,1]{3,2,1,0} copy(%Arg_0.1)
  %convolution.7 = f32[2,3,3,8]{3,2,1,0} convolution(%copy.1, %grad.1), window={size=4x4 pad=1_1x1_1}, dim_labels=b01f_i01o->b01f
  ROOT %add.1 = f32[1,4,4,8]{3,2,1,0} add(%grad.1, %grad.1), metadata={op_name="jit(train_step)/add"}
}
'''
# 3x3 conv 2 -> 8 channels on 4x4: 2 x 128 outputs x 18 = 4608 FLOPs, its weight gradient the
# same; the fused 1x1 conv 2 -> 3: 2 x 48 x 2 = 192
CONV_FLOPS = {'conv.1': 4608.0, 'convolution.7': 4608.0, 'fusion.2': 192.0}

# per step and device (us)
DURATIONS = {'conv.1': 10.0, 'fusion.1': 4.0, 'fusion.2': 3.0, 'grad.1': 2.0, 'copy.1': 1.0,
             'convolution.7': 8.0, 'add.1': 5.0}


def _write_trace(tmp_path, steps=2, devices=2):
  events = [{'ph': 'M', 'pid': 1, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
            {'ph': 'X', 'pid': 1, 'name': 'PjitFunction', 'dur': 1e6, 'args': {}}]
  for d in range(devices):
    for _ in range(steps):
      for op, us in DURATIONS.items():
        events.append({'ph': 'X', 'pid': 1, 'name': op, 'dur': us,
                       'args': {'hlo_op': op, 'hlo_module': 'jit_train_step',
                                'device_ordinal': str(d)}})
  events.append({'ph': 'X', 'pid': 1, 'name': 'x', 'dur': 99.0,  # another program: not counted
                 'args': {'hlo_op': 'conv.1', 'hlo_module': 'other_module'}})
  run = tmp_path / 'plugins' / 'profile' / 'run1'
  run.mkdir(parents=True)
  with gzip.open(run / 'host.trace.json.gz', 'wt') as f:
    json.dump({'traceEvents': events}, f)


def test_instructions_take_fusion_roots_and_backward_operands():
  ins = op_profile.hlo_instructions(HLO)
  assert ins['conv.1'] == ('convolution', 'jit(train_step)/jvp(Net)/block1/conv_general_dilated',
                           False, 4608.0)
  # a fusion without metadata: its root's opcode and op_name
  assert ins['fusion.1'] == ('maximum', 'jit(train_step)/jvp(Net)/encoder/max', False, 0.0)
  # a fusion with metadata keeps it, and counts the convolution inside it
  assert ins['fusion.2'] == ('convolution',
                             'jit(train_step)/jvp(Net)/encoder/conv_general_dilated', False, 192.0)
  # XLA-made: the backward operand wins over the unattributed one
  assert ins['convolution.7'] == ('convolution',
                                  'jit(train_step)/transpose(jvp(Net))/block1/select_n', True,
                                  4608.0)
  # parameter names are not op names: a copy of a parameter stays unattributed
  assert ins['copy.1'] == ('copy', '', False, 0.0)


def test_conv_flops_of_compiled_grouped_convolution_and_its_gradients():
  # XLA:CPU rewrites a grouped convolution's weight gradient as a convolution over a dilated
  # input; its count must still be the forward's (forward, input and weight gradients each do
  # one multiply-add per output element and kernel tap).
  import jax
  import jax.numpy as jnp
  from jax import lax
  x, w = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 4, 32))
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                               feature_group_count=8)
  dense = 2.0 * (2 * 16 * 16 * 32) * (3 * 3 * 4)
  for f in (conv, lambda x, w: jax.vjp(lambda w: conv(x, w), w)[1](x)[0],
            lambda x, w: jax.vjp(lambda x: conv(x, w), x)[1](x)[0]):
    ins = op_profile.hlo_instructions(jax.jit(f).lower(x, w).compile().as_text())
    # the convolution (and a fusion wrapping it, which carries the same count)
    assert max(v[3] for v in ins.values()) == pytest.approx(dense)


def test_split_phases():
  assert op_profile._split('jit(f)/transpose(jvp(Net))/block1/crp/conv', 2) == (
      'backward', 'block1/crp', 'conv')
  assert op_profile._split('jit(f)/jvp(Net)/encoder/layer1_0/add', 1) == (
      'forward', 'encoder', 'add')
  assert op_profile._split('jit(forward)/Net/classifier/dot_general', 1) == (
      'forward', 'classifier', 'dot_general')
  assert op_profile._split('jit(f)/optax/mul', 1) == ('other', 'optax', 'mul')


def test_breakdown_per_step_and_device(tmp_path):
  _write_trace(tmp_path)
  b = op_profile.breakdown(HLO, str(tmp_path), steps=2)
  assert (b['steps'], b['devices']) == (2, 2)
  assert b['total_us'] == pytest.approx(sum(DURATIONS.values()))
  assert b['phase'] == pytest.approx({'forward': 17.0, 'backward': 10.0, 'other': 5.0,
                                      'unattributed': 1.0})
  assert b['component'] == pytest.approx({'block1': 20.0, 'encoder': 7.0, '-': 6.0})
  assert b['phase_primitive']['backward: convolution (XLA-made)'] == pytest.approx(8.0)
  assert b['hlo'] == pytest.approx({'convolution': 21.0, 'maximum': 4.0, 'select': 2.0,
                                    'copy': 1.0, 'add': 5.0})
  for key in ('phase', 'component', 'primitive', 'hlo', 'phase_primitive'):
    assert sum(b[key].values()) == pytest.approx(b['total_us'])
  assert b['conv_flops_by_phase'] == pytest.approx({'forward': 4800.0, 'backward': 4608.0})
  assert b['conv_flops_by_component'] == pytest.approx({'block1': 9216.0, 'encoder': 192.0})
  rows = op_profile.table(b, 'component', top=1).splitlines()
  assert rows[0] == '| component | ms/step | time share | conv GFLOP | FLOP share | GFLOP/s |'
  assert rows[2].startswith('| block1 | 0.0 | 60.6% | 0.0 | 98.0% |')
  assert rows[3].startswith('| (other 2) | 0.0 | 39.4% | 0.0 | 2.0% |')
  assert op_profile.table(b, 'hlo').splitlines()[0] == '| hlo | ms/step | time share |'


def test_coverage_warns_when_the_trace_misses_part_of_the_step():
  b = {'total_us': 900_000.0}
  assert op_profile.coverage(b, 1.0) == (
      'summed instruction time 900 ms per step against 1000 ms wall (90%)')
  assert 'WARNING' not in op_profile.coverage(b, 0.6)  # two instructions at once: above 100%
  line = op_profile.coverage(b, 2.0)
  assert line.startswith('summed instruction time 900 ms per step against 2000 ms wall (45%)')
  assert 'WARNING' in line and 'asynchronously' in line


def test_breakdown_needs_a_trace(tmp_path):
  with pytest.raises(FileNotFoundError, match='trace.json.gz'):
    op_profile.breakdown(HLO, str(tmp_path))


def test_microbench_ops_small():
  from experiments import microbench_ops
  out = microbench_ops.run(size=16, channels=4, iters=1)
  assert all(v > 0 for k, v in out.items() if k.endswith(' ms'))
  # the library's separable pool picks the same tied maximum as the 2-D window
  for name in ('W then H, XLA gradient', 'W then H, shifted-compare gradient'):
    assert out[f'max pool, {name}: largest gradient difference at ties'] < 1e-5
  assert out['conv 3x3: 9-matmul weight gradient, relative difference'] < 1e-5
  assert out['conv 3x3, 4 groups, one conv per group: weight gradient ms'] > 0
  assert microbench_ops.layers.SPLIT_GROUPED_CONV_BACKENDS == ('cpu',)  # restored
  # NCHW/OIHW computes the same weight gradient (transposed back to HWIO)
  assert out['conv 3x3, NCHW/OIHW vs NHWC/HWIO: weight gradient relative difference'] < 1e-5
  assert out['conv 3x3, NCHW/OIHW: weight gradient ms'] > 0


def test_valid_conv_as_matmul_over_patches_matches_the_convolution():
  from experiments import microbench_ops
  out = microbench_ops.conv_vs_matmul((1, 9, 10, 3), (7, 7, 3, 5), iters=1)
  assert out['kernel'] == (7, 7, 3, 5)
  for what in ('output', 'input gradient', 'weight gradient'):
    assert out[f'matmul vs convolution: {what}, relative difference'] < 1e-5
  assert out['matmul over patches: forward + gradients ms'] > 0


def test_fc6_shapes_are_pool5_and_the_7x7_kernel():
  from experiments import microbench_ops
  # 512 + 2 x 100 padding, five ceil-mode 2x2 pools: 712 -> 356 -> 178 -> 89 -> 45 -> 23
  assert microbench_ops.fc6_shapes(512) == ((1, 23, 23, 512), (7, 7, 512, 4096))


def test_conv_times_by_shape_cover_every_convolution_once_per_use():
  import jax
  import jax.numpy as jnp

  from experiments import microbench_ops
  from refinenet_jax.models import create_model
  rows = microbench_ops.conv_times_by_shape('fcn32s_tiny', 32, iters=1)
  variables = jax.eval_shape(lambda: create_model('fcn32s_tiny', 21).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  kernels = [leaf for leaf in jax.tree_util.tree_leaves(variables) if leaf.ndim == 4]
  assert sum(r['count'] for r in rows) == len(kernels) == 16  # VGG16's 13, fc6, fc7, score
  assert len(rows) == 11  # distinct (input, kernel, stride, padding, dilation) shapes
  assert {r['kernel'] for r in rows} == {k.shape for k in kernels}
  assert rows[0]['output'] == (1, 230, 230, 4)  # conv1_1's 100-pixel padding
  for r in rows:
    assert all(r[k] > 0 for k in ('forward ms', 'input gradient ms', 'weight gradient ms',
                                  'tap-wise weight gradient ms'))
  totals = microbench_ops.totals(rows)
  assert totals['forward ms'] == pytest.approx(sum(r['forward ms'] * r['count'] for r in rows))
