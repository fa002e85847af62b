"""Shared machinery of the segmentation TFDS builders.

Every builder stores examples as ``{'image': encoded RGB bytes, 'label': 1-channel PNG of class
ids, 'name': str}`` in ArrayRecord files, read back with ``builder.as_data_source(split)`` (what
``tfds.data_source`` calls) and no TensorFlow. Images keep their original bytes when they are
8-bit RGB JPEG/PNG, so nothing is recompressed; labels are always re-encoded as grayscale PNG of
*training* ids (void = ``IGNORE_LABEL``), because OpenCV, which tfds decodes with, expands
palette PNGs to BGR colours.

Everything is validated while building: a file that cannot be decoded, a mask whose size differs
from its image, a label value that is neither a class id nor the ignore value, a missing file or
split list raises :class:`DatasetError` naming the file. Nothing is skipped.

A build from a folder (``manual_dir``, or a folder dataset's root) stores :func:`source_record`
of that folder next to its ArrayRecord files, so ``datasets.prepare`` can tell a reusable build
from one made from other or since-edited files.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

IGNORE_LABEL = 255
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
SOURCE_FILE = 'source.json'  # in the build directory: what the build was made from
CLASSES_FILE = 'classes.txt'


class DatasetError(ValueError):
  """Bad input data; the message names the offending file."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One image/label pair before encoding.

  ``image`` is a path or encoded bytes (or a callable returning either); ``label`` is a path to
  an index PNG or a callable returning a uint8 array of training ids, in which case
  ``label_source`` names the file it reads (for error messages).
  """
  name: str
  image: str | os.PathLike | bytes | Callable[[], bytes]
  label: str | os.PathLike | Callable[[], np.ndarray]
  label_source: str = ''


def default_palette(num_classes: int) -> np.ndarray:
  """The PASCAL VOC colour map (bit-interleaved), the de-facto default for index masks."""
  palette = np.zeros((256, 3), np.uint8)
  for i in range(256):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    palette[i] = (r, g, b)
  return palette[:num_classes]


def require_file(path, what: str = 'file') -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DatasetError(f'missing {what}: {path}')
  return path


def require_dir(path, what: str = 'directory') -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise DatasetError(f'missing {what}: {path}')
  return path


def read_list(path, what: str = 'split list') -> list[list[str]]:
  """Whitespace-separated rows of a list file (blank lines and '#' comments dropped)."""
  require_file(path, what)
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line and not line.startswith('#'):
        rows.append(line.split())
  if not rows:
    raise DatasetError(f'empty {what}: {path}')
  return rows


def glob_pairs(image_dir: str, pattern: str, mask_dir: str) -> list[Example]:
  """Sorted images matching ``pattern`` paired with ``mask_dir/<stem>.png``; both must exist."""
  images = sorted(glob.glob(os.path.join(glob.escape(image_dir), pattern)))
  if not images:
    raise DatasetError(f'no {pattern} images in {image_dir}')
  examples = []
  for image in images:
    stem = os.path.splitext(os.path.basename(image))[0]
    mask = os.path.join(mask_dir, stem + '.png')
    if not os.path.isfile(mask):
      raise DatasetError(f'image {image} has no mask (expected {mask})')
    examples.append(Example(stem, image, mask))
  return examples


def _open_image(data: bytes, source: str) -> Image.Image:
  try:
    im = Image.open(io.BytesIO(data))
    im.load()  # forces a full decode: truncated files fail here, not at training time
  except Exception as e:  # PIL raises several unrelated types for bad files
    raise DatasetError(f'cannot decode image {source}: {e}') from e
  return im


def _scale_16bit(values: np.ndarray) -> np.ndarray:
  """0..65535 -> 0..255, rounded (32768 -> 128)."""
  return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _integer_gray(values: np.ndarray, mode: str, source: str) -> np.ndarray:
  lo, hi = int(values.min()), int(values.max())
  if lo >= 0 and hi <= 255:
    return values.astype(np.uint8)
  if lo >= 0 and hi <= 65535:
    return _scale_16bit(values)
  raise DatasetError(f'image {source} has PIL mode {mode!r} with values {lo}..{hi}; only 0..255 '
                     '(8-bit) or 0..65535 (16-bit) map to RGB without clipping: save it as an '
                     '8- or 16-bit image')


def _float_gray(values: np.ndarray, source: str) -> np.ndarray:
  if not np.isfinite(values).all():
    raise DatasetError(f'image {source} (PIL mode \'F\') has NaN or infinite values')
  lo, hi = float(values.min()), float(values.max())
  if lo >= 0 and hi <= 1:
    return np.rint(values * 255).astype(np.uint8)
  if lo >= 0 and hi <= 255:
    return np.rint(values).astype(np.uint8)
  raise DatasetError(f'image {source} (PIL mode \'F\') has values {lo:g}..{hi:g}; only 0..1 or '
                     '0..255 map to RGB without clipping: rescale it and save it as an 8-bit image')


def to_rgb(image: Image.Image, source: str) -> np.ndarray:
  """An (H, W, 3) uint8 RGB array of a decoded image, each PIL mode read by its real range.

  PIL's ``convert('RGB')`` clips wider modes to 0..255 (a 16-bit image turns almost all white),
  so they are scaled here: 16-bit by 255/65535; 32-bit integer ('I') kept if within 0..255,
  scaled as 16-bit if within 0..65535; float ('F') scaled by 255 if within 0..1, rounded if
  within 0..255. Anything else is refused (DatasetError naming ``source``), never clipped.
  Alpha is dropped; palette, 1-bit, CMYK, YCbCr... go through PIL's exact 8-bit conversions.
  """
  mode = image.mode
  if mode == 'I' or mode.startswith('I;'):
    values = np.asarray(image)
    gray = (_scale_16bit(values) if values.dtype.kind == 'u' and values.dtype.itemsize == 2
            else _integer_gray(values, mode, source))
  elif mode == 'F':
    gray = _float_gray(np.asarray(image, np.float64), source)
  else:
    try:  # palettes via RGBA: PIL warns when a palette's transparency is dropped directly
      rgb = image.convert('RGBA' if mode in ('P', 'PA') else 'RGB')
    except (ValueError, OSError) as e:
      raise DatasetError(f'image {source} has PIL mode {mode!r}, which PIL cannot convert to '
                         f'RGB ({e}); save it as RGB') from e
    return np.ascontiguousarray(np.asarray(rgb, np.uint8)[..., :3])
  return np.repeat(gray[..., None], 3, axis=2)


def _is_8bit_rgb_file(im: Image.Image, data: bytes) -> bool:
  """JPEG, or PNG of 8-bit truecolour (PIL also reads 16-bit RGB PNGs as mode 'RGB')."""
  if im.mode != 'RGB':
    return False
  return im.format == 'JPEG' or (im.format == 'PNG' and data[24:26] == b'\x08\x02')


def encode_image(image, source: str) -> tuple[bytes, tuple[int, int]]:
  """Validated RGB bytes and (height, width); original bytes kept for 8-bit RGB JPEG/PNG."""
  if callable(image):
    image = image()
  if isinstance(image, (str, os.PathLike)):
    source = source or os.fspath(image)
    with open(require_file(image, 'image'), 'rb') as f:
      data = f.read()
  else:
    data = bytes(image)
  im = _open_image(data, source)
  if _is_8bit_rgb_file(im, data):
    return data, (im.height, im.width)
  buf = io.BytesIO()  # grayscale, 16-bit, float, CMYK, palette, RGBA, BMP, TIFF...: RGB PNG
  Image.fromarray(to_rgb(im, source)).save(buf, format='PNG')
  return buf.getvalue(), (im.height, im.width)


def source_record(root, exclude=None) -> dict:
  """What a build from folder ``root`` reads, to tell later whether the build is still current.

  Every file under ``root`` (hidden ones skipped, links followed) by relative path -> [size,
  mtime_ns], the sha256 of ``classes.txt`` (None if absent), and ``fingerprint``: the sha256 of
  both. ``exclude`` (a data_dir inside ``root``) is skipped so that building does not change it.
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  skip = {os.path.realpath(exclude)} if exclude else set()
  files, seen = {}, set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen or real in skip:  # a linked cycle, or the data_dir itself
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    for name in filenames:
      path = os.path.join(dirpath, name)
      if name.startswith('.') or not os.path.isfile(path):  # hidden, or a dangling link
        continue
      st = os.stat(path)
      files[os.path.relpath(path, root).replace(os.sep, '/')] = [st.st_size, st.st_mtime_ns]
  classes_path = os.path.join(root, CLASSES_FILE)
  classes = None
  if os.path.isfile(classes_path):
    with open(classes_path, 'rb') as f:
      classes = hashlib.sha256(f.read()).hexdigest()
  digest = hashlib.sha256(json.dumps([sorted(files.items()), classes]).encode()).hexdigest()
  return {'root': root, 'fingerprint': digest, 'classes_sha256': classes, 'files': files}


