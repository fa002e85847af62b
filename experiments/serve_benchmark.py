"""Serving latency and cold start, side by side: the library, its jax.export and ONNX artifacts,
and PyTorch eager of the published code.

  PYTHONPATH=. .venv-onnx/bin/python experiments/serve_benchmark.py \\
      --models=fcn8s,lw_refinenet_r50,refinenet_r101 --size=512 --batch=1 \\
      --torch_python=/path/to/torch/venv/bin/python --refinenet_pytorch=CHECKOUT \\
      --light_weight_refinenet=CHECKOUT --pytorch_fcn=CHECKOUT [--runs=5 --warmup=1] \\
      [--onnx_python=/path/to/onnx/venv/bin/python] [--out=runs/serve.json] [--markdown]

Runtimes, each the whole request (uint8 RGB (N, H, W, 3) in; labels and softmax probabilities at
the input size out, on the host):

* ``library``: ``jax.jit(export.serving_function(model, variables))`` (the model's
  normalisation, eval-mode logits, bilinear resize to the input size, softmax, argmax).
* ``artifact``: the ``jax.export`` artifact of that function (``export.write_artifact``, default
  platforms), deserialized by ``serving.py`` loaded from its file alone (jax + numpy, no
  library/flax import), as a service that copied it would.
* ``onnx``: the ONNX artifact of the same function (``format='onnx'``, jax2onnx) in
  onnxruntime's CPUExecutionProvider, ``intra_op_num_threads=--threads``.
* ``torch``: the published PyTorch model (``torch_reference.build``: DrSleep/refinenet-pytorch,
  DrSleep/light-weight-refinenet, wkentaro/pytorch-fcn), eager, ``eval()`` under
  ``torch.no_grad()``, ``torch.set_num_threads(--threads)``, with the same pre/post-processing
  written in torch (normalise, bilinear half-pixel resize of the logits to the input size,
  softmax, argmax). Its weights are the reference's own random initialisation (timing only).

The library, artifact and ONNX runtimes share the weights (``testing.random_variables``, seed
0, saved once as converted weights), so their labels are compared (``agree_with_library``).

Each (model, runtime) runs in a fresh child process: **cold start** is the wall time from just
before the process is spawned to its first result in hand (interpreter start, imports, building
or deserializing, loading weights from disk, compiling, first call; no persistent compilation
cache). The same process then makes ``--warmup`` untimed calls and ``--runs`` timed ones; each
is one request, timed alone (median, min, max; ``torch_reference.timing_stats``). The children
run one after another, so they do not compete with each other for the cores.

Artifacts are prepared before any timing: converted weights and the jax.export artifact in this
process, the ONNX file in a child under ``--onnx_python`` (an interpreter with the 'onnx' extra;
default: this one), the torch state dict in a child under ``--torch_python``. JSON records (one
per model x runtime, with versions and host facts) go to ``--out``, rewritten after each record.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNTIMES = ('library', 'artifact', 'onnx', 'torch')
RECORD = 'SERVE_RECORD '  # the parent reads only lines with this prefix
NUM_CLASSES = 21
# ImageNet statistics (the torch side's normalisation; the constants do not change the cost)
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def _load_by_path(name: str, path: str):
  """A module from its file alone: no package __init__ (the torch child has no jax; the
  artifact child must not import the library)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _torch_reference():
  return _load_by_path('torch_reference', os.path.join(HERE, 'torch_reference.py'))


# ---------------------------------------------------------------------------------------------
# children: one runtime each, cold start then latency

def _time_calls(call, images, warmup: int, runs: int, batch: int):
  for _ in range(warmup):
    call(images)
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    call(images)
    times.append(time.perf_counter() - t0)
  return times


def _child_library(spec):
  t_import = time.time()
  import jax

  from refinenet_jax import export
  phases = {'import_s': time.time() - t_import}
  t0 = time.time()
  source = export.from_converted(spec['converted'])  # build the model, restore the weights
  phases['load_s'] = time.time() - t0
  fn = jax.jit(export.serving_function(source.model, source.variables))

  def call(images):
    return jax.device_get(fn(images))
  return call, phases, {'jax': jax.__version__, 'backend': jax.default_backend()}, \
      'jit + first call'


