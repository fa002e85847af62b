"""``--config=PATH[:ARG]`` with ``--config.key=value`` overrides, for every command-line tool.

ml_collections' ``DEFINE_config_file`` with its file loader replaced (see ``ConfigFileParser``).
"""
import importlib.machinery
import importlib.util
import os
import sys
import traceback

from absl import flags
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'configs', 'default.py')


class ConfigFileParser(flags.ArgumentParser):
  """``--config=PATH[:ARG]``: the ``get_config([ARG])`` of the Python file PATH, locked.

  Stands in for ml_collections' parser, which loads the file with
  ``SourceFileLoader.load_module()``, deprecated since Python 3.4 (a DeprecationWarning on every
  import of this module); this one executes it with ``importlib.util.spec_from_file_location`` +
  ``exec_module``. The ``--config.key=value`` overrides are applied by ml_collections' flag as
  before. A missing file is a flag error that names the file (ml_collections would defer it to
  the first attribute access).
  """

  def __init__(self, name: str, lock_config: bool = True):
    self.name = name
    self._lock_config = lock_config

  def flag_type(self):
    return 'config object'

  def parse(self, argument):
    if not isinstance(argument, str):  # an already-built config (``FLAGS.config = ...``)
      return self._lock(argument)
    path, *arg = argument.split(':', 1)  # 'configs/exfuse_ladder.py:camvid,seb'
    if not os.path.isfile(path):
      raise ValueError(f'config file {path!r} does not exist (cwd {os.getcwd()!r})')
    module = _load_module(f'{self.name}_config', path)
    try:
      config = module.get_config(*arg)
    except (TypeError, ValueError) as e:  # absl reports only the message: keep the trace
      raise ValueError(f'error in {path}: get_config({", ".join(map(repr, arg))}):\n\n'
                       f'{traceback.format_exc()}') from e
    if config is None:
      raise ValueError(f'{path}: get_config() returned None (a missing return statement?)')
    return self._lock(config)

  def _lock(self, config):
    if self._lock_config and callable(getattr(config, 'lock', None)):
      config.lock()
    return config


def _load_module(name: str, path: str):
  """The module ``name`` executed from ``path`` (any suffix), registered in ``sys.modules``
  (as ``load_module`` did: dataclasses and pickling look their module up there)."""
  spec = importlib.util.spec_from_file_location(
      name, path, loader=importlib.machinery.SourceFileLoader(name, path))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    sys.modules.pop(name, None)
    raise
  if not callable(getattr(module, 'get_config', None)):
    raise ValueError(f'config file {path!r} defines no get_config()')
  return module


def define(name: str = 'config', help_string: str = 'experiment config file',
           default: str | None = DEFAULT_CONFIG) -> flags.FlagHolder:
  """A locked config flag; ``default`` (a config file) is used when the flag is not given."""
  # Defined without a default, so ml_collections' own loader never runs; the parser is swapped
  # for ConfigFileParser before the default is set (parsing it, unless the flag is given).
  holder = config_flags.DEFINE_config_file(
      name, None, f'{help_string}: PATH or PATH:ARG for get_config(ARG)', lock_config=True)
  flags.FLAGS[holder.name].parser = ConfigFileParser(holder.name, lock_config=True)
  if default and os.path.isfile(default):
    flags.FLAGS.set_default(holder.name, default)
  return holder
