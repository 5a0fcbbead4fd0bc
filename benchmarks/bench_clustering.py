"""Clustering choices on the same embeddings (spoco_vol.clustering vs the Mutex
Watershed): accuracy and seconds per image, and how the pixel-clustering methods scale.

A. Per image: the bundled model's embeddings of the VNC test sections 13-19 (each
   section one image, 512 x 512 on the model grid), segmented by each method with the
   model's background rule; AP@0.5 of the 2D objects against the ground truth, and the
   seconds of the clustering step alone (prediction excluded: the same for all).
B. Scaling: HDBSCAN and mean-shift on N foreground pixels' embeddings (drawn from those
   sections), for growing N, in a fresh process each, with a time limit; the fitted
   exponent says where a method reaches ten minutes (spoco_vol.clustering.MAX_PIXELS).

    python benchmarks/bench_clustering.py [--test /tmp/vnc/vnc_test.zarr] [--sizes 10000 30000 100000]
"""
import argparse
import json
import subprocess
import sys
import time

import numpy as np


def embeddings_of_test_sections(test):
    from spoco_vol import checkpoint, io
    from spoco_vol.pipeline import BUNDLED_MODEL, predict_array
    ck = checkpoint.load(BUNDLED_MODEL)
    raw = np.asarray(io.open_volume(test + "/raw")[...])
    gt = np.asarray(io.open_volume(test + "/labels")[...])
    pred = predict_array(raw, ck, input_voxel_size=io.read_voxel_size(test + "/raw"), device="cpu")
    return ck, raw, gt, pred


def per_image(test):
    from spoco_vol.evaluation import evaluate_segmentation
    from spoco_vol.pipeline import labels_from_embeddings
    ck, raw, gt, pred = embeddings_of_test_sections(test)
    print("A. per image: VNC test sections 13-19, the bundled model's embeddings (512 x 512 each on the model grid)")
    print(f"{'method':<12}{'AP@0.5':>8}{'mAP':>7}{'#pred':>7}{'#gt':>6}{'s/image':>9}")
    for method in ("mws", "hdbscan", "meanshift"):
        timings = {}
        t = time.perf_counter()
        labels = labels_from_embeddings(pred.embeddings, ck, raw.shape, pred.scale, timings=timings,
                                        foreground=pred.foreground, clustering=method)
        seconds = timings.get("watershed", 0) + timings.get("affinities", 0)
        m = evaluate_segmentation(labels, gt, per_section=True)
        print(f"{method:<12}{m['ap@0.5']:>8.3f}{m['map']:>7.3f}{m['n_pred']:>7}{m['n_gt']:>6}"
              f"{seconds / raw.shape[0]:>9.2f}   (wall {time.perf_counter() - t:.0f} s)", flush=True)


def one_fit(test, method, n):
    """Cluster n foreground pixels' embeddings; prints the seconds."""
    from spoco_vol.clustering import _hdbscan, _meanshift
    from spoco_vol.segmentation import watershed_mask
    ck, _, _, pred = embeddings_of_test_sections(test)
    inf = ck.inference
    emb = pred.embeddings  # (E, Z, Y, X)
    points = []
    for z in range(emb.shape[1]):
        mask = watershed_mask(emb[:, z], ck.delta_d, background_embedding=inf.background_embedding,
                              background_radius=inf.background_radius)
        points.append(emb[:, z][:, mask].T)
    points = np.concatenate(points).astype(np.float64)
    if n > len(points):  # more than the sections hold: repeat them with a little noise
        reps = int(np.ceil(n / len(points)))
        points = np.concatenate([points + np.random.default_rng(r).normal(0, 0.01, points.shape)
                                 for r in range(reps)])
    points = points[np.random.default_rng(0).permutation(len(points))[:n]]
    t = time.perf_counter()
    labels = _hdbscan(points, ck.delta_v, inf.min_size) if method == "hdbscan" else _meanshift(points, ck.delta_v)
    print(json.dumps({"seconds": time.perf_counter() - t, "clusters": int(labels.max()) + 1}))


def scaling(test, sizes, limit):
    print(f"\nB. scaling: N foreground pixels' embeddings of those sections, one fit each (limit {limit} s)")
    print(f"{'method':<12}{'pixels':>9}{'seconds':>9}{'clusters':>9}")
    for method in ("hdbscan", "meanshift"):
        fits = []
        for n in sizes:
            try:
                res = subprocess.run([sys.executable, __file__, "--test", test, "--fit", method, str(n)],
                                     capture_output=True, text=True, timeout=limit)
                r = json.loads(res.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                print(f"{method:<12}{n:>9}{'> ' + str(limit):>9}", flush=True)
                break
            fits.append((n, r["seconds"]))
            print(f"{method:<12}{n:>9}{r['seconds']:>9.1f}{r['clusters']:>9}", flush=True)
        if len(fits) >= 2:
            (n0, t0), (n1, t1) = fits[-2], fits[-1]
            k = np.log(t1 / t0) / np.log(n1 / n0)
            at_ten_minutes = n1 * (600 / t1) ** (1 / k)
            print(f"{method}: time ~ N^{k:.2f} between {n0} and {n1} pixels; ten minutes at ~{at_ten_minutes:,.0f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--test", default="/tmp/vnc/vnc_test.zarr")
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000, 100000, 300000])
    p.add_argument("--limit", type=int, default=900, help="seconds per fit before giving up")
    p.add_argument("--fit", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.fit:
        return one_fit(a.test, a.fit[0], int(a.fit[1]))
    per_image(a.test)
    scaling(a.test, a.sizes, a.limit)


if __name__ == "__main__":
    main()