def read_source_record(build_dir) -> dict | None:
  """The :func:`source_record` stored in a build directory; None if absent or unreadable."""
  try:
    with open(os.path.join(os.fspath(build_dir), SOURCE_FILE)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) and 'fingerprint' in record else None


def source_change(stored: dict | None, current: dict) -> str:
  """What differs between a build's stored source record and the folder now ('' if nothing)."""
  if stored is None:
    return 'no record of its source folder (built by an older version)'
  if stored.get('root') != current['root']:
    return f'built from {stored.get("root")}, not {current["root"]}'
  if stored['fingerprint'] == current['fingerprint']:
    return ''
  old, new = stored.get('files', {}), current['files']
  counts = (('added', len(new.keys() - old.keys())), ('removed', len(old.keys() - new.keys())),
            ('modified', sum(1 for k in new.keys() & old.keys() if new[k] != old[k])))
  counts = [(n, what) for what, n in counts if n]
  parts = [f'{n} {"file" if n == 1 else "files"} {what}' if i == 0 else f'{n} {what}'
           for i, (n, what) in enumerate(counts)]  # '3 files added, 1 modified'
  if stored.get('classes_sha256') != current['classes_sha256']:
    parts.append(f'{CLASSES_FILE} changed')
  return ', '.join(parts) or 'files changed'


