"""Pictures of a run: confusion matrix, per-class IoU, training curves (PNG and TensorBoard).

matplotlib is imported when a picture is drawn (Agg, no display), not when the package is.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

# Above this many classes the cells are too small to print their values in.
ANNOTATE_MAX_CLASSES = 25


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot
  return pyplot


def _image(fig) -> np.ndarray:
  """The figure as uint8 (H, W, 3), then closed."""
  fig.canvas.draw()
  img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  _pyplot().close(fig)
  return img


def row_normalised(cm) -> np.ndarray:
  """Each ground-truth row divided by its count (recall per class); rows without pixels are 0."""
  cm = np.asarray(cm, np.float64)
  rows = cm.sum(1, keepdims=True)
  return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def confusion_image(cm, class_names: Sequence[str], title: str = '') -> np.ndarray:
  """Row-normalised heat map (colour and, for few classes, the percentage in each cell)."""
  plt = _pyplot()
  norm, n = row_normalised(cm), len(class_names)
  side = min(4 + 0.45 * n, 24)
  fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=80)
  im = ax.imshow(norm, cmap='Blues', vmin=0, vmax=1)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='fraction of the true class')
  ax.set_xticks(range(n), class_names, rotation=90)
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('ground truth')
  if n <= ANNOTATE_MAX_CLASSES:
    for i in range(n):
      for j in range(n):
        if norm[i, j] >= 0.005:
          ax.text(j, i, f'{100 * norm[i, j]:.0f}', ha='center', va='center', fontsize=8,
                  color='white' if norm[i, j] > 0.5 else 'black')
  ax.set_title(title or 'confusion matrix (row-normalised, %)')
  fig.tight_layout()
  return _image(fig)


def iou_image(per_class_iou: Sequence[float], class_names: Sequence[str],
              title: str = '') -> np.ndarray:
  """Horizontal bars of per-class IoU, the mean as a line; classes never seen are marked n/a."""
  plt = _pyplot()
  iou = np.asarray(per_class_iou, np.float64)
  n = len(class_names)
  fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * n + 1)), dpi=80)
  ax.barh(range(n), np.nan_to_num(iou), color='tab:blue')
  for i, v in enumerate(iou):
    ax.text(0.005 if math.isnan(v) else v + 0.005, i, 'n/a' if math.isnan(v) else f'{v:.3f}',
            va='center', fontsize=8)
  title = title or 'per-class IoU'
  if np.any(~np.isnan(iou)):
    ax.axvline(np.nanmean(iou), color='tab:red', linestyle='--', linewidth=1)
    title += f' (dashed: mIoU {np.nanmean(iou):.4f})'
  ax.set_yticks(range(n), class_names)
  ax.invert_yaxis()
  ax.set_xlim(0, 1.1)
  ax.set_xlabel('IoU')
  ax.set_title(title)
  fig.tight_layout()
  return _image(fig)


def series(records: Sequence[dict], key: str) -> list[tuple[int, float]]:
  """(step, value) of ``key`` in step order; a resumed run's later record of a step wins."""
  return sorted({r['step']: r[key] for r in records if key in r}.items())


def curves_image(records: Sequence[dict]) -> np.ndarray:
  """Train loss, learning rate and val mIoU against the step, from ``metrics.jsonl`` records."""
  plt = _pyplot()
  panels = [('train/loss', 'train loss'), ('train/lr', 'learning rate'), ('eval/miou', 'val mIoU')]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), dpi=80)
  last_step = max((r['step'] for r in records), default=1)
  for ax, (key, label) in zip(axes, panels):
    pts = series(records, key)
    if pts:
      ax.plot(*zip(*pts), marker='o' if len(pts) < 30 else None, markersize=3)
      label = f'{label} (last: {pts[-1][1]:.4g})'
    ax.set_title(label)
    ax.set_xlim(0, last_step * 1.03)  # one time axis: a lone end-of-run evaluation sits at the end
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return _image(fig)


def _write_png(path: str, img: np.ndarray) -> str:
  from PIL import Image
  Image.fromarray(img).save(path + '.tmp.png')
  os.replace(path + '.tmp.png', path)
  return path


def write_evaluation(folder: str, prefix: str, result: dict, class_names: Sequence[str],
                     label: str = '') -> dict[str, np.ndarray]:
  """``{prefix}confusion.json`` (counts, row-normalised, class names), ``{prefix}confusion.png``
  and ``{prefix}iou.png`` in ``folder``; returns the two pictures (for TensorBoard)."""
  os.makedirs(folder, exist_ok=True)
  cm = np.asarray(result['confusion'], np.int64)
  with open(os.path.join(folder, f'{prefix}confusion.json'), 'w') as f:
    json.dump({'class_names': list(class_names), 'rows': 'ground truth', 'columns': 'predicted',
               'counts': cm.tolist(), 'row_normalised': row_normalised(cm).round(6).tolist()},
              f, indent=1)
  at = f', {label}' if label else ''
  images = {'confusion': confusion_image(cm, class_names,
                                         f'confusion matrix{at} (row-normalised, %)'),
            'iou': iou_image(result['per_class_iou'], class_names, f'per-class IoU{at}')}
  for name, img in images.items():
    _write_png(os.path.join(folder, f'{prefix}{name}.png'), img)
  return images


def write_curves(workdir: str) -> str | None:
  """``workdir/curves.png`` from ``workdir/metrics.jsonl`` (None when there is no log yet)."""
  log = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(log):
    return None
  with open(log) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return _write_png(os.path.join(workdir, 'curves.png'), curves_image(records))
