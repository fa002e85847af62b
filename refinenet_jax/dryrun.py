"""Pod dry run: compile the trainer's own train and eval steps for a TPU slice, from this host.

  python -m refinenet_jax.dryrun --topology=v5e:2x2 --config=configs/default.py \\
      --config.model=refinenet_r101 --config.num_classes=21 --config.compute_dtype=bfloat16 \\
      --config.crop_size=512,512 --batch_per_chip=8 [--max_batch] [--out=runs/dryrun.jsonl]

The topology's devices come from libtpu (``pip install -e '.[tpu]'``) through
``jax.experimental.topologies``: no TPU is needed, and a multi-host slice compiles from one
process. The mesh, state shardings, train step and eval step are the ones
``train.train_and_evaluate`` builds; only the arrays are abstract. Per device it reports XLA's
memory against the chip's HBM, FLOPs per step and per image, the collectives, a roofline lower
bound on the step time (``hardware.CHIPS``), and optionally the largest batch that fits, with
and without rematerialisation. ``--topology=cpu`` compiles the same steps for this host's CPU
devices, for comparison.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gzip
import hashlib
import importlib.metadata
import json
import math
import os
import re
import threading
import time

import jax
import numpy as np

from refinenet_jax import config_rules, hardware, optim, sharding, train, xla_stats
from refinenet_jax.data import datasets, transforms

DEFAULT_CACHE = os.path.join('~', '.cache', 'refinenet_jax')
_TOPOLOGY = re.compile(r'^(?P<kind>[a-z0-9]+):(?P<dims>\d+(?:x\d+)*)(?:_(?:un)?twisted)?$')


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  devices: tuple
  chips: int

  @property
  def devices_per_chip(self) -> int:
    return max(1, len(self.devices) // self.chips)

  @property
  def processes(self) -> int:
    return len({d.process_index for d in self.devices})


def topology(name: str) -> Topology:
  """A TPU topology from libtpu (e.g. 'v5e:2x2', 'v4:2x2x2', 'v5p:2x4x4'), or 'cpu' (this host).

  Chips are counted from the name (libtpu shows two-TensorCore chips without megacore, TPU v3
  and v4 here, as two devices each)."""
  if name == 'cpu':
    devices = tuple(jax.devices('cpu'))
    return Topology(name, devices, len(devices))
  m = _TOPOLOGY.match(name)
  if not m:
    raise ValueError(f'topology {name!r}: expected KIND:AxB[xC], e.g. v5e:2x2, v4:2x2x2, '
                     'v5p:2x4x4, v6e:4x4, or cpu')
  # a dry run holds libtpu only while compiling; let it share the machine with another one
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(topology_name=name, platform='tpu')
  except Exception as e:  # no libtpu, or a name libtpu refuses
    raise RuntimeError(f'cannot get TPU topology {name!r} ({type(e).__name__}: {e}). The dry '
                       "run needs libtpu: pip install -e '.[tpu]'") from e
  return Topology(name, tuple(desc.devices), math.prod(int(d) for d in m['dims'].split('x')))


def _example(crop, fill, ignore_label):
  """One training example as the pipeline yields it (keys, shapes, dtypes)."""
  blank = {'image': np.zeros((*crop, 3), np.uint8), 'label': np.zeros(crop, np.uint8)}
  augment = transforms.TrainAugment(crop_size=crop, scale_range=(1.0, 1.0), flip=False,
                                    fill=fill, ignore_label=ignore_label)
  return augment(blank, np.random.default_rng(0))


def _abstract_batch(example: dict, batch: int, mesh) -> dict:
  sh = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((batch, *np.shape(v)), np.asarray(v).dtype, sharding=sh)
          for k, v in example.items()}


def programs(config, topo: Topology, batch_per_device: int,
             eval_batch_per_device: int | None = None) -> dict:
  """{'train': (jitted step, abstract args), 'eval': ...} for ``config`` on ``topo``'s devices,
  built by the trainer's own functions. The eval bucket is ``config.eval_size`` or the crop."""
  config_rules.check(config)
  model = train.build_model(config)
  mesh = sharding.make_mesh(config.mesh, topo.devices)
  batch = batch_per_device * mesh.size
  sharding.check_batch_size(batch, mesh, all_devices=topo.devices)
  ignore_label = int(datasets.BUILDERS[config.dataset].IGNORE_LABEL)
  crop = tuple(config.crop_size) if config.crop_size else (config.image_size,) * 2
  fill = transforms.fill_value(model.normalization)
  state = sharding.abstract_train_state(
      jax.random.key(config.seed), model=model, tx=optim.make_optimizer(config),
      input_shape=(1, *crop, 3), mesh=mesh, rules=config.sharding_rules)
  state_sh = sharding.shardings_of(state)
  out = {'train': (train.make_train_step(config, model, mesh, state_sh, ignore_label),
                   (state, _abstract_batch(_example(crop, fill, ignore_label), batch, mesh)))}
  if eval_batch_per_device:
    eval_size = tuple(config.eval_size) if config.eval_size else crop
    pad = transforms.EvalPad(size=eval_size, fill=fill, ignore_label=ignore_label)
    eval_batch = eval_batch_per_device * mesh.size
    sharding.check_batch_size(eval_batch, mesh, 'eval batch size', all_devices=topo.devices)
    eval_step = train.make_eval_step(config, model, config.num_classes, ignore_label)
    out['eval'] = (eval_step, (state, _abstract_batch(pad.blank(), eval_batch, mesh)))
  return out


