"""experiments/paired_steps.py: variants of the library's backend switches compiled side by side
and their steps alternated."""
import jax
import pytest

from experiments import benchmark, paired_steps
from refinenet_jax.models import layers


def test_parse_variant():
  assert paired_steps.parse_variant('library:') == ('library', {})
  assert paired_steps.parse_variant('xla:COMPARE_POOL_GRAD_BACKENDS=') == (
      'xla', {'COMPARE_POOL_GRAD_BACKENDS': ()})
  assert paired_steps.parse_variant(
      'both:COMPARE_POOL_GRAD_BACKENDS=cpu,gpu;SPLIT_GROUPED_CONV_BACKENDS=') == (
          'both', {'COMPARE_POOL_GRAD_BACKENDS': ('cpu', 'gpu'), 'SPLIT_GROUPED_CONV_BACKENDS': ()})
  with pytest.raises(ValueError, match='not a backend tuple'):
    paired_steps.parse_variant('x:RESIZE_MODE=cpu')  # no such switch
  with pytest.raises(ValueError, match='not a backend tuple'):
    paired_steps.parse_variant('x:RESIZE_MODES=cpu')  # a tuple, but of resize modes: still
  with pytest.raises(ValueError, match='expected NAME:ATTR'):
    paired_steps.parse_variant('COMPARE_POOL_GRAD_BACKENDS=')


def test_variants_compile_with_their_settings_and_alternate():
  s = benchmark.setup('refinenet_tiny', size=(32, 32), num_devices=1)
  args = benchmark.step_args(s, 'train', 1, (32, 32))
  variants = dict(map(paired_steps.parse_variant,
                      ['xla:COMPARE_POOL_GRAD_BACKENDS=', 'library:']))
  compiled = paired_steps.compile_variants(s, 'train', variants, args)
  assert layers.COMPARE_POOL_GRAD_BACKENDS == ('cpu',)  # restored
  windows = {n: c.as_text().count(' reduce-window(') for n, c in compiled.items()}
  assert windows['xla'] > windows['library']  # XLA's gradient adds its own reduce-windows
  times = paired_steps.alternate(compiled, args, 'train', rounds=3)
  assert {n: len(t) for n, t in times.items()} == {'xla': 3, 'library': 3}
  result = paired_steps.summary(times)
  assert result['xla']['saved_vs_xla_s'] == 0 and result['xla']['rounds_faster_than_xla'] == 0
  assert result['library']['median_step_s'] > 0
  assert int(jax.device_get(args[0].step)) == 2 + 6  # every step ran on the carried state
