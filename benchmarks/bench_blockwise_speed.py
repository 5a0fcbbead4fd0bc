"""Speed acceptance of blockwise segmentation (issue 3, point 4), on real EM.

A. Watershed stage vs the raw library call: for each VNC test section, the same
   embeddings -> affinities; then (a) bioimage-cpp's mutex_watershed alone on the prepared
   weights and mask, (b) spoco-vol's whole watershed stage (weights, MWS, background
   segments, specks, renumbering: what the run table calls "watershed"). Best of 3.
B. End to end: ``segment_blockwise`` on the VNC test stack tiled 2x2 (7 x 2048 x 2048,
   29 Mvox) with 1 and 2 workers (one torch thread each, and 1 worker with all cores),
   on a LocalCluster started beforehand. Prints per-stage work seconds, the rate the
   slowest stage alone would allow with those workers, the rate of the stage sum (a fused
   block task runs its stages one after another on the same core), and the wall rate.

    python benchmarks/prepare_vnc.py /tmp/vnc
    python benchmarks/bench_blockwise_speed.py [--test /tmp/vnc/vnc_test.zarr]
"""
import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from bioimage_cpp.segmentation import mutex_watershed as library_mws
from distributed import Client, LocalCluster

from spoco_vol import io, transforms
from spoco_vol.affinities import embedding_affinities, number_of_attractive
from spoco_vol.blockwise import segment_blockwise
from spoco_vol.inference import predict_embeddings
from spoco_vol import checkpoint
from spoco_vol.pipeline import BUNDLED_MODEL, model_scale, resample_raw
from spoco_vol.segmentation import background_distance, segment_embeddings


def best_of(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def watershed_overhead(raw, vs, ckpt_path):
    ckpt = checkpoint.load(ckpt_path)
    net = ckpt.network()
    inf = ckpt.inference
    offsets = [list(o) for o in inf.offsets]
    n_attr, strides = number_of_attractive(offsets), [2, 2]
    scale = model_scale(vs, ckpt.voxel_size, [1, 2], 3)
    image = transforms.normalize(resample_raw(raw.astype(np.float32), scale), ckpt.normalization)
    t_lib = t_ours = t_aff = 0.0
    vox = 0
    for sec in image:
        emb = predict_embeddings(net, sec, device=torch.device("cpu"))
        affs = embedding_affinities(emb, offsets, ckpt.delta_d)
        mask = background_distance(emb, inf.background_embedding) >= inf.background_radius
        weights = affs.astype(np.float32, copy=True)
        weights[n_attr:] = 1 - weights[n_attr:]
        t_lib += best_of(lambda: library_mws(weights, offsets, n_attr, strides=strides, mask=mask))
        timings = {}

        def ours():
            timings.clear()
            segment_embeddings(emb, offsets, ckpt.delta_d, strides=strides,
                               background_embedding=inf.background_embedding,
                               background_radius=inf.background_radius, min_size=inf.min_size, timings=timings)
            return timings["watershed"], timings["affinities"]
        runs = [ours() for _ in range(3)]
        t_ours += min(r[0] for r in runs)
        t_aff += min(r[1] for r in runs)
        vox += sec.size
    print("A. watershed stage vs raw library call (model grid, 7 sections of 512 x 512)")
    print(f"{'':<34}{'seconds':>9}{'Mvox/s':>9}")
    print(f"{'bioimage-cpp mutex_watershed':<34}{t_lib:>9.3f}{vox / t_lib / 1e6:>9.2f}")
    print(f"{'spoco-vol watershed stage':<34}{t_ours:>9.3f}{vox / t_ours / 1e6:>9.2f}")
    print(f"{'(affinities + background mask)':<34}{t_aff:>9.3f}{vox / t_aff / 1e6:>9.2f}")
    print(f"overhead of the stage over the library call: {100 * (t_ours / t_lib - 1):+.1f}%\n", flush=True)


def end_to_end(path, work, block, configs):
    print("B. end to end, 7 x 2048 x 2048 (29.4 Mvox), blocks " + "x".join(map(str, block)))
    head = (f"{'workers x threads':<18}{'wall s':>8}{'read':>7}{'predict':>8}{'affin':>7}{'wshed':>7}"
            f"{'stitch':>7}{'relab':>7}{'write':>7}{'slowest-stage Mvox/s':>21}{'stage-sum Mvox/s':>17}"
            f"{'wall Mvox/s':>12}{'wall/slowest':>13}{'wall/sum':>9}")
    print(head)
    walls = {}
    for workers, threads in configs:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None)
        client = Client(cluster)
        out = os.path.join(work, f"o{workers}x{threads}.zarr")
        r = segment_blockwise(path, out, BUNDLED_MODEL, block_shape=block, workers=workers, client=client,
                              device="cpu", threads_per_worker=threads)
        client.close()
        cluster.close()
        shutil.rmtree(out)
        wall = sum(r["wall_seconds"].values())
        walls[(workers, threads)] = wall
        mvox = r["voxels"] / 1e6
        sec = r["seconds"]
        slowest = mvox / (max(sec.values()) / workers)
        stage_sum = mvox / (sum(sec.values()) / workers)
        print(f"{f'{workers} x {threads}':<18}{wall:>8.1f}" + "".join(
            f"{sec[k]:>{w}.1f}" for k, w in (("read", 7), ("predict", 8), ("affinities", 7), ("watershed", 7),
                                             ("stitch", 7), ("relabel", 7), ("write", 7)))
              + f"{slowest:>21.2f}{stage_sum:>17.2f}{mvox / wall:>12.2f}{mvox / wall / slowest:>13.2f}"
              f"{mvox / wall / stage_sum:>9.2f}", flush=True)
    return walls


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--test", default="/tmp/vnc/vnc_test.zarr")
    p.add_argument("--block-shape", default="7,512,512")
    p.add_argument("--configs", default=None, help="workers x threads to run, e.g. 1x1,2x1 [default: 1x1,2x1,1xCORES]")
    p.add_argument("--skip-watershed", action="store_true", help="only part B")
    a = p.parse_args()
    raw = np.asarray(io.open_volume(a.test + "/raw")[...])
    vs = io.read_voxel_size(a.test + "/raw")
    if not a.skip_watershed:
        watershed_overhead(raw, vs, BUNDLED_MODEL)
    work = tempfile.mkdtemp(prefix="spoco-speed-")
    try:
        path = os.path.join(work, "tiled.zarr")
        io.create_array(path + "/raw", np.tile(raw, (1, 2, 2)), chunks=(1, 512, 512), attrs={"voxel_size": vs})
        cores = os.cpu_count() or 1
        configs = ([tuple(int(v) for v in c.split("x")) for c in a.configs.split(",")] if a.configs
                   else [(1, 1), (2, 1), (1, cores)])
        walls = end_to_end(path + "/raw", work, [int(v) for v in a.block_shape.split(",")], configs)
        if (1, 1) in walls and (2, 1) in walls:
            print(f"\n2 workers vs 1 (one thread each): {walls[(1, 1)] / walls[(2, 1)]:.2f}x faster")
        if (1, cores) in walls and (2, 1) in walls:
            print(f"2 workers vs 1 worker using all {cores} cores: {walls[(1, cores)] / walls[(2, 1)]:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
