"""The one check that a tree of variables fits another: same paths, shapes and dtypes.

Every hand-over of weights (a torch import, a converted or training checkpoint, a coarser FCN,
SS pre-training) refuses a tree that does not fit with :class:`CheckpointMismatchError`, which
lists every missing, unexpected and mismatched leaf. This module imports only jax and numpy, so
models, conversion and training code may all use it.
"""
from __future__ import annotations

import jax
import numpy as np


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model; nothing was loaded."""

  def __init__(self, missing, unexpected, mismatched, where=''):
    self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

    def fmt(title, items):
      if not items:
        return ''
      shown = '\n    '.join(items[:40])
      more = f'\n    ... and {len(items) - 40} more' if len(items) > 40 else ''
      return f'\n  {title} ({len(items)}):\n    {shown}{more}'

    super().__init__(
        f'checkpoint does not fit the model{where}; nothing was loaded.' +
        fmt('missing from the checkpoint', missing) +
        fmt('unexpected in the checkpoint', unexpected) +
        fmt('shape mismatches (checkpoint vs model)', mismatched))


def describe(tree) -> dict[str, tuple[tuple, str]]:
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


def check_tree(actual, expected, where: str = '', *, dtype: bool = True) -> None:
  """Raises :class:`CheckpointMismatchError` unless ``actual`` (the checkpoint) has exactly the
  leaf paths and shapes of ``expected`` (the model), and their dtypes unless ``dtype=False``
  (for a restore that casts). ``where`` (e.g. ``' (path)'``) is put into the message."""
  have, want = describe(actual), describe(expected)
  show = (lambda d: f'{d[0]} {d[1]}') if dtype else (lambda d: str(d[0]))
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  mismatched = [f'{k}: {show(have[k])} vs {show(want[k])}' for k in sorted(set(want) & set(have))
                if show(have[k]) != show(want[k])]
  if missing or unexpected or mismatched:
    raise CheckpointMismatchError(missing, unexpected, mismatched, where)
