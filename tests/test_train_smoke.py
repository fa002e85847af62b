"""The main-job trainer end to end on a shrunken config, plus metrics and the built-in data."""
import json
import os

import jax.numpy as jnp
import jax
import numpy as np
import pytest

from configs.default import get_config
from refinenet_jax import export, metrics, serving, train
from refinenet_jax.data.synthetic import PALETTE, make_synthetic_scenes


def test_confusion_matrix_and_scores_by_hand():
  labels = jnp.array([[0, 0, 1, 255], [1, 2, 2, 0]])
  preds = jnp.array([[0, 1, 1, 3], [1, 2, 0, 0]])
  valid = jnp.array([[True, True, True, True], [True, True, True, False]])
  cm = np.asarray(metrics.confusion_matrix(preds, labels, 4, valid))
  # counted pixels: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0); 255 ignored, last pixel masked
  want = np.zeros((4, 4), int)
  for g, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (2, 0)]:
    want[g, p] += 1
  np.testing.assert_array_equal(cm, want)
  s = metrics.scores(cm)
  # IoU: c0 1/(2+2-1)=1/3, c1 2/(2+3-2)=2/3, c2 1/(2+1-1)=1/2, c3 absent -> NaN, not averaged
  np.testing.assert_allclose(s['per_class_iou'][:3], [1 / 3, 2 / 3, 1 / 2])
  assert np.isnan(s['per_class_iou'][3])
  assert s['miou'] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
  assert s['pixel_acc'] == pytest.approx(4 / 6)
  assert s['mean_acc'] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_synthetic_scenes_deterministic_and_varied():
  a_img, a_lab = make_synthetic_scenes(6, (40, 48), seed=3)
  b_img, b_lab = make_synthetic_scenes(6, (40, 48), seed=3)
  c_img, _ = make_synthetic_scenes(6, (40, 48), seed=4)
  np.testing.assert_array_equal(a_img, b_img)
  np.testing.assert_array_equal(a_lab, b_lab)
  assert not np.array_equal(a_img, c_img)
  assert a_img.shape == (6, 40, 48, 3) and a_lab.shape == (6, 40, 48)
  assert len(np.unique(a_lab)) >= 4
  prefix, _ = make_synthetic_scenes(3, (40, 48), seed=3)
  np.testing.assert_array_equal(prefix, a_img[:3])


def test_train_evaluate_predict_end_to_end(tmp_path):
  from PIL import Image
  from configs.tiny import get_config as tiny_config
  c = tiny_config()  # 10 val images in batches of 8: the last eval batch is padded
  c.data_dir = str(tmp_path / 'data')
  c.eval_every, c.checkpoint_every = 8, 8
  c.ema_decay = 0.8  # evaluated, checkpointed, restored and exported instead of the raw params
  workdir = tmp_path / 'run'
  out = train.train_and_evaluate(c, str(workdir))
  saved = json.loads((workdir / 'metrics.json').read_text())
  assert saved['val']['miou'] == out['val']['miou'] and 0.0 <= out['val']['miou'] <= 1.0
  losses = [h['loss'] for h in out['train_loss']]
  assert len(losses) == 3 and losses[-1] < losses[0] and np.all(np.isfinite(losses))
  log = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert {'train/loss', 'train/lr', 'perf/img_per_sec'} <= log[0].keys()
  assert [r['step'] for r in log if 'eval/miou' in r] == [8, 12]
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  # pictures of every evaluation (the counts are the final scores' confusion matrix) and curves
  for step in (8, 12):
    assert {f'step{step}_{f}' for f in ('confusion.json', 'confusion.png', 'iou.png')} <= {
        p.name for p in (workdir / 'eval').iterdir()}
  cm = json.loads((workdir / 'eval' / 'step12_confusion.json').read_text())
  assert cm['counts'] == out['val']['confusion'] and cm['class_names'][0] == 'background'
  with Image.open(workdir / 'curves.png') as im:
    assert im.size[0] > 600
  # eval mode on the saved checkpoint reproduces the training run's final number, also when the
  # 8-device checkpoint is restored onto 2 devices
  c.mesh = (('data', 2),)
  again = train.evaluate(c, str(workdir), checkpoint='latest')
  assert again['miou'] == pytest.approx(out['val']['miou'], abs=1e-9)
  assert json.loads((workdir / 'eval' / 'val_step12_confusion.json').read_text())['counts'] == (
      again['confusion'])
  c.eval_scales, c.eval_flip = (0.75, 1.0, 1.25), True  # multi-scale + flip path runs
  assert 0.0 <= train.evaluate(c, str(workdir), checkpoint='latest')['miou'] <= 1.0
  # a new run started from this one (init_checkpoint = its workdir) gets the best step's
  # evaluated params (the moving average) and BN statistics, not its optimizer state or step
  best, _ = train._restore_for_inference(c, train.setup(c, str(workdir), splits=()), 'best')
  c2 = tiny_config()
  c2.data_dir, c2.mesh, c2.init_checkpoint = c.data_dir, (('data', 2),), str(workdir)
  fresh = train.initial_state(c2, train.setup(c2, str(tmp_path / 'run2'), splits=()))
  assert int(fresh.step) == 0
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(best.ema_params),
                                                      jax.tree.leaves(best.params)))
  jax.tree.map(np.testing.assert_array_equal, (fresh.params, fresh.batch_stats),
               (best.ema_params, best.batch_stats))
  c2.num_classes += 1
  with pytest.raises(ValueError, match='num_classes'):
    train.initial_state(c2, train.setup(c2, str(tmp_path / 'run3'), splits=()))
  # predict mode: a colour mask and an overlay per image, colours from the palette
  images = tmp_path / 'images'
  images.mkdir()
  x, _ = make_synthetic_scenes(2, (40, 52), seed=9)
  for i, im in enumerate(x):
    Image.fromarray(im).save(images / f'img{i}.png')
  written = train.predict(c, str(workdir), str(images), str(tmp_path / 'pred'))
  assert sorted(os.path.basename(w) for w in written) == [
      'img0_mask.png', 'img0_overlay.png', 'img1_mask.png', 'img1_overlay.png']
  mask = np.asarray(Image.open(tmp_path / 'pred' / 'img0_mask.png'))
  assert mask.shape == (40, 52, 3)
  assert {tuple(p) for p in mask.reshape(-1, 3)} <= {tuple(p) for p in PALETTE}
  # sliding windows (images larger than memory allows): each image's windows over the mesh
  cw = tiny_config()
  cw.data_dir, cw.mesh, cw.eval_window, cw.ema_decay = c.data_dir, (('data', 4),), (32, 32), 0.8
  written = train.predict(cw, str(workdir), str(images), str(tmp_path / 'pred_windows'))
  assert len(written) == 4 and np.asarray(Image.open(written[0])).shape == (40, 52, 3)
  # exported (the same best step, scales and flip baked in), the run predicts the same masks
  # without its config or this library's model code; class names and colours come along
  assert export.main(['--workdir', str(workdir), '--output', str(tmp_path / 'art'),
                      '--platforms=cpu', '--scales=0.75,1,1.25', '--flip']) == 0
  manifest = serving.read_manifest(str(tmp_path / 'art'))
  assert manifest['palette'] == PALETTE[:c.num_classes].tolist()
  assert len(manifest['class_names']) == c.num_classes and manifest['model'] == c.model
  assert manifest['source'].endswith(f'step {best.step}')
  train.predict_exported(str(tmp_path / 'art'), str(images), str(tmp_path / 'pred2'))
  for i in range(2):
    a, b = (np.asarray(Image.open(tmp_path / d / f'img{i}_mask.png')) for d in ('pred', 'pred2'))
    # float32 summation order (a traced vs a stored resize matrix) may flip a near-tie pixel
    assert (a == b).all(-1).mean() > 0.999


