"""Cityscapes fine annotations (Cordts et al. 2016), 19 evaluation classes.

Data: `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` from
https://www.cityscapes-dataset.com (registration required). The labelIds masks are mapped to the
19 trainIds of cityscapesScripts' ``labels.py``; every other id is void (255).
"""
from __future__ import annotations

import glob
import os

import numpy as np

from refinenet_jax.data.builders import base

CLASS_NAMES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic_light',
               'traffic_sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck',
               'bus', 'train', 'motorcycle', 'bicycle')
# cityscapesScripts/helpers/labels.py colours of the trainIds.
PALETTE = np.array([[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156],
                    [190, 153, 153], [153, 153, 153], [250, 170, 30], [220, 220, 0],
                    [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60], [255, 0, 0],
                    [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230],
                    [119, 11, 32]], np.uint8)
# labelId of trainId 0..18.
TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
LABEL_ID_TO_TRAIN_ID = np.full(256, base.IGNORE_LABEL, np.uint8)
LABEL_ID_TO_TRAIN_ID[list(TRAIN_LABEL_IDS)] = np.arange(len(TRAIN_LABEL_IDS), dtype=np.uint8)

IMAGE_SUFFIX = '_leftImg8bit.png'
LABEL_SUFFIX = '_gtFine_labelIds.png'


class Cityscapes(base.SegmentationBuilder, skip_registration=True):
  """Cityscapes fine annotations: train 2975 and val 500 images of 1024x2048, 19 classes.

  The test split (1525 images) is left out: its labels are withheld for the evaluation server.
  """
  name = 'cityscapes'
  CLASS_NAMES = CLASS_NAMES
  PALETTE = PALETTE
  SPLITS = ('train', 'val')
  HOMEPAGE = 'https://www.cityscapes-dataset.com'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` from
  https://www.cityscapes-dataset.com/downloads/ (login required) and unzip both into manual_dir,
  so that it contains leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and
  gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png (other gtFine files and
  the test split are ignored). labelIds are mapped to the 19 trainIds, all other ids to 255.
  """

  def _map_label(self, raw, path):
    return LABEL_ID_TO_TRAIN_ID[raw]

  def _examples(self, root):
    splits = {}
    for split in self.SPLITS:
      image_dir = base.require_dir(os.path.join(root, 'leftImg8bit', split), f'{split} image dir')
      label_dir = base.require_dir(os.path.join(root, 'gtFine', split), f'{split} gtFine dir')
      images = sorted(glob.glob(os.path.join(glob.escape(image_dir), '*', '*' + IMAGE_SUFFIX)))
      if not images:
        raise base.DatasetError(f'no */*{IMAGE_SUFFIX} images in {image_dir}')
      examples = []
      for image in images:
        city = os.path.basename(os.path.dirname(image))
        stem = os.path.basename(image)[:-len(IMAGE_SUFFIX)]
        label = os.path.join(label_dir, city, stem + LABEL_SUFFIX)
        if not os.path.isfile(label):
          raise base.DatasetError(f'image {image} has no labelIds mask (expected {label})')
        examples.append(base.Example(stem, image, label))
      splits[split] = examples
    return splits
