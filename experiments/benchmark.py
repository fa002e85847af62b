"""XLA throughput of any registered model, and the same architecture in PyTorch eager beside it.

  python -m experiments.benchmark --models=refinenet_r101 --size=512 --batch=1 \\
      --modes=inference,train [--dtypes=float32,bfloat16] [--parallel=jit,shard_map] \\
      [--torch_python=/path/to/torch/venv/bin/python --refinenet_pytorch=/path/to/checkout] \\
      [--out=runs/bench.jsonl] [--markdown]

Per (model, dtype, mode, parallel style) it reports the ahead-of-time compile time
(``jit(...).lower(...).compile()``), images/s (``--warmup`` calls excluded, then ``--repeats``
runs of ``--iters`` steps, each run ended by ``jax.block_until_ready``; median and min/max over
runs), the FLOPs of one step from XLA's cost analysis, the achieved FLOP/s and MFU against a
per-backend peak, and device memory (XLA's static estimate; the allocator's peak where the
backend reports one). One JSON record per run on stdout (and appended to ``--out``), then a table.

Modes: ``inference`` is the eval-mode forward pass to logits (``steps.logits_fn``); ``train`` is
the jitted, donated, sharded ``steps.train_step`` built exactly as ``train.train_and_evaluate``
builds it (default config: SGD + momentum, weight decay, the 1/4-resolution loss). Parallel
styles: ``jit`` is the trainer's global view (batch split over a ('data',) mesh, SyncBN
semantics); ``shard_map`` runs the same step per device (``per_device.py``).

With ``--profile_dir`` each configuration runs once more under ``jax.profiler`` (untimed) and
the record gains a ``profile``: the step's device time by phase, model component and primitive,
with the convolutions' FLOPs beside it (``op_profile.py``); the CLI prints it as tables.

With ``--torch_python`` the PyTorch reference of each model (``torch_reference.py``) runs in a
child process on the same inputs, batch, size and thread count, eager, and the JAX/torch time
ratio is printed (> 1: JAX is slower).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import default
from experiments import op_profile, per_device, torch_reference  # torch_reference: no torch
from refinenet_jax import hardware, list_models, optim, sharding, steps, train, xla_stats

MODES = ('inference', 'train')
PARALLEL = ('jit', 'shard_map')
DTYPES = ('float32', 'bfloat16')
IGNORE_LABEL = 255

def peak_flops_per_device(device_kind: str, dtype: str):
  """(peak FLOP/s, chip name) for one device from ``hardware.CHIPS``, or (None, None) (CPUs)."""
  chip = hardware.chip_for(device_kind)
  return (chip.peak_flops[dtype], chip.name) if chip else (None, None)


def device_memory(compiled, devices) -> dict:
  """Per-device bytes: XLA's static buffer assignment (``xla_stats.memory``), and the
  allocator's peak when reported (GPU/TPU; ``memory_stats()`` is None on CPU). The peak is the
  process's so far, init included."""
  out = xla_stats.memory(compiled)
  peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use') for d in devices]
  peaks = [p for p in peaks if p is not None]
  out['peak_bytes_in_use'] = max(peaks) if peaks else None
  return out


