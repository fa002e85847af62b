"""Build a dataset once, offline, and print what was built.

  python -m refinenet_jax.data camvid --manual_dir=/data/CamVid [--data_dir=~/tensorflow_datasets]
  python -m refinenet_jax.data voc2012 --config=aug --manual_dir=/data/voc
  python -m refinenet_jax.data folder --root=/data/buildings --name=buildings
  python -m refinenet_jax.data --list
"""
from __future__ import annotations

import argparse
import os
import sys

import tensorflow_datasets as tfds

from refinenet_jax.data import datasets
from refinenet_jax.data.builders.base import DatasetError
from refinenet_jax.data.builders.folder import FolderConfig


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m refinenet_jax.data', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('dataset', nargs='?', help=f'one of {datasets.list_datasets()}')
  p.add_argument('--data_dir', default=None, help='where built datasets live')
  p.add_argument('--manual_dir', default=None, help='the extracted official archives')
  p.add_argument('--config', default=None, help="builder config, e.g. voc2012 'aug'")
  p.add_argument('--root', default=None, help='folder dataset: its root')
  p.add_argument('--name', default=None,
                 help='folder dataset: its name (build folder <name>-<hash of the root>)')
  p.add_argument('--list', action='store_true', help='list datasets and their layouts')
  a = p.parse_args(argv)
  if a.list or not a.dataset:
    for name in datasets.list_datasets():
      cls = datasets.BUILDERS[name]
      print(f'{name}: {len(cls.CLASS_NAMES) or "from classes.txt"} classes\n'
            f'{cls.MANUAL_DOWNLOAD_INSTRUCTIONS or (cls.__doc__ or "").strip()}\n')
    return 0
  tfds.disable_progress_bar()
  config = a.config
  if a.dataset == 'folder':
    if not a.root:
      p.error('folder needs --root (and optionally --name)')
    config = FolderConfig(name=a.name or os.path.basename(os.path.normpath(a.root)), root=a.root)
  try:
    builder = datasets.prepare(a.dataset, a.data_dir, a.manual_dir, config=config)
  except (DatasetError, ValueError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  info = datasets.info(builder)
  print(f'{info.name} in {builder.data_path}: {info.num_classes} classes, '
        f'ignore {info.ignore_label}')
  for split, split_info in builder.info.splits.items():
    print(f'  {split}: {split_info.num_examples} examples')
  return 0


if __name__ == '__main__':
  sys.exit(main())
