"""The dataset table: name -> TFDS builder class, and how to build and read one offline.

Builders are not in the tfds catalog (see ``builders.base``); these functions are the entry
points. ``prepare`` never touches the network: GCS lookup is off and the real datasets read only
``manual_dir``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from PIL import Image

from refinenet_jax.data.builders import (ade20k, base, camvid, cityscapes, folder, nyudv2_40,
                                         pascal_context, person_part, sun_rgbd, synthetic_scenes,
                                         voc2012)

BUILDERS: dict[str, type[base.SegmentationBuilder]] = {
    'synthetic_scenes': synthetic_scenes.SyntheticScenes,  # built-in, generated
    'camvid': camvid.Camvid,
    'voc2012': voc2012.Voc2012,  # configs 'plain' (default) and 'aug' (+SBD: train_aug)
    'cityscapes': cityscapes.Cityscapes,
    'ade20k': ade20k.Ade20k,
    'nyudv2_40': nyudv2_40.Nyudv240,
    'sun_rgbd': sun_rgbd.SunRgbd,
    'pascal_context': pascal_context.PascalContext,
    'person_part': person_part.PersonPart,
    'folder': folder.Folder,  # your own data: config=folder.FolderConfig(name=..., root=...)
}

DEFAULT_DATA_DIR = os.path.join('~', 'tensorflow_datasets')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  ignore_label: int
  class_names: tuple[str, ...]
  palette: np.ndarray
  splits: tuple[str, ...]


def list_datasets() -> list[str]:
  return sorted(BUILDERS)


def get_builder(name: str, data_dir: str | None = None, config=None,
                **kwargs) -> base.SegmentationBuilder:
  """A builder instance. ``config`` is a builder-config name or object (e.g. voc2012 'aug')."""
  if name not in BUILDERS:
    raise KeyError(f'unknown dataset {name!r}; known: {list_datasets()}')
  cls = BUILDERS[name]
  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  if isinstance(config, tfds.core.BuilderConfig):
    # tfds refuses a config object named like a predefined one: pass the name when they agree
    for known in cls.BUILDER_CONFIGS:
      if known.name == config.name:
        if known != config:
          raise ValueError(f'{name}: config {config} differs from the predefined {known}')
        config = known.name
  if config is not None:
    kwargs['config'] = config
  return cls(data_dir=data_dir, **kwargs)


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None, config=None,
            **kwargs) -> base.SegmentationBuilder:
  """Builds the dataset once and returns its builder.

  A build made from a folder (``manual_dir``, or a folder dataset's root) is reused only while
  that folder is the one it was built from and its files are unchanged (``base.source_record``);
  otherwise its build directory is deleted and rebuilt, saying why on one line. Without
  ``manual_dir`` a manual dataset's existing build is used as it is.
  """
  builder = get_builder(name, data_dir, config, **kwargs)
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS is not None and manual_dir is None:
    if not builder.is_prepared():
      raise ValueError(f'{name} is not built in {builder.data_dir}; pass manual_dir=<folder with '
                       f'the extracted archives>:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
  root = builder.source_root(manual_dir)
  if root is not None and builder.is_prepared():
    base.require_dir(root, f'source folder of {name}')  # a wrong path must not delete a build
    change = base.source_change(base.read_source_record(builder.data_path),
                                base.source_record(root, exclude=builder.data_dir_root))
    if change:
      print(f'{name}: {change}: rebuilding {builder.data_path}')
      shutil.rmtree(builder.data_path)  # the version directory tfds wrote for this build only
      builder = get_builder(name, data_dir, config, **kwargs)  # not the old build's cached info
  download_config = tfds.download.DownloadConfig(
      manual_dir=os.path.abspath(os.path.expanduser(manual_dir)) if manual_dir else None,
      try_download_gcs=False)
  if builder.is_prepared():
    return builder
  if absl_logging.get_verbosity() < absl_logging.INFO:  # quiet (console.py): one line, not tfds'
    print(f'{name}: writing {builder.data_path} (once)', flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_config=download_config)
  else:
    builder.download_and_prepare(download_config=download_config)
  return builder


def prepare_for(config, build: bool = True) -> base.SegmentationBuilder:
  """The builder a run config names (``config.dataset``, its builder's ``from_run_config``),
  built unless ``build`` is False (a multi-host job's other processes open process 0's build)."""
  if config.dataset not in BUILDERS:
    raise KeyError(f'unknown dataset {config.dataset!r}; known: {list_datasets()}')
  builder_config, manual_dir = BUILDERS[config.dataset].from_run_config(config)
  return prepare(config.dataset, config.data_dir or None, manual_dir if build else None,
                 config=builder_config)


def info(builder: base.SegmentationBuilder) -> DatasetInfo:
  return DatasetInfo(name=builder.name, num_classes=len(builder.class_names),
                     ignore_label=int(builder.IGNORE_LABEL),
                     class_names=tuple(builder.class_names), palette=builder.palette,
                     splits=tuple(builder.info.splits.keys()))


def data_source(builder: base.SegmentationBuilder, split: str) -> Sequence[dict]:
  """Random-access examples ``{'image', 'label', 'name'}`` (what ``tfds.data_source`` returns)."""
  if split not in builder.info.splits:
    raise KeyError(f'{builder.name} has no split {split!r}; it has {list(builder.info.splits)}')
  return builder.as_data_source(split)


def image_sizes(builder: base.SegmentationBuilder, split: str) -> list[tuple[str, int, int]]:
  """(name, height, width) of every example in order, from the stored label PNGs' headers.

  Reads each record but decodes no pixels: the eval settings are checked before training at the
  cost of one pass over the split's bytes.
  """
  data_source(builder, split)  # the missing-split message
  skip = tfds.decode.SkipDecoding()
  src = builder.as_data_source(split, decoders={'image': skip, 'label': skip})
  out = []
  for i in range(len(src)):
    ex = src[i]
    with Image.open(io.BytesIO(ex['label'])) as im:
      w, h = im.size
    name = ex['name']
    out.append((name.decode() if isinstance(name, bytes) else str(name), h, w))
  return out
