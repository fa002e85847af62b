"""Builders for PASCAL VOC 2012 (+SBD), PASCAL-Context and PASCAL-Person-Part.

Real samples (``SAMPLES``, outside the repository: skipped when absent) check that the official
formats decode to exactly the stored palette indices; generated fixtures in the official formats
(SBD ``GTcls`` .mat files, PASCAL-Context ``LabelMap`` .mat files) check the split arithmetic and
label mappings; bad inputs must raise :class:`DatasetError` naming the offending file.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from refinenet_jax.data.builders.base import DatasetError, default_palette
from refinenet_jax.data.builders.pascal_context import PascalContext
from refinenet_jax.data.builders.person_part import PersonPart
from refinenet_jax.data.builders.voc2012 import Voc2012

tfds.disable_progress_bar()

SAMPLES = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'samples')

# Ids of the 59 classes in the official 459-entry labels.txt (the mapping hard-coded by
# mmsegmentation / the Detail API); the builder derives them from the names instead.
CONTEXT_IDS = {
    'aeroplane': 2, 'bag': 9, 'bed': 18, 'bedclothes': 19, 'bench': 22, 'bicycle': 23, 'bird': 25,
    'boat': 31, 'book': 33, 'bottle': 34, 'building': 44, 'bus': 45, 'cabinet': 46, 'car': 59,
    'cat': 65, 'ceiling': 68, 'chair': 72, 'cloth': 80, 'computer': 85, 'cow': 98, 'cup': 104,
    'curtain': 105, 'dog': 113, 'door': 115, 'fence': 144, 'floor': 158, 'flower': 159,
    'food': 162, 'grass': 187, 'ground': 189, 'horse': 207, 'keyboard': 220, 'light': 232,
    'motorbike': 258, 'mountain': 259, 'mouse': 260, 'person': 284, 'plate': 295, 'platform': 296,
    'pottedplant': 308, 'road': 324, 'rock': 326, 'sheep': 347, 'shelves': 349, 'sidewalk': 354,
    'sign': 355, 'sky': 360, 'snow': 366, 'sofa': 368, 'table': 397, 'track': 415, 'train': 416,
    'tree': 420, 'truck': 424, 'tvmonitor': 427, 'wall': 440, 'water': 445, 'window': 454,
    'wood': 458}


# ---------------------------------------------------------------------------- helpers

def sample_ids(dataset):
  folder = os.path.join(SAMPLES, dataset)
  if not os.path.isdir(folder):
    pytest.skip(f'no real samples at {folder}')
  ids = sorted(f[:-4] for f in os.listdir(folder) if f.endswith('.jpg'))
  if len(ids) < 3:
    pytest.skip(f'too few samples in {folder}')
  return folder, ids


def link(src, dst):
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  os.symlink(os.path.abspath(src), dst)


def write_list(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(''.join(f'{r}\n' for r in rows))


def write_jpeg(path, hw, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rgb = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(path, quality=95)


def write_png(path, arr):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = Image.fromarray(np.asarray(arr, np.uint8), mode='L').convert('P')
  im.putpalette(default_palette(256).ravel().tolist())
  im.save(path)


def write_sbd_mat(path, seg):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  seg = np.asarray(seg, np.uint8)
  present = np.unique(seg[seg > 0]).astype(np.uint8)
  boundaries = np.empty((20,), object)
  boundaries[:] = [np.zeros(seg.shape, bool) for _ in range(20)]
  scipy.io.savemat(path, {'GTcls': {'Segmentation': seg, 'Boundaries': boundaries,
                                    'CategoriesPresent': present}})


def build(cls, root, tmp_path, config=None):
  kwargs = {'config': config} if config else {}
  builder = cls(data_dir=str(tmp_path / 'tfds'), **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  return builder


def check_error(excinfo, path):
  """The DatasetError names ``path`` (also checked through any wrapping exception chain)."""
  err, seen = excinfo.value, []
  while err is not None:
    seen.append(err)
    if isinstance(err, DatasetError) and str(path) in str(err):
      return
    err = err.__cause__ or err.__context__
  raise AssertionError(f'no DatasetError naming {path} in {[repr(e) for e in seen]}')


def pil_array(path, mode=None):
  with Image.open(path) as im:
    return np.asarray(im if mode is None else im.convert(mode))


def pil_hw(path):
  with Image.open(path) as im:
    return im.size[::-1]


def assert_decodes_to(ex, jpg, png_or_label, name):
  label = (pil_array(png_or_label) if isinstance(png_or_label, (str, os.PathLike))
           else png_or_label)
  assert ex['name'] in (name, name.encode())
  assert ex['label'].dtype == np.uint8 and ex['label'].shape == (*label.shape, 1)
  assert np.array_equal(ex['label'][..., 0], label)
  image = pil_array(jpg, 'RGB')
  assert ex['image'].shape == image.shape and ex['image'].dtype == np.uint8
  assert np.abs(ex['image'].astype(int) - image).max() <= 2  # tfds decodes with OpenCV


def voc_layout(root, folder, train, val):
  voc = os.path.join(root, 'VOCdevkit', 'VOC2012')
  for i in train + val:
    link(os.path.join(folder, f'{i}.jpg'), os.path.join(voc, 'JPEGImages', f'{i}.jpg'))
    link(os.path.join(folder, f'{i}.png'), os.path.join(voc, 'SegmentationClass', f'{i}.png'))
  write_list(os.path.join(voc, 'ImageSets', 'Segmentation', 'train.txt'), train)
  write_list(os.path.join(voc, 'ImageSets', 'Segmentation', 'val.txt'), val)
  return voc


def synthetic_voc(root, labels):
  """VOC layout of generated files: {id: (split, label array)}."""
  voc = os.path.join(root, 'VOCdevkit', 'VOC2012')
  for n, (i, (_, label)) in enumerate(labels.items()):
    write_jpeg(os.path.join(voc, 'JPEGImages', f'{i}.jpg'), np.shape(label), seed=n)
    write_png(os.path.join(voc, 'SegmentationClass', f'{i}.png'), label)
  for split in ('train', 'val'):
    write_list(os.path.join(voc, 'ImageSets', 'Segmentation', f'{split}.txt'),
               [i for i, (s, _) in labels.items() if s == split])
  return voc


# ---------------------------------------------------------------------------- VOC 2012

def test_voc_plain_real_samples(tmp_path):
  folder, ids = sample_ids('voc2012')
  train, val = ids[:2], ids[2:]
  voc_layout(tmp_path / 'manual', folder, train, val)
  builder = build(Voc2012, tmp_path / 'manual', tmp_path)
  assert builder.builder_config.name == 'plain'
  assert builder.info.metadata['num_classes'] == 21
  assert builder.info.metadata['ignore_label'] == 255
  assert np.array_equal(builder.palette, default_palette(21))
  for split, split_ids in (('train', train), ('val', val)):
    src = builder.as_data_source(split)
    assert len(src) == len(split_ids)
    for n, i in enumerate(split_ids):  # written in list order
      assert_decodes_to(src[n], os.path.join(folder, f'{i}.jpg'),
                        os.path.join(folder, f'{i}.png'), i)
  assert any((builder.as_data_source('train')[n]['label'] == 255).any() for n in range(2))


def test_voc_aug_split_arithmetic(tmp_path):
  folder, ids = sample_ids('voc2012')
  if len(ids) < 4:
    pytest.skip('needs 4 VOC samples')
  voc_train, voc_val = ids[:2], ids[2:4]
  root = tmp_path / 'manual'
  voc = voc_layout(root, folder, voc_train, voc_val)
  sbd = root / 'benchmark_RELEASE' / 'dataset'
  hw = {i: pil_hw(os.path.join(folder, f'{i}.jpg')) for i in ids}
  # SBD covers one VOC train id (its VOC label must win), one VOC val id (must be excluded), and
  # SBD-only ids: s1..s3 with images only in SBD img/, s4 whose VOC JPEG exists (VOC wins).
  sbd_train = [voc_train[0], voc_val[0], '2011_000001', '2011_000002']
  sbd_val = ['2011_000003', '2011_000004', voc_train[1]]
  sbd_labels = {}
  for n, i in enumerate(sbd_train + sbd_val):
    shape = hw.get(i, (20 + n, 30 + 2 * n))
    seg = (np.arange(shape[0] * shape[1]).reshape(shape) % 21).astype(np.uint8)
    if i in ids:
      seg[:] = 7  # would differ from the official VOC annotation
    else:
      write_jpeg(str(sbd / 'img' / f'{i}.jpg'), shape, seed=n)
    write_sbd_mat(str(sbd / 'cls' / f'{i}.mat'), seg)
    sbd_labels[i] = seg
  for i in ids[:4]:  # SBD ships these photographs too
    link(os.path.join(folder, f'{i}.jpg'), str(sbd / 'img' / f'{i}.jpg'))
  write_jpeg(os.path.join(voc, 'JPEGImages', '2011_000004.jpg'), sbd_labels['2011_000004'].shape,
             seed=99)
  write_list(str(sbd / 'train.txt'), sbd_train)
  write_list(str(sbd / 'val.txt'), sbd_val)

  builder = build(Voc2012, root, tmp_path, config='aug')
  assert set(builder.info.splits) == {'train_aug', 'val'}
  expected = sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))
  src = builder.as_data_source('train_aug')
  names = [src[n]['name'] for n in range(len(src))]
  names = [x.decode() if isinstance(x, bytes) else x for x in names]
  assert names == expected and len(names) == 6
  assert not set(names) & set(voc_val)
  for n, i in enumerate(names):
    if i in voc_train:  # official VOC label (with 255 borders), not SBD's
      assert_decodes_to(src[n], os.path.join(folder, f'{i}.jpg'),
                        os.path.join(folder, f'{i}.png'), i)
    else:
      image_dir = os.path.join(voc, 'JPEGImages') if i == '2011_000004' else sbd / 'img'
      assert_decodes_to(src[n], os.path.join(image_dir, f'{i}.jpg'), sbd_labels[i], i)
  val = builder.as_data_source('val')
  assert len(val) == 2
  for n, i in enumerate(voc_val):
    assert_decodes_to(val[n], os.path.join(folder, f'{i}.jpg'),
                      os.path.join(folder, f'{i}.png'), i)


def test_voc_aug_without_sbd(tmp_path):
  synthetic_voc(tmp_path, {'a': ('train', np.zeros((8, 8))), 'b': ('val', np.zeros((8, 8)))})
  with pytest.raises(DatasetError) as e:
    build(Voc2012, tmp_path, tmp_path, config='aug')
  check_error(e, tmp_path / 'benchmark_RELEASE')


def test_sbd_mat_without_gtcls(tmp_path):
  synthetic_voc(tmp_path, {'a': ('train', np.zeros((8, 8))), 'b': ('val', np.zeros((8, 8)))})
  sbd = tmp_path / 'benchmark_RELEASE' / 'dataset'
  write_jpeg(str(sbd / 'img' / 'c.jpg'), (8, 8))
  bad = sbd / 'cls' / 'c.mat'
  os.makedirs(bad.parent)
  scipy.io.savemat(str(bad), {'GTinst': {'Segmentation': np.zeros((8, 8), np.uint8)}})
  write_list(str(sbd / 'train.txt'), ['c'])
  write_list(str(sbd / 'val.txt'), ['b'])
  with pytest.raises(DatasetError) as e:
    build(Voc2012, tmp_path, tmp_path, config='aug')
  check_error(e, bad)


def test_sbd_mat_wrong_size(tmp_path):
  synthetic_voc(tmp_path, {'a': ('train', np.zeros((8, 8))), 'b': ('val', np.zeros((8, 8)))})
  sbd = tmp_path / 'benchmark_RELEASE' / 'dataset'
  write_jpeg(str(sbd / 'img' / 'c.jpg'), (8, 8))
  write_sbd_mat(str(sbd / 'cls' / 'c.mat'), np.zeros((8, 9)))
  write_list(str(sbd / 'train.txt'), ['c'])
  write_list(str(sbd / 'val.txt'), ['a'])
  with pytest.raises(DatasetError, match='8x9') as e:
    build(Voc2012, tmp_path, tmp_path, config='aug')
  check_error(e, sbd / 'cls' / 'c.mat')


def test_voc_corrupt_jpeg(tmp_path):
  voc = synthetic_voc(tmp_path, {'a': ('train', np.zeros((16, 16))),
                                 'b': ('val', np.zeros((16, 16)))})
  bad = os.path.join(voc, 'JPEGImages', 'b.jpg')
  with open(bad, 'rb') as f:
    data = f.read()
  with open(bad, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(DatasetError) as e:
    build(Voc2012, tmp_path, tmp_path)
  check_error(e, bad)


def test_voc_mask_size_mismatch(tmp_path):
  voc = synthetic_voc(tmp_path, {'a': ('train', np.zeros((16, 16))),
                                 'b': ('val', np.zeros((16, 16)))})
  bad = os.path.join(voc, 'SegmentationClass', 'a.png')
  write_png(bad, np.zeros((16, 15)))
  with pytest.raises(DatasetError) as e:
    build(Voc2012, tmp_path, tmp_path)
  check_error(e, bad)


def test_voc_label_out_of_range(tmp_path):
  label = np.zeros((16, 16), np.uint8)
  label[0, :3] = (20, 255, 21)  # 20 and 255 are fine, 21 is not
  voc = synthetic_voc(tmp_path, {'a': ('train', np.zeros((16, 16))), 'b': ('val', label)})
  with pytest.raises(DatasetError, match=r'\[21\]') as e:
    build(Voc2012, tmp_path, tmp_path)
  check_error(e, os.path.join(voc, 'SegmentationClass', 'b.png'))


def test_voc_missing_split_list(tmp_path):
  voc = synthetic_voc(tmp_path, {'a': ('train', np.zeros((8, 8))), 'b': ('val', np.zeros((8, 8)))})
  missing = os.path.join(voc, 'ImageSets', 'Segmentation', 'val.txt')
  os.remove(missing)
  with pytest.raises(DatasetError) as e:
    build(Voc2012, tmp_path, tmp_path)
  check_error(e, missing)


def test_voc_missing_mask(tmp_path):
  voc = synthetic_voc(tmp_path, {'a': ('train', np.zeros((8, 8))), 'b': ('val', np.zeros((8, 8)))})
  missing = os.path.join(voc, 'SegmentationClass', 'a.png')
  os.remove(missing)
  with pytest.raises(DatasetError) as e:
    build(Voc2012, tmp_path, tmp_path)
  check_error(e, missing)


# ---------------------------------------------------------------------------- PASCAL-Context

def context_layout(root, labels_by_split, label_names=None):
  """Generated PASCAL-Context release: {split: {id: LabelMap}}; labels.txt with 459 rows."""
  names = label_names or {i: f'other{i}' for i in range(1, 460)}
  if label_names is None:
    names.update({v: k for k, v in CONTEXT_IDS.items()})
  with open(os.path.join(root, 'labels.txt'), 'w') as f:
    f.write(''.join(f'{i}: {n}\n' for i, n in sorted(names.items())))
  n = 0
  for split, maps in labels_by_split.items():
    write_list(os.path.join(root, f'{split}.txt'), list(maps))
    for i, label_map in maps.items():
      write_jpeg(os.path.join(root, 'VOCdevkit', 'VOC2010', 'JPEGImages', f'{i}.jpg'),
                 label_map.shape, seed=n)
      os.makedirs(os.path.join(root, 'trainval'), exist_ok=True)
      scipy.io.savemat(os.path.join(root, 'trainval', f'{i}.mat'),
                       {'LabelMap': np.asarray(label_map, np.uint16)})
      n += 1


def test_pascal_context_mapping(tmp_path):
  classes = PascalContext.CLASS_NAMES
  assert len(classes) == 60 and classes[0] == 'background'
  # The name-based mapping reproduces the standard id mapping (sorted ids -> 0..59).
  standard = np.sort([0] + list(CONTEXT_IDS.values()))
  assert [CONTEXT_IDS[c] for c in classes[1:]] == standard[1:].tolist()

  every_id = np.arange(460, dtype=np.uint16).reshape(20, 23)
  person = np.full((6, 7), 284, np.uint16)
  person[0, 0], person[1, 1], person[2, 2] = 0, 1, 420  # unlabeled, accordion, tree
  context_layout(tmp_path, {'train': {'2008_000002': every_id, '2008_000003': person},
                            'val': {'2008_000007': np.full((5, 4), 458, np.uint16)}})
  builder = build(PascalContext, tmp_path, tmp_path)
  assert builder.info.metadata['num_classes'] == 60
  train = builder.as_data_source('train')
  assert len(train) == 2
  expected = np.zeros(460, np.uint8)
  expected[standard] = np.arange(60)
  label = train[0]['label'][..., 0]
  assert np.array_equal(label, expected[every_id])
  assert label.max() == 59 and (label != 255).all()
  label = train[1]['label'][..., 0]
  assert label[3, 3] == classes.index('person') == 37
  assert label[0, 0] == 0 and label[1, 1] == 0 and label[2, 2] == classes.index('tree')
  image = pil_array(tmp_path / 'VOCdevkit' / 'VOC2010' / 'JPEGImages' / '2008_000003.jpg')
  assert np.abs(train[1]['image'].astype(int) - image).max() <= 2
  val = builder.as_data_source('val')
  assert len(val) == 1 and (val[0]['label'] == classes.index('wood')).all()


def test_pascal_context_voc_split_fallback(tmp_path):
  context_layout(tmp_path, {'train': {'a': np.zeros((4, 4))}, 'val': {'b': np.zeros((4, 4))}})
  main = tmp_path / 'VOCdevkit' / 'VOC2010' / 'ImageSets' / 'Main'
  os.makedirs(main)
  shutil.move(str(tmp_path / 'val.txt'), str(main / 'val.txt'))
  assert len(build(PascalContext, tmp_path, tmp_path).as_data_source('val')) == 1


def test_pascal_context_labels_txt_missing_name(tmp_path):
  names = {v: k for k, v in CONTEXT_IDS.items() if k != 'sidewalk'}
  context_layout(tmp_path, {'train': {'a': np.zeros((4, 4))}, 'val': {'b': np.zeros((4, 4))}},
                 label_names=names)
  with pytest.raises(DatasetError, match='sidewalk') as e:
    build(PascalContext, tmp_path, tmp_path)
  check_error(e, tmp_path / 'labels.txt')


def test_pascal_context_bad_mat_and_image(tmp_path):
  context_layout(tmp_path, {'train': {'a': np.zeros((4, 4))}, 'val': {'b': np.zeros((4, 4))}})
  bad_mat = tmp_path / 'trainval' / 'b.mat'
  scipy.io.savemat(str(bad_mat), {'Other': np.zeros((4, 4), np.uint16)})
  with pytest.raises(DatasetError) as e:
    build(PascalContext, tmp_path, tmp_path / 'x')
  check_error(e, bad_mat)
  # A truncated image is reported under the image's path, not the .mat's.
  context_layout(tmp_path, {'train': {'a': np.zeros((4, 4))}, 'val': {'b': np.zeros((4, 4))}})
  bad_jpg = tmp_path / 'VOCdevkit' / 'VOC2010' / 'JPEGImages' / 'a.jpg'
  bad_jpg.write_bytes(bad_jpg.read_bytes()[:100])
  with pytest.raises(DatasetError, match='cannot decode image') as e:
    build(PascalContext, tmp_path, tmp_path / 'y')
  check_error(e, bad_jpg)


# ---------------------------------------------------------------------------- Person-Part

def test_person_part_real_samples(tmp_path):
  folder, ids = sample_ids('person_part')
  root = tmp_path / 'manual' / 'pascal_person_part'  # the tarball's top folder is accepted
  for i in ids:
    link(os.path.join(folder, f'{i}.jpg'), str(root / 'JPEGImages' / f'{i}.jpg'))
    link(os.path.join(folder, f'{i}.png'), str(root / 'pascal_person_part_gt' / f'{i}.png'))
  lists = root / 'pascal_person_part_trainval_list'
  train, val = ids[:2], ids[2:]
  write_list(str(lists / 'train_id.txt'), train)
  write_list(str(lists / 'val_id.txt'),  # the "<image> <mask>" row format also works
             [f'/JPEGImages/{i}.jpg /SegmentationPart/{i}.png' for i in val])
  builder = build(PersonPart, tmp_path / 'manual', tmp_path)
  assert builder.info.metadata['class_names'][3] == 'upper_arm'
  assert np.array_equal(builder.palette, default_palette(7))
  seen = set()
  for split, split_ids in (('train', train), ('val', val)):
    src = builder.as_data_source(split)
    assert len(src) == len(split_ids)
    for n, i in enumerate(split_ids):
      assert_decodes_to(src[n], os.path.join(folder, f'{i}.jpg'),
                        os.path.join(folder, f'{i}.png'), i)
      seen |= set(np.unique(src[n]['label']).tolist())
  assert seen == set(range(7))


def test_person_part_missing_mask_and_list(tmp_path):
  for i in ('a', 'b'):
    write_jpeg(str(tmp_path / 'JPEGImages' / f'{i}.jpg'), (8, 8))
  write_png(str(tmp_path / 'pascal_person_part_gt' / 'a.png'), np.full((8, 8), 6))
  lists = tmp_path / 'pascal_person_part_trainval_list'
  write_list(str(lists / 'train_id.txt'), ['a'])
  with pytest.raises(DatasetError) as e:
    build(PersonPart, tmp_path, tmp_path / 'x')
  check_error(e, lists / 'val_id.txt')
  write_list(str(lists / 'val_id.txt'), ['b'])
  with pytest.raises(DatasetError) as e:
    build(PersonPart, tmp_path, tmp_path / 'y')
  check_error(e, tmp_path / 'pascal_person_part_gt' / 'b.png')
  write_png(str(tmp_path / 'pascal_person_part_gt' / 'b.png'), np.full((8, 8), 7))
  with pytest.raises(DatasetError, match=r'\[7\]') as e:
    build(PersonPart, tmp_path, tmp_path / 'z')
  check_error(e, tmp_path / 'pascal_person_part_gt' / 'b.png')
