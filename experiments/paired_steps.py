"""Paired A/B of the library's per-backend switches on one train (or inference) step.

  python -m experiments.paired_steps --model=lw_refinenet_r50 --size=512 --rounds=7 \\
      --variant='xla pool gradient:COMPARE_POOL_GRAD_BACKENDS=' --variant='library:'

On a shared CPU host the same program's speed drifts by 10% and more between runs minutes
apart, so separate benchmark runs cannot show a 5-10% change. Here every variant is compiled in
one process (each traced with its ``refinenet_jax.models.layers`` switches set: backend-name
tuples such as ``COMPARE_POOL_GRAD_BACKENDS`` or ``SPLIT_GROUPED_CONV_BACKENDS``), then their
steps alternate, one of each per round, the starting variant rotating from round to round. The
report is each variant's median step and, against the first variant, the median of the
per-round differences and how many rounds it was faster. A variant is ``NAME:ATTR=a,b;ATTR=``
(an empty value: no backend). Train steps are the benchmark's (``benchmark.make_step``),
donated state carried from step to step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from experiments import benchmark
from refinenet_jax import hardware, sharding, xla_stats
from refinenet_jax.models import layers


def parse_variant(text: str) -> tuple[str, dict[str, tuple[str, ...]]]:
  """'NAME:ATTR=a,b;ATTR2=' -> (NAME, {ATTR: ('a', 'b'), ATTR2: ()}); ATTR must be one of
  layers' backend tuples."""
  name, sep, spec = text.partition(':')
  if not sep or not name:
    raise ValueError(f'variant {text!r}: expected NAME:ATTR=backends;... (NAME: alone is the '
                     f'library as it is)')
  settings = {}
  for item in filter(None, spec.split(';')):
    attr, eq, value = item.partition('=')
    if not (eq and attr.endswith('_BACKENDS') and isinstance(getattr(layers, attr, None), tuple)):
      raise ValueError(f'variant {name!r}: {attr!r} is not a backend tuple of '
                       f'refinenet_jax.models.layers')
    settings[attr] = tuple(filter(None, value.split(',')))
  return name, settings


def compile_variants(s, mode: str, variants: dict, args) -> dict:
  """{name: compiled step}, each traced with its layers settings (restored afterwards)."""
  out = {}
  for name, settings in variants.items():
    saved = {attr: getattr(layers, attr) for attr in settings}
    try:
      for attr, value in settings.items():
        setattr(layers, attr, value)
      out[name] = benchmark.make_step(s, mode, 'jit').lower(*args).compile()
    finally:
      for attr, value in saved.items():
        setattr(layers, attr, value)
  return out


def alternate(compiled: dict, args: list, mode: str, rounds: int) -> dict[str, list[float]]:
  """Seconds per step of each variant, one step of each per round, the order rotated."""
  names = list(compiled)

  def step(name):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled[name](*args))
    if mode == 'train':
      args[0] = out[0]  # the donated state is consumed; continue from the new one
    return time.perf_counter() - t0

  for name in names:  # one untimed step each
    step(name)
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name].append(step(name))
  return times


def summary(times: dict[str, list[float]]) -> dict[str, dict]:
  """Per variant: median step s, and against the first variant the paired median saving."""
  base_name, *_ = times
  base = times[base_name]
  out = {}
  for name, t in times.items():
    saved = [b - x for b, x in zip(base, t)]
    out[name] = {'median_step_s': statistics.median(t), 'min_step_s': min(t),
                 f'saved_vs_{base_name}_s': statistics.median(saved),
                 f'rounds_faster_than_{base_name}': sum(d > 0 for d in saved)}
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', required=True)
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--mode', default='train', choices=benchmark.MODES)
  p.add_argument('--num_devices', type=int, default=-1, help='-1: all local devices')
  p.add_argument('--rounds', type=int, default=7)
  p.add_argument('--variant', action='append', required=True,
                 help="NAME:ATTR=backends;... (at least two; the first is the baseline)")
  a = p.parse_args(argv)
  variants = dict(map(parse_variant, a.variant))
  if len(variants) < 2 or len(variants) < len(a.variant):
    raise SystemExit('give at least two variants, each with its own name')
  hardware.set_cpu_xla_flags(inference_only=a.mode != 'train')
  s = benchmark.setup(a.model, size=(a.size, a.size), num_devices=a.num_devices)
  sharding.check_batch_size(a.batch, s.mesh)
  args = benchmark.step_args(s, a.mode, a.batch, (a.size, a.size))
  compiled = compile_variants(s, a.mode, variants, args)
  memory = {n: xla_stats.memory(c)['total_bytes'] for n, c in compiled.items()}
  result = summary(alternate(compiled, args, a.mode, a.rounds))
  print(f'{a.model} {a.mode} at {a.size}x{a.size}, batch {a.batch}, jax {jax.__version__}, '
        f'{a.rounds} rounds')
  for name, r in result.items():
    r['xla_mem_MiB'] = memory[name] / 2**20  # the benchmark table's "XLA mem"
    print(json.dumps({'variant': name, 'settings': variants[name], **r}))
  return result


if __name__ == '__main__':
  main()
