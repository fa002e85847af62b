"""SUN RGB-D (Song et al. 2015) with the 37-class labels, sunrgbd-meta-data layout.

Data: https://github.com/ankurhanda/sunrgbd-meta-data: SUNRGBD-train_images.tgz (5285 JPEGs),
SUNRGBD-test_images.tgz (5050 JPEGs) and sunrgbd_train_test_labels.tar.gz (10335 PNGs, 0 =
unlabelled, 1..37 = classes; stored here as 255 and 0..36).
"""
from __future__ import annotations

import os


from refinenet_jax.data.builders import base

CLASS_NAMES = ('wall', 'floor', 'cabinet', 'bed', 'chair', 'sofa', 'table', 'door', 'window',
               'bookshelf', 'picture', 'counter', 'blinds', 'desk', 'shelves', 'curtain',
               'dresser', 'pillow', 'mirror', 'floor_mat', 'clothes', 'ceiling', 'books', 'fridge',
               'tv', 'paper', 'towel', 'shower_curtain', 'box', 'whiteboard', 'person',
               'night_stand', 'toilet', 'sink', 'lamp', 'bathtub', 'bag')
SPLIT_DIRS = {'train': 'SUNRGBD-train_images', 'test': 'SUNRGBD-test_images'}
LABEL_DIR = 'sunrgbd_train_test_labels'


class SunRgbd(base.SegmentationBuilder, skip_registration=True):
  """SUN RGB-D, 37 classes: train 5285 images, test 5050 (the standard evaluation set)."""
  name = 'sun_rgbd'
  CLASS_NAMES = CLASS_NAMES
  SPLITS = ('train', 'test')
  HOMEPAGE = 'https://rgbd.cs.princeton.edu'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Get SUNRGBD-train_images.tgz, SUNRGBD-test_images.tgz and sunrgbd_train_test_labels.tar.gz (see
  https://github.com/ankurhanda/sunrgbd-meta-data) and extract them into manual_dir, giving
  SUNRGBD-train_images/img-005051.jpg..img-010335.jpg, SUNRGBD-test_images/img-000001.jpg..
  img-005050.jpg and sunrgbd_train_test_labels/img-<n>.png for all 10335 images. Mask value 0
  (unlabelled) becomes 255, k becomes k-1.
  """

  def _map_label(self, raw, path):
    return base.shift_zero_void(raw, len(self.class_names), path)

  def _examples(self, root):
    label_dir = base.require_dir(os.path.join(root, LABEL_DIR), 'label dir')
    splits = {}
    for split, folder in SPLIT_DIRS.items():
      image_dir = base.require_dir(os.path.join(root, folder), f'{split} image dir')
      examples = base.glob_pairs(image_dir, 'img-*.jpg', label_dir)
      splits[split] = examples
    return splits
