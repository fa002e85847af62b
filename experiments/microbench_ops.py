"""Times the two operations that dominate the RefineNet train step on XLA:CPU, in isolation.

  python -m experiments.microbench_ops [--size=128] [--channels=256] [--iters=5]

At the decoder's 1/4-resolution shape (1 x 128 x 128 x 256 for a 512 x 512 input):
- the chained residual pooling's 5x5 stride-1 max pool, forward and forward + gradient, as one
  2-D window (``flax.linen.max_pool``) and as a W-then-H pair of 1-D windows, with XLA's
  gradient and with ``layers.window_max_1d``'s (the library's on CPU), and the largest
  gradient difference on tie-heavy inputs (rounding only = the same choice among tied maxima);
- a 3x3 same-padding convolution: forward, input gradient, weight gradient as XLA lowers it, and
  the weight gradient written as nine matmuls over shifted inputs (a custom-VJP candidate that
  was measured and not adopted, BENCHMARKS.md section 4); the same three with the arrays in
  NCHW/OIHW (PyTorch's layouts) instead of the library's NHWC/HWIO;
- ResNeXt's 32-group 3x3 convolution as one grouped convolution and as the library's one
  convolution per group (``layers.grouped_conv_general_dilated`` on CPU): forward, input and
  weight gradients.

With ``--model=NAME``, instead: every distinct convolution of that model's forward pass at
``--size`` (batch 1): XLA's forward, input gradient and weight gradient (with the transposes it
adds), the weight gradient as one matmul per kernel tap (the custom-VJP candidate of
BENCHMARKS.md section 7), and with ``--torch_python`` the same three passes in PyTorch eager;
then each column summed over the model (times each shape's count), to set against a whole
train step.

With ``--fc6``, instead: FCN-8s's fc6 (a 7x7 valid convolution, 512 -> 4096, on pool5 at
``--size``) as XLA's convolution against one matmul over its patches (the input windows
concatenated tap by tap, so the HWIO kernel reshapes to a matrix without a copy): forward,
and forward + both gradients.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments import torch_reference  # no torch: the child process imports it
from refinenet_jax import hardware
from refinenet_jax.models import layers


def timed(fn, *args, iters: int = 5) -> float:
  """Median milliseconds of the jitted fn after one warm-up call."""
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def _relative(a, ref) -> float:
  return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


def _conv_times(key: str, conv, x, w, dy, iters: int) -> dict[str, float]:
  """ms of conv's forward, input gradient and weight gradient, keyed '{key}: ...' (the unused
  gradient of each vjp is dead code that XLA drops)."""
  grad = lambda argnum: lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[argnum]
  return {f'{key}: forward ms': timed(conv, x, w, iters=iters),
          f'{key}: input gradient ms': timed(grad(0), x, w, dy, iters=iters),
          f'{key}: weight gradient ms': timed(grad(1), x, w, dy, iters=iters)}


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _wgrad_tapwise(x, dy, kernel_shape, strides=(1, 1), padding=((1, 1), (1, 1)),
                   dilation=(1, 1)):
  """The weight gradient of an NHWC/HWIO convolution as one matmul per kernel tap: the strided
  input window under tap (i, j) contracted with the output gradient (a custom-VJP candidate,
  measured and not adopted: BENCHMARKS.md sections 4 and 7)."""
  kh, kw = kernel_shape[:2]
  n, ho, wo, _ = dy.shape
  (sh, sw), (dh, dw) = strides, dilation
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  taps = [jnp.einsum('nhwi,nhwo->io', lax.slice(
      xp, (0, i * dh, j * dw, 0),
      (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, x.shape[3]),
      (1, sh, sw, 1)), dy) for i in range(kh) for j in range(kw)]
  return jnp.stack(taps).reshape(kernel_shape)


def run(size: int = 128, channels: int = 256, iters: int = 3) -> dict[str, float]:
  shape = (1, size, size, channels)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(0.02 * rng.standard_normal((3, 3, channels, channels)), jnp.float32)
  ties = jnp.asarray(rng.integers(0, 4, shape), jnp.float32)
  pools = {'2-D window': lambda v: nn.max_pool(v, (5, 5), padding=((2, 2), (2, 2))),
           'W then H, XLA gradient': lambda v: layers._window_max_1d(
               layers._window_max_1d(v, 2, 5, 1, (2, 2)), 1, 5, 1, (2, 2)),
           'W then H, shifted-compare gradient': lambda v: layers.window_max_1d(
               layers.window_max_1d(v, 2, 5, 1, (2, 2)), 1, 5, 1, (2, 2))}
  out = {}
  grads = {}
  for name, pool in pools.items():
    grad = lambda v, pool=pool: jax.vjp(pool, v)[1](dy)[0]
    out[f'max pool 5x5, {name}: forward ms'] = timed(pool, x, iters=iters)
    out[f'max pool 5x5, {name}: forward + gradient ms'] = timed(grad, x, iters=iters)
    grads[name] = np.asarray(jax.jit(grad)(ties))
  for name in list(pools)[1:]:
    out[f'max pool, {name}: largest gradient difference at ties'] = float(
        np.abs(grads['2-D window'] - grads[name]).max())
  wgrad = lambda x, w, dy: jax.vjp(lambda w: _conv(x, w), w)[1](dy)[0]
  out.update(_conv_times('conv 3x3', _conv, x, w, dy, iters))
  tapwise = lambda x, dy: _wgrad_tapwise(x, dy, w.shape)
  out['conv 3x3: weight gradient (9 matmuls) ms'] = timed(tapwise, x, dy, iters=iters)
  ref = np.asarray(jax.jit(wgrad)(x, w, dy))
  out['conv 3x3: 9-matmul weight gradient, relative difference'] = _relative(
      jax.jit(tapwise)(x, dy), ref)
  # the same convolution with its arrays in PyTorch's layouts (XLA picks the physical layout)
  nchw = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
  xc, wc, dyc = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), dy.transpose(0, 3, 1, 2)
  out.update(_conv_times('conv 3x3, NCHW/OIHW', nchw, xc, wc, dyc, iters))
  wgrad_nchw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: nchw(x, w), w)[1](dy)[0])
  out['conv 3x3, NCHW/OIHW vs NHWC/HWIO: weight gradient relative difference'] = _relative(
      np.asarray(wgrad_nchw(xc, wc, dyc)).transpose(2, 3, 1, 0), ref)
  groups = min(32, channels)
  wg = jnp.asarray(0.02 * rng.standard_normal((3, 3, channels // groups, channels)), jnp.float32)
  saved = layers.SPLIT_GROUPED_CONV_BACKENDS
  try:
    for name, backends in (('one grouped conv', ()), ('one conv per group', ('cpu',))):
      layers.SPLIT_GROUPED_CONV_BACKENDS = backends

      def gconv(x, w):  # a new function per setting: jit traces it again
        return layers.grouped_conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=groups)
      out.update(_conv_times(f'conv 3x3, {groups} groups, {name}', gconv, x, wg, dy, iters))
  finally:
    layers.SPLIT_GROUPED_CONV_BACKENDS = saved
  return out


def model_convs(name: str, size: int) -> dict[tuple, int]:
  """{(input shape, kernel shape, strides, padding, dilation, groups): count} of the model's
  2-D NHWC convolutions (a grouped one split per group on CPU counts once per group)."""
  from refinenet_jax.models import create_model
  seen: dict[tuple, int] = {}
  real = lax.conv_general_dilated

  def record(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, **kwargs):
    if isinstance(padding, str):
      window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], rhs_dilation or (1, 1))]
      padding = lax.padtype_to_pads(lhs.shape[1:3], window, window_strides, padding)
    key = (lhs.shape, rhs.shape, tuple(window_strides), tuple(tuple(p) for p in padding),
           tuple(rhs_dilation or (1, 1)), feature_group_count)
    if tuple(lhs_dilation or (1, 1)) == (1, 1):
      seen[key] = seen.get(key, 0) + 1
    return real(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count, **kwargs)

  model = create_model(name, 21)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  lax.conv_general_dilated = record
  try:
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  finally:
    lax.conv_general_dilated = real
  return seen


def conv_times_by_shape(name: str, size: int, iters: int) -> list[dict]:
  """Per distinct convolution of the model (its key in ``model_convs``, ``count`` and shapes):
  ms of XLA's forward, input gradient and weight gradient, and of the weight gradient
  tap-wise (ungrouped convolutions only)."""
  rows = []
  rng = np.random.default_rng(0)
  for key, count in model_convs(name, size).items():
    xs, ws, strides, padding, dilation, groups = key
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    w = jnp.asarray(0.01 * rng.standard_normal(ws), jnp.float32)
    conv = lambda x, w: lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=dilation, feature_group_count=groups,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    dy = jnp.asarray(rng.standard_normal(jax.eval_shape(conv, x, w).shape), jnp.float32)
    passes = _conv_times('XLA', conv, x, w, dy, iters)
    row = {'key': key, 'count': count, 'input': xs, 'kernel': ws, 'strides': strides,
           'dilation': dilation, 'output': dy.shape,
           **{k.removeprefix('XLA: '): v for k, v in passes.items()}}
    if groups == 1:
      tapwise = lambda x, dy: _wgrad_tapwise(x, dy, w.shape, strides, padding, dilation)
      row['tap-wise weight gradient ms'] = timed(tapwise, x, dy, iters=iters)
    rows.append(row)
  return rows


def attach_torch_conv_times(rows: list[dict], torch_python: str, iters: int) -> None:
  """Adds 'torch <pass>' to each row: the same convolution in PyTorch eager in a child process
  (``experiments/torch_reference.conv_times``, as many threads as this process's CPUs)."""
  spec = {'convs': [r['key'] for r in rows], 'iters': iters, 'threads': os.cpu_count()}
  for row, t in zip(rows, torch_reference.run_child(torch_python, spec, 'convolutions'),
                    strict=True):
    if tuple(t.pop('output shape')) != row['output']:
      raise RuntimeError(f'PyTorch computed another convolution for {row["key"]}')
    row.update({f'torch {k}': v for k, v in t.items()})


def totals(rows: list[dict]) -> dict[str, float]:
  """Each timed column summed over the rows, times each row's count (the model's forward, its
  input gradients and weight gradients if every convolution ran once per step)."""
  cols = [k for k in rows[0] if k.endswith(' ms')] if rows else []
  return {k: sum(r.get(k, 0.0) * r['count'] for r in rows) for k in cols}


def _valid_conv_as_matmul(x, w):
  """A stride-1 valid NHWC/HWIO convolution as one matmul over its patches."""
  kh, kw, cin, cout = w.shape
  n, h, wd, _ = x.shape
  ho, wo = h - kh + 1, wd - kw + 1
  patches = jnp.concatenate([x[:, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)],
                            axis=-1)
  return jnp.dot(patches, w.reshape(kh * kw * cin, cout))


def fc6_shapes(size: int) -> tuple[tuple, tuple]:
  """(input, kernel) shapes of FCN-8s's fc6 for a ``size`` x ``size`` image."""
  (xs, ws, *_), = [k for k in model_convs('fcn8s', size) if k[1][:2] == (7, 7)]
  return xs, ws


def conv_vs_matmul(xs: tuple, ws: tuple, iters: int) -> dict:
  """A valid convolution of these shapes: XLA's convolution vs one matmul over patches."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
  w = jnp.asarray(0.01 * rng.standard_normal(ws), jnp.float32)
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), 'VALID',
                                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  dy = jnp.asarray(rng.standard_normal(jax.eval_shape(conv, x, w).shape), jnp.float32)
  out = {'input': xs, 'kernel': ws}
  results = {}
  for name, fn in (('convolution', conv), ('matmul over patches', _valid_conv_as_matmul)):
    grads = lambda x, w, dy, fn=fn: jax.vjp(fn, x, w)[1](dy)
    out[f'{name}: forward ms'] = timed(fn, x, w, iters=iters)
    out[f'{name}: forward + gradients ms'] = timed(grads, x, w, dy, iters=iters)
    results[name] = [np.asarray(jax.jit(fn)(x, w)), *map(np.asarray, jax.jit(grads)(x, w, dy))]
  for k, what in enumerate(('output', 'input gradient', 'weight gradient')):
    ref, new = results['convolution'][k], results['matmul over patches'][k]
    out[f'matmul vs convolution: {what}, relative difference'] = _relative(new, ref)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--size', type=int, default=128)
  p.add_argument('--channels', type=int, default=256)
  p.add_argument('--iters', type=int, default=3)
  p.add_argument('--model', default='', help='time each convolution of this model instead')
  p.add_argument('--torch_python', default='',
                 help='with --model: time the same convolutions in PyTorch eager too')
  p.add_argument('--fc6', action='store_true', help="time FCN-8s's fc6 as a matmul instead")
  a = p.parse_args(argv)
  hardware.set_cpu_xla_flags()  # the library's CPU defaults, as in benchmark.py
  if a.model:
    print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}, {a.model} at {a.size}x{a.size}')
    rows = conv_times_by_shape(a.model, a.size, a.iters)
    if a.torch_python:
      attach_torch_conv_times(rows, a.torch_python, a.iters)
    for r in rows:
      print(' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                     for k, v in r.items() if k != 'key'))
    print('all convolutions x count, ms: ' + ', '.join(
        f'{k.removesuffix(" ms")} {v:.0f}' for k, v in totals(rows).items()))
    return
  if a.fc6:
    print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}, fc6 at {a.size}x{a.size}')
    results = conv_vs_matmul(*fc6_shapes(a.size), a.iters)
  else:
    print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}, '
          f'1x{a.size}x{a.size}x{a.channels} float32')
    results = run(a.size, a.channels, a.iters)
  for k, v in results.items():
    print(f'{k:<60s} {v:.4g}' if isinstance(v, float) else f'{k:<60s} {v}')


if __name__ == '__main__':
  main()
