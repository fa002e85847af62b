"""What a run prints: its own lines, a progress bar on a terminal, libraries at WARNING.

orbax, tfds, grain and jax log through Python ``logging`` (absl's handler), several multi-kB INFO
lines per checkpoint; a run's console should hold the run's lines. ``--verbosity`` (absl's flag)
brings the libraries' INFO lines back.
"""
from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import flags, logging


class _DropTfdsWarnings(py_logging.Filter):
  """tfds warns about what the library does on purpose (custom builder configs, a variant
  folder it is about to write); its errors still show."""

  def filter(self, record):
    return record.levelno >= py_logging.ERROR or f'{os.sep}tensorflow_datasets{os.sep}' not in (
        record.pathname)


_DROP_TFDS_WARNINGS = _DropTfdsWarnings()


def quiet_libraries() -> None:
  """Library logging at WARNING (tfds' at ERROR) unless ``--verbosity``/``-v`` was given."""
  if not flags.FLAGS.is_parsed() or not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    py_logging.getLogger('absl').addFilter(_DROP_TFDS_WARNINGS)


class Progress:
  """A step bar with ETA (tqdm) when stdout is a terminal; otherwise only the written lines.

  ``write`` prints a line above the bar (or plainly), so logs and the bar never interleave.
  """

  def __init__(self, total: int, start: int = 0, enabled: bool | None = None, unit='step'):
    if enabled is None:
      enabled = sys.stdout.isatty()
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=start, unit=unit, dynamic_ncols=True, leave=False,
                       file=sys.stdout)

  def update(self, n: int = 1, **postfix) -> None:
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(n)

  def write(self, line: str) -> None:
    if self._bar is not None:
      self._bar.write(line, file=sys.stdout)
    else:
      print(line, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
