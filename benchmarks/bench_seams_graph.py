"""What graph seams cost beside faces stitching, on given affinities of touching cells.

A volume of space-filling cells (the Voronoi cells of seeded random points, the tests'
``touching_cells``) with noisy 3D affinities (offsets 1, 3, 9 per axis, strides 2) is
segmented whole (``segment_affinities``, one Mutex Watershed) and blockwise with each
kind of seams and the same halo (twice the longest offset, within a block), in this
process (``workers=0``: the stage seconds are one core's work).
Prints, per seams: blocks, objects, adapted Rand error against the whole volume, wall
seconds, the report's seconds of the watershed and of stitching (graph seams: views,
fragments, edges and the graph's watershed), fragments and graph edges, the peak RSS of
this process, and the size of the work directory's scratch when pass 1 ends. (A model
run with graph seams also keeps its core affinities there, float32: 4 bytes per voxel and
offset, which given affinities do not need.)

    python benchmarks/bench_seams_graph.py [--shape 64,256,256] [--block 32,128,128] [--noise 1.35]
"""
import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_blockwise_affinities import touching_cells  # noqa: E402
from test_segmentation import noisy_affinities  # noqa: E402

from spoco_vol import io  # noqa: E402
from spoco_vol.affinities import default_offsets  # noqa: E402
from spoco_vol.blockwise import passes, segment_affinities_blockwise  # noqa: E402
from spoco_vol.evaluation import adapted_rand_error  # noqa: E402
from spoco_vol.segmentation import segment_affinities  # noqa: E402


def _ints(text):
    return [int(v) for v in text.split(",")]


def _du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", type=_ints, default=[64, 256, 256])
    p.add_argument("--block", type=_ints, default=[32, 128, 128])
    p.add_argument("--cells", type=int, default=400)
    p.add_argument("--noise", type=float, default=1.35)
    a = p.parse_args()
    offsets = default_offsets(3, distances=(3, 9))
    strides = [2, 2, 2]
    tmp = tempfile.mkdtemp()
    try:
        gt = touching_cells(tuple(a.shape), n=a.cells, seed=0)
        aff = noisy_affinities(gt, offsets, noise=a.noise)
        path = os.path.join(tmp, "affs.zarr")
        io.create_array(path, aff, chunks=(len(offsets), *a.block), attrs={"offsets": offsets, "strides": strides})
        t = time.perf_counter()
        whole = segment_affinities(aff, offsets, strides=strides)
        print(f"volume {tuple(a.shape)} ({np.prod(a.shape) / 1e6:.1f} Mvox), {a.cells} cells, noise {a.noise}, "
              f"offsets 1,3,9, strides 2; whole volume: {int(whole.max())} objects in "
              f"{time.perf_counter() - t:.1f} s")
        del aff
        scratch = {}
        finish = passes.finish_block

        def measured(pred, linear, plan, threads=0):  # the work directory's size after each block
            out = finish(pred, linear, plan, threads)
            scratch[plan.seams] = _du(plan.work)
            return out
        passes.finish_block = measured
        print(f"{'seams':>6} {'blocks':>6} {'objects':>7} {'ARand':>7} {'wall s':>7} {'watershed s':>11} "
              f"{'stitch s':>8} {'fragments':>9} {'edges':>8} {'peak MiB':>8} {'scratch MiB':>11}")
        for seams in ("faces", "graph"):
            out = os.path.join(tmp, f"{seams}.zarr")
            t = time.perf_counter()
            r = segment_affinities_blockwise(path, out, block_shape=a.block, halo=[min(18, b) for b in a.block],
                                             workers=0,
                                             seams=seams)
            wall = time.perf_counter() - t
            labels = np.asarray(io.open_volume(out)[...])
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{seams:>6} {r['blocks']:>6} {r['objects']:>7} {adapted_rand_error(labels, whole)['arand']:>7.4f} "
                  f"{wall:>7.1f} {r['seconds']['watershed']:>11.1f} {r['seconds']['stitch']:>8.1f} "
                  f"{r.get('fragments', '-'):>9} {r.get('graph_edges', '-'):>8} {peak:>8.0f} "
                  f"{scratch.get(seams, 0) / 2 ** 20:>11.1f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
