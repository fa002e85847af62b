"""Segmentation losses, ignore-aware and optionally class-weighted: softmax cross-entropy, focal,
soft Dice, Lovász-softmax and OHEM cross-entropy, or a weighted sum of them
(``config.loss = 'cross_entropy+0.5*dice'``).

Two recipes for where the loss is computed: the official RefineNet compares the 1/4-resolution
logits with nearest-downsampled labels ('quarter'); the PyTorch ports upsample the logits to the
label size first ('upsample'). Auxiliary heads (deep supervision) reuse the same recipe.

Every loss runs inside the one jitted train step over the global (sharded) batch, so what a loss
gathers "over the batch" (Dice's per-class sums, Lovász's sorted pixels, OHEM's kept pixels) is
over the global batch whatever the device count, with no collectives here. Under gradient
accumulation the optimizer averages the micro-batches' gradients, so those quantities then cover
one micro-batch. All losses are computed in float32 and give 0 (finite gradient) for a batch
that is all ``ignore_label``.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from refinenet_jax.models.layers import resize_bilinear

LOSS_MODES = ('quarter', 'upsample')
# 'sum' is Caffe's SoftmaxWithLoss with normalize=False (the FCN "heavy" recipe): the loss, and so
# the useful learning rate, scales with the number of labelled pixels in the batch.
LOSS_REDUCTIONS = ('mean', 'sum')


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


def _valid_and_safe(labels, ignore_label):
  """(mask of labelled pixels, labels with ignored pixels set to class 0, int32)."""
  valid = labels != ignore_label
  return valid, jnp.where(valid, labels, 0).astype(jnp.int32)


def _pixel_weights(valid, safe, class_weights):
  weight = valid.astype(jnp.float32)
  if class_weights is not None and len(class_weights):
    weight = weight * jnp.asarray(class_weights, jnp.float32)[safe]
  return weight


def _safe_ratio(num, den):
  """num / den, 0 (not NaN) where den is 0; the guarded divisor keeps the gradient finite."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def cross_entropy(logits, labels, ignore_label: int = 255, class_weights=None):
  """(sum of per-pixel CE * weight, sum of weights) over non-ignored pixels, in float32.

  Sum and normaliser are returned separately so callers can average over a global batch or
  over gradient-accumulation steps; a mean of per-batch means would weight batches with many
  ignored pixels wrongly. Each pixel's weight is its true class's entry of ``class_weights``
  (1 when None or empty, as a config's ``()``), 0 for ``ignore_label``.
  """
  valid, safe = _valid_and_safe(labels, ignore_label)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  weight = _pixel_weights(valid, safe, class_weights)
  return jnp.sum(ce * weight), jnp.sum(weight)


# ---------------------------------------------------------------- one head, at loss resolution
# A term maps (float32 logits (N, h, w, C), labels (N, h, w)) at the same resolution, and the
# keywords ignore_label, class_weights, reduction, to a scalar.

def _mean_or_sum(total, norm, reduction):
  return total if reduction == 'sum' else _safe_ratio(total, norm)


def _cross_entropy_term(logits, labels, *, ignore_label, class_weights, reduction):
  return _mean_or_sum(*cross_entropy(logits, labels, ignore_label, class_weights), reduction)


def _focal_term(logits, labels, *, gamma, ignore_label, class_weights, reduction):
  valid, safe = _valid_and_safe(labels, ignore_label)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)  # -log p_true
  if gamma:
    # 1 - p_true from CE without cancellation, floored so that gamma < 1 keeps a finite
    # gradient where p_true rounds to 1
    ce = jnp.maximum(-jnp.expm1(-ce), 1e-12) ** gamma * ce
  weight = _pixel_weights(valid, safe, class_weights)
  return _mean_or_sum(jnp.sum(ce * weight), jnp.sum(weight), reduction)


def _class_mean(per_class, present, class_weights):
  """Mean of a per-class loss over the classes present in the labels (weighted by
  ``class_weights`` when given); 0 when no class is present."""
  w = present.astype(jnp.float32)
  if class_weights is not None and len(class_weights):
    w = w * jnp.asarray(class_weights, jnp.float32)
  return _safe_ratio(jnp.sum(w * per_class), jnp.sum(w))


