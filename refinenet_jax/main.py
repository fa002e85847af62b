"""Command-line entry point; all logic lives in train.py so tests and notebooks can import it.

  python -m refinenet_jax.main --workdir=runs/default [--config=configs/default.py]
      [--mode=train|eval|predict] [--config.num_steps=100 ...]
  python -m refinenet_jax.main --mode=predict --workdir=runs/default --input_dir=imgs --output_dir=out
      [--overwrite]
  python -m refinenet_jax.main --mode=predict --artifact=exported --input_dir=imgs --output_dir=out

Multi-host: run the same command on every host; ``jax.distributed.initialize()`` picks up the
cluster from the environment (TPU pods, SLURM) or from --coordinator/--num_processes/--process_id.
"""
import functools
import os
import sys

import jax
import tensorflow_datasets as tfds
from absl import app, flags

from refinenet_jax import config_flag, console, hardware, train

_CONFIG = config_flag.define('config', 'experiment config file')
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for checkpoints, metrics and logs')
_ARTIFACT = flags.DEFINE_string('artifact', None,
                                'predict: an exported model (python -m refinenet_jax.export) '
                                'instead of --workdir and --config')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'], 'what to run')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                                'eval/predict: which checkpoint of the workdir')
_INPUT = flags.DEFINE_string('input_dir', None, 'predict: folder of images')
_OUTPUT = flags.DEFINE_string('output_dir', None, 'predict: where masks and overlays go')
_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               'predict: replace existing output files (refused otherwise)')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize()')
_COORDINATOR = flags.DEFINE_string('coordinator', None, 'host:port of process 0')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'index of this process')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.quiet_libraries()
  # before anything starts a JAX backend
  if hardware.set_cpu_xla_flags(inference_only=_MODE.value != 'train'):
    print(f'XLA_FLAGS={os.environ["XLA_FLAGS"]} (XLA:CPU convolutions on Eigen: faster with '
          'this jax on this CPU, BENCHMARKS.md section 7; your own ynn_fusion_type wins)')
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  if _ARTIFACT.value:
    if _MODE.value != 'predict' or _WORKDIR.value:
      raise app.UsageError('--artifact goes with --mode=predict, without --workdir')
    _predict(train.predict_exported, _ARTIFACT.value)
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required (or --artifact with --mode=predict)')
  tfds.disable_progress_bar()  # a bar per split and shard would bury the training log
  config = _CONFIG.value
  if config is None:
    raise app.UsageError(f'--config is required ({config_flag.DEFAULT_CONFIG} does not exist)')
  if _MODE.value == 'train':
    train.train_and_evaluate(config, _WORKDIR.value)
  elif _MODE.value == 'eval':
    train.evaluate(config, _WORKDIR.value, _CHECKPOINT.value)
  else:
    _predict(functools.partial(train.predict, config), _WORKDIR.value,
             checkpoint=_CHECKPOINT.value)


def _predict(predict_fn, source: str, **kwargs):
  if not _INPUT.value or not _OUTPUT.value:
    raise app.UsageError('--mode=predict needs --input_dir and --output_dir')
  try:
    predict_fn(source, _INPUT.value, _OUTPUT.value, overwrite=_OVERWRITE.value, **kwargs)
  except (train.PredictError, FileExistsError, FileNotFoundError, ValueError) as e:  # exit 1
    sys.exit(f'predict: {e}')


if __name__ == '__main__':
  app.run(main)
