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
