"""The training loop: one code path from 1 CPU to a multi-host pod.

``train_and_evaluate`` builds the mesh, the data pipeline and the state, resumes from the newest
checkpoint in ``workdir`` when there is one (state, data-iterator position and RNG, so the run
continues bit-identically), trains with a jitted, donating step over global sharded batches,
evaluates, checkpoints, and logs. ``evaluate`` and ``predict`` reuse the same pieces.
Everything here is importable (main.py only parses flags), so notebooks and tests call it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from refinenet_jax import (checkpoint, config_rules, console, inference, losses, metrics, optim,
                           plots, serving, sharding, steps, tree_check, writers)
from refinenet_jax.data import datasets, pipeline, transforms
from refinenet_jax.data.builders.base import IMAGE_EXTENSIONS, to_rgb
from refinenet_jax import models
from refinenet_jax.convert import pretrained
from refinenet_jax.convert.orbax_io import read_weights

TrainState = steps.TrainState

# Without eval_window, an eval batch at the default bucket above this many pixels per device is
# evaluated in crop-sized windows instead: ~8 GB of activations at ~1 KB per pixel (a ResNet-101
# RefineNet forward pass in float32). One 6000x4000 photo alone is 24M pixels.
EVAL_PIXELS_PER_DEVICE = 2 ** 23


def build_model(config):
  overrides = config.model_overrides.to_dict()
  if config.compute_dtype != 'float32':
    overrides['dtype'] = jnp.dtype(config.compute_dtype)
  return models.create_model(config.model, config.num_classes, **overrides)


def make_data(config, normalization: str, splits=('train', 'eval')):
  """(dataset info, train dataset, eval dataset, (n_train, n_eval, crop, eval bucket))."""
  # only process 0 builds; the others wait for it and then read the same files
  if jax.process_index() == 0:
    builder = datasets.prepare_for(config)
  _sync('dataset built')
  if jax.process_index() != 0:
    builder = datasets.prepare_for(config, build=False)
  info = datasets.info(builder)
  if info.num_classes != config.num_classes:
    raise ValueError(f'config.num_classes={config.num_classes} but {info.name} has '
                     f'{info.num_classes} classes')
  fill = transforms.fill_value(normalization)
  common = dict(fill=fill, ignore_label=info.ignore_label, process_index=jax.process_index(),
                process_count=jax.process_count(), num_threads=config.data_threads)
  train_ds = eval_ds = None
  crop = tuple(config.crop_size) if config.crop_size else (config.image_size,) * 2
  n_train = n_eval = 0
  eval_size = None
  if 'train' in splits:
    train_src = datasets.data_source(builder, config.train_split)
    n_train = len(train_src)
    train_ds = pipeline.train_dataset(
        train_src, global_batch_size=config.batch_size, crop_size=crop, seed=config.data_seed,
        scale_range=tuple(config.scale_range), flip=config.flip, **common)
  if 'eval' in splits:
    eval_src = datasets.data_source(builder, config.eval_split)
    n_eval = len(eval_src)
    eval_size = eval_bucket(config, datasets.image_sizes(builder, config.eval_split))
    eval_ds = pipeline.eval_dataset(eval_src, global_batch_size=config.eval_batch_size,
                                    eval_size=eval_size, **common)
  return info, train_ds, eval_ds, (n_train, n_eval, crop, eval_size)


def eval_bucket(config, sizes) -> tuple[int, int]:
  """``config.eval_size`` checked against every eval image's (name, h, w), or when unset the
  smallest bucket holding them all: a misfit stops the run before training, not after it."""
  fit = pipeline.bucket_for([(h, w) for _, h, w in sizes])
  if not config.eval_size:
    return fit
  eh, ew = config.eval_size
  too_big = [(i, name, h, w) for i, (name, h, w) in enumerate(sizes) if h > eh or w > ew]
  if too_big:
    listed = ', '.join(f'#{i} {name!r} {h}x{w}' for i, name, h, w in too_big[:5])
    more = f' and {len(too_big) - 5} more' if len(too_big) > 5 else ''
    raise ValueError(
        f'{len(too_big)} of {len(sizes)} eval images ({config.dataset} {config.eval_split!r}) '
        f'are larger than config.eval_size={eh}x{ew}: {listed}{more}. Evaluation batches pad '
        f"whole images to eval_size; set --config.eval_size='({fit[0]},{fit[1]})' (or "
        "--config.eval_size='()' to size it automatically), plus --config.eval_window='(h,w)' "
        '(e.g. the crop size) to evaluate in windows if that is too big for memory.')
  return tuple(config.eval_size)


def eval_window(config, eval_size, crop, num_devices: int) -> tuple[int, int] | None:
  """``config.eval_window``; else the crop size when the default bucket (the largest eval image)
  puts more than EVAL_PIXELS_PER_DEVICE pixels of an eval batch on a device, else None."""
  if config.eval_window:
    return tuple(config.eval_window)
  if config.eval_size:  # chosen explicitly: evaluated as asked
    return None
  per_device = -(-config.eval_batch_size // num_devices)
  pixels = per_device * eval_size[0] * eval_size[1]
  if pixels <= EVAL_PIXELS_PER_DEVICE:
    return None
  print(f'eval: {per_device} image(s) of up to {eval_size[0]}x{eval_size[1]} per device '
        f'({pixels:,} pixels > {EVAL_PIXELS_PER_DEVICE:,}): evaluating in {crop[0]}x{crop[1]} '
        'windows (the crop size); set --config.eval_window to choose', flush=True)
  return tuple(crop)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def run_evaluation(state, eval_fn, eval_ds, mesh, num_classes: int) -> dict:
  """Confusion matrix summed on the host over global batches -> scores."""
  cm = np.zeros((num_classes,) * 2, np.int64)
  for batch in eval_ds:
    cm += np.asarray(jax.device_get(eval_fn(state, sharding.put_batch(batch, mesh))))
  return metrics.scores(cm)


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and returns at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _checkpoint_meta(config, model, info) -> dict:
  """What a checkpoint says about itself: enough to rebuild and export the model alone."""
  return {'model': config.model, 'num_classes': config.num_classes,
          'normalization': model.normalization, 'config': config.to_json_best_effort(),
          'dataset': info.name, 'class_names': list(info.class_names),
          'palette': np.asarray(info.palette).tolist(), 'ignore_label': info.ignore_label}


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run is made of (``setup``): train, eval and predict modes share it."""
  mesh: jax.sharding.Mesh
  model: Any
  info: datasets.DatasetInfo
  train_ds: Any  # grain datasets, None for the splits not asked for
  eval_ds: Any
  n_train: int
  n_eval: int
  crop: tuple[int, int]
  eval_size: tuple[int, int] | None
  eval_window: tuple[int, int] | None
  init: Callable[[jax.Array], TrainState]  # key -> a fresh state, placed by the sharding rules
  abstract: TrainState  # shapes and dtypes, each leaf carrying its target sharding
  ckpts: checkpoint.Checkpoints

  @property
  def state_sh(self) -> TrainState:
    return sharding.shardings_of(self.abstract)


