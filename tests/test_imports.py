"""Package layering (models/ imports nothing above it) and the one tree-fit check."""
import ast
import pathlib

import jax
import numpy as np
import pytest

from refinenet_jax.tree_check import CheckpointMismatchError, check_tree, describe

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'refinenet_jax'
ABOVE_MODELS = ('refinenet_jax.convert', 'refinenet_jax.train', 'refinenet_jax.checkpoint',
                'refinenet_jax.data')


def _trees():
  return {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob('*.py'))}


def _imported(tree):
  """Every module name an ``import``/``from ... import`` anywhere in ``tree`` may bind,
  function-level imports included."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      yield base
      yield from (f'{base}.{alias.name}' for alias in node.names)


def test_models_import_nothing_above_them():
  bad = [f'{path.name}: {name}' for path, tree in _trees().items()
         if path.parent.name == 'models' for name in _imported(tree)
         if any(name == up or name.startswith(up + '.') for up in ABOVE_MODELS)]
  assert not bad, f'models/ must not import conversion, data or training code: {bad}'


def test_one_tree_check_in_the_package():
  """The mismatch error and the tree description live in tree_check.py only."""
  classes, describers = [], []
  for path, tree in _trees().items():
    for node in ast.walk(tree):
      if isinstance(node, ast.ClassDef) and node.name == 'CheckpointMismatchError':
        classes.append(path.name)
      if isinstance(node, ast.FunctionDef) and node.name in ('describe', '_describe',
                                                             'check_tree', 'check_variables'):
        describers.append(f'{path.name}:{node.name}')
  assert classes == ['tree_check.py']
  assert sorted(describers) == ['tree_check.py:check_tree', 'tree_check.py:describe']


def test_check_tree_names_every_missing_unexpected_and_mismatched_leaf():
  want = {'params': {'a': np.zeros((2, 3), np.float32), 'b': [np.zeros(4, np.float32)]}}
  assert describe(want) == {'params/a': ((2, 3), 'float32'), 'params/b/0': ((4,), 'float32')}
  check_tree(jax.eval_shape(lambda: want), want)  # abstract and concrete leaves alike
  have = {'params': {'a': np.zeros((2, 4), np.float32), 'c': np.zeros(1, np.float32)}}
  with pytest.raises(CheckpointMismatchError, match=r' \(here\); nothing was loaded') as e:
    check_tree(have, want, ' (here)')
  assert e.value.missing == ['params/b/0'] and e.value.unexpected == ['params/c']
  assert e.value.mismatched == ['params/a: (2, 4) float32 vs (2, 3) float32']
  half = jax.tree.map(lambda a: a.astype(np.float16), want)
  with pytest.raises(CheckpointMismatchError, match='params/a: .2, 3. float16 vs .2, 3. float32'):
    check_tree(half, want)
  check_tree(half, want, dtype=False)  # a restore that casts only needs the shapes
