"""Custom data from a folder of images and index masks.

Layout under the config's ``root``::

  classes.txt                      one class name per line, in id order (at most 255)
  images/<split>/<stem>.{jpg,jpeg,png,bmp,tif,tiff}
  masks/<split>/<stem>.png         palette or grayscale PNG of class ids, 255 = ignore

The splits are the subdirectories of ``images/`` (e.g. train, val). Every image needs a mask and
every mask an image. Use ``Folder(config=FolderConfig(name='mydata', root='/path/to/root'))``;
the build lives in ``<data_dir>/folder/mydata-<hash of the absolute root>/``, so two roots with
the same name never share a build, and ``datasets.prepare`` rebuilds it when the root's files
change (see ``base.source_record``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import tensorflow_datasets as tfds

from refinenet_jax.data.builders import base

MAX_CLASSES = base.IGNORE_LABEL  # ids 0..254; 255 is the ignore value


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """``name``: the dataset's name (build folder ``<name>-<root hash>``); ``root``: its folder."""
  root: str = ''


def read_classes(path) -> tuple[str, ...]:
  """Class names of a classes.txt: one per line, trailing blank lines allowed."""
  path = base.require_file(path, 'class list')
  with open(path) as f:
    names = [line.strip() for line in f.read().rstrip().splitlines()]
  if not names:
    raise base.DatasetError(f'empty class list: {path}')
  if '' in names:
    raise base.DatasetError(f'class list {path} has a blank line {names.index("") + 1}')
  if len(set(names)) != len(names):
    dups = sorted({n for n in names if names.count(n) > 1})
    raise base.DatasetError(f'class list {path} has duplicate names {dups}')
  if len(names) > MAX_CLASSES:
    raise base.DatasetError(f'class list {path} has {len(names)} classes; at most {MAX_CLASSES} '
                            f'fit in 8-bit masks with {base.IGNORE_LABEL} = ignore')
  return tuple(names)


def _stems(directory, what, extensions) -> dict[str, str]:
  """Stem -> path of the files in ``directory`` (hidden files skipped, anything else refused)."""
  stems = {}
  for entry in sorted(os.listdir(directory)):
    path = os.path.join(directory, entry)
    if entry.startswith('.'):
      continue
    stem, ext = os.path.splitext(entry)
    if not os.path.isfile(path) or ext.lower() not in extensions:
      raise base.DatasetError(f'unexpected {what} entry {path} (expected files '
                              f'<stem>{"/".join(extensions)})')
    if stem in stems:
      raise base.DatasetError(f'two {what}s with stem {stem!r}: {stems[stem]} and {path}')
    stems[stem] = path
  return stems


class Folder(base.SegmentationBuilder, skip_registration=True):
  """A custom segmentation dataset read from a folder (see the module docstring)."""
  name = 'folder'
  MANUAL_DOWNLOAD_INSTRUCTIONS = None

  @classmethod
  def from_run_config(cls, config):
    """``manual_dir`` is the folder itself; the dataset is named after it."""
    root = os.path.expanduser(config.manual_dir)
    return FolderConfig(name=os.path.basename(os.path.normpath(root)), root=root), None

  def __init__(self, *, config: FolderConfig | None = None, **kwargs):
    if not isinstance(config, FolderConfig) or not config.root:
      raise ValueError('Folder needs config=FolderConfig(name=..., root=...), got '
                       f'{config!r}')
    root = os.path.abspath(os.path.expanduser(config.root))
    suffix = '-' + hashlib.sha256(root.encode()).hexdigest()[:8]
    if not config.name.endswith(suffix):  # one build per root, whatever its name
      config = dataclasses.replace(config, name=config.name + suffix, root=root)
    self.CLASS_NAMES = read_classes(os.path.join(root, base.CLASSES_FILE))
    super().__init__(config=config, **kwargs)

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.CLASS_NAMES)

  def source_root(self, manual_dir=None) -> str:
    return os.path.abspath(os.path.expanduser(self.builder_config.root))

  def _root(self, dl_manager):
    return base.require_dir(self.source_root(), 'dataset root')

  def _examples(self, root):
    image_root = base.require_dir(os.path.join(root, 'images'), 'image dir')
    splits = sorted(d for d in os.listdir(image_root)
                    if not d.startswith('.') and os.path.isdir(os.path.join(image_root, d)))
    if not splits:
      raise base.DatasetError(f'no split directories (e.g. train/, val/) in {image_root}')
    out = {}
    for split in splits:
      if not re.fullmatch(r'\w+', split):
        raise base.DatasetError(f'split directory {os.path.join(image_root, split)}: split names '
                                'must be letters, digits and underscores')
      images = _stems(os.path.join(image_root, split), 'image', base.IMAGE_EXTENSIONS)
      mask_dir = base.require_dir(os.path.join(root, 'masks', split), f'{split} mask dir')
      masks = _stems(mask_dir, 'mask', ('.png',))
      for stem, image in images.items():
        if stem not in masks:
          raise base.DatasetError(f'image {image} has no mask '
                                  f'(expected {os.path.join(mask_dir, stem + ".png")})')
      for stem, mask in masks.items():
        if stem not in images:
          raise base.DatasetError(f'mask {mask} has no image in {os.path.join(image_root, split)}')
      if not images:
        raise base.DatasetError(f'no images in {os.path.join(image_root, split)}')
      out[split] = [base.Example(stem, images[stem], masks[stem]) for stem in sorted(images)]
    return out
