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
"""
from __future__ import annotations

import dataclasses
import glob
import io
import os
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

IGNORE_LABEL = 255


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
  if im.mode == 'RGB' and im.format in ('JPEG', 'PNG'):
    return data, (im.height, im.width)
  buf = io.BytesIO()  # grayscale, CMYK, palette, RGBA, 16-bit, BMP...: store as RGB PNG
  im.convert('RGB').save(buf, format='PNG')
  return buf.getvalue(), (im.height, im.width)


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

  def _root(self, dl_manager) -> str | None:
    if self.MANUAL_DOWNLOAD_INSTRUCTIONS is None:
      return None
    try:
      root = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # tfds asserts the folder exists and is not empty
      raise DatasetError(f'manual_dir for {self.name} is missing or empty: {e}\n'
                         f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}') from e
    return require_dir(root, f'manual_dir for {self.name} (see its MANUAL_DOWNLOAD_INSTRUCTIONS)')

  def _split_generators(self, dl_manager):
    splits = self._examples(self._root(dl_manager))
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
