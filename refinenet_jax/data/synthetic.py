"""Procedural segmentation scenes: textured shapes on cluttered backgrounds.

Built so that no single cue suffices: every object gets two random colours, so colour says
nothing about the class; each class has its own texture *and* shape; the background is a smooth
random colour field with a soft grating, mid-frequency colour noise, random strokes and blobs;
objects vary in size and later ones occlude earlier ones. Image i of a
seed depends only on (seed, i), so a smaller ``num_images`` gives a prefix of the same set.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

CLASS_NAMES = ('background', 'disk', 'rectangle', 'triangle', 'ring')
# Display colours per class (not the colours objects are drawn in; those are random).
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200]],
                   np.uint8)
NUM_CLASSES = len(CLASS_NAMES)


def _smooth_field(rng, h, w, cells, channels):
  """Bilinearly upsampled (cells x cells) random grid: low-frequency colour variation."""
  grid = rng.random((cells, cells, channels))
  ys = np.linspace(0, cells - 1, h)
  xs = np.linspace(0, cells - 1, w)
  y0 = np.minimum(ys.astype(int), cells - 2)
  x0 = np.minimum(xs.astype(int), cells - 2)
  fy = (ys - y0)[:, None, None]
  fx = (xs - x0)[None, :, None]
  g00 = grid[y0][:, x0]
  g01 = grid[y0][:, x0 + 1]
  g10 = grid[y0 + 1][:, x0]
  g11 = grid[y0 + 1][:, x0 + 1]
  return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx)
          + g11 * fy * fx)


def _two_colours(rng):
  """Two random RGB colours far enough apart that the texture is visible."""
  while True:
    c = rng.uniform(0, 255, (2, 3))
    if np.linalg.norm(c[0] - c[1]) > 100:
      return c


def _rotate(yy, xx, cy, cx, angle):
  u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
  v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
  return u, v


def _shape_mask(rng, cls, yy, xx, cy, cx, r):
  angle = rng.uniform(0, 2 * np.pi)
  if cls == 1:  # disk
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
  if cls == 2:  # rotated rectangle
    u, v = _rotate(yy, xx, cy, cx, angle)
    a, b = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.45, 0.9)
    return (np.abs(u) <= a) & (np.abs(v) <= b)
  if cls == 3:  # triangle with jittered vertices
    t = angle + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
    py, px = cy + 1.15 * r * np.sin(t), cx + 1.15 * r * np.cos(t)
    side = [(px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i])
            for i, j in ((0, 1), (1, 2), (2, 0))]
    return ((side[0] >= 0) & (side[1] >= 0) & (side[2] >= 0)) | (
        (side[0] <= 0) & (side[1] <= 0) & (side[2] <= 0))
  if cls == 4:  # ring
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    return (d2 <= r ** 2) & (d2 >= (r * rng.uniform(0.4, 0.55)) ** 2)
  raise ValueError(f'unknown object class {cls}')


def _texture(rng, cls, yy, xx):
  """Class-specific pattern in [0, 1] (which of the object's two colours), random geometry."""
  angle = rng.uniform(0, np.pi)
  u, v = _rotate(yy, xx, rng.uniform(0, 8), rng.uniform(0, 8), angle)
  if cls == 1:  # stripes
    return (np.sin(2 * np.pi * u / rng.uniform(5, 8)) > 0).astype(np.float64)
  if cls == 2:  # checkerboard
    cell = rng.uniform(3.5, 5.5)
    return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float64)
  if cls == 3:  # polka dots
    s = rng.uniform(6, 8)
    du, dv = u - s * np.round(u / s), v - s * np.round(v / s)
    return (du ** 2 + dv ** 2 <= (0.32 * s) ** 2).astype(np.float64)
  if cls == 4:  # blocky binary noise
    h, w = yy.shape
    return rng.random(((h + 1) // 2, (w + 1) // 2)).round().repeat(2, 0).repeat(2, 1)[:h, :w]
  raise ValueError(f'unknown object class {cls}')


def _scene(rng, h, w, num_classes):
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  img = 40 + 175 * _smooth_field(rng, h, w, 4, 3)
  # background texture: a soft grating and a mid-frequency colour field, lower contrast than
  # the objects' binary textures, so "textured" alone does not mean "object"
  u, _ = _rotate(yy, xx, 0.0, 0.0, rng.uniform(0, np.pi))
  img += rng.uniform(8, 20) * np.sin(2 * np.pi * u / rng.uniform(4, 12))[..., None]
  img += 50 * (_smooth_field(rng, h, w, max(2, min(h, w) // 6), 3) - 0.5)
  # clutter: random strokes and soft blobs, part of the background
  for _ in range(rng.integers(2, 7)):
    colour = rng.uniform(0, 255, 3)
    if rng.random() < 0.5:
      u, v = _rotate(yy, xx, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, np.pi))
      m = (np.abs(v) <= rng.uniform(0.5, 1.5)) & (np.abs(u) <= rng.uniform(5, max(h, w)))
      img[m] = colour
    else:
      d2 = (yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2
      alpha = 0.7 * np.exp(-d2 / (2 * rng.uniform(2, 0.12 * min(h, w)) ** 2))[..., None]
      img = img * (1 - alpha) + colour * alpha
  label = np.zeros((h, w), np.uint8)
  size = min(h, w)
  for _ in range(rng.integers(2, 6)):
    cls = int(rng.integers(1, num_classes))
    r = size * rng.uniform(0.14, 0.32)
    cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
    m = _shape_mask(rng, cls, yy, xx, cy, cx, r)
    c = _two_colours(rng)
    t = _texture(rng, cls, yy, xx)[..., None]
    img[m] = (c[0] * (1 - t) + c[1] * t)[m]
    label[m] = cls
  img += rng.normal(0, 6, img.shape)
  return np.clip(np.round(img), 0, 255).astype(np.uint8), label


def make_synthetic_scenes(num_images: int, image_size: Sequence[int] = (64, 64),
                          num_classes: int = NUM_CLASSES, seed: int = 0):
  """Returns (images uint8 [N, H, W, 3], labels uint8 [N, H, W]); class 0 is background.

  ``num_classes`` < 5 keeps the first object classes of ``CLASS_NAMES``.
  """
  if not 2 <= num_classes <= NUM_CLASSES:
    raise ValueError(f'num_classes must be in [2, {NUM_CLASSES}], got {num_classes}')
  h, w = int(image_size[0]), int(image_size[1])
  images = np.zeros((num_images, h, w, 3), np.uint8)
  labels = np.zeros((num_images, h, w), np.uint8)
  for i, child in enumerate(np.random.SeedSequence(seed).spawn(num_images)):
    images[i], labels[i] = scene(np.random.default_rng(child), (h, w), num_classes)
  return images, labels


def scene(rng: np.random.Generator, size: Sequence[int], num_classes: int = NUM_CLASSES):
  """One (image uint8 [H, W, 3], label uint8 [H, W]) drawn from ``rng``."""
  return _scene(rng, int(size[0]), int(size[1]), num_classes)


def colorize(labels) -> np.ndarray:
  """Label map -> RGB for viewing."""
  return PALETTE[np.asarray(labels)]


def colour_rule_predict(train_images, train_labels, images, levels: int = 8,
                        num_classes: int = NUM_CLASSES) -> np.ndarray:
  """The best per-pixel colour rule: each quantised RGB colour -> its most frequent train class.

  The dataset is meant to defeat this rule (objects take random colours); its score is the floor
  a segmentation model must clear to show it uses shape and texture.
  """
  def bins(x):
    q = (np.asarray(x, np.int64) * levels) // 256
    return (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]

  counts = np.zeros((levels ** 3, num_classes), np.int64)
  np.add.at(counts, (bins(train_images).ravel(), np.asarray(train_labels).ravel()), 1)
  return counts.argmax(1)[bins(images)].astype(np.uint8)
