"""Strict import of PyTorch RefineNet / LW-RefineNet / torchvision-ResNet weights.

Layouts:
  'drsleep'    DrSleep/refinenet-pytorch, best-of-acrv/refinenet (full) and
               DrSleep/light-weight-refinenet (LW): the whole 4-cascade network.
  'torchvision_resnet'  torchvision ImageNet ResNet-50/101/152: the encoder only; the decoder
               keeps its fresh initialisation and ``fc.*`` is discarded on purpose.

Strict means: every source tensor is used, every target leaf is filled, every shape matches;
otherwise :class:`CheckpointMismatchError` lists the missing, unexpected and mismatched keys and
nothing is returned.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from refinenet_jax.convert.torch_io import load_torch_checkpoint
from refinenet_jax.tree_check import CheckpointMismatchError


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  normalization: str   # what the source weights were trained with
  whole_model: bool    # False: only the encoder comes from the checkpoint
  discard: tuple = ()  # source keys known to have no target (regexes)


LAYOUTS = {
    'drsleep': Layout('drsleep', 'imagenet', True),
    'torchvision_resnet': Layout('torchvision_resnet', 'imagenet', False, (r'fc\.(weight|bias)',)),
}

_WRAPPERS = ('state_dict', 'model', 'segmenter', 'weights', 'model_state_dict')


def unwrap_state_dict(obj: Any) -> dict[str, np.ndarray]:
  """Peels ``{'model': ...}``/``{'segmenter': ...}`` wrappers and DataParallel ``module.``."""
  for _ in range(3):
    if not isinstance(obj, Mapping):
      raise ValueError(f'expected a state dict (mapping), got {type(obj).__name__}')
    if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
      break
    inner = [k for k in _WRAPPERS if k in obj and isinstance(obj[k], Mapping)]
    if not inner:
      raise ValueError('checkpoint holds no state dict: top-level keys are '
                       f'{sorted(map(str, obj))[:20]}; expected tensors or one of {_WRAPPERS}')
    obj = obj[inner[0]]
  sd = dict(obj)
  if sd and all(k.startswith('module.') for k in sd):
    sd = {k[len('module.'):]: v for k, v in sd.items()}
  return sd


_BN = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def _encoder_key(parts):
  """('conv1','kernel') / ('layer3_7','downsample_bn','mean') -> torch key (no collection)."""
  if parts[0] in ('conv1', 'bn1'):
    mod, leaf = parts[0], parts[1]
  else:
    m = re.fullmatch(r'layer(\d+)_(\d+)', parts[0])
    if not m:
      return None
    sub = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(parts[1],
                                                                                     parts[1])
    mod, leaf = f'layer{m[1]}.{m[2]}.{sub}', parts[2]
  if leaf == 'kernel':
    return f'{mod}.weight'
  return f'{mod}.{_BN[leaf]}'


def _decoder_key(parts):
  leaf = {'kernel': 'weight', 'bias': 'bias'}.get(parts[-1])
  name = parts[0]
  m = re.fullmatch(r'path(\d+)_adapt', name)
  if m:
    return f'p_ims1d2_outl{int(m[1]) + 1}_dimred.{leaf}'
  m = re.fullmatch(r'path(\d+)_rcu', name)
  rcu = re.fullmatch(r'rcu(\d+)_conv([12])', parts[1]) if len(parts) > 2 else None
  if m and rcu:
    suffix = '_conv' if rcu[2] == '1' else '_conv_relu_varout_dimred'
    return f'adapt_stage{int(m[1]) + 1}_b.0.{int(rcu[1]) + 1}{suffix}.{leaf}'
  m = re.fullmatch(r'block(\d+)', name)
  if m:
    g = int(m[1])
    sub = parts[1]
    if sub == 'mrf_prev':
      return f'mflow_conv_g{g - 1}_b3_joint_varout_dimred.{leaf}'
    mp = re.fullmatch(r'mrf_path(\d+)', sub)
    if mp:
      return f'adapt_stage{int(mp[1]) + 1}_b2_joint_varout_dimred.{leaf}'
    if sub == 'crp':
      j = int(re.fullmatch(r'conv(\d+)', parts[2])[1])
      return f'mflow_conv_g{g}_pool.0.{j + 1}_outvar_dimred.{leaf}'
    if sub == 'out_rcu':
      rcu = re.fullmatch(r'rcu(\d+)_conv([12])', parts[2])
      suffix = '_conv' if rcu[2] == '1' else '_conv_relu_varout_dimred'
      return f'mflow_conv_g{g}_b.0.{int(rcu[1]) + 1}{suffix}.{leaf}'
  if name == 'classifier':
    return f'clf_conv.{leaf}'
  return None


def torch_key_for(path: tuple[str, ...], layout: Layout) -> str | None:
  """Flax variable path (collection first) -> torch key, or None if the layout has no source."""
  _, top, *rest = path
  if re.fullmatch(r'encoder\d*', top):
    return _encoder_key(rest)
  if not layout.whole_model:
    return None
  return _decoder_key((top, *rest))


def _to_flax(arr: np.ndarray) -> np.ndarray:
  return arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr  # conv OIHW -> HWIO


def import_state_dict(model, state_dict: Mapping[str, np.ndarray] | Any, layout: str = 'drsleep',
                      *, init_variables=None, rng=None, input_shape=(1, 64, 64, 3)):
  """Returns flax variables ``{'params', 'batch_stats'}`` for ``model`` filled from a torch
  state dict (or a path to a ``.pth`` file), strictly; see the module docstring."""
  if layout not in LAYOUTS:
    raise ValueError(f'unknown layout {layout!r}; known: {sorted(LAYOUTS)}')
  lay = LAYOUTS[layout]
  return strict_import(model, state_dict, lay, lambda path: torch_key_for(path, lay),
                       init_variables=init_variables, rng=rng, input_shape=input_shape)


def strict_import(model, state_dict, lay: Layout, key_for, *, init_variables=None, rng=None,
                  input_shape=(1, 64, 64, 3), to_flax=None, fill_unmapped=None, constants=None):
  """:func:`import_state_dict` for any layout: ``key_for(flax path) -> torch key | None``.

  Without ``init_variables``, whole-model layouts only trace the model (every leaf comes from
  the checkpoint); encoder-only layouts initialise it for real with ``rng``. Hooks for layouts
  whose tensors need more than the OIHW -> HWIO transpose:
  ``to_flax(path, array, target shape)`` converts one tensor (a ValueError is a mismatch);
  ``fill_unmapped(path, shape, dtype)`` fills what an encoder-only layout does not provide (else
  the initial value stays); ``constants`` maps torch keys to ``(array, hint)`` that the checkpoint
  must hold unchanged: they are checked, not imported (FCN's frozen bilinear filters).
  """
  layout = lay.name
  if getattr(model, 'normalization', lay.normalization) != lay.normalization:
    raise ValueError(f'{layout} weights expect {lay.normalization!r} input normalisation but the '
                     f'model is configured with {model.normalization!r}')
  if not isinstance(state_dict, Mapping):
    state_dict = load_torch_checkpoint(state_dict)
  sd = unwrap_state_dict(state_dict)
  to_flax = to_flax or (lambda path, src, shape: _to_flax(src))
  constants = constants or {}

  x = jnp.zeros(input_shape, jnp.float32)
  if init_variables is None:
    if lay.whole_model:
      init_variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    else:
      init_variables = jax.jit(model.init)(rng if rng is not None else jax.random.key(0), x)
  flat = traverse_util.flatten_dict(dict(init_variables))

  expected = {}  # torch key -> list of flax paths (2-scale models share one source encoder)
  unmapped = []
  out = dict(flat)
  for path in flat:
    key = key_for(path)
    if key is None:
      if lay.whole_model:
        unmapped.append('/'.join(path))
      elif fill_unmapped is not None:
        out[path] = fill_unmapped(path, flat[path].shape, flat[path].dtype)
      continue
    expected.setdefault(key, []).append(path)

  used_bn = {k.rsplit('.', 1)[0] for k in expected}
  discard = [re.compile(p) for p in lay.discard]
  missing = sorted(k for k in list(expected) + list(constants) if k not in sd)
  unexpected = sorted(
      k for k in sd if k not in expected and k not in constants
      and not (k.endswith('.num_batches_tracked') and k.rsplit('.', 1)[0] in used_bn)
      and not any(p.fullmatch(k) for p in discard))
  mismatched = []
  for key, paths in expected.items():
    if key not in sd:
      continue
    src = np.asarray(sd[key])
    for path in paths:
      tgt = flat[path]
      try:
        val = to_flax(path, src, tgt.shape)
      except ValueError:  # wrong rank or size: reported as a mismatch below
        val = src
      if tuple(val.shape) != tuple(tgt.shape) or not np.issubdtype(src.dtype, np.floating):
        mismatched.append(f'{key}: {tuple(src.shape)} {src.dtype} vs {"/".join(path)}: '
                          f'{tuple(tgt.shape)}')
        continue
      out[path] = np.asarray(val, dtype=tgt.dtype)
  for key, (want, hint) in constants.items():
    if key not in sd:
      continue
    src = np.asarray(sd[key])
    if src.shape != want.shape:
      mismatched.append(f'{key}: {src.shape} vs the constant {want.shape} it must be')
    elif not np.allclose(src, want, rtol=0, atol=1e-6):
      mismatched.append(f'{key}: {hint}')
  missing += [f'(no {layout} source for model variable) {p}' for p in unmapped]
  if missing or unexpected or mismatched:
    raise CheckpointMismatchError(missing, unexpected, mismatched, f' ({layout} layout)')
  return traverse_util.unflatten_dict(out)


def export_state_dict(variables, layout: str = 'drsleep') -> dict[str, np.ndarray]:
  """Flax variables -> torch-layout state dict (inverse of :func:`import_state_dict`)."""
  lay = LAYOUTS[layout]
  return export_with(variables, lambda path: torch_key_for(path, lay), layout)


def export_with(variables, key_for, layout: str) -> dict[str, np.ndarray]:
  """:func:`export_state_dict` for any layout: ``key_for(flax path) -> torch key | None``."""
  out = {}
  for path, v in traverse_util.flatten_dict(dict(variables)).items():
    key = key_for(path)
    if key is None:
      raise ValueError(f'{"/".join(path)} has no {layout} key')
    v = np.asarray(v, np.float32)
    out[key] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v
    if path[0] == 'batch_stats' and key.endswith('running_mean'):
      out[key.replace('running_mean', 'num_batches_tracked')] = np.array(0, np.int64)
  return out
