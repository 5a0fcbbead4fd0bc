"""GPU-aware scheduling: prediction on workers that declare a GPU, the CPU part
(affinities, watershed, stitching evidence, writes) on CPU workers at the same time.

No GPU here, so the "GPU" pool is one worker process marked with a GPU resource that
runs the U-Net on the CPU, and the CPU pool is one more worker. Compared with the fused
task (one worker doing both halves in turn), the split run's wall time should approach
the prediction time alone: the CPU half of block k runs while block k+1 is predicted.

    python benchmarks/prepare_vnc.py /tmp/vnc
    python benchmarks/bench_gpu_overlap.py [--test /tmp/vnc/vnc_test.zarr]
"""
import argparse
import os
import shutil
import tempfile

import numpy as np
import zarr

from spoco_vol.blockwise import segment_blockwise


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--test", default="/tmp/vnc/vnc_test.zarr")
    p.add_argument("--block-shape", default="7,256,256")
    a = p.parse_args()
    block = [int(v) for v in a.block_shape.split(",")]
    work = tempfile.mkdtemp(prefix="spoco-overlap-")
    runs = [("fused, 1 worker", {"kind": "local", "workers": 1}),
            ("split, 1 GPU-pool + 1 CPU worker", {"kind": "local", "workers": 1, "gpu_workers": 1})]
    print(f"{'run':<34}{'wall s':>8}{'predict s':>10}{'CPU part s':>11}{'sum s':>7}{'overlap':>9}")
    labels = []
    try:
        for name, cluster in runs:
            out = os.path.join(work, f"{len(labels)}.zarr")
            r = segment_blockwise(a.test + "/raw", out, None, block_shape=block, cluster=cluster, device="cpu",
                                  threads_per_worker=1)
            wall = sum(r["wall_seconds"].values())  # the three passes, cluster start-up excluded
            sec = r["seconds"]
            predict = sec["read"] + sec["predict"]
            cpu = sum(sec.values()) - predict
            # overlap: the share of the shorter half hidden behind the longer one
            hidden = max(0.0, predict + cpu - wall) / min(predict, cpu)
            print(f"{name:<34}{wall:>8.1f}{predict:>10.1f}{cpu:>11.1f}{predict + cpu:>7.1f}{100 * hidden:>8.0f}%",
                  flush=True)
            labels.append(zarr.open_array(out + "/0", mode="r")[...])
        print(f"labels identical: {np.array_equal(labels[0], labels[1])}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
