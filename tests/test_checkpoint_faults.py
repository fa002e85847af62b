"""Checkpoint faults never lose finished training: a failed background save (a full disk) stops
the run at the next step with one clear error, an unwritable checkpoint folder is refused before
anything is built, and a corrupt newest checkpoint is set aside for the newest one that restores."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import threading

import orbax.checkpoint as ocp
import pytest

from configs.tiny import get_config
from refinenet_jax import checkpoint, train
from refinenet_jax.convert.refinenet_torch import CheckpointMismatchError
from tests.test_train_resume import _steps


def _config(data_dir, num_steps, checkpoint_every=2):
  c = get_config()
  c.data_dir, c.tensorboard = str(data_dir), False
  c.num_steps, c.checkpoint_every = num_steps, checkpoint_every
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(data dir, a finished 4-step run's workdir holding checkpoints 2 and 4); copy before use."""
  root = tmp_path_factory.mktemp('trained')
  train.train_and_evaluate(_config(root / 'data', 4), str(root / 'w'))
  assert _steps(root / 'w') == [2, 4]
  return root / 'data', root / 'w'


def _copy(trained, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(trained[1], workdir)
  return workdir


def _count_train_steps(monkeypatch):
  """A list that grows by one per train step the loop runs."""
  ran, make = [], train.make_train_step

  def counting(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def run(*a, **k):
      ran.append(1)
      return step_fn(*a, **k)
    return run

  monkeypatch.setattr(train, 'make_train_step', counting)
  return ran


@pytest.mark.slow
def test_disk_full_in_a_background_save_stops_training_at_the_next_step(tmp_path, monkeypatch,
                                                                       capfd):
  # the state item's background commit of step 4 fails as a full disk does, in orbax's own
  # background thread, after save() has returned and training went on
  failed_in = []

  class DiskFull:
    def __init__(self, path):
      self.path = path

    def result(self, timeout=None):
      failed_in.append(threading.current_thread())
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)

  async_save = ocp.StandardCheckpointHandler.async_save

  async def failing_async_save(self, directory, *args, **kwargs):
    futures = await async_save(self, directory, *args, **kwargs)
    if os.path.basename(os.path.dirname(str(directory))).startswith('4.'):
      futures = [*(futures or []), DiskFull(str(directory))]
    return futures

  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'async_save', failing_async_save)
  # once save(4) has returned, let the write fail before the loop goes on, so the step that
  # notices is known (on a fast machine it may be later: the failure is asynchronous)
  save = checkpoint.Checkpoints.save

  def save_then_settle(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == 4:
      with contextlib.suppress(checkpoint.CheckpointSaveError):
        self.wait()

  monkeypatch.setattr(checkpoint.Checkpoints, 'save', save_then_settle)
  ran = _count_train_steps(monkeypatch)
  workdir = tmp_path / 'w'
  capfd.readouterr()
  with pytest.raises(checkpoint.CheckpointSaveError) as info:
    train.train_and_evaluate(_config(tmp_path / 'data', 12), str(workdir))
  message = str(info.value)
  assert isinstance(info.value, OSError)
  assert os.path.join(str(workdir), 'checkpoints', '4') in message
  assert 'No space left on device' in message
  assert 'the last good checkpoint is step 2' in message
  assert failed_in and threading.main_thread() not in failed_in  # in the background
  assert len(ran) == 4  # steps 1-4; step 5 never ran
  assert _steps(workdir) == [2]
  out = capfd.readouterr()
  assert 'Event loop is closed' not in out.out + out.err
  assert 'Traceback' not in out.err  # orbax's error lines, not its tracebacks


@pytest.mark.parametrize('blocker', ['read_only_folder', 'file_in_the_way'])
def test_unwritable_checkpoint_folder_fails_before_anything_is_built(tmp_path, monkeypatch,
                                                                     blocker):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  target = workdir / 'checkpoints'
  if blocker == 'read_only_folder':
    if os.geteuid() == 0:
      pytest.skip('root writes into a read-only folder; file_in_the_way covers root')
    target.mkdir(mode=0o500)
  else:  # a regular file where the folder should be: unwritable for root too
    target.write_text('')
  called = []

  def record(name):
    def fn(*args, **kwargs):
      called.append(name)
      raise AssertionError(f'{name} called before the checkpoint folder was checked')
    return fn

  monkeypatch.setattr(train, 'build_model', record('build_model'))
  monkeypatch.setattr(train, 'make_data', record('make_data'))
  try:
    with pytest.raises(checkpoint.CheckpointSaveError, match='not writable') as info:
      train.train_and_evaluate(_config(tmp_path / 'data', 4), str(workdir))
  finally:
    if target.is_dir():
      target.chmod(0o700)
  assert str(target) in str(info.value)
  assert called == []


def _array_files(folder):
  """The OCDBT data files, biggest first. Which file holds which array, and which hold only
  superseded b-tree nodes that a restore never reads, depends on write timing, so a test that
  cuts one file cannot know it cut live data; cutting them all can."""
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names
           if os.path.basename(d) == 'd' and 'ocdbt.process_' in d]
  assert files, f'no OCDBT data files under {folder}'
  return sorted(files, key=os.path.getsize, reverse=True)


