"""The built-in dataset builder, the dataset table and the grain pipeline (train and eval)."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from refinenet_jax import metrics
from refinenet_jax.data import datasets, pipeline, synthetic, transforms
from refinenet_jax.data.builders.synthetic_scenes import SyntheticScenesConfig

tfds.disable_progress_bar()

TINY = SyntheticScenesConfig(image_size=32, num_train=24, num_val=10, seed=5)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """Built with every outgoing connection refused: building must never touch the network."""
  real_connect = socket.socket.connect

  def refuse(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
      raise AssertionError(f'network access attempted: {address}')
    return real_connect(sock, address)

  socket.socket.connect = refuse
  try:
    return datasets.prepare('synthetic_scenes', str(tmp_path_factory.mktemp('tfds')), config=TINY)
  finally:
    socket.socket.connect = real_connect


def test_synthetic_builder_stores_exactly_the_generated_scenes(tiny):
  train = datasets.data_source(tiny, 'train')
  val = datasets.data_source(tiny, 'val')
  assert (len(train), len(val)) == (24, 10)
  x, y = synthetic.make_synthetic_scenes(24, (32, 32), seed=5)
  vx, vy = synthetic.make_synthetic_scenes(10, (32, 32), seed=6)
  for i in (0, 7, 23):
    np.testing.assert_array_equal(train[i]['image'], x[i])
    np.testing.assert_array_equal(train[i]['label'][..., 0], y[i])
  np.testing.assert_array_equal(val[9]['image'], vx[9])
  np.testing.assert_array_equal(val[9]['label'][..., 0], vy[9])
  info = datasets.info(tiny)
  assert info.class_names == synthetic.CLASS_NAMES and info.num_classes == 5
  assert info.ignore_label == 255 and info.splits == ('train', 'val')
  # the metadata is stored with the data, not only in the class
  meta = tiny.info.metadata
  assert meta['class_names'] == list(synthetic.CLASS_NAMES) and meta['ignore_label'] == 255


def test_dataset_table_names_every_dataset_and_refuses_unknown_ones(tmp_path):
  assert set(datasets.list_datasets()) == {
      'synthetic_scenes', 'camvid', 'voc2012', 'cityscapes', 'ade20k', 'nyudv2_40', 'sun_rgbd',
      'pascal_context', 'person_part', 'folder'}
  counts = {'camvid': 11, 'voc2012': 21, 'cityscapes': 19, 'ade20k': 150, 'nyudv2_40': 40,
            'sun_rgbd': 37, 'pascal_context': 60, 'person_part': 7}
  for name, n in counts.items():
    cls = datasets.BUILDERS[name]
    assert len(cls.CLASS_NAMES) == n, name
    assert len(set(cls.CLASS_NAMES)) == n, name
    assert cls.MANUAL_DOWNLOAD_INSTRUCTIONS and 'manual_dir' in cls.MANUAL_DOWNLOAD_INSTRUCTIONS
  with pytest.raises(KeyError, match='camvid'):
    datasets.get_builder('camvidd', str(tmp_path))
  # a real dataset that was never built needs its archives: say where to put them
  with pytest.raises(ValueError, match='SegNet'):
    datasets.prepare('camvid', str(tmp_path))


def test_fill_value_is_the_models_mean_pixel():
  assert transforms.fill_value('imagenet') == (124, 116, 104)
  assert transforms.fill_value('minus128') == (128, 128, 128)
  assert transforms.fill_value('caffe_bgr') == (123, 117, 104)  # BGR mean, given back as RGB


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() == {'image', 'label', 'mask'}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_batches_shapes_and_determinism(tiny):
  src = datasets.data_source(tiny, 'train')
  kw = dict(global_batch_size=8, crop_size=(24, 28), scale_range=(0.6, 1.6))
  a = _take(iter(pipeline.train_dataset(src, seed=1, num_threads=2, **kw)), 4)
  b = _take(iter(pipeline.train_dataset(src, seed=1, num_threads=1, **kw)), 4)
  c = _take(iter(pipeline.train_dataset(src, seed=2, num_threads=2, **kw)), 4)
  _assert_same(a, b)  # same seed -> same batches, whatever the thread count
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  batch = a[0]
  assert batch['image'].shape == (8, 24, 28, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (8, 24, 28) and batch['label'].dtype == np.uint8
  assert batch['mask'].shape == (8, 24, 28) and batch['mask'].dtype == bool
  for x in a:
    assert set(np.unique(x['label'])) <= {0, 1, 2, 3, 4, 255}
    # padding (scale < 1 makes 32 px smaller than the crop) is exactly the ignored, unmasked part
    np.testing.assert_array_equal(x['mask'], x['label'] != 255)
  assert any((~x['mask']).any() for x in a), 'scales down to 0.6 must pad some crops'


def test_resuming_from_iterator_state_gives_the_uninterrupted_batches(tiny):
  src = datasets.data_source(tiny, 'train')
  make = lambda: iter(pipeline.train_dataset(src, global_batch_size=8, crop_size=(32, 32),
                                             seed=3, scale_range=(0.8, 1.25)))
  reference = _take(make(), 7)  # 3 batches per epoch: crosses two epoch boundaries
  it = make()
  _take(it, 2)
  state = it.get_state()
  resumed = make()
  resumed.set_state(state)
  _assert_same(_take(resumed, 5), reference[2:])


def _identity_pipeline(src, **kw):
  """No scaling, no flip, full-size crop: every batch image is a stored image."""
  return pipeline.train_dataset(src, global_batch_size=4, crop_size=(32, 32), seed=0,
                                scale_range=(1.0, 1.0), flip=False, **kw)


def _index_of(src):
  return {src[i]['image'].tobytes(): i for i in range(len(src))}


def test_each_epoch_is_a_new_permutation_and_processes_split_the_data(tiny):
  src = datasets.data_source(tiny, 'train')
  index = _index_of(src)
  order = [index[im.tobytes()] for b in _take(iter(_identity_pipeline(src)), 12)
           for im in b['image']]
  assert sorted(order[:24]) == list(range(24)) and sorted(order[24:]) == list(range(24))
  assert order[:24] != order[24:]
  seen = []
  for p in range(2):
    ds = _identity_pipeline(src, process_index=p, process_count=2)
    got = {index[im.tobytes()] for b in _take(iter(ds), 6) for im in b['image']}
    assert got == set(range(p, 24, 2))  # batch 4 = 2 per process; 12 examples per process
    seen.append(got)
  with pytest.raises(ValueError, match='divisible'):
    pipeline.train_dataset(src, global_batch_size=5, crop_size=(8, 8), seed=0, process_count=2)


def test_train_augment_keeps_image_and_label_aligned():
  h, w = 40, 50
  image = np.zeros((h, w, 3), np.uint8)
  image[..., 0] = np.arange(w)[None, :] * 5  # red encodes the column
  label = (np.arange(w)[None, :] // 10).repeat(h, 0).astype(np.uint8)  # label = column // 10
  example = {'image': image, 'label': label[..., None]}
  aug = transforms.TrainAugment(crop_size=(30, 30), scale_range=(1.0, 1.0), fill=(1, 2, 3))
  flips = 0
  for seed in range(20):
    out = aug(example, np.random.default_rng(seed))
    np.testing.assert_array_equal(out['image'][..., 0] // 50, out['label'])
    flips += out['image'][0, 0, 0] > out['image'][0, -1, 0]
  assert 0 < flips < 20
  small = transforms.TrainAugment(crop_size=(64, 64), scale_range=(0.5, 0.5), fill=(1, 2, 3))
  out = small(example, np.random.default_rng(0))
  assert out['mask'].sum() == 20 * 25
  np.testing.assert_array_equal(out['image'][~out['mask']], np.tile([1, 2, 3], (64 * 64 - 500, 1)))
  with pytest.raises(ValueError, match='scale_range'):
    transforms.TrainAugment(crop_size=(8, 8), scale_range=(1.5, 1.0))


def test_eval_counts_every_pixel_exactly_once_over_processes(tiny):
  src = datasets.data_source(tiny, 'val')  # 10 images
  want = np.zeros((5, 5), np.int64)
  for i in range(len(src)):
    lab = src[i]['label'][..., 0]
    np.add.at(want, (lab.ravel(), lab.ravel()), 1)
  got = np.zeros((5, 5), np.int64)
  names = []
  process_count, batch = 2, 4  # 5 per process -> 3 local batches of 2, one padding example each
  assert pipeline.eval_num_batches(len(src), batch, process_count) == 3
  index = _index_of(src)
  for p in range(process_count):
    batches = list(pipeline.eval_dataset(src, global_batch_size=batch, eval_size=(64, 64),
                                         process_index=p, process_count=process_count))
    assert len(batches) == 3
    for b in batches:
      assert b['image'].shape == (2, 64, 64, 3)
      # a perfect prediction: the confusion matrix then counts the labelled pixels
      got += np.asarray(metrics.confusion_matrix(b['label'], b['label'], 5, b['mask']))
      for im, m in zip(b['image'], b['mask']):
        if m.any():
          assert m.sum() == 32 * 32
          names.append(index[np.ascontiguousarray(im[:32, :32]).tobytes()])
  np.testing.assert_array_equal(got, want)
  assert sorted(names) == list(range(10))


def test_eval_refuses_an_image_larger_than_the_bucket(tiny):
  src = datasets.data_source(tiny, 'val')
  sizes = datasets.image_sizes(tiny, 'val')  # from the label headers, as the trainer reads them
  assert pipeline.bucket_for([(h, w) for _, h, w in sizes]) == (32, 32)
  with pytest.raises(ValueError, match='000000.*larger than the eval bucket'):
    next(iter(pipeline.eval_dataset(src, global_batch_size=2, eval_size=(16, 64))))


def test_colour_rule_scores_poorly_on_synthetic_scenes():
  x, y = synthetic.make_synthetic_scenes(150, (48, 48), seed=0)
  vx, vy = synthetic.make_synthetic_scenes(50, (48, 48), seed=1)
  pred = synthetic.colour_rule_predict(x, y, vx, levels=8)
  s = metrics.scores(metrics.confusion_matrix(pred, vy, 5))
  # background is most pixels, so the rule gets it; the object classes it cannot tell apart
  assert s['miou'] < 0.35, s
  assert np.nanmax(s['per_class_iou'][1:]) < 0.3, s
