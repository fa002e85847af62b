"""Test-time segmentation: multi-scale, flip and sliding-window averaging of softmax maps.

Everything here is a pure function of static shapes, so a whole evaluation step (model included)
can sit under one ``jax.jit``; the Python loops run over static scale lists and window grids.
The model is any ``logits_fn(images) -> logits`` taking float32 0..255 RGB (N, h, w, 3) and
returning (N, h', w', C) logits at any resolution.
"""
from __future__ import annotations

import fractions
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refinenet_jax.data import transforms
from refinenet_jax.models.layers import is_static, resize_bilinear

# Official RefineNet multi-scale test (demo_predict_mscale_*.m + fuse_multiscale_results.m):
# one prediction per scale, fused with equal weights.
OFFICIAL_SCALES = (0.4, 0.6, 0.8, 1.0, 1.2)

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]


def settings(config, normalization: str, window=None) -> dict:
  """``predict_labels``' keywords from a run config's eval keys (evaluation, training's panels
  and predict alike); ``window`` (the trainer's resolved one) overrides ``config.eval_window``.
  Padding is the model's mean pixel (``normalization``), which normalises to ~0."""
  window = window or tuple(config.eval_window) or None
  return dict(scales=tuple(config.eval_scales), flip=config.eval_flip, window=window,
              stride=tuple(config.eval_stride) or None,
              pad_value=tuple(float(f) for f in transforms.fill_value(normalization)))


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
  """Round half up (MATLAB ``round``), not Python's half-to-even, so sizes match the official
  code; never below 1 pixel. Symbolic sizes (``jax.export``) round the exact fraction."""
  if is_static(*size):
    return tuple(max(1, int(math.floor(s * scale + 0.5))) for s in size)
  q = fractions.Fraction(scale).limit_denominator(10**6)
  return tuple(jax.core.max_dim(1, (2 * s * q.numerator + q.denominator) // (2 * q.denominator))
               for s in size)


def window_starts(size: int, window: int, stride: int) -> list[int]:
  """Top-left offsets 0, stride, 2*stride, ... plus a last window flush with the far edge.

  The flush window covers the remainder without running past the image (so no window sees
  padding unless the image is smaller than the window, where the only start is 0).
  """
  if window < 1 or stride < 1:
    raise ValueError(f'window and stride must be >= 1, got {window}, {stride}')
  if stride > window:
    raise ValueError(f'stride {stride} > window {window} would leave pixels uncovered')
  if size <= window:
    return [0]
  return list(range(0, size - window, stride)) + [size - window]


def _default_stride(window: Sequence[int]) -> tuple[int, int]:
  return tuple(max(1, int(math.floor(w * 2 / 3 + 0.5))) for w in window)


def _probs_at(logits: jnp.ndarray, size: Sequence[int], resize_mode: str) -> jnp.ndarray:
  """Softmax of logits interpolated to ``size``.

  Interpolating logits rather than probabilities matches the official fusion, which resizes
  score maps in log space (softmax only renormalises that per pixel).
  """
  logits = resize_bilinear(logits.astype(jnp.float32), size, resize_mode)
  return jax.nn.softmax(logits, axis=-1)


def _windowed_probs(logits_fn: LogitsFn, x: jnp.ndarray, window: Sequence[int],
                    stride: Sequence[int], pad_value, resize_mode: str, window_batch: int = 1,
                    place: Callable | None = None) -> jnp.ndarray:
  """Class probabilities at x's own size, averaged over overlapping windows.

  All windows go through one ``lax.map``, so the model is traced once however many windows
  there are, and only one group of ``window_batch`` windows (per image) is live at a time; the
  last group is filled up with blank windows. ``place`` lays out each group's batch (the
  windows spread over the devices: ``sharding.window_placement``).
  """
  n, h, w, ch = x.shape
  wh, ww = window
  ph, pw = max(h, wh), max(w, ww)
  if (ph, pw) != (h, w):
    # Smaller than the window: pad bottom/right (with the mean pixel, say) and crop back later.
    base = jnp.broadcast_to(jnp.asarray(pad_value, x.dtype), (n, ph, pw, ch))
    x = base.at[:, :h, :w].set(x)
  ys, xs = window_starts(ph, wh, stride[0]), window_starts(pw, ww, stride[1])
  corners = [(y0, x0) for y0 in ys for x0 in xs]
  tiles = jnp.stack([x[:, y0:y0 + wh, x0:x0 + ww] for y0, x0 in corners])
  k, g = len(corners), max(1, int(window_batch))
  groups = -(-k // g)
  if groups * g > k:
    tiles = jax.lax.concatenate([tiles, jnp.zeros((groups * g - k, *tiles.shape[1:]),
                                                  tiles.dtype)], 0)
  tiles = tiles.reshape(groups, g * n, wh, ww, ch)  # a group's rows: window-major, then image
  if place is not None:
    tiles = place(tiles)
  logits = jax.lax.map(logits_fn, tiles) if groups > 1 else logits_fn(tiles[0])[None]
  lh, lw, c = logits.shape[2:]
  logits = logits.reshape(groups * g, n, lh, lw, c)[:k]
  probs = _probs_at(logits.reshape(k * n, lh, lw, c), (wh, ww), resize_mode)
  probs = probs.reshape(k, n, wh, ww, c)
  acc = jnp.zeros((n, ph, pw, c), jnp.float32)
  count = np.zeros((ph, pw), np.float32)  # static: the grid is known at trace time
  for i, (y0, x0) in enumerate(corners):
    acc = acc.at[:, y0:y0 + wh, x0:x0 + ww].add(probs[i])
    count[y0:y0 + wh, x0:x0 + ww] += 1
  return (acc / count[None, :, :, None])[:, :h, :w]


def predict_probs(logits_fn: LogitsFn, images: jnp.ndarray, *,
                  out_size: Sequence[int] | None = None,
                  scales: Sequence[float] = (1.0,), flip: bool = False,
                  resize_mode: str = 'half_pixel',
                  window: Sequence[int] | None = None, stride: Sequence[int] | None = None,
                  pad_value: float | Sequence[float] = 0.0, window_batch: int = 1,
                  place: Callable | None = None) -> jnp.ndarray:
  """(N, *out_size, C) float32 class probabilities, the equal-weight mean over scales x flips.

  Per scale the images are resized to ``scaled_size``; without ``window`` the logits go straight
  to ``out_size`` and through a softmax. With ``window=(wh, ww)`` the scaled image is tiled
  (``stride`` defaults to 2/3 of the window) and the per-window softmax maps are averaged at the
  scaled size, then resized to ``out_size``: this keeps test inputs at the training crop size.
  ``window_batch`` windows go through the model at a time, laid out by ``place`` (predict spreads
  one large image's windows over every device: ``sharding.window_placement``).
  ``flip`` adds the horizontally mirrored input (run in the same batch) and mirrors its map back.
  ``out_size`` defaults to the input size.
  """
  if not scales:
    raise ValueError('scales must not be empty')
  if any(s <= 0 for s in scales):
    raise ValueError(f'scales must be positive, got {tuple(scales)}')
  images = jnp.asarray(images, jnp.float32)
  n, h, w = images.shape[:3]
  out_size = (h, w) if out_size is None else tuple(out_size)
  if window is not None:
    window = tuple(int(v) for v in window)
    stride = _default_stride(window) if stride is None else tuple(int(v) for v in stride)
    for size, st in zip(window, stride):  # fail at trace time, not on the first big image
      window_starts(size + 1, size, st)
  total = None
  for s in scales:
    size = scaled_size((h, w), s)
    x = images if size == (h, w) else resize_bilinear(images, size, resize_mode)
    if flip:
      x = jax.lax.concatenate([x, jax.lax.rev(x, (2,))], 0)
    if window is None:
      probs = _probs_at(logits_fn(x), out_size, resize_mode)
    else:
      probs = _windowed_probs(logits_fn, x, window, stride, pad_value, resize_mode,
                              window_batch, place)
      probs = resize_bilinear(probs, out_size, resize_mode)
    if flip:
      probs = (jax.lax.slice_in_dim(probs, 0, n)
               + jax.lax.rev(jax.lax.slice_in_dim(probs, n, 2 * n), (2,)))
    total = probs if total is None else total + probs
  return total / (len(scales) * (2 if flip else 1))


def predict_labels(logits_fn: LogitsFn, images: jnp.ndarray, **kwargs) -> jnp.ndarray:
  """(N, *out_size) int32 argmax of :func:`predict_probs` (same keyword arguments)."""
  return jnp.argmax(predict_probs(logits_fn, images, **kwargs), axis=-1).astype(jnp.int32)
