"""Models built straight from published PyTorch files, the manifest supplying layout, input
normalisation and classes.

This lives in ``convert`` rather than behind ``create_model(name, weights=...)`` because the
model registry must not import conversion code (models/ sits below convert/).
"""
from __future__ import annotations

import os

import jax

from refinenet_jax.convert import manifest
from refinenet_jax.models import create_model

TORCH_SUFFIXES = ('.pth', '.pt', '.tar')  # DrSleep / best-of-acrv files end in .pth.tar


def is_torch_file(path) -> bool:
  """Named like a ``torch.save`` file and not a directory (converted weights, a workdir)."""
  return os.fspath(path).lower().endswith(TORCH_SUFFIXES) and not os.path.isdir(path)


def resolve(path, layout: str = '') -> tuple[manifest.Weights | None, str]:
  """(manifest entry or None, layout) for the file at ``path``: the entry's layout when the file
  is a known one (an explicit ``layout`` must then agree), else ``layout``, which is required."""
  from refinenet_jax.convert import LAYOUTS
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no checkpoint file at {path}')
  entry = manifest.lookup(path)
  if entry is not None:
    if layout and layout != entry.layout:
      raise ValueError(f'{path} is the published {entry.key}, whose layout is {entry.layout!r}, '
                       f'not {layout!r}')
    return entry, entry.layout
  if not layout:
    raise ValueError(
        f'{path} is not a file the weight manifest recognises (only files with a published hash '
        f'are: torchvision, wkentaro/pytorch-fcn), so give its layout explicitly; layouts: '
        f'{", ".join(sorted(LAYOUTS))}')
  if layout not in LAYOUTS:
    raise ValueError(f'unknown layout {layout!r}; known: {", ".join(sorted(LAYOUTS))}')
  return None, layout


def check_fits(path, entry: manifest.Weights | None, layout: str, model_name: str | None,
               num_classes: int, normalization: str) -> None:
  """Refuses, before any import work, weights for another model, other classes or other input."""
  from refinenet_jax.convert import LAYOUTS
  want = entry.normalization if entry is not None else LAYOUTS[layout].normalization
  if want != normalization:
    raise ValueError(f'{path} ({entry.key if entry else layout}) expects {want!r} input '
                     f'normalisation; the model is configured for {normalization!r}')
  if entry is None or not entry.whole_model:
    return
  if model_name is not None and model_name != entry.model:
    raise ValueError(f'{path} is the published {entry.key}, a whole {entry.model}, not '
                     f'{model_name}')
  if entry.num_classes != num_classes:
    raise ValueError(f'{path} ({entry.key}) has {entry.num_classes} classes ({entry.dataset}); '
                     f'the model needs {num_classes}')


def _import(path, model, entry, layout, model_name, num_classes, rng):
  from refinenet_jax.convert import import_state_dict
  check_fits(path, entry, layout, model_name, num_classes, model.normalization)
  variables = import_state_dict(model, os.fspath(path), layout,
                                rng=jax.random.key(0) if rng is None else rng)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def read_torch_weights(path, model, *, model_name: str | None = None, num_classes: int,
                       layout: str = '', rng=None):
  """(meta, variables) of ``model`` from a ``.pth`` file, as ``orbax_io.read_weights`` gives them
  for converted weights: what ``init_checkpoint`` may name. ``rng`` initialises what an
  encoder-only file does not hold."""
  entry, layout = resolve(path, layout)
  variables = _import(path, model, entry, layout, model_name, num_classes, rng)
  meta = {'model': model_name, 'num_classes': num_classes, 'normalization': model.normalization,
          'source': f'{layout}:{path}', 'manifest': entry.key if entry else None,
          'class_names': entry.class_names if entry else None}
  return meta, variables


def load_pretrained(weights: str, name: str | None = None, num_classes: int | None = None, *,
                    layout: str = '', rng=None, cache_dir: str | None = None, **overrides):
  """``(model, variables, entry)`` from a manifest key (downloaded to the cache on first use) or
  a ``.pth`` path (recognised by its hash; an unknown file needs ``layout``, and gives entry
  None).

  ``name`` defaults to the entry's model and ``num_classes`` to its classes (an encoder-only file
  needs it); the model's ``normalization`` is what the weights expect unless ``overrides`` set it
  (a mismatch is then refused). ``entry.class_names`` gives the label order where known.
  """
  if weights in manifest.MANIFEST:
    entry = manifest.get(weights)
    if layout and layout != entry.layout:
      raise ValueError(f'{weights} has layout {entry.layout!r}, not {layout!r}')
    path, layout = manifest.download(entry, cache_dir), entry.layout  # verified if it can be
  else:
    path = weights
    entry, layout = resolve(path, layout)
  if entry is not None:
    name = name or entry.model
    num_classes = num_classes or entry.num_classes
  from refinenet_jax.convert import LAYOUTS
  overrides.setdefault('normalization',
                       entry.normalization if entry else LAYOUTS[layout].normalization)
  if name is None or num_classes is None:
    raise ValueError(f'{path}: give the model name and num_classes (not a whole model the '
                     'manifest knows)')
  model = create_model(name, num_classes, **overrides)
  return model, _import(path, model, entry, layout, name, num_classes, rng), entry
