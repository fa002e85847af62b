"""PASCAL-Context, 60-class setting (background + the 59 most frequent classes, no void).

Data: the VOC2010 images (``VOCtrainval_03-May-2010.tar``) and the full 459-label annotations
(``trainval.tar.gz`` and ``labels.txt``) of https://cs.stanford.edu/~roozbeh/pascal-context/
(Mottaghi et al. 2014). Each ``trainval/<id>.mat`` holds ``LabelMap`` (uint16 ids of labels.txt);
ids are mapped to the 59 classes by *name* through labels.txt, everything else (including
0 = unlabeled) becomes 0 = background, as in the usual 60-class benchmark. The release has no
split lists: ``train.txt`` (4998 ids) / ``val.txt`` (5105 ids) at the manual_dir root are used,
falling back to VOC2010 ``ImageSets/Main/{train,val}.txt``, which hold the same ids.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import scipy.io

from refinenet_jax.data.builders import base

CLASS_NAMES = (
    'background', 'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat',
    'book', 'bottle', 'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth',
    'computer', 'cow', 'cup', 'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass',
    'ground', 'horse', 'keyboard', 'light', 'motorbike', 'mountain', 'mouse', 'person', 'plate',
    'platform', 'pottedplant', 'road', 'rock', 'sheep', 'shelves', 'sidewalk', 'sign', 'sky',
    'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck', 'tvmonitor', 'wall', 'water',
    'window', 'wood')


def label_lut(labels_txt: str) -> np.ndarray:
  """uint8[65536]: 459-label id -> 60-class index, from the ``<id>: <name>`` rows of labels.txt."""
  base.require_file(labels_txt, 'labels.txt')
  ids = {}
  with open(labels_txt) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      key, sep, name = line.partition(':')
      if not sep or not key.strip().isdigit() or not 0 <= int(key) < 65536:
        raise base.DatasetError(f'{labels_txt}:{n}: expected "<id>: <name>", got {line.strip()!r}')
      ids.setdefault(name.strip(), []).append(int(key))
  lut = np.zeros(65536, np.uint8)
  for index, name in enumerate(CLASS_NAMES[1:], 1):
    if name not in ids:
      raise base.DatasetError(f'{labels_txt} has no label named {name!r}')
    lut[ids[name]] = index
  return lut


def read_label_map(path: str, lut: np.ndarray) -> np.ndarray:
  base.require_file(path, 'annotation')
  try:
    label_map = scipy.io.loadmat(path)['LabelMap']
  except KeyError:
    raise base.DatasetError(f'{path} has no LabelMap variable') from None
  except Exception as e:  # scipy raises ValueError/TypeError/... for bad files
    raise base.DatasetError(f'cannot read .mat file {path}: {e}') from e
  label_map = np.asarray(label_map)
  if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer) \
     or label_map.min(initial=0) < 0 or label_map.max(initial=0) >= lut.size:
    raise base.DatasetError(f'{path}: LabelMap is {label_map.dtype} {label_map.shape}; expected '
                            'a 2-D array of uint16 label ids')
  return lut[label_map]


class PascalContext(base.SegmentationBuilder, skip_registration=True):
  """PASCAL-Context (60 classes incl. background): 4998 train / 5105 val images."""
  name = 'pascal_context'
  CLASS_NAMES = CLASS_NAMES
  HOMEPAGE = 'https://cs.stanford.edu/~roozbeh/pascal-context/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  In manual_dir: extract VOCtrainval_03-May-2010.tar (giving VOCdevkit/VOC2010/JPEGImages/*.jpg)
  and the PASCAL-Context trainval.tar.gz (giving trainval/<id>.mat), and put its labels.txt
  (459 rows `<id>: <name>`) at the top level, with the split lists train.txt (4998 ids) and
  val.txt (5105 ids); without them VOC2010 ImageSets/Main/{train,val}.txt are used.
  """

  def _examples(self, root):
    voc = os.path.join(root, 'VOCdevkit', 'VOC2010')
    lut = label_lut(os.path.join(root, 'labels.txt'))
    splits = {}
    for split in self.SPLITS:
      list_file = os.path.join(root, f'{split}.txt')
      fallback = os.path.join(voc, 'ImageSets', 'Main', f'{split}.txt')
      if not os.path.exists(list_file) and os.path.exists(fallback):
        list_file = fallback
      examples = []
      for row in base.read_list(list_file):
        image = os.path.join(voc, 'JPEGImages', f'{row[0]}.jpg')
        mat = os.path.join(root, 'trainval', f'{row[0]}.mat')
        examples.append(base.Example(row[0], image, functools.partial(read_label_map, mat, lut),
                                     label_source=mat))
      splits[split] = examples
    return splits
