"""How well a per-pixel colour rule segments the built-in synthetic scenes (it should not).

  python experiments/colour_rule_baseline.py [--num_train 2000 --num_val 500 --size 64]

Fits the best colour -> class table on the train split (every quantisation level in --levels)
and reports val mIoU with the library's metrics, next to what the default config reaches.
"""
import argparse

import numpy as np

from refinenet_jax import metrics
from refinenet_jax.data import synthetic


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--num_train', type=int, default=2000)
  p.add_argument('--num_val', type=int, default=500)
  p.add_argument('--size', type=int, default=64)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--levels', type=int, nargs='+', default=[4, 8, 16, 32])
  a = p.parse_args()
  size = (a.size, a.size)
  # the same streams as the synthetic_scenes builder: train = seed, val = seed + 1
  tx, ty = synthetic.make_synthetic_scenes(a.num_train, size, seed=a.seed)
  vx, vy = synthetic.make_synthetic_scenes(a.num_val, size, seed=a.seed + 1)
  for levels in a.levels:
    pred = synthetic.colour_rule_predict(tx, ty, vx, levels)
    cm = np.zeros((synthetic.NUM_CLASSES,) * 2, np.int64)
    np.add.at(cm, (vy.ravel(), pred.ravel()), 1)
    s = metrics.scores(cm)
    ious = ' '.join(f'{n}={v:.3f}' for n, v in zip(synthetic.CLASS_NAMES, s['per_class_iou']))
    print(f'levels {levels:2d} ({levels ** 3} colours): val mIoU {s["miou"]:.4f}  '
          f'pixel acc {s["pixel_acc"]:.4f}  [{ious}]')


if __name__ == '__main__':
  main()
