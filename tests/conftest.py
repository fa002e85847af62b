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

# Compile-time dominates these tests on 2 cores; a persistent cache makes re-runs cheap. Every
# program is kept, however quick to compile: a training run compiles hundreds of small ones
# (orbax's per-shard copies at the first save alone take ~10 s), and reading them back is faster.
# In the environment too, so that subprocesses (training runs, workers, the notebook) share it.
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ.get(
    'RJ_TEST_CACHE', os.path.expanduser('~/.cache/refinenet_jax_tests'))
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
# XLA's optimisations stay on (jax_disable_most_optimizations): measured, it made neither a tiny
# training run nor tests/test_models.py faster here; the notebook's kernel turns them off.
