"""grain input pipelines over TFDS data sources: numpy batches ``{'image', 'label', 'mask'}``.

Images stay uint8 (4x less host-to-device traffic); the model's normalisation is applied on
device, and only its mean pixel is used here, to pad. Every process reads its own slice of the
examples (``process_index::process_count``) and yields its share of the global batch.

Training: shuffled, repeated (a new order each epoch), randomly augmented; the random draws of
example ``i`` depend only on (seed, i), so results do not depend on thread count, and the
iterator's ``get_state()`` restores exactly. Evaluation: every example exactly once, in order,
padded to a fixed bucket; the last batches are filled with blank examples whose mask is False.
"""
from __future__ import annotations

import math
from typing import Sequence

import grain
import numpy as np

from refinenet_jax.data import transforms


class _Augment(grain.transforms.RandomMap):

  def __init__(self, augment: transforms.TrainAugment):
    self.augment = augment

  def random_map(self, element, rng: np.random.Generator):
    return self.augment(element, rng)


def _check_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by the '
                     f'{process_count} processes')
  return global_batch_size // process_count


def train_dataset(source: Sequence[dict], *, global_batch_size: int, crop_size: Sequence[int],
                  seed: int, scale_range: Sequence[float] = (0.7, 1.3), flip: bool = True,
                  fill: Sequence[int] = (124, 116, 104), ignore_label: int = 255,
                  process_index: int = 0, process_count: int = 1,
                  num_threads: int = 2, prefetch: int = 4) -> grain.IterDataset:
  """Infinite training batches; ``iter(ds)`` gives a checkpointable ``grain.DatasetIterator``."""
  batch = _check_batch(global_batch_size, process_count)
  augment = transforms.TrainAugment(crop_size=tuple(crop_size), scale_range=tuple(scale_range),
                                    flip=flip, fill=tuple(fill), ignore_label=ignore_label)
  ds = grain.MapDataset.source(source)
  if len(ds) < process_count:
    raise ValueError(f'{len(ds)} examples cannot be split over {process_count} processes')
  ds = ds[process_index::process_count]
  ds = ds.seed(seed).shuffle().repeat().random_map(_Augment(augment))
  ds = ds.batch(batch, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch))


def eval_num_batches(num_examples: int, global_batch_size: int, process_count: int = 1) -> int:
  per_process = math.ceil(num_examples / process_count)
  return math.ceil(per_process / _check_batch(global_batch_size, process_count))


def eval_dataset(source: Sequence[dict], *, global_batch_size: int, eval_size: Sequence[int],
                 fill: Sequence[int] = (124, 116, 104), ignore_label: int = 255,
                 process_index: int = 0, process_count: int = 1,
                 num_threads: int = 2) -> grain.IterDataset:
  """One pass over all examples; every process yields the same number of batches."""
  batch = _check_batch(global_batch_size, process_count)
  pad = transforms.EvalPad(size=tuple(eval_size), fill=tuple(fill), ignore_label=ignore_label)
  n = len(source)
  n_local = eval_num_batches(n, global_batch_size, process_count) * batch

  def load(k):
    i = process_index + k * process_count  # global example index of local position k
    return pad(source[i]) if i < n else pad.blank()

  ds = grain.MapDataset.range(n_local).map(load).batch(batch)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads))


def bucket_for(sizes: Sequence[Sequence[int]], multiple: int = 32) -> tuple[int, int]:
  """The smallest (h, w), multiples of ``multiple``, holding every (h, w) of ``sizes``."""
  h = max((s[0] for s in sizes), default=0)
  w = max((s[1] for s in sizes), default=0)
  return (-(-h // multiple) * multiple, -(-w // multiple) * multiple)
