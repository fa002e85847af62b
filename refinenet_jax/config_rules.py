"""The values a config may hold, checked when a run reads its config (before any dataset build).

An impossible value (a zero batch, a negative crop, a scale range the wrong way round) would
otherwise surface as a raw grain, optax or XLA error after minutes of dataset building; here it
is refused with the key, the value and what is allowed. Keys a config does not have are skipped
(notebooks may pass a partial ConfigDict).
"""
from __future__ import annotations

import math

from refinenet_jax.losses import LOSS_MODES, LOSS_REDUCTIONS, MEAN_ONLY, parse_loss
from refinenet_jax.optim import OPTIMIZERS
from refinenet_jax.sharding import RULE_SETS, mesh_problem

_POSITIVE_INTS = ('batch_size', 'eval_batch_size', 'num_steps', 'grad_accum_steps', 'num_classes',
                  'image_size', 'num_train', 'num_val', 'log_every', 'keep_checkpoints')
_NON_NEGATIVE_INTS = ('warmup_steps', 'eval_every', 'checkpoint_every', 'data_threads', 'seed',
                      'data_seed', 'ohem_min_kept')
_NON_NEGATIVE_FLOATS = ('learning_rate', 'weight_decay', 'encoder_lr_mult', 'grad_clip_norm',
                        'poly_power', 'focal_gamma')
_SIZES = ('crop_size', 'eval_size', 'eval_window', 'eval_stride')  # () or (H, W) > 0
_CHOICES = {'optimizer': OPTIMIZERS, 'loss_mode': LOSS_MODES,
            'loss_reduction': LOSS_REDUCTIONS, 'compute_dtype': ('float32', 'bfloat16', 'float16')}


class ConfigValueError(ValueError):
  """An impossible config value; the message names the key."""


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def errors(config) -> list[str]:
  """One line per impossible value, ``'key=value: what is allowed'``."""
  has = lambda k: k in config  # ConfigDict and dict alike
  out = []

  def bad(key, why):
    out.append(f'{key}={config[key]!r}: {why}')

  for k in _POSITIVE_INTS:
    if has(k) and not (_is_int(config[k]) and config[k] > 0):
      bad(k, 'must be a positive integer')
  for k in _NON_NEGATIVE_INTS:
    if has(k) and not (_is_int(config[k]) and config[k] >= 0):
      bad(k, 'must be an integer >= 0')
  for k in _NON_NEGATIVE_FLOATS:
    if has(k) and not (_is_number(config[k]) and config[k] >= 0):
      bad(k, 'must be a finite number >= 0')
  for k in _SIZES:
    if has(k) and len(config[k]) and not (
        len(config[k]) == 2 and all(_is_int(v) and v > 0 for v in config[k])):
      bad(k, '() or two positive integers (height, width)')
  for k, allowed in _CHOICES.items():
    if has(k) and config[k] not in allowed:
      bad(k, f'one of {", ".join(map(repr, allowed))}')
  terms = {}
  if has('loss'):
    try:
      terms = dict(parse_loss(config['loss']))
    except ValueError as e:
      bad('loss', str(e))
  mean_only = [n for n in MEAN_ONLY if n in terms]
  if mean_only and has('loss_reduction') and config['loss_reduction'] == 'sum':
    bad('loss_reduction', f"'mean' for the ratio loss(es) {', '.join(mean_only)}")
  if has('ohem_thresh') and not (_is_number(config.ohem_thresh) and 0 <= config.ohem_thresh <= 1):
    bad('ohem_thresh', 'must be a probability in [0, 1]')
  elif ('ohem' in terms and has('ohem_min_kept') and config.ohem_thresh == 0
        and config.ohem_min_kept == 0):
    bad('ohem_thresh', "and ohem_min_kept both 0: 'ohem' would keep no pixel")
  if has('momentum') and not (_is_number(config.momentum) and 0 <= config.momentum < 1):
    bad('momentum', 'must be in [0, 1)')
  if has('ema_decay') and not (_is_number(config.ema_decay) and 0 <= config.ema_decay < 1):
    bad('ema_decay', 'must be in [0, 1) (0 = off)')
  if has('mesh') and mesh_problem(config.mesh):
    bad('mesh', mesh_problem(config.mesh))
  if has('sharding_rules') and config.sharding_rules not in RULE_SETS:
    bad('sharding_rules', f'one of {", ".join(map(repr, RULE_SETS))} (sharding.RULE_SETS)')
  if has('scale_range') and not (
      len(config.scale_range) == 2 and all(_is_number(s) and s > 0 for s in config.scale_range)
      and config.scale_range[0] <= config.scale_range[1]):
    bad('scale_range', '(low, high) with 0 < low <= high')
  if has('eval_scales') and not (
      len(config.eval_scales) and all(_is_number(s) and s > 0 for s in config.eval_scales)):
    bad('eval_scales', 'one or more positive numbers')
  for k in ('class_weights', 'aux_weights'):
    if has(k) and not all(_is_number(w) and w >= 0 for w in config[k]):
      bad(k, 'finite numbers >= 0')
  if (has('class_weights') and has('num_classes') and len(config.class_weights)
      and len(config.class_weights) != config.num_classes):
    bad('class_weights', f'() or one weight per class ({config.num_classes})')
  if (has('eval_stride') and has('eval_window') and len(config.eval_stride)
      and not len(config.eval_window)):
    bad('eval_stride', 'needs eval_window')
  return out


def check(config) -> None:
  """Raises :class:`ConfigValueError` listing every impossible value."""
  problems = errors(config)
  if problems:
    raise ConfigValueError('impossible config value(s):\n  ' + '\n  '.join(problems))
