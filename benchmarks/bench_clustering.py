"""Clustering choices on the same embeddings (spoco_vol.clustering vs the Mutex
Watershed): accuracy and seconds per image, and how the pixel-clustering methods scale.

A. Per image: a model's embeddings of a test volume's sections (default: the bundled
   model on the VNC test sections 13-19, each one image of 512 x 512 on the model grid),
   segmented by each method with the model's background rule (or the ground truth's
   foreground, --gt-mask); AP@0.5 of the 2D objects, SBD and |DiC| against the ground
   truth, and the seconds of the clustering step alone (prediction excluded: the same
   for all). Consistency clustering when the checkpoint keeps its momentum network.
   Then how compact the true objects are in embedding space (``object_spread``).
B. Scaling: HDBSCAN and mean-shift on N foreground pixels' embeddings (drawn from those
   sections), for growing N, in a fresh process each, with a time limit; the fitted
   exponent says where a method reaches ten minutes (spoco_vol.clustering.MAX_PIXELS).

    python benchmarks/bench_clustering.py [--test /tmp/vnc/vnc_test.zarr] [--sizes 10000 30000 100000]
    python benchmarks/bench_clustering.py --part A --test /tmp/cvppp/cvppp_test.zarr \
        --model /tmp/cvppp/runs/full/best.pt --gt-mask --images 5
"""
import argparse
import json
import subprocess
import sys
import time

import numpy as np


def embeddings_of_test_sections(test, model=None, images=None, gt_mask=False, momentum=False):
    """The model's embeddings of the test volume's first ``images`` sections (all: None),
    with the ground truth's foreground as the mask if ``gt_mask``, and the momentum
    network's embeddings if ``momentum`` (consistency clustering)."""
    from spoco_vol import bundled, checkpoint, io
    from spoco_vol.pipeline import predict_array
    ck = checkpoint.load(bundled.model_path(model))
    raw = io.open_volume(test + "/raw")
    at = slice(None, images)
    raw = np.asarray(raw[:, at] if ck.in_channels > 1 else raw[at])  # channels first
    gt = np.asarray(io.open_volume(test + "/labels")[at])
    g = None
    if momentum:
        from spoco_vol.inference import for_inference
        g = ck.momentum_network()
        g = for_inference(g) if g is not None else None
    pred = predict_array(raw, ck, input_voxel_size=io.read_voxel_size(test + "/raw"), device="cpu",
                         mask=gt > 0 if gt_mask else None, momentum_net=g)
    return ck, raw, gt, pred


def per_image(test, model=None, images=None, gt_mask=False):
    from spoco_vol.evaluation import evaluate_segmentation
    from spoco_vol.pipeline import labels_from_embeddings
    ck, raw, gt, pred = embeddings_of_test_sections(test, model, images, gt_mask, momentum=True)
    methods = ("mws", "hdbscan", "meanshift") + (("consistency",) if pred.momentum is not None else ())
    print(f"A. per image: {test}, sections 0-{len(gt) - 1}, model {model or 'bundled'}"
          f"{', ground-truth foreground as the mask' if gt_mask else ''}"
          f"{'' if pred.momentum is not None else ' (no momentum network: no consistency clustering)'}")
    print(f"{'method':<12}{'AP@0.5':>8}{'mAP':>7}{'SBD':>7}{'|DiC|':>7}{'#pred':>7}{'#gt':>6}{'s/image':>9}")
    spatial = raw.shape[-3:]
    for method in methods:
        timings = {}
        t = time.perf_counter()
        labels = labels_from_embeddings(pred.embeddings, ck, spatial, pred.scale, timings=timings,
                                        foreground=pred.foreground, clustering=method, momentum=pred.momentum)
        seconds = timings.get("watershed", 0) + timings.get("affinities", 0)
        m = evaluate_segmentation(labels, gt, per_section=True)
        print(f"{method:<12}{m['ap@0.5']:>8.3f}{m['map']:>7.3f}{m['sbd']:>7.3f}{m['abs_dic']:>7.2f}{m['n_pred']:>7}"
              f"{m['n_gt']:>6}{seconds / len(gt):>9.2f}   (wall {time.perf_counter() - t:.0f} s)", flush=True)
    spread = object_spread(pred.embeddings, gt, pred.scale)
    p, n = spread["pixel_to_mean"], spread["nearest_other_mean"]
    print(f"objects in embedding space: pixel to the object's mean, median {p[1]:.2f} (10th-90th percentile "
          f"{p[0]:.2f}-{p[2]:.2f}; delta_v {ck.delta_v})" + ("" if n is None else
          f"; the object's mean to the nearest other's in its section, median {n[1]:.2f} ({n[0]:.2f}-{n[2]:.2f}; "
          f"2 delta_d {2 * ck.delta_d})"))


def object_spread(embeddings: np.ndarray, gt: np.ndarray, scale) -> dict:
    """How compact the ground truth's objects are in embedding space, per section: for
    each object the median distance of its pixels to its mean embedding, and the distance
    from its mean to the nearest other object's mean in the same section (clusters in
    embedding space keep objects apart when the first is within delta_v and the second
    beyond 2 delta_d). Each input pixel takes its model-grid pixel's embedding, as
    segmentation maps them (pipeline.model_grid_index; ``scale``: input to model grid)."""
    from spoco_vol.pipeline import model_grid_index
    at = np.ix_(*(model_grid_index(np.arange(n), n, m, s)
                  for n, m, s in zip(gt.shape[1:], embeddings.shape[2:], scale[-2:])))
    spread, nearest = [], []
    for z in range(gt.shape[0]):
        e, lab = embeddings[:, z][(slice(None), *at)].reshape(len(embeddings), -1), gt[z].ravel()
        means = []
        for i in np.unique(lab[lab != 0]):
            v = e[:, lab == i].astype(np.float64)
            means.append(v.mean(1))
            spread.append(np.median(np.linalg.norm(v - means[-1][:, None], axis=0)))
        if len(means) > 1:
            d = np.linalg.norm(np.array(means)[:, None] - np.array(means)[None], axis=-1)
            np.fill_diagonal(d, np.inf)
            nearest += list(d.min(1))
    return {"pixel_to_mean": np.percentile(spread, [10, 50, 90]),
            "nearest_other_mean": np.percentile(nearest, [10, 50, 90]) if nearest else None}


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
    p.add_argument("--model", help="a bundled model's name or a checkpoint [default: the bundled VNC model]")
    p.add_argument("--images", type=int, help="the first N sections of --test only [default: all]")
    p.add_argument("--gt-mask", action="store_true", help="the ground truth's foreground as the mask (CVPPP 'GT FG')")
    p.add_argument("--part", choices=["A", "B", "AB"], default="AB")
    p.add_argument("--fit", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.fit:
        return one_fit(a.test, a.fit[0], int(a.fit[1]))
    if "A" in a.part:
        per_image(a.test, a.model, a.images, a.gt_mask)
    if "B" in a.part:
        scaling(a.test, a.sizes, a.limit)


if __name__ == "__main__":
    main()
