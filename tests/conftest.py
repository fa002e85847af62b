"""Test-wide JAX setup; runs before any test imports jax."""
import os

import jax

# 8 fake CPU devices for the sharding tests; must be set before the backend starts.
NUM_DEVICES = int(os.environ.get('JAX_NUM_CPU_DEVICES', 8))
try:
  jax.config.update('jax_num_cpu_devices', NUM_DEVICES)
except AttributeError:  # a jax without the option: the XLA flag, read when the backend starts
  os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={NUM_DEVICES}')
else:
  # inherited by subprocesses (the notebook's kernel, training runs): jax reads it on import.
  # A subprocess that needs another count sets jax_num_cpu_devices itself.
  os.environ['JAX_NUM_CPU_DEVICES'] = str(NUM_DEVICES)

# Compile-time dominates these tests on 2 cores; a persistent cache makes re-runs cheap.
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('RJ_TEST_CACHE', os.path.expanduser('~/.cache/refinenet_jax_tests')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
