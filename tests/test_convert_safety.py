"""A ``.pth`` file is data: no pickle in it may run code, in either torch format, through the
reader, ``import_state_dict`` or the conversion CLI; truncated files and existing outputs fail
clearly before anything is written."""
import os
import pickle
import pickletools
import re
import zipfile

import pytest

import refinenet_jax as rj
from refinenet_jax.convert import (CheckpointFormatError, import_state_dict,
                                   load_torch_checkpoint, save_converted)
from tests.test_convert import FIX, convert_main

# The pickles of a legacy (pre-1.6) file, in order; tensor bytes follow the last one.
LEGACY_PICKLES = ('magic', 'protocol', 'sys_info', 'object', 'storage_keys')
WHERE = [f'legacy_{p}' for p in LEGACY_PICKLES] + ['zip_data_pkl']


class _CreatesMarker:
  """Unpickling this calls ``open(marker, 'w')``: if the marker exists, the file ran code."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return open, (self.marker, 'w')


def _legacy_pickles(data):
  """Splits a legacy file into its pickles (parsed, never executed) and the trailing bytes."""
  parts, start = [], 0
  for _ in LEGACY_PICKLES:
    end = start + max(pos for _, _, pos in pickletools.genops(data[start:])) + 1  # past STOP
    parts.append(data[start:end])
    start = end
  assert b''.join(parts) + data[start:] == data
  return parts, data[start:]


def _malicious_file(tmp_path, where, nesting):
  """A copy of a real torch file with the payload in one of its pickles."""
  marker = tmp_path / 'marker'
  payload = {'top': lambda p: p, 'dict': lambda p: {'x': p}, 'list': lambda p: [1, p]}[nesting]
  evil = pickle.dumps(payload(_CreatesMarker(str(marker))), protocol=2)
  path = tmp_path / f'{where}_{nesting}.pth'
  if where == 'zip_data_pkl':
    with zipfile.ZipFile(os.path.join(FIX, 'torch_io_zip.pth')) as src, \
        zipfile.ZipFile(path, 'w') as dst:
      for info in src.infolist():
        dst.writestr(info, evil if info.filename.endswith('data.pkl') else src.read(info))
  else:
    with open(os.path.join(FIX, 'torch_io_legacy.pth'), 'rb') as f:
      parts, rest = _legacy_pickles(f.read())
    parts[LEGACY_PICKLES.index(where[len('legacy_'):])] = evil
    path.write_bytes(b''.join(parts) + rest)
  return path, marker


def _load(entry, path, tmp_path):
  if entry == 'reader':
    return load_torch_checkpoint(path)
  if entry == 'import_state_dict':
    return import_state_dict(rj.create_model('refinenet_tiny', 3), str(path))
  return convert_main(['--model=refinenet_tiny', '--num_classes=3', '--layout=drsleep',
                       f'--checkpoint={path}', f'--output={tmp_path / "out"}'])


@pytest.mark.parametrize('entry', ['reader', 'import_state_dict', 'cli'])
@pytest.mark.parametrize('nesting', ['top', 'dict', 'list'])
@pytest.mark.parametrize('where', WHERE)
def test_no_pickle_in_a_checkpoint_runs_code(tmp_path, where, nesting, entry):
  path, marker = _malicious_file(tmp_path, where, nesting)
  with pytest.raises(CheckpointFormatError) as e:
    _load(entry, path, tmp_path)
  msg = str(e.value)
  # pickle names open by its module: io.open up to Python 3.11, _io.open from 3.12
  assert str(path) in msg and f'refusing to load global {open.__module__}.open' in msg, msg
  assert 'weights are data, not code' in msg, msg
  assert not marker.exists()
  assert not (tmp_path / 'out').exists()


def test_library_unpickles_only_through_the_restricted_unpickler():
  """A new ``pickle.load`` anywhere in the package would bypass the allow-list."""
  root = os.path.dirname(rj.__file__)
  hits = []
  for d, _, files in os.walk(root):
    for name in files:
      if name.endswith('.py'):
        with open(os.path.join(d, name)) as f:
          for i, line in enumerate(f, 1):
            if re.search(r'pickle\.(load|loads|Unpickler)\b|allow_pickle\s*=\s*True', line):
              hits.append(f'{os.path.relpath(f.name, root)}:{i}: {line.strip()}')
  assert len(hits) == 1 and re.fullmatch(
      r'convert/torch_io\.py:\d+: class _Unpickler\(pickle\.Unpickler\):', hits[0]), hits


@pytest.mark.parametrize('keep', ['half', 'all_but_1', 'all_but_100', 'first_10'])
def test_truncated_zip_checkpoint_says_truncated(tmp_path, keep):
  with open(os.path.join(FIX, 'torch_io_zip.pth'), 'rb') as f:
    data = f.read()
  n = {'half': len(data) // 2, 'all_but_1': len(data) - 1, 'all_but_100': len(data) - 100,
       'first_10': 10}[keep]
  (tmp_path / 'w.pth').write_bytes(data[:n])
  with pytest.raises(CheckpointFormatError, match=r'w\.pth: truncated'):
    load_torch_checkpoint(tmp_path / 'w.pth')


@pytest.mark.parametrize('kind', ['file', 'directory'])
def test_existing_output_is_refused_before_conversion(tmp_path, capsys, kind):
  out = tmp_path / 'out'
  if kind == 'file':
    out.write_bytes(b'precious')
  else:
    out.mkdir()
    (out / 'precious.txt').write_bytes(b'precious')
  before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None)
                  for p in [out, *out.rglob('*')])
  # The checkpoint does not exist: the output check must come first.
  with pytest.raises(SystemExit) as e:
    convert_main(['--model=refinenet_tiny', '--num_classes=3', '--layout=drsleep',
                  f'--checkpoint={tmp_path / "missing.pth"}', f'--output={out}'])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert f'{out} already exists' in err and 'new path' in err and 'remove' in err, err
  with pytest.raises(FileExistsError, match='already exists'):  # the library call refuses too
    save_converted(out, {'params': {}}, model_name='refinenet_tiny', num_classes=3)
  after = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None)
                 for p in [out, *out.rglob('*')])
  assert after == before
