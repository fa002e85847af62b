"""Published per-chip specs of accelerators: peak FLOP/s, HBM capacity and bandwidth.

Used for MFU (experiments/benchmark.py) and for the dry run's memory check and roofline
(refinenet_jax/dryrun.py). Numbers are the vendors' own, per chip, dense (no sparsity); units
as published (GB = 1e9 bytes, GiB = 2**30 bytes). A chip whose TensorCores show up as
separate JAX devices (TPU v3, v4 without megacore) shares these numbers among them.
"""
from __future__ import annotations

import dataclasses

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
