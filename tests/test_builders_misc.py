"""Cityscapes, ADE20K, NYUDv2-40, SUN RGB-D and folder builders: real samples and format-true
fixtures written in each dataset's own naming scheme, plus the errors for bad input."""
from __future__ import annotations

import itertools
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from refinenet_jax.data.builders.ade20k import Ade20k
from refinenet_jax.data.builders.base import DatasetError
from refinenet_jax.data.builders.cityscapes import Cityscapes
from refinenet_jax.data.builders.folder import Folder, FolderConfig
from refinenet_jax.data.builders.nyudv2_40 import Nyudv240
from refinenet_jax.data.builders.sun_rgbd import SunRgbd

tfds.disable_progress_bar()

SAMPLES = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'samples')
NYU_SAMPLES = os.path.join(SAMPLES, 'nyudv2_40')
H, W = 20, 30
_counter = itertools.count()


def build(builder_cls, manual_dir, tmp_path, **kwargs):
  data_dir = tmp_path / f'tfds{next(_counter)}'
  b = builder_cls(data_dir=str(data_dir), **kwargs)
  config = None if manual_dir is None else tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  b.download_and_prepare(download_config=config)
  return b


def build_error(builder_cls, manual_dir, tmp_path, path, **kwargs) -> str:
  """Builds expecting a DatasetError whose message names ``path``; returns the message."""
  with pytest.raises(DatasetError) as info:
    build(builder_cls, manual_dir, tmp_path, **kwargs)
  assert os.fspath(path) in str(info.value), str(info.value)
  return str(info.value)


def rgb(seed, h=H, w=W):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def ids_mask(values, h=H, w=W):
  """An (h, w) uint8 mask cycling through ``values``."""
  return np.resize(np.asarray(values, np.uint8), h * w).reshape(h, w)


def save(path, array, mode=None, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
  im.save(path, **kwargs)
  return path


def save_palette(path, array):
  im = Image.fromarray(array, mode='L').convert('P')
  im.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tolist())
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im.save(path)
  assert pil_mode(path) == 'P' and np.array_equal(pil_array(path), array)
  return path


def truncate(path):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


def pil_rgb(path):
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))


def pil_array(path):
  with Image.open(path) as im:
    return np.asarray(im)


def pil_mode(path):
  with Image.open(path) as im:
    return im.mode


def labels(src):
  return [src[i]['label'][..., 0] for i in range(len(src))]


def names(src):
  return [src[i]['name'].decode() for i in range(len(src))]


# --- NYUDv2-40 -----------------------------------------------------------------------------------

