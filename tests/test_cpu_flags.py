"""The XLA:CPU convolution flag: set only where it was measured, and it does what it claims."""
import json
import os
import platform
import subprocess
import sys

import jax

from refinenet_jax import hardware
from refinenet_jax.hardware import CPU_CONV_FLAG, cpu_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVX2 = frozenset({'sse4_2', 'avx2', 'fma'})
YNN_CONV = '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution'


def test_flag_is_added_only_where_it_was_measured():
  assert cpu_xla_flags('', '0.12.0.1', 'x86_64', AVX2) == CPU_CONV_FLAG
  assert cpu_xla_flags('--xla_force_host_platform_device_count=8', '0.12.3', 'AMD64',
                       AVX2 | {'avx512f'}) == (
                           f'--xla_force_host_platform_device_count=8 {CPU_CONV_FLAG}')
  for unchanged in [
      ('', '0.10.2', 'x86_64', AVX2),  # measured mixed on 0.10.2 (RefineNet-101 slower)
      ('', '0.13.0', 'x86_64', AVX2),  # a jax that may not know the flag
      ('', '0.12.0.1', 'aarch64', AVX2),
      ('', '0.12.0.1', 'x86_64', AVX2 | {'amx_tile'}),  # AMX: not measured
      ('', '0.12.0.1', 'x86_64', None),  # CPU features unknown
      (YNN_CONV, '0.12.0.1', 'x86_64', AVX2),  # the user's own choice
  ]:
    assert cpu_xla_flags(*unchanged) == unchanged[0], unchanged


def test_nothing_changes_once_jax_has_started():
  jax.devices()  # XLA has read XLA_FLAGS: a changed variable would misreport what runs
  env = {'XLA_FLAGS': ''}
  assert hardware.set_cpu_xla_flags(env) is False and env == {'XLA_FLAGS': ''}


_CHILD = r'''
import json, os, sys
from refinenet_jax import hardware
changed = hardware.set_cpu_xla_flags() if sys.argv[1] == 'library' else False
import jax, jax.numpy as jnp
def loss(x, w):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jnp.sum(y ** 2)
x, w = jnp.ones((1, 32, 32, 64)), jnp.ones((3, 3, 64, 64))
hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
print(json.dumps({'changed': changed, 'flags': os.environ.get('XLA_FLAGS', ''),
                  'ynn_fusions': hlo.count('__ynn_fusion')}))
'''


def _child(mode, xla_flags):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}  # compile
  env.update(PYTHONPATH=ROOT, XLA_FLAGS=xla_flags)
  p = subprocess.run([sys.executable, '-c', _CHILD, mode], cwd=ROOT, env=env, capture_output=True,
                     text=True, check=True)
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_the_flag_moves_convolutions_off_ynnpack_and_the_library_sets_it_where_measured():
  # XLA's default (and YNN_CONV, the explicit form of it) puts the forward convolution and its
  # gradients in YNNPACK fusions; CPU_CONV_FLAG leaves none, on either supported jax line
  default = _child('plain', '')['ynn_fusions']
  assert default >= 2 and _child('plain', YNN_CONV)['ynn_fusions'] == default
  assert _child('plain', CPU_CONV_FLAG)['ynn_fusions'] == 0
  # the entry points' call, on this machine: set exactly where cpu_xla_flags says so
  expected = cpu_xla_flags('', jax.__version__, platform.machine(), hardware._linux_cpu_flags())
  got = _child('library', '')
  assert got['changed'] == bool(expected) and got['flags'] == expected
  assert got['ynn_fusions'] == (0 if expected else default)
  assert _child('library', YNN_CONV) == {'changed': False, 'flags': YNN_CONV,
                                         'ynn_fusions': default}
