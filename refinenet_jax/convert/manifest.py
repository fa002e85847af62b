"""The published PyTorch checkpoints the importer reads: where each comes from, what it fits, and
how a local file is recognised (:func:`lookup`) or fetched with verification (:func:`download`).

Hashes are only what the publishers give: torchvision puts the first 8 hex digits of the file's
sha256 in its name (checked as a prefix, as ``torch.hub`` does), wkentaro/pytorch-fcn gives md5
sums; DrSleep and best-of-acrv give neither, nor sizes, so their files are never recognised
automatically (import them with an explicit layout) and a download of them cannot be verified.
The DrSleep / best-of-acrv links are on AARNet CloudStor, which AARNet has since retired: they may
no longer resolve. wkentaro's Google Drive links may answer a large file with a confirmation page
instead of the file; the md5 check then refuses it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import urllib.error
import urllib.request

CACHE_ENV = 'REFINENET_JAX_WEIGHTS'
DEFAULT_CACHE = os.path.join('~', '.cache', 'refinenet_jax', 'weights')

# Where each checkpoint's label order is defined: the dataset builder of the same data.
_BUILDER_OF = {'voc': 'voc2012', 'coco_voc': 'voc2012', 'nyudv2': 'nyudv2_40',
               'person_part': 'person_part', 'context': 'pascal_context'}


class WeightsHashError(ValueError):
  """A file does not have the hash (or size) its manifest entry publishes."""


class WeightsDownloadError(OSError):
  """A manifest URL could not be fetched."""


@dataclasses.dataclass(frozen=True)
class Weights:
  """One published checkpoint.

  ``num_classes`` None: an encoder-only (ImageNet) file; the run picks the classes and the
  decoder starts fresh. ``sha256`` may be a prefix (torchvision's file names carry 8 hex
  digits); ``None`` where nothing is published, like ``md5`` and ``size``.
  """
  key: str
  model: str            # the registered model it fits (encoder-only: the default one)
  file_name: str        # the name the publisher's code saves it under
  url: str
  layout: str           # a key of refinenet_jax.convert.LAYOUTS
  normalization: str    # a key of models.preprocessing.NORMALIZATIONS
  num_classes: int | None
  dataset: str          # what it was trained on; 'imagenet' for encoder-only files
  source: str           # the publisher
  sha256: str | None = None
  md5: str | None = None
  size: int | None = None

  @property
  def whole_model(self) -> bool:
    return self.num_classes is not None

  @property
  def class_names(self) -> tuple[str, ...] | None:
    """The label order (its dataset builder's), or None for an encoder-only file."""
    if self.dataset not in _BUILDER_OF:
      return None
    from refinenet_jax.data import datasets  # tfds: only when names are asked for
    names = tuple(datasets.BUILDERS[_BUILDER_OF[self.dataset]].CLASS_NAMES)
    return names if len(names) == self.num_classes else None

  @property
  def verifiable(self) -> bool:
    return bool(self.sha256 or self.md5)


def _tv(key, model, name, layout='torchvision_resnet', num_classes=None, dataset='imagenet'):
  return Weights(key, model, name, f'https://download.pytorch.org/models/{name}', layout,
                 'imagenet', num_classes, dataset, 'pytorch/vision',
                 sha256=name.rsplit('-', 1)[1].split('.')[0])


def _cloudstor(key, model, name, share, num_classes, dataset, source):
  return Weights(key, model, name, f'https://cloudstor.aarnet.edu.au/plus/s/{share}/download',
                 'drsleep', 'imagenet', num_classes, dataset, source)


def _wkentaro(key, model, name, drive_id, md5, layout='wkentaro_fcn', num_classes=21):
  return Weights(key, model, name, f'https://drive.google.com/uc?id={drive_id}', layout,
                 'caffe_bgr', num_classes, 'voc' if num_classes else 'imagenet',
                 'wkentaro/pytorch-fcn', md5=md5)


_DRSLEEP = 'DrSleep/refinenet-pytorch'
_LW = 'DrSleep/light-weight-refinenet'
_ACRV = 'best-of-acrv/refinenet'
_NCLS = {'voc': 21, 'nyudv2': 40, 'person_part': 7, 'context': 60}

ENTRIES: tuple[Weights, ...] = (
    # RefineNet (4-cascade, full)
    _cloudstor('refinenet101_voc_drsleep', 'refinenet_r101', 'rf101_voc.pth.tar',
               'Owmttk9bdPROwc6', 21, 'voc', _DRSLEEP),
    *(_cloudstor(f'refinenet{d}_{ds}', f'refinenet_r{d}', f'refinenet{d}_{tag}.pth.tar', share,
                 _NCLS[ds], ds, _ACRV)
      for d, ds, tag, share in (
          (50, 'voc', 'voc', 'YH73jIiBa8iKllX'), (101, 'voc', 'voc', 'rzgoGwTb6CK7nbT'),
          (152, 'voc', 'voc', 'fSsPeSsNyyHYTwC'), (50, 'nyudv2', 'nyu', 'thgUqW2uRZBeEXG'),
          (101, 'nyudv2', 'nyu', '9wPfvg6eKqTztNy'), (152, 'nyudv2', 'nyu', 'QFcL2qgNsnpSOlr'))),
    # Light-Weight RefineNet
    *(_cloudstor(f'lw_refinenet{d}_{ds}', f'lw_refinenet_r{d}', f'rf_lw{d}_{tag}.pth.tar', share,
                 _NCLS[ds], ds, _LW)
      for d, ds, tag, share in (
          (50, 'person_part', 'person', 'mLA7NxVSPjNL7Oo'),
          (101, 'person_part', 'person', 'f1tGGpwdCnYS3xu'),
          (152, 'person_part', 'person', 'Ql64rWqiTvWGAA0'),
          (50, 'voc', 'voc', '2E1KrdF2Rfc5khB'), (101, 'voc', 'voc', 'CPRKWiaCIDRdOwF'),
          (152, 'voc', 'voc', '2w8bFOd45JtPqbD'), (50, 'nyudv2', 'nyu', 'gE8dnQmHr9svpfu'),
          (101, 'nyudv2', 'nyu', 'VnsaSUHNZkuIqeB'), (152, 'nyudv2', 'nyu', 'EkPQzB2KtrrDnKf'),
          (101, 'context', 'context', 'hqmplxWOBbOYYjN'),
          (152, 'context', 'context', 'O84NszlYlsu00fW'))),
    _cloudstor('lw_refinenet50_voc_acrv', 'lw_refinenet_r50', 'refinenetlw50_voc.pth.tar',
               'xp7GcVKC0GbxhTv', 21, 'voc', _ACRV),
    # FCN-VGG16 converted from the Caffe releases
    _wkentaro('fcn32s_voc', 'fcn32s', 'fcn32s_from_caffe.pth', '11k2Q0bvRQgQbT6-jYWeh6nmAsWlSCY3f',
              'd3eb467a80e7da0468a20dfcbc13e6c8'),
    _wkentaro('fcn16s_voc', 'fcn16s', 'fcn16s_from_caffe.pth', '1bctu58B6YH9bu6lBBSBB2rUeGlGhYLoP',
              'a2d4035f669f09483b39c9a14a0d6670'),
    _wkentaro('fcn8s_voc', 'fcn8s', 'fcn8s_from_caffe.pth', '1ieXWyoG68xqoHJPWdyrDyaIaaWlfmUxI',
              'de93e540ec79512f8770033849c8ae89'),
    _wkentaro('fcn8s_atonce_voc', 'fcn8s_atonce', 'fcn8s-atonce_from_caffe.pth',
              '0B9P1L--7Wd2vblE1VUIxV1o2d2M', 'bfed4437e941fef58932891217fe6464'),
    _wkentaro('vgg16_caffe', 'fcn32s', 'vgg16_from_caffe.pth', '1adDBTGY3GcEB_47dvcibajyzi872RAs3',
              'aa75b158f4181e7f6230029eb96c1b13', layout='wkentaro_vgg16', num_classes=None),
    # torchvision: ImageNet encoders (legacy URLs the PyTorch RefineNet ports use, V1, V2) ...
    _tv('resnet50_legacy', 'refinenet_r50', 'resnet50-19c8e357.pth'),
    _tv('resnet50_v1', 'refinenet_r50', 'resnet50-0676ba61.pth'),
    _tv('resnet50_v2', 'refinenet_r50', 'resnet50-11ad3fa6.pth'),
    _tv('resnet101_legacy', 'refinenet_r101', 'resnet101-5d3b4d8f.pth'),
    _tv('resnet101_v1', 'refinenet_r101', 'resnet101-63fe2227.pth'),
    _tv('resnet101_v2', 'refinenet_r101', 'resnet101-cd907fc2.pth'),
    _tv('resnet152_legacy', 'refinenet_r152', 'resnet152-b121ed2d.pth'),
    _tv('resnet152_v1', 'refinenet_r152', 'resnet152-394f9c45.pth'),
    _tv('resnet152_v2', 'refinenet_r152', 'resnet152-f82ba261.pth'),
    _tv('resnext50_32x4d_v1', 'gcn_resnext50', 'resnext50_32x4d-7cdf4587.pth'),
    _tv('resnext101_32x8d_v1', 'refinenet_resnext101_32x8d', 'resnext101_32x8d-8ba56ff5.pth'),
    _tv('resnext101_32x8d_v2', 'refinenet_resnext101_32x8d', 'resnext101_32x8d-110c445d.pth'),
    _tv('vgg16', 'fcn32s', 'vgg16-397923af.pth', layout='torchvision_vgg16'),
    # ... and the segmentation models (COCO images, the 20 VOC categories)
    _tv('fcn_resnet50_coco', 'fcn_resnet50', 'fcn_resnet50_coco-1167a1af.pth',
        layout='torchvision_fcn', num_classes=21, dataset='coco_voc'),
    _tv('fcn_resnet101_coco', 'fcn_resnet101', 'fcn_resnet101_coco-7ecb50ca.pth',
        layout='torchvision_fcn', num_classes=21, dataset='coco_voc'),
)
MANIFEST: dict[str, Weights] = {e.key: e for e in ENTRIES}
assert len(MANIFEST) == len(ENTRIES), 'duplicate manifest key'


def get(key: str) -> Weights:
  if key not in MANIFEST:
    raise KeyError(f'no manifest entry {key!r}; known: {", ".join(sorted(MANIFEST))}')
  return MANIFEST[key]


def _digests(stream, copy_to=None) -> tuple[str, str, int]:
  """(sha256, md5, size in bytes) of what ``stream`` reads, in one pass (also written to
  ``copy_to``, a download's temporary file)."""
  sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
  for chunk in iter(lambda: stream.read(1 << 20), b''):
    if copy_to is not None:
      copy_to.write(chunk)
    sha.update(chunk)
    md5.update(chunk)
    size += len(chunk)
  return sha.hexdigest(), md5.hexdigest(), size


def file_digests(path) -> tuple[str, str, int]:
  """(sha256, md5, size in bytes) of the file at ``path``, in one read."""
  with open(path, 'rb') as f:
    return _digests(f)


def _matches(entry: Weights, sha256: str, md5: str, size: int) -> bool | None:
  """True/False when ``entry`` publishes something to check, None when it publishes nothing."""
  if entry.sha256:
    return sha256.startswith(entry.sha256) and (entry.size is None or size == entry.size)
  if entry.md5:
    return md5 == entry.md5 and (entry.size is None or size == entry.size)
  if entry.size is not None:
    return size == entry.size
  return None


def _expected(entry: Weights) -> str:
  if entry.sha256:
    return f'sha256 {entry.sha256}' + ('...' if len(entry.sha256) < 64 else '')
  if entry.md5:
    return f'md5 {entry.md5}'
  return f'{entry.size} bytes'


def _actual(entry: Weights, sha256: str, md5: str, size: int) -> str:
  kind = 'sha256 ' + sha256 if entry.sha256 else 'md5 ' + md5 if entry.md5 else ''
  return f'{kind} ({size} bytes)'.strip()


def lookup(path, entries=None) -> Weights | None:
  """The manifest entry ``path`` is, recognised by its published hash; None if it is none of them.

  A file named like an entry but with other contents raises :class:`WeightsHashError` (a corrupt
  or truncated download, or another file under a published name): it is never taken for that
  entry, nor loaded silently as something else. An entry publishing no hash is recognised by
  name and size only when its size is known; otherwise not at all.
  """
  entries = ENTRIES if entries is None else tuple(entries)
  sha256, md5, size = file_digests(path)
  for entry in entries:
    if _matches(entry, sha256, md5, size) and (entry.verifiable or
                                               os.path.basename(path) == entry.file_name):
      return entry
  name = os.path.basename(os.fspath(path))
  for entry in entries:
    if name == entry.file_name and _matches(entry, sha256, md5, size) is False:
      raise WeightsHashError(
          f'{path} is named like the published {entry.key} ({entry.url}) but its contents differ: '
          f'expected {_expected(entry)}, got {_actual(entry, sha256, md5, size)}; download it '
          'again, or rename it and give its layout explicitly')
  return None


def cache_folder(path=None) -> str:
  """``path``, else ``$REFINENET_JAX_WEIGHTS``, else ``~/.cache/refinenet_jax/weights``."""
  return os.path.abspath(os.path.expanduser(path or os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


def download(key_or_entry: str | Weights, cache_dir: str | None = None, *,
             timeout: float = 60.0) -> str:
  """Path of the entry's file in the cache, fetched from its URL if it is not there yet.

  The bytes go to a temporary file in the cache directory that takes the entry's name only once
  its published hash (when there is one) matched, so the cache never holds a partial or wrong
  file. A file already in the cache is checked again, not fetched again; one that fails the check
  is reported and left alone (it may be yours), never replaced.
  """
  entry = get(key_or_entry) if isinstance(key_or_entry, str) else key_or_entry
  folder = cache_folder(cache_dir)
  dest = os.path.join(folder, entry.file_name)
  if os.path.exists(dest):
    _check_cached(entry, dest)
    return dest
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{entry.file_name}.', suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as out:
      try:
        with urllib.request.urlopen(entry.url, timeout=timeout) as response:
          digests = _digests(response, copy_to=out)
      except urllib.error.HTTPError as e:
        raise WeightsDownloadError(f'{entry.url}: HTTP {e.code} {e.reason} (manifest entry '
                                   f'{entry.key})') from None
      except (urllib.error.URLError, OSError) as e:
        raise WeightsDownloadError(f'{entry.url}: {getattr(e, "reason", e)} (manifest entry '
                                   f'{entry.key})') from None
    if _matches(entry, *digests) is False:
      raise WeightsHashError(f'{entry.url} sent a file that is not the published {entry.key}: '
                             f'expected {_expected(entry)}, got {_actual(entry, *digests)}; '
                             'nothing was kept')
    try:
      os.link(tmp, dest)  # unlike a rename, never replaces a file that appeared meanwhile
    except FileExistsError:
      _check_cached(entry, dest)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return dest


def _check_cached(entry: Weights, path: str) -> None:
  digests = file_digests(path)
  if _matches(entry, *digests) is False:
    raise WeightsHashError(f'{path} (cached {entry.key}) is not the published file: expected '
                           f'{_expected(entry)}, got {_actual(entry, *digests)}; it was left as '
                           'it is: remove it to download again')


def markdown_table(entries=None) -> str:
  """The manifest as a Markdown table (the README's copy is generated by this)."""
  rows = ['| key | model | layout | norm. | classes | published hash | file / URL |',
          '|---|---|---|---|---|---|---|']
  for e in ENTRIES if entries is None else entries:
    classes = f'{e.num_classes} ({e.dataset})' if e.num_classes else 'encoder (ImageNet)'
    digest = (f'sha256 `{e.sha256}`…' if e.sha256 else f'md5 `{e.md5}`' if e.md5 else 'none')
    rows.append(f'| `{e.key}` | `{e.model}` | `{e.layout}` | `{e.normalization}` | {classes} '
                f'| {digest} | [{e.file_name}]({e.url}) |')
  return '\n'.join(rows)
