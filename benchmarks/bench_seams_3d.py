"""Seam quality of blockwise segmentation on a synthetic 3D volume of touching objects.

Real EM covers the 2D model (bench_seams.py); this covers a 3D model, whose field of view
and affinities cross block faces along every axis. Steps:
1. Synthesise Voronoi cells that fill the volume (every object touches its neighbours):
   each cell a random grey level with noise, the voxels where two cells meet dark, a
   slight blur. One volume for training, another (other seed) for testing.
2. Train a small 3D U-Net (features 8,16,32; full labels) on the training volume with
   ``spoco_vol.train``; inference offsets 1, 3, 9 per axis (a 27-voxel offset would need
   blocks as large as this whole test volume).
3. Segment the test volume as one block, then with two block shapes, with and without
   stitching; compare each with the single block (adapted Rand error, VOI) and with the
   ground truth.

    python benchmarks/bench_seams_3d.py [--iterations 600] [--workers 2]
"""
import argparse
import os
import shutil
import tempfile
import time

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from spoco_vol import io
from spoco_vol.blockwise import segment_blockwise
from spoco_vol.evaluation import adapted_rand_error, variation_of_information
from spoco_vol import checkpoint
from spoco_vol.config import TrainConfig
from spoco_vol.training import train

OFFSETS_3D = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-3, 0, 0], [0, -3, 0], [0, 0, -3],
              [-9, 0, 0], [0, -9, 0], [0, 0, -9]]


def touching_cells(shape, cell_size, seed):
    """(raw uint8, labels uint32): Voronoi cells of about ``cell_size`` voxels across."""
    rng = np.random.default_rng(seed)
    n = max(2, int(np.prod(shape) / cell_size ** 3))
    seeds = rng.uniform(0, 1, (n, 3)) * np.array(shape)
    grid = np.indices(shape).reshape(3, -1).T
    dist, idx = cKDTree(seeds).query(grid, k=2)
    labels = (idx[:, 0] + 1).reshape(shape).astype(np.uint32)
    contact = ((dist[:, 1] - dist[:, 0]) < 1.5).reshape(shape)  # where two cells meet
    grey = rng.uniform(90, 210, n + 1)
    raw = grey[labels] + rng.normal(0, 12, shape)
    raw[contact] = 35
    raw = ndimage.gaussian_filter(raw, 0.7)
    return np.clip(raw, 0, 255).astype(np.uint8), labels


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="64,128,128")
    p.add_argument("--cell-size", type=float, default=24)
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--keep", default=None, help="directory to keep the data and model in")
    a = p.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    work = a.keep or tempfile.mkdtemp(prefix="spoco-seams3d-")
    os.makedirs(work, exist_ok=True)
    vs = {"voxel_size": [10.0, 10.0, 10.0]}
    for name, seed in (("train", 1), ("test", 2)):
        raw, lab = touching_cells(shape, a.cell_size, seed)
        io.create_array(f"{work}/{name}.zarr/raw", raw, chunks=(32, 64, 64), attrs=vs, overwrite=True)
        io.create_array(f"{work}/{name}.zarr/labels", lab, chunks=(32, 64, 64), attrs=vs, overwrite=True)
    gt = io.open_volume(f"{work}/test.zarr/labels")[...]
    print(f"volume {shape}, {int(gt.max())} touching cells in the test volume")
    model = f"{work}/model/best.pt"
    t = time.perf_counter()
    if not os.path.exists(model):
        s = train(TrainConfig(raw=[f"{work}/train.zarr/raw"], labels=[f"{work}/train.zarr/labels"],
                              out=f"{work}/model", dims=3, patch_shape=(32, 64, 64), batch_size=2,
                              iterations=a.iterations, features=(8, 16, 32), val_every=200, progress=False,
                              consistency_weight=0, overwrite=True, command="bench_seams_3d.py"))
        print(f"trained {s['iterations']} iterations in {time.perf_counter() - t:.0f} s")
        checkpoint.save(checkpoint.load(model).with_inference(offsets=OFFSETS_3D), model)
    runs = [("single block", list(shape), True), ("blocks 32x64x64", [32, 64, 64], True),
            ("blocks 40x48x80", [40, 48, 80], True), ("blocks 32x64x64, no stitching", [32, 64, 64], False),
            ("blocks 40x48x80, no stitching", [40, 48, 80], False)]
    results = {}
    print(f"{'run':<32}{'blocks':>7}{'merges':>7}{'objects':>8}{'ARand vs single':>16}{'VOI split':>10}"
          f"{'VOI merge':>10}{'ARand vs GT':>12}{'sec':>6}")
    for name, bs, stitch in runs:
        out = f"{work}/seg{len(results)}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        r = segment_blockwise(f"{work}/test.zarr/raw", out, model, block_shape=bs, workers=a.workers,
                              stitch=stitch, device="cpu")
        sec = time.perf_counter() - t
        seg = np.asarray(io.open_volume(out)[...])
        results[name] = seg
        ref = results["single block"]
        voi = variation_of_information(seg, ref)
        print(f"{name:<32}{r['blocks']:>7}{r['merges']:>7}{r['objects']:>8}{adapted_rand_error(seg, ref)['arand']:>16.4f}"
              f"{voi['voi_split']:>10.4f}{voi['voi_merge']:>10.4f}{adapted_rand_error(seg, gt)['arand']:>12.3f}"
              f"{sec:>6.1f}", flush=True)
    if not a.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
