"""PASCAL VOC 2012 segmentation (21 classes, 255 = void), optionally augmented with SBD.

Data: ``VOCtrainval_11-May-2012.tar`` (Everingham et al.) and, for the ``aug`` config, the
Semantic Boundaries Dataset ``benchmark.tgz`` (Hariharan et al. 2011), both in their official
layouts. Configs:

* ``plain`` (default): VOC ``train`` (1464) and ``val`` (1449) from ImageSets/Segmentation.
* ``aug``: ``train_aug`` = (SBD train | SBD val | VOC train) - VOC val (10,582 ids with the real
  archives, written in sorted id order) and the VOC ``val`` split.

Label precedence in ``train_aug``: the VOC ``SegmentationClass/<id>.png`` when it exists (the
official annotation, with 255 void borders), otherwise the SBD ``cls/<id>.mat`` (``GTcls.
Segmentation``, class ids 0..20, no void). The image is VOC ``JPEGImages/<id>.jpg`` when present,
otherwise SBD ``img/<id>.jpg`` (the same photographs).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from refinenet_jax.data.builders import base

CLASS_NAMES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
               'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
               'sheep', 'sofa', 'train', 'tvmonitor')
CONFIG_SPLITS = {'plain': ('train', 'val'), 'aug': ('train_aug', 'val')}


def read_sbd_mat(path: str) -> np.ndarray:
  """Class ids (uint8 HxW) of an SBD ``cls/<id>.mat`` (struct ``GTcls``, field ``Segmentation``)."""
  base.require_file(path, 'SBD mask')
  try:
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
  except Exception as e:  # scipy raises ValueError/TypeError/... for bad files
    raise base.DatasetError(f'cannot read .mat file {path}: {e}') from e
  seg = getattr(mat.get('GTcls'), 'Segmentation', None)
  if seg is None:
    raise base.DatasetError(f'{path} has no GTcls.Segmentation (not an SBD cls/ file?)')
  seg = np.asarray(seg)
  if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer) or seg.min(initial=0) < 0 \
     or seg.max(initial=0) > 255:
    raise base.DatasetError(f'{path}: GTcls.Segmentation is {seg.dtype} {seg.shape}; '
                            'expected a 2-D array of class ids')
  return seg.astype(np.uint8)


def _ids(list_file: str) -> list[str]:
  return [row[0] for row in base.read_list(list_file)]


class Voc2012(base.SegmentationBuilder, skip_registration=True):
  """PASCAL VOC 2012 semantic segmentation; config ``aug`` adds the SBD annotations."""
  name = 'voc2012'
  CLASS_NAMES = CLASS_NAMES
  PALETTE = base.default_palette(21)
  SPLITS = CONFIG_SPLITS['plain']  # of the default config; see CONFIG_SPLITS
  CONFIG_SPLITS = CONFIG_SPLITS
  HOMEPAGE = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/'
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='plain', description='VOC 2012 train (1464) / val (1449).'),
      tfds.core.BuilderConfig(
          name='aug',
          description='train_aug (10,582: VOC train + SBD, minus VOC val) / val (1449).'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Extract VOCtrainval_11-May-2012.tar into manual_dir, giving
  VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt}.
  For the `aug` config also extract SBD's benchmark.tgz
  (http://home.bharathh.info/pubs/codes/SBD/download.html) there, giving
  benchmark_RELEASE/dataset/{img/*.jpg, cls/*.mat, train.txt, val.txt}.
  """

  def _examples(self, root):
    voc = os.path.join(root, 'VOCdevkit', 'VOC2012')
    lists = os.path.join(voc, 'ImageSets', 'Segmentation')

    def voc_img(i):
      return os.path.join(voc, 'JPEGImages', f'{i}.jpg')

    def voc_png(i):
      return os.path.join(voc, 'SegmentationClass', f'{i}.png')

    voc_train = _ids(os.path.join(lists, 'train.txt'))
    voc_val = _ids(os.path.join(lists, 'val.txt'))
    val = [base.Example(i, voc_img(i), voc_png(i)) for i in voc_val]
    if self.builder_config.name == 'plain':
      return {'train': [base.Example(i, voc_img(i), voc_png(i)) for i in voc_train], 'val': val}

    sbd = base.require_dir(os.path.join(root, 'benchmark_RELEASE', 'dataset'),
                           'SBD directory (benchmark.tgz) for config aug')
    sbd_ids = set(_ids(os.path.join(sbd, 'train.txt'))) | set(_ids(os.path.join(sbd, 'val.txt')))
    train_aug = []
    for i in sorted((sbd_ids | set(voc_train)) - set(voc_val)):
      image = voc_img(i)
      if not os.path.exists(image) and i in sbd_ids:
        image = os.path.join(sbd, 'img', f'{i}.jpg')
      if os.path.exists(voc_png(i)) or i not in sbd_ids:
        train_aug.append(base.Example(i, image, voc_png(i)))
      else:
        mat = os.path.join(sbd, 'cls', f'{i}.mat')
        train_aug.append(base.Example(i, image, functools.partial(read_sbd_mat, mat),
                                      label_source=mat))
    return {'train_aug': train_aug, 'val': val}
