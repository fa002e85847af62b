"""SS pre-training: image-level targets, the classifier with stage branches learning on a tiny
set, and the hand-over of encoder + branch trunks to the segmentation model."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import refinenet_jax as rj
from refinenet_jax import pretrain, steps
from refinenet_jax.convert import CheckpointMismatchError


def test_image_level_targets_from_masks():
  masks = np.array([[[0, 0], [2, 255]], [[1, 1], [1, 1]], [[255, 255], [255, 255]]], np.uint8)
  np.testing.assert_array_equal(pretrain.image_level_targets(masks, 4),
                                [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])


def test_list_image_folder(tmp_path):
  for cls, files in (('dog', ['b.jpg', 'a.PNG', 'notes.txt']), ('cat', ['x.jpeg'])):
    os.makedirs(tmp_path / cls)
    for f in files:
      (tmp_path / cls / f).write_bytes(b'')
  paths, ids, classes = pretrain.list_image_folder(str(tmp_path))
  assert classes == ['cat', 'dog'] and ids == [0, 1, 1]
  assert [os.path.relpath(p, tmp_path) for p in paths] == ['cat/x.jpeg', 'dog/a.PNG', 'dog/b.jpg']
  with pytest.raises(FileNotFoundError):
    pretrain.list_image_folder(str(tmp_path / 'cat'))


def _data(n=6, size=32):
  """Images whose dominant colour channel is the class; masks mark a coloured square."""
  rng = np.random.default_rng(0)
  ids = np.arange(n) % 3
  images = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
  masks = np.zeros((n, size, size), np.uint8)
  for i, c in enumerate(ids):
    images[i, 8:24, 8:24, c] = 250
    masks[i, 8:24, 8:24] = c + 1  # 0 = background, classes 1..3
  return images, ids, masks


def test_classification_losses_by_hand():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
  ids = jnp.array([0, 2])
  p = np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum()
  want = (-np.log(p[0]) - np.log(1 / 3)) / 2
  np.testing.assert_allclose(pretrain.classification_loss(logits, ids), want, rtol=1e-5)
  hot = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
  sig = lambda v: 1 / (1 + np.exp(-v))
  bce = -np.array([[np.log(sig(2.0)), np.log(1 - sig(0.0)), np.log(sig(-1.0))],
                   [np.log(1 - sig(0.5))] * 3])
  np.testing.assert_allclose(pretrain.classification_loss(logits, hot), bce.mean(), rtol=1e-5)


def test_ss_classifier_learns_with_branch_losses():
  seg = rj.create_model('exfuse_tiny', 4)
  images, ids, masks = _data()
  target = pretrain.image_level_targets(masks, 4)  # multi-label, from the masks
  model = pretrain.classifier_for(seg, 4, ss_hidden=16)
  state = jax.jit(functools.partial(steps.init_train_state, model=model,
                                    tx=optax.sgd(0.05, 0.9), input_shape=(1, 32, 32, 3)))(
                                        jax.random.key(0, impl='rbg'))
  weights = (0.1, 0.2, 0.3, 0.4)
  step = jax.jit(functools.partial(pretrain.classification_train_step, model=model,
                                   aux_weights=weights))
  losses = []
  for _ in range(8):
    state, m = step(state, {'image': images, 'target': target})
    branches = [f'loss/ss_res{s}' for s in (2, 3, 4, 5)]
    want = m['loss/main'] + sum(w * m[b] for w, b in zip(weights, branches))
    np.testing.assert_allclose(m['loss'], want, rtol=1e-5)
    losses.append(float(m['loss']))
  assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
  logits = jax.eval_shape(model.apply, {'params': state.params, 'batch_stats': state.batch_stats},
                          rj.normalize_images(images, model.normalization))
  assert logits.shape == (6, 4)  # eval: the final classifier only
  with pytest.raises(ValueError, match='aux_weights'):
    pretrain.classification_train_step(state, {'image': images, 'target': target}, model=model)


def _filled(model, x, seed):
  """Distinct random values in every leaf (only the hand-over is under test, not the init)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                      jax.eval_shape(model.init, jax.random.key(0), x))


def test_pretrained_encoder_and_branches_move_to_the_segmentation_model():
  seg = rj.create_model('exfuse_tiny', 3)
  clf = pretrain.classifier_for(seg, 10)
  x = jnp.zeros((1, 32, 32, 3))
  cv, sv = _filled(clf, x, 0), _filled(seg, x, 1)
  out = pretrain.segmentation_variables(cv, sv)
  assert jax.tree.structure(out) == jax.tree.structure(sv)
  for col in ('params', 'batch_stats'):
    for name in ('encoder', 'ss_res2', 'ss_res5'):
      jax.tree.map(np.testing.assert_array_equal, out[col][name], cv[col][name])
  jax.tree.map(np.testing.assert_array_equal, out['params']['gcn_res3'], sv['params']['gcn_res3'])
  jax.tree.map(np.testing.assert_array_equal, out['params']['ss_res2_classifier'],
               sv['params']['ss_res2_classifier'])
  other = pretrain.classifier_for(rj.create_model('exfuse_tiny', 3, stage_sizes=(2, 1, 1, 1)), 10)
  with pytest.raises(CheckpointMismatchError, match='layer1_1'):
    pretrain.segmentation_variables(_filled(other, x, 2), sv)