def test_unknown_config_key_is_rejected():
  c = get_config()
  c.lock()
  with pytest.raises(AttributeError):
    c.num_stepz = 3


def test_a_new_builder_takes_its_config_from_the_run_config(tmp_path, monkeypatch):
  """A dataset whose builder config comes from run-config keys is one builder class and one
  BUILDERS entry: the trainer does not name it."""
  from refinenet_jax.data import datasets
  from refinenet_jax.data.builders.synthetic_scenes import SyntheticScenes, SyntheticScenesConfig

  class FewScenes(SyntheticScenes, skip_registration=True):
    name = 'few_scenes'

    @classmethod
    def from_run_config(cls, config):
      return SyntheticScenesConfig(image_size=32, num_train=config.batch_size, num_val=3,
                                   seed=config.data_seed), None

  monkeypatch.setitem(datasets.BUILDERS, 'few_scenes', FewScenes)
  c = get_config()
  c.dataset, c.data_dir, c.num_classes = 'few_scenes', str(tmp_path / 'tfds'), 5
  c.batch_size, c.eval_batch_size, c.crop_size = 4, 2, (16, 16)
  info, _, _, (n_train, n_val, _, eval_size) = train.make_data(c, 'imagenet')
  assert (info.name, n_train, n_val, eval_size) == ('few_scenes', 4, 3, (32, 32))
  assert (tmp_path / 'tfds' / 'few_scenes' / '32px_4_3_seed0').is_dir()


def test_make_data_reads_a_custom_folder_dataset(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  root = tmp_path / 'roofs'
  (root / 'classes.txt').parent.mkdir()
  (root / 'classes.txt').write_text('background\nroof\nsolar_panel\n')
  for split, n in (('train', 4), ('val', 3)):
    for d in ('images', 'masks'):
      (root / d / split).mkdir(parents=True)
    for i in range(n):
      Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(
          root / 'images' / split / f'{i}.jpg')
      Image.fromarray(rng.integers(0, 3, (20, 40), dtype=np.uint8)).save(
          root / 'masks' / split / f'{i}.png')
  c = get_config()
  c.dataset, c.manual_dir, c.data_dir = 'folder', str(root), str(tmp_path / 'tfds')
  c.num_classes, c.batch_size, c.eval_batch_size, c.crop_size = 3, 2, 2, (16, 16)
  info, train_ds, eval_ds, (n_train, n_val, crop, eval_size) = train.make_data(c, 'imagenet')
  assert info.class_names == ('background', 'roof', 'solar_panel')
  assert (n_train, n_val, crop, eval_size) == (4, 3, (16, 16), (32, 64))
  assert next(iter(train_ds))['image'].shape == (2, 16, 16, 3)
  batches = list(eval_ds)
  assert len(batches) == 2 and sum(int(b['mask'].sum()) for b in batches) == 3 * 20 * 40