def read_index_png(path) -> np.ndarray:
  """Class indices of a palette ('P') or grayscale ('L') mask, exactly as stored.

  Colour (RGB) masks are refused: their colours would need a palette lookup that is
  dataset-specific, and guessing would silently corrupt labels.
  """
  path = require_file(path, 'mask')
  with open(path, 'rb') as f:
    data = f.read()
  im = _open_image(data, path)
  if im.mode in ('P', 'L'):
    return np.asarray(im, dtype=np.uint8)  # for 'P' these are the palette indices
  if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    arr = np.asarray(im)
    if arr.max(initial=0) > 255:
      raise DatasetError(f'mask {path} has values above 255 (max {arr.max()})')
    return arr.astype(np.uint8)
  raise DatasetError(f'mask {path} has PIL mode {im.mode!r}; expected a palette (P) or '
                     'grayscale (L) PNG of class indices')


def shift_zero_void(raw: np.ndarray, num_classes: int, path: str) -> np.ndarray:
  """Masks storing 0 = void and k = class k-1 (ADE20K, SUN-RGBD) -> training ids, void = 255.

  Out-of-range values are reported as stored, not as shifted.
  """
  bad = np.unique(raw[raw > num_classes])
  if bad.size:
    raise DatasetError(f'mask {path} has label values {bad.tolist()} above {num_classes} '
                       f'(0 = void, 1..{num_classes} = classes)')
  return raw.astype(np.uint8) - np.uint8(1)  # 0 wraps around to 255


def encode_label(label: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(label, np.uint8), mode='L').save(buf, format='PNG')
  return buf.getvalue()


