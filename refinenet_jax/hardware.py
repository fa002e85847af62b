"""Published per-chip specs of accelerators, and the XLA:CPU flags measured per CPU.

Used for MFU (experiments/benchmark.py) and for the dry run's memory check and roofline
(refinenet_jax/dryrun.py); the CLI and the benchmark call ``set_cpu_xla_flags``. Numbers are
the vendors' own, per chip, dense (no sparsity); units as published (GB = 1e9 bytes, GiB =
2**30 bytes). A chip whose TensorCores show up as
separate JAX devices (TPU v3, v4 without megacore) shares these numbers among them.
"""
from __future__ import annotations

import dataclasses
import os
import platform

GB, GIB = 10**9, 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  kinds: tuple  # substrings of jax Device.device_kind (the first chip that matches wins)
  name: str
  peak_flops: dict  # compute dtype -> dense FLOP/s per chip
  hbm_bytes: int
  hbm_bytes_per_s: float
  source: str


def _tpu(kinds, name, bf16_tflops, hbm_bytes, hbm_gb_per_s, source):
  # float32 matmuls and convolutions run as bf16 passes at JAX's default precision on TPU
  peak = bf16_tflops * 1e12
  return Chip(kinds, name, {'bfloat16': peak, 'float32': peak}, hbm_bytes, hbm_gb_per_s * GB,
              source)


CHIPS = (
    # NVIDIA datasheets give sparse (2:4) rates; dense is half. float32 is the TF32 rate: XLA
    # runs float32 convolutions and matmuls in TF32 at JAX's default precision.
    Chip(('H200',), 'NVIDIA H200 SXM', {'bfloat16': 989e12, 'float32': 494.5e12}, 141 * GB,
         4.8e12, 'NVIDIA H200 datasheet: BF16 1,979 / TF32 989 TFLOPS sparse; 141 GB, 4.8 TB/s'),
    Chip(('H100 PCIe',), 'NVIDIA H100 PCIe', {'bfloat16': 756.5e12, 'float32': 378e12}, 80 * GB,
         2.0e12, 'NVIDIA H100 datasheet (PCIe): BF16 1,513 / TF32 756 TFLOPS sparse; 2.0 TB/s'),
    Chip(('H100',), 'NVIDIA H100 SXM5', {'bfloat16': 989e12, 'float32': 494.5e12}, 80 * GB,
         3.35e12, 'NVIDIA H100 datasheet (SXM): BF16 1,979 / TF32 989 TFLOPS sparse; 3.35 TB/s'),
    Chip(('A100',), 'NVIDIA A100 80GB SXM', {'bfloat16': 312e12, 'float32': 156e12}, 80 * GB,
         2.039e12, 'NVIDIA A100 datasheet: BF16 312 / TF32 156 TFLOPS dense; 2,039 GB/s'),
    _tpu(('TPU v3',), 'TPU v3', 123, 32 * GIB, 900,
         'cloud.google.com/tpu/docs/v3: 123 TFLOPS bf16, 32 GiB HBM2, 900 GBps per chip'),
    _tpu(('TPU v4',), 'TPU v4', 275, 32 * GIB, 1200,
         'cloud.google.com/tpu/docs/v4: 275 TFLOPS bf16, 32 GiB HBM2, 1200 GBps per chip'),
    _tpu(('TPU v5 lite', 'TPU v5e'), 'TPU v5e', 197, 16 * GB, 819,
         'cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16, 16 GB HBM2, 819 GBps per chip'),
    _tpu(('TPU v5',), 'TPU v5p', 459, 95 * GB, 2765,
         'cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16, 95 GB HBM2e, 2765 GBps per chip'),
    _tpu(('TPU v6 lite',), 'TPU v6e', 918, 32 * GB, 1638,
         'cloud.google.com/tpu/docs/v6e: 918 TFLOPS bf16, 32 GB HBM, 1638 GBps per chip'),
)


def chip_for(device_kind: str) -> Chip | None:
  """The CHIPS entry for a JAX ``device_kind`` (e.g. 'TPU v5 lite'), or None (CPUs)."""
  for chip in CHIPS:
    if any(kind.lower() in device_kind.lower() for kind in chip.kinds):
      return chip
  return None


# XLA:CPU sends every convolution and its gradients to YNNPACK by default; this flag sends them to
# XLA's Eigen convolutions instead. BENCHMARKS.md section 7: with jax 0.12 Eigen trained
# RefineNet-101, LW-RefineNet-50 and FCN-8s 1.2-2.5x faster on an AVX2 and an AVX-512 EPYC, and
# ran their inference faster or (FCN-8s on AVX2) as fast; with jax 0.10.2 it won every program
# on the AVX2 EPYC but was mixed on the AVX-512 one (RefineNet-101 3-7% slower). It is set only
# where that was measured: the flag is experimental (XLA aborts at start-up on a flag it does not
# know, so another jax line is left alone), and CPUs with AMX and non-x86 CPUs were not measured.
CPU_CONV_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
# Even so, YNNPACK's "reduce" fusions still take a chain of convolutions ending in a max pool
# (FCN-8s's forward); processes that only run inference leave those out too: FCN-8s inference
# 1.6x faster, while training steps lost 10-18% without YNNPACK's reductions (section 7).
CPU_INFERENCE_FLAG = f'{CPU_CONV_FLAG},-reduce'
# jax line (version prefix) -> the CPU features that keep the flag off on it.
CPU_CONV_JAX = {'0.12.': frozenset(), '0.10.': frozenset({'avx512f'})}


def cpu_xla_flags(xla_flags: str, jax_version: str, machine: str,
                  cpu_flags: frozenset | None, inference_only: bool = False) -> str:
  """``xla_flags`` with CPU_CONV_FLAG (CPU_INFERENCE_FLAG for a process that never trains)
  added where it was measured faster, else unchanged.

  A user's own ``xla_cpu_experimental_ynn_fusion_type`` wins; ``cpu_flags`` None (unknown CPU
  features) counts as unmeasured.
  """
  ruled_out = next((v for k, v in CPU_CONV_JAX.items() if jax_version.startswith(k)), None)
  if ('xla_cpu_experimental_ynn_fusion_type' in xla_flags or ruled_out is None
      or machine.lower() not in ('x86_64', 'amd64') or cpu_flags is None
      or cpu_flags & (ruled_out | {'amx_tile'})):
    return xla_flags
  return f'{xla_flags} {CPU_INFERENCE_FLAG if inference_only else CPU_CONV_FLAG}'.strip()


def _linux_cpu_flags() -> frozenset | None:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          return frozenset(line.split(':', 1)[1].split())
  except OSError:
    pass
  return None


def set_cpu_xla_flags(environ=os.environ, inference_only: bool = False) -> bool:
  """Puts ``cpu_xla_flags`` into ``environ['XLA_FLAGS']``; True if that changed it.

  For entry points (the CLI, the benchmark; a notebook's first cell): XLA reads the variable
  once, when JAX starts its first backend, so after that nothing is changed (a changed variable
  would misreport what runs).
  """
  import jax  # noqa: PLC0415  (this module is otherwise plain data)
  from jax._src import xla_bridge  # noqa: PLC0415
  if xla_bridge.backends_are_initialized():
    return False
  old = environ.get('XLA_FLAGS', '')
  new = cpu_xla_flags(old, jax.__version__, platform.machine(), _linux_cpu_flags(),
                      inference_only)
  if new == old:
    return False
  environ['XLA_FLAGS'] = new
  return True
