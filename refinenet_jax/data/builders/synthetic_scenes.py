"""The built-in dataset: procedural scenes (``refinenet_jax.data.synthetic``), no files needed.

Examples are generated from (seed, index) alone, so a build is reproducible byte for byte and
the README's main job never needs downloaded data.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from refinenet_jax.data import synthetic
from refinenet_jax.data.builders import base


@dataclasses.dataclass(kw_only=True)
class SyntheticScenesConfig(tfds.core.BuilderConfig):
  name: str = ''  # derived from the fields below when empty
  image_size: int = 64
  num_train: int = 2000
  num_val: int = 500
  seed: int = 0

  def __post_init__(self):
    if not self.name:  # the config name is the folder under data_dir: make it say everything
      self.name = f'{self.image_size}px_{self.num_train}_{self.num_val}_seed{self.seed}'


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


class SyntheticScenes(base.SegmentationBuilder, skip_registration=True):
  """Textured shapes (disk, rectangle, triangle, ring) on textured, cluttered backgrounds."""
  name = 'synthetic_scenes'
  CLASS_NAMES = synthetic.CLASS_NAMES
  PALETTE = synthetic.PALETTE
  BUILDER_CONFIGS = [SyntheticScenesConfig()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = None

  @classmethod
  def from_run_config(cls, config):
    return SyntheticScenesConfig(image_size=config.image_size, num_train=config.num_train,
                                 num_val=config.num_val, seed=config.data_seed), None

  def _examples(self, root):
    cfg = self.builder_config
    size = (cfg.image_size, cfg.image_size)
    # val uses seed + 1: a disjoint stream, not a slice of train
    return {split: self._split(n, size, cfg.seed + offset)
            for split, n, offset in (('train', cfg.num_train, 0), ('val', cfg.num_val, 1))}

  @staticmethod
  def _split(n, size, seed):
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
      image, label = synthetic.scene(np.random.default_rng(child), size)
      yield base.Example(f'{i:06d}', _png(image), lambda label=label: label)
