"""orbax CheckpointManager wrapper: train state + data-iterator state + a JSON description.

A checkpoint holds everything a resumed run needs to continue bit-identically: the TrainState
(params, BatchNorm statistics, optimizer state, step, RNG), every process's grain iterator state,
and the config/model it was written by. Saves are asynchronous; the latest ``keep`` and the best
by val mIoU are preserved. Restores go onto an abstract target that carries the shardings of the
current mesh, so a checkpoint written on 8 devices restores onto 1.

Finished training is never lost to a checkpoint fault: a background save that fails (a full disk)
stops training at the next step with one message naming the cause and the last good step, and a
resume skips a corrupt newest checkpoint (moving it aside, never deleting it) for the newest one
that restores.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from typing import Callable, Sequence

import grain
import jax
import orbax.checkpoint as ocp

from refinenet_jax.tree_check import CheckpointMismatchError, check_tree


SCORES_FILE = 'scores.json'


def read_scores(directory: str) -> dict[int, float]:
  """step -> val mIoU as recorded by :meth:`Checkpoints.record_score` ({} when none)."""
  path = os.path.join(directory, SCORES_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {int(step): float(score) for step, score in json.load(f).items()}


def best_scored(scores: dict[int, float], steps: Sequence[int]) -> int | None:
  """The step among ``steps`` with the highest finite score (the later one on ties)."""
  scored = [s for s in steps if s in scores and math.isfinite(scores[s])]
  return max(scored, key=lambda s: (scores[s], s)) if scored else None


@dataclasses.dataclass
class KeepBestScored(ocp.checkpoint_managers.PreservationPolicy):
  """Preserves the best-scored step (scores are recorded after the save, so orbax's BestN,
  which reads metrics given at save time, cannot see them)."""
  scores: Callable[[], dict[int, float]]

  def should_preserve(self, checkpoints, *, context) -> Sequence[bool]:
    best = best_scored(self.scores(), [c.step for c in checkpoints])
    return [c.step == best for c in checkpoints]


class CheckpointSaveError(OSError):
  """A checkpoint could not be written; training stopped, earlier checkpoints are intact."""


class NoRestorableCheckpointError(RuntimeError):
  """Every checkpoint in the directory failed to restore (each was moved aside)."""


def check_writable(directory: str, what: str = 'checkpoint directory') -> None:
  """Fails now, not minutes into training with an orbax timeout, if ``directory`` is unwritable."""
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix='.write_probe'):
      pass
  except OSError as e:
    why = ('a file is in the way' if os.path.exists(directory) and not os.path.isdir(directory)
           else _reason(e))
    raise CheckpointSaveError(
        f'{what} {directory} is not writable ({why}); fix its permissions or '
        'free space, or use another workdir') from None


class _Corrupt(Exception):
  """A checkpoint's files are incomplete (found before orbax reads them)."""


def _reason(e: BaseException) -> str:
  """The root cause in a line: an OS error as its message ('No space left on device'), else
  the innermost exception's first line (tensorstore buries the cause under array specs)."""
  chain = [e]
  while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
    nxt = chain[-1].__cause__ or chain[-1].__context__
    if nxt in chain:
      break
    chain.append(nxt)
  for x in chain:
    if isinstance(x, OSError) and x.errno in errno.errorcode:
      return f'{os.strerror(x.errno)} [{errno.errorcode[x.errno]}]'
  text = ' '.join(str(x) for x in chain)
  code = re.search(r"os_error_code='?(\d+)", text)  # tensorstore: "... [os_error_code='28']"
  if code and int(code.group(1)) in errno.errorcode:
    return f'{os.strerror(int(code.group(1)))} [{errno.errorcode[int(code.group(1))]}]'
  if isinstance(chain[-1], _Corrupt):
    return str(chain[-1])
  if isinstance(chain[-1], KeyError) and chain[-1].args:
    return str(chain[-1].args[0])[:300]
  line = (str(chain[-1]).strip().splitlines() or [''])[0]
  return f'{type(chain[-1]).__name__}: {line[:300]}'