def setup(config, workdir: str, splits=('train', 'eval')) -> Run:
  """Checks the config and the workdir, then builds the mesh, model, data and checkpoints."""
  config_rules.check(config)
  checkpoint.check_writable(workdir, 'workdir')  # now, not after an hour of training
  checkpoint.check_writable(os.path.join(workdir, 'checkpoints'))
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval batch size')
  model = build_model(config)
  info, train_ds, eval_ds, (n_train, n_eval, crop, eval_size) = make_data(
      config, model.normalization, splits)
  init, abstract = sharding.train_state_initializer(
      jax.random.key(config.seed), model=model, tx=optim.make_optimizer(config),
      input_shape=(1, *crop, 3), mesh=mesh, rules=config.sharding_rules,
      ema=bool(config.ema_decay))
  window = eval_window(config, eval_size, crop, mesh.size) if eval_ds is not None else None
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                 keep=config.keep_checkpoints,
                                 meta=_checkpoint_meta(config, model, info))
  return Run(mesh=mesh, model=model, info=info, train_ds=train_ds, eval_ds=eval_ds,
             n_train=n_train, n_eval=n_eval, crop=crop, eval_size=eval_size, eval_window=window,
             init=init, abstract=abstract, ckpts=ckpts)


def loss_parts(metrics: dict, model) -> dict:
  """'train/loss/main' and one entry per auxiliary head (named by ``aux_names(model)`` where the
  model names them, e.g. 'train/loss/ss_res2', else 'train/loss/aux0'), unweighted."""
  names = models.aux_names(model)
  out = {}
  for key, value in metrics.items():
    if key.startswith('loss/aux'):
      i = int(key[len('loss/aux'):])
      key = f'loss/{names[i]}' if i < len(names) else key
    if key.startswith('loss/'):
      out[f'train/{key}'] = value
  return out


