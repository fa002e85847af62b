"""What a run prints: a short console (libraries at WARNING, tfds' warnings dropped, a bar only
on a terminal) and the config in the workdir, never overwritten when it changes."""
import json
import logging

from absl import logging as absl_logging

from configs.tiny import get_config
from refinenet_jax import console, train


def test_write_config_keeps_an_earlier_different_config(tmp_path):
  c = get_config()
  path = train.write_config(c, str(tmp_path))
  assert path == str(tmp_path / 'config.json')
  assert json.loads((tmp_path / 'config.json').read_text())['model'] == c.model
  train.write_config(c, str(tmp_path))  # the same config again: nothing new
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']
  c.num_steps += 1
  train.write_config(c, str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config-1.json', 'config.json']
  assert json.loads((tmp_path / 'config-1.json').read_text())['num_steps'] == c.num_steps - 1
  assert json.loads((tmp_path / 'config.json').read_text())['num_steps'] == c.num_steps


def test_progress_without_a_terminal_prints_only_the_lines(capsys):
  with console.Progress(10, start=2, enabled=False) as p:
    for _ in range(8):
      p.update()
    p.write('step 10/10  loss 1.0')
  assert capsys.readouterr().out == 'step 10/10  loss 1.0\n'


def test_progress_on_a_terminal_draws_a_bar_and_writes_lines_above_it(capsys):
  with console.Progress(10, start=2, enabled=True) as p:
    p.update(8)
    p.write('step 10/10  loss 1.0')
  out = capsys.readouterr().out
  assert 'step 10/10  loss 1.0\n' in out and '10/10' in out.replace('step 10/10', '')


def _record(level, path):
  return logging.LogRecord('absl', level, path, 1, 'message', None, None)


def test_quiet_libraries_drops_info_and_tfds_warnings_but_not_errors():
  before = absl_logging.get_verbosity()
  absl_logger = logging.getLogger('absl')
  try:
    console.quiet_libraries()
    assert absl_logging.get_verbosity() == absl_logging.WARNING
    tfds_file = '/x/site-packages/tensorflow_datasets/core/dataset_builder.py'
    orbax_file = '/x/site-packages/orbax/checkpoint/checkpoint_manager.py'
    assert not absl_logger.filter(_record(logging.WARNING, tfds_file))
    assert absl_logger.filter(_record(logging.ERROR, tfds_file))
    assert absl_logger.filter(_record(logging.WARNING, orbax_file))
  finally:
    absl_logger.removeFilter(console._DROP_TFDS_WARNINGS)
    absl_logging.set_verbosity(before)
