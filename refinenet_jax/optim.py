"""Optimizers for segmentation: SGD (the RefineNet recipe) or AdamW, poly schedule, encoder
learning-rate multiplier, kernel-only weight decay, global-norm clipping, gradient accumulation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from refinenet_jax.models import ENCODER_PREFIX

OPTIMIZERS = ('sgd', 'adamw')


def learning_rate_fn(config):
  """Linear warm-up from 0 to ``learning_rate``, then poly decay to 0 at ``num_steps``.

  Steps count optimizer updates: under gradient accumulation the inner optimizer (and so this
  schedule) only advances once per ``grad_accum_steps`` micro-batches.
  """
  lr, warm, total = config.learning_rate, config.warmup_steps, config.num_steps
  if total < warm:
    raise ValueError(f'num_steps={total} < warmup_steps={warm}: the warm-up would not finish')
  # max(., 1): num_steps == warmup_steps is a run that just warms up (the lr never decays).
  poly = optax.polynomial_schedule(lr, 0.0, getattr(config, 'poly_power', 0.9),
                                   max(total - warm, 1))
  if warm == 0:  # a 0-step linear schedule would log optax's non-positive-steps warning
    return poly
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), poly], [warm])


def param_labels(params):
  """'encoder' for every leaf under a top-level key starting with ``ENCODER_PREFIX`` (the model
  protocol, models/__init__.py), else 'decoder'."""
  def label(path, _):
    top = str(getattr(path[0], 'key', '')) if path else ''
    return 'encoder' if top.startswith(ENCODER_PREFIX) else 'decoder'
  return jax.tree_util.tree_map_with_path(label, params)


def _kernel_mask(params):
  # Decay conv/dense kernels only: biases and norm scale/offset are 1-D.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _base(config, name, schedule):
  wd = config.weight_decay
  if name == 'sgd':
    # L2 added to the gradient before momentum and lr, as Caffe / torch.optim.SGD.
    return optax.chain(
        optax.add_decayed_weights(wd, _kernel_mask) if wd else optax.identity(),
        optax.sgd(schedule, momentum=config.momentum or None,
                  nesterov=bool(getattr(config, 'nesterov', False))))
  return optax.adamw(schedule, weight_decay=wd, mask=_kernel_mask)  # decoupled, scaled by lr


def make_optimizer(config) -> optax.GradientTransformation:
  """The optimizer described by ``config``.

  Reads learning_rate, warmup_steps, num_steps, weight_decay, momentum (sgd) and, when present,
  optimizer ('sgd'), poly_power (0.9), nesterov (False), encoder_lr_mult (1.0), grad_clip_norm
  (0 = off), grad_accum_steps (1 = off); the defaults in brackets are the previous trainer's.
  The encoder multiplier is applied through the schedule of a second copy of the chain, so it
  scales the encoder's whole update, weight-decay term included (as Caffe's per-layer lr_mult).
  Clipping sees the global norm of the (accumulated) gradient of all parameters.
  """
  name = getattr(config, 'optimizer', 'sgd')
  if name not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer {name!r}; valid: {OPTIMIZERS}')
  schedule = learning_rate_fn(config)
  mult = float(getattr(config, 'encoder_lr_mult', 1.0))
  tx = optax.multi_transform(
      {'decoder': _base(config, name, schedule),
       'encoder': _base(config, name, lambda step: mult * schedule(step))},
      param_labels)
  clip = float(getattr(config, 'grad_clip_norm', 0.0))
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  k = int(getattr(config, 'grad_accum_steps', 1))
  if k > 1:
    # Averages k micro-batch gradients, then applies one update: equal to one step on the
    # concatenated batch for a mean loss and a model without batch statistics.
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return tx


def ema_from_config(config):
  """``(ema, params, step) -> ema`` for ``config.ema_decay`` > 0, else None.

  Applied once per optimizer update (every ``grad_accum_steps`` micro-steps, when the params
  change): ``ema = d * ema + (1 - d) * params`` with ``d = ema_decay``, or with
  ``ema_warmup`` ``d = min(ema_decay, (1 + n) / (10 + n))`` after n updates, so that the
  average does not lean on the random initial weights for the first ~1/(1 - decay) updates.
  """
  decay = float(config.ema_decay)
  if not decay:
    return None
  k, warmup = int(config.grad_accum_steps), bool(config.ema_warmup)

  def update(ema, params, step):
    n = step // k  # optimizer updates so far, this one included
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n)) if warmup else jnp.float32(decay)
    d = d.astype(jnp.float32)
    new = jax.tree.map(lambda e, p: (d * e + (1 - d) * p).astype(e.dtype), ema, params)
    return jax.tree.map(lambda a, b: jnp.where(step % k == 0, a, b), new, ema)
  return update