class _ShortOrbaxErrors(logging.Filter):
  """orbax logs each failed background write with a full traceback, from several threads; the
  messages (which carry the cause) stay, the tracebacks go: the run stops with one clear error."""

  def filter(self, record):
    if record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname:
      record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


_SHORT_ORBAX_ERRORS = _ShortOrbaxErrors()


class Checkpoints:
  """``save(step, state, data_iter)``, ``record_score(step, miou)``, ``restore(abstract_state,
  data_iter)``, ``check()``.

  A step is saved before it is evaluated (a failing evaluation cannot lose it) and its val mIoU
  recorded afterwards in ``scores.json``; the best-scored step and the latest ``keep`` survive.
  Call ``check()`` once per training step: it raises :class:`CheckpointSaveError` once a
  background save has failed (a Python flag; no device or host sync).
  """

  def __init__(self, directory: str, keep: int = 2, meta: dict | None = None):
    self.directory = os.path.abspath(directory)
    self.meta = meta or {}
    self.scores = read_scores(self.directory)
    check_writable(self.directory)
    logging.getLogger('absl').addFilter(_SHORT_ORBAX_ERRORS)
    self._watcher: threading.Thread | None = None  # waits for the save in flight
    self._failure: CheckpointSaveError | None = None
    self._closed = False
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep), KeepBestScored(lambda: self.scores)])
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(1)))
    self._last_good = self.manager.latest_step()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The saved step with the highest recorded val mIoU; None when no saved step has one."""
    return best_scored(self.scores, self.manager.all_steps())

  def record_score(self, step: int, miou: float) -> None:
    """Records step's val mIoU (the ranking ``best_step`` and the keep policy use).

    Every process keeps the scores (each runs the policy); process 0 writes the file, whole or
    not at all (a temporary file renamed over it).
    """
    self.scores[int(step)] = float(miou)
    if jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
      path = os.path.join(self.directory, SCORES_FILE)
      with open(path + '.tmp', 'w') as f:
        json.dump({str(k): v for k, v in sorted(self.scores.items())}, f, indent=1)
      os.replace(path + '.tmp', path)

  def save(self, step: int, state, data_iter) -> None:
    """Starts writing ``step`` in the background (after the previous save has finished)."""
    self.wait()
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iter),
          meta=ocp.args.JsonSave(self.meta)), force=True)
    except Exception as e:  # the synchronous part (directories, the data iterator's state)
      self._fail(step, e)
      self.check()
    # orbax surfaces a failed background write only at the next save (or never, at exit); this
    # thread waits for it and records the failure, for check() to raise at the next step
    self._watcher = threading.Thread(target=self._watch, args=(step,), daemon=True,
                                     name=f'checkpoint_{step}_watch')
    self._watcher.start()

  def _watch(self, step: int) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)
    else:
      self._last_good = step

  def _fail(self, step: int, e: BaseException) -> None:
    last = ('no checkpoint was saved before it' if self._last_good is None else
            f'the last good checkpoint is step {self._last_good} in {self.directory}')
    failure = CheckpointSaveError(
        f'saving checkpoint step {step} to {os.path.join(self.directory, str(step))} failed: '
        f'{_reason(e)}. Training stopped; {last}. Fix the cause (e.g. free disk space), then '
        'run the same command again to resume from it.')
    failure.original = e  # what orbax raised, for debugging
    self._failure = failure

  def check(self) -> None:
    """Raises :class:`CheckpointSaveError` (closing the manager) if a save has failed."""
    if self._failure is not None:
      self.close()
      raise self._failure from None

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises if it failed."""
    if self._watcher is not None:
      self._watcher.join()
      self._watcher = None
    self.check()

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """State at ``step``; ``data_iter`` is set to its saved position.

    Without ``step``, the newest checkpoint that restores: a corrupt one (a truncated array
    file, a missing item folder or metadata) is reported, renamed ``<step>.corrupt-<time>``
    (kept for inspection; orbax no longer lists it) and the next older one is tried.
    A checkpoint written for another model or class count is refused with the list of
    mismatched entries before any array is read; that is never skipped.
    """
    if step is not None:
      return self._restore_step(abstract_state, data_iter, step)
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self._restore_step(abstract_state, data_iter, step)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason, kept = _reason(e), self._set_aside(step)
        failures.append(f'step {step}: {reason} (kept as {kept})')
        print(f'checkpoint step {step} in {self.directory} cannot be restored: {reason}; '
              f'skipped it (kept as {kept})', flush=True)
        continue
      self.manager.reload()  # forget the steps set aside
      self._last_good = step
      return state
    self.manager.reload()
    if not failures:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    raise NoRestorableCheckpointError(
        f'no checkpoint in {self.directory} restores:\n  ' + '\n  '.join(failures) +
        '\nThe folders were kept; move one back to retry it, or use another workdir to start over.')

  def _restore_step(self, abstract_state, data_iter, step: int):
    where = f' (step {step} in {self.directory})'
    for item in ('state', 'meta') + (('data',) if data_iter is not None else ()):
      if not os.path.isdir(os.path.join(self.directory, str(step), item)):
        raise _Corrupt(f'item folder {item}/ is missing')
    meta = self.read_meta(step)
    for key in ('model', 'num_classes'):
      if key in self.meta and key in meta and meta[key] != self.meta[key]:
        raise CheckpointMismatchError([], [], [f'{key}: {meta[key]} vs {self.meta[key]}'],
                                      where=where)
    stored = self.manager.item_metadata(step)['state']
    if stored is None:  # not a model mismatch: the tree's description is gone
      raise _Corrupt('state/_METADATA (the array tree description) is missing or unreadable')
    check_tree(stored, abstract_state, where)
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**args))['state']

  def _set_aside(self, step: int) -> str:
    """Renames the step folder so orbax stops listing it (no '_<digits>' ending: orbax would
    still read that as a step); every process waits until process 0 has renamed it."""
    src = os.path.join(self.directory, str(step))
    dst = f'{src}.corrupt-{time.strftime("%Y%m%dT%H%M%S")}'
    n = 1
    while os.path.exists(dst if n == 1 else f'{dst}-{n}'):
      n += 1
    dst = dst if n == 1 else f'{dst}-{n}'
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'checkpoint {step} set aside')
    return dst

  def close(self) -> None:
    """Waits for the save in flight and closes the manager; after a failed save, quietly (the
    failure was raised by ``check``)."""
    if self._closed:
      return
    self._closed = True
    if self._watcher is not None:
      self._watcher.join()
      self._watcher = None
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      if self._failure is None:
        raise
    finally:
      logging.getLogger('absl').removeFilter(_SHORT_ORBAX_ERRORS)


