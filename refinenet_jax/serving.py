"""Loads an exported model (``python -m refinenet_jax.export``) with nothing but jax and numpy.

This file imports nothing from refinenet_jax or flax: copy it next to a service to run an
artifact without installing the library. ``load(folder)`` checks the manifest's sha256 of the
serialized program, then returns a function of uint8 (N, H, W, 3) RGB images (any N, H, W) to
``{'labels': int32 (N, H, W), 'probs': (N, H, W, classes)}``.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

MANIFEST = 'manifest.json'


def read_manifest(folder: str) -> dict:
  path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{folder} is not an exported model: no {MANIFEST}')
  with open(path) as f:
    return json.load(f)


def load(folder: str):
  """The artifact's inference function; ``.manifest`` holds its manifest (classes, palette...)."""
  manifest = read_manifest(folder)
  if manifest.get('format', 'jax') != 'jax':
    raise ValueError(f'{folder} holds a {manifest["format"]} model ({manifest["file"]}); run it '
                     'with its own runtime (onnxruntime for onnx)')
  path = os.path.join(folder, manifest['file'])
  with open(path, 'rb') as f:
    data = f.read()
  digest = hashlib.sha256(data).hexdigest()
  if digest != manifest['sha256']:
    raise ValueError(f'{path}: sha256 {digest} is not the manifest\'s {manifest["sha256"]}: the '
                     'file is damaged or belongs to another export')
  try:
    exported = jax.export.deserialize(bytearray(data))
    exported.mlir_module()  # parsed now, not at the first call
  except Exception as e:  # jax reads artifacts of older jax versions, not of newer ones
    raise ValueError(f'{path} cannot be read by jax {jax.__version__} (exported with jax '
                     f'{manifest.get("jax_version")}: use that jax or a newer one): '
                     f'{type(e).__name__}: {e}') from e
  call = jax.jit(exported.call)

  def predict(images) -> dict:
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise TypeError(f'{folder} takes uint8 RGB images (0..255), got dtype {images.dtype}; '
                      'convert with np.clip(x, 0, 255).astype(np.uint8) if in range')
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'{folder} takes (N, H, W, 3) RGB images, got shape {images.shape}')
    return call(images)

  predict.manifest = manifest
  return predict
