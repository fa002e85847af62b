"""The library raises no DeprecationWarning/FutureWarning of its own: importing every module and
parsing the command line (config file, ``path:arg`` form, ``--config.key=value`` overrides) run
under ``-W error``. (Inside the suite, pytest.ini turns those raised from the library's modules
into errors too.)"""
import os
import subprocess
import sys

import pytest

from refinenet_jax import config_flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import importlib, pkgutil, sys
from absl import flags
import refinenet_jax.main
flags.FLAGS(sys.argv)
c = flags.FLAGS.config
print('config', c.model, c.dataset, c.num_steps, c.model_overrides.seb, c.is_locked)
import configs, refinenet_jax
for pkg in (refinenet_jax, configs):
  for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):
    if not m.name.endswith('__main__'):
      importlib.import_module(m.name)
print('imported', len(sys.modules))
"""


def test_main_and_every_module_import_without_deprecation_warnings():
  proc = subprocess.run(
      [sys.executable, '-W', 'error::DeprecationWarning', '-W', 'error::FutureWarning',
       '-c', _SCRIPT, '--workdir=unused', '--config=configs/exfuse_ladder.py:camvid,seb',
       '--config.num_steps=7'],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert 'config gcn_resnext101 camvid 7 True True' in proc.stdout


def test_config_file_parser(tmp_path):
  parse = config_flag.ConfigFileParser('config').parse
  c = parse(os.path.join(ROOT, 'configs', 'tiny.py'))
  assert c.model_overrides.base_width == 8 and c.is_locked
  c = parse(os.path.join(ROOT, 'configs', 'exfuse_ladder.py') + ':voc,lr')
  assert (c.dataset, c.model_overrides.stage_sizes) == ('voc2012', (8, 8, 9, 8))
  assert not config_flag.ConfigFileParser('config', lock_config=False).parse(
      os.path.join(ROOT, 'configs', 'tiny.py')).is_locked
  with pytest.raises(ValueError, match='nope.py.*does not exist'):
    parse(str(tmp_path / 'nope.py'))
  (tmp_path / 'empty.py').write_text('x = 1\n')
  with pytest.raises(ValueError, match='empty.py.*defines no get_config'):
    parse(str(tmp_path / 'empty.py'))
  (tmp_path / 'bad.py').write_text('def get_config(arg):\n  raise ValueError(f"no {arg}")\n')
  with pytest.raises(ValueError, match=r"bad.py: get_config\('x'\)(.|\n)*no x"):
    parse(str(tmp_path / 'bad.py') + ':x')
