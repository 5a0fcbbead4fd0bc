"""Memory and time of `spoco-vol evaluate` (block by block) on label volumes larger than
memory, against the whole-array evaluation of a smaller pair.

Writes a pair of synthetic uint32 label volumes (GT: a jittered grid of cells; prediction:
the GT with a share of its objects split in two, some merged and some missed), then
evaluates them in a fresh process each and prints one row per run: volume size,
blocks, seconds, peak RSS (resource.getrusage of the child).

    python benchmarks/bench_evaluate.py /tmp/bench_eval [--shape 512,1024,1024]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import zarr

CELL = 32


def _labels(region, shape, seed):
    """GT: cells of a 32-voxel grid (ids unique over the volume); prediction (seed 1):
    every 5th cell split at its middle plane, every 7th merged into its x neighbour,
    every 11th missed."""
    z, y, x = np.meshgrid(*[np.arange(r.start, r.stop) for r in region], indexing="ij", sparse=True)
    grid = [n // CELL + 1 for n in shape]
    cz, cy, cx = z // CELL, y // CELL, x // CELL
    gt = ((cz * grid[1] + cy) * grid[2] + cx + 1).astype(np.uint32)
    gt = np.where(((z % CELL) == 0) | ((y % CELL) == 0) | ((x % CELL) == 0), 0, gt).astype(np.uint32)  # membranes
    if seed == 0:
        return gt
    pred = gt.astype(np.int64)
    split = (gt % 5 == 0) & ((x % CELL) >= CELL // 2)
    pred = np.where(split, pred + 2 ** 30, pred)
    pred = np.where((gt % 7 == 0) & (gt > 0), gt.astype(np.int64) + 1, pred)  # takes its x neighbour's id
    pred = np.where(gt % 11 == 0, 0, pred)
    return pred.astype(np.uint32)


def write_pair(out, shape, chunks):
    paths = []
    for name, seed in (("gt", 0), ("pred", 1)):
        path = os.path.join(out, f"{name}_{'x'.join(map(str, shape))}.zarr")
        paths.append(path)
        if os.path.exists(path):
            continue
        arr = zarr.create_array(path, shape=shape, dtype="uint32", chunks=chunks)
        for z0 in range(0, shape[0], chunks[0]):
            region = (slice(z0, min(z0 + chunks[0], shape[0])), slice(0, shape[1]), slice(0, shape[2]))
            arr[region] = _labels(region, shape, seed)
    return paths


def child(mode, pred, gt):
    t = time.perf_counter()
    if mode == "blockwise":
        from spoco_vol.evaluation_blockwise import evaluate_volumes, evaluation_blocks
        m = evaluate_volumes(pred, gt)
        blocks = len(evaluation_blocks(zarr.open_array(pred).shape, zarr.open_array(pred).chunks))
    else:
        from spoco_vol.evaluation import evaluate_segmentation
        m = evaluate_segmentation(zarr.open_array(pred)[...], zarr.open_array(gt)[...])
        blocks = 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_mib": peak, "blocks": blocks,
                      "ap@0.5": m["ap@0.5"], "arand": m["arand"], "n_gt": m["n_gt"]}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--shape", default="512,1024,1024")
    p.add_argument("--small", default="128,512,512", help="the pair also evaluated whole-array")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(*a.child)
    os.makedirs(a.out, exist_ok=True)
    chunks = (64, 256, 256)
    rows = []
    for shape_text, modes in ((a.small, ("whole-array", "blockwise")), (a.shape, ("blockwise",))):
        shape = tuple(int(v) for v in shape_text.split(","))
        gt, pred = write_pair(a.out, shape, chunks)
        for mode in modes:
            r = subprocess.run([sys.executable, __file__, a.out, "--child", mode, pred, gt], capture_output=True,
                               text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append((shape, mode, res))
    print(f"{'volumes (each)':<22}{'GiB':>6}{'mode':>13}{'blocks':>8}{'seconds':>9}{'peak RSS MiB':>14}"
          f"{'AP@0.5':>8}{'ARand':>8}{'GT objects':>12}")
    for shape, mode, r in rows:
        gib = np.prod(shape) * 4 / 2 ** 30
        print(f"{'x'.join(map(str, shape)):<22}{gib:>6.2f}{mode:>13}{r['blocks']:>8}{r['seconds']:>9.1f}"
              f"{r['peak_mib']:>14.0f}{r['ap@0.5']:>8.3f}{r['arand']:>8.3f}{r['n_gt']:>12}")


if __name__ == "__main__":
    main()
