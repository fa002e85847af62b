"""Pictures of a run: the confusion matrix (JSON and heat map), per-class IoU bars, curves."""
import json

import numpy as np
from PIL import Image

from refinenet_jax import metrics, plots

NAMES = ('background', 'disk', 'rectangle', 'void-free')


def test_row_normalised_rows_sum_to_one_or_zero():
  cm = np.array([[8, 2, 0], [0, 0, 0], [1, 1, 2]])
  norm = plots.row_normalised(cm)
  np.testing.assert_allclose(norm.sum(1), [1, 0, 1])
  np.testing.assert_allclose(norm[2], [0.25, 0.25, 0.5])


def test_evaluation_pictures_and_counts(tmp_path):
  cm = np.array([[50, 3, 0, 1], [4, 20, 0, 0], [0, 0, 0, 0], [2, 0, 1, 9]])
  result = metrics.scores(cm)
  images = plots.write_evaluation(str(tmp_path / 'eval'), 'step7_', result, NAMES)
  saved = json.loads((tmp_path / 'eval' / 'step7_confusion.json').read_text())
  assert saved['counts'] == cm.tolist() and saved['class_names'] == list(NAMES)
  np.testing.assert_allclose(saved['row_normalised'], plots.row_normalised(cm), atol=1e-6)
  for name in ('confusion', 'iou'):
    png = np.asarray(Image.open(tmp_path / 'eval' / f'step7_{name}.png'))
    np.testing.assert_array_equal(png[..., :3], images[name])
    assert png.shape[0] > 150 and png.shape[1] > 300 and png.std() > 10  # drawn, not blank
  # another matrix draws another heat map
  other = plots.confusion_image(np.eye(4, dtype=int) * 10, NAMES)
  assert other.shape == images['confusion'].shape and (other != images['confusion']).any()


def test_many_classes_are_drawn_without_cell_values():
  n = plots.ANNOTATE_MAX_CLASSES + 5
  img = plots.confusion_image(np.random.default_rng(0).integers(0, 9, (n, n)),
                              [f'class_{i}' for i in range(n)])
  assert img.ndim == 3 and img.shape[0] > 500


def test_curves_from_the_metric_log_last_record_of_a_step_wins(tmp_path):
  assert plots.write_curves(str(tmp_path)) is None  # no log yet: nothing drawn
  records = [{'step': 4, 'train/loss': 2.0, 'train/lr': 0.1}, {'step': 8, 'eval/miou': 0.2},
             {'step': 4, 'train/loss': 1.5, 'train/lr': 0.1},  # a resumed run's record
             {'step': 8, 'train/loss': 1.0, 'train/lr': 0.05}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  assert plots.series(records, 'train/loss') == [(4, 1.5), (8, 1.0)]
  assert plots.series(records, 'eval/miou') == [(8, 0.2)]
  path = plots.write_curves(str(tmp_path))
  img = np.asarray(Image.open(path))
  assert img.shape[1] > 3 * img.shape[0] / 2 and img.std() > 10