def make_config(model: str, num_classes: int, dtype: str, model_overrides: dict | None = None,
                config_overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The default training config for ``model`` (what the trainer would run), with
  ``config_overrides`` (e.g. ``{'optimizer': 'adamw'}``) applied; unknown keys fail."""
  c = default.get_config()
  c.model = model
  c.num_classes = num_classes
  c.compute_dtype = dtype
  c.model_overrides = ml_collections.ConfigDict(dict(model_overrides or {}))
  for key, value in (config_overrides or {}).items():
    if key not in c:
      raise KeyError(f'unknown config key {key!r} (see configs/default.py)')
    c[key] = value
  return c


def make_inputs(batch: int, size, num_classes: int, seed: int = 0) -> dict:
  """uint8 RGB images and labels, the same bytes for the JAX run and the PyTorch child."""
  rng = np.random.default_rng(seed)
  h, w = size
  return {'image': rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8),
          'label': rng.integers(0, num_classes, (batch, h, w), dtype=np.uint8)}


def _aux_heads(model, input_shape) -> int:
  """How many auxiliary heads the model returns in train mode (each needs a loss weight)."""
  def apply(x):
    variables = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x)
    return model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)},
                       mutable=['batch_stats'])[0]
  out = jax.eval_shape(apply, jax.ShapeDtypeStruct(input_shape, jnp.float32))
  return len(steps.split_outputs(out)[1])


@functools.lru_cache(maxsize=4)
def _setup(model_name, num_classes, dtype, size, num_devices, overrides, config_overrides,
           aux_weight):
  config = make_config(model_name, num_classes, dtype, dict(overrides), dict(config_overrides))
  model = train.build_model(config)
  config.aux_weights = (aux_weight,) * _aux_heads(model, (1, *size, 3))
  mesh = sharding.make_mesh(num_devices)
  kw = dict(model=model, tx=optim.make_optimizer(config), input_shape=(1, *size, 3), mesh=mesh,
            rules=config.sharding_rules)
  init, abstract = sharding.train_state_initializer(jax.random.key(0), **kw)
  state_sh = sharding.shardings_of(abstract)
  return types.SimpleNamespace(config=config, model=model, mesh=mesh, state_sh=state_sh,
                               init=init)


def setup(model_name: str, *, num_classes: int = 21, dtype: str = 'float32', size=(512, 512),
          num_devices: int = -1, model_overrides: dict | None = None,
          config_overrides: dict | None = None, aux_weight: float = 0.4):
  """The trainer's pieces for one model: config, model, mesh, state shardings and the jitted,
  sharded initialiser (``init(key) -> TrainState``). Cached: runs of the same model in other
  modes and parallel styles reuse the compiled initialiser (a fresh state each time)."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype {dtype!r}; valid: {DTYPES}')
  items = lambda d: tuple(sorted((d or {}).items()))
  return _setup(model_name, num_classes, dtype, tuple(size), num_devices,
                items(model_overrides), items(config_overrides), aux_weight)


def make_step(s, mode: str, parallel: str):
  """The jitted function timed for ``mode``: ``fn(state, batch) -> (state, metrics)`` for
  'train', ``fn(state, images) -> logits`` for 'inference'."""
  if mode not in MODES or parallel not in PARALLEL:
    raise ValueError(f'mode {mode!r} / parallel {parallel!r}; valid: {MODES} / {PARALLEL}')
  if mode == 'train':  # exactly the step train.train_and_evaluate jits
    fn = train.make_train_step(s.config, s.model, s.mesh, s.state_sh, IGNORE_LABEL)
    if parallel == 'shard_map':
      fn = per_device.per_device_train_fn(fn, s.mesh, s.state_sh)
    return fn
  batch_sh, repl = sharding.batch_sharding(s.mesh), sharding.replicated(s.mesh)

  def forward(state, images):
    return steps.logits_fn(steps.variables_of(state), s.model)(images)
  if parallel == 'shard_map':
    forward = per_device.per_device_forward(forward, s.mesh)
  return jax.jit(forward, in_shardings=(repl, batch_sh), out_shardings=batch_sh)


def step_args(s, mode: str, batch: int, size, num_classes: int = 21, seed: int = 0) -> list:
  """A fresh state and batch on ``s``'s mesh, as ``make_step``'s function for ``mode`` takes
  them (a list: a train step's caller puts the new state in place of the donated one)."""
  state = s.init(jax.random.key(seed))
  data = sharding.put_batch(make_inputs(batch, size, num_classes, seed), s.mesh)
  if mode == 'train':
    return [state, data]
  # the optimizer state is no input of the forward pass (and frees its memory)
  return [state.replace(opt_state=()), data['image']]


def run(model_name: str, *, size=(512, 512), batch: int = 1, dtype: str = 'float32',
        mode: str = 'inference', parallel: str = 'jit', num_classes: int = 21,
        iters: int = 5, repeats: int = 3, warmup: int = 2, num_devices: int = -1,
        peak_flops: float | None = None, model_overrides: dict | None = None,
        config_overrides: dict | None = None, aux_weight: float = 0.4, seed: int = 0,
        profile_dir: str | None = None) -> dict:
  """Benchmarks one configuration and returns its record (a JSON-serialisable dict)."""
  s = setup(model_name, num_classes=num_classes, dtype=dtype, size=size,
            num_devices=num_devices, model_overrides=model_overrides,
            config_overrides=config_overrides, aux_weight=aux_weight)
  sharding.check_batch_size(batch, s.mesh)
  fn = make_step(s, mode, parallel)
  args = step_args(s, mode, batch, size, num_classes, seed)
  n_params = sum(x.size for x in jax.tree.leaves(args[0].params))

  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0

  def call():
    out = compiled(*args)
    if mode == 'train':
      args[0] = out[0]  # the donated state is consumed; continue from the new one
    return out

  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = call()
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  profile = None
  if profile_dir:  # one more run under the profiler, not timed
    with jax.profiler.trace(profile_dir):
      for _ in range(iters):
        out = call()  # earlier outputs' states are donated to the next step
      jax.block_until_ready(out)
    profile = op_profile.breakdown(compiled.as_text(), profile_dir, steps=iters)
  if mode == 'train':
    loss = float(jax.device_get(out[1]['loss']))
    if not np.isfinite(loss):
      raise FloatingPointError(f'{model_name}: non-finite loss {loss} while benchmarking')

  step_s = [t / iters for t in times]
  per_device = xla_stats.cost(compiled)['flops']
  flops = per_device * s.mesh.size if per_device else None  # the program is per device (SPMD)
  device = s.mesh.devices.flat[0]
  peak, peak_key = peak_flops_per_device(device.device_kind, dtype)
  peak_source = f'hardware.CHIPS[{peak_key!r}]' if peak else None
  if peak_flops:
    peak, peak_source = peak_flops, '--peak_flops'
  peak_total = peak * s.mesh.size if peak else None
  achieved = flops / statistics.median(step_s) if flops else None
  return {
      'framework': 'jax', 'model': model_name, 'mode': mode, 'parallel': parallel,
      'dtype': dtype, 'batch': batch, 'size': list(size), 'num_classes': num_classes,
      'model_overrides': dict(model_overrides or {}),
      'config_overrides': dict(config_overrides or {}), 'params': int(n_params),
      'aux_heads': len(s.config.aux_weights),
      'backend': jax.default_backend(), 'device_kind': device.device_kind,
      'num_devices': s.mesh.size, 'process_count': jax.process_count(),
      'host_cpus': os.cpu_count(), 'jax_version': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'compilation_cache': bool(jax.config.jax_compilation_cache_dir),
      'lower_s': lower_s, 'compile_s': compile_s,
      'warmup': warmup, 'iters': iters, 'repeats': repeats,
      **torch_reference.timing_stats(step_s, batch),
      'flops_per_step': flops, 'flops_per_image': flops / batch if flops else None,
      'achieved_flops_per_s': achieved, 'peak_flops_per_s': peak_total,
      'peak_source': peak_source, 'mfu': achieved / peak_total if achieved and peak else None,
      'memory_per_device': device_memory(compiled, s.mesh.devices.flat),
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      **({'profile': profile} if profile else {}),
  }


# ---------------------------------------------------------------------------------------------
# PyTorch side by side (child process: same process tree, its own thread pool)

def run_torch(model_name: str, *, torch_python: str, repos: dict, inputs: dict, modes,
              dtypes, num_classes: int = 21, iters: int = 5, repeats: int = 3, warmup: int = 2,
              threads: int | None = None, channels_last: bool = True,
              device: str = 'cpu') -> list[dict]:
  """Times the PyTorch reference of ``model_name`` on ``inputs`` (make_inputs' dict) in a child
  ``torch_python`` process; returns its records. Raises if the child fails."""
  torch_reference.resolve(model_name)  # unknown / no-reference names fail here, not in the child
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'inputs.npz')
    np.savez(path, **inputs)
    spec = {'model': model_name, 'repos': repos, 'inputs': path, 'modes': list(modes),
            'dtypes': list(dtypes), 'num_classes': num_classes, 'iters': iters,
            'repeats': repeats, 'warmup': warmup, 'threads': threads or os.cpu_count(),
            'channels_last': channels_last, 'device': device}
    return torch_reference.run_child(torch_python, spec, model_name)


