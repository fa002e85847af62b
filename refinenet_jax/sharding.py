"""Device mesh and shardings: every sharding decision lives here and in the config.

The mesh comes from ``config.mesh`` (axis names and sizes); batches are split along their first
axis over 'data'. The train state is laid out by rules, regexes on a leaf's path
('params/encoder/layer1/0/conv1/kernel', 'opt_state/0/mu/...') -> a placement, first match
wins, unmatched leaves replicated: ``RULE_SETS`` names the shipped sets and
``config.sharding_rules`` picks one. Under ``jax.jit`` a mean over the batch axis (BatchNorm
statistics, the loss) is a global reduction and XLA adds the collectives, so there is no pmap
and no ``axis_name`` anywhere.
"""
from __future__ import annotations

import functools
import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from refinenet_jax import steps

DATA_AXIS = 'data'


def make_mesh(axes=-1, devices=None) -> jax.sharding.Mesh:
  """The mesh ``axes`` describes over ``devices`` (default: every global device).

  ``axes``: ``config.mesh``, (name, size) pairs, one size -1 for the rest of the devices
  (('data', -1),) = all of them on 'data'); an int n is a 1-D 'data' mesh of the first n
  (-1: all). A foreign topology's devices (``jax.experimental.topologies``) build the same mesh
  for ahead-of-time compilation.
  """
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(axes, int):
    axes = ((DATA_AXIS, axes),)
  problem = mesh_problem(axes)
  if problem:
    raise ValueError(f'mesh {tuple(axes)}: {problem}')
  names, sizes = [str(a) for a, _ in axes], [int(n) for _, n in axes]
  fixed = int(np.prod([n for n in sizes if n != -1]))
  if -1 in sizes:
    sizes[sizes.index(-1)] = max(len(devices) // fixed, 1)
  n = int(np.prod(sizes))
  if n > len(devices) or (-1 in [s for _, s in axes] and len(devices) % fixed):
    raise ValueError(f'mesh {tuple(axes)} needs {n} devices; {len(devices)} are available')
  return jax.sharding.Mesh(np.asarray(devices[:n]).reshape(sizes), tuple(names))


def mesh_problem(axes) -> str | None:
  """What is wrong with ``config.mesh``-style (name, size) pairs, or None."""
  ok = lambda a: (len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], int)
                  and not isinstance(a[1], bool) and (a[1] > 0 or a[1] == -1))
  if not len(axes) or not all(ok(a) for a in axes):
    return '(name, size) pairs; sizes are positive, or -1 for the rest'
  names = [a[0] for a in axes]
  if names.count(DATA_AXIS) != 1 or len(set(names)) != len(names):
    return f'needs one {DATA_AXIS!r} axis and distinct names'
  if [a[1] for a in axes].count(-1) > 1:
    return 'at most one -1 (the rest)'
  return None


def platform(mesh) -> str:
  """The platform ('cpu', 'gpu', 'tpu') of the devices a program over ``mesh`` runs on."""
  return mesh.devices.flat[0].platform


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh, what: str = 'batch size',
                     all_devices=None) -> None:
  """The batch splits evenly over the devices, and every process feeds an equal share.

  Each process's pipeline yields ``global_batch_size / process_count`` rows (``put_batch``),
  so every process of the job (the owners of ``all_devices``, default ``jax.devices()``)
  must own the same number of mesh devices.
  """
  if global_batch_size % mesh.size:
    raise ValueError(f'{what} {global_batch_size} is not divisible by the {mesh.size} devices')
  processes = {d.process_index for d in (jax.devices() if all_devices is None else all_devices)}
  rows = process_rows(mesh, global_batch_size)
  if set(rows) != processes or len(set(rows.values())) != 1:
    raise ValueError(f'the mesh gives the {len(processes)} processes unequal shares of the '
                     f'{what} {global_batch_size} (process: rows {dict(sorted(rows.items()))}); '
                     'use every device of every process, or the same number on each')