def check_label(label: np.ndarray, num_classes: int, ignore_label: int, image_hw, source: str):
  if label.ndim != 2:
    raise DatasetError(f'mask {source} has shape {label.shape}; expected (H, W)')
  if tuple(label.shape) != tuple(image_hw):
    raise DatasetError(f'mask {source} is {label.shape[0]}x{label.shape[1]} but its image is '
                       f'{image_hw[0]}x{image_hw[1]}')
  values = np.unique(label)
  bad = values[(values >= num_classes) & (values != ignore_label)]
  if bad.size:
    raise DatasetError(f'mask {source} has label values {bad.tolist()} outside 0..{num_classes - 1}'
                       f' (ignore value {ignore_label})')


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class: subclasses set the class attributes and implement :meth:`_examples`.

  Not registered in the tfds catalog (several names, e.g. ``cityscapes``, would collide with
  catalog builders that download); use :func:`refinenet_jax.data.datasets.get_builder`.
  """
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  CLASS_NAMES: Sequence[str] = ()
  PALETTE: np.ndarray | None = None
  IGNORE_LABEL: int = IGNORE_LABEL
  SPLITS: Sequence[str] = ('train', 'val')
  DESCRIPTION: str = ''
  HOMEPAGE: str = ''

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')  # TFRecord writing would need TensorFlow
    super().__init__(**kwargs)

  @classmethod
  def from_run_config(cls, config) -> tuple[object, str | None]:
    """(builder config, manual_dir) a run config (``configs/default.py``) asks for: by default
    ``config.dataset_config`` (a name, e.g. voc2012 'aug') and ``config.manual_dir``. Builders
    whose config comes from other keys override this."""
    return config.dataset_config or None, config.manual_dir or None

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.CLASS_NAMES)

  @property
  def palette(self) -> np.ndarray:
    if self.PALETTE is not None:
      return np.asarray(self.PALETTE, np.uint8)
    return default_palette(len(self.class_names))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION or (self.__doc__ or '').strip(),
        homepage=self.HOMEPAGE or None,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # written in list-file order: val example i is line i
        metadata=tfds.core.MetadataDict(
            class_names=list(self.class_names),
            num_classes=len(self.class_names),
            ignore_label=int(self.IGNORE_LABEL),
            palette=self.palette.tolist()),
    )

  def _examples(self, root: str | None) -> Mapping[str, Iterable[Example]]:
    """Split name -> examples. ``root`` is the manual dir (None for generated datasets)."""
    raise NotImplementedError

  def _map_label(self, raw: np.ndarray, path: str) -> np.ndarray:
    """Stored mask values -> training ids (e.g. Cityscapes labelIds -> trainIds)."""
    return raw

  def source_root(self, manual_dir=None) -> str | None:
    """The absolute folder a build reads: ``manual_dir``; None for generated data."""
    if self.MANUAL_DOWNLOAD_INSTRUCTIONS is None or manual_dir is None:
      return None
    return os.path.abspath(os.path.expanduser(os.fspath(manual_dir)))

  def _root(self, dl_manager) -> str | None:
    if self.MANUAL_DOWNLOAD_INSTRUCTIONS is None:
      return None
    try:
      root = self.source_root(dl_manager.manual_dir)
    except AssertionError as e:  # tfds asserts the folder exists and is not empty
      raise DatasetError(f'manual_dir for {self.name} is missing or empty: {e}\n'
                         f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}') from e
    return require_dir(root, f'manual_dir for {self.name} (see its MANUAL_DOWNLOAD_INSTRUCTIONS)')

  def _split_generators(self, dl_manager):
    root = self._root(dl_manager)
    if root is not None:  # recorded before reading: a file edited during the build is caught later
      record = source_record(root, exclude=self.data_dir_root)
      # data_path is the temporary build directory here, renamed into place with the data
      (self.data_path / SOURCE_FILE).write_text(json.dumps(record))
    splits = self._examples(root)
    # List every split eagerly so a missing split list fails before anything is written.
    return {split: self._generate_examples(list(examples)) for split, examples in splits.items()}

  def _generate_examples(self, examples: Sequence[Example]) -> Iterator[tuple[str, dict]]:
    seen = set()
    num_classes = len(self.class_names)
    for ex in examples:
      if ex.name in seen:
        raise DatasetError(f'duplicate example name {ex.name!r} in {self.name}')
      seen.add(ex.name)
      image_src = (os.fspath(ex.image) if isinstance(ex.image, (str, os.PathLike))
                   else f'image of {self.name} example {ex.name}')
      image, hw = encode_image(ex.image, image_src)
      if callable(ex.label):
        label, label_src = ex.label(), ex.label_source or f'label of {self.name} example {ex.name}'
      else:
        label_src = os.fspath(ex.label)
        label = self._map_label(read_index_png(label_src), label_src)
      check_label(label, num_classes, self.IGNORE_LABEL, hw, label_src)
      yield ex.name, {'image': image, 'label': encode_label(label), 'name': ex.name}