def attach_torch(records: list[dict], torch_records: list[dict]) -> None:
  """Adds the matching PyTorch record and the JAX/torch time-per-image ratio to each JAX one."""
  def key(r):
    return r['model'], r['mode'], r['dtype'], r['batch'], tuple(r['size'])
  by_key = {key(t): t for t in torch_records}
  for r in records:
    t = by_key.get(key(r))
    if t is not None:
      r['torch'] = t
      r['time_ratio_jax_over_torch'] = t['images_per_s']['median'] / r['images_per_s']['median']


# ---------------------------------------------------------------------------------------------
# output

def _fmt(x, spec='.1f', scale=1.0):
  return 'n/a' if x is None else format(x / scale, spec)


COLUMNS = ('model', 'mode', 'dtype', 'parallel', 'devices', 'batch', 'size', 'compile s',
           'img/s median [min-max]', 'GFLOP/img', 'TFLOP/s', 'MFU', 'XLA mem MiB',
           'peak mem MiB', 'torch img/s', 'JAX/torch time')


def table_rows(records: list[dict]) -> list[list[str]]:
  rows = []
  for r in records:
    ips, mem = r['images_per_s'], r['memory_per_device']
    t = r.get('torch')
    ratio = r.get('time_ratio_jax_over_torch')
    rows.append([
        r['model'], r['mode'], r['dtype'], r['parallel'], str(r['num_devices']),
        str(r['batch']), 'x'.join(map(str, r['size'])), _fmt(r['compile_s']),
        f'{ips["median"]:.3g} [{ips["min"]:.3g}-{ips["max"]:.3g}]',
        _fmt(r['flops_per_image'], '.3g', 1e9), _fmt(r['achieved_flops_per_s'], '.3g', 1e12),
        'n/a' if r['mfu'] is None else f'{100 * r["mfu"]:.1f}%',
        _fmt(mem.get('total_bytes'), '.0f', 2**20),
        _fmt(mem.get('peak_bytes_in_use'), '.0f', 2**20),
        f'{t["images_per_s"]["median"]:.3g}' if t else r.get('torch_note', 'n/a'),
        f'{ratio:.2f}x' if ratio else 'n/a'])
  return rows


