"""Command-line entry point; all logic lives in train.py so tests and notebooks can import it.

  python -m refinenet_jax.main --workdir=runs/default [--config=configs/default.py]
      [--config.num_steps=100 ...]
"""
import os

from absl import app, flags
import tensorflow_datasets as tfds
from ml_collections import config_flags

from refinenet_jax import train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'configs', 'default.py')
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'experiment config file',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for metrics and outputs',
                               required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  tfds.disable_progress_bar()  # a bar per split and shard would bury the training log
  print(_CONFIG.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
