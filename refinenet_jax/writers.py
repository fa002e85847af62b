"""Metrics to a JSON-lines log and TensorBoard (tensorboardX: event files without TensorFlow).

Only process 0 writes; on the other processes every call is a no-op.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np


class MetricWriter:

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if self.active and tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: only the writer needs it
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def scalars(self, step: int, values: dict) -> None:
    if not self.active:
      return
    clean = {k: float(v) for k, v in values.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **clean}) + '\n')
    if self.tb is not None:
      for k, v in clean.items():
        self.tb.add_scalar(k, v, step)

  def images(self, step: int, images: dict) -> None:
    """name -> uint8 (H, W, 3) image."""
    if self.tb is not None:
      for k, v in images.items():
        self.tb.add_image(k, np.asarray(v), step, dataformats='HWC')

  def flush(self) -> None:
    if self.tb is not None:
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Colour-coded mask blended over the image (uint8 RGB)."""
  return np.round(image * (1 - alpha) + colours * alpha).astype(np.uint8)


def prediction_panel(image, label, pred, palette, ignore_label: int = 255) -> np.ndarray:
  """image | ground truth | prediction, side by side; void shown black."""
  pal = np.zeros((256, 3), np.uint8)
  pal[:len(palette)] = palette
  pal[ignore_label] = 0
  return np.concatenate([image, pal[label], pal[pred]], axis=1)
