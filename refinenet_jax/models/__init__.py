"""Model registry: the merge of every model module's ``VARIANTS`` dict (explicit imports)."""
from __future__ import annotations

import dataclasses

from refinenet_jax.models import exfuse, fcn, fcn_resnet, refinenet

MODELS = {}
for _module in (refinenet, fcn_resnet, fcn, exfuse):
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
