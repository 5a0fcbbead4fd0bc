"""Seam quality of blockwise segmentation on real EM (VNC sections 13-19).

Segments the held-out sections with one block covering the whole volume, then with two
smaller block shapes, with and without stitching, and compares each with the single
block (adapted Rand error, VOI split/merge) and with the ground truth (AP@0.5, 2D
objects per section).

    python benchmarks/prepare_vnc.py /tmp/vnc
    python benchmarks/bench_seams.py [--test /tmp/vnc/vnc_test.zarr] [--model CKPT] [--workers 2]
"""
import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from spoco_vol import io
from spoco_vol.blockwise import segment_blockwise
from spoco_vol.evaluation import adapted_rand_error, evaluate_segmentation, variation_of_information
from spoco_vol.pipeline import BUNDLED_MODEL


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--test", default="/tmp/vnc/vnc_test.zarr")
    p.add_argument("--model", default=BUNDLED_MODEL)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    raw_path, gt = a.test + "/raw", np.asarray(io.open_volume(a.test + "/labels")[...])
    shape = list(io.open_volume(raw_path).shape)
    work = tempfile.mkdtemp(prefix="spoco-seams-")
    runs = [("single block", shape, True), ("blocks 7x384x384", [7, 384, 384], True),
            ("blocks 4x300x500", [4, 300, 500], True), ("blocks 7x384x384, no stitching", [7, 384, 384], False),
            ("blocks 4x300x500, no stitching", [4, 300, 500], False)]
    results = {}
    print(f"{'run':<34}{'blocks':>7}{'merges':>7}{'objects':>8}{'ARand vs single':>16}{'VOI split':>10}"
          f"{'VOI merge':>10}{'AP@0.5':>8}{'sec':>7}")
    for name, bs, stitch in runs:
        out = os.path.join(work, f"{len(results)}.zarr")
        t = time.perf_counter()
        r = segment_blockwise(raw_path, out, a.model, block_shape=bs, workers=a.workers, stitch=stitch,
                              device="cpu")
        sec = time.perf_counter() - t
        seg = np.asarray(io.open_volume(out)[...])
        results[name] = seg
        ref = results["single block"]
        ar = adapted_rand_error(seg, ref)["arand"]
        voi = variation_of_information(seg, ref)
        ap = evaluate_segmentation(seg, gt, per_section=True)["ap@0.5"]
        print(f"{name:<34}{r['blocks']:>7}{r['merges']:>7}{r['objects']:>8}{ar:>16.4f}{voi['voi_split']:>10.4f}"
              f"{voi['voi_merge']:>10.4f}{ap:>8.3f}{sec:>7.1f}", flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
