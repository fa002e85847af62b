"""A build is reused only while its source folder is unchanged, and images of every PIL mode are
stored by their real range (16-bit, 32-bit, float), never clipped."""
from __future__ import annotations

import io
import os
import re
import warnings

import cv2

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from refinenet_jax.data import datasets
from refinenet_jax.data.builders import base
from refinenet_jax.data.builders.folder import FolderConfig
from tests.test_builders_misc import ids_mask, labels, names, rgb, save, write_folder, write_nyu

tfds.disable_progress_bar()


def prepare_folder(root, data_dir):
  """What ``train.make_data`` does: the folder's basename is the dataset name."""
  root = os.fspath(root)
  return datasets.prepare('folder', os.fspath(data_dir),
                          config=FolderConfig(name=os.path.basename(root), root=root))


def built_files(builder):
  """File name -> (inode, mtime_ns) of a build: a rebuild rewrites every file."""
  path = os.fspath(builder.data_path)
  return {f: (os.stat(os.path.join(path, f)).st_ino, os.stat(os.path.join(path, f)).st_mtime_ns)
          for f in sorted(os.listdir(path))}


def read_stored(data: bytes) -> np.ndarray:
  """Stored image bytes decoded as training reads them (tfds's Image feature, via OpenCV)."""
  return tfds.features.Image(shape=(None, None, 3)).decode_example_np(data)


def add_example(root, split, stem, seed, mask_values=(0, 1)):
  save(os.path.join(root, 'images', split, f'{stem}.png'), rgb(seed))
  save(os.path.join(root, 'masks', split, f'{stem}.png'), ids_mask(mask_values))


# --- A. stale builds -----------------------------------------------------------------------------

def test_added_image_rebuilds(tmp_path, capsys):
  root = tmp_path / 'ds'
  write_folder(root)
  b = prepare_folder(root, tmp_path / 'tfds')
  assert len(b.as_data_source('train')) == 3
  add_example(root, 'train', 'd_img', 7)
  capsys.readouterr()
  b = prepare_folder(root, tmp_path / 'tfds')
  out = capsys.readouterr().out
  assert f'2 files added: rebuilding {b.data_path}' in out, out  # the image and its mask
  assert names(b.as_data_source('train')) == ['a_img', 'b_img', 'c_img', 'd_img']


def test_rewritten_mask_rebuilds(tmp_path, capsys):
  root = tmp_path / 'ds'
  files = write_folder(root)
  b = prepare_folder(root, tmp_path / 'tfds')
  assert np.array_equal(labels(b.as_data_source('train'))[0], files['a_img'][1])
  new_mask = np.full_like(files['a_img'][1], 2)
  save(os.fspath(root / 'masks' / 'train' / 'a_img.png'), new_mask)
  capsys.readouterr()
  b = prepare_folder(root, tmp_path / 'tfds')
  assert '1 file modified: rebuilding' in capsys.readouterr().out
  assert np.array_equal(labels(b.as_data_source('train'))[0], new_mask)


def test_same_basename_different_roots_never_share(tmp_path, capsys):
  a, b = tmp_path / 'a' / 'ds', tmp_path / 'b' / 'ds'
  write_folder(a, classes=('bg', 'cat', 'dog'))
  write_folder(b, classes=('bg', 'cat', 'dog', 'car', 'bus'))
  add_example(b, 'val', 'y', 9, mask_values=(3, 4))
  data_dir = tmp_path / 'tfds'
  built_a = prepare_folder(a, data_dir)
  built_b = prepare_folder(b, data_dir)
  assert built_a.data_path != built_b.data_path
  for built, num_classes, num_val in ((built_a, 3, 1), (built_b, 5, 2)):
    assert datasets.info(built).num_classes == num_classes
    assert built.info.metadata['num_classes'] == num_classes
    assert len(built.as_data_source('val')) == num_val
  before = built_files(built_a)
  capsys.readouterr()
  again = prepare_folder(a, data_dir)  # b's build did not replace a's
  assert 'rebuilding' not in capsys.readouterr().out
  assert datasets.info(again).num_classes == 3 and built_files(again) == before