def _mean_only(name, reduction):
  if reduction == 'sum':
    raise ValueError(f"loss {name!r} is a ratio over the batch: it has no 'sum' reduction")


def _dice_term(logits, labels, *, ignore_label, class_weights, reduction):
  _mean_only('dice', reduction)
  valid, safe = _valid_and_safe(labels, ignore_label)
  mask = valid[..., None].astype(jnp.float32)
  probs = jax.nn.softmax(logits, -1) * mask
  truth = jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32) * mask
  axes = tuple(range(logits.ndim - 1))  # every pixel of the batch: one sum per class
  inter, pred, true = (jnp.sum(x, axes) for x in (probs * truth, probs, truth))
  return _class_mean(1 - _safe_ratio(2 * inter, pred + true), true > 0, class_weights)


def _jaccard_increments(truth):
  """Weights of the Lovász extension of the Jaccard loss for pixels sorted by decreasing error
  (one column per class): J(first k+1 pixels) - J(first k), J of none being 0."""
  gts = jnp.sum(truth, 0)
  inter = gts - jnp.cumsum(truth, 0)
  union = gts + jnp.cumsum(1 - truth, 0)  # >= 1: a pixel either is in gts or adds 1
  jaccard = 1 - inter / union
  return jnp.concatenate([jaccard[:1], jnp.diff(jaccard, axis=0)], 0)


def _lovasz_term(logits, labels, *, ignore_label, class_weights, reduction):
  _mean_only('lovasz', reduction)
  valid, safe = _valid_and_safe(labels, ignore_label)
  num_classes = logits.shape[-1]
  valid = valid.reshape(-1, 1)
  probs = jax.nn.softmax(logits, -1).reshape(-1, num_classes)
  truth = jax.nn.one_hot(safe.reshape(-1), num_classes, dtype=jnp.float32) * valid
  errors = jnp.abs(truth - probs) * valid
  # decreasing error; ignored pixels last (key 1 > any -error), with error 0 and truth 0, so they
  # move no labelled pixel's place nor change its weight. The order is constant to autodiff.
  order = jnp.argsort(jnp.where(valid, -errors, 1.0), axis=0)
  errors, truth = (jnp.take_along_axis(x, order, 0) for x in (errors, truth))
  per_class = jnp.sum(errors * _jaccard_increments(truth), 0)
  return _class_mean(per_class, jnp.sum(truth, 0) > 0, class_weights)


def ohem_kept(logits, labels, *, thresh, min_kept, ignore_label=255):
  """Mask of the pixels OHEM keeps (see ``ohem_loss``), logits and labels at one resolution."""
  valid, safe = _valid_and_safe(labels, ignore_label)
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), -1)
  p_true = jnp.take_along_axis(probs, safe[..., None], -1)[..., 0]
  keep = p_true < thresh
  k = min(min_kept * labels.shape[0], labels.size)  # static, so shapes stay fixed under jit
  if k:
    hardness = jnp.where(valid, -p_true, -jnp.inf).reshape(-1)
    hardest = jax.lax.top_k(hardness, k)[1]
    keep = keep | jnp.zeros(labels.size, bool).at[hardest].set(True).reshape(labels.shape)
  return keep & valid


def _ohem_term(logits, labels, *, thresh, min_kept, ignore_label, class_weights, reduction):
  keep = ohem_kept(logits, labels, thresh=thresh, min_kept=min_kept, ignore_label=ignore_label)
  kept = jnp.where(keep, labels, ignore_label)
  return _cross_entropy_term(logits, kept, ignore_label=ignore_label,
                             class_weights=class_weights, reduction=reduction)


# ---------------------------------------------------------------- every head

def _at_loss_resolution(logits, labels, mode):
  """(float32 logits, labels) at the resolution ``mode`` compares them."""
  if mode == 'quarter':
    labels = nearest_downsample(labels, logits.shape[1:3])
  else:
    logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3], 'align_corners')
  return logits.astype(jnp.float32), labels


