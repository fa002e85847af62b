"""CamVid from real SegNet-layout data (``CAMVID``, outside the repository: skipped when absent),
and the generic bad-input errors."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from refinenet_jax.data import datasets
from refinenet_jax.data.builders.base import DatasetError

tfds.disable_progress_bar()

CAMVID = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'camvid')
needs_camvid = pytest.mark.skipif(not os.path.isdir(CAMVID), reason='../shared/data/camvid absent')


def _png(path, mode=None):
  with Image.open(path) as im:
    return np.asarray(im.convert(mode) if mode else im)


def _histogram(masks, void=11):
  h = np.zeros(256, np.int64)
  for m in masks:
    a = np.asarray(m).astype(np.int64)
    a[a == void] = 255
    h += np.bincount(a.ravel(), minlength=256)
  return h


@needs_camvid
def test_camvid_builds_from_the_real_data_with_its_class_histogram(tmp_path):
  b = datasets.prepare('camvid', str(tmp_path), manual_dir=CAMVID)
  assert datasets.info(b).splits == ('train', 'val')  # the data has no test/: none invented
  for split, n in (('train', 367), ('val', 101)):
    src = datasets.data_source(b, split)
    assert len(src) == n
    with open(os.path.join(CAMVID, f'{split}.txt')) as f:
      rows = [line.split() for line in f]
    names = [os.path.splitext(os.path.basename(r[1]))[0] for r in rows]
    examples = [src[i] for i in range(n)]
    assert [e['name'].decode() for e in examples] == names  # list order is kept
    want = _histogram(_png(os.path.join(CAMVID, f'{split}annot', f'{m}.png')) for m in names)
    got = _histogram((e['label'][..., 0] for e in examples), void=None)
    np.testing.assert_array_equal(got, want)
    assert got[11:255].sum() == 0 and got[:11].all()  # all 11 classes present, void -> 255
    assert all(e['image'].shape == (360, 480, 3) for e in examples[:5])
    np.testing.assert_array_equal(  # PNG images are stored as they are: decoded exactly
        examples[0]['image'],
        _png(os.path.join(CAMVID, split, names[0] + '.png'), 'RGB'))


def _tiny_camvid(root, n=3):
  """A format-true SegNet layout with n train and n val images of 12x16."""
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    os.makedirs(root / split)
    os.makedirs(root / f'{split}annot')
    rows = []
    for i in range(n):
      name = f'{split}_{i:03d}.png'
      Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(root / split / name)
      Image.fromarray(rng.integers(0, 12, (12, 16), dtype=np.uint8), mode='L').save(
          root / f'{split}annot' / name)
      rows.append(f'/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}\n')
    (root / f'{split}.txt').write_text(''.join(rows))
  return root


def _build_error(tmp_path, root, path):
  with pytest.raises(DatasetError) as e:
    datasets.prepare('camvid', str(tmp_path / 'tfds'), manual_dir=str(root))
  assert os.fspath(path) in str(e.value), str(e.value)
  return str(e.value)


def test_tiny_camvid_layout_builds(tmp_path):
  root = _tiny_camvid(tmp_path / 'CamVid')
  b = datasets.prepare('camvid', str(tmp_path / 'tfds'), manual_dir=str(root))
  lab = datasets.data_source(b, 'val')[2]['label'][..., 0]
  raw = _png(root / 'valannot' / 'val_002.png')
  np.testing.assert_array_equal(lab, np.where(raw == 11, 255, raw))


def test_corrupt_image_is_named(tmp_path):
  root = _tiny_camvid(tmp_path / 'CamVid')
  bad = root / 'train' / 'train_001.png'
  bad.write_bytes(bad.read_bytes()[:60])
  assert 'cannot decode' in _build_error(tmp_path, root, bad)


def test_wrong_size_mask_is_named(tmp_path):
  root = _tiny_camvid(tmp_path / 'CamVid')
  bad = root / 'valannot' / 'val_000.png'
  Image.fromarray(np.zeros((12, 15), np.uint8), mode='L').save(bad)
  assert '12x15' in _build_error(tmp_path, root, bad)


def test_label_outside_the_class_range_is_named(tmp_path):
  root = _tiny_camvid(tmp_path / 'CamVid')
  bad = root / 'trainannot' / 'train_002.png'
  a = np.zeros((12, 16), np.uint8)
  a[3, 4] = 12  # 0..10 are classes, 11 is void: 12 is neither
  Image.fromarray(a, mode='L').save(bad)
  assert '[12]' in _build_error(tmp_path, root, bad)


def test_missing_mask_and_missing_split_list_are_named(tmp_path):
  root = _tiny_camvid(tmp_path / 'CamVid')
  gone = root / 'trainannot' / 'train_000.png'
  gone.unlink()
  _build_error(tmp_path, root, gone)
  root2 = _tiny_camvid(tmp_path / 'CamVid2')
  (root2 / 'val.txt').unlink()
  assert 'split list' in _build_error(tmp_path, root2, root2 / 'val.txt')


def test_a_built_dataset_no_longer_needs_its_archives(tmp_path):
  root = _tiny_camvid(tmp_path / 'CamVid')
  b = datasets.prepare('camvid', str(tmp_path / 'tfds'), manual_dir=str(root))
  before = datasets.data_source(b, 'train')[0]['image']
  shutil.rmtree(root)
  b2 = datasets.prepare('camvid', str(tmp_path / 'tfds'))
  np.testing.assert_array_equal(datasets.data_source(b2, 'train')[0]['image'], before)


def test_prepare_command_line(tmp_path, capsys):
  from refinenet_jax.data.__main__ import main
  root = _tiny_camvid(tmp_path / 'CamVid')
  assert main(['camvid', '--data_dir', str(tmp_path / 'tfds'), '--manual_dir', str(root)]) == 0
  out = capsys.readouterr().out
  assert 'train: 3 examples' in out and 'val: 3 examples' in out
  assert main(['ade20k', '--data_dir', str(tmp_path / 'tfds')]) == 1  # not built, no archives
  assert 'ADEChallengeData2016.zip' in capsys.readouterr().err
