#!/usr/bin/env bash
# BENCHMARKS.md section 7: XLA:CPU flags A (default: none, i.e. the library's choice,
# refinenet_jax.hardware.set_cpu_xla_flags) against candidate flags B, back to back, A B A B, so
# that drift of a shared machine shows up as A-vs-A spread. One JSON record per run appended to
# OUT (each with the `xla_flags` it ran with), and each run's table on the console.
#   [A_FLAGS='...'] bash experiments/xla_flags_ab.sh OUT.jsonl 'B_FLAGS' [benchmark.py args...]
# e.g. YNNPACK against Eigen convolutions (XLA's default against the library's on jax 0.12):
#   A_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution \
#   bash experiments/xla_flags_ab.sh runs/ab.jsonl \
#     --xla_cpu_experimental_ynn_fusion_type=-individual_convolution \
#     --models=refinenet_r101,lw_refinenet_r50,fcn8s --modes=inference,train
# The interpreter is $PYTHON (default python): run it once per jax line.
set -euo pipefail
out=$1; flags_b=$2; shift 2
flags_a=${A_FLAGS:-}
py=${PYTHON:-python}
{ lscpu | grep -E '^(Model name|CPU\(s\))'
  echo "ISA: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_tile' /proc/cpuinfo | sort -u | xargs)"
} | tee -a "$out.lscpu"
"$py" -c 'import jax, sys; print("python", sys.version.split()[0], "jax", jax.__version__)'
for round in 1 2; do
  for flags in "$flags_a" "$flags_b"; do
    echo "== round $round, XLA_FLAGS='$flags'"
    XLA_FLAGS="$flags" "$py" -m experiments.benchmark --size=512 --batch=1 \
      --warmup=1 --iters=2 --repeats=3 --out="$out" "$@" | grep -v '^{'
  done
done
