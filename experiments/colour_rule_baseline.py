"""Floor and ceiling for the built-in synthetic scenes.

  python -m experiments.colour_rule_baseline [--num_train 6000 --num_val 500 --size 96]

Floor: the best per-pixel colour rule (colour -> most frequent train class, for every
quantisation level in --levels); the dataset is built to defeat it. Ceiling: a perfect predictor
at the models' 1/4 output resolution (the true label at each cell centre, one-hot, bilinearly
upsampled as evaluation does), which no RefineNet can beat by much at this image size.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from refinenet_jax import losses, metrics
from refinenet_jax.data import synthetic
from refinenet_jax.models.layers import resize_bilinear


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--num_train', type=int, default=6000)
  p.add_argument('--num_val', type=int, default=500)
  p.add_argument('--size', type=int, default=96)
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
  quarter = -(-a.size // 4)
  small = losses.nearest_downsample(vy, (quarter, quarter))
  up = resize_bilinear(jax.nn.one_hot(small, synthetic.NUM_CLASSES), size, 'half_pixel')
  s = metrics.scores(metrics.confusion_matrix(jnp.argmax(up, -1), jnp.asarray(vy),
                                              synthetic.NUM_CLASSES))
  print(f'perfect 1/4-resolution predictor: val mIoU {s["miou"]:.4f}  '
        f'pixel acc {s["pixel_acc"]:.4f}')


if __name__ == '__main__':
  main()
