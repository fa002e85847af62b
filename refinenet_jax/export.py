"""Deployable artifacts without TensorFlow: the whole inference function as ``jax.export``.

  python -m refinenet_jax.export --workdir=RUN --output=DIR [--checkpoint=best|latest]
  python -m refinenet_jax.export --init_checkpoint=CONVERTED --output=DIR
      [--scales=0.75,1,1.25] [--flip] [--probs_dtype=bfloat16] [--format=onnx]

The artifact folder holds the serialized StableHLO program (uint8 RGB in: the model's own
normalisation, logits, resize to the input size, optional scale/flip averaging; ``labels`` and
``probs`` out) with symbolic batch, height and width, lowered for cpu, cuda and tpu at once, and
``manifest.json`` (classes, palette, normalisation, input contract, versions, sha256). Load it
with :func:`load` or, without this library, ``serving.py`` (jax and numpy only).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
import numpy as np

import refinenet_jax
from refinenet_jax import console, inference, serving, steps

PLATFORMS = ('cpu', 'cuda', 'tpu')
PROBS_DTYPES = ('float32', 'bfloat16')
FILES = {'jax': 'model.jax_exported', 'onnx': 'model.onnx'}  # format -> the program's file
FILE = FILES['jax']
FORMATS = tuple(FILES)
FORMAT_VERSION = 1
load = serving.load


@dataclasses.dataclass(frozen=True)
class Source:
  """A model and its weights, with what the manifest says about them."""
  model: object
  variables: dict
  name: str
  class_names: tuple[str, ...]
  palette: np.ndarray
  ignore_label: int
  origin: str


def serving_function(model, variables, *, scales: Sequence[float] = (1.0,), flip: bool = False,
                     probs_dtype: str = 'float32'):
  """uint8 (N, H, W, 3) RGB -> {'labels': int32 (N, H, W), 'probs': (N, H, W, C)}: the model's
  normalisation, eval-mode logits bilinearly resized (half-pixel) to the input size, softmax,
  averaged over ``scales`` x ``flip``; the same arithmetic as the library's evaluation."""
  if probs_dtype not in PROBS_DTYPES:
    raise ValueError(f'probs_dtype must be one of {PROBS_DTYPES}, got {probs_dtype!r}')

  def serve(images):
    probs = inference.predict_probs(steps.logits_fn(variables, model),
                                    images.astype(jnp.float32), scales=tuple(scales), flip=flip)
    return {'labels': jnp.argmax(probs, axis=-1).astype(jnp.int32),
            'probs': probs.astype(probs_dtype)}
  return serve


def export_function(fn, platforms: Sequence[str] = PLATFORMS) -> jax.export.Exported:
  """``fn`` exported for uint8 (b, h, w, 3) with symbolic b, h and w."""
  b, h, w = jax.export.symbolic_shape('b, h, w')
  spec = jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8)
  try:
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)
  except Exception as e:
    raise ValueError(f'this model cannot be exported with symbolic sizes: {type(e).__name__}: '
                     f'{e}') from e


