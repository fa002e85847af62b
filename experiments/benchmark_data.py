"""Input-pipeline throughput: decode + augment images/s, and the default config's consumption.

  python -m experiments.benchmark_data --camvid /data/CamVid [--out runs/bench_data.json]

1. CamVid, 360x480 (built into a temporary data_dir): decode only (the data source), and the
   training pipeline (random scale 0.7-1.3, pad, 360x480 crop, flip, batch 8) at 1 and 2 threads.
2. The default config's pipeline (synthetic_scenes, its crop/scale/flip/batch), against the
   images/s its train step consumes on this machine (jitted step on a fixed batch, after compile).
Batches are pulled as fast as possible after one warm-up batch; medians of --repeats runs.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import tensorflow_datasets as tfds

from configs.default import get_config
from refinenet_jax import optim, sharding, train
from refinenet_jax.data import datasets, pipeline


def _rate(make_iter, images_per_batch, batches, repeats):
  rates = []
  for _ in range(repeats):
    it = make_iter()
    next(it)  # thread start-up and first reads are not throughput
    t = time.perf_counter()
    for _ in range(batches):
      next(it)
    rates.append(batches * images_per_batch / (time.perf_counter() - t))
  return statistics.median(rates), rates


def camvid(root, data_dir, repeats):
  b = datasets.prepare('camvid', data_dir, manual_dir=root)
  src = datasets.data_source(b, 'train')
  out = {}
  t = time.perf_counter()
  for i in range(100):
    src[i]
  out['decode_only_img_s_1thread'] = 100 / (time.perf_counter() - t)
  for threads in (1, 2):
    make = lambda: iter(pipeline.train_dataset(
        src, global_batch_size=8, crop_size=(360, 480), seed=0, scale_range=(0.7, 1.3),
        num_threads=threads))
    out[f'train_pipeline_img_s_{threads}threads'], out[f'runs_{threads}threads'] = _rate(
        make, 8, 40, repeats)
  return out


def default_config(data_dir, repeats):
  c = get_config()
  c.data_dir = data_dir
  model = train.build_model(c)
  info, train_ds, _, _ = train.make_data(c, model.normalization, splits=('train',))
  pipe, runs = _rate(lambda: iter(train_ds), c.batch_size, 150, repeats)
  # what training consumes: the trainer's jitted step alone on one fixed batch, on the mesh
  mesh = sharding.make_mesh(c.mesh)
  batch = next(iter(train_ds))
  state = sharding.create_train_state(
      jax.random.key(0), model=model, tx=optim.make_optimizer(c),
      input_shape=(1, *batch['image'].shape[1:]), mesh=mesh, rules=c.sharding_rules)
  step = train.make_train_step(c, model, mesh, sharding.shardings_of(state), info.ignore_label)
  batch = sharding.put_batch(batch, mesh)
  state, m = step(state, batch)
  jax.block_until_ready(m)
  n = 40
  t = time.perf_counter()
  for _ in range(n):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  consumed = n * c.batch_size / (time.perf_counter() - t)
  return {'pipeline_img_s': pipe, 'runs': runs, 'train_step_consumes_img_s': consumed,
          'ratio': pipe / consumed, 'batch_size': c.batch_size, 'crop': c.image_size,
          'scale_range': list(c.scale_range), 'data_threads': c.data_threads}


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--camvid', default=os.path.join('..', 'shared', 'data', 'camvid'))
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--out', default='')
  a = p.parse_args()
  tfds.disable_progress_bar()
  result = {'cpus': os.cpu_count(), 'jax': jax.__version__}
  with tempfile.TemporaryDirectory() as tmp:
    if os.path.isdir(a.camvid):
      result['camvid_360x480'] = camvid(a.camvid, os.path.join(tmp, 'camvid'), a.repeats)
    result['default_config'] = default_config(os.path.join(tmp, 'synth'), a.repeats)
  print(json.dumps(result, indent=2))
  if a.out:
    os.makedirs(os.path.dirname(a.out) or '.', exist_ok=True)
    with open(a.out, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
