"""Per-example transforms on numpy arrays (OpenCV for resizing): no jax, no grain.

Examples are dicts ``{'image': uint8 [H, W, 3], 'label': uint8 [H, W], 'mask': bool [H, W]}``;
``mask`` marks pixels that come from the image (False on padding), so a consumer never has to
guess which pixels are real.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import cv2
import numpy as np

from refinenet_jax.models.preprocessing import NORMALIZATIONS

# Decoding in the data threads and resizing in OpenCV's own pool would oversubscribe 2 cores.
cv2.setNumThreads(1)


def fill_value(normalization: str) -> tuple[int, int, int]:
  """The model's mean pixel (RGB, 0..255): image padding that normalises to ~0."""
  order, mean, _ = NORMALIZATIONS[normalization]
  mean = mean[::-1] if order == 'bgr' else mean
  return tuple(int(round(m)) for m in mean)


def from_source(example: dict) -> dict:
  """A decoded TFDS example -> the canonical dict (labels lose their channel axis)."""
  image, label = example['image'], example['label']
  if label.ndim == 3:
    label = label[..., 0]
  return {'image': image, 'label': label, 'mask': np.ones(label.shape, bool)}


def rescale(ex: dict, scale: float) -> dict:
  """Bilinear image, nearest label and mask (no label is ever interpolated)."""
  h, w = ex['label'].shape
  nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  if (nh, nw) == (h, w):
    return ex
  return {'image': cv2.resize(ex['image'], (nw, nh), interpolation=cv2.INTER_LINEAR),
          'label': cv2.resize(ex['label'], (nw, nh), interpolation=cv2.INTER_NEAREST),
          'mask': cv2.resize(ex['mask'].view(np.uint8), (nw, nh),
                             interpolation=cv2.INTER_NEAREST).view(bool)}


def pad_to(ex: dict, size: Sequence[int], fill: Sequence[int], ignore_label: int) -> dict:
  """Pads bottom/right to at least ``size``: image with ``fill``, label with ignore, mask False."""
  h, w = ex['label'].shape
  ph, pw = max(0, size[0] - h), max(0, size[1] - w)
  if not ph and not pw:
    return ex
  pad = ((0, ph), (0, pw))
  image = np.empty((h + ph, w + pw, 3), np.uint8)
  image[:] = np.asarray(fill, np.uint8)
  image[:h, :w] = ex['image']
  return {'image': image,
          'label': np.pad(ex['label'], pad, constant_values=ignore_label),
          'mask': np.pad(ex['mask'], pad, constant_values=False)}


def crop(ex: dict, top: int, left: int, size: Sequence[int]) -> dict:
  sl = (slice(top, top + size[0]), slice(left, left + size[1]))
  return {k: v[sl] for k, v in ex.items()}


def hflip(ex: dict) -> dict:
  return {k: v[:, ::-1] for k, v in ex.items()}


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """Random scale -> pad (mean / ignore) -> random crop -> horizontal flip (the RefineNet recipe).

  The scale is drawn uniformly from ``scale_range``; ``scale_range=(1, 1)`` and ``flip=False``
  leave only the crop.
  """
  crop_size: tuple[int, int]
  scale_range: tuple[float, float] = (0.7, 1.3)
  flip: bool = True
  fill: tuple[int, int, int] = (124, 116, 104)
  ignore_label: int = 255

  def __post_init__(self):
    lo, hi = self.scale_range
    if not 0 < lo <= hi:
      raise ValueError(f'scale_range must satisfy 0 < low <= high, got {self.scale_range}')

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    ex = from_source(example)
    lo, hi = self.scale_range
    ex = rescale(ex, rng.uniform(lo, hi))
    ex = pad_to(ex, self.crop_size, self.fill, self.ignore_label)
    h, w = ex['label'].shape
    top = int(rng.integers(0, h - self.crop_size[0] + 1))
    left = int(rng.integers(0, w - self.crop_size[1] + 1))
    ex = crop(ex, top, left, self.crop_size)
    if rng.random() < 0.5 and self.flip:  # drawn even when off: same crops either way
      ex = hflip(ex)
    return {k: np.ascontiguousarray(v) for k, v in ex.items()}


@dataclasses.dataclass(frozen=True)
class EvalPad:
  """Whole image padded to a fixed bucket; refuses images larger than the bucket (no crop)."""
  size: tuple[int, int]
  fill: tuple[int, int, int] = (124, 116, 104)
  ignore_label: int = 255

  def __call__(self, example: dict) -> dict:
    ex = from_source(example)
    h, w = ex['label'].shape
    if h > self.size[0] or w > self.size[1]:
      name = example.get('name', b'?')
      name = name.decode() if isinstance(name, bytes) else name
      raise ValueError(f'eval image {name!r} is {h}x{w}, larger than the eval bucket '
                       f'{self.size[0]}x{self.size[1]}; raise eval_size')
    return pad_to(ex, self.size, self.fill, self.ignore_label)

  def blank(self) -> dict:
    """A padding example: counts for nothing (mask all False)."""
    return {'image': np.zeros((*self.size, 3), np.uint8),
            'label': np.full(self.size, self.ignore_label, np.uint8),
            'mask': np.zeros(self.size, bool)}
