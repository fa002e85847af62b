"""Semantic-supervision (SS) pre-training: ExFuse's encoder as an image classifier with a
classification branch on each stage, on any labelled image set.

ExFuse pre-trains its (layer-rearranged) ResNeXt on ImageNet with branches (3x3 conv -> 3x3 conv
-> global pool -> FC -> FC) on res-2..res-5, so the early stages that feed the decoder learn
semantic features. :class:`SSClassifier` is that network; its ``encoder`` and ``ss_res*``
branch trunks have the names and shapes of the segmentation model's, so
:func:`segmentation_variables` moves them across. Targets are class ids (single label: softmax
cross-entropy; e.g. :func:`list_image_folder`) or multi-hot vectors (multi-label: sigmoid
cross-entropy; e.g. :func:`image_level_targets` of segmentation masks).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from refinenet_jax.data.builders.base import IMAGE_EXTENSIONS
from refinenet_jax.models import aux_names
from refinenet_jax.models.backbones import ENCODERS, ModuleDef
from refinenet_jax.models.exfuse import ExFuse, SSBranch
from refinenet_jax.models.preprocessing import normalize_images
from refinenet_jax.steps import TrainState
from refinenet_jax.tree_check import check_tree

Dtype = Any


class SSClassifier(nn.Module):
  """Encoder + global-pooled SS branches + the final classifier (``fc``, torchvision's).

  Returns float32 class logits (N, K); in training ``(logits, branch_logits)`` with one entry
  per ``ss_stages`` (res-2 first). The branch hidden width ``ss_hidden`` is unverified.
  """
  num_classes: int
  encoder: ModuleDef = ENCODERS['resnext101_32x4d']
  ss_stages: Sequence[int] = (0, 1, 2, 3)
  ss_width: int = 256
  ss_bn: bool = True
  ss_hidden: int = 1024
  dtype: Dtype = jnp.float32
  remat: bool = False
  normalization: str = 'imagenet'

  @property
  def aux_names(self) -> tuple[str, ...]:
    """Names of the branch logits returned in training, in order."""
    return tuple(f'ss_res{s + 2}' for s in self.ss_stages)

  @nn.compact
  def __call__(self, images, train: bool = False):
    feats = self.encoder(name='encoder', dtype=self.dtype, remat=self.remat)(
        images.astype(self.dtype), train)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    aux = []
    if train or self.is_initializing():
      for s in self.ss_stages:
        y = SSBranch(self.ss_width, self.ss_bn, self.dtype, name=f'ss_res{s + 2}')(feats[s], train)
        y = nn.relu(dense(self.ss_hidden, f'ss_res{s + 2}_fc0')(y.mean((1, 2))))
        aux.append(dense(self.num_classes, f'ss_res{s + 2}_fc1')(y).astype(jnp.float32))
    logits = dense(self.num_classes, 'fc')(feats[-1].mean((1, 2))).astype(jnp.float32)
    return (logits, tuple(aux)) if train and aux else logits


def classifier_for(model: ExFuse, num_classes: int, **overrides) -> SSClassifier:
  """The SS classifier whose encoder and branches fit the segmentation ``model``."""
  ss_stages = model.ss_stages or (0, 1, 2, 3)
  fields = dict(encoder=model.encoder, ss_stages=ss_stages, ss_width=model.ss_width,
                ss_bn=model.ss_bn, dtype=model.dtype, normalization=model.normalization)
  return SSClassifier(num_classes, **{**fields, **overrides})


def segmentation_variables(classifier_vars, segmentation_vars):
  """``segmentation_vars`` with the encoder and every SS branch trunk the segmentation model
  has replaced by the pre-trained ones; shapes must agree exactly (else nothing is copied)."""
  src = traverse_util.flatten_dict(dict(classifier_vars))
  dst = traverse_util.flatten_dict(dict(segmentation_vars))
  shared = lambda path: path[1] == 'encoder' or (path[1].startswith('ss_res') and
                                                path[1][len('ss_res'):].isdigit())
  want = {p: v for p, v in dst.items() if shared(p)}
  have = {p: v for p, v in src.items() if shared(p) and (p[1] == 'encoder' or p in want)}
  check_tree(traverse_util.unflatten_dict(have), traverse_util.unflatten_dict(want),
             ' (SS pre-training -> segmentation)')
  return traverse_util.unflatten_dict({p: src[p] if shared(p) else v for p, v in dst.items()})


def image_level_targets(labels, num_classes: int, ignore_label: int = 255):
  """Multi-hot (N, K) float32: which classes appear in each (N, H, W) mask (ignore excluded)."""
  labels = jnp.asarray(labels).astype(jnp.int32)
  hot = jax.nn.one_hot(jnp.where(labels == ignore_label, -1, labels), num_classes)
  return hot.max(axis=(1, 2))


def list_image_folder(root: str):
  """``root/<class>/<image>`` -> (paths, class ids, class names sorted by name)."""
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise FileNotFoundError(f'no class folders in {root}')
  paths, ids = [], []
  for i, name in enumerate(classes):
    for f in sorted(os.listdir(os.path.join(root, name))):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(root, name, f))
        ids.append(i)
  return paths, ids, classes


def classification_loss(logits, targets):
  """Softmax CE for class ids (N,), sigmoid CE averaged over classes for multi-hot (N, K)."""
  if targets.ndim == 1:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets.astype(jnp.int32)).mean()
  return optax.sigmoid_binary_cross_entropy(logits, targets.astype(jnp.float32)).mean()


def classification_train_step(state: TrainState, batch: dict, *, model: SSClassifier,
                              aux_weights: Sequence[float] = ()):
  """One step on ``{'image': uint8 (N, H, W, 3), 'target': (N,) ids or (N, K) multi-hot}``:
  main loss + sum_i aux_weights[i] * branch i; returns (state, metrics)."""
  images = normalize_images(batch['image'], model.normalization)
  names = aux_names(model)
  if len(aux_weights) != len(names):
    raise ValueError(f'{len(names)} SS branches but {len(aux_weights)} aux_weights')

  def loss_fn(params):
    (logits, aux), updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'])
    parts = {'loss/main': classification_loss(logits, batch['target'])}
    loss = parts['loss/main']
    for name, a, w in zip(names, aux, aux_weights):
      parts[f'loss/{name}'] = classification_loss(a, batch['target'])
      loss = loss + w * parts[f'loss/{name}']
    return loss, (updates, parts)

  (loss, (updates, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates['batch_stats'])
  return state, {'loss': loss, 'grad_norm': optax.tree.norm(grads), **parts}