def make_train_step(config, model, mesh, state_sh, ignore_label: int = 255):
  """The jitted, donating, sharded train step the trainer runs (benchmarks time this one)."""
  step = functools.partial(steps.train_step, model=model,
                           loss_fn=losses.from_config(config, ignore_label),
                           ema_fn=optim.ema_from_config(config))
  return jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(config, model, num_classes: int, ignore_label: int = 255, window=None):
  """The jitted eval step (confusion matrix of a global batch) with the config's inference
  settings; its shardings come from its arguments (``put_batch``'s, or ShapeDtypeStructs')."""
  return jax.jit(functools.partial(
      steps.eval_step, model=model, num_classes=num_classes, ignore_label=ignore_label,
      **inference.settings(config, model.normalization, window)))


def make_eval_fn(config, run: Run):
  """``state -> scores`` over the eval split: what training's evaluations and ``evaluate``
  (``--mode=eval``) both run."""
  step = make_eval_step(config, run.model, run.info.num_classes, run.info.ignore_label,
                        run.eval_window)
  return lambda state: run_evaluation(state, step, run.eval_ds, run.mesh, run.info.num_classes)


def _evaluation_pictures(config, info, workdir: str, step: int, result: dict, prefix: str = ''):
  """``WORKDIR/eval/{prefix}step{N}_``: confusion.json, confusion.png, iou.png."""
  return plots.write_evaluation(os.path.join(workdir, 'eval'), f'{prefix}step{step}_', result,
                                info.class_names, f'{info.name} {config.eval_split}, step {step}')


def print_scores(info, result: dict) -> None:
  for name, iou in zip(info.class_names, result['per_class_iou']):
    print(f'  IoU {name:<12s} {iou:.4f}')
  print(f'pixel acc: {result["pixel_acc"]:.4f}  mean acc: {result["mean_acc"]:.4f}')


def _init_variables(config, run) -> dict:
  """``config.init_checkpoint`` -> {'params', 'batch_stats'} checked against this run's model.

  The path is converted weights (``python -m refinenet_jax.convert``), another run's workdir
  (its best step) or a PyTorch file (``.pth``/``.pt``/``.pth.tar``): a published one is known by
  its hash (convert/manifest.py), any other needs ``config.init_checkpoint_layout``. A coarser FCN
  starts a finer one (staged 32s -> 16s -> 8s training: the new skips start at zero); any other
  model, class count or normalisation is refused.
  """
  path, model = config.init_checkpoint, run.model
  if pretrained.is_torch_file(path):
    meta, variables = pretrained.read_torch_weights(
        path, model, model_name=config.model, num_classes=config.num_classes,
        layout=config.init_checkpoint_layout, rng=jax.random.key(config.seed))
  else:
    meta, variables = read_weights(path, sharding.replicated(run.mesh))
  for key, want in (('num_classes', config.num_classes), ('normalization', model.normalization)):
    if meta.get(key, want) != want:
      raise ValueError(f'{path} has {key} {meta[key]!r}; this run needs {want!r}')
  if meta['model'] != config.model:
    variables = models.start_from(meta['model'], config.model, variables, model, where=path)
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  abstract = {'params': run.abstract.params, 'batch_stats': run.abstract.batch_stats}
  tree_check.check_tree(variables, abstract, f' ({path})')
  return variables


def initial_state(config, run, train_iter=None):
  """Newest checkpoint in the workdir, else ``config.init_checkpoint``, else random init."""
  ckpts = run.ckpts
  if ckpts.latest_step() is not None:
    # the newest that restores (corrupt ones set aside)
    state = ckpts.restore(run.abstract, train_iter)
    print(f'resuming from step {ckpts.latest_step()} in {ckpts.directory}', flush=True)
    return state
  state = run.init(jax.random.key(config.seed))
  if config.init_checkpoint:
    variables = _init_variables(config, run)
    sh = run.state_sh
    state = state.replace(**jax.device_put(
        variables, {'params': sh.params, 'batch_stats': sh.batch_stats}))
    if state.ema_params is not None:  # the average starts from the loaded weights
      state = state.replace(ema_params=jax.tree.map(jnp.copy, state.params))  # own buffers
    print(f'initialised from {config.init_checkpoint}', flush=True)
  return state


