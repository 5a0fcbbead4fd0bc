"""Peak memory of blockwise segmentation as the volume grows at a fixed block shape.

Builds volumes of 1x, 2x, 4x and 8x the VNC test stack (tiled in y and x, real EM), runs
``segment_blockwise`` on a fresh LocalCluster for each, and prints the peak RSS of the
worker processes and of the client (which builds the merge table), next to the volume size.

    python benchmarks/prepare_vnc.py /tmp/vnc
    python benchmarks/bench_memory.py [--test /tmp/vnc/vnc_test.zarr] [--workers 1]
"""
import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np
from distributed import Client, LocalCluster

from spoco_vol import io
from spoco_vol.blockwise import segment_blockwise
from spoco_vol.pipeline import BUNDLED_MODEL


def _worker_peak_mib():
    import resource as r
    return r.getrusage(r.RUSAGE_SELF).ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--test", default="/tmp/vnc/vnc_test.zarr")
    p.add_argument("--model", default=BUNDLED_MODEL)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--block-shape", default="7,512,512")
    a = p.parse_args()
    block = [int(v) for v in a.block_shape.split(",")]
    base = np.asarray(io.open_volume(a.test + "/raw")[...])
    work = tempfile.mkdtemp(prefix="spoco-mem-")
    print(f"{'volume':>18}{'Mvox':>8}{'raw MiB':>9}{'blocks':>7}{'worker peak MiB':>16}{'client peak MiB':>16}{'sec':>7}")
    for fy, fx in ((1, 1), (1, 2), (2, 2), (2, 4)):
        vol = np.tile(base, (1, fy, fx))
        path = os.path.join(work, f"v{fy}x{fx}.zarr")
        io.create_array(path + "/raw", vol, chunks=(1, 512, 512), attrs={"voxel_size": [50, 4.6, 4.6]})
        cluster = LocalCluster(n_workers=a.workers, threads_per_worker=1, dashboard_address=None)
        client = Client(cluster)
        t = time.perf_counter()
        r = segment_blockwise(path + "/raw", os.path.join(work, f"o{fy}x{fx}.zarr"), a.model,
                              block_shape=block, workers=a.workers, client=client, device="cpu")
        sec = time.perf_counter() - t
        worker_peak = max(client.run(_worker_peak_mib).values())
        client.close()
        cluster.close()
        print(f"{str(vol.shape):>18}{vol.size / 1e6:>8.1f}{vol.nbytes / 2**20:>9.0f}{r['blocks']:>7}"
              f"{worker_peak:>16.0f}{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:>16.0f}{sec:>7.1f}",
              flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
