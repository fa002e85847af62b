"""orbax CheckpointManager wrapper: train state + data-iterator state + a JSON description.

A checkpoint holds everything a resumed run needs to continue bit-identically: the TrainState
(params, BatchNorm statistics, optimizer state, step, RNG), every process's grain iterator state,
and the config/model it was written by. Saves are asynchronous; the latest ``keep`` and the best
by val mIoU are preserved. Restores go onto an abstract target that carries the shardings of the
current mesh, so a checkpoint written on 8 devices restores onto 1.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from refinenet_jax.convert.refinenet_torch import CheckpointMismatchError


def _describe(tree) -> dict[str, tuple]:
  """path -> (shape, dtype) for arrays, abstract arrays and orbax array metadata alike."""
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))[0]
  return {_path(p): (tuple(x.shape), str(np.dtype(x.dtype))) for p, x in flat
          if hasattr(x, 'shape')}


def _path(keys) -> str:
  """'params/block1/crp/conv0/kernel' whether the tree holds dataclasses, dicts or lists."""
  parts = []
  for k in keys:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


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


class Checkpoints:
  """``save(step, state, data_iter)``, ``record_score(step, miou)``, ``restore(abstract_state,
  data_iter)``.

  A step is saved before it is evaluated (a failing evaluation cannot lose it) and its val mIoU
  recorded afterwards in ``scores.json``; the best-scored step and the latest ``keep`` survive.
  """

  def __init__(self, directory: str, keep: int = 2, meta: dict | None = None):
    self.directory = os.path.abspath(directory)
    self.meta = meta or {}
    self.scores = read_scores(self.directory)
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

  def save(self, step: int, state, data_iter, metrics: dict | None = None) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(self.meta)), metrics=metrics, force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """State at ``step`` (default latest); ``data_iter`` is set to its saved position.

    A checkpoint written for another model or class count is refused with the list of
    mismatched entries before any array is read.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    meta = self.read_meta(step)
    for key in ('model', 'num_classes'):
      if key in self.meta and key in meta and meta[key] != self.meta[key]:
        raise CheckpointMismatchError([], [], [f'{key}: {meta[key]} vs {self.meta[key]}'],
                                      where=f' (step {step} in {self.directory})')
    CheckpointMismatchError.check(_describe(self.manager.item_metadata(step)['state']),
                                  _describe(abstract_state),
                                  f' (step {step} in {self.directory})')
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**args))['state']

  def close(self) -> None:
    self.manager.close()


def read_variables(directory: str, sharding) -> tuple[dict, dict]:
  """(meta, {'params', 'batch_stats'}) of a finished run's best step (else its latest).

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
    step = best_scored(read_scores(path), manager.all_steps())
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
  return out['meta'], {k: out['state'][k] for k in ('params', 'batch_stats')}


def check_variables(variables, abstract, where: str = '') -> None:
  """Raises :class:`CheckpointMismatchError` unless every leaf's path, shape and dtype agree."""
  CheckpointMismatchError.check(_describe(variables), _describe(abstract), where)

