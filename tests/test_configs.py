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
from refinenet_jax import list_models, optim, train
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
