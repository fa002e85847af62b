"""Read and write PyTorch checkpoint files (``torch.save``) with numpy alone.

Supports the zip format (torch >= 1.6) and the legacy pickle format (older torchvision URLs).
Only tensors, containers and plain values are unpickled: any other global is refused, so a
checkpoint cannot run code (the safety ``torch.load(weights_only=True)`` gives).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'BFloat16Storage': 'bfloat16',
}
_STORAGE_OF = {np.dtype(v): k for k, v in _DTYPES.items() if not isinstance(v, str)}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b'PK\x03\x04'


class CheckpointFormatError(ValueError):
  """The file is not a readable PyTorch checkpoint."""


class _StorageType:
  def __init__(self, name):
    self.name = name
    dt = _DTYPES[name]
    if dt == 'bfloat16':
      import ml_dtypes  # a jax dependency
      dt = ml_dtypes.bfloat16
    self.dtype = np.dtype(dt)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[offset])
  needed = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0
  if needed > storage.size:
    raise CheckpointFormatError(f'tensor of size {size} needs {needed} elements but its storage '
                                f'holds {storage.size}: truncated file?')
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * item for s in stride])
  return np.array(view, order='C', copy=True)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  del requires_grad, backward_hooks, unused
  return data


_REBUILD_TENSOR = (('torch._utils', '_rebuild_tensor_v2'), ('torch._utils', '_rebuild_tensor'))
_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice, ('builtins', 'complex'): complex,
    ('torch', 'Size'): tuple,
}


class UnsafeCheckpointError(CheckpointFormatError):
  """The file asks to import a global a state dict never needs: loading it could run code."""


def _refuse_storage(pid):
  raise pickle.UnpicklingError(f'persistent id {pid!r} outside the tensor data')


class _Unpickler(pickle.Unpickler):
  """The one unpickler for checkpoint data: only the globals of a torch state dict resolve.

  Every pickle of both formats (legacy header values, object, storage keys; zip ``data.pkl``)
  goes through it, so no pickle opcode can reach an arbitrary callable.
  """

  def __init__(self, f, path, load_storage=_refuse_storage, rebuild_tensor=_rebuild_tensor):
    super().__init__(f, encoding='utf-8')
    self._path = path
    self._load_storage = load_storage
    self._rebuild_tensor = rebuild_tensor

  def find_class(self, module, name):
    if module == 'torch' and name in _DTYPES:
      return _StorageType(name)
    if (module, name) in _REBUILD_TENSOR:
      return self._rebuild_tensor
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise UnsafeCheckpointError(
        f'{self._path}: refusing to load global {module}.{name}: weights are data, not code '
        '(only tensors, containers and plain values are allowed); the file is not a plain '
        'state dict or was tampered with, so get it from a trusted source')

  def persistent_load(self, pid):
    kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
    if kind != 'storage':
      raise pickle.UnpicklingError(f'unsupported persistent id {kind!r}')
    return self._load_storage(pid[1:])


def _load_zip(path) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith('data.pkl')]
    if len(pkl) != 1:
      raise CheckpointFormatError(f'{path}: zip archive without a single data.pkl')
    prefix = pkl[0][:-len('data.pkl')]
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = zf.read(prefix + 'byteorder').decode().strip()
    cache = {}

    def load_storage(args):
      stype, key, _location, numel = args[:4]
      if key not in cache:
        try:
          raw = zf.read(f'{prefix}data/{key}')
        except KeyError:
          raise CheckpointFormatError(f'{path}: storage {key} missing from the archive') from None
        dt = stype.dtype.newbyteorder('<' if byteorder == 'little' else '>')
        if len(raw) != numel * dt.itemsize:
          raise CheckpointFormatError(f'{path}: storage {key} has {len(raw)} bytes, expected '
                                      f'{numel * dt.itemsize}: truncated or corrupt file')
        cache[key] = np.frombuffer(raw, dt).astype(stype.dtype)
      return cache[key]

    return _Unpickler(io.BytesIO(zf.read(pkl[0])), path, load_storage).load()


def _load_legacy(path) -> Any:
  with open(path, 'rb') as f:
    try:
      magic = _Unpickler(f, path).load()
      if magic != _LEGACY_MAGIC:
        raise CheckpointFormatError(f'{path}: not a PyTorch checkpoint (bad magic number)')
      if _Unpickler(f, path).load() != _LEGACY_PROTOCOL:
        raise CheckpointFormatError(f'{path}: unsupported legacy protocol version')
      _Unpickler(f, path).load()  # sys_info
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
      if isinstance(e, CheckpointFormatError):
        raise
      raise CheckpointFormatError(f'{path}: not a PyTorch checkpoint ({e})') from None
    storages = {}  # root key -> (dtype, numel)
    views = []

    def load_storage(args):
      stype, root_key, _location, numel, view = args
      storages.setdefault(root_key, (stype.dtype, numel))
      holder = {'root': root_key, 'view': view}
      views.append(holder)
      return holder

    # Tensors reference storages whose bytes come after the pickle: rebuild lazily.
    pending = []

    def rebuild(storage, offset, size, stride, *unused):
      out = _Lazy(storage, offset, size, stride)
      pending.append(out)
      return out

    obj = _Unpickler(f, path, load_storage, rebuild).load()
    keys = _Unpickler(f, path).load()
    data = {}
    for key in keys:
      if key not in storages:
        raise CheckpointFormatError(f'{path}: storage {key!r} is not used by any tensor: corrupt '
                                    'file')
      dt, numel = storages[key]
      (n,) = struct.unpack('<q', f.read(8))
      raw = f.read(n * dt.itemsize)
      if n != numel or len(raw) != numel * dt.itemsize:
        raise CheckpointFormatError(f'{path}: storage {key} is truncated or corrupt')
      data[key] = np.frombuffer(raw, dt.newbyteorder('<')).astype(dt)
    for lazy in pending:
      lazy.resolve(data)
    return _materialise(obj)


class _Lazy:
  def __init__(self, holder, offset, size, stride):
    self.holder, self.offset, self.size, self.stride = holder, offset, size, stride
    self.value = None

  def resolve(self, data):
    storage = data[self.holder['root']]
    if self.holder['view'] is not None:
      _, view_offset, view_size = self.holder['view']
      storage = storage[view_offset:view_offset + view_size]
    self.value = _rebuild_tensor(storage, self.offset, self.size, self.stride)


def _materialise(obj):
  if isinstance(obj, _Lazy):
    return obj.value
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _materialise(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
  """Loads a ``torch.save`` file into numpy arrays inside the same containers."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no checkpoint file at {path}')
  with open(path, 'rb') as f:
    is_zip = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
  if is_zip or zipfile.is_zipfile(path):
    try:
      return _load_zip(path)
    except (zipfile.BadZipFile, EOFError) as e:  # no central directory, short record, bad CRC
      raise CheckpointFormatError(f'{path}: truncated or corrupt zip checkpoint ({e}); '
                                  'download or save it again') from None
    except pickle.UnpicklingError as e:
      raise CheckpointFormatError(f'{path}: corrupt PyTorch checkpoint ({e})') from None
  try:
    return _load_legacy(path)
  except (pickle.UnpicklingError, EOFError, struct.error) as e:
    raise CheckpointFormatError(f'{path}: corrupt PyTorch checkpoint ({e})') from None


