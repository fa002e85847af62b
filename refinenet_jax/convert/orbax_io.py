"""Converted weights as an orbax checkpoint plus a JSON description of the model they fit."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from refinenet_jax.checkpoint import read_variables
from refinenet_jax.models import create_model
from refinenet_jax.tree_check import check_tree

META = 'refinenet_jax_model.json'


def check_new_output(path) -> str:
  """Absolute ``path``; raises ``FileExistsError`` if something is there: a conversion never
  writes over (or deletes) an existing file or directory."""
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path):
    kind = 'directory' if os.path.isdir(path) else 'file'
    raise FileExistsError(f'output {path} already exists (a {kind}); pass a new path, or remove '
                          'it yourself first: converted weights are never written over it')
  return path


def save_converted(path, variables, *, model_name: str, num_classes: int, overrides=None,
                   source: str = ''):
  """Writes ``variables`` under ``path/variables`` and the model spec to ``path/META``;
  ``path`` must not exist yet (see :func:`check_new_output`)."""
  path = check_new_output(path)
  model = create_model(model_name, num_classes, **(overrides or {}))
  os.makedirs(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, 'variables'), jax.tree.map(np.asarray, variables))
    ckptr.wait_until_finished()
  meta = {'model': model_name, 'num_classes': num_classes, 'overrides': overrides or {},
          'normalization': model.normalization, 'source': source}
  with open(os.path.join(path, META), 'w') as f:
    json.dump(meta, f, indent=2)
  return path


def read_weights(path, sharding) -> tuple[dict, dict]:
  """(meta, {'params', 'batch_stats'}) from converted weights or a run's workdir (its best
  step): what ``init_checkpoint`` names. Arrays are placed by ``sharding``."""
  if not os.path.exists(os.path.join(path, META)):
    return read_variables(path, sharding)
  with open(os.path.join(path, META)) as f:
    meta = json.load(f)
  _, variables = load_converted(path)
  variables = jax.device_put(variables, sharding)
  return meta, {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def load_converted(path, *, expect_model: str | None = None,
                   expect_num_classes: int | None = None, input_shape=(1, 64, 64, 3)):
  """Returns ``(model, variables)``; refuses a checkpoint that does not fit, naming the leaves."""
  path = os.path.abspath(os.fspath(path))
  meta_file = os.path.join(path, META)
  if not os.path.exists(meta_file):
    raise FileNotFoundError(f'{path} is not a converted checkpoint (no {META})')
  with open(meta_file) as f:
    meta = json.load(f)
  if expect_model is not None and meta['model'] != expect_model:
    raise ValueError(f'{path} holds {meta["model"]}, not {expect_model}')
  if expect_num_classes is not None and meta['num_classes'] != expect_num_classes:
    raise ValueError(f'{path} has {meta["num_classes"]} classes, expected {expect_num_classes}')
  model = create_model(meta['model'], meta['num_classes'], **meta['overrides'])
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(os.path.join(path, 'variables'))
    stored = getattr(stored, 'item_metadata', stored)
    check_tree(dict(stored), abstract, f' ({path})', dtype=False)  # the restore casts dtypes
    variables = ckptr.restore(os.path.join(path, 'variables'), abstract)
  return model, variables
