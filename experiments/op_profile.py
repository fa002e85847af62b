"""Where a compiled step spends its time: a ``jax.profiler`` trace joined to the HLO's metadata.

XLA's runtime records one trace event per executed HLO instruction (``args.hlo_op``), named as in
the optimised HLO; that instruction's ``metadata.op_name`` carries the JAX name stack, e.g.
``jit(train_step)/transpose(jvp(RefineNet))/block1/crp/reduce_window_max``. Joining the two
attributes device time to a phase (forward, backward, the rest: loss reduction, optimizer),
a model component (the flax module path) and a primitive, which is what a TensorBoard op
profile shows but as plain data that a benchmark record and a test can hold.

Times are sums of per-instruction durations. On a CPU, XLA runs independent instructions on
several threads at once, so the sum exceeds wall time; shares are shares of that sum.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re

_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([a-z][\w\-]*)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$')
_OPERAND = re.compile(r'%([\w.\-]+)')
_SHAPE = re.compile(r'^[a-z]\w*\[([\d,]*)\]')
_DIM_LABELS = re.compile(r'dim_labels=(\w+)_(\w+)->(\w+)')
_LHS_DILATE = re.compile(r'lhs_dilate=([\dx]+)')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_OP_NAME = re.compile(r'metadata=\{[^}]*op_name="([^"]*)"')


def _dims(type_text: str):
  m = _SHAPE.match(type_text)
  return [int(d) for d in m.group(1).split(',') if d] if m else None


def _conv_flops(line: str, out_dims, operand_dims) -> float:
  """2 x output elements x the kernel taps that meet input (window x input features per group).

  Windows are counted dense, padding included. A window over a dilated input (``lhs_dilate``,
  how XLA:CPU rewrites a grouped convolution's weight gradient) meets input at one tap in
  ``dilation`` per dimension, so those taps are divided out.
  """
  labels = _DIM_LABELS.search(line)
  if not labels or out_dims is None or len(operand_dims) < 2 or operand_dims[1] is None:
    return 0.0
  taps = math.prod(size for label, size in zip(labels.group(2), operand_dims[1]) if label != 'o')
  dilation = _LHS_DILATE.search(line)
  if dilation:
    taps /= math.prod(int(d) for d in dilation.group(1).split('x'))
  return 2.0 * math.prod(out_dims) * taps


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str, bool, float]]:
  """{instruction: (opcode, JAX op_name, inherited, conv FLOPs)} from optimised HLO text
  (``compiled.as_text()``).

  A fusion gets its root's opcode, its root's op_name if it has none, and the FLOPs of the
  convolutions inside it. Instructions that XLA's passes create (on CPU the weight-gradient
  convolutions and the transposes feeding them) carry no metadata: they inherit the op_name of
  an operand, a backward one first, so that their time lands on the layer they serve
  (``inherited`` is then True). Unattributed ones get ''.
  """
  own, operands, calls, roots, dims, convs, computation = {}, {}, {}, {}, {}, [], None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode = m.group(1), m.group(2)
    op = _OP_NAME.search(line)
    op_name = op.group(1) if op and op.group(1).startswith('jit(') else ''  # not param names
    own[name] = (opcode, op_name)
    dims[name] = _dims(line[line.index('=') + 1:].lstrip())
    operands[name] = _OPERAND.findall(line[m.end():].split(')', 1)[0])
    if opcode == 'convolution':
      convs.append((name, computation, line))
    called = _CALLS.search(line)
    if called:
      calls[name] = called.group(1)
    if line.lstrip().startswith('ROOT ') and computation:
      roots[computation] = own[name]
  flops, computation_flops = collections.Counter(), collections.Counter()
  for name, comp, line in convs:
    f = _conv_flops(line, dims[name], [dims.get(o) for o in operands[name]])
    flops[name] += f
    computation_flops[comp] += f
  for name, computation in calls.items():
    root_opcode, root_op_name = roots.get(computation, (own[name][0], ''))
    own[name] = (root_opcode, own[name][1] or root_op_name)
    flops[name] += computation_flops[computation]

  resolved = {}

  def resolve(name, depth=0):
    if name not in resolved:
      op_name = own.get(name, ('', ''))[1]
      if not op_name and depth < 8:
        found = [f for f in (resolve(o, depth + 1) for o in operands.get(name, ())) if f]
        op_name = next((f for f in found if 'transpose(' in f), found[0] if found else '')
      resolved[name] = op_name
    return resolved[name]

  return {name: (opcode, resolve(name), not op_name and bool(resolve(name)), flops[name])
          for name, (opcode, op_name) in own.items()}


def trace_events(trace_dir: str, module_prefix: str = 'jit_') -> list[tuple[str, str, float]]:
  """[(device, hlo_op, microseconds)] of each executed instruction in the dir's newest trace."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}')
  with gzip.open(files[-1]) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  out = []
  for e in events:
    args = e.get('args') or {}
    if (e.get('ph') == 'X' and 'hlo_op' in args
        and str(args.get('hlo_module', '')).startswith(module_prefix)):
      out.append((str(args.get('device_ordinal', e.get('pid'))), args['hlo_op'],
                  float(e.get('dur', 0.0))))
  if not out:
    raise ValueError(f'{files[-1]} has no per-instruction events (hlo_op); was the step run '
                     'inside jax.profiler.trace?')
  return out


