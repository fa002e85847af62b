"""Pure train and eval steps: no jit, no mesh, no flags, no collectives.

Called under ``jax.jit`` over global (sharded) arrays, every mean (the loss, BatchNorm
statistics) covers the whole global batch; the trainer decides shardings (``sharding.py``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from refinenet_jax import inference, losses, metrics
from refinenet_jax.models.preprocessing import normalize_images


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array  # raw uint32 key data: checkpoints as a plain array on every orbax version
  # the moving average of params that evaluation and export use (config.ema_decay > 0); None
  # (no leaves: checkpoints of runs without it are unchanged) otherwise
  ema_params: Any = None


def init_train_state(rng, *, model, tx, input_shape, ema: bool = False) -> TrainState:
  """A fresh, unsharded train state (``sharding.create_train_state`` places it on a mesh)."""
  variables = model.init(rng, jnp.zeros(input_shape, jnp.float32))
  params = variables['params']
  return TrainState.create(apply_fn=model.apply, params=params,
                           batch_stats=variables.get('batch_stats', {}), tx=tx,
                           rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
                           ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def split_outputs(outputs):
  """Model output -> (logits, aux logits): models with deep supervision return a tuple."""
  if isinstance(outputs, (tuple, list)):
    return outputs[0], tuple(outputs[1])
  return outputs, ()


def train_step(state: TrainState, batch: dict, *, model,
               loss_fn: Callable = losses.segmentation_loss, ema_fn: Callable | None = None):
  """One optimizer (micro-)step on uint8 images; returns (state, metrics of this batch).

  ``loss_fn(logits, labels, aux_logits=...) -> (loss, parts)``: ``losses.from_config``'s.
  ``ema_fn(ema, params, step) -> ema``: ``optim.ema_from_config``'s, for a state with
  ``ema_params``.
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images = normalize_images(batch['image'], model.normalization)

  def objective(params):
    outputs, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                   images, train=True, rngs={'dropout': rng},
                                   mutable=['batch_stats'])
    logits, aux = split_outputs(outputs)
    loss, parts = loss_fn(logits, batch['label'], aux_logits=aux)
    return loss, (updates, parts)

  (loss, (updates, parts)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=updates['batch_stats'])
  if state.ema_params is not None:
    new_state = new_state.replace(
        ema_params=ema_fn(state.ema_params, new_state.params, new_state.step))
  return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads), **parts}


def variables_of(state: TrainState) -> dict:
  """What inference uses: the moving average of the parameters when the state keeps one."""
  params = state.params if state.ema_params is None else state.ema_params
  return {'params': params, 'batch_stats': state.batch_stats}


def logits_fn(variables: dict, model):
  """0..255 RGB images -> logits, eval mode (what the inference helpers and the exported
  serving function call)."""
  def fn(images):
    outputs = model.apply(variables, normalize_images(images, model.normalization), train=False)
    return split_outputs(outputs)[0].astype(jnp.float32)
  return fn


def predict_step(state: TrainState, batch: dict, *, model, **inference_kwargs):
  """Class ids at the input resolution; ``inference_kwargs`` go to ``inference.predict_labels``
  (scales, flip, window, stride, pad_value, resize_mode)."""
  return inference.predict_labels(
      logits_fn(variables_of(state), model), batch['image'].astype(jnp.float32),
      out_size=batch['image'].shape[1:3], **inference_kwargs)


def eval_step(state: TrainState, batch: dict, *, model, num_classes: int,
              ignore_label: int = 255, **predict_kwargs):
  """Un-normalised confusion matrix over the valid (``mask``) pixels of the batch."""
  preds = predict_step(state, batch, model=model, **predict_kwargs)
  return metrics.confusion_matrix(preds, batch['label'], num_classes, batch['mask'],
                                  ignore_label)
