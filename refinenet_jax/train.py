"""Minimal single-host trainer for the main job: pure jitted steps, SGD + poly schedule.

Data come from a TFDS builder through the grain pipeline as uint8 batches; the model's own
normalisation is applied on device. Loss at the logits' 1/4 resolution against
nearest-downsampled labels (the official recipe); evaluation upsamples logits to the label size
and counts every val pixel exactly once (padding is masked).
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
from refinenet_jax.data import datasets, pipeline, transforms
from refinenet_jax.data.builders.folder import FolderConfig
from refinenet_jax.data.builders.synthetic_scenes import SyntheticScenesConfig
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
  images = normalize_images(batch['image'], model.normalization)

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                  images, train=True, rngs={'dropout': rng},
                                  mutable=['batch_stats'])
    labels = nearest_downsample(batch['label'], logits.shape[1:3])
    return cross_entropy(logits, labels, ignore_label), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates['batch_stats'])
  return state, {'loss': loss}


def eval_step(state, batch, *, model, num_classes, ignore_label):
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       normalize_images(batch['image'], model.normalization), train=False)
  logits = resize_bilinear(logits, batch['label'].shape[1:3], 'half_pixel')
  return metrics.confusion_matrix(jnp.argmax(logits, -1), batch['label'], num_classes,
                                  batch['mask'], ignore_label)


def evaluate(state, eval_fn, eval_ds, num_classes):
  cm = np.zeros((num_classes,) * 2, np.int64)
  for batch in eval_ds:
    cm += np.asarray(eval_fn(state, batch))
  return metrics.scores(cm)


def make_data(config, normalization: str):
  """(dataset info, train dataset, eval dataset, eval bucket) for ``config.dataset``."""
  kwargs = {}
  if config.dataset == 'folder':  # custom data: manual_dir is the folder itself
    root = os.path.expanduser(config.manual_dir)
    kwargs['config'] = FolderConfig(name=os.path.basename(os.path.normpath(root)), root=root)
  if config.dataset == 'synthetic_scenes':
    kwargs['config'] = SyntheticScenesConfig(image_size=config.image_size,
                                             num_train=config.num_train, num_val=config.num_val,
                                             seed=config.data_seed)
  builder = datasets.prepare(config.dataset, config.data_dir or None,
                             (config.dataset != 'folder' and config.manual_dir) or None, **kwargs)
  info = datasets.info(builder)
  fill = transforms.fill_value(normalization)
  train_src = datasets.data_source(builder, config.train_split)
  eval_src = datasets.data_source(builder, config.eval_split)
  crop = tuple(config.crop_size) if config.crop_size else (config.image_size,) * 2
  eval_size = (tuple(config.eval_size) if config.eval_size
               else pipeline.max_image_size(eval_src))
  train_ds = pipeline.train_dataset(
      train_src, global_batch_size=config.batch_size, crop_size=crop, seed=config.data_seed,
      scale_range=tuple(config.scale_range), flip=config.flip, fill=fill,
      ignore_label=info.ignore_label, process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=config.data_threads)
  eval_ds = pipeline.eval_dataset(
      eval_src, global_batch_size=config.eval_batch_size, eval_size=eval_size, fill=fill,
      ignore_label=info.ignore_label, process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=config.data_threads)
  return info, train_ds, eval_ds, (len(train_src), len(eval_src), crop, eval_size)


def train_and_evaluate(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  model = create_model(config.model, config.num_classes, **config.model_overrides.to_dict())
  info, train_ds, eval_ds, (n_train, n_val, crop, eval_size) = make_data(
      config, model.normalization)
  if info.num_classes != config.num_classes:
    raise ValueError(f'config.num_classes={config.num_classes} but {info.name} has '
                     f'{info.num_classes} classes')
  rng = jax.random.key(config.seed)
  variables = jax.jit(model.init)(rng, jnp.zeros((1, *crop, 3)))
  state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                            batch_stats=variables['batch_stats'], tx=make_optimizer(config),
                            rng=jax.random.fold_in(rng, 1))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'{config.model}: {n_params:,} parameters; {info.name}: {n_train} train images '
        f'(crops {crop}), {n_val} val images (padded to {eval_size}); '
        f'{jax.device_count()} device(s)', flush=True)

  step_fn = jax.jit(lambda s, b: train_step(s, b, model=model, ignore_label=info.ignore_label),
                    donate_argnums=0)
  eval_fn = jax.jit(lambda s, b: eval_step(s, b, model=model, num_classes=info.num_classes,
                                           ignore_label=info.ignore_label))
  train_iter = iter(train_ds)
  history, t0, t_last, last_step = [], time.time(), time.time(), 0
  for step in range(1, config.num_steps + 1):
    state, m = step_fn(state, next(train_iter))
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
  result = evaluate(state, eval_fn, eval_ds, info.num_classes)
  for name, iou in zip(info.class_names, result['per_class_iou']):
    print(f'  IoU {name:<12s} {iou:.4f}')
  print(f'pixel acc: {result["pixel_acc"]:.4f}  mean acc: {result["mean_acc"]:.4f}')
  print(f'val mIoU: {result["miou"]:.4f}  (train {train_time:.0f} s)', flush=True)
  out = {'val': result, 'train_loss': history, 'train_seconds': train_time}
  with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
    json.dump(out, f, indent=2)
  return out
