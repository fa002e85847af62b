"""Per-device (``jax.shard_map``) variants of the forward pass and the train step: the benchmark's
'shard_map' parallel style, a comparison point for the trainer's jit-sharded global view."""
from __future__ import annotations

import jax
import optax
from jax.sharding import PartitionSpec as P

from refinenet_jax import sharding
from refinenet_jax.sharding import DATA_AXIS


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


def per_device_train_fn(train_fn, mesh, state_sh):
  """The trainer's jitted step (``train.make_train_step``) rebuilt per device: its pure step
  wrapped by :func:`per_device_train_step` and jitted with the same shardings and donation."""
  return jax.jit(per_device_train_step(train_fn.__wrapped__, mesh),
                 in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
