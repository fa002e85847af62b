"""What XLA says about a compiled program: FLOPs, bytes, memory, collectives.

Shared by the dry run (``dryrun.py``) and the throughput benchmark (``experiments/benchmark.py``).
Every number is per device: under ``jax.jit`` with shardings the compiled program is the
SPMD program one device runs.
"""
from __future__ import annotations

import re

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
                'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
                'c64': 8, 'c128': 16}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
               'collective-broadcast')
# '%name = TYPE opcode(...)', TYPE an array type or a tuple of them (TPU layouts hold parens)
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%[\w.-]+\s*=\s*(?P<type>.*?)\s+'
    r'(?P<op>' + '|'.join(COLLECTIVES) + r')(?P<suffix>-start)?\(', re.MULTILINE)
_ARRAY = re.compile(r'([a-z][a-z0-9]*)\[([0-9,]*)\]')


def cost(compiled) -> dict:
  """{'flops', 'bytes_accessed'} of one call (None where XLA reports nothing).

  ``cost_analysis()`` returned a list of per-module dicts in older jax and one dict now."""
  analysis = compiled.cost_analysis()
  entries = [e for e in (analysis if isinstance(analysis, (list, tuple)) else [analysis]) if e]
  out = {}
  for key, name in (('flops', 'flops'), ('bytes accessed', 'bytes_accessed')):
    total = sum(float(e.get(key, 0.0)) for e in entries)
    out[name] = total if total > 0 else None
  return out


def memory(compiled) -> dict:
  """XLA's static buffer assignment in bytes; ``total_bytes`` is what must fit on the device
  (arguments + outputs + temporaries - donated aliases + generated code)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  out = {f'{f}_bytes': int(getattr(stats, f'{f}_size_in_bytes', 0) or 0)
         for f in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  out['total_bytes'] = (out['argument_bytes'] + out['output_bytes'] + out['temp_bytes']
                        - out['alias_bytes'] + out['generated_code_bytes'])
  return out


def _array_bytes(type_text: str) -> list[int]:
  sizes = []
  for dtype, dims in _ARRAY.findall(type_text):
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    sizes.append(n * _DTYPE_BYTES.get(dtype, 4))
  return sizes


def collectives(hlo_text: str) -> dict:
  """{kind: {'count', 'bytes'}} over the compiled HLO: each collective instruction once
  (an async ``-start``/``-done`` pair is one), bytes = the data it produces.

  An async start's result tuple holds its operands and then its outputs (all-gather,
  collective-permute, ...); all-reduce-start holds only the reduced values.
  """
  out: dict[str, dict] = {}
  for m in _INSTRUCTION.finditer(hlo_text):
    sizes = _array_bytes(m['type'])
    if m['suffix'] and m['op'] != 'all-reduce' and m['type'].startswith('(') and len(sizes) > 1:
      sizes = sizes[len(sizes) // 2:]
    entry = out.setdefault(m['op'], {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += sum(sizes)
  return out