def test_unchanged_source_is_reused(tmp_path, capsys):
  root = tmp_path / 'ds'
  write_folder(root)
  b = prepare_folder(root, tmp_path / 'tfds')
  before = built_files(b)
  assert any(f.endswith('.array_record-00000-of-00001') for f in before), before
  assert base.SOURCE_FILE in before
  capsys.readouterr()
  b = prepare_folder(root, tmp_path / 'tfds')
  assert 'rebuilding' not in capsys.readouterr().out
  assert built_files(b) == before and len(b.as_data_source('train')) == 3
  # classes.txt rewritten: the class count read at build time must not be reused
  (root / 'classes.txt').write_text('background\ncat\ndog\nbird\n')
  b = prepare_folder(root, tmp_path / 'tfds')
  assert '1 file modified, classes.txt changed: rebuilding' in capsys.readouterr().out
  assert b.info.metadata['num_classes'] == 4


def test_manual_dir_builds_are_checked_too(tmp_path, capsys):
  mask = ids_mask([0, 39, 255, 7])
  rows = {'train': [('000003', rgb(0), mask)], 'val': [('000001', rgb(1), mask)]}
  first, second = tmp_path / 'x' / 'nyu', tmp_path / 'y' / 'nyu'
  write_nyu(first, rows)
  write_nyu(second, {'train': rows['train'] + [('000004', rgb(2), mask)], 'val': rows['val']})
  data_dir = os.fspath(tmp_path / 'tfds')
  b = datasets.prepare('nyudv2_40', data_dir, manual_dir=os.fspath(first))
  before = built_files(b)
  capsys.readouterr()
  assert built_files(datasets.prepare('nyudv2_40', data_dir, manual_dir=os.fspath(first))) == before
  assert built_files(datasets.prepare('nyudv2_40', data_dir)) == before  # no manual_dir: as built
  assert 'rebuilding' not in capsys.readouterr().out
  b = datasets.prepare('nyudv2_40', data_dir, manual_dir=os.fspath(second))
  assert f'built from {first}, not {second}: rebuilding' in capsys.readouterr().out
  assert len(b.as_data_source('train')) == 2
  os.remove(os.path.join(b.data_path, base.SOURCE_FILE))  # as an older version left it
  datasets.prepare('nyudv2_40', data_dir, manual_dir=os.fspath(second))
  assert 'no record of its source folder' in capsys.readouterr().out
  with pytest.raises(base.DatasetError, match=re.escape(str(tmp_path / 'gone'))):  # build kept
    datasets.prepare('nyudv2_40', data_dir, manual_dir=os.fspath(tmp_path / 'gone'))
  assert datasets.prepare('nyudv2_40', data_dir).is_prepared()


# --- B. images of every PIL mode -----------------------------------------------------------------

_GRAY = np.arange(256, dtype=np.uint8).reshape(16, 16)
_WIDE = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
_WIDE[0, :3] = (0, 32768, 65535)
_PALETTE = np.random.default_rng(3).integers(0, 256, (256, 3), dtype=np.uint8)
_ALPHA = np.random.default_rng(4).integers(0, 256, (16, 16), dtype=np.uint8)


def _gray3(values):
  return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=2)


def _palette_image(transparency):
  im = Image.fromarray(_GRAY, mode='L').convert('P')
  im.putpalette(_PALETTE.ravel().tolist())
  if transparency:
    im.info['transparency'] = 5
  return im


def _mode_case(mode):
  """(image, file extension, expected RGB)."""
  wide16 = np.rint(_WIDE.astype(np.float64) * 255 / 65535).astype(np.uint8)
  if mode == '1':
    bits = _GRAY % 3 == 0
    return Image.fromarray(bits), 'png', _gray3(bits * 255)
  if mode == 'L':
    return Image.fromarray(_GRAY), 'png', _gray3(_GRAY)
  if mode == 'LA':
    return Image.fromarray(np.stack([_GRAY, _ALPHA], -1), mode='LA'), 'png', _gray3(_GRAY)
  if mode in ('P', 'P+transparency'):
    return _palette_image(mode != 'P'), 'png', _PALETTE[_GRAY]
  image = rgb(5, 16, 16)
  if mode == 'RGB':
    return Image.fromarray(image), 'png', image
  if mode == 'RGBA':
    rgba = np.concatenate([image, _ALPHA[..., None]], -1)
    return Image.fromarray(rgba, mode='RGBA'), 'png', image
  if mode == 'CMYK':
    return Image.fromarray(image).convert('CMYK'), 'tif', image
  if mode == 'CMYK JPEG':
    return Image.fromarray(image).convert('CMYK'), 'jpg', None  # lossy: PIL's decode is expected
  if mode == 'I;16':
    return Image.fromarray(_WIDE), 'png', _gray3(wide16)
  if mode == 'I;16B':  # not via convert(), which clips to 0..255
    return Image.fromarray(_WIDE.astype('>u2')), 'tif', _gray3(wide16)
  if mode == 'I 8-bit':
    return Image.fromarray(_GRAY.astype(np.int32)), 'tif', _gray3(_GRAY)
  if mode == 'I 16-bit':
    return Image.fromarray(_WIDE.astype(np.int32)), 'tif', _gray3(wide16)
  if mode == 'F 0..1':
    values = _GRAY.astype(np.float32) / 255
    return Image.fromarray(values), 'tif', _gray3(_GRAY)
  if mode == 'F 0..255':
    values = _GRAY.astype(np.float32)
    values[values < 255] += 0.3
    return Image.fromarray(values), 'tif', _gray3(_GRAY)
  raise ValueError(mode)


