"""Every config file resolves (and configs/exfuse_ladder.py for every dataset,rung argument):
known keys only, a registered model and dataset with the right class count, an optimizer, and a
model that initialises (``jax.eval_shape``, no compute)."""
from __future__ import annotations

import glob
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from configs import exfuse_ladder
from configs.default import get_config as default_config
from refinenet_jax import config_rules, list_models, optim, train
from refinenet_jax.data import datasets
from refinenet_jax.models import aux_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not os.path.basename(p).startswith('_') and
                 os.path.basename(p) != 'recipes.py')
# config files whose get_config takes an argument (``--config=PATH:ARG``): every argument
CONFIG_ARGS = {'exfuse_ladder': [f'{d},{r}' for d in exfuse_ladder.DATASETS
                                 for r in exfuse_ladder.RUNGS]}
CASES = [(name, arg) for name in CONFIGS for arg in CONFIG_ARGS.get(name, [None])]


def test_config_files_are_found():
  assert len(CONFIGS) >= 10 and 'default' in CONFIGS and 'tiny' in CONFIGS


def test_ladder_arguments_are_all_resolved():
  assert len(CONFIG_ARGS['exfuse_ladder']) == 12
  assert ('exfuse_ladder', 'camvid,seb') in CASES and ('exfuse_ladder', None) not in CASES


@pytest.mark.parametrize('name,arg', CASES)
def test_config_resolves(name, arg):
  get_config = importlib.import_module(f'configs.{name}').get_config
  config = get_config() if arg is None else get_config(arg)
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
  logits, _ = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x))  # one trace
  assert logits.shape[-1] == config.num_classes
  if name == 'exfuse_ladder':  # every rung trains with its aux losses and predicts at full size
    assert len(config.aux_weights) == len(aux_names(model))
    assert logits.shape == (1, *config.crop_size, config.num_classes)


@pytest.mark.parametrize('key,value', [
    ('batch_size', 0), ('batch_size', -4), ('eval_batch_size', 0), ('num_steps', 0),
    ('crop_size', (0, 64)), ('crop_size', (-32, 32)), ('crop_size', (64,)), ('eval_size', (0, 0)),
    ('scale_range', (0.0, 1.0)), ('scale_range', (2.0, 0.5)), ('scale_range', (1.0,)),
    ('learning_rate', -0.1), ('learning_rate', float('nan')), ('momentum', 1.5), ('ema_decay', 1.0),
    ('grad_accum_steps', 0), ('num_classes', 0), ('eval_scales', ()), ('eval_scales', (1.0, -1)),
    ('mesh', (('data', 0),)), ('mesh', (('model', 2),)), ('sharding_rules', 'zero3'),
    ('optimizer', 'adam'), ('loss', 'tversky'), ('loss', 'cross_entropy+x*dice'),
    ('loss', 'dice+dice'), ('loss_mode', 'full'), ('keep_checkpoints', 0),
    ('compute_dtype', 'int8'), ('class_weights', (1.0, 2.0)), ('eval_stride', (8, 8)),
    ('checkpoint_every', -1), ('focal_gamma', -1.0), ('ohem_thresh', 1.5),
    ('ohem_min_kept', -1)])
def test_impossible_value_is_refused_before_the_dataset_is_built(key, value, tmp_path,
                                                                  monkeypatch):
  def no_build(*args, **kwargs):
    raise AssertionError('the dataset was built before the config was checked')

  monkeypatch.setattr(datasets, 'prepare', no_build)
  config = default_config()
  config[key] = value
  with pytest.raises(config_rules.ConfigValueError, match=f'{key}='):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.fixture
def parse_main_flags(monkeypatch):
  """Parses a command line with refinenet_jax.main's flag definitions (absl's global FLAGS),
  which it restores afterwards: unparsed, without the ``--config.KEY`` flags a parse defines."""
  from refinenet_jax import main  # noqa: PLC0415  (defines the flags)

  def parse(*args):
    argv = ['main', '--workdir=unused', f'--config={os.path.join(ROOT, "configs", "tiny.py")}',
            *args]
    monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads the overrides from sys.argv
    flags.FLAGS(argv)
    return main._CONFIG.value

  yield parse
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)


def test_main_config_flag_is_locked(parse_main_flags):
  config = parse_main_flags('--config.num_steps=3')
  assert config.num_steps == 3 and config.is_locked
  with pytest.raises(AttributeError, match='new_key'):
    config.new_key = 1  # a misspelt key in code fails instead of being silently added


def test_main_config_flag_refuses_an_unknown_key(parse_main_flags):
  with pytest.raises(AttributeError, match='nonexistent'):
    parse_main_flags('--config.nonexistent=1')
