"""Segmentation metrics: a confusion matrix accumulated on device, scores computed on host."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def confusion_matrix(preds, labels, num_classes: int, valid=None, ignore_label: int = 255):
  """(num_classes, num_classes) int32 counts, rows = ground truth, cols = prediction.

  Pixels whose label is ``ignore_label`` or where ``valid`` is False (padding) are not counted.
  """
  labels = labels.astype(jnp.int32)
  keep = labels != ignore_label
  if valid is not None:
    keep = keep & valid.astype(bool)
  idx = jnp.where(keep, labels * num_classes + preds.astype(jnp.int32), num_classes ** 2)
  counts = jnp.bincount(idx.reshape(-1), length=num_classes ** 2 + 1)[:-1]
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def scores(cm) -> dict:
  """mIoU, per-class IoU, pixel and mean accuracy, frequency-weighted IoU, and the counts.

  Classes absent from both ground truth and prediction have undefined IoU and are left out of
  the means (reported as NaN per class).
  """
  counts = np.asarray(cm).astype(np.int64).tolist()
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  gt, pred = cm.sum(1), cm.sum(0)
  union = gt + pred - tp
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, tp / union, np.nan)
    acc = np.where(gt > 0, tp / gt, np.nan)
  total = cm.sum()
  return {
      'miou': float(np.nanmean(iou)) if np.any(union > 0) else float('nan'),
      'per_class_iou': iou.tolist(),
      'pixel_acc': float(tp.sum() / total) if total else float('nan'),
      'mean_acc': float(np.nanmean(acc)) if np.any(gt > 0) else float('nan'),
      'fw_iou': float(np.nansum(gt / total * iou)) if total else float('nan'),
      'confusion': counts,  # rows: ground truth, columns: predicted
  }
