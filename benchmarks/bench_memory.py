"""Peak memory of blockwise segmentation as the volume grows at a fixed block shape.

Builds volumes of 1x, 2x, 4x and 8x the VNC test stack (tiled in y and x, real EM) and
segments each in a fresh process on a fresh LocalCluster. Prints the peak RSS of the
worker processes and of the client process (which plans the blocks, gathers the face
edges and builds the merge table), the client's RSS just before the run (imports, model,
cluster), and the volume's size: the client's growth during the run is what the merge
table and the graph cost.

    python benchmarks/prepare_vnc.py /tmp/vnc
    python benchmarks/bench_memory.py [--test /tmp/vnc/vnc_test.zarr] [--workers 1]
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import zarr

from spoco_vol import io
from spoco_vol.pipeline import BUNDLED_MODEL


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(path, out, model, workers, block):
    """In a fresh process: segment, report the peaks as JSON."""
    from distributed import Client, LocalCluster
    from spoco_vol.blockwise import segment_blockwise
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None)
    client = Client(cluster)
    before = _rss_mib()
    r = segment_blockwise(path, out, model, block_shape=block, workers=workers, client=client, device="cpu")
    print(json.dumps({"blocks": r["blocks"], "worker": r["peak_rss_mib"]["worker"], "client": _rss_mib(),
                      "client_before": before, "sec": sum(r["wall_seconds"].values())}))
    client.close()
    cluster.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--test", default="/tmp/vnc/vnc_test.zarr")
    p.add_argument("--model", default=BUNDLED_MODEL)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--block-shape", default="7,512,512")
    p.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    block = [int(v) for v in a.block_shape.split(",")]
    if a.run:
        return run_one(a.run[0], a.run[1], a.model, a.workers, block)
    base = np.asarray(io.open_volume(a.test + "/raw")[...])
    work = tempfile.mkdtemp(prefix="spoco-mem-")
    print(f"{'volume':>18}{'Mvox':>8}{'raw MiB':>9}{'blocks':>7}{'worker peak MiB':>16}"
          f"{'client before':>14}{'client peak':>12}{'client growth':>14}{'sec':>7}")
    try:
        for fy, fx in ((1, 1), (1, 2), (2, 2), (2, 4)):
            shape = (base.shape[0], base.shape[1] * fy, base.shape[2] * fx)
            path = os.path.join(work, f"v{fy}x{fx}.zarr")
            arr = zarr.create_array(path + "/raw", shape=shape, dtype=np.uint8, chunks=(1, 512, 512), zarr_format=2)
            arr.attrs["voxel_size"] = [50, 4.6, 4.6]
            for iy in range(fy):  # tile by tile: this process never holds the big volume
                for ix in range(fx):
                    arr[:, iy * base.shape[1]:(iy + 1) * base.shape[1], ix * base.shape[2]:(ix + 1) * base.shape[2]] = base
            res = subprocess.run([sys.executable, __file__, "--workers", str(a.workers), "--model", a.model,
                                  "--block-shape", a.block_shape, "--run", path + "/raw",
                                  os.path.join(work, f"o{fy}x{fx}.zarr")],
                                 capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            n = int(np.prod(shape))
            print(f"{str(shape):>18}{n / 1e6:>8.1f}{n / 2**20:>9.0f}{r['blocks']:>7}{r['worker']:>16.0f}"
                  f"{r['client_before']:>14.0f}{r['client']:>12.0f}{r['client'] - r['client_before']:>14.0f}"
                  f"{r['sec']:>7.1f}", flush=True)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