def read_variables(directory: str, sharding, which: str = 'best') -> tuple[dict, dict]:
  """(meta, {'params', 'batch_stats'}) of a finished run's best step (else, or with
  ``which='latest'``, its latest); ``meta['step']`` is the step read. The params are the
  moving average when the run kept one (``meta['ema']``), as its evaluations used.

  What ``init_checkpoint=<workdir>`` starts a new run from (fine-tuning, staged FCN training);
  the optimizer state, step and data position stay behind. ``sharding`` places every array
  (replicated), so the run may have used any device count.
  """
  path = os.path.join(directory, 'checkpoints')
  path = path if os.path.isdir(path) else directory
  manager = ocp.CheckpointManager(os.path.abspath(path), item_handlers={
      'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    if which not in ('best', 'latest'):
      raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    step = best_scored(read_scores(path), manager.all_steps()) if which == 'best' else None
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {path}')
    stored = manager.item_metadata(step)['state']
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          stored, is_leaf=lambda m: hasattr(m, 'shape'))
    out = manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore(), state=ocp.args.StandardRestore(target)))
  finally:
    manager.close()
  state = out['state']
  ema = state.get('ema_params')  # the weights the run evaluated: its moving average, if kept
  return {**out['meta'], 'step': int(step), 'ema': bool(ema)}, {
      'params': ema or state['params'], 'batch_stats': state['batch_stats']}

