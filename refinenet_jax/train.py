"""Minimal single-host trainer for the main job: pure jitted steps, SGD + poly schedule.

Loss at the logits' 1/4 resolution against nearest-downsampled labels (the official recipe);
evaluation upsamples logits to the label size and counts every val pixel exactly once.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from refinenet_jax import metrics
from refinenet_jax.data.synthetic import CLASS_NAMES, make_synthetic_scenes
from refinenet_jax.models import create_model
from refinenet_jax.models.layers import resize_bilinear
from refinenet_jax.models.preprocessing import normalize_images


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array


def learning_rate_fn(config):
  warm = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  poly = optax.polynomial_schedule(config.learning_rate, 0.0, 0.9,
                                   config.num_steps - config.warmup_steps)
  return optax.join_schedules([warm, poly], [config.warmup_steps])


def make_optimizer(config):
  # Weight decay on conv kernels only, not on biases or BatchNorm scale/offset.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(optax.add_decayed_weights(config.weight_decay, decay_mask),
                     optax.sgd(learning_rate_fn(config), momentum=config.momentum))


def nearest_downsample(labels, out_hw):
  """labels[:, floor((i + 0.5) * H / h), ...]: the label at each output cell's centre.

  This is MATLAB ``imresize(..., 'nearest')`` (the official recipe) and agrees with the
  half-pixel bilinear upsampling used at evaluation; a top-left pick would teach the model a
  1.5-pixel shift (measured: -0.077 val mIoU on the default config).
  """
  h_in, w_in = labels.shape[1:3]
  rows = ((2 * np.arange(out_hw[0]) + 1) * h_in) // (2 * out_hw[0])
  cols = ((2 * np.arange(out_hw[1]) + 1) * w_in) // (2 * out_hw[1])
  return labels[:, rows][:, :, cols]


def cross_entropy(logits, labels, ignore_label):
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  return jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)


def train_step(state, batch, *, model, ignore_label):
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                  batch['image'], train=True, rngs={'dropout': rng},
                                  mutable=['batch_stats'])
    labels = nearest_downsample(batch['label'], logits.shape[1:3])
    return cross_entropy(logits, labels, ignore_label), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates['batch_stats'])
  return state, {'loss': loss}


def eval_step(state, batch, *, model, num_classes, ignore_label):
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       batch['image'], train=False)
  n, h, w = batch['label'].shape
  logits = resize_bilinear(logits, (h, w), 'half_pixel')
  valid = jnp.broadcast_to(batch['mask'][:, None, None], (n, h, w))
  return metrics.confusion_matrix(jnp.argmax(logits, -1), batch['label'], num_classes, valid,
                                  ignore_label)


def _eval_batches(images, labels, batch_size, normalization):
  """Fixed-size batches; the last one is padded and masked so no image is dropped."""
  for i in range(0, len(images), batch_size):
    img, lab = images[i:i + batch_size], labels[i:i + batch_size]
    n = len(img)
    pad = batch_size - n
    mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    if pad:
      img = np.concatenate([img, np.zeros((pad, *img.shape[1:]), img.dtype)])
      lab = np.concatenate([lab, np.zeros((pad, *lab.shape[1:]), lab.dtype)])
    yield {'image': normalize_images(img, normalization), 'label': lab.astype(np.int32),
           'mask': mask}


def evaluate(state, eval_fn, images, labels, config, normalization):
  cm = np.zeros((config.num_classes,) * 2, np.int64)
  for batch in _eval_batches(images, labels, config.eval_batch_size, normalization):
    cm += np.asarray(eval_fn(state, batch))
  return metrics.scores(cm)


def train_and_evaluate(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  if config.dataset != 'synthetic_scenes':
    raise ValueError(f'unknown dataset {config.dataset!r}; this trainer knows synthetic_scenes')
  size = (config.image_size, config.image_size)
  train_x, train_y = make_synthetic_scenes(config.num_train, size, config.num_classes,
                                           seed=config.data_seed)
  val_x, val_y = make_synthetic_scenes(config.num_val, size, config.num_classes,
                                       seed=config.data_seed + 1)
  model = create_model(config.model, config.num_classes, **config.model_overrides.to_dict())
  rng = jax.random.key(config.seed)
  variables = jax.jit(model.init)(rng, jnp.zeros((1, *size, 3)))
  state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                            batch_stats=variables['batch_stats'], tx=make_optimizer(config),
                            rng=jax.random.fold_in(rng, 1))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'{config.model}: {n_params:,} parameters; {config.num_train} train / '
        f'{config.num_val} val images of {size}; {jax.device_count()} device(s)', flush=True)

  step_fn = jax.jit(lambda s, b: train_step(s, b, model=model, ignore_label=config.ignore_label),
                    donate_argnums=0)
  eval_fn = jax.jit(lambda s, b: eval_step(s, b, model=model, num_classes=config.num_classes,
                                           ignore_label=config.ignore_label))
  np_rng = np.random.default_rng(config.seed)
  order, pos = np_rng.permutation(config.num_train), 0
  history, t0, t_last, last_step = [], time.time(), time.time(), 0
  for step in range(1, config.num_steps + 1):
    if pos + config.batch_size > len(order):
      order, pos = np_rng.permutation(config.num_train), 0
    idx = order[pos:pos + config.batch_size]
    pos += config.batch_size
    img, lab = train_x[idx], train_y[idx]
    flip = np_rng.random(len(idx)) < 0.5
    img = np.where(flip[:, None, None, None], img[:, :, ::-1], img)
    lab = np.where(flip[:, None, None], lab[:, :, ::-1], lab)
    batch = {'image': normalize_images(img, model.normalization), 'label': lab.astype(np.int32)}
    state, m = step_fn(state, batch)
    if step % config.log_every == 0 or step == config.num_steps:
      loss = float(m['loss'])
      if not np.isfinite(loss):
        raise FloatingPointError(f'loss became {loss} at step {step}')
      now = time.time()
      rate = (step - last_step) * config.batch_size / (now - t_last)  # first one includes compile
      t_last, last_step = now, step
      history.append({'step': step, 'loss': loss})
      print(f'step {step}/{config.num_steps}  loss {loss:.4f}  {rate:.1f} img/s', flush=True)
  train_time = time.time() - t0
  result = evaluate(state, eval_fn, val_x, val_y, config, model.normalization)
  for name, iou in zip(CLASS_NAMES, result['per_class_iou']):
    print(f'  IoU {name:<12s} {iou:.4f}')
  print(f'pixel acc: {result["pixel_acc"]:.4f}  mean acc: {result["mean_acc"]:.4f}')
  print(f'val mIoU: {result["miou"]:.4f}  (train {train_time:.0f} s)', flush=True)
  out = {'val': result, 'train_loss': history, 'train_seconds': train_time}
  with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
    json.dump(out, f, indent=2)
  return out
