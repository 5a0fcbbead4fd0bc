"""Scaling of the blockwise pipeline on this machine: orchestration cost per block and
client memory as the block count grows (throughput per worker and 1 vs 2 workers on real
EM: bench_blockwise_speed.py; worker memory vs volume: bench_memory.py).

A. Orchestration: all-zero synthetic volumes (every block is read, found empty, written
   0, stitched and relabelled: the real three passes with no model work) with a growing
   number of blocks. Per-block overhead (scheduler + task + zarr I/O), client peak RSS
   growth, and the merge-table step, on a LocalCluster of --workers processes.
B. Throughput: real EM (the VNC test stack tiled 2x2, 29 Mvox) with 1 and 2 workers
   (one thread each), end-to-end Mvox/s; see bench_blockwise_speed.py for the stages.

    python benchmarks/bench_scaling.py [--workers 1 2] [--blocks 256 1024 4096]
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import zarr


def run_one(path, out, workers, block):
    from spoco_vol.blockwise import segment_blockwise
    from spoco_vol.pipeline import BUNDLED_MODEL
    from spoco_vol.cluster import open_cluster
    from spoco_vol.cluster import validate_cluster_config
    with open_cluster(validate_cluster_config({"kind": "local", "workers": workers}),
                      log=lambda line: None) as client:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        r = segment_blockwise(path, out, BUNDLED_MODEL, block_shape=block, halo=[0, 160, 160], client=client,
                              workers=workers, device="cpu")
        wall = time.perf_counter() - t
    print(json.dumps({"blocks": r["blocks"], "wall": wall, "walls": r["wall_seconds"],
                      "client_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
                      "worker": r["peak_rss_mib"]["worker"]}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--blocks", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--run", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    block = [1, 192, 192]
    if a.run:
        return run_one(a.run[0], a.run[1], int(a.run[2]), block)
    work = tempfile.mkdtemp(prefix="spoco-scaling-")
    print("A. orchestration, all-zero volumes, blocks of 1 x 192 x 192 (halo 160)")
    print(f"{'workers':>8}{'blocks':>7}{'faces':>7}{'Mvox':>8}{'wall s':>8}{'segment':>9}{'stitch+merge':>13}"
          f"{'relabel':>9}{'ms/block':>9}{'client growth MiB':>18}{'worker MiB':>11}")
    try:
        for workers in a.workers:
            for n in a.blocks:
                side = int(round(np.sqrt(n / 4)))
                shape = (4, side * 192, side * 192)
                path = os.path.join(work, f"zero{n}.zarr")
                arr = zarr.create_array(path, shape=shape, dtype=np.uint8, chunks=(1, 192, 192), fill_value=0,
                                        zarr_format=2)
                arr.attrs["voxel_size"] = [50, 4.6, 4.6]
                res = subprocess.run([sys.executable, __file__, "--run", path, os.path.join(work, f"o{n}.zarr"),
                                      str(workers)], capture_output=True, text=True)
                if res.returncode:
                    print(res.stderr[-3000:])
                    raise SystemExit(1)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                faces = 4 * (2 * side * (side - 1))
                w = r["walls"]
                print(f"{workers:>8}{r['blocks']:>7}{faces:>7}{np.prod(shape) / 1e6:>8.0f}{r['wall']:>8.1f}"
                      f"{w['segment']:>9.1f}{w['stitch+merge']:>13.1f}{w['relabel']:>9.1f}"
                      f"{1000 * r['wall'] / r['blocks']:>9.1f}{r['client_growth']:>18.0f}{r['worker']:>11.0f}",
                      flush=True)
                shutil.rmtree(path)
                shutil.rmtree(os.path.join(work, f"o{n}.zarr"), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