def write_nyu(root, splits):
  """splits: {split: [(id, image array or source path, mask array or source path)]}."""
  for split, rows in splits.items():
    lines = []
    for name, image, mask in rows:
      image_rel, mask_rel = f'{split}_images/{name}.png', f'{split}_labels/{name}.png'
      for src, rel in ((image, image_rel), (mask, mask_rel)):
        dst = os.path.join(root, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if isinstance(src, str):
          os.symlink(os.path.abspath(src), dst)
        elif src is mask:
          save_palette(dst, src)
        else:
          save(dst, src)
      lines.append(f'{image_rel}\t{mask_rel}\n')
    with open(os.path.join(root, f'{split}.nyu'), 'w') as f:
      f.writelines(lines)


@pytest.mark.skipif(not os.path.isdir(NYU_SAMPLES), reason='shared NYUDv2-40 samples absent')
def test_nyu_real_samples_decode_exactly(tmp_path):
  ids = sorted(f[:-len('_mask.png')] for f in os.listdir(NYU_SAMPLES) if f.endswith('_mask.png'))
  assert len(ids) >= 2
  rows = [(i, os.path.join(NYU_SAMPLES, f'{i}.png'), os.path.join(NYU_SAMPLES, f'{i}_mask.png'))
          for i in ids]
  root = tmp_path / 'nyu'
  write_nyu(root, {'train': rows[:2], 'val': rows[2:]})
  b = build(Nyudv240, root, tmp_path)
  assert b.info.metadata['num_classes'] == 40 and b.info.metadata['ignore_label'] == 255
  assert b.info.splits['train'].num_examples == 2
  assert b.info.splits['val'].num_examples == len(ids) - 2
  for split, split_rows in (('train', rows[:2]), ('val', rows[2:])):
    src = b.as_data_source(split)
    assert names(src) == [r[0] for r in split_rows]
    for i, (_, image, mask) in enumerate(split_rows):
      ex = src[i]
      assert ex['image'].dtype == np.uint8 and ex['label'].dtype == np.uint8
      assert np.array_equal(ex['image'], pil_rgb(image))
      stored = pil_array(mask)
      assert pil_mode(mask) == 'P'
      assert np.array_equal(ex['label'][..., 0], stored)
      assert 255 in stored  # the unlabelled pixels survive as the ignore value


def test_nyu_synthetic_and_errors(tmp_path):
  mask = ids_mask([0, 39, 255, 7])
  root = tmp_path / 'ok'
  write_nyu(root, {'train': [('000003', rgb(0), mask)], 'val': [('000001', rgb(1), mask)]})
  src = build(Nyudv240, root, tmp_path).as_data_source('train')
  assert np.array_equal(src[0]['label'][..., 0], mask)
  assert np.array_equal(src[0]['image'], rgb(0))

  # Label value 45 is neither a class (0..39) nor 255.
  root = tmp_path / 'range'
  write_nyu(root, {'train': [('000003', rgb(0), ids_mask([0, 45]))],
                   'val': [('000001', rgb(1), mask)]})
  msg = build_error(Nyudv240, root, tmp_path, root / 'train_labels' / '000003.png')
  assert '[45]' in msg

  # Mask of another size than its image.
  root = tmp_path / 'size'
  write_nyu(root, {'train': [('000003', rgb(0), ids_mask([1], H + 1, W))],
                   'val': [('000001', rgb(1), mask)]})
  build_error(Nyudv240, root, tmp_path, root / 'train_labels' / '000003.png')

  # Truncated PNG image.
  root = tmp_path / 'corrupt'
  write_nyu(root, {'train': [('000003', rgb(0), mask)], 'val': [('000001', rgb(1), mask)]})
  truncate(root / 'val_images' / '000001.png')
  build_error(Nyudv240, root, tmp_path, root / 'val_images' / '000001.png')

  # Missing split list; a row naming a missing mask.
  root = tmp_path / 'nolist'
  write_nyu(root, {'train': [('000003', rgb(0), mask)]})
  build_error(Nyudv240, root, tmp_path, root / 'val.nyu')
  with open(root / 'val.nyu', 'w') as f:
    f.write('train_images/000003.png\tval_labels/000009.png\n')
  build_error(Nyudv240, root, tmp_path, root / 'val_labels' / '000009.png')


# --- Cityscapes ----------------------------------------------------------------------------------

CS_RAW = [0, 1, 4, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33, 34,
          255]
CS_TRAIN = [255, 255, 255, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 255,
            255]


def write_cityscapes(root, frames):
  """frames: {split: [(city, seq, frame)]}; returns {stem: (image path, raw labelIds)}."""
  out = {}
  for split, items in frames.items():
    for k, (city, seq, frame) in enumerate(items):
      stem = f'{city}_{seq:06d}_{frame:06d}'
      raw = np.roll(ids_mask(CS_RAW), k, axis=1)
      image = save(os.path.join(root, 'leftImg8bit', split, city, f'{stem}_leftImg8bit.png'),
                   rgb(k))
      gt = os.path.join(root, 'gtFine', split, city, stem)
      save(f'{gt}_gtFine_labelIds.png', raw)
      save(f'{gt}_gtFine_instanceIds.png', raw.astype(np.uint16) * 1000)  # decoys: ignored
      save(f'{gt}_gtFine_color.png', rgb(99))
      out[stem] = (image, raw)
  return out


def test_cityscapes_label_ids_to_train_ids(tmp_path):
  root = tmp_path / 'cs'
  written = write_cityscapes(root, {
      'train': [('zurich', 0, 19), ('aachen', 1, 19), ('aachen', 0, 19)],
      'val': [('lindau', 0, 0), ('frankfurt', 0, 294)]})
  b = build(Cityscapes, root, tmp_path)
  assert b.info.metadata['num_classes'] == 19
  assert b.info.metadata['class_names'][6] == 'traffic_light'
  assert b.info.metadata['palette'][0] == [128, 64, 128]
  assert set(b.info.splits.keys()) == {'train', 'val'}
  train, val = b.as_data_source('train'), b.as_data_source('val')
  assert names(train) == ['aachen_000000_000019', 'aachen_000001_000019', 'zurich_000000_000019']
  assert names(val) == ['frankfurt_000000_000294', 'lindau_000000_000000']
  lut = dict(zip(CS_RAW, CS_TRAIN))
  for src in (train, val):
    for i in range(len(src)):
      image, raw = written[src[i]['name'].decode()]
      expected = np.vectorize(lut.get)(raw).astype(np.uint8)
      assert np.array_equal(src[i]['label'][..., 0], expected)
      assert np.array_equal(src[i]['image'], pil_rgb(image))
  assert {0, 18, 255} <= set(np.unique(train[0]['label']).tolist())


def test_cityscapes_errors(tmp_path):
  root = tmp_path / 'cs'
  write_cityscapes(root, {'train': [('aachen', 0, 19)], 'val': [('lindau', 0, 0)]})
  missing = root / 'gtFine' / 'val' / 'lindau' / 'lindau_000000_000000_gtFine_labelIds.png'
  os.remove(missing)
  image = root / 'leftImg8bit' / 'val' / 'lindau' / 'lindau_000000_000000_leftImg8bit.png'
  msg = build_error(Cityscapes, root, tmp_path, image)
  assert str(missing) in msg

  root = tmp_path / 'noval'
  write_cityscapes(root, {'train': [('aachen', 0, 19)]})
  build_error(Cityscapes, root, tmp_path, root / 'leftImg8bit' / 'val')

  root = tmp_path / 'size'
  write_cityscapes(root, {'train': [('aachen', 0, 19)], 'val': [('lindau', 0, 0)]})
  bad = root / 'gtFine' / 'train' / 'aachen' / 'aachen_000000_000019_gtFine_labelIds.png'
  save(str(bad), ids_mask([7], H, W + 2))
  build_error(Cityscapes, root, tmp_path, bad)


# --- ADE20K --------------------------------------------------------------------------------------

def write_ade(top):
  """ADEChallengeData2016 with a colour, a grayscale and a CMYK JPEG; returns {stem: (jpg, raw)}."""
  root = os.path.join(top, 'ADEChallengeData2016')
  files = {}
  for split, folder, n, modes in (('train', 'training', 3, ('RGB', 'L', 'CMYK')),
                                  ('val', 'validation', 1, ('RGB',))):
    for k in range(1, n + 1):
      stem = f'ADE_{split}_{k:08d}'
      jpg = save(os.path.join(root, 'images', folder, stem + '.jpg'), rgb(k), mode=modes[k - 1],
                 quality=95)
      raw = np.roll(ids_mask([0, 1, 2, 75, 149, 150]), k, axis=0)
      save(os.path.join(root, 'annotations', folder, stem + '.png'), raw)
      files[stem] = (jpg, raw)
  for name in ('objectInfo150.txt', 'sceneCategories.txt'):
    open(os.path.join(root, name), 'w').close()
  return files


def test_ade20k(tmp_path):
  files = write_ade(tmp_path / 'ade')
  assert pil_mode(files['ADE_train_00000002'][0]) == 'L'
  assert pil_mode(files['ADE_train_00000003'][0]) == 'CMYK'
  # manual_dir may hold ADEChallengeData2016/ or be it.
  for manual_dir in (tmp_path / 'ade', tmp_path / 'ade' / 'ADEChallengeData2016'):
    b = build(Ade20k, manual_dir, tmp_path)
    assert b.info.metadata['num_classes'] == 150
    assert b.info.metadata['class_names'][-1] == 'flag'
    assert b.info.splits['train'].num_examples == 3 and b.info.splits['val'].num_examples == 1
    for split in ('train', 'val'):
      src = b.as_data_source(split)
      assert names(src) == sorted(s for s in files if s.startswith(f'ADE_{split}_'))
      for i in range(len(src)):
        jpg, raw = files[src[i]['name'].decode()]
        label = src[i]['label'][..., 0]
        assert np.array_equal(label[raw == 0], np.full((raw == 0).sum(), 255, np.uint8))
        assert np.array_equal(label[raw > 0], raw[raw > 0] - 1)
        assert label.max(initial=0) == 255 and 149 in label
        image = src[i]['image']
        assert image.shape == (H, W, 3)
        if pil_mode(jpg) == 'RGB':  # original JPEG bytes kept; decoders may differ by 1
          assert np.abs(image.astype(int) - pil_rgb(jpg)).max() <= 2
        else:  # converted by PIL and stored losslessly
          assert np.array_equal(image, pil_rgb(jpg))
  gray = b.as_data_source('train')[1]['image']
  assert np.array_equal(gray[..., 0], gray[..., 2])


def test_ade20k_errors(tmp_path):
  files = write_ade(tmp_path / 'range')
  mask = tmp_path / 'range' / 'ADEChallengeData2016' / 'annotations' / 'validation' / \
      'ADE_val_00000001.png'
  save(str(mask), ids_mask([0, 150, 151]))
  msg = build_error(Ade20k, tmp_path / 'range', tmp_path, mask)
  assert '[151]' in msg

  files = write_ade(tmp_path / 'trunc')
  jpg = files['ADE_train_00000001'][0]
  truncate(jpg)
  build_error(Ade20k, tmp_path / 'trunc', tmp_path, jpg)

  write_ade(tmp_path / 'nomask')
  ann = tmp_path / 'nomask' / 'ADEChallengeData2016' / 'annotations' / 'training'
  os.remove(ann / 'ADE_train_00000002.png')
  build_error(Ade20k, tmp_path / 'nomask', tmp_path,
              tmp_path / 'nomask' / 'ADEChallengeData2016' / 'images' / 'training' /
              'ADE_train_00000002.jpg')

  os.makedirs(tmp_path / 'empty')
  open(tmp_path / 'empty' / 'README', 'w').close()  # tfds refuses an empty manual_dir itself
  build_error(Ade20k, tmp_path / 'empty', tmp_path,
              tmp_path / 'empty' / 'ADEChallengeData2016')


# --- SUN RGB-D -----------------------------------------------------------------------------------

def write_sun(root, train=(5051, 5052), test=(1, 2)):
  files = {}
  for split_dir, ids in (('SUNRGBD-train_images', train), ('SUNRGBD-test_images', test)):
    for n in ids:
      stem = f'img-{n:06d}'
      jpg = save(os.path.join(root, split_dir, stem + '.jpg'), rgb(n, 24, 32))
      raw = np.roll(ids_mask([0, 1, 2, 36, 37], 24, 32), n, axis=1)
      save(os.path.join(root, 'sunrgbd_train_test_labels', stem + '.png'), raw)
      files[stem] = (jpg, raw)
  return files


def test_sun_rgbd(tmp_path):
  files = write_sun(tmp_path / 'sun', train=(5052, 5051, 10335), test=(5050, 1))
  b = build(SunRgbd, tmp_path / 'sun', tmp_path)
  assert b.info.metadata['num_classes'] == 37
  assert set(b.info.splits.keys()) == {'train', 'test'}
  train, test = b.as_data_source('train'), b.as_data_source('test')
  assert names(train) == ['img-005051', 'img-005052', 'img-010335']
  assert names(test) == ['img-000001', 'img-005050']
  for src in (train, test):
    for i in range(len(src)):
      jpg, raw = files[src[i]['name'].decode()]
      expected = np.where(raw == 0, 255, raw.astype(int) - 1).astype(np.uint8)
      assert np.array_equal(src[i]['label'][..., 0], expected)
      assert set(np.unique(expected).tolist()) == {0, 1, 35, 36, 255}
      assert np.abs(src[i]['image'].astype(int) - pil_rgb(jpg)).max() <= 2


def test_sun_rgbd_errors(tmp_path):
  write_sun(tmp_path / 'nolabel')
  os.remove(tmp_path / 'nolabel' / 'sunrgbd_train_test_labels' / 'img-000002.png')
  build_error(SunRgbd, tmp_path / 'nolabel', tmp_path,
              tmp_path / 'nolabel' / 'SUNRGBD-test_images' / 'img-000002.jpg')

  write_sun(tmp_path / 'range')
  bad = tmp_path / 'range' / 'sunrgbd_train_test_labels' / 'img-005052.png'
  save(str(bad), ids_mask([0, 38], 24, 32))
  assert '[38]' in build_error(SunRgbd, tmp_path / 'range', tmp_path, bad)

  write_sun(tmp_path / 'notest')
  for f in os.listdir(tmp_path / 'notest' / 'SUNRGBD-test_images'):
    os.remove(tmp_path / 'notest' / 'SUNRGBD-test_images' / f)
  os.rmdir(tmp_path / 'notest' / 'SUNRGBD-test_images')
  build_error(SunRgbd, tmp_path / 'notest', tmp_path,
              tmp_path / 'notest' / 'SUNRGBD-test_images')


# --- Folder --------------------------------------------------------------------------------------

def write_folder(root, classes=('background', 'cat', 'dog')):
  """train: png + jpg + bmp images, palette and grayscale masks; val: one image."""
  files = {}
  specs = {'train': [('b_img', 'jpg'), ('a_img', 'png'), ('c_img', 'bmp')],
           'val': [('x', 'jpeg')]}
  for split, items in specs.items():
    for k, (stem, ext) in enumerate(items):
      image = save(os.path.join(root, 'images', split, f'{stem}.{ext}'), rgb(k))
      mask = np.roll(ids_mask([0, 1, 2, 255]), k, axis=1)
      mask_path = os.path.join(root, 'masks', split, f'{stem}.png')
      if k % 2 == 0:
        save_palette(mask_path, mask)
      else:
        save(mask_path, mask)
      files[stem] = (image, mask)
  if classes is not None:
    with open(os.path.join(root, 'classes.txt'), 'w') as f:
      f.write(''.join(f'{c}\n' for c in classes) + '\n')
  return files


def build_folder(root, tmp_path, name='mydata'):
  b = Folder(config=FolderConfig(name=name, root=str(root)),
             data_dir=str(tmp_path / f'tfds{next(_counter)}'))
  b.download_and_prepare()
  return b


def test_folder(tmp_path):
  files = write_folder(tmp_path / 'data')
  b = build_folder(tmp_path / 'data', tmp_path)
  assert b.class_names == ('background', 'cat', 'dog')
  assert b.info.metadata['class_names'] == ['background', 'cat', 'dog']
  assert b.info.metadata['num_classes'] == 3
  assert os.path.basename(os.path.dirname(b.data_dir)).startswith('mydata-')
  assert set(b.info.splits.keys()) == {'train', 'val'}
  train = b.as_data_source('train')
  assert names(train) == ['a_img', 'b_img', 'c_img']
  for src in (train, b.as_data_source('val')):
    for i in range(len(src)):
      image, mask = files[src[i]['name'].decode()]
      assert np.array_equal(src[i]['label'][..., 0], mask)
      if image.endswith('.png') or image.endswith('.bmp'):
        assert np.array_equal(src[i]['image'], pil_rgb(image))
      else:
        assert np.abs(src[i]['image'].astype(int) - pil_rgb(image)).max() <= 2


def test_folder_errors(tmp_path):
  root = tmp_path / 'nomask'
  write_folder(root)
  os.remove(root / 'masks' / 'train' / 'b_img.png')
  build_error(Folder, None, tmp_path, root / 'images' / 'train' / 'b_img.jpg',
              config=FolderConfig(name='nomask', root=str(root)))

  root = tmp_path / 'noimage'
  write_folder(root)
  save(str(root / 'masks' / 'val' / 'extra.png'), ids_mask([0]))
  with pytest.raises(DatasetError, match=re.escape(str(root / 'masks' / 'val' / 'extra.png'))):
    build_folder(root, tmp_path)

  root = tmp_path / 'nomaskdir'
  write_folder(root)
  os.makedirs(root / 'images' / 'test')
  save(str(root / 'images' / 'test' / 't.png'), rgb(0))
  with pytest.raises(DatasetError, match=re.escape(str(root / 'masks' / 'test'))):
    build_folder(root, tmp_path)

  root = tmp_path / 'range'
  write_folder(root)
  save(str(root / 'masks' / 'val' / 'x.png'), ids_mask([0, 3]))
  with pytest.raises(DatasetError, match=re.escape(str(root / 'masks' / 'val' / 'x.png'))):
    build_folder(root, tmp_path)

  root = tmp_path / 'nosplits'
  os.makedirs(root / 'images')
  (root / 'classes.txt').write_text('a\n')
  with pytest.raises(DatasetError, match=re.escape(str(root / 'images'))):
    build_folder(root, tmp_path)


@pytest.mark.parametrize('classes', [None, (), ('a', 'a'), tuple(f'c{i}' for i in range(256))])
def test_folder_bad_classes(tmp_path, classes):
  root = tmp_path / 'data'
  write_folder(root, classes=classes)
  if classes is None:
    (root / 'classes.txt').unlink(missing_ok=True)
  with pytest.raises(DatasetError, match=re.escape(str(root / 'classes.txt'))):
    Folder(config=FolderConfig(name='bad', root=str(root)), data_dir=str(tmp_path / 'tfds'))


def test_folder_255_classes_and_needs_config(tmp_path):
  root = tmp_path / 'data'
  write_folder(root, classes=[f'c{i}' for i in range(255)])
  assert len(build_folder(root, tmp_path).class_names) == 255
  with pytest.raises(ValueError, match='FolderConfig'):
    Folder(data_dir=str(tmp_path / 'tfds'))