def _split(op_name: str, depth: int) -> tuple[str, str, str]:
  """(phase, component, primitive) of one op_name.

  'jit(f)/transpose(jvp(Model))/a/b/prim' is backward, 'jit(f)/jvp(Model)/...' and (inference)
  'jit(f)/Model/...' forward; the rest (loss reduction, optimizer) is 'other'.
  """
  parts = [p for p in op_name.split('/') if p]
  if parts and parts[0].startswith('jit('):
    parts = parts[1:]
  phase = 'other'
  if parts and (parts[0].startswith(('transpose(', 'jvp(')) or re.fullmatch(r'[A-Z]\w*',
                                                                            parts[0])):
    phase = 'backward' if parts[0].startswith('transpose(') else 'forward'
    parts = parts[1:]
  primitive = parts[-1] if parts else '?'
  primitive = re.sub(r'[.\d]+$', '', primitive) or primitive
  component = '/'.join(parts[:-1][:depth]) or '-'
  return phase, component, primitive


def breakdown(hlo_text: str, trace_dir: str, depth: int = 1, steps: int = 1) -> dict:
  """Microseconds per step and device by phase, component, primitive, HLO opcode and
  (phase, primitive), and the executed convolutions' FLOPs by phase and component.
  ``steps``: how many steps the trace holds."""
  instructions = hlo_instructions(hlo_text)
  totals = {k: collections.Counter() for k in ('phase', 'component', 'primitive', 'hlo',
                                               'phase_primitive', 'conv_flops_by_phase',
                                               'conv_flops_by_component')}
  events = trace_events(trace_dir)
  devices = len({d for d, _, _ in events})
  total = 0.0
  for _, op, us in events:
    opcode, op_name, inherited, flops = instructions.get(op, ('?', '', False, 0.0))
    if op_name:
      phase, component, primitive = _split(op_name, depth)
      if inherited:
        primitive = f'{opcode} (XLA-made)'
    else:
      phase, component, primitive = 'unattributed', '-', opcode
    us /= steps * devices
    flops /= steps * devices
    total += us
    if flops:
      totals['conv_flops_by_phase'][phase] += flops
      totals['conv_flops_by_component'][component] += flops
    totals['phase'][phase] += us
    totals['component'][component] += us
    totals['primitive'][primitive] += us
    totals['hlo'][opcode] += us
    totals['phase_primitive'][f'{phase}: {primitive}'] += us
  return {'total_us': total, 'steps': steps, 'devices': devices,
          **{k: dict(v.most_common()) for k, v in totals.items()}}


def coverage(b: dict, wall_s: float) -> str:
  """One line comparing the summed instruction time with the step's wall time.

  A trace event times an instruction from its start until its thunk returns. XLA:CPU runs some
  thunks asynchronously (on jax 0.12 its Eigen convolutions: the work goes to the intra-op
  pool), so their events hold only the launch and the instructions running beside them absorb
  the wait. A sum well below the wall time shows this, and then no share can be trusted."""
  share = b['total_us'] / (1e6 * wall_s)
  line = (f'summed instruction time {b["total_us"] / 1e3:.0f} ms per step against '
          f'{1e3 * wall_s:.0f} ms wall ({100 * share:.0f}%)')
  if share < 0.9:
    line += ('; WARNING: the trace misses work that ran asynchronously (XLA:CPU Eigen '
             'convolutions on jax 0.12): the breakdown below does not account for the step')
  return line


def table(b: dict, key: str, top: int = 12) -> str:
  """Markdown rows: name, ms per step, share of the summed instruction time; for 'phase' and
  'component' also the convolutions' GFLOP, their share and the rate they ran at."""
  flops = b.get(f'conv_flops_by_{key}')
  total_flops = sum(flops.values()) if flops else 0.0
  head = f'| {key} | ms/step | time share |'
  if flops is not None:
    head += ' conv GFLOP | FLOP share | GFLOP/s |'
  rows = [head, '|' + '---|' * (head.count('|') - 1)]
  items = list(b[key].items())
  shown = items[:top] + ([(f'(other {len(items) - top})', sum(us for _, us in items[top:]))]
                         if len(items) > top else [])
  rest = {n for n, _ in items[top:]}
  for name, us in shown:
    row = f'| {name} | {us / 1e3:.1f} | {100 * us / b["total_us"]:.1f}% |'
    if flops is not None:
      f = (sum(v for n, v in flops.items() if n in rest) if name.startswith('(other ')
           else flops.get(name, 0.0))
      share = f'{100 * f / total_flops:.1f}%' if total_flops else 'n/a'
      rate = f'{f / us / 1e3:.1f}' if us and f else '-'
      row += f' {f / 1e9:.1f} | {share} | {rate} |'
    rows.append(row)
  return '\n'.join(rows)
