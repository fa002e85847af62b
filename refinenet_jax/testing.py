"""Deterministic synthetic weights for parity checks against reference PyTorch code.

Values come from PCG64's raw uniform stream (``Generator.random``), which is stable across numpy
versions, so CI can regenerate exactly the weights the stored reference outputs were made with.
"""
from __future__ import annotations

import numpy as np


def synthetic_state_dict(key_shapes, seed: int = 0) -> dict[str, np.ndarray]:
  """A torch-layout state dict with non-default BatchNorm statistics and tame activations.

  key_shapes: sequence of (key, shape). Convs get uniform fan-in-scaled weights; every BN gets
  random running mean/var and affine terms; the last BN of each residual branch is damped so a
  101-layer net stays in a range where float32 relative error is meaningful.
  """
  out = {}
  for i, (key, shape) in enumerate(key_shapes):
    shape = tuple(shape)
    rng = np.random.default_rng([seed, i])
    u = rng.random(shape) if shape else rng.random()
    u = np.asarray(u, np.float64)
    leaf = key.rsplit('.', 1)[-1]
    if leaf == 'num_batches_tracked':
      out[key] = np.array(100, np.int64)
      continue
    if len(shape) == 4:
      fan_in = shape[1] * shape[2] * shape[3]
      v = (2 * u - 1) * np.sqrt(3.0 / fan_in)  # std = sqrt(1 / fan_in)
    elif leaf == 'running_mean':
      v = (2 * u - 1) * 0.2
    elif leaf == 'running_var':
      v = 0.5 + u
    elif leaf == 'weight':  # BN scale
      damp = 0.2 if ('bn3' in key or 'downsample.1' in key) else 1.0
      v = damp * (0.5 + 0.5 * u)
    else:  # biases
      v = (2 * u - 1) * 0.1
    out[key] = v.astype(np.float32)
  return out


def random_variables(model, input_shape=(1, 32, 32, 3), seed: int = 0) -> dict:
  """Flax variables of ``model`` filled from numpy by the rules above, from shapes alone.

  ``jax.eval_shape`` instead of a compiled ``model.init``: on 2 CPU cores XLA spends 10-40 s
  compiling the init of even a tiny model (mostly its random number generation), and a test
  that checks values needs weights, not the initialisers' distributions.
  """
  import jax
  import jax.numpy as jnp
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape, jnp.float32))
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  values = []
  for i, (path, leaf) in enumerate(flat):
    name = str(getattr(path[-1], 'key', path[-1]))
    u = np.random.default_rng([seed, i]).random(leaf.shape)
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      v = (2 * u - 1) * np.sqrt(3.0 / fan_in)
    elif name == 'mean':
      v = (2 * u - 1) * 0.2
    elif name == 'var':
      v = 0.5 + u
    elif name == 'scale':  # BN and GroupNorm scales
      v = 0.5 + 0.5 * u
    else:  # biases and anything else
      v = (2 * u - 1) * 0.1
    values.append(np.asarray(v, leaf.dtype))
  return jax.tree.unflatten(jax.tree.structure(abstract), values)


def bare_run(model, input_shape=(1, 32, 32, 3)):
  """A ``train.Run`` holding only what ``train.initial_state`` reads (a one-device mesh, the
  state initializer, no data and no checkpoints): for tests of ``init_checkpoint``."""
  import jax
  import optax
  from refinenet_jax import sharding, train
  mesh = sharding.make_mesh(1)
  init, abstract = sharding.train_state_initializer(
      jax.random.key(0), model=model, tx=optax.sgd(1e-3), input_shape=input_shape, mesh=mesh)

  class NoCheckpoints:
    def latest_step(self):
      return None

  return train.Run(mesh=mesh, model=model, info=None, train_ds=None, eval_ds=None, n_train=0,
                   n_eval=0, crop=tuple(input_shape[1:3]), eval_size=None, eval_window=None,
                   init=init, abstract=abstract, ckpts=NoCheckpoints())
