"""Prints logit parity with the published PyTorch code and the bfloat16 deviation.

  python -m experiments.parity_report

Uses the stored reference outputs in tests/fixtures (regenerate them with
experiments/make_parity_fixtures.py); weights are re-derived from the stored seed.
"""
import ast
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import refinenet_jax as rj
from refinenet_jax.convert import import_state_dict
from refinenet_jax.testing import synthetic_state_dict

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'fixtures')
CASES = [('refinenet_r101', 'parity_refinenet_r101.npz'),
         ('lw_refinenet_r50', 'parity_lw_refinenet_r50.npz')]


def main():
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}')
  for name, fixture in CASES:
    t0 = time.time()
    z = np.load(os.path.join(FIX, fixture))
    keys = list(zip(z['keys'].tolist(), [ast.literal_eval(s) for s in z['shapes']]))
    model = rj.create_model(name, 21)
    variables = import_state_dict(model, synthetic_state_dict(keys, int(z['seed'])))
    x, ref = z['input_nhwc'], z['logits_nhwc']
    f32 = np.asarray(jax.jit(model.apply)(variables, x))
    bf16 = np.asarray(jax.jit(rj.create_model(name, 21, dtype=jnp.bfloat16).apply)(variables, x))
    scale = np.abs(ref).max()
    print(f'{name}: input {x.shape}, reference {z["reference"]} (torch {z["torch_version"]})\n'
          f'  float32 vs PyTorch: max|diff|/max|ref| = {np.abs(f32 - ref).max() / scale:.2e}\n'
          f'  bfloat16 vs float32: max|diff|/max|ref| = {np.abs(bf16 - f32).max() / scale:.2e}, '
          f'argmax agreement {(bf16.argmax(-1) == f32.argmax(-1)).mean():.4f}  '
          f'({time.time() - t0:.1f} s)')


if __name__ == '__main__':
  main()
