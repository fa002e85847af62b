#!/usr/bin/env bash
# BENCHMARKS.md section 5: the pod dry-run rows (needs the tpu extra). Each compile takes
# minutes to half an hour on 2 cores; an unchanged program's results are reused
# (--cache_dir), so a re-run or an interrupted --max_batch search goes on where it stopped.
#   bash experiments/pod_dryrun.sh [runs/pod_dryrun.jsonl]
set -euo pipefail
out=${1:-runs/pod_dryrun.jsonl}
common=(--config.crop_size=512,512 --config.compute_dtype=bfloat16 --config.eval_size=512,512
        '--config.eval_scales=(1.0,)' '--config.eval_window=()' --batch_per_chip=8 --out="$out")
dry() { python -m refinenet_jax.dryrun "$@" "${common[@]}"; }  # --config first
# one single-host slice (v5e: 4 chips, 1 host) for every reference model
dry --topology=v5e:2x2 --config=configs/refinenet_r101_voc.py
dry --topology=v5e:2x2 --config=configs/lw_refinenet_r50_voc.py
# fcn8s_voc's recipe trains on 1 device; the dry run spreads it over the slice
dry --topology=v5e:2x2 --config=configs/fcn8s_voc.py --config.mesh='(("data",-1),)'
dry --topology=v5e:2x2 --config='configs/exfuse_ladder.py:voc,dap'
# a multi-host slice (16 chips on 4 hosts), and the largest batch per chip
dry --topology=v5e:4x4 --config=configs/refinenet_r101_voc.py
dry --topology=v5e:2x2 --config=configs/refinenet_r101_voc.py --eval_batch_per_chip=0 --max_batch \
    --max_batch_limit=64
# FSDP (parameters and optimizer state split over 'data'): the per-device state memory against
# the replicated row above (needs libtpu, as every row here)
# dry --topology=v5e:2x2 --config=configs/refinenet_r101_voc.py --config.sharding_rules=fsdp
python -m refinenet_jax.dryrun --report="$out"
