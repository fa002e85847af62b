"""Strict import of torchvision segmentation weights (``fcn_resnet50`` / ``fcn_resnet101``).

Layout:
  'torchvision_fcn'  the whole ``torchvision.models.segmentation.FCN`` state dict:
               ``backbone.*`` (ResNet keys, no fc), ``classifier.{0,1,4}.*`` and, when the model
               was built with ``aux_loss=True``, ``aux_classifier.{0,1,4}.*``. A checkpoint without
               aux keys fits only a model with ``aux_head=False`` and vice versa.

ImageNet ResNet weights for the encoder alone are the ``'torchvision_resnet'`` layout of
:mod:`refinenet_jax.convert.refinenet_torch` (the encoder is named ``encoder`` here too). Strictness
and errors are the same as there: :class:`CheckpointMismatchError` names every missing,
unexpected or mis-shaped key, and nothing is loaded partially.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from refinenet_jax.convert.refinenet_torch import (_BN, Layout, _encoder_key, export_with,
                                                  strict_import)

LAYOUTS = {
    'torchvision_fcn': Layout('torchvision_fcn', 'imagenet', True),
}

# FCNHead is nn.Sequential(conv3x3, BN, ReLU, Dropout, conv1x1): indices 0, 1 and 4.
_HEADS = {
    'head_conv': 'classifier.0', 'head_bn': 'classifier.1', 'classifier': 'classifier.4',
    'aux_head_conv': 'aux_classifier.0', 'aux_head_bn': 'aux_classifier.1',
    'aux_classifier': 'aux_classifier.4',
}


def fcn_key_for(path: tuple[str, ...]) -> str | None:
  """Flax variable path (collection first) -> torchvision FCN key, or None."""
  _, top, *rest = path
  if top == 'encoder':
    key = _encoder_key(rest)
    return None if key is None else f'backbone.{key}'
  if top in _HEADS and len(rest) == 1:
    leaf = 'weight' if rest[0] == 'kernel' else _BN.get(rest[0])
    return None if leaf is None else f'{_HEADS[top]}.{leaf}'
  return None


def import_state_dict(model, state_dict: Mapping[str, np.ndarray] | Any,
                      layout: str = 'torchvision_fcn', *, init_variables=None, rng=None,
                      input_shape=(1, 64, 64, 3)):
  """Flax variables ``{'params', 'batch_stats'}`` for an ``FCNResNet`` filled strictly from a
  torchvision state dict (or a path to a ``.pth`` file)."""
  if layout not in LAYOUTS:
    raise ValueError(f'unknown layout {layout!r}; known: {sorted(LAYOUTS)}')
  return strict_import(model, state_dict, LAYOUTS[layout], fcn_key_for,
                       init_variables=init_variables, rng=rng, input_shape=input_shape)


def export_state_dict(variables, layout: str = 'torchvision_fcn') -> dict[str, np.ndarray]:
  """Flax variables -> torchvision state dict (inverse of :func:`import_state_dict`)."""
  if layout not in LAYOUTS:
    raise ValueError(f'unknown layout {layout!r}; known: {sorted(LAYOUTS)}')
  return export_with(variables, fcn_key_for, layout)
