"""Model registry: the merge of every model module's ``VARIANTS`` dict (explicit imports).

The model protocol: what the trainer, optimizer, converters and pre-training rely on, beyond
``model.apply(variables, images, train=...)`` returning float32 logits (or ``(logits, aux)`` in
training when the model has auxiliary heads).

- ``normalization``: the name of the input statistics the weights expect
  (models/preprocessing.py).
- Encoder parameters live under top-level keys starting with :data:`ENCODER_PREFIX` ('encoder';
  'encoder0', 'encoder1', ... with one encoder per input scale). ``optim.param_labels`` gives
  them the config's ``encoder_lr_mult``; weight import and SS pre-training fill 'encoder'.
- ``aux_names`` (optional): the names of the auxiliary (deep-supervision) outputs, in the order
  the model returns them; read through :func:`aux_names`. Unnamed ones log as 'aux0', 'aux1', ...
- ``encoder`` (the ResNet-based models): a definition from ``backbones.ENCODERS`` fixing the
  encoder's architecture; the model instantiates it with ``backbones.MODEL_ENCODER_ARGS``
  (dtype, remat, its ``freeze_encoder_bn`` and ``output_stride`` fields).
"""
from __future__ import annotations

import dataclasses

from refinenet_jax.models import exfuse, fcn, fcn_resnet, refinenet
from refinenet_jax.models.backbones import MODEL_ENCODER_ARGS, EncoderDef, encoder_def

ENCODER_PREFIX = 'encoder'

_MODULES = (refinenet, fcn_resnet, fcn, exfuse)
MODELS = {}
for _module in _MODULES:
  for _name, _ctor in _module.VARIANTS.items():
    if _name in MODELS:
      raise RuntimeError(f'duplicate model name {_name!r} in {_module.__name__}')
    MODELS[_name] = _ctor


def list_models() -> list[str]:
  return sorted(MODELS)


def aux_names(model) -> tuple[str, ...]:
  """The model's auxiliary output names in output order; () when it does not name them."""
  return tuple(getattr(model, 'aux_names', ()))


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls) if f.name not in ('parent', 'name')}


def create_model(name: str, num_classes: int, **overrides):
  """Builds the registered variant ``name`` with ``num_classes`` outputs.

  ``overrides`` replace any field of the model dataclass (e.g. ``dtype=jnp.bfloat16``,
  ``freeze_encoder_bn=True``). On models with an ``encoder`` field, ``encoder`` may also be a
  name in ``backbones.ENCODERS`` (e.g. ``encoder='resnext101_32x8d'``), and any other field of
  the encoder (e.g. ``stage_sizes``, ``base_width``, ``stride_style``) replaces that field of
  the model's encoder definition. Unknown names are an error, never ignored.
  """
  if name not in MODELS:
    raise KeyError(f'unknown model {name!r}; valid names: {", ".join(list_models())}')
  ctor = MODELS[name]
  fields = _fields(ctor.func)
  encoder, encoder_fields = None, set()
  if 'encoder' in fields:
    encoder = overrides.get('encoder', ctor.keywords.get('encoder'))
    if encoder is None:
      encoder = next(f.default for f in dataclasses.fields(ctor.func) if f.name == 'encoder')
    if not isinstance(encoder, EncoderDef):  # a name, a plain partial or an encoder class
      encoder = encoder_def(encoder)
    encoder_fields = _fields(encoder.func) - fields - set(MODEL_ENCODER_ARGS)
  unknown = sorted(set(overrides) - fields - encoder_fields)
  if unknown:
    raise TypeError(f'{name}: unknown override(s) {unknown}; valid fields: {sorted(fields)}'
                    + (f', encoder fields: {sorted(encoder_fields)}' if encoder_fields else ''))
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
  model_kw = {k: v for k, v in overrides.items() if k in fields}
  encoder_kw = {k: v for k, v in overrides.items() if k in encoder_fields}
  if 'encoder' in overrides or encoder_kw:
    model_kw['encoder'] = encoder_def(encoder, **encoder_kw)
  return ctor(num_classes=num_classes, **model_kw)


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