def write_config(config, workdir: str) -> str:
  """The run's config as ``workdir/config.json`` (the console stays short). A different config
  from an earlier start of the same workdir is kept as ``config-<n>.json``, never overwritten."""
  path = os.path.join(workdir, 'config.json')
  if jax.process_index() != 0:
    return path
  text = config.to_json_best_effort(indent=2, sort_keys=True) + '\n'
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return path
    n = 1
    while os.path.exists(os.path.join(workdir, f'config-{n}.json')):
      n += 1
    os.replace(path, os.path.join(workdir, f'config-{n}.json'))
    print(f'the config differs from this workdir\'s earlier one, kept as config-{n}.json')
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)
  return path


def train_and_evaluate(config, workdir: str) -> dict:
  run = setup(config, workdir)
  print(f'config: {write_config(config, workdir)}', flush=True)
  mesh, model, info, ckpts = run.mesh, run.model, run.info, run.ckpts
  train_iter = iter(run.train_ds)
  state = initial_state(config, run, train_iter)
  start = int(jax.device_get(state.step))
  groups = optim.param_labels(state.params)
  n_enc = sum(x.size for x, g in zip(jax.tree.leaves(state.params), jax.tree.leaves(groups))
              if g == 'encoder')
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'{config.model}: {n_params:,} parameters ({n_enc:,} encoder); {info.name}: '
        f'{run.n_train} train images (crops {run.crop}), {run.n_eval} eval images (padded to '
        f'{run.eval_size}); '
        f'{mesh.size} device(s) on {jax.process_count()} process(es)', flush=True)

  step_fn = make_train_step(config, model, mesh, run.state_sh, info.ignore_label)
  eval_fn = make_eval_fn(config, run)
  predict_fn = jax.jit(functools.partial(  # the panels show what is scored
      steps.predict_step, model=model,
      **inference.settings(config, model.normalization, run.eval_window)))
  lr_fn = optim.learning_rate_fn(config)
  writer = writers.MetricWriter(workdir, tensorboard=config.tensorboard)
  total = config.num_steps * config.grad_accum_steps  # micro-steps
  progress = console.Progress(total, start)

  def evaluate_now(step):
    """Scores of the step just saved (``record_score`` ranks it once the evaluation is done)."""
    try:
      result = eval_fn(state)
    except BaseException:
      ckpts.wait()  # the step saved before this evaluation is complete on disk
      raise
    writer.scalars(step, {'eval/miou': result['miou'], 'eval/pixel_acc': result['pixel_acc'],
                          'eval/mean_acc': result['mean_acc'], 'eval/fw_iou': result['fw_iou']})
    batch = next(iter(run.eval_ds))
    preds = np.asarray(jax.device_get(predict_fn(state, sharding.put_batch(batch, mesh))))
    writer.images(step, {f'eval/sample{i}': writers.prediction_panel(
        batch['image'][i], batch['label'][i], preds[i], info.palette, info.ignore_label)
        for i in range(min(3, len(preds)))})
    if jax.process_index() == 0:
      pictures = _evaluation_pictures(config, info, workdir, step, result)
      writer.images(step, {f'eval/{k}': v for k, v in pictures.items()})
    progress.write(f'step {step}: val mIoU {result["miou"]:.4f}  '
                   f'pixel acc {result["pixel_acc"]:.4f}')
    return result

  def check_finite(step, m):
    loss, gnorm = float(m['loss']), float(m['grad_norm'])
    if not (np.isfinite(loss) and np.isfinite(gnorm)):
      ckpts.wait()
      last = ckpts.latest_step()
      where = ('no checkpoint was written yet' if last is None else
               f'the last good checkpoint is step {last} in {ckpts.directory} (untouched)')
      raise FloatingPointError(
          f'loss {loss} / gradient norm {gnorm} at step {step}: training stopped; {where}. '
          'Lower the learning rate or set grad_clip_norm, then resume.')

  history, result = [], None
  t_last, step_last, t0 = time.time(), start, time.time()
  with _Preemption() as preemption, progress:
    for step in range(start + 1, total + 1):
      ckpts.check()  # a failed background save stops training here
      state, m = step_fn(state, sharding.put_batch(next(train_iter), mesh))
      log_now = step % config.log_every == 0 or step == total
      # the last step is saved after the loop, before the final evaluation
      save_now = config.checkpoint_every and step % config.checkpoint_every == 0 and step != total
      eval_now = config.eval_every and step % config.eval_every == 0 and step != total
      if log_now or save_now or eval_now:
        m = jax.device_get(m)
        check_finite(step, m)
      if log_now:
        now = time.time()
        rate = (step - step_last) * config.batch_size / (now - t_last)
        eta = (total - step) * (now - t_last) / max(step - step_last, 1)
        t_last, step_last = now, step
        lr = float(lr_fn(step // config.grad_accum_steps))
        writer.scalars(step, {'train/loss': m['loss'], 'train/lr': lr,
                              'train/grad_norm': m['grad_norm'], 'perf/img_per_sec': rate,
                              **loss_parts(m, model)})
        history.append({'step': step, 'loss': float(m['loss'])})
        progress.write(f'step {step}/{total}  loss {float(m["loss"]):.4f}  lr {lr:.2e}  '
                       f'{rate:.1f} img/s  ETA {eta / 60:.1f} min')
      progress.update()
      if save_now or eval_now:  # saved before it is evaluated: a failing evaluation loses nothing
        ckpts.save(step, state, train_iter)
      if eval_now:
        result = evaluate_now(step)
        ckpts.record_score(step, result['miou'])
      # across processes the flag is gathered only at log steps: a per-step host sync would
      # cost every step on a pod
      if (log_now or jax.process_count() == 1) and preemption.any_process():
        if not (save_now or eval_now):
          ckpts.save(step, state, train_iter)
        ckpts.wait()
        progress.write(f'SIGTERM: saved step {step} to {ckpts.directory}; exiting')
        writer.close()
        return {'preempted': True, 'step': step}
  train_time = time.time() - t0
  if ckpts.latest_step() != total:  # (a resumed, already finished run only re-evaluates)
    ckpts.save(total, state, train_iter)
  result = evaluate_now(total)
  ckpts.record_score(total, result['miou'])
  ckpts.wait()
  writer.flush()
  print_scores(info, result)
  if jax.process_index() == 0:
    curves = plots.write_curves(workdir)
    print(f'pictures: {curves}, {workdir}/eval/step{total}_{{confusion,iou}}.png', flush=True)
  print(f'val mIoU: {result["miou"]:.4f}  (train {train_time:.0f} s)', flush=True)
  out = {'val': result, 'train_loss': history, 'train_seconds': train_time, 'step': total}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump(out, f, indent=2)
  writer.close()
  ckpts.close()
  return out


def _restore_for_inference(config, run, which: str):
  ckpts = run.ckpts
  step = ckpts.best_step() if which == 'best' else ckpts.latest_step()
  step = ckpts.latest_step() if step is None else step
  if step is None:
    if not config.init_checkpoint:
      raise FileNotFoundError(f'no checkpoint in {ckpts.directory} and no init_checkpoint')
    return initial_state(config, run), 0
  return ckpts.restore(run.abstract, None, step), step


def evaluate(config, workdir: str, checkpoint: str = 'best') -> dict:
  """Evaluates the best (or latest) checkpoint with the config's eval settings."""
  run = setup(config, workdir, splits=('eval',))
  state, step = _restore_for_inference(config, run, checkpoint)
  info = run.info
  t0 = time.time()
  result = make_eval_fn(config, run)(state)
  print_scores(info, result)
  print(f'{info.name} {config.eval_split} (step {step}, scales {tuple(config.eval_scales)}, '
        f'flip {config.eval_flip}): mIoU {result["miou"]:.4f}  pixel acc '
        f'{result["pixel_acc"]:.4f}  ({time.time() - t0:.0f} s)', flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'eval_{config.eval_split}_step{step}.json'), 'w') as f:
      json.dump({'step': step, **result}, f, indent=2)
    _evaluation_pictures(config, info, workdir, step, result, prefix=f'{config.eval_split}_')
    print(f'pictures: {workdir}/eval/{config.eval_split}_step{step}_{{confusion,iou}}.png',
          flush=True)
  run.ckpts.close()
  return result


class PredictError(Exception):
  """Some input images could not be read; every other image's outputs were written.

  ``failures``: (path, reason) per bad image; ``written``: the output files.
  """

  def __init__(self, failures: list[tuple[str, str]], written: list[str]):
    self.failures, self.written = failures, written
    lines = ''.join(f'\n  {path}: {reason}' for path, reason in failures)
    super().__init__(f'{len(failures)} image(s) failed (the other images\' outputs were '
                     f'written):{lines}')


def _predict_outputs(input_dir: str, output_dir: str) -> dict[str, tuple[str, str]]:
  """Input image file -> its (mask, overlay) paths; directories and other files are skipped."""
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f'input_dir {input_dir} is not a folder')
  names = sorted(f for f in os.listdir(input_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
  files = [f for f in names if os.path.isfile(os.path.join(input_dir, f))]
  for f in sorted(set(names) - set(files)):
    print(f'skipping {os.path.join(input_dir, f)}: not a file', flush=True)
  if not files:
    raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {input_dir}')
  outputs, by_stem = {}, {}
  for name in files:
    stem = os.path.splitext(name)[0]
    if stem in by_stem:
      raise ValueError(f'{by_stem[stem]} and {name} in {input_dir} would write the same '
                       f'{stem}_mask.png / {stem}_overlay.png; rename one')
    by_stem[stem] = name
    outputs[name] = tuple(os.path.join(output_dir, f'{stem}_{suffix}.png')
                          for suffix in ('mask', 'overlay'))
  return outputs


def write_predictions(load: Callable[[], tuple[Callable, np.ndarray]], input_dir: str,
                      output_dir: str, overwrite: bool = False) -> list[str]:
  """Colour-coded masks (``<name>_mask.png``) and overlays (``<name>_overlay.png``) of every
  image in ``input_dir``; ``load()`` returns (labels of one uint8 (H, W, 3) image, palette).

  Existing outputs are refused (all checked before ``load`` runs) unless ``overwrite``.
  An unreadable image does not stop the others: the bad ones are listed at the end and
  :class:`PredictError` raised once every good image's outputs are written.
  """
  from PIL import Image
  outputs = _predict_outputs(input_dir, output_dir)
  existing = [p for pair in outputs.values() for p in pair if os.path.lexists(p)]
  if existing and not overwrite:
    listed = ', '.join(existing[:5]) + (f' and {len(existing) - 5} more' if len(existing) > 5
                                        else '')
    raise FileExistsError(f'{len(existing)} output file(s) exist: {listed}; pass '
                          'overwrite=True (--overwrite) or choose another output_dir')
  os.makedirs(output_dir, exist_ok=True)
  labels_fn, palette = load()
  written, failures = [], []
  for name, paths in outputs.items():
    path = os.path.join(input_dir, name)
    try:
      with Image.open(path) as im:
        image = to_rgb(im, path)  # 16-bit, float, CMYK... by their real range
    except Exception as e:  # PIL raises several types for damaged or unsupported files
      failures.append((path, f'cannot decode image: {type(e).__name__}: {e}'))
      continue
    colours = palette[labels_fn(image)]
    for out, array in zip(paths, (colours, writers.overlay(image, colours))):
      Image.fromarray(array).save(out)
      written.append(out)
  print(f'wrote {len(written)} files for {len(outputs) - len(failures)} images to {output_dir}',
        flush=True)
  if failures:
    for path, reason in failures:
      print(f'FAILED {path}: {reason}', flush=True)
    raise PredictError(failures, written)
  return written


def predict(config, workdir: str, input_dir: str, output_dir: str, checkpoint: str = 'best',
            overwrite: bool = False) -> list[str]:
  """:func:`write_predictions` with a workdir's best (or latest) step and the config's eval
  settings (scales, flip, window). With ``eval_window`` (images larger than memory allows) each
  image's windows are batched over every device of the run's mesh."""
  def load():
    run = setup(config, workdir, splits=())
    state, _ = _restore_for_inference(config, run, checkpoint)
    run.ckpts.close()
    kwargs = inference.settings(config, run.model.normalization)
    mesh = run.mesh
    if kwargs['window']:  # one image at a time: its windows spread over every device
      kwargs.update(window_batch=mesh.size, place=sharding.window_placement(mesh))
    else:  # one whole image of any size: nothing to split
      mesh = sharding.make_mesh(1)
    state = jax.device_put(state, sharding.replicated(mesh))
    predict_fn = jax.jit(functools.partial(steps.predict_step, model=run.model, **kwargs))
    return lambda image: np.asarray(predict_fn(state, {'image': image[None]}))[0], \
        run.info.palette
  return write_predictions(load, input_dir, output_dir, overwrite)


def predict_exported(artifact: str, input_dir: str, output_dir: str,
                     overwrite: bool = False) -> list[str]:
  """:func:`write_predictions` with an exported model (``python -m refinenet_jax.export``):
  its baked-in scales and flip, its manifest's palette."""
  def load():
    fn = serving.load(artifact)
    palette = np.asarray(fn.manifest['palette'], np.uint8)
    return lambda image: np.asarray(fn(image[None])['labels'])[0], palette
  return write_predictions(load, input_dir, output_dir, overwrite)