def process_rows(mesh, global_batch_size: int) -> dict[int, int]:
  """Rows of a global batch sharded over 'data' that each process's devices hold."""
  index_map = batch_sharding(mesh).devices_indices_map((global_batch_size,))
  rows: dict[int, int] = {}
  for device, (index,) in index_map.items():
    rows[device.process_index] = rows.get(device.process_index, 0) + len(
        range(*index.indices(global_batch_size)))
  return rows


def window_placement(mesh):
  """Sliding-window groups (group, windows x images, H, W, C) with the windows split over
  'data': one large image's windows run on every device at once (``inference.predict_probs``'
  ``place``; ``window_batch`` a multiple of the 'data' size)."""
  spec = NamedSharding(mesh, P(None, DATA_AXIS))
  return lambda tiles: jax.lax.with_sharding_constraint(tiles, spec)


def put_batch(local_batch: dict, mesh) -> dict:
  """This process's share of the batch -> global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


# Named rule sets (``config.sharding_rules``): (regex on the leaf path, placement) pairs.
# A placement is 'replicate', 'fsdp' (the largest dimension divisible by the 'data' axis is split
# over it, as big_vision's fsdp; replicated when none divides) or a PartitionSpec tuple.
RULE_SETS = {
    'replicated': (),
    'fsdp': ((r'^(params|ema_params|opt_state)/', 'fsdp'),),
}


def leaf_path(path) -> str:
  """A key path as 'params/encoder/conv1/kernel' (dict keys, attribute names, list indices)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def _spec(placement, shape, mesh) -> P:
  if placement == 'replicate':
    return P()
  if placement == 'fsdp':
    n = mesh.shape[DATA_AXIS]
    dims = sorted((d for d, size in enumerate(shape) if size % n == 0 and size >= n),
                  key=lambda d: -shape[d])
    if n == 1 or not dims:
      return P()
    return P(*[DATA_AXIS if d == dims[0] else None for d in range(len(shape))])
  return P(*placement)


def state_shardings(abstract_state, mesh, rules='replicated'):
  """A NamedSharding per leaf of ``abstract_state`` by ``rules`` (a ``RULE_SETS`` name or
  (regex, placement) pairs); leaves no rule matches are replicated."""
  if isinstance(rules, str):
    if rules not in RULE_SETS:
      raise ValueError(f'unknown sharding_rules {rules!r}; known: {sorted(RULE_SETS)}')
    rules = RULE_SETS[rules]
  compiled = [(re.compile(r), placement) for r, placement in rules]

  def place(path, leaf):
    name = leaf_path(path)
    for regex, placement in compiled:
      if regex.search(name):
        return NamedSharding(mesh, _spec(placement, getattr(leaf, 'shape', ()), mesh))
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(place, abstract_state)


def train_state_initializer(rng, *, model, tx, input_shape, mesh, rules='replicated',
                            ema: bool = False):
  """(``init(key) -> TrainState``, the state's abstract form): the jitted program that
  initialises a state straight into the shardings ``rules`` give it, for keys of ``rng``'s kind,
  and its ShapeDtypeStructs carrying those shardings (what orbax restores onto and ahead-of-time
  compilation takes). A caller that makes many fresh states keeps ``init``: it compiles once."""
  init = functools.partial(steps.init_train_state, model=model, tx=tx, input_shape=input_shape,
                           ema=ema)
  abstract = jax.eval_shape(init, rng)
  abstract = with_shardings(abstract, state_shardings(abstract, mesh, rules))
  return jax.jit(init, out_shardings=shardings_of(abstract)), abstract


def abstract_train_state(rng, **kwargs):
  """The state's shapes, dtypes and target shardings, computing nothing (``kwargs``: those of
  :func:`train_state_initializer`)."""
  return train_state_initializer(rng, **kwargs)[1]


def create_train_state(rng, **kwargs):
  """The initial train state, placed by the rules: the one way every caller (trainer, dry run,
  benchmarks, notebook, tests) builds it (``kwargs``: those of :func:`train_state_initializer`)."""
  return train_state_initializer(rng, **kwargs)[0](rng)


def shardings_of(tree):
  """The ``.sharding`` of every leaf (of a state or its ``abstract_train_state``)."""
  return jax.tree.map(lambda a: a.sharding, tree)


def with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs carrying target shardings: what orbax restores onto (any device count)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)
