"""Blockwise against whole-volume segmentation of a real 3D volume, by block shape and halo.

For each block shape (and halo; default: the model's field of view plus its longest
offset), the volume is segmented blockwise with each kind of seams (``--seams``: faces,
each face decided by its two blocks; graph, one Mutex Watershed over all blocks'
fragments) and compared with the whole-volume result: adapted Rand error, VOI
split/merge (whole-volume objects as the reference), seconds of the run; for faces also
the VOI merge of the unstitched fragments, the part of the error that each block's own
Mutex Watershed made inside its core before any stitching.

    python benchmarks/bench_seams_halo.py MODEL RAW [--blocks 22,64,32 24,48,40] [--halos - 24,40,40]

``--halos`` pairs with ``--blocks`` one to one; ``-`` is the default halo.
"""
import argparse
import shutil
import tempfile
import time

import numpy as np

from spoco_vol import checkpoint, io
from spoco_vol.blockwise import segment_blockwise
from spoco_vol.bundled import model_path
from spoco_vol.evaluation import adapted_rand_error, variation_of_information
from spoco_vol.pipeline import segment_array


def _ints(text):
    return None if text == "-" else [int(v) for v in text.split(",")]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", help="a checkpoint path or a bundled model's name")
    p.add_argument("raw")
    p.add_argument("--blocks", nargs="+", default=["22,64,32", "24,48,40", "28,100,36", "31,80,47",
                                                   "24,64,40", "31,64,40", "28,100,36"])
    p.add_argument("--halos", nargs="+", default=["-", "-", "-", "-", "24,40,40", "31,48,40", "28,40,36"])
    p.add_argument("--seams", nargs="+", default=["faces", "graph"], choices=["faces", "graph"])
    a = p.parse_args()
    if len(a.halos) != len(a.blocks):
        p.error("--halos needs one entry per --blocks entry")
    raw = np.asarray(io.open_volume(a.raw)[...])
    vs = io.read_voxel_size(a.raw)
    a.model = model_path(a.model)  # a bundled model's name or a path
    whole = segment_array(raw, checkpoint.load(a.model), input_voxel_size=vs, device="cpu")
    print(f"{a.raw}: {raw.shape}, whole volume: {len(np.unique(whole)) - 1} objects")
    print(f"{'block':>12} {'halo':>12} {'seams':>6} {'blocks':>6} {'objects':>7} {'ARand':>7} {'VOI split':>9} "
          f"{'VOI merge':>9} {'sec':>6} {'fragments VOI merge':>19}")
    tmp = tempfile.mkdtemp()
    try:
        for block, halo in zip(a.blocks, a.halos):
            kw = dict(voxel_size=vs, device="cpu", workers=0, overwrite=True, block_shape=_ints(block),
                      halo=_ints(halo))
            for seams in a.seams:
                t = time.perf_counter()
                report = segment_blockwise(a.raw, tmp + "/stitched.zarr", a.model, seams=seams, **kw)
                seconds = time.perf_counter() - t
                stitched = np.asarray(io.open_volume(tmp + "/stitched.zarr/0")[...])
                fragments_merge = "-"
                if seams == "faces":
                    segment_blockwise(a.raw, tmp + "/fragments.zarr", a.model, stitch=False, **kw)
                    fragments = np.asarray(io.open_volume(tmp + "/fragments.zarr/0")[...])
                    fragments_merge = f"{variation_of_information(fragments, whole)['voi_merge']:.4f}"
                voi = variation_of_information(stitched, whole)
                print(f"{block:>12} {','.join(map(str, report['halo'])):>12} {seams:>6} {report['blocks']:>6} "
                      f"{len(np.unique(stitched)) - 1:>7} {adapted_rand_error(stitched, whole)['arand']:>7.4f} "
                      f"{voi['voi_split']:>9.4f} {voi['voi_merge']:>9.4f} {seconds:>6.1f} {fragments_merge:>19}",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
