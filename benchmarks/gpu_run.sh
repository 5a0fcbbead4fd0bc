#!/usr/bin/env bash
# The GPU check, run once on a lent GPU machine (RESULTS.md: "GPU").
#   bash benchmarks/gpu_run.sh DATA OUT [BUDGET_S]
# DATA holds vnc_train.zarr and vnc_test.zarr (benchmarks/prepare_vnc.py); results go to
# OUT. The stages stop by themselves within BUDGET_S seconds (default 480), most
# important first:
#  1. bench_gpu.py: U-Net throughput fp32/bf16/fp16 vs the same machine's CPU, and
#     whether CUDA gives the CPU's embeddings and labels (bundled model, VNC 13-19);
#  1b. bench_gpu_blockwise.py: a blockwise run of 64 blocks with one GPU worker and CPU
#     workers (per-block GPU rate with CUDA start-up amortised, the CPU half, overlap),
#     the same on the CPU alone, and the labels of the two compared;
#  2. `spoco-vol segment --device cuda` (blockwise, dask LocalCluster) on VNC 13-19, scored;
#  3. SPOCO@0.1 trained with several seeds at once (the RESULTS.md recipe, --tta), each
#     model calibrated without TTA too, and all scored on VNC 13-19 (eval_vnc.py).
#     On an H200, three runs at once make about 6.5 it/s each: 2000 iterations need
#     about 310 s of the budget, plus 80 s for the scores. A run the budget cuts short
#     keeps the best.pt of its last validations.
# Environment: PY (python, default python3), SEEDS (default 0 1 2), ITERATIONS, SKIP
# (stages to leave out, e.g. 12 for a rerun of the training alone), TABLES (bench_gpu.py's),
# DEVICE (cuda; cpu only to try this script out).
set -uo pipefail
data=$1
out=$2
budget=${3:-480}
py=${PY:-python3}
device=${DEVICE:-cuda}
seeds=${SEEDS:-0 1 2}
iterations=${ITERATIONS:-2000}
skip=${SKIP:-}
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
cli() { $py -m spoco_vol.cli "$@"; }
mkdir -p "$out"
runs=$(mktemp -d /tmp/gpu_runs.XXXX)

if [[ $skip != *1* ]]; then
echo "== 1. bench_gpu.py (left $(left) s)"
timeout 150 $py benchmarks/bench_gpu.py --device "$device" --tables "${TABLES:-1,2,3}" --test "$data/vnc_test.zarr" \
    --train "$data/vnc_train.zarr" 2>&1 | tee "$out/bench_gpu.txt"
fi

if [[ $skip != *b* ]]; then
echo "== 1b. bench_gpu_blockwise.py: 64 blocks on the GPU worker + CPU workers, vs CPU alone (left $(left) s)"
timeout 300 $py benchmarks/bench_gpu_blockwise.py --device "$device" --test "$data/vnc_test.zarr" \
    --out "$out/gpu_blockwise.json" 2>&1 | grep -v "distributed\." | tee "$out/gpu_blockwise.txt"
fi

if [[ $skip != *2* ]]; then
echo "== 2. blockwise segment --device $device (left $(left) s)"
for dev in "$device" cpu; do
  t0=$(date +%s)
  timeout 60 $py -m spoco_vol.cli segment --input "$data/vnc_test.zarr/raw" --output "$runs/seg_$dev.zarr" \
      --device "$dev" --workers 4 --quiet --overwrite
  echo "segment --device $dev, 4 workers: rc $?, $(( $(date +%s) - t0 )) s wall (cluster start included)"
  cli evaluate --pred "$runs/seg_$dev.zarr" --gt "$data/vnc_test.zarr/labels" --per-section
done 2>&1 | tee "$out/segment.txt"
fi

echo "== 3. SPOCO@0.1, seeds $seeds, $iterations iterations each (left $(left) s)"
train_limit=$(( $(left) - 80 ))
[ $train_limit -lt 30 ] && train_limit=30
for seed in $seeds; do
  OMP_NUM_THREADS=2 timeout $train_limit $py -m spoco_vol.cli train --raw "$data/vnc_train.zarr/raw" \
      --labels "$data/vnc_train.zarr/labels" --dims 2 --patch-shape 256,256 --batch-size 4 --downsample 1,2,2 \
      --norm batch --object-fraction 0.1 --seed "$seed" --background-weight 1 --background-warmup 300 \
      --background-select-radius 3 --tta --iterations "$iterations" --device "$device" --quiet \
      --out "$runs/s$seed" > "$runs/s$seed.log" 2>&1 &
done
wait
for seed in $seeds; do
  [ -f "$runs/s$seed/best.pt" ] && OMP_NUM_THREADS=2 timeout 60 $py -m spoco_vol.cli calibrate \
      --model "$runs/s$seed/best.pt" --raw "$data/vnc_train.zarr/raw" --labels "$data/vnc_train.zarr/labels" \
      --z-range 12,13 --no-tta --device "$device" --out "$runs/s$seed/cal_no-tta.pt" > "$runs/cal_s$seed.log" 2>&1 &
done
wait
for seed in $seeds; do
  echo "seed $seed: $(tail -c 400 "$runs/s$seed.log" | tr '\n' ' ')"
  echo "  summary: $(cat "$runs/s$seed/summary.json" 2>/dev/null | tr -d '\n ')"
  echo "  calibrate --no-tta: $(tail -c 300 "$runs/cal_s$seed.log" 2>/dev/null | tr '\n' ' ')"
done 2>&1 | tee "$out/train.txt"

echo "== 4. scores on VNC 13-19 (left $(left) s)"
eval_limit=$(( $(left) - 15 ))
[ $eval_limit -lt 20 ] && eval_limit=20
for seed in $seeds; do
  ck=$(ls "$runs/s$seed"/best.pt "$runs/s$seed"/cal_no-tta.pt 2>/dev/null)
  [ -n "$ck" ] && OMP_NUM_THREADS=2 timeout $eval_limit $py benchmarks/eval_vnc.py --device "$device" \
      --test "$data/vnc_test.zarr" $ck > "$runs/eval_s$seed.txt" 2>&1 &
done
wait
for seed in $seeds; do echo "seed $seed"; cat "$runs/eval_s$seed.txt" 2>/dev/null; done | tee "$out/eval_sparse.txt"
# logs, summaries and best.pt of the runs (not latest.pt, the resumable state, nor the
# no-TTA calibrations, which `calibrate` remakes in seconds), four seeds per archive:
# the device tool brings back files of at most 16 MiB
set -- $seeds
part=0
while [ $# -gt 0 ]; do
  group=()
  for seed in "${@:1:4}"; do group+=("s$seed" "s$seed.log" "eval_s$seed.txt"); done
  tar czf "$out/sparse_runs_$part.tgz" -C "$runs" --ignore-failed-read --exclude latest.pt \
      --exclude cal_no-tta.pt --exclude '*.tmp' "${group[@]}" 2>/dev/null
  shift $(( $# < 4 ? $# : 4 ))
  part=$(( part + 1 ))
done
echo "== done in $(( $(date +%s) - start )) s"