def _child_artifact(spec):
  t_import = time.time()
  import jax
  serving = _load_by_path('serving', spec['serving_py'])
  phases = {'import_s': time.time() - t_import}
  t0 = time.time()
  fn = serving.load(spec['artifact'])  # sha256 check + jax.export.deserialize
  phases['load_s'] = time.time() - t0

  def call(images):
    return jax.device_get(fn(images))
  return call, phases, {'jax': jax.__version__, 'backend': jax.default_backend()}, \
      'jit of the deserialized call + first call'


def _child_onnx(spec):
  t_import = time.time()
  import onnxruntime as ort
  phases = {'import_s': time.time() - t_import}
  t0 = time.time()
  options = ort.SessionOptions()
  options.intra_op_num_threads = spec['threads']
  options.inter_op_num_threads = 1
  session = ort.InferenceSession(spec['onnx'], options, providers=['CPUExecutionProvider'])
  phases['load_s'] = time.time() - t0
  names = [o.name for o in session.get_outputs()]
  input_name = session.get_inputs()[0].name

  def call(images):
    return dict(zip(names, session.run(names, {input_name: images})))
  return call, phases, {'onnxruntime': ort.__version__,
                        'providers': session.get_providers()}, 'first run'


def _child_torch(spec, build_only=False):
  t_import = time.time()
  import torch
  import torch.nn.functional as F
  torch_reference = _torch_reference()
  phases = {'import_s': time.time() - t_import}
  torch.set_num_threads(spec['threads'])
  t0 = time.time()
  torch.manual_seed(0)
  model, source = torch_reference.build(spec['model'], spec['repos'], NUM_CLASSES)
  if build_only:
    torch.save(model.state_dict(), spec['state_dict'])
    return source
  model.load_state_dict(torch.load(spec['state_dict'], map_location='cpu'))
  model.eval()
  fmt = torch.channels_last if spec['channels_last'] else torch.contiguous_format
  model = model.to(memory_format=fmt)
  phases['load_s'] = time.time() - t0
  mean = torch.tensor(MEAN).view(1, 3, 1, 1)
  std = torch.tensor(STD).view(1, 3, 1, 1)

  def call(images):
    with torch.no_grad():
      x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
      x = ((x - mean) / std).contiguous(memory_format=fmt)
      logits = model(x)
      logits = logits[0] if isinstance(logits, (tuple, list)) else logits
      if tuple(logits.shape[-2:]) != tuple(images.shape[1:3]):
        logits = F.interpolate(logits, size=images.shape[1:3], mode='bilinear',
                               align_corners=False)
      probs = torch.softmax(logits.float(), dim=1)
      return {'labels': probs.argmax(1).int().numpy(),
              'probs': probs.permute(0, 2, 3, 1).contiguous().numpy()}
  return call, phases, {'torch': torch.__version__, 'reference': source,
                        'threads': torch.get_num_threads(),
                        'channels_last': spec['channels_last']}, 'first call'


def _child_export_onnx(spec):
  from refinenet_jax import export
  source = export.from_converted(spec['converted'])  # the library's weights
  t0 = time.time()
  export.write_artifact(source, spec['onnx_dir'], format='onnx', overwrite=True)
  import importlib.metadata

  import jax
  return {'export_s': time.time() - t0, 'jax': jax.__version__,
          'jax2onnx': importlib.metadata.version('jax2onnx'),
          'onnx': importlib.metadata.version('onnx')}


def child(spec: dict) -> dict:
  kind = spec['kind']
  if kind == 'export_onnx':
    return _child_export_onnx(spec)
  if kind == 'torch_state_dict':
    return {'reference': _child_torch(spec, build_only=True)}
  images = np.load(spec['images'])
  call, phases, versions, first_what = {'library': _child_library, 'artifact': _child_artifact,
                                        'onnx': _child_onnx, 'torch': _child_torch}[kind](spec)
  t0 = time.time()
  out = call(images)
  t_first = time.time()
  phases['first_call_s'] = t_first - t0  # includes compiling for the jax runtimes
  labels = np.asarray(out['labels'])
  np.save(spec['labels_out'], labels)
  step_s = _time_calls(call, images, spec['warmup'], spec['runs'], images.shape[0])
  tr = _torch_reference()
  return {'runtime': kind, 'first_result_unix': t_first, 'phases': phases,
          'first_call_is': first_what, 'versions': versions, 'warmup': spec['warmup'],
          'runs': spec['runs'], 'step_s_all': step_s, **tr.timing_stats(step_s, images.shape[0]),
          'probs_shape': list(np.shape(out['probs'])), 'probs_dtype': str(np.asarray(
              out['probs']).dtype), 'python_version': platform.python_version()}


