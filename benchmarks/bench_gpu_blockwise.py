"""A blockwise run with a GPU, in one call of at most 10 minutes (run it on a lent GPU
machine; `--device cpu` only tries the script out):

1. `segment --device cuda` of an 8 x N x N volume (the VNC test stack mirrored, so the
   work is real) in at least 64 blocks, on a LocalCluster of one GPU worker (prediction)
   and W CPU workers (affinities, watershed, stitching, writes): wall time, blocks per
   second, the GPU half's and the CPU half's seconds per block, and the overlap (the
   share of the shorter half hidden behind the longer one). The first blocks carry the
   CUDA start-up; with 64 or more it is amortised.
2. The same volume on the same machine's CPU alone (W + 1 CPU workers): wall time and
   blocks per second.
3. The labels of 1 against those of 2: adapted Rand error and VOI (the GPU's float
   arithmetic differs in the last bits; objects should not).

    python benchmarks/prepare_vnc.py /tmp/vnc
    python benchmarks/bench_gpu_blockwise.py [--test /tmp/vnc/vnc_test.zarr] [--size 4096]
        [--block-shape 8,512,512] [--cpu-workers 8] [--device cuda] [--out results.json]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_voxel_cost import mirrored_volume  # noqa: E402


def run(path, out, device, cluster, block_shape):
    from spoco_vol.blockwise import segment_blockwise
    t = time.perf_counter()
    r = segment_blockwise(path, out, None, block_shape=block_shape, cluster=cluster, device=device,
                          threads_per_worker=1 if device == "cpu" else None)
    r["wall_with_start"] = time.perf_counter() - t
    return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--test", default="/tmp/vnc/vnc_test.zarr")
    p.add_argument("--size", type=int, default=4096, help="the volume is 8 x size x size")
    p.add_argument("--block-shape", default="8,512,512")
    p.add_argument("--cpu-workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="also write the figures here (JSON)")
    a = p.parse_args()
    from spoco_vol import io
    from spoco_vol.evaluation import adapted_rand_error, variation_of_information
    block = [int(v) for v in a.block_shape.split(",")]
    work = tempfile.mkdtemp(prefix="spoco-gpu-blockwise-")
    try:
        path = mirrored_volume(a.test, a.size, os.path.join(work, "vol.zarr"))
        results = {}
        gpu_cluster = {"kind": "local", "workers": a.cpu_workers, "gpu_workers": 1}
        cpu_cluster = {"kind": "local", "workers": a.cpu_workers + 1}
        for name, device, cluster in (("gpu", a.device, gpu_cluster), ("cpu", "cpu", cpu_cluster)):
            r = run(path, os.path.join(work, f"{name}.zarr"), device, cluster, block)
            wall = sum(r["wall_seconds"].values())  # the passes, cluster start excluded
            sec = r["seconds"]
            predict = sec["read"] + sec["predict"]
            rest = sum(sec.values()) - predict
            results[name] = {"blocks": r["blocks"], "wall": wall, "wall_with_start": r["wall_with_start"],
                             "blocks_per_s": r["blocks"] / wall, "predict_s_per_block": predict / r["blocks"],
                             "cpu_half_s_per_block": rest / r["blocks"],
                             "predicted_on_gpu_workers": r["blocks_predicted_on_gpu_workers"],
                             "overlap": max(0.0, predict + rest - wall) / max(min(predict, rest), 1e-9)}
            print(name, json.dumps(results[name]), flush=True)
        gpu = np.asarray(io.open_volume(os.path.join(work, "gpu.zarr"))[...])
        cpu = np.asarray(io.open_volume(os.path.join(work, "cpu.zarr"))[...])
        results["labels"] = {"arand": adapted_rand_error(gpu, cpu)["arand"],
                             "voi": variation_of_information(gpu, cpu)["voi"], "identical": bool(np.array_equal(gpu, cpu))}
        g, c = results["gpu"], results["cpu"]
        print(f"\n{'run':<44}{'blocks':>7}{'wall s':>8}{'blocks/s':>9}{'predict s/blk':>14}{'CPU half s/blk':>15}"
              f"{'overlap':>8}")
        for name, r, who in (("gpu", g, f"1 GPU worker + {a.cpu_workers} CPU workers"),
                             ("cpu", c, f"{a.cpu_workers + 1} CPU workers")):
            overlap = f"{100 * r['overlap']:>7.0f}%" if r["predicted_on_gpu_workers"] else f"{'-':>8}"  # split runs only
            print(f"{who:<44}{r['blocks']:>7}{r['wall']:>8.1f}{r['blocks_per_s']:>9.2f}"
                  f"{r['predict_s_per_block']:>14.3f}{r['cpu_half_s_per_block']:>15.3f}{overlap}")
        print(f"GPU run vs CPU run: {c['wall'] / g['wall']:.2f}x faster; labels ARand {results['labels']['arand']:.4f}, "
              f"VOI {results['labels']['voi']:.4f}, identical: {results['labels']['identical']}")
        if a.out:
            json.dump(results, open(a.out, "w"), indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
