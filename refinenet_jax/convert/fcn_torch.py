"""Strict import of PyTorch FCN-VGG16 weights (wkentaro/pytorch-fcn and torchvision VGG16).

Layouts:
  'wkentaro_fcn'   wkentaro/pytorch-fcn ``FCN32s``/``FCN16s``/``FCN8s``/``FCN8sAtOnce`` state dicts
                   (``fcn*_from_caffe.pth`` are the released Caffe models): the whole network.
                   Their ``upscore*`` deconvolution weights are the frozen bilinear filters; here
                   those are constants, so each is checked to *be* the bilinear filter rather
                   than loaded (with ``learned_upsampling=True`` the intermediate 2x ones load).
  'wkentaro_vgg16' wkentaro's ``vgg16_from_caffe.pth`` (Caffe VGG16 in torchvision key order,
                   BGR 0..255 input): the trunk only.
  'torchvision_vgg16'  torchvision ImageNet VGG16 (RGB, ImageNet mean/std): the trunk only.

For the VGG layouts fc6/fc7 come from ``classifier.0``/``classifier.3`` reshaped to 7x7 / 1x1
convs (what Caffe's net surgery does), ``classifier.6`` (the ImageNet classifier) is discarded, and
the heads keep their deterministic initialisation (zero scores, bilinear deconvolutions).
Strict means: every source tensor is used, every target leaf is filled, every shape matches;
otherwise :class:`CheckpointMismatchError` names the keys and nothing is returned.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from refinenet_jax.convert.refinenet_torch import Layout, strict_import
from refinenet_jax.models import fcn

LAYOUTS = {
    'wkentaro_fcn': Layout('wkentaro_fcn', 'caffe_bgr', True),
    'wkentaro_vgg16': Layout('wkentaro_vgg16', 'caffe_bgr', False,
                             (r'classifier\.6\.(weight|bias)',)),
    'torchvision_vgg16': Layout('torchvision_vgg16', 'imagenet', False,
                                (r'classifier\.6\.(weight|bias)',)),
}


# (torch -> flax given the target shape, flax -> torch) for each kind of tensor
_SAME = (lambda a, shape: a, lambda a: a)
_CONV = (lambda a, shape: a.transpose(2, 3, 1, 0),  # OIHW <-> HWIO
         lambda a: a.transpose(3, 2, 0, 1))
# torch ConvTranspose2d (I, O, kh, kw) scatters in[i] * w[p] to out[s*i + p]; flax's
# ConvTranspose (transpose_kernel=False) correlates the dilated input, so the taps are flipped.
_DECONV = (lambda a, shape: a.transpose(2, 3, 0, 1)[::-1, ::-1],
           lambda a: a[::-1, ::-1].transpose(2, 3, 0, 1))
# torchvision's Linear (out, C*kh*kw) over the NCHW-flattened input <-> an HWIO conv
_LINEAR = (lambda a, shape: a.reshape(shape[3], shape[2], shape[0], shape[1]).transpose(2, 3, 1, 0),
           lambda a: a.transpose(3, 2, 0, 1).reshape(a.shape[3], -1))


def _features_indices(depths):
  """conv{b}_{i} -> index in torchvision's ``vgg.features`` (conv, ReLU pairs, then a pool)."""
  out, idx = {}, 0
  for b, depth in enumerate(depths, 1):
    for i in range(1, depth + 1):
      out[f'conv{b}_{i}'] = idx
      idx += 2
    idx += 1
  return out


def _key_map(model, layout: Layout, flat):
  """flax path -> (torch key, to_flax(array, target shape), to_torch(array)) for every leaf
  the layout provides."""
  features = _features_indices(model.depths)
  out = {}
  for path in flat:
    _, top, *rest = path
    is_bias = rest[-1] == 'bias'
    leaf = 'bias' if is_bias else 'weight'
    conv = _SAME if is_bias else _CONV
    if layout.whole_model:
      if top == 'encoder':
        out[path] = (f'{rest[0]}.{leaf}', *conv)
      elif top == 'classifier':
        out[path] = (f'score_fr.{leaf}', *conv)
      elif top in ('score_pool4', 'score_pool3'):
        out[path] = (f'{top}.{leaf}', *conv)
      elif top in fcn.UPSCORE_NAMES[8]:
        out[path] = (f'{top}.{leaf}', *_DECONV)
    elif top == 'encoder':
      name = rest[0]
      if name in features:
        out[path] = (f'features.{features[name]}.{leaf}', *conv)
      else:  # fc6 / fc7
        out[path] = (f'classifier.{0 if name == "fc6" else 3}.{leaf}',
                     *(_SAME if is_bias else _LINEAR))
  return out


def _frozen_upscores(model, layout: Layout):
  """torch key -> the bilinear filter (I, O, k, k) each frozen upsampling must hold."""
  if not layout.whole_model:
    return {}
  names = fcn.UPSCORE_NAMES[model.output_stride]
  ups = fcn.UPSAMPLING[model.output_stride]
  frozen = names[-1:] if model.learned_upsampling else names
  return {f'{n}.weight': _DECONV[1](fcn.bilinear_kernel(k, model.num_classes))
          for n, (k, _, _) in zip(names, ups) if n in frozen}


def _abstract(model):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def import_state_dict(model, state_dict: Mapping[str, np.ndarray] | Any,
                      layout: str = 'wkentaro_fcn', *, rng=None, init_variables=None):
  """Flax variables ``{'params'}`` for FCN ``model`` from a torch state dict (or a ``.pth``
  path), strictly; see the module docstring. ``rng`` is accepted for signature parity with
  :func:`refinenet_jax.convert.refinenet_torch.import_state_dict`: FCN heads are initialised
  deterministically, so it has no effect."""
  del rng
  if layout not in LAYOUTS:
    raise ValueError(f'unknown layout {layout!r}; known: {sorted(LAYOUTS)}')
  lay = LAYOUTS[layout]
  if not isinstance(model, fcn.FCN):
    raise TypeError(f'{layout} weights are for FCN-VGG models, got {type(model).__name__}')
  variables = init_variables or _abstract(model)
  keys = _key_map(model, lay, traverse_util.flatten_dict(dict(variables)))
  hint = ('not the bilinear filter this model keeps frozen (learned upsampling? set '
          'learned_upsampling=True for the intermediate 2x layers)')
  return strict_import(
      model, state_dict, lay, lambda path: keys[path][0] if path in keys else None,
      init_variables=variables, to_flax=lambda path, src, shape: keys[path][1](src, shape),
      fill_unmapped=fcn.head_init,
      constants={k: (v, hint) for k, v in _frozen_upscores(model, lay).items()})


def export_state_dict(variables, model, layout: str = 'wkentaro_fcn') -> dict[str, np.ndarray]:
  """Flax variables of FCN ``model`` -> torch-layout state dict (inverse of
  :func:`import_state_dict`; for the VGG layouts only the trunk is written)."""
  lay = LAYOUTS[layout]
  flat = traverse_util.flatten_dict(dict(variables))
  keys = _key_map(model, lay, flat)
  out = {}
  for path, v in flat.items():
    if path in keys:
      key, _, to_torch = keys[path]
      out[key] = np.ascontiguousarray(to_torch(np.asarray(v, np.float32)))
  out.update(_frozen_upscores(model, lay))
  return out
