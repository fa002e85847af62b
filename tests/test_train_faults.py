"""Faults around evaluation and prediction: the final step survives a failing final evaluation,
the best checkpoint is the best-scored one, eval settings are checked before training, and
predict processes every image, reports the bad ones and never overwrites by accident."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs.tiny import get_config
from refinenet_jax import checkpoint, metrics, steps, train, writers
from refinenet_jax.data.synthetic import make_synthetic_scenes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORES = {4: 0.9, 8: 0.2}  # val mIoU the scripted evaluation reports per eval step
RESUMED_SCORE = 0.5  # the re-evaluation of the final step after the resume


def _config(data_dir):
  c = get_config()
  c.data_dir, c.tensorboard = str(data_dir), False
  c.eval_every, c.checkpoint_every, c.keep_checkpoints = 4, 4, 1
  return c


def _steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _counting_train_step(mp, calls):
  make = train.make_train_step

  def counting(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def fn(state, batch):
      calls.append(1)
      return step_fn(state, batch)
    return fn
  mp.setattr(train, 'make_train_step', counting)


def _scripted_evaluation(mp, scores, calls):
  """run_evaluation reporting ``scores[i]`` on call i (the last one from then on); an Exception
  entry is raised instead."""

  def fake(state, eval_fn, eval_ds, mesh, num_classes):
    score = scores[min(len(calls), len(scores) - 1)]
    calls.append(score)
    if isinstance(score, Exception):
      raise score
    return {**metrics.scores(np.eye(num_classes, dtype=np.int64)), 'miou': score}
  mp.setattr(train, 'run_evaluation', fake)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  """One tiny run (eval every 4 of 12 steps, keep 1) whose final evaluation raises, then its
  resume; what each phase did is returned for the tests, the workdir is shared."""
  workdir = str(tmp_path_factory.mktemp('run'))
  c = _config(data_dir)
  out = {'workdir': workdir, 'config': c}
  with pytest.MonkeyPatch.context() as mp:
    train_calls, eval_calls = [], []
    _counting_train_step(mp, train_calls)
    _scripted_evaluation(mp, [SCORES[4], SCORES[8], RuntimeError('final eval failed')],
                         eval_calls)
    with pytest.raises(RuntimeError, match='final eval failed') as err:
      train.train_and_evaluate(c, workdir)
    out.update(crash_error=err.value, crash_steps=_steps(workdir),
               crash_train_calls=len(train_calls))
  with pytest.MonkeyPatch.context() as mp:
    train_calls, eval_calls = [], []
    _counting_train_step(mp, train_calls)
    _scripted_evaluation(mp, [RESUMED_SCORE], eval_calls)
    out.update(resumed=train.train_and_evaluate(c, workdir), resume_train_calls=len(train_calls),
               resume_eval_calls=len(eval_calls), final_steps=_steps(workdir))
  return out


@pytest.mark.slow
def test_final_step_is_saved_before_the_final_evaluation(trained):
  assert trained['crash_train_calls'] == 12
  assert trained['crash_steps'][-1] == 12  # on disk although its evaluation raised
  # the resume trains nothing: it only evaluates the saved final step
  assert trained['resume_train_calls'] == 0 and trained['resume_eval_calls'] == 1
  assert trained['resumed']['step'] == 12
  assert trained['resumed']['val']['miou'] == RESUMED_SCORE


@pytest.mark.slow
def test_best_step_is_the_best_scored_and_kept(trained):
  workdir, c = trained['workdir'], trained['config']
  scores = checkpoint.read_scores(os.path.join(workdir, 'checkpoints'))
  assert scores == {**SCORES, 12: RESUMED_SCORE}
  # keep_checkpoints=1: the latest, plus step 4, the best scored; 8 is gone
  assert trained['final_steps'] == [4, 12]
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'), keep=1)
  assert (ckpts.best_step(), ckpts.latest_step()) == (4, 12)
  ckpts.close()
  run = train.setup(c, workdir, splits=())
  best, step = train._restore_for_inference(c, run, 'best')
  latest, _ = train._restore_for_inference(c, run, 'latest')
  run.ckpts.close()
  assert step == 4 and int(best.step) == 4
  # a new run initialised from this workdir starts from the best step too
  _, variables = checkpoint.read_variables(
      workdir, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  for got, want in zip(leaves(variables['params']), leaves(best.params)):
    np.testing.assert_array_equal(got, want)
  assert any(not np.array_equal(a, b)
             for a, b in zip(leaves(variables['params']), leaves(latest.params)))


def test_eval_image_larger_than_eval_size_stops_before_training(tmp_path, data_dir, monkeypatch):
  c = _config(data_dir)
  c.eval_size = (16, 16)  # the 10 synthetic val images are 32x32

  def no_training(*args, **kwargs):
    raise AssertionError('a train step was built before the eval settings were checked')
  monkeypatch.setattr(train, 'make_train_step', no_training)
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(c, str(tmp_path / 'w'))
  msg = str(err.value)
  assert "10 of 10 eval images" in msg and "#0 '000000' 32x32" in msg and '5 more' in msg
  assert "--config.eval_size='(32,32)'" in msg and 'eval_window' in msg
  assert _steps(tmp_path / 'w') == []


@pytest.mark.slow
def test_default_bucket_over_the_memory_bound_uses_the_sliding_window(trained, monkeypatch,
                                                                    capsys):
  c = trained['config'].copy_and_resolve_references()
  c.crop_size = (16, 16)  # the 32x32 val images are evaluated in 16x16 windows
  monkeypatch.setattr(train, 'EVAL_PIXELS_PER_DEVICE', 32 * 32 - 1)
  windows = []
  eval_step = steps.eval_step

  def recording(*args, **kwargs):
    windows.append(kwargs.get('window'))
    return eval_step(*args, **kwargs)
  monkeypatch.setattr(steps, 'eval_step', recording)
  result = train.evaluate(c, trained['workdir'], checkpoint='latest')
  assert 0.0 <= result['miou'] <= 1.0
  assert windows and set(windows) == {(16, 16)}
  lines = [l for l in capsys.readouterr().out.splitlines() if 'windows' in l]
  assert len(lines) == 1 and '16x16' in lines[0] and 'eval_window' in lines[0]


def _image_folder(path, n=3):
  path.mkdir()
  x, _ = make_synthetic_scenes(n, (24, 40), seed=5)
  for i, im in enumerate(x):
    Image.fromarray(im).save(path / f'img{i}.png')
  return path


@pytest.mark.slow
def test_predict_reports_bad_images_and_never_overwrites(trained, tmp_path, monkeypatch,
                                                         capsys):
  c, workdir = trained['config'], trained['workdir']
  images = _image_folder(tmp_path / 'images')
  (images / 'img1.png').write_bytes(b'not a png at all')  # between two good images
  (images / 'x.png').mkdir()  # a folder named like an image: skipped
  out = tmp_path / 'pred'
  with pytest.raises(train.PredictError) as err:
    train.predict(c, workdir, str(images), str(out))
  bad = str(images / 'img1.png')
  assert [p for p, _ in err.value.failures] == [bad] and bad in str(err.value)
  assert sorted(os.listdir(out)) == ['img0_mask.png', 'img0_overlay.png', 'img2_mask.png',
                                     'img2_overlay.png']
  assert sorted(err.value.written) == sorted(str(out / f) for f in os.listdir(out))
  printed = capsys.readouterr().out
  assert f'FAILED {bad}' in printed and 'x.png: not a file' in printed
  # existing outputs are refused before any model work, and left as they are
  (out / 'img0_mask.png').write_bytes(b'keep me')
  (images / 'img1.png').unlink()
  with monkeypatch.context() as mp:
    mp.setattr(train, 'setup', lambda *a, **k: pytest.fail('model work before the check'))
    with pytest.raises(FileExistsError, match='img0_mask.png.*--overwrite'):
      train.predict(c, workdir, str(images), str(out))
  assert (out / 'img0_mask.png').read_bytes() == b'keep me'
  written = train.predict(c, workdir, str(images), str(out), overwrite=True)
  assert len(written) == 4
  assert np.asarray(Image.open(out / 'img0_mask.png')).shape == (24, 40, 3)
  # a 16-bit grey image is read by its range (32768 -> 128), not clipped to white
  Image.fromarray(np.full((24, 40), 32768, np.uint16)).save(images / 'deep.png')
  train.predict(c, workdir, str(images), str(out), overwrite=True)
  mask = np.asarray(Image.open(out / 'deep_mask.png'))
  np.testing.assert_array_equal(np.asarray(Image.open(out / 'deep_overlay.png')),
                                writers.overlay(np.full((24, 40, 3), 128, np.uint8), mask))


def test_predict_cli_refuses_existing_outputs_with_a_message(tmp_path):
  images = _image_folder(tmp_path / 'images', n=1)
  out = tmp_path / 'pred'
  out.mkdir()
  (out / 'img0_overlay.png').write_bytes(b'keep me')
  p = subprocess.run(
      [sys.executable, '-m', 'refinenet_jax.main', f'--workdir={tmp_path / "w"}',
       f'--config={os.path.join(ROOT, "configs", "tiny.py")}', '--mode=predict',
       f'--input_dir={images}', f'--output_dir={out}'],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
      timeout=600)
  assert p.returncode == 1
  assert 'predict: 1 output file(s) exist' in p.stderr and '--overwrite' in p.stderr
  assert 'Traceback' not in p.stderr
  assert (out / 'img0_overlay.png').read_bytes() == b'keep me'
