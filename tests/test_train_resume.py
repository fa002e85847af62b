"""Fault tolerance: SIGKILL + resume is bit-identical, SIGTERM saves and exits, NaN stops cleanly,
and bad workdirs/checkpoints are refused before anything is trained or loaded."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.tiny import get_config
from refinenet_jax import checkpoint, train
from refinenet_jax.convert.refinenet_torch import CheckpointMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, data_dir, *overrides):
  cmd = [sys.executable, '-m', 'refinenet_jax.main', f'--workdir={workdir}',
         f'--config={os.path.join(ROOT, "configs", "tiny.py")}', f'--config.data_dir={data_dir}',
         '--config.tensorboard=False', *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc, timeout=300):
  out = proc.communicate(timeout=timeout)[0].decode()
  return proc.returncode, out


def _saved_state(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(path)


def _steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _assert_trees_equal(a, b):
  import jax
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_sigkill_then_resume_is_bit_identical(tmp_path):
  data = tmp_path / 'data'
  steps = ['--config.num_steps=24', '--config.checkpoint_every=2', '--config.log_every=1']
  # the reference: uninterrupted
  rc, out = _finish(_main(tmp_path / 'a', data, *steps))
  assert rc == 0, out[-3000:]
  # killed without warning once a few checkpoints exist (possibly mid-save), then resumed
  p = _main(tmp_path / 'b', data, *steps)
  deadline = time.time() + 240
  while not any(s >= 6 for s in _steps(tmp_path / 'b')):
    assert p.poll() is None and time.time() < deadline, 'run ended before it could be killed'
    time.sleep(0.2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = max(_steps(tmp_path / 'b'))
  assert killed_at < 24
  rc, out = _finish(_main(tmp_path / 'b', data, *steps))
  assert rc == 0, out[-3000:]
  assert 'resuming from step' in out
  _assert_trees_equal(_saved_state(tmp_path / 'a', 24), _saved_state(tmp_path / 'b', 24))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  p = _main(tmp_path / 'w', tmp_path / 'data', '--config.num_steps=100000',
            '--config.checkpoint_every=0', '--config.log_every=1', '--config.warmup_steps=0')
  deadline = time.time() + 240
  line = b''
  while b'step 3/' not in line:
    line = p.stdout.readline()
    assert line or p.poll() is None, 'run ended early'
    assert time.time() < deadline
  p.send_signal(signal.SIGTERM)
  rc, out = _finish(p)
  assert rc == 0, out[-3000:]
  assert 'SIGTERM: saved step' in out
  saved = _steps(tmp_path / 'w')
  assert len(saved) == 1 and 3 <= saved[0] < 100000


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  c = get_config()
  c.data_dir, c.tensorboard = str(tmp_path / 'data'), False
  c.num_steps, c.checkpoint_every = 4, 2
  train.train_and_evaluate(c, str(tmp_path / 'w'))
  good = _saved_state(tmp_path / 'w', 4)
  c.num_steps = 12  # continue from step 4 with a learning rate that destroys the weights
  c.learning_rate = float('nan')
  with pytest.raises(FloatingPointError, match=r'the last good checkpoint is step 4'):
    train.train_and_evaluate(c, str(tmp_path / 'w'))
  assert _steps(tmp_path / 'w') == [4] or max(_steps(tmp_path / 'w')) == 4
  _assert_trees_equal(_saved_state(tmp_path / 'w', 4), good)
  # a checkpoint from a model with another class count is refused, listing what differs
  c = get_config()
  c.data_dir, c.tensorboard = str(tmp_path / 'data'), False
  c.num_classes = 5
  c.model_overrides.path_widths = (16, 8, 8, 16)
  with pytest.raises(CheckpointMismatchError, match='params/path3_adapt/kernel'):
    train.evaluate(c, str(tmp_path / 'w'))
  # and one written for another class count, before any array is read
  ckpts = checkpoint.Checkpoints(str(tmp_path / 'w' / 'checkpoints'),
                                 meta={'model': 'refinenet_tiny', 'num_classes': 3})
  with pytest.raises(CheckpointMismatchError, match='num_classes: 5 vs 3'):
    ckpts.restore(None)
  ckpts.close()


def test_unwritable_workdir_fails_before_training(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  c = get_config()
  c.data_dir = str(tmp_path / 'data')
  t = time.time()
  with pytest.raises(PermissionError, match='not writable'):
    train.train_and_evaluate(c, str(blocker / 'run'))
  assert time.time() - t < 5  # refused up front, not after building data or compiling