def _over_heads(term, logits, labels, *, ignore_label: int = 255, mode: str = 'quarter',
                class_weights=None, aux_logits: Sequence = (), aux_weights: Sequence[float] = (),
                reduction: str = 'mean'):
  if mode not in LOSS_MODES:
    raise ValueError(f'unknown loss mode {mode!r}; valid: {LOSS_MODES}')
  if reduction not in LOSS_REDUCTIONS:
    raise ValueError(f'unknown loss reduction {reduction!r}; valid: {LOSS_REDUCTIONS}')
  aux_logits, aux_weights = tuple(aux_logits), tuple(aux_weights)
  if len(aux_logits) != len(aux_weights):
    raise ValueError(f'{len(aux_logits)} aux_logits but {len(aux_weights)} aux_weights')

  def head(lg):
    return term(*_at_loss_resolution(lg, labels, mode), ignore_label=ignore_label,
                class_weights=class_weights, reduction=reduction)

  loss = head(logits)
  parts = {'loss/main': loss}
  for i, (aux, w) in enumerate(zip(aux_logits, aux_weights)):
    parts[f'loss/aux{i}'] = head(aux)
    loss = loss + w * parts[f'loss/aux{i}']
  return loss, parts


def segmentation_loss(logits, labels, *, ignore_label: int = 255, mode: str = 'quarter',
                      class_weights=None, aux_logits: Sequence = (),
                      aux_weights: Sequence[float] = (), reduction: str = 'mean'):
  """Cross-entropy: (main + sum_i aux_weights[i] * aux_i, {'loss/main': ..., 'loss/aux{i}': ...}).

  ``labels`` are (N, H, W) at full resolution; every head is compared with them by ``mode``
  at its own resolution, and each term is its own weighted mean (``reduction='mean'``) so an
  auxiliary head's weight means the same whatever its size, or its weighted sum over the
  batch's pixels (``'sum'``, see ``LOSS_REDUCTIONS``). The other losses take these keywords too.
  """
  return _over_heads(_cross_entropy_term, logits, labels, ignore_label=ignore_label, mode=mode,
                     class_weights=class_weights, aux_logits=aux_logits,
                     aux_weights=aux_weights, reduction=reduction)


def focal_loss(logits, labels, *, focal_gamma: float = 2.0, **kwargs):
  """Focal loss (Lin et al. 2017): sum_i w_i (1 - p_i)^gamma CE_i / sum_i w_i over labelled
  pixels, p_i the true class's probability, w_i its class weight (the alpha of the paper).
  Down-weights easy pixels; ``focal_gamma=0`` is cross-entropy."""
  return _over_heads(functools.partial(_focal_term, gamma=focal_gamma), logits, labels, **kwargs)


def dice_loss(logits, labels, **kwargs):
  """Soft Dice: 1 - mean over the classes present in the batch's labels of
  2 sum(p_c y_c) / (sum p_c + sum y_c), the sums over all labelled pixels of the (global) batch
  (one Dice per class per batch, not per image). Classes absent from the labels are left out
  (their Dice would only push their probability down); ``class_weights`` weight the class mean.
  Mean reduction only."""
  return _over_heads(_dice_term, logits, labels, **kwargs)


def lovasz_loss(logits, labels, **kwargs):
  """Lovász-softmax (Berman et al. 2018): the Lovász extension of each present class's Jaccard
  loss on the errors |y_c - p_c|, over all labelled pixels of the (global) batch flattened
  (one sort per class per batch, not per image), averaged over the classes present in the
  labels (``class_weights`` weight that mean). A direct surrogate of mIoU; mean reduction only."""
  return _over_heads(_lovasz_term, logits, labels, **kwargs)


