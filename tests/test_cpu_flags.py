"""The XLA:CPU convolution flags: set only where they were measured, and they do what they claim."""
import json
import os
import platform
import subprocess
import sys

import jax

from refinenet_jax import hardware
from refinenet_jax.hardware import CPU_CONV_FLAG, CPU_INFERENCE_FLAG, cpu_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVX2 = frozenset({'sse4_2', 'avx2', 'fma'})
YNN_CONV = '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution'


def test_flag_is_added_only_where_it_was_measured():
  assert cpu_xla_flags('', '0.12.0.1', 'x86_64', AVX2) == CPU_CONV_FLAG
  assert cpu_xla_flags('--xla_force_host_platform_device_count=8', '0.12.3', 'AMD64',
                       AVX2 | {'avx512f'}) == (
                           f'--xla_force_host_platform_device_count=8 {CPU_CONV_FLAG}')
  assert cpu_xla_flags('', '0.12.0.1', 'x86_64', AVX2, inference_only=True) == (
      CPU_INFERENCE_FLAG)
  assert cpu_xla_flags('', '0.10.2', 'x86_64', AVX2) == CPU_CONV_FLAG
  assert cpu_xla_flags('', '0.10.2', 'x86_64', AVX2, inference_only=True) == CPU_INFERENCE_FLAG
  assert cpu_xla_flags(YNN_CONV, '0.12.0.1', 'x86_64', AVX2, inference_only=True) == YNN_CONV
  for unchanged in [
      ('', '0.10.2', 'x86_64', AVX2 | {'avx512f'}),  # mixed there (RefineNet-101 slower)
      ('', '0.11.0', 'x86_64', AVX2),  # a jax line not measured
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
import json, os, re, sys
from refinenet_jax import hardware
changed = (hardware.set_cpu_xla_flags(inference_only=sys.argv[1] == 'library_inference')
           if sys.argv[1].startswith('library') else False)
import jax, jax.numpy as jnp
def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
def features(x, w):  # FCN-8s's pattern: convolutions, ReLUs, a 2x2/2 max pool
  y = jax.nn.relu(conv(jax.nn.relu(conv(x, w)), w))
  return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
x, w = jnp.ones((1, 32, 32, 64)), jnp.ones((3, 3, 64, 64))
hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))).lower(
    x, w).compile().as_text()
forward = jax.jit(features).lower(x, w).compile().as_text()
bodies = dict(re.findall(r'(?ms)^%?([\w.-]+) [^\n]*\{\n(.*?)^\}', forward))
ynn = re.findall(r'calls=%?([\w.-]+)[^\n]*__ynn_fusion', forward)
print(json.dumps({'changed': changed, 'flags': os.environ.get('XLA_FLAGS', ''),
                  'ynn_fusions': hlo.count('__ynn_fusion'),
                  'pool_chain_convs_in_ynn': sum(bodies[c].count(' convolution(') for c in ynn)}))
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
  plain = _child('plain', '')
  default, chain = plain['ynn_fusions'], plain['pool_chain_convs_in_ynn']
  assert default >= 2 and _child('plain', YNN_CONV)['ynn_fusions'] == default
  conv_only = _child('plain', CPU_CONV_FLAG)
  assert conv_only['ynn_fusions'] == 0
  # ...but convolutions that end in a max pool stay in a YNNPACK "reduce" fusion, and only the
  # inference flag moves them too
  assert chain == conv_only['pool_chain_convs_in_ynn'] == 2
  assert _child('plain', CPU_INFERENCE_FLAG)['pool_chain_convs_in_ynn'] == 0
  # the entry points' call, on this machine: set exactly where cpu_xla_flags says so
  for mode, inference_only in (('library', False), ('library_inference', True)):
    expected = cpu_xla_flags('', jax.__version__, platform.machine(),
                             hardware._linux_cpu_flags(), inference_only)
    got = _child(mode, '')
    assert got['changed'] == bool(expected) and got['flags'] == expected
    assert got['ynn_fusions'] == (0 if expected else default)
    assert got['pool_chain_convs_in_ynn'] == (0 if expected and inference_only else chain)
    assert _child(mode, YNN_CONV) == {'changed': False, 'flags': YNN_CONV,
                                      'ynn_fusions': default, 'pool_chain_convs_in_ynn': chain}
