"""Every config file resolves: known keys only, a registered model and dataset with the right
class count, an optimizer, and a model that initialises (``jax.eval_shape``, no compute)."""
from __future__ import annotations

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from configs.default import get_config as default_config
from refinenet_jax import config_rules, list_models, optim, train
from refinenet_jax.data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not os.path.basename(p).startswith('_') and
                 os.path.basename(p) != 'recipes.py')


def test_config_files_are_found():
  assert len(CONFIGS) >= 10 and 'default' in CONFIGS and 'tiny' in CONFIGS


@pytest.mark.parametrize('name', CONFIGS)
def test_config_resolves(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert set(config.keys()) == set(default_config().keys()), 'keys must all come from default'
  config.lock()
  assert config_rules.errors(config) == []
  assert config.model in list_models()
  assert config.dataset in datasets.BUILDERS
  if config.dataset not in ('folder',):
    builder = datasets.BUILDERS[config.dataset]
    assert len(builder.CLASS_NAMES) == config.num_classes
    splits = getattr(builder, 'CONFIG_SPLITS', {}).get(config.dataset_config, builder.SPLITS)
    assert config.train_split in splits and config.eval_split in splits, splits
  optim.make_optimizer(config)
  optim.learning_rate_fn(config)
  model = train.build_model(config)
  crop = tuple(config.crop_size) or (config.image_size,) * 2
  x = jnp.zeros((1, *crop, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  logits = jax.eval_shape(lambda v: model.apply(v, x), shapes)
  assert logits.shape[-1] == config.num_classes


@pytest.mark.parametrize('key,value', [
    ('batch_size', 0), ('batch_size', -4), ('eval_batch_size', 0), ('num_steps', 0),
    ('crop_size', (0, 64)), ('crop_size', (-32, 32)), ('crop_size', (64,)), ('eval_size', (0, 0)),
    ('scale_range', (0.0, 1.0)), ('scale_range', (2.0, 0.5)), ('scale_range', (1.0,)),
    ('learning_rate', -0.1), ('learning_rate', float('nan')), ('momentum', 1.5),
    ('grad_accum_steps', 0), ('num_classes', 0), ('eval_scales', ()), ('eval_scales', (1.0, -1)),
    ('num_devices', 0), ('optimizer', 'adam'), ('loss_mode', 'full'), ('keep_checkpoints', 0),
    ('compute_dtype', 'int8'), ('class_weights', (1.0, 2.0)), ('eval_stride', (8, 8)),
    ('checkpoint_every', -1)])
def test_impossible_value_is_refused_before_the_dataset_is_built(key, value, tmp_path,
                                                                  monkeypatch):
  def no_build(*args, **kwargs):
    raise AssertionError('the dataset was built before the config was checked')

  monkeypatch.setattr(datasets, 'prepare', no_build)
  config = default_config()
  config[key] = value
  with pytest.raises(config_rules.ConfigValueError, match=f'{key}='):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
