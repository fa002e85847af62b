"""Fault tolerance: SIGKILL + resume is bit-identical, SIGTERM saves and exits, NaN stops cleanly,
and bad workdirs/checkpoints are refused before anything is trained or loaded."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.tiny import get_config
from refinenet_jax import checkpoint, train
from refinenet_jax.convert.refinenet_torch import CheckpointMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Only catches a hung run: a healthy one took up to ~7 min with 2 cores oversubscribed 4x.
# Nothing here waits on the clock: the tests wait for events (a marker file, a log line, an exit).
HANG_S = 1800


def _main(workdir, data_dir, *overrides, launcher=('-m', 'refinenet_jax.main'), env=None,
          stdout=subprocess.PIPE):
  cmd = [sys.executable, *launcher, f'--workdir={workdir}',
         f'--config={os.path.join(ROOT, "configs", "tiny.py")}', f'--config.data_dir={data_dir}',
         '--config.tensorboard=False', *overrides]
  # (conftest's persistent compilation cache comes with os.environ: the runs share programs)
  env = {**os.environ, 'PYTHONPATH': ROOT, **(env or {})}
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def _hang_guard(proc, what):
  """Kills ``proc`` if it is still running after HANG_S seconds, and then fails the test."""
  fired = threading.Event()

  def kill():
    fired.set()
    proc.kill()

  timer = threading.Timer(HANG_S, kill)
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()
    if fired.is_set():
      pytest.fail(f'{what} hung: killed after {HANG_S} s')


def _finish(proc, what='run'):
  with _hang_guard(proc, what):
    out = proc.communicate()[0].decode()
  return proc.returncode, out


def _saved_state(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  with ocp.StandardCheckpointer() as ckptr:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
                          ckptr.metadata(path).item_metadata, is_leaf=lambda m: hasattr(m, 'shape'))
    return ckptr.restore(path, target)


def _steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _assert_trees_equal(a, b):
  import jax
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
  data = tmp_path / 'data'
  steps = ['--config.num_steps=12', '--config.checkpoint_every=3', '--config.log_every=1']
  # the reference: uninterrupted, alongside the run to be killed (a log file: nobody reads a pipe;
  # its own copy of the deterministic dataset: two builders never write one folder at once)
  with open(tmp_path / 'a.log', 'wb') as f:
    ref = _main(tmp_path / 'a', tmp_path / 'data_a', *steps, stdout=f)
  # killed without warning once a few checkpoints exist (possibly mid-save: the launcher holds
  # the run right after the save of a step >= 6 returns, while orbax may still be writing it),
  # then resumed
  marker, log = tmp_path / 'held', tmp_path / 'b.log'
  with open(log, 'wb') as f:  # a file, not a pipe nobody reads while the run is held
    p = _main(tmp_path / 'b', data, *steps, stdout=f,
              launcher=(os.path.join(ROOT, 'tests', 'hold_after_save.py'),),
              env={'RJ_HOLD_MARKER': str(marker), 'RJ_HOLD_STEP': '6'})
  with _hang_guard(p, 'the run to be killed'):
    while not marker.exists():
      if p.poll() is not None:
        pytest.fail(f'run ended (rc {p.returncode}) before it could be killed:\n'
                    f'{log.read_text()[-3000:]}')
      try:
        p.wait(timeout=0.2)
      except subprocess.TimeoutExpired:
        pass
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert p.returncode == -signal.SIGKILL
  assert int(marker.read_text()) >= 6
  killed_at = max(_steps(tmp_path / 'b'))
  assert killed_at < 12
  rc, out = _finish(_main(tmp_path / 'b', data, *steps), 'the resumed run')
  assert rc == 0, out[-3000:]
  assert 'resuming from step' in out
  with _hang_guard(ref, 'the uninterrupted run'):
    ref.wait()
  assert ref.returncode == 0, (tmp_path / 'a.log').read_text()[-3000:]
  _assert_trees_equal(_saved_state(tmp_path / 'a', 12), _saved_state(tmp_path / 'b', 12))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  p = _main(tmp_path / 'w', tmp_path / 'data', '--config.num_steps=100000',
            '--config.checkpoint_every=0', '--config.log_every=1', '--config.warmup_steps=0')
  with _hang_guard(p, 'the run to be stopped'):
    line, seen = b'', []
    while b'step 3/' not in line:
      line = p.stdout.readline()
      seen.append(line)
      assert line or p.poll() is None, 'run ended early:\n' + b''.join(seen)[-3000:].decode(errors='replace')
    p.send_signal(signal.SIGTERM)
  rc, out = _finish(p, 'the stopped run')
  assert rc == 0, out[-3000:]
  assert 'SIGTERM: saved step' in out
  # a quiet console: no Python library's log line (absl's 'I1203 12:00:00.000000 123 file.py:45]'
  # format; libtpu's native start-up lines on a CPU host are not Python's), no config dump;
  # the config is in the workdir instead
  out = b''.join(seen).decode() + out
  assert not re.search(r'^[IWE]\d{4} [\d:.]+ +\d+ \S+\.py:\d+\]', out, re.M), out[:3000]
  assert 'learning_rate' not in out and 'config: ' in out, out[:3000]
  assert json.loads((tmp_path / 'w' / 'config.json').read_text())['num_steps'] == 100000
  saved = _steps(tmp_path / 'w')
  assert len(saved) == 1 and 3 <= saved[0] < 100000


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  c = get_config()
  c.data_dir, c.tensorboard = str(tmp_path / 'data'), False
  c.num_steps, c.checkpoint_every = 4, 2
  train.train_and_evaluate(c, str(tmp_path / 'w'))
  good = _saved_state(tmp_path / 'w', 4)
  c.num_steps = 12  # continue from step 4 with a learning rate that destroys the weights
  c.learning_rate = 1e30  # (a NaN learning rate is refused when the config is read)
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


def test_unwritable_workdir_fails_before_training(tmp_path, monkeypatch):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  c = get_config()
  c.data_dir = str(tmp_path / 'data')
  called = []  # refused up front: no model built, no data prepared, nothing compiled

  def record(name):
    def fn(*args, **kwargs):
      called.append(name)
      raise AssertionError(f'{name} called before the workdir was checked')
    return fn

  monkeypatch.setattr(train, 'build_model', record('build_model'))
  monkeypatch.setattr(train, 'make_data', record('make_data'))
  monkeypatch.setattr(train.datasets, 'prepare', record('datasets.prepare'))
  monkeypatch.setattr(train.checkpoint, 'Checkpoints', record('Checkpoints'))
  with pytest.raises(OSError, match='workdir .* is not writable'):
    train.train_and_evaluate(c, str(blocker / 'run'))
  assert called == []
  assert not (tmp_path / 'data').exists()
