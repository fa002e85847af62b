"""PASCAL-Person-Part (Chen et al. 2014): 6 body parts + background on VOC2010 images.

Data: ``pascal_person_part.tar.gz`` as used by DeepLab and light-weight-refinenet (part masks
converted from the Chen et al. annotations): ``JPEGImages/<id>.jpg``,
``pascal_person_part_gt/<id>.png`` (palette PNG of indices 0..6, 255 = void) and the lists
``pascal_person_part_trainval_list/{train_id,val_id}.txt`` (1717 / 1818 ids). List rows may be
``<id>`` or ``<image path> <mask path>`` (ids are the image file's stem).
"""
from __future__ import annotations

import os

from refinenet_jax.data.builders import base

CLASS_NAMES = ('background', 'head', 'torso', 'upper_arm', 'lower_arm', 'upper_leg', 'lower_leg')


class PersonPart(base.SegmentationBuilder, skip_registration=True):
  """PASCAL-Person-Part: 1717 train / 1818 val images, 7 classes."""
  name = 'person_part'
  CLASS_NAMES = CLASS_NAMES
  PALETTE = base.default_palette(7)
  HOMEPAGE = 'http://roozbehm.info/pascal-parts/pascal-parts.html'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Extract pascal_person_part.tar.gz so that manual_dir (or manual_dir/pascal_person_part)
  contains JPEGImages/<id>.jpg, pascal_person_part_gt/<id>.png and
  pascal_person_part_trainval_list/{train_id,val_id}.txt.
  """

  def _examples(self, root):
    nested = os.path.join(root, 'pascal_person_part')
    if not os.path.isdir(os.path.join(root, 'JPEGImages')) and os.path.isdir(nested):
      root = nested
    splits = {}
    for split in self.SPLITS:
      list_file = os.path.join(root, 'pascal_person_part_trainval_list', f'{split}_id.txt')
      examples = []
      for row in base.read_list(list_file):
        if len(row) not in (1, 2):
          raise base.DatasetError(
              f'{list_file}: expected "<id>" or "<image> <mask>" rows, got {row}')
        i = os.path.splitext(os.path.basename(row[0]))[0]
        examples.append(base.Example(i, os.path.join(root, 'JPEGImages', f'{i}.jpg'),
                                     os.path.join(root, 'pascal_person_part_gt', f'{i}.png')))
      splits[split] = examples
    return splits
