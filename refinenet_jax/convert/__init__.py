"""Weight import/export: torch-free ``.pth`` I/O, strict layout mapping, orbax output.

One entry point for every source layout: ``import_state_dict(model, path_or_dict, layout)``
picks the module that knows the layout (RefineNet/ResNet, FCN-VGG, torchvision FCN-ResNet).
``manifest`` lists the published checkpoints (recognised by hash, downloadable with verification);
``load_pretrained`` builds a model from one.
"""
from __future__ import annotations

from refinenet_jax.convert import fcn_torch, manifest, refinenet_torch, torchvision_seg
from refinenet_jax.convert.orbax_io import load_converted, save_converted
from refinenet_jax.convert.pretrained import load_pretrained
from refinenet_jax.convert.refinenet_torch import export_state_dict, unwrap_state_dict
from refinenet_jax.convert.torch_io import (CheckpointFormatError, UnsafeCheckpointError,
                                           load_torch_checkpoint, save_torch_state_dict)
from refinenet_jax.tree_check import CheckpointMismatchError

_MODULES = {name: module for module in (refinenet_torch, fcn_torch, torchvision_seg)
            for name in module.LAYOUTS}
LAYOUTS = {name: module.LAYOUTS[name] for name, module in _MODULES.items()}


def import_state_dict(model, state_dict, layout: str = 'drsleep', *, rng=None, **kwargs):
  """Flax variables for ``model`` from a torch state dict or ``.pth`` path, strictly (nothing is
  returned unless every tensor fits); ``layout`` is a key of :data:`LAYOUTS`."""
  if layout not in _MODULES:
    raise ValueError(f'unknown layout {layout!r}; known: {sorted(_MODULES)}')
  return _MODULES[layout].import_state_dict(model, state_dict, layout, rng=rng, **kwargs)


__all__ = ['LAYOUTS', 'CheckpointMismatchError', 'CheckpointFormatError', 'UnsafeCheckpointError',
           'export_state_dict', 'import_state_dict', 'unwrap_state_dict', 'load_torch_checkpoint',
           'save_torch_state_dict', 'load_converted', 'save_converted', 'manifest',
           'load_pretrained']
