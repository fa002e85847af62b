"""Data parallelism: 1 device vs 8, one process vs two (jax.distributed on loopback)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import portpicker
import pytest

from configs.default import get_config
from refinenet_jax import optim, sharding, steps, train
from refinenet_jax.data import synthetic
from tests import distributed_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
  c = get_config()
  c.model_overrides.base_width = 8
  c.model_overrides.path_widths = (16, 8, 8, 8)
  c.num_steps, c.warmup_steps = 10, 2
  return c


def _train_three_steps(num_devices):
  c = _tiny_config()
  model = train.build_model(c)
  mesh = sharding.make_mesh(num_devices)
  init = functools.partial(train.create_train_state, model=model, tx=optim.make_optimizer(c),
                           input_shape=(1, 32, 32, 3))
  state_sh = sharding.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
  state = jax.jit(init, out_shardings=state_sh)(jax.random.key(0))
  step = jax.jit(functools.partial(steps.train_step, model=model),
                 in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)))
  images, labels = synthetic.make_synthetic_scenes(48, (32, 32), seed=1)
  losses = []
  for i in range(3):
    batch = sharding.put_batch({'image': images[16 * i:16 * (i + 1)],
                                'label': labels[16 * i:16 * (i + 1)]}, mesh)
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  return jax.device_get(state), losses


def test_one_device_and_eight_devices_train_the_same():
  assert jax.device_count() == 8
  s1, l1 = _train_three_steps(1)
  s8, l8 = _train_three_steps(8)
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  # BatchNorm statistics over the global batch, so these agree too (not per-device stats)
  for a, b in zip(jax.tree.leaves((s1.params, s1.batch_stats)),
                  jax.tree.leaves((s8.params, s8.batch_stats))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert not np.allclose(l1[0], l1[2])  # it trained


# Only catches a hung worker: a healthy pair took up to ~12 min with 2 cores oversubscribed 4x.
HANG_S = 1800


def _run_workers(tmp_path, nproc, local):
  port = portpicker.pick_unused_port()
  out = tmp_path / f'p{nproc}.npz'
  # no inherited device count (each worker sets its own); conftest's compilation cache, shared
  env = {k: v for k, v in os.environ.items() if k != 'JAX_NUM_CPU_DEVICES'}
  env.update(PYTHONPATH=ROOT, XLA_FLAGS='',
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='1.0')
  logs = [tmp_path / f'p{nproc}_{i}.log' for i in range(nproc)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, 'wb') as f:
      procs.append(subprocess.Popen(
          [sys.executable, os.path.join(ROOT, 'tests', 'distributed_worker.py'),
           str(out), str(i), str(nproc), str(port), str(local)],
          env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT))
  hung = threading.Event()

  def kill():
    hung.set()
    for q in procs:
      q.kill()

  timer = threading.Timer(HANG_S, kill)
  timer.daemon = True
  timer.start()
  try:
    for p in procs:
      p.wait()
  finally:
    timer.cancel()
    for q in procs:  # (when interrupted)
      if q.poll() is None:
        q.kill()
  texts = [log.read_text() for log in logs]
  if hung.is_set():
    pytest.fail(f'distributed workers hung: killed after {HANG_S} s\n' + '\n'.join(
        t[-2000:] for t in texts))
  for p, text in zip(procs, texts):
    assert p.returncode == 0, text[-3000:]
  with np.load(out) as saved:
    return dict(saved)


def test_two_processes_equal_one_process(tmp_path):
  two = _run_workers(tmp_path, nproc=2, local=2)  # 4 devices over 2 processes
  # the reference, 4 devices in 1 process: here, on 4 of conftest's 8
  one = distributed_worker.train_steps(sharding.make_mesh(4))
  assert two.keys() == one.keys()
  for k in one:
    np.testing.assert_allclose(two[k], one[k], rtol=1e-6, atol=1e-7, err_msg=k)
  assert not np.allclose(one['losses'][0], one['losses'][-1])  # it trained