def table(records: list[dict], markdown: bool = False) -> str:
  rows = table_rows(records)
  if markdown:
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])
  widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(COLUMNS)]
  fmt = lambda cells: '  '.join(c.ljust(n) for c, n in zip(cells, widths)).rstrip()
  return '\n'.join([fmt(COLUMNS)] + [fmt(row) for row in rows])


def _csv(text: str) -> list[str]:
  return [t for t in (s.strip() for s in text.split(',')) if t]


def _size(text: str) -> tuple[int, int]:
  parts = [int(p) for p in text.lower().split('x')]
  return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', default='refinenet_tiny',
                 help='comma-separated names from refinenet_jax.list_models()')
  p.add_argument('--size', type=_size, default=(512, 512), help='512 or HxW')
  p.add_argument('--batch', type=int, default=1, help='global batch (divisible by devices)')
  p.add_argument('--dtypes', type=_csv, default=['float32'], help=f'of {DTYPES}')
  p.add_argument('--modes', type=_csv, default=list(MODES), help=f'of {MODES}')
  p.add_argument('--parallel', type=_csv, default=['jit'], help=f'of {PARALLEL}')
  p.add_argument('--num_classes', type=int, default=21)
  p.add_argument('--iters', type=int, default=5, help='steps per timed run')
  p.add_argument('--repeats', type=int, default=3, help='timed runs (median, min, max)')
  p.add_argument('--warmup', type=int, default=2, help='untimed calls after compiling')
  p.add_argument('--num_devices', type=int, default=-1, help='-1: every device')
  p.add_argument('--peak_flops', type=float, default=None,
                 help='peak FLOP/s of one device for MFU (needed on CPU, e.g. cores x GHz x '
                      'FLOPs/cycle); overrides refinenet_jax.hardware.CHIPS')
  p.add_argument('--profile_dir', default='',
                 help='also write a jax.profiler trace here and print where the time goes')
  p.add_argument('--out', default='', help='append the JSON records to this file')
  p.add_argument('--markdown', action='store_true', help='print the table as markdown')
  p.add_argument('--list', action='store_true', help='list models and PyTorch references')
  t = p.add_argument_group('PyTorch side by side')
  t.add_argument('--torch_python', default='', help='interpreter with torch (and torchvision)')
  t.add_argument('--refinenet_pytorch', default='', help='checkout of DrSleep/refinenet-pytorch')
  t.add_argument('--light_weight_refinenet', default='',
                 help='checkout of DrSleep/light-weight-refinenet')
  t.add_argument('--pytorch_fcn', default='', help='checkout of wkentaro/pytorch-fcn')
  t.add_argument('--torch_threads', type=int, default=0, help='0: os.cpu_count()')
  t.add_argument('--torch_device', default='cpu', help="'cpu' or 'cuda'")
  t.add_argument('--torch_channels_last', type=int, default=1,
                 help='1: channels_last memory format (faster eager convolutions on CPU)')
  a = p.parse_args(argv)
  # what the CLI runs with (records carry `xla_flags`); a run that trains gets the training
  # flags for its inference too, as the CLI's training run does for its evaluations
  hardware.set_cpu_xla_flags(inference_only='train' not in a.modes)

  models = _csv(a.models)
  if a.list:
    for name in list_models():
      try:
        repo_key, ctor = torch_reference.resolve(name)
        ref = f'{torch_reference.REPOS.get(repo_key, "torchvision")}: {ctor}'
      except KeyError as e:  # NoReference too
        ref = (f'no reference: {e.args[0].split(",")[0]}'
               if isinstance(e, torch_reference.NoReference) else '-')
      print(f'{name:<28s} {ref}')
    return []
  for values, valid in ((a.modes, MODES), (a.parallel, PARALLEL), (a.dtypes, DTYPES)):
    bad = sorted(set(values) - set(valid))
    if bad:
      p.error(f'unknown {bad}; valid: {valid}')
  unknown = sorted(set(models) - set(list_models()))
  if unknown:
    p.error(f'unknown model(s) {unknown}; registered: {", ".join(list_models())}')
  repos = {k: getattr(a, k) for k in torch_reference.REPOS if getattr(a, k)}
  torch_notes = {}  # model -> why it gets no ratio; checked before any time is spent
  for name in models if a.torch_python else ():
    try:
      repo_key, _ = torch_reference.resolve(name)
    except KeyError as e:  # NoReference too
      torch_notes[name] = e.args[0]
      continue
    if repo_key and not os.path.isdir(repos.get(repo_key, '')):
      p.error(f'{name}: its PyTorch reference needs --{repo_key}=<checkout of '
              f'{torch_reference.REPOS[repo_key]}>')

  records = []
  for name in models:
    model_records = []
    for dtype in a.dtypes:
      for mode in a.modes:
        for parallel in a.parallel:
          r = run(name, size=a.size, batch=a.batch, dtype=dtype, mode=mode, parallel=parallel,
                  num_classes=a.num_classes, iters=a.iters, repeats=a.repeats,
                  warmup=a.warmup, num_devices=a.num_devices, peak_flops=a.peak_flops,
                  profile_dir=a.profile_dir and os.path.join(
                      a.profile_dir, f'{name}_{mode}_{dtype}_{parallel}'))
          print(json.dumps(r), flush=True)
          model_records.append(r)
    if name in torch_notes:
      print(f'{name}: no JAX/torch ratio: {torch_notes[name]}', flush=True)
      for r in model_records:
        r['torch_note'] = 'no reference'
    elif a.torch_python:
      torch_records = run_torch(
          name, torch_python=a.torch_python, repos=repos,
          inputs=make_inputs(a.batch, a.size, a.num_classes), modes=a.modes, dtypes=a.dtypes,
          num_classes=a.num_classes, iters=a.iters, repeats=a.repeats, warmup=a.warmup,
          threads=a.torch_threads or None, channels_last=bool(a.torch_channels_last),
          device=a.torch_device)
      for t_rec in torch_records:
        print(json.dumps(t_rec), flush=True)
      attach_torch(model_records, torch_records)
      for r in model_records:
        print(f'{name} {r["mode"]} {r["dtype"]} {r["parallel"]}: JAX/torch time per image '
              f'{r["time_ratio_jax_over_torch"]:.2f}x', flush=True)
    records += model_records
    if a.out:
      os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
      with open(a.out, 'a') as f:
        for r in model_records:
          f.write(json.dumps(r) + '\n')
  print(table(records, markdown=a.markdown))
  for r in records:
    if 'profile' in r:
      print(f'\n{r["model"]} {r["mode"]} {r["dtype"]} {r["parallel"]}: per step and device, '
            'summed instruction time (op_profile.py)')
      print(op_profile.coverage(r['profile'], r['step_s']['median']))
      for key in ('phase', 'component', 'phase_primitive'):
        print('\n' + op_profile.table(r['profile'], key))
  return records


if __name__ == '__main__':
  main()