def _library_commit() -> str | None:
  root = os.path.dirname(os.path.dirname(os.path.abspath(refinenet_jax.__file__)))
  try:
    out = subprocess.run(['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True,
                         text=True, timeout=10)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def manifest_for(source: Source, data: bytes, *, scales, flip, probs_dtype, platforms,
                 format: str = 'jax') -> dict:
  model = source.model
  return {
      'format_version': FORMAT_VERSION,
      'format': format,
      'file': FILES[format],
      'sha256': hashlib.sha256(data).hexdigest(),
      'model': source.name,
      'source': source.origin,
      'num_classes': len(source.class_names),
      'class_names': list(source.class_names),
      'palette': [[int(c) for c in rgb] for rgb in source.palette[:len(source.class_names)]],
      'ignore_label': source.ignore_label,
      'normalization': model.normalization,
      'input': {'dtype': 'uint8', 'shape': ['batch', 'height', 'width', 3],
                'layout': 'NHWC', 'channels': 'RGB 0..255'},
      'outputs': {'labels': {'dtype': 'int32', 'shape': ['batch', 'height', 'width']},
                  'probs': {'dtype': probs_dtype,
                            'shape': ['batch', 'height', 'width', len(source.class_names)]}},
      'scales': list(scales), 'flip': flip, 'platforms': list(platforms),
      'library_version': refinenet_jax.__version__, 'library_commit': _library_commit(),
      'jax_version': jax.__version__,
  }


def write_artifact(source: Source, output: str, *, scales=(1.0,), flip=False,
                   probs_dtype='float32', platforms=PLATFORMS, overwrite=False,
                   format: str = 'jax') -> str:
  """Exports ``source`` into the folder ``output`` (refused if it exists, unless ``overwrite``);
  the folder appears complete or not at all."""
  output = os.path.abspath(output)
  if os.path.lexists(output) and not overwrite:
    raise FileExistsError(f'output {output} already exists; pass --overwrite or another path')
  if os.path.lexists(output) and not os.path.isfile(os.path.join(output, serving.MANIFEST)):
    raise FileExistsError(f'output {output} exists and is not an exported model (no '
                          f'{serving.MANIFEST}): not replaced, even with --overwrite')
  if format not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, got {format!r}')
  fn = serving_function(source.model, source.variables, scales=scales, flip=flip,
                        probs_dtype=probs_dtype)
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.export-', dir=parent)
  try:
    if format == 'jax':
      data = export_function(fn, platforms).serialize()
      with open(os.path.join(tmp, FILE), 'wb') as f:
        f.write(data)
    else:
      from refinenet_jax import export_onnx
      platforms = ('onnxruntime',)
      with open(export_onnx.to_onnx(fn, len(source.class_names), os.path.join(tmp, FILES['onnx'])),
                'rb') as f:
        data = f.read()
  except BaseException:
    shutil.rmtree(tmp)
    raise
  manifest = manifest_for(source, data, scales=scales, flip=flip, probs_dtype=probs_dtype,
                          platforms=platforms, format=format)
  with open(os.path.join(tmp, serving.MANIFEST), 'w') as f:
    # one line per colour, not per channel
    f.write(re.sub(r'\[\s+(\d+),\s+(\d+),\s+(\d+)\s+\]', r'[\1, \2, \3]',
                   json.dumps(manifest, indent=2)) + '\n')
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # a folder like any other, not mkdtemp's private 0700
  if os.path.lexists(output):  # overwrite: replace only now that the new artifact is complete
    old = tempfile.mkdtemp(prefix='.replaced-', dir=parent)
    os.rename(output, os.path.join(old, 'artifact'))
    os.rename(tmp, output)
    shutil.rmtree(old)
  else:
    os.rename(tmp, output)
  return output


def _class_names_and_palette(meta: dict) -> tuple[tuple[str, ...], np.ndarray]:
  """A checkpoint's class names and colours; generic ones (``class_0``..., the VOC-style bit
  palette) where it does not record them (converted weights, runs before this was stored)."""
  from refinenet_jax.data.builders.base import default_palette
  n = int(meta['num_classes'])
  names = tuple(meta.get('class_names') or (f'class_{i}' for i in range(n)))
  palette = np.asarray(meta['palette'], np.uint8) if meta.get('palette') else default_palette(n)
  return names, palette


def from_workdir(workdir: str, which: str = 'best') -> Source:
  """A training run's best (or latest) step, rebuilt from the config its checkpoints store."""
  from refinenet_jax import checkpoint, train
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta, variables = checkpoint.read_variables(workdir, device, which)
  if 'config' not in meta:
    raise ValueError(f'{workdir}: its checkpoint meta has no config; export converted weights '
                     'with --init_checkpoint instead')
  model = train.build_model(ml_collections.ConfigDict(json.loads(meta['config'])))
  names, palette = _class_names_and_palette(meta)
  return Source(model=model, variables=variables, name=meta['model'], class_names=names,
                palette=palette, ignore_label=int(meta.get('ignore_label', 255)),
                origin=f'{os.path.abspath(workdir)} step {meta["step"]}')


def from_converted(path: str) -> Source:
  """Weights written by ``python -m refinenet_jax.convert`` (their META names the model)."""
  from refinenet_jax.convert import orbax_io
  model, variables = orbax_io.load_converted(path)
  with open(os.path.join(path, orbax_io.META)) as f:
    meta = json.load(f)
  names, palette = _class_names_and_palette(meta)
  return Source(model=model, variables=variables, name=meta['model'], class_names=names,
                palette=palette, ignore_label=int(meta.get('ignore_label', 255)),
                origin=os.path.abspath(path))


def main(argv=None) -> int:
  import argparse
  p = argparse.ArgumentParser(prog='python -m refinenet_jax.export', description=__doc__.split(
      '\n\n')[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--workdir', help='a training run (its checkpoints)')
  src.add_argument('--init_checkpoint', help='converted weights (python -m refinenet_jax.convert)')
  p.add_argument('--checkpoint', choices=('best', 'latest'), default='best',
                 help='with --workdir: which step')
  p.add_argument('--output', required=True, help='the artifact folder to create')
  p.add_argument('--format', choices=FORMATS, default='jax',
                 help="onnx: needs the 'onnx' extra (README, 'ONNX export')")
  p.add_argument('--scales', default='1.0', help='comma-separated test-time scales')
  p.add_argument('--flip', action='store_true', help='average with the mirrored image')
  p.add_argument('--probs_dtype', choices=PROBS_DTYPES, default='float32')
  p.add_argument('--platforms', default=','.join(PLATFORMS))
  p.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
  a = p.parse_args(argv)
  logging.set_verbosity(logging.ERROR)  # orbax's notes on reading a run's checkpoints
  try:
    scales = tuple(float(s) for s in a.scales.split(','))
  except ValueError:
    p.error(f'--scales must be comma-separated numbers, got {a.scales!r}')
  try:
    source = from_workdir(a.workdir, a.checkpoint) if a.workdir else from_converted(
        a.init_checkpoint)
    out = write_artifact(source, a.output, scales=scales, flip=a.flip,
                         probs_dtype=a.probs_dtype, platforms=a.platforms.split(','),
                         overwrite=a.overwrite, format=a.format)
  except (FileExistsError, FileNotFoundError, ValueError, ImportError) as e:
    print(f'export: {e}', file=sys.stderr)
    return 1
  manifest = serving.read_manifest(out)
  size = os.path.getsize(os.path.join(out, manifest['file']))
  print(f'exported {source.name} ({source.origin}) to {out}: {size / 2**20:.1f} MiB, '
        f'{manifest["num_classes"]} classes, platforms {",".join(manifest["platforms"])}, '
        f'sha256 {manifest["sha256"][:12]}')
  return 0


if __name__ == '__main__':
  console.quiet_libraries()  # orbax's INFO lines
  sys.exit(main())
