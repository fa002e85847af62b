"""Device mesh and shardings: the only module that deals with jax.sharding.

Data parallelism over one ('data',) axis spanning every device of every process. The state is
replicated; batches are split along their first axis. Under ``jax.jit`` a mean over the batch
axis (BatchNorm statistics, the loss) is then a global reduction and XLA adds the all-reduces,
so there is no pmap and no ``axis_name`` anywhere (jax_stack.md §3).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over the first ``num_devices`` (default: all) global devices."""
  devices = jax.devices()
  n = len(devices) if num_devices in (None, 0, -1) else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f'asked for {num_devices} devices; {len(devices)} are available')
  return jax.sharding.Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh, what: str = 'batch size') -> None:
  if global_batch_size % mesh.size:
    raise ValueError(f'{what} {global_batch_size} is not divisible by the {mesh.size} devices')


def put_batch(local_batch: dict, mesh) -> dict:
  """This process's share of the batch -> global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def state_shardings(abstract_state, mesh):
  """Replicated everywhere (the models fit one device); one place to add FSDP rules later."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs carrying target shardings: what orbax restores onto (any device count)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)
