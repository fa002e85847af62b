#!/usr/bin/env bash
# BENCHMARKS.md section 7: default XLA:CPU flags (A) against candidate flags (B), back to back,
# A B A B, so that drift of a shared machine shows up as A-vs-A spread. One JSON record per run
# appended to OUT (each with its `xla_flags`), and each run's table on the console.
#   bash experiments/xla_flags_ab.sh OUT.jsonl 'B_FLAGS' [benchmark.py arguments...]
# e.g. bash experiments/xla_flags_ab.sh runs/ab.jsonl \
#        --xla_cpu_experimental_ynn_fusion_type=-individual_convolution \
#        --models=refinenet_r101,fcn8s --modes=inference,train
# The interpreter is $PYTHON (default python): run it once per jax line.
set -euo pipefail
out=$1; flags_b=$2; shift 2
py=${PYTHON:-python}
{ lscpu | grep -E '^(Model name|CPU\(s\))'
  echo "ISA: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_tile' /proc/cpuinfo | sort -u | xargs)"
} | tee -a "$out.lscpu"
"$py" -c 'import jax, sys; print("python", sys.version.split()[0], "jax", jax.__version__)'
for round in 1 2; do
  for flags in "" "$flags_b"; do
    echo "== round $round, XLA_FLAGS='$flags'"
    XLA_FLAGS="$flags" "$py" -m experiments.benchmark --size=512 --batch=1 \
      --warmup=1 --iters=2 --repeats=3 --out="$out" "$@" | grep -v '^{'
  done
done
