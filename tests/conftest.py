"""Test-wide JAX setup; runs before any test imports jax."""
import os

# 8 fake CPU devices for the sharding tests; must be set before the backend starts.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402

# Compile-time dominates these tests on 2 cores; a persistent cache makes re-runs cheap.
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('RJ_TEST_CACHE', os.path.expanduser('~/.cache/refinenet_jax_tests')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
