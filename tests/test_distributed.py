"""Data parallelism: 1 device vs 8, one process vs two (jax.distributed on loopback)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from configs.default import get_config
from refinenet_jax import optim, sharding, steps, train
from refinenet_jax.data import synthetic

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


def _run_workers(tmp_path, nproc, local):
  port = portpicker.pick_unused_port()
  out = tmp_path / f'p{nproc}.npz'
  env = {**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS': ''}
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests', 'distributed_worker.py'),
                             str(out), str(i), str(nproc), str(port), str(local)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(nproc)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=240)[0].decode())
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail('distributed worker timed out')
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return dict(np.load(out))


def test_two_processes_equal_one_process(tmp_path):
  two = _run_workers(tmp_path, nproc=2, local=2)  # 4 devices over 2 processes
  one = _run_workers(tmp_path, nproc=1, local=4)  # 4 devices in 1 process
  assert two.keys() == one.keys()
  for k in one:
    np.testing.assert_allclose(two[k], one[k], rtol=1e-6, atol=1e-7, err_msg=k)
