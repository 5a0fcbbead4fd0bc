#!/usr/bin/env bash
# Train the VNC mitochondria models behind benchmarks/RESULTS.md and the bundled model,
# then score them on the held-out sections 13-19.
#   bash benchmarks/train_vnc.sh [WORKDIR] [ITERATIONS]
# Runs sequentially (each uses all cores): full labels, 10% of the objects with and
# without the consistency term.
set -euo pipefail
work=${1:-/tmp/vnc}
iters=${2:-1000}
py=${PYTHON:-python}
$py benchmarks/prepare_vnc.py "$work"
common=(--raw "$work/vnc_train.zarr/raw" --labels "$work/vnc_train.zarr/labels" --dims 2
        --patch-shape 256,256 --batch-size 4 --iterations "$iters" --downsample 1,2,2 --seed 0 --quiet)
spoco-vol train "${common[@]}" --out "$work/runs/full" --overwrite
spoco-vol train "${common[@]}" --out "$work/runs/p10" --object-fraction 0.1 --overwrite
spoco-vol train "${common[@]}" --out "$work/runs/p10_nocons" --object-fraction 0.1 --consistency-weight 0 --overwrite
$py benchmarks/eval_vnc.py --test "$work/vnc_test.zarr" "$work"/runs/{full,p10,p10_nocons}/best.pt