@contextlib.contextmanager
def _progress(label: str, every: float = 30.0):
  """Prints ``label`` now and a line every ``every`` seconds until the block ends."""
  print(f'{label} ...', flush=True)
  done = threading.Event()
  t0 = time.perf_counter()

  def tick():
    while not done.wait(every):
      print(f'  ... still compiling ({time.perf_counter() - t0:.0f} s)', flush=True)
  thread = threading.Thread(target=tick, daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


class OutOfMemory(RuntimeError):
  """The compiler found that the program does not fit in the device's memory."""


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text


def _fingerprint(lowered, args) -> str:
  """What decides the compiled program: the lowered module, the devices it is placed on, and
  the compiler (jax, jaxlib, libtpu versions and their flags)."""
  sharding_ = next(a.sharding for a in jax.tree.leaves(args) if getattr(a, 'sharding', None))
  devices = sorted(sharding_.device_set, key=lambda d: d.id)
  versions = []
  for dist in ('jax', 'jaxlib', 'libtpu'):
    try:
      versions.append(f'{dist}=={importlib.metadata.version(dist)}')
    except importlib.metadata.PackageNotFoundError:
      pass
  h = hashlib.sha256()
  for part in (lowered.as_text(), *versions, os.environ.get('XLA_FLAGS', ''),
               os.environ.get('LIBTPU_INIT_ARGS', ''),
               *(f'{d.id}:{d.process_index}:{d.platform}:{d.device_kind}:'
                 f'{getattr(d, "coords", "")}:{getattr(d, "core_on_chip", "")}' for d in devices)):
    h.update(part.encode())
    h.update(b'\0')
  return h.hexdigest()


def compile_stats(jitted, args, label: str = 'compiling', cache_dir: str | None = None) -> dict:
  """Lowers and compiles; XLA's per-device memory, cost and collectives, and the times.

  With ``cache_dir``, the results (and the compiled HLO, from which the collectives are
  counted again) are kept per program fingerprint, so an unchanged program is not compiled
  again: XLA's own persistent cache cannot load executables compiled for a topology's devices.
  Raises :class:`OutOfMemory` when the program does not fit (a cached verdict too)."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - t0
  entry = hlo_path = None
  if cache_dir:
    directory = os.path.join(os.path.expanduser(cache_dir), 'dryrun')
    entry = os.path.join(directory, _fingerprint(lowered, args) + '.json')
    hlo_path = entry[:-len('.json')] + '.hlo.gz'
    if os.path.exists(entry):
      with open(entry) as f:
        stats = json.load(f)
      print(f'{label}: compiled before ({stats["compiled_at"]}, {stats["compile_s"]:.0f} s); '
            f'results from {entry}', flush=True)
      if stats.get('out_of_memory'):
        raise OutOfMemory(stats['out_of_memory'])
      with gzip.open(hlo_path, 'rt') as f:
        stats['collectives'] = xla_stats.collectives(f.read())
      return {**stats, 'lower_s': lower_s, 'cached': True}
  with _progress(label):
    t1 = time.perf_counter()
    try:
      compiled = lowered.compile()
      error = None
    except Exception as e:  # noqa: BLE001 - only out-of-memory is an answer
      if not _is_out_of_memory(e):
        raise
      error = str(e).splitlines()[0][:500]
    compile_s = time.perf_counter() - t1
  stats = {'compile_s': compile_s, 'compiled_at': datetime.datetime.now(
      datetime.timezone.utc).isoformat(timespec='seconds')}
  if error is None:
    hlo = compiled.as_text()
    stats.update(memory=xla_stats.memory(compiled), **xla_stats.cost(compiled))
  else:
    stats['out_of_memory'] = error
  if entry:
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    if error is None:
      _write_atomically(hlo_path, lambda f: f.write(gzip.compress(hlo.encode())))
    _write_atomically(entry, lambda f: f.write(json.dumps(stats).encode()))
  if error is not None:
    raise OutOfMemory(error)
  return {**stats, 'lower_s': lower_s, 'cached': False,
          'collectives': xla_stats.collectives(hlo)}


def _write_atomically(path: str, write) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    write(f)
  os.replace(tmp, path)


def roofline(stats: dict, chip: hardware.Chip | None, devices_per_chip: int, dtype: str,
             images_per_device: int) -> dict:
  """Lower bound on the step time from peak FLOP/s and HBM bandwidth (collectives and
  everything else assumed free), and the images/s per chip it allows."""
  if chip is None or not stats.get('flops'):
    return {}
  peak = chip.peak_flops[dtype] / devices_per_chip
  bandwidth = chip.hbm_bytes_per_s / devices_per_chip
  compute_s = stats['flops'] / peak
  memory_s = (stats.get('bytes_accessed') or 0.0) / bandwidth
  step_s = max(compute_s, memory_s)
  return {'compute_s': compute_s, 'hbm_s': memory_s, 'step_s': step_s,
          'bound': 'compute' if compute_s >= memory_s else 'HBM bandwidth',
          'images_per_s_per_chip': images_per_device * devices_per_chip / step_s}


def fits(stats: dict, hbm_per_device: int | None) -> bool | None:
  if hbm_per_device is None or 'total_bytes' not in stats['memory']:
    return None
  return stats['memory']['total_bytes'] <= hbm_per_device


def largest_batch(config, topo: Topology, hbm_per_device: int, start: int = 8,
                  limit: int = 1024, cache_dir: str | None = None) -> dict:
  """The largest per-device train batch whose compiled step fits in HBM (XLA's static
  estimate; a compile that runs out of memory does not fit), in few compiles: memory grows
  about linearly with the batch, so once two compiles report it, the next probe is the batch
  their line predicts (then its neighbour, to confirm); before that, doubling from ``start``,
  and bisection where the prediction is not inside the bracket.
  Returns {'batch', 'memory' of that batch, 'compiles': [[batch, fits], ...]}."""
  tried: dict[int, tuple[bool, dict | None]] = {}

  def try_batch(b):
    jitted, args = programs(config, topo, b)['train']
    try:
      stats = compile_stats(jitted, args, f'  batch {b} per device', cache_dir)
      tried[b] = (bool(fits(stats, hbm_per_device)), stats)
    except OutOfMemory:
      tried[b] = (False, None)
    print(f'  batch {b} per device: {"fits" if tried[b][0] else "does not fit"}', flush=True)
    return tried[b][0]

  def predict():
    points = sorted((b, st['memory']['total_bytes']) for b, (_, st) in tried.items()
                    if st and 'total_bytes' in st['memory'])
    if len(points) < 2:
      return None
    (b0, m0), (b1, m1) = points[-2:]
    if m1 <= m0:
      return None
    return int((hbm_per_device - m0) // ((m1 - m0) / (b1 - b0))) + b0

  lo, hi, b = 0, None, max(1, min(start, limit))  # lo fits (0: none found), hi does not
  while True:
    if try_batch(b):
      lo = b
    else:
      hi = b
    if (hi is not None and hi - lo <= 1) or (hi is None and lo >= limit):
      break
    guess = predict()
    if hi is None:
      b = min(limit, lo + 1 if guess is not None and guess <= lo else (guess or 2 * lo))
    else:
      b = guess if guess is not None and lo < guess < hi else (lo + hi) // 2
      b = min(max(b, lo + 1), hi - 1)  # a guess of lo itself: confirm with lo + 1
  return {'batch': lo, 'limit': limit, 'reached_limit': hi is None,
          'memory': tried[lo][1]['memory'] if lo else None,
          'compiles': [[b, ok] for b, (ok, _) in tried.items()]}


def run(config, topology_name: str, batch_per_chip: int = 8,
        eval_batch_per_chip: int | None = None, max_batch: bool = False,
        max_batch_limit: int = 1024, cache_dir: str | None = None) -> dict:
  """The dry run of ``config`` on a topology; returns its JSON-serialisable record.

  Batches are per chip (split over its devices where a chip shows as several); the eval step
  is compiled with ``eval_batch_per_chip`` (default: the train batch; 0: no eval step)."""
  topo = topology(topology_name)
  device = topo.devices[0]
  chip = hardware.chip_for(device.device_kind)
  per_chip = topo.devices_per_chip
  hbm = chip.hbm_bytes // per_chip if chip else None
  dtype = config.compute_dtype
  eval_batch_per_chip = batch_per_chip if eval_batch_per_chip is None else eval_batch_per_chip
  for what, b in (('batch_per_chip', batch_per_chip), ('eval_batch_per_chip',
                                                       eval_batch_per_chip)):
    if b < 0 or b % per_chip or (what == 'batch_per_chip' and b == 0):
      raise ValueError(f'{what}={b}: must be a positive multiple of the {per_chip} devices per '
                       f'{device.device_kind} chip')
  progs = programs(config, topo, batch_per_chip // per_chip, eval_batch_per_chip // per_chip)
  n = progs['train'][1][1]['image'].sharding.mesh.size  # devices in the mesh
  record = {
      'topology': topology_name, 'device_kind': device.device_kind, 'platform': device.platform,
      'devices': n, 'chips': n // per_chip, 'devices_per_chip': per_chip,
      'processes': topo.processes, 'model': config.model, 'dtype': dtype,
      'num_classes': config.num_classes, 'model_overrides': config.model_overrides.to_dict(),
      'crop': list(progs['train'][1][1]['image'].shape[1:3]),
      'batch_per_chip': batch_per_chip, 'global_batch': batch_per_chip * n // per_chip,
      'hbm_bytes_per_device': hbm, 'chip': dataclasses.asdict(chip) if chip else None,
      'jax_version': jax.__version__, 'host_cpus': os.cpu_count(),
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
  for name, (jitted, args) in progs.items():
    b = args[1]['image'].shape[0] // n
    stats = compile_stats(jitted, args, f'{name} step: {config.model} on {topology_name} '
                                        f'({n} devices, {b} images each)', cache_dir)
    stats['images_per_device'] = b
    if stats.get('flops'):
      stats['flops_per_image'] = stats['flops'] / b
    stats['fits'] = fits(stats, hbm)
    stats['roofline'] = roofline(stats, chip, per_chip, dtype, b)
    record[name] = stats
    print(summary(name, stats, hbm), flush=True)
  if max_batch:
    if hbm is None:
      raise ValueError(f'no HBM size for {device.device_kind!r} in hardware.CHIPS')
    record['max_batch'] = {}
    for remat in (False, True):
      c = config.copy_and_resolve_references()
      with c.unlocked():
        c.model_overrides.remat = remat
      try:
        train.build_model(c)
      except TypeError as e:  # a model without a remat field (FCN-VGG)
        record['max_batch']['remat' if remat else 'no_remat'] = {'error': str(e)}
        continue
      print(f'largest batch per device, remat={remat}:', flush=True)
      record['max_batch']['remat' if remat else 'no_remat'] = largest_batch(
          c, topo, hbm, max(1, batch_per_chip // per_chip), max_batch_limit, cache_dir)
  return record


def _gib(x):
  return 'n/a' if x is None else f'{x / 2**30:.2f}'


def summary(name: str, stats: dict, hbm: int | None) -> str:
  mem = stats['memory']
  total = mem.get('total_bytes')
  share = f' = {100 * total / hbm:.0f}% of {_gib(hbm)} GiB HBM' if hbm and total else ''
  coll = ', '.join(f'{v["count"]} {k} ({v["bytes"] / 2**20:.1f} MiB)'
                   for k, v in sorted(stats['collectives'].items())) or 'none'
  roof = stats.get('roofline') or {}
  when = ' (an earlier compile, same program)' if stats.get('cached') else ''
  lines = [f'{name}: compiled in {stats["compile_s"]:.1f} s{when} (lowered in '
           f'{stats["lower_s"]:.1f} s)',
           f'  memory per device: arguments {_gib(mem.get("argument_bytes"))} + outputs '
           f'{_gib(mem.get("output_bytes"))} + temporaries {_gib(mem.get("temp_bytes"))} - '
           f'aliased {_gib(mem.get("alias_bytes"))} GiB -> {_gib(total)} GiB{share}',
           f'  FLOPs per image: {_fmt(stats.get("flops_per_image"), 1e9, "GFLOP")}; '
           f'collectives per step: {coll}']
  if roof:
    lines.append(f'  roofline: {roof["images_per_s_per_chip"]:.1f} img/s per chip at most '
                 f'({roof["bound"]} bound, step >= {1e3 * roof["step_s"]:.1f} ms)')
  return '\n'.join(lines)


def _fmt(x, scale, unit):
  return 'n/a' if x is None else f'{x / scale:,.1f} {unit}'


COLUMNS = ('model', 'topology', 'chips (hosts)', 'dtype', 'crop', 'batch/chip', 'step',
           'memory/chip GiB (% HBM)', 'GFLOP/img', 'roofline img/s/chip', 'all-reduce count',
           'all-reduce MiB', 'compile s')


def table(records: list[dict]) -> str:
  """Markdown rows, one per compiled step (what BENCHMARKS.md shows)."""
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  for r in records:
    per_chip = r['devices_per_chip']
    for step in ('train', 'eval'):
      if step not in r:
        continue
      s = r[step]
      total = s['memory'].get('total_bytes')
      hbm = r['hbm_bytes_per_device']
      mem = 'n/a' if total is None else (
          f'{total * per_chip / 2**30:.2f}' + (f' ({100 * total / hbm:.0f}%)' if hbm else ''))
      ar = s['collectives'].get('all-reduce', {'count': 0, 'bytes': 0})
      roof = s.get('roofline') or {}
      lines.append('| ' + ' | '.join([
          r['model'], r['topology'], f'{r["chips"]} ({r["processes"]})', r['dtype'],
          'x'.join(map(str, r['crop'])), str(s['images_per_device'] * per_chip), step, mem,
          _fmt(s.get('flops_per_image'), 1e9, '').strip(),
          f'{roof["images_per_s_per_chip"]:.1f}' if roof else 'n/a', str(ar['count']),
          f'{ar["bytes"] / 2**20:.1f}', f'{s["compile_s"]:.0f}']) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  from absl import app, flags, logging

  from refinenet_jax import config_flag
  config = config_flag.define('config', 'experiment config file (as for refinenet_jax.main)')
  topologies = flags.DEFINE_list('topology', ['v5e:2x2'], 'TPU topologies (libtpu names, e.g. '
                                 'v5e:2x2, v4:2x2x2, v5p:2x4x4, v6e:4x4) or cpu')
  batch = flags.DEFINE_integer('batch_per_chip', 8, 'train images per chip')
  eval_batch = flags.DEFINE_integer('eval_batch_per_chip', None,
                                    'eval images per chip (default: as train; 0: no eval step)')
  max_batch = flags.DEFINE_bool('max_batch', False, 'also search the largest train batch per '
                                'chip that fits, without and with remat (many compiles)')
  limit = flags.DEFINE_integer('max_batch_limit', 1024, 'stop the search at this batch per chip')
  out = flags.DEFINE_string('out', '', 'append the JSON records to this file')
  report = flags.DEFINE_string('report', '', 'print the table of the records in this JSON-lines '
                               'file (written by --out) and exit: nothing is compiled')
  cache = flags.DEFINE_string('cache_dir', DEFAULT_CACHE, 'keeps each compiled program\'s '
                              "results by its fingerprint, so an unchanged one is not compiled "
                              "again ('' = off)")

  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f'unexpected arguments: {args[1:]}')
    if not flags.FLAGS['verbosity'].present:  # jax's INFO lines about the absent TPU backend
      logging.set_verbosity(logging.WARNING)
    if report.value:
      with open(report.value) as f:
        print(table([json.loads(line) for line in f if line.strip()]))
      return
    for name in topologies.value:  # bad names and a missing libtpu fail before any compile
      try:
        topology(name)
      except (ValueError, RuntimeError) as e:
        raise app.UsageError(str(e)) from None
    records = []
    for name in topologies.value:
      record = run(config.value, name, batch.value, eval_batch.value, max_batch.value,
                   limit.value, cache.value)
      records.append(record)
      if out.value:
        os.makedirs(os.path.dirname(os.path.abspath(out.value)), exist_ok=True)
        with open(out.value, 'a') as f:
          f.write(json.dumps(record) + '\n')
      for key, found in record.get('max_batch', {}).items():
        print(f'largest batch per chip ({key}): ' + (
            found['error'] if 'error' in found else
            f'{found["batch"] * record["devices_per_chip"]}'
            + (' (the search limit)' if found['reached_limit'] else '')), flush=True)
    print(table(records))

  app.run(_main, argv)


if __name__ == '__main__':
  main()
