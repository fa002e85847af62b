"""NYU Depth v2 with the 40-class labels of Gupta et al. (2013), light-weight-refinenet layout.

Data: the NYUDv2-40 release used by light-weight-refinenet
(https://github.com/DrSleep/light-weight-refinenet, list files `data/train.nyu`, `data/val.nyu`):
795 training and 654 test images of 625x468 as PNG; masks are palette PNGs of class ids 0..39
with 255 = unlabelled.
"""
from __future__ import annotations

import os

from refinenet_jax.data.builders import base

CLASS_NAMES = ('wall', 'floor', 'cabinet', 'bed', 'chair', 'sofa', 'table', 'door', 'window',
               'bookshelf', 'picture', 'counter', 'blinds', 'desk', 'shelves', 'curtain',
               'dresser', 'pillow', 'mirror', 'floor_mat', 'clothes', 'ceiling', 'books',
               'refrigerator', 'television', 'paper', 'towel', 'shower_curtain', 'box',
               'whiteboard', 'person', 'night_stand', 'toilet', 'sink', 'lamp', 'bathtub', 'bag',
               'otherstructure', 'otherfurniture', 'otherprop')


class Nyudv240(base.SegmentationBuilder, skip_registration=True):
  """NYUDv2-40: train 795 images; val is the standard 654-image test set (there is no other)."""
  name = 'nyudv2_40'
  CLASS_NAMES = CLASS_NAMES
  SPLITS = ('train', 'val')
  HOMEPAGE = 'https://cs.nyu.edu/~fergus/datasets/nyu_depth_v2.html'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put light-weight-refinenet's NYUDv2-40 data (https://github.com/DrSleep/light-weight-refinenet)
  in manual_dir: train_images/<id>.png, train_labels/<id>.png, val_images/<id>.png,
  val_labels/<id>.png and its list files train.nyu (795 rows) and val.nyu (654 rows, the test
  set), each row `<image path>\\t<mask path>` relative to manual_dir. Masks are palette PNGs of
  class ids 0..39, 255 = unlabelled.
  """

  def _examples(self, root):
    splits = {}
    for split in self.SPLITS:
      list_file = os.path.join(root, f'{split}.nyu')
      examples = []
      for row in base.read_list(list_file):
        if len(row) != 2:
          raise base.DatasetError(f'{list_file}: expected "<image>\\t<mask>" rows, got {row}')
        image, mask = (os.path.join(root, p) for p in row)
        examples.append(base.Example(os.path.splitext(os.path.basename(row[0]))[0], image, mask))
      splits[split] = examples
    return splits