def ohem_loss(logits, labels, *, ohem_thresh: float = 0.7, ohem_min_kept: int = 100000,
              **kwargs):
  """Online hard example mining cross-entropy: only labelled pixels whose true-class
  probability is below ``ohem_thresh`` count, and at least the ``ohem_min_kept`` hardest
  (lowest probability) per image, pooled over the batch (``min_kept * N`` pixels at the loss's
  resolution: 1/16 of the crop's in 'quarter' mode); all if fewer are labelled. The selection
  is a static top-k (fixed shapes) and carries no gradient; the kept pixels' CE is averaged
  (class-weighted) as ``segmentation_loss``'s."""
  term = functools.partial(_ohem_term, thresh=ohem_thresh, min_kept=ohem_min_kept)
  return _over_heads(term, logits, labels, **kwargs)


# name -> loss with segmentation_loss's keywords; ``config.loss`` picks one or a weighted sum,
# ``from_config`` binds the config's settings (and any further keyword-only argument of the loss
# that names a config key, e.g. focal_loss's ``focal_gamma``), and ``steps.train_step`` calls the
# result as ``loss_fn(logits, labels, aux_logits=...) -> (loss, {'loss/main': ..., ...})``.
LOSSES: dict[str, Callable] = {'cross_entropy': segmentation_loss, 'focal': focal_loss,
                               'dice': dice_loss, 'lovasz': lovasz_loss, 'ohem': ohem_loss}
MEAN_ONLY = ('dice', 'lovasz')  # ratios over the batch: no loss_reduction='sum'


def parse_loss(spec: str) -> tuple[tuple[str, float], ...]:
  """``'cross_entropy+0.5*dice'`` -> (('cross_entropy', 1.0), ('dice', 0.5)).

  Terms are separated by '+', each a ``LOSSES`` name with an optional ``WEIGHT*`` prefix (a
  number > 0), each name at most once; a ValueError names the bad term.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f'loss {spec!r}: a LOSSES name or a sum like cross_entropy+0.5*dice')
  terms = []
  for raw in spec.split('+'):
    weight, star, name = raw.strip().rpartition('*')
    name = name.strip()
    try:
      w = float(weight) if star else 1.0
    except ValueError:
      w = math.nan
    if name not in LOSSES:
      raise ValueError(f'loss term {raw.strip()!r}: unknown loss {name!r}; valid: {sorted(LOSSES)}')
    if not (math.isfinite(w) and w > 0):
      raise ValueError(f'loss term {raw.strip()!r}: the weight must be a number > 0')
    if name in dict(terms):
      raise ValueError(f'loss term {raw.strip()!r}: {name!r} appears twice')
    terms.append((name, w))
  return tuple(terms)


def combined_loss(logits, labels, *, terms: Sequence[tuple[str, float, Callable]],
                  aux_logits: Sequence = ()):
  """sum_t weight_t * loss_t for ``terms`` = ((name, weight, bound loss), ...).

  Parts: 'loss/main' and 'loss/aux{i}' are the weighted sums of the terms' parts (so that
  loss = main + sum_i aux_weights[i] * aux_i still holds), and 'loss/NAME' is each term's own
  loss (unweighted), for the logs.
  """
  total, parts = 0.0, {}
  for name, weight, fn in terms:
    loss, term_parts = fn(logits, labels, aux_logits=aux_logits)
    total = total + weight * loss
    for key, value in term_parts.items():
      parts[key] = parts.get(key, 0.0) + weight * value
    parts[f'loss/{name}'] = loss
  return total, parts


def from_config(config, ignore_label: int = 255) -> Callable:
  """The loss the config asks for, its settings bound (the trainer's ``loss_fn``)."""
  common = dict(ignore_label=ignore_label, mode=config.loss_mode,
                class_weights=tuple(config.class_weights) or None,
                aux_weights=tuple(config.aux_weights), reduction=config.loss_reduction)

  def bound(name):
    fn = LOSSES[name]
    own = [p.name for p in inspect.signature(fn).parameters.values()
           if p.kind is p.KEYWORD_ONLY and p.name not in common and p.name in config]
    return functools.partial(fn, **common, **{k: config[k] for k in own})

  terms = parse_loss(config.loss)
  if len(terms) == 1 and terms[0][1] == 1.0:
    return bound(terms[0][0])
  return functools.partial(combined_loss, terms=tuple((n, w, bound(n)) for n, w in terms))