# ---------------------------------------------------------------------------------------------
# parent

def _env():
  env = dict(os.environ)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # cold means cold
  env['PYTHONPATH'] = os.pathsep.join([ROOT] + [p for p in env.get('PYTHONPATH', '').split(
      os.pathsep) if p])
  return env


def spawn(python: str, spec: dict, timeout: float | None = None) -> tuple[dict, float]:
  """Runs ``child(spec)`` in a fresh ``python`` process; (its record, unix time just before the
  spawn)."""
  t_spawn = time.time()
  proc = subprocess.run([python, os.path.abspath(__file__), '--child', json.dumps(spec)],
                        capture_output=True, text=True, env=_env(), timeout=timeout,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f'{spec["kind"]} child for {spec.get("model")} failed (exit '
                       f'{proc.returncode}):\n{proc.stderr[-3000:]}')
  lines = [line for line in proc.stdout.splitlines() if line.startswith(RECORD)]
  if not lines:
    raise RuntimeError(f'{spec["kind"]} child printed no record:\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len(RECORD):]), t_spawn


def host_facts() -> dict:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    cpu = next((line.split(':', 1)[1].strip() for line in out.splitlines()
                if line.startswith('Model name')), None)
  except OSError:
    cpu = None
  return {'cpu_model': cpu, 'cpu_count': os.cpu_count(), 'platform': platform.platform(),
          'load_average': list(os.getloadavg())}


def prepare(name: str, work: str, a, repos: dict, torch: bool = True) -> dict:
  """Converted weights, the jax.export artifact, the ONNX artifact and the torch state dict of
  ``name``, under ``work/name``; returns their paths and the preparation times."""
  import jax

  from refinenet_jax import create_model, export, testing
  from refinenet_jax.convert import orbax_io
  from refinenet_jax.data.builders.base import default_palette
  folder = os.path.join(work, name)
  os.makedirs(folder, exist_ok=True)
  paths = {'converted': os.path.join(folder, 'converted'),
           'artifact': os.path.join(folder, 'artifact'),
           'onnx_dir': os.path.join(folder, 'onnx'),
           'state_dict': os.path.join(folder, 'torch_state.pt')}
  info = {}
  runtimes = set(a.runtimes)
  t0 = time.time()
  model = create_model(name, NUM_CLASSES)
  variables = testing.random_variables(model, (1, 64, 64, 3), seed=0)
  info['params'] = int(sum(x.size for x in jax.tree.leaves(variables['params'])))
  if runtimes & {'library', 'onnx'} and not os.path.exists(paths['converted']):
    orbax_io.save_converted(paths['converted'], variables, model_name=name,
                            num_classes=NUM_CLASSES, source='random_variables(seed=0)')
  info['weights_s'] = time.time() - t0
  if 'artifact' in runtimes:
    t0 = time.time()
    source = export.Source(model=model, variables=variables, name=name,
                           class_names=tuple(f'class_{i}' for i in range(NUM_CLASSES)),
                           palette=default_palette(NUM_CLASSES), ignore_label=255,
                           origin='random_variables(seed=0)')
    export.write_artifact(source, paths['artifact'], overwrite=True)
    info['jax_export_s'] = time.time() - t0
    info['artifact_mib'] = os.path.getsize(os.path.join(paths['artifact'], export.FILE)) / 2**20
  del variables
  if 'onnx' in runtimes:
    rec, _ = spawn(a.onnx_python or sys.executable,
                   {'kind': 'export_onnx', 'model': name, **paths})
    info['onnx_export'] = rec
    info['onnx_mib'] = os.path.getsize(os.path.join(paths['onnx_dir'], 'model.onnx')) / 2**20
  if 'torch' in runtimes and torch:
    rec, _ = spawn(a.torch_python, {'kind': 'torch_state_dict', 'model': name, 'repos': repos,
                                    'threads': a.threads, **paths})
    info['torch_reference'] = rec['reference']
  return {**paths, 'info': info}


def _fmt_ms(s):
  return f'{1000 * s:.0f}'


COLUMNS = ('model', 'runtime', 'median ms', 'min ms', 'max ms', 'cold start s',
           'cold: import / load / first call s', 'labels = library')


def table(records: list[dict], markdown: bool = True) -> str:
  rows = []
  for r in records:
    if 'error' in r or 'skipped' in r:
      why = r.get('error') or r['skipped']
      rows.append([r['model'], r['runtime'], 'failed' if 'error' in r else 'skipped', '', '',
                   '', why.splitlines()[0][:60], ''])
      continue
    t, p = r['step_s'], r['phases']
    agree = r.get('agree_with_library')
    rows.append([r['model'], r['runtime'], _fmt_ms(t['median']), _fmt_ms(t['min']),
                 _fmt_ms(t['max']), f'{r["cold_start_s"]:.1f}',
                 f'{p["import_s"]:.1f} / {p["load_s"]:.1f} / {p["first_call_s"]:.1f}',
                 'n/a' if agree is None else f'{100 * agree:.2f}%'])
  if markdown:
    return '\n'.join(['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)] +
                     ['| ' + ' | '.join(row) + ' |' for row in rows])
  widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(COLUMNS)]
  return '\n'.join('  '.join(c.ljust(n) for c, n in zip(cells, widths)).rstrip()
                   for cells in [list(COLUMNS)] + rows)


def _csv(text: str) -> list[str]:
  return [t for t in (s.strip() for s in text.split(',')) if t]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  p.add_argument('--models', default='fcn8s,lw_refinenet_r50,refinenet_r101')
  p.add_argument('--runtimes', type=_csv, default=list(RUNTIMES), help=f'of {RUNTIMES}')
  p.add_argument('--size', type=int, default=512, help='square input side')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--warmup', type=int, default=1, help='untimed calls after the first')
  p.add_argument('--runs', type=int, default=5, help='timed calls (median, min, max)')
  p.add_argument('--threads', type=int, default=os.cpu_count(),
                 help='torch and onnxruntime intra-op threads (XLA:CPU uses every core)')
  p.add_argument('--onnx_python', default='', help="interpreter with the 'onnx' extra "
                 '(jax2onnx, onnxruntime); default: this one')
  p.add_argument('--torch_python', default='', help='interpreter with torch')
  for key, repo in (('refinenet_pytorch', 'DrSleep/refinenet-pytorch'),
                    ('light_weight_refinenet', 'DrSleep/light-weight-refinenet'),
                    ('pytorch_fcn', 'wkentaro/pytorch-fcn')):
    p.add_argument(f'--{key}', default='', help=f'checkout of {repo}')
  p.add_argument('--torch_channels_last', type=int, default=1)
  p.add_argument('--workdir', default='', help='where artifacts go (default: a temp dir, '
                 'removed afterwards)')
  p.add_argument('--child_timeout', type=float, default=1800)
  p.add_argument('--out', default='', help='write the JSON records here')
  p.add_argument('--markdown', action='store_true')
  a = p.parse_args(argv)
  from refinenet_jax import hardware  # noqa: PLC0415
  hardware.set_cpu_xla_flags(inference_only=True)  # as the CLI's predict; children inherit it
  if a.child:
    print(RECORD + json.dumps(child(json.loads(a.child))), flush=True)
    return None

  from refinenet_jax import list_models
  models = _csv(a.models)
  unknown = sorted(set(models) - set(list_models()))
  if unknown:
    p.error(f'unknown model(s) {unknown}')
  bad = sorted(set(a.runtimes) - set(RUNTIMES))
  if bad:
    p.error(f'unknown runtime(s) {bad}; valid: {RUNTIMES}')
  repos = {k: getattr(a, k) for k in ('refinenet_pytorch', 'light_weight_refinenet',
                                      'pytorch_fcn') if getattr(a, k)}
  no_torch = {}  # model -> why it has no PyTorch reference
  if 'torch' in a.runtimes:
    if not a.torch_python:
      p.error('the torch runtime needs --torch_python')
    tr = _torch_reference()
    for name in models:
      try:
        repo_key, _ = tr.resolve(name)
      except KeyError as e:  # NoReference too: the other runtimes still run
        no_torch[name] = e.args[0]
        continue
      if repo_key and not os.path.isdir(repos.get(repo_key, '')):
        p.error(f'{name}: needs --{repo_key}=<checkout of {tr.REPOS[repo_key]}>')

  import jax
  facts = {**host_facts(), 'parent_python': sys.executable, 'parent_jax': jax.__version__,
           'threads': a.threads, 'size': [a.size, a.size], 'batch': a.batch,
           'time': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}
  print(f'# CPU: {facts["cpu_model"]} ({facts["cpu_count"]} cores), load average before '
        f'{facts["load_average"]}', flush=True)
  work = a.workdir or tempfile.mkdtemp(prefix='serve_bench_')
  rng = np.random.default_rng(0)
  images_path = os.path.join(work, 'images.npy')
  os.makedirs(work, exist_ok=True)
  np.save(images_path, rng.integers(0, 256, (a.batch, a.size, a.size, 3), dtype=np.uint8))
  records = []

  def save():
    if a.out:
      os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
      with open(a.out, 'w') as f:
        json.dump({'host': facts, 'records': records}, f, indent=1)

  try:
    for name in models:
      print(f'# {name}: preparing artifacts', flush=True)
      prep = prepare(name, work, a, repos, torch=name not in no_torch)
      print(f'# {name}: {json.dumps(prep["info"])}', flush=True)
      labels = {}
      for runtime in a.runtimes:
        if runtime == 'torch' and name in no_torch:
          print(f'# {name} torch: skipped: {no_torch[name]}', flush=True)
          records.append({'model': name, 'runtime': runtime, 'skipped': no_torch[name]})
          continue
        spec = {'kind': runtime, 'model': name, 'images': images_path, 'threads': a.threads,
                'warmup': a.warmup, 'runs': a.runs, 'repos': repos,
                'channels_last': bool(a.torch_channels_last),
                'serving_py': os.path.join(ROOT, 'refinenet_jax', 'serving.py'),
                'onnx': os.path.join(prep['onnx_dir'], 'model.onnx'),
                'labels_out': os.path.join(work, name, f'labels_{runtime}.npy'), **prep}
        python = {'torch': a.torch_python, 'onnx': a.onnx_python}.get(runtime) or sys.executable
        base = {'model': name, 'runtime': runtime, 'python': python,
                'load_average_before': list(os.getloadavg()), **prep['info']}
        try:
          rec, t_spawn = spawn(python, spec, a.child_timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
          print(f'# {name} {runtime}: FAILED {e}', flush=True)
          records.append({**base, 'error': str(e)[-2000:]})
          save()
          continue
        rec = {**base, **rec, 'cold_start_s': rec['first_result_unix'] - t_spawn,
               'load_average_after': list(os.getloadavg())}
        labels[runtime] = np.load(spec['labels_out'])
        if runtime in ('artifact', 'onnx') and 'library' in labels:
          rec['agree_with_library'] = float(np.mean(labels[runtime] == labels['library']))
        records.append(rec)
        save()
        t = rec['step_s']
        print(f'# {name} {runtime}: median {_fmt_ms(t["median"])} ms [{_fmt_ms(t["min"])}-'
              f'{_fmt_ms(t["max"])}], cold start {rec["cold_start_s"]:.1f} s '
              f'{json.dumps(rec["phases"])} {json.dumps(rec["versions"])}', flush=True)
  finally:
    facts['load_average_after'] = list(os.getloadavg())
    save()
    if not a.workdir:
      shutil.rmtree(work, ignore_errors=True)
  print(f'# load average after {facts["load_average_after"]}')
  versions = {}
  for r in records:
    versions.update({k: v for k, v in r.get('versions', {}).items()
                     if k in ('jax', 'onnxruntime', 'torch')})
  print(f'# versions: {json.dumps(versions)}; CPU {facts["cpu_model"]}, {a.threads} threads')
  print(table(records, markdown=a.markdown))
  return records


if __name__ == '__main__':
  main()