def save_torch_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike):
  """Writes ``state_dict`` so that ``torch.load`` (and :func:`load_torch_checkpoint`) read it."""
  path = os.fspath(path)
  arrays = collections.OrderedDict()
  for k, v in state_dict.items():
    v = np.asarray(v)
    if v.dtype not in _STORAGE_OF:
      raise TypeError(f'{k}: unsupported dtype {v.dtype}')
    arrays[k] = np.array(v, order='C', copy=True)
  prefix = os.path.splitext(os.path.basename(path))[0] or 'archive'
  body = io.BytesIO()
  # Hand-assemble the pickle: OrderedDict of _rebuild_tensor_v2(storage, 0, size, stride, ...).
  p = _ProtoWriter(body)
  p.write_state_dict(arrays)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    zf.writestr(f'{prefix}/data.pkl', body.getvalue())
    zf.writestr(f'{prefix}/byteorder', 'little')
    for i, v in enumerate(arrays.values()):
      zf.writestr(f'{prefix}/data/{i}', v.astype(v.dtype.newbyteorder('<')).tobytes())
    zf.writestr(f'{prefix}/version', '3\n')


class _ProtoWriter:
  """Minimal protocol-2 pickle emitter for the objects a state dict needs."""

  def __init__(self, f):
    self.f = f

  def _w(self, b):
    self.f.write(b)

  def _global(self, module, name):
    self._w(b'c' + module.encode() + b'\n' + name.encode() + b'\n')

  def _obj(self, o):
    # Delegate plain values (str, int, tuple of ints, bool, None) to the stdlib pickler body.
    data = pickle.dumps(o, protocol=2)
    # strip PROTO (2 bytes) and STOP (1 byte)
    self._w(data[2:-1])

  def write_state_dict(self, arrays):
    self._w(b'\x80\x02')
    self._global('collections', 'OrderedDict')
    self._w(b')R')  # EMPTY_TUPLE, REDUCE
    for i, (k, v) in enumerate(arrays.items()):
      self._obj(k)
      self._global('torch._utils', '_rebuild_tensor_v2')
      self._w(b'(')  # MARK
      # persistent id tuple: ('storage', torch.XStorage, key, 'cpu', numel)
      self._w(b'(')
      self._obj('storage')
      self._global('torch', _STORAGE_OF[v.dtype])
      self._obj(str(i))
      self._obj('cpu')
      self._obj(int(v.size))
      self._w(b'tQ')  # TUPLE, BINPERSID
      strides = tuple(int(s // v.itemsize) for s in v.strides) if v.ndim else ()
      if v.ndim and v.size == 0:
        strides = tuple(int(np.prod(v.shape[j + 1:])) for j in range(v.ndim))
      self._obj(0)
      self._obj(tuple(int(s) for s in v.shape))
      self._obj(strides)
      self._obj(False)
      self._global('collections', 'OrderedDict')
      self._w(b')R')
      self._w(b't')  # TUPLE (from MARK)
      self._w(b'R')  # REDUCE
      self._w(b's')  # SETITEM
    self._w(b'.')
