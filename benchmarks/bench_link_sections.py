"""--link-sections on real EM: per-section objects of the 2D model joined into 3D objects.

VNC sections 13-19 (held out), bundled 2D model, blockwise; scored against the 3D
mitochondria of ../shared/data/vnc_mito (face-connected components, cut to 13-19) with
3D AP@0.5, mAP, adapted Rand error and VOI. Two block layouts per overlap threshold:
one block, and 3x512x512 blocks (objects must be linked across z faces as well).

    python benchmarks/prepare_vnc.py /tmp/vnc
    python benchmarks/bench_link_sections.py [--overlaps 0 0.1 0.3 0.5 0.7]
"""
import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from spoco_vol import io
from spoco_vol.blockwise import segment_blockwise
from spoco_vol.evaluation import evaluate_segmentation

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--test", default="/tmp/vnc/vnc_test.zarr")
    p.add_argument("--stack", default=os.path.join(HERE, "..", "..", "shared", "data", "vnc_mito", "stack1.npz"))
    p.add_argument("--overlaps", type=float, nargs="+", default=[0, 0.1, 0.3, 0.5, 0.7],
                   help="0 = no linking")
    a = p.parse_args()
    gt3d = np.load(a.stack)["labels"][13:20]
    work = tempfile.mkdtemp()
    print(f"{'overlap':>8}{'blocks':>16}{'objects':>9}{'AP@0.5':>8}{'mAP':>7}{'ARand':>7}{'VOI':>7}{'#gt':>5}{'sec':>6}")
    try:
        for ov in a.overlaps:
            for bs in ([7, 1024, 1024], [3, 512, 512]):
                out = os.path.join(work, "labels.zarr")
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                rep = segment_blockwise(a.test + "/raw", out, None, block_shape=bs, workers=0, device="cpu",
                                        link_sections=ov > 0, link_overlap=ov if ov > 0 else 0.5)
                sec = time.perf_counter() - t
                m = evaluate_segmentation(np.asarray(io.open_volume(out)[...]), gt3d)
                print(f"{ov:>8}{'x'.join(map(str, bs)):>16}{rep['objects']:>9}{m['ap@0.5']:>8.3f}{m['map']:>7.3f}"
                      f"{m['arand']:>7.3f}{m['voi']:>7.3f}{m['n_gt']:>5}{sec:>6.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
