"""The client at terabyte scale: orchestration cost per block and client memory as the
block count grows (throughput per worker on real EM: bench_blockwise_speed.py; worker
memory vs volume: bench_memory.py).

All-zero synthetic volumes (every block is read, found empty, written 0, stitched and
relabelled: the real passes with no model work) with a growing number of blocks, each
run in a fresh process on a LocalCluster of --workers processes:
- ``--scheduler inprocess``: the default LocalCluster, whose scheduler lives in the
  client process (as dask-jobqueue's and a local run's do): the login node's process;
- ``--scheduler subprocess``: the scheduler in a process of its own
  (distributed.SubprocessCluster), so the client's own growth is measured alone.
Client growth = peak RSS of the client process (resource.getrusage) after the run minus
before it (after imports and the cluster's start); per block = growth / blocks.

    python benchmarks/bench_scaling.py [--workers 2] [--blocks 4096 16384 50176] [--scheduler inprocess subprocess]
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

BLOCK = [1, 192, 192]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(path, out, workers, scheduler):
    from distributed import Client, LocalCluster
    from distributed.deploy.subprocess import SubprocessCluster
    from spoco_vol.blockwise import segment_blockwise
    from spoco_vol.pipeline import BUNDLED_MODEL
    if scheduler == "subprocess":
        cluster = SubprocessCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0",
                                    worker_kwargs={"preload": ["spoco_vol.blockwise.worker"]})
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0",
                               preload=["spoco_vol.blockwise.worker"])
    with cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        before = _rss_mib()
        t = time.perf_counter()
        r = segment_blockwise(path, out, BUNDLED_MODEL, block_shape=BLOCK, halo=[0, 160, 160], client=client,
                              workers=workers, device="cpu")
        wall = time.perf_counter() - t
        after = _rss_mib()
    print(json.dumps({"blocks": r["blocks"], "wall": wall, "walls": r["wall_seconds"], "client_before": before,
                      "client_growth": after - before, "worker": r["peak_rss_mib"]["worker"]}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--blocks", type=int, nargs="+", default=[4096, 16384, 50176])
    p.add_argument("--scheduler", nargs="+", choices=["inprocess", "subprocess"], default=["inprocess", "subprocess"])
    p.add_argument("--run", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.run:
        return run_one(a.run[0], a.run[1], int(a.run[2]), a.run[3])
    work = tempfile.mkdtemp(prefix="spoco-scaling-")
    print(f"all-zero volumes of 4 sections, blocks of {' x '.join(map(str, BLOCK))} (halo 160), "
          f"{a.workers} worker processes")
    print(f"{'scheduler':>10}{'blocks':>8}{'wall s':>8}{'segment':>9}{'stitch+merge':>13}{'relabel':>9}"
          f"{'ms/block':>9}{'client MiB':>11}{'growth MiB':>11}{'kB/block':>9}{'worker MiB':>11}")
    try:
        for scheduler in a.scheduler:
            for n in a.blocks:
                side = int(round(np.sqrt(n / 4)))
                shape = (4, side * BLOCK[1], side * BLOCK[2])
                path = os.path.join(work, f"zero{n}.zarr")
                arr = zarr.create_array(path, shape=shape, dtype=np.uint8, chunks=BLOCK, fill_value=0, zarr_format=2)
                arr.attrs["voxel_size"] = [50, 4.6, 4.6]
                out = os.path.join(work, f"o{n}.zarr")
                res = subprocess.run([sys.executable, __file__, "--run", path, out, str(a.workers), scheduler],
                                     capture_output=True, text=True)
                if res.returncode:
                    print(res.stderr[-3000:])
                    raise SystemExit(1)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                w = r["walls"]
                print(f"{scheduler:>10}{r['blocks']:>8}{r['wall']:>8.0f}{w['segment']:>9.0f}{w['stitch+merge']:>13.0f}"
                      f"{w['relabel']:>9.0f}{1000 * r['wall'] / r['blocks']:>9.1f}{r['client_before']:>11.0f}"
                      f"{r['client_growth']:>11.0f}{1024 * r['client_growth'] / r['blocks']:>9.2f}"
                      f"{r['worker']:>11.0f}", flush=True)
                shutil.rmtree(path)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
