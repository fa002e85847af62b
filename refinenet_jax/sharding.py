"""Device mesh and shardings: the only module that deals with jax.sharding.

Data parallelism over one ('data',) axis spanning every device of every process. The state is
replicated; batches are split along their first axis. Under ``jax.jit`` a mean over the batch
axis (BatchNorm statistics, the loss) is then a global reduction and XLA adds the all-reduces,
so there is no pmap and no ``axis_name`` anywhere. The ``per_device_*`` shard_map wrappers at
the end exist only as a benchmark comparison point.
"""
from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(num_devices: int | None = None, devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over the first ``num_devices`` (default: all) of ``devices``.

  ``devices`` defaults to every global device; a foreign topology's devices
  (``jax.experimental.topologies``) build the same mesh for ahead-of-time compilation.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices) if num_devices in (None, 0, -1) else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f'asked for {num_devices} devices; {len(devices)} are available')
  return jax.sharding.Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


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


def per_device_forward(fn, mesh):
  """``fn(state, images)`` run by ``jax.shard_map`` on each device's slice of the batch, the
  output left split over 'data': the per-device counterpart of a jit-sharded forward pass."""
  return jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS))


def per_device_train_step(step_fn, mesh):
  """``step_fn(state, batch) -> (state, metrics)`` run per device on its slice of the batch
  (pmap-style data parallelism), kept as a comparison point for the jit-sharded step.

  It differs from the global view in BatchNorm only: each device normalises with its own batch
  statistics, and the running averages are averaged afterwards (unsynchronised BN, as plain
  DDP). Under ``check_vma`` the gradient of the replicated parameters arrives already summed over
  the devices (the transpose of their implicit broadcast is a psum), so the optimizer is handed
  it divided by the device count: the mean of per-device mean gradients, the global step when the
  shards have equal pixel counts.
  Each device draws its own dropout masks.
  """
  n = mesh.size
  mean = lambda tree: jax.tree.map(lambda x: jax.lax.pmean(x, DATA_AXIS), tree)

  def local(state, batch):
    tx = state.tx
    mean_tx = optax.GradientTransformation(
        tx.init, lambda g, s, p=None: tx.update(jax.tree.map(lambda x: x / n, g), s, p))
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), jax.lax.axis_index(DATA_AXIS))
    new, metrics = step_fn(state.replace(tx=mean_tx, rng=jax.random.key_data(rng)), batch)
    metrics = mean(metrics)
    if 'grad_norm' in metrics:  # step_fn measured the summed gradient
      metrics['grad_norm'] = metrics['grad_norm'] / n
    return new.replace(tx=tx, rng=state.rng, batch_stats=mean(new.batch_stats)), metrics

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))