@pytest.mark.parametrize('mode', ['1', 'L', 'LA', 'P', 'P+transparency', 'RGB', 'RGBA', 'CMYK',
                                  'CMYK JPEG', 'I;16', 'I;16B', 'I 8-bit', 'I 16-bit', 'F 0..1',
                                  'F 0..255'])
def test_every_mode_stored_by_its_range(tmp_path, mode):
  im, ext, expected = _mode_case(mode)
  path = os.fspath(tmp_path / f'image.{ext}')
  im.save(path)
  with Image.open(path) as reopened:
    assert reopened.mode == im.mode
    if expected is None:
      expected = np.asarray(reopened.convert('RGB'))
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # e.g. PIL's palette-transparency warning
    data, hw = base.encode_image(path, '')
  assert hw == (16, 16)
  with Image.open(io.BytesIO(data)) as stored:
    assert stored.mode == 'RGB'
  assert np.array_equal(read_stored(data), expected)
  with Image.open(path) as reopened:
    converted = base.to_rgb(reopened, path)
  assert converted.dtype == np.uint8 and converted.shape == (16, 16, 3)
  assert np.array_equal(converted, expected)
  if mode.startswith('I;16'):
    assert (converted == 255).mean() < 0.01
    assert tuple(converted[0, :3, 0]) == (0, 128, 255)


def test_16bit_rgb_png_is_not_stored_as_is(tmp_path):
  """PIL reads a 16-bit RGB PNG as 8-bit 'RGB'; its bytes, kept, decoded to wrapped low bytes."""
  wide = np.random.default_rng(8).integers(0, 65536, (16, 16, 3)).astype(np.uint16)
  path = os.fspath(tmp_path / 'deep_rgb.png')
  assert cv2.imwrite(path, wide[..., ::-1])  # OpenCV writes BGR
  data, _ = base.encode_image(path, '')
  assert np.array_equal(read_stored(data), (wide >> 8).astype(np.uint8))  # as PIL reads it


@pytest.mark.parametrize('values, message', [
    (np.array([[0, 70000]], np.int32), 'values 0..70000'),
    (np.array([[-1, 200]], np.int32), 'values -1..200'),
    (np.array([[0, 300.5]], np.float32), 'values 0..300.5'),
    (np.array([[-0.5, 0.5]], np.float32), 'values -0.5..0.5'),
    (np.array([[0, np.nan]], np.float32), 'NaN')])
def test_out_of_range_modes_refused(tmp_path, values, message):
  path = os.fspath(tmp_path / 'wide.tif')
  Image.fromarray(values).save(path)
  with pytest.raises(base.DatasetError, match=re.escape(path)) as info:
    base.encode_image(path, '')
  assert message in str(info.value)


def test_folder_stores_16bit_tiff_and_cmyk_images(tmp_path):
  """The reported case, end to end: a 16-bit PNG in a folder dataset was stored saturated."""
  root = tmp_path / 'ds'
  write_folder(root)
  Image.fromarray(_WIDE).save(root / 'images' / 'val' / 'deep.png')
  Image.fromarray(rgb(6, 16, 16)).convert('CMYK').save(root / 'images' / 'val' / 'print.tiff')
  Image.fromarray(rgb(7, 16, 16)).save(root / 'images' / 'val' / 'scan.TIF')
  for stem in ('deep', 'print', 'scan'):
    save(os.fspath(root / 'masks' / 'val' / f'{stem}.png'), ids_mask([0, 1], 16, 16))
  val = prepare_folder(root, tmp_path / 'tfds').as_data_source('val')
  stored = {val[i]['name'].decode(): val[i]['image'] for i in range(len(val))}
  assert np.array_equal(stored['deep'], _mode_case('I;16')[2])
  assert (stored['deep'] == 255).mean() < 0.01
  assert np.array_equal(stored['print'], rgb(6, 16, 16))
  assert np.array_equal(stored['scan'], rgb(7, 16, 16))
