"""Model registry: the merge of every model module's ``VARIANTS`` dict (explicit imports)."""
from __future__ import annotations

import dataclasses

from refinenet_jax.models import exfuse, fcn, fcn_resnet, refinenet

_MODULES = (refinenet, fcn_resnet, fcn, exfuse)
MODELS = {}
for _module in _MODULES:
  for _name, _ctor in _module.VARIANTS.items():
    if _name in MODELS:
      raise RuntimeError(f'duplicate model name {_name!r} in {_module.__name__}')
    MODELS[_name] = _ctor


def list_models() -> list[str]:
  return sorted(MODELS)


def create_model(name: str, num_classes: int, **overrides):
  """Builds the registered variant ``name`` with ``num_classes`` outputs.

  ``overrides`` replace any field of the model dataclass (e.g. ``dtype=jnp.bfloat16``,
  ``freeze_encoder_bn=True``); unknown names are an error, never ignored.
  """
  if name not in MODELS:
    raise KeyError(f'unknown model {name!r}; valid names: {", ".join(list_models())}')
  ctor = MODELS[name]
  fields = {f.name for f in dataclasses.fields(ctor.func) if f.name not in ('parent', 'name')}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f'{name}: unknown override(s) {unknown}; valid fields: {sorted(fields)}')
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
  return ctor(num_classes=num_classes, **overrides)


def start_from(source: str, target: str, variables, model, where: str = 'the weights'):
  """Another registered model's ``variables`` as the start of ``model`` (registered as
  ``target``), when the target's module knows how: its ``start_from(source, target, variables,
  model)`` hook returns them (e.g. FCN's staged 32s -> 16s -> 8s training) or None. Any other
  pair is refused."""
  for module in _MODULES:
    hook = getattr(module, 'start_from', None)
    if target in module.VARIANTS and hook is not None:
      out = hook(source, target, variables, model)
      if out is not None:
        return out
  raise ValueError(f'{where} holds {source}, not {target} (and {target} cannot start from it)')