def _corrupt(step_dir, how):
  """Damages a checkpoint as a crash, a full disk or a careless cleanup would; returns the
  path (relative to the step folder) of what is left to find in the folder set aside."""
  if how == 'truncated_array_file':
    paths = _array_files(step_dir / 'state')
    for path in paths:
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    return os.path.relpath(paths[0], step_dir)
  if how == 'deleted_METADATA':
    os.remove(step_dir / 'state' / '_METADATA')
    return 'state'
  shutil.rmtree(step_dir / 'state')
  return 'data'


@pytest.mark.slow
@pytest.mark.parametrize('how, reason', [
    ('truncated_array_file', r'step 4 in .* cannot be restored: \S'),
    ('deleted_METADATA', r'step 4 in .* cannot be restored: state/_METADATA'),
    ('deleted_state_folder', r'step 4 in .* cannot be restored: item folder state/ is missing'),
])
def test_corrupt_latest_checkpoint_resumes_from_the_older_one(trained, tmp_path, capsys, how,
                                                              reason):
  workdir = _copy(trained, tmp_path)
  left = _corrupt(workdir / 'checkpoints' / '4', how)
  capsys.readouterr()
  out = train.train_and_evaluate(_config(trained[0], 6), str(workdir))
  printed = capsys.readouterr().out
  assert out['step'] == 6
  assert re.search(reason, printed), printed
  assert 'resuming from step 2' in printed
  # set aside, not deleted, and no longer a step orbax lists (step 4 was saved anew)
  aside = [d for d in os.listdir(workdir / 'checkpoints') if d.startswith('4.corrupt-')]
  assert len(aside) == 1, os.listdir(workdir / 'checkpoints')
  assert os.path.exists(workdir / 'checkpoints' / aside[0] / left)
  assert aside[0] in printed
  assert _steps(workdir) == [4, 6]


@pytest.mark.slow
def test_no_restorable_checkpoint_is_a_clear_error_and_a_mismatch_is_never_skipped(
    trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  config = _config(trained[0], 6)
  # a checkpoint of another model is refused, not skipped as corrupt
  other = _config(trained[0], 6)
  other.model_overrides.path_widths = (16, 8, 8, 16)
  with pytest.raises(CheckpointMismatchError, match='params/path3_adapt/kernel'):
    run = train.setup(other, str(workdir), splits=('train',))
    try:
      train.initial_state(other, run, iter(run.train_ds))
    finally:
      run.ckpts.close()
  assert _steps(workdir) == [2, 4]
  # every checkpoint corrupt: each is named with its reason, and kept
  _corrupt(workdir / 'checkpoints' / '4', 'deleted_METADATA')
  _corrupt(workdir / 'checkpoints' / '2', 'deleted_state_folder')
  run = train.setup(config, str(workdir), splits=('train',))
  try:
    with pytest.raises(checkpoint.NoRestorableCheckpointError) as info:
      train.initial_state(config, run, iter(run.train_ds))
  finally:
    run.ckpts.close()
  message = str(info.value)
  assert 'step 4: state/_METADATA' in message
  assert 'step 2: item folder state/ is missing' in message
  assert str(workdir / 'checkpoints') in message
  names = os.listdir(workdir / 'checkpoints')
  assert sorted(n.split('.')[0] for n in names if '.corrupt-' in n) == ['2', '4']
  assert _steps(workdir) == []
