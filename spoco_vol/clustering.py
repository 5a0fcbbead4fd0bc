"""Embeddings -> objects by clustering the pixels' embeddings directly, the alternatives
to the Mutex Watershed the SPOCO paper compares with (``segment --clustering``):

- ``hdbscan``: HDBSCAN (the ``hdbscan`` package; scikit-learn's fails with a non-zero
  cluster_selection_epsilon on NumPy 2, scikit-learn issue 33219) over the foreground
  pixels' embeddings, minimum cluster size ``min_size`` and cluster_selection_epsilon =
  delta_v (the paper's);
- ``meanshift``: mean-shift with bandwidth delta_v (the paper's), seeded on a grid of
  bins (scikit-learn's ``bin_seeding``) so that it does not start one search per pixel;
- ``consistency``: the paper's consistency clustering (appendix A.4): mean-shift
  clusters of the trained network f, each kept only if the momentum network g agrees
  with it: g's soft masks around the cluster's pixels (within delta_v of their g
  embedding) overlap the cluster with median IoU >= 0.6.

All three merge clusters whose mean embeddings lie closer than delta_d (objects are
pushed 2*delta_d apart, so two such clusters are one object; the paper's post-step),
then split each cluster into its connected pieces: the push term only separates objects
that meet in a training patch, so two mitochondria far apart in a section can share an
embedding (on two sections of the bundled VNC sample, HDBSCAN scored AP@0.5 0.49
without this split and 0.83 with it, the watershed 0.84; the watershed, which only
joins neighbours, needs no such step). Clusters below ``min_size``
pixels are dropped, and the checkpoint's background rule applies first (pixels within
its radius of the background embedding, or called background by a foreground
classifier, are 0), as it does for the watershed.

They look at every pair of foreground pixels' embeddings, not at pixels' neighbours:
time and memory grow faster than linearly with the number of pixels, and the clusters
of a block depend on the rest of the block, so they run on whole arrays only (small
volumes, 2D images). ``MAX_PIXELS`` is the measured limit on this machine's kind
(benchmarks/RESULTS.md, "Clustering"); above it a clear error, not an hour's wait.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage import measure

from .errors import SpocoInputError
from .segmentation import clean_up_segments, watershed_mask

METHODS = ("mws", "hdbscan", "meanshift", "consistency")
# Foreground pixels per image at which a method takes about ten minutes on one core of
# this project's CI machine (benchmarks/bench_clustering.py; RESULTS.md "Clustering"):
# mean-shift measured 202 s at 100k pixels, growing as N^1.24, so ~240k; consistency
# clustering starts from mean-shift and compares masks on top. HDBSCAN measured 24 s at
# 300k pixels and 177 s at 1M, growing as N^1.67, so ~2M.
MAX_PIXELS = {"hdbscan": 2_000_000, "meanshift": 240_000, "consistency": 200_000}
CONSISTENCY_IOU = 0.6   # the paper's: median IoU of g's masks with an f cluster to keep it
CONSISTENCY_SAMPLES = 32  # pixels of a cluster whose g masks are compared with it


def merge_close_clusters(points: np.ndarray, assignment: np.ndarray, distance: float) -> np.ndarray:
    """Cluster ids (-1 = noise) -> ids after joining clusters whose mean embeddings lie
    closer than ``distance`` (transitively), numbered from 0 in order of first pixel."""
    ids = np.unique(assignment[assignment >= 0])
    if len(ids) == 0:
        return assignment
    means = np.stack([points[assignment == i].mean(0) for i in ids])
    d = np.sqrt(((means[:, None] - means[None]) ** 2).sum(-1))
    from scipy.sparse.csgraph import connected_components
    _, comp = connected_components(d < distance, directed=False)
    lut = np.full(int(ids.max()) + 1, -1, np.int64)
    lut[ids] = comp
    return np.where(assignment >= 0, lut[np.maximum(assignment, 0)], -1)


def _check_size(method: str, n: int) -> None:
    if n > MAX_PIXELS[method]:
        raise SpocoInputError(f"--clustering {method} is limited to {MAX_PIXELS[method]:,} foreground pixels per "
                              f"image (this image has {n:,}; about ten minutes of one core at the limit, and its "
                              "time grows faster than the pixels): use --clustering mws (the default, blockwise), "
                              "or a smaller --roi")


def _hdbscan(points: np.ndarray, delta_v: float, min_size: int) -> np.ndarray:
    import hdbscan
    return hdbscan.HDBSCAN(min_cluster_size=max(2, int(min_size)),
                           cluster_selection_epsilon=float(delta_v)).fit_predict(points)


def _meanshift(points: np.ndarray, delta_v: float) -> np.ndarray:
    from sklearn.cluster import MeanShift
    return MeanShift(bandwidth=float(delta_v), bin_seeding=True, cluster_all=True).fit_predict(points)


def _consistent(points_f: np.ndarray, points_g: np.ndarray, assignment: np.ndarray, delta_v: float,
                rng: np.random.Generator) -> np.ndarray:
    """Keep the f clusters g agrees with (module docstring); the others become noise."""
    out = assignment.copy()
    for c in np.unique(assignment[assignment >= 0]):
        members = assignment == c
        picks = rng.choice(np.flatnonzero(members), size=min(CONSISTENCY_SAMPLES, int(members.sum())),
                           replace=False)
        ious = []
        for p in picks:
            g_mask = ((points_g - points_g[p]) ** 2).sum(1) < delta_v ** 2
            ious.append((g_mask & members).sum() / max((g_mask | members).sum(), 1))
        if np.median(ious) < CONSISTENCY_IOU:
            out[members] = -1
    return out


def cluster_embeddings(embeddings: np.ndarray, method: str, *, delta_v: float, delta_d: float, min_size: int = 0,
                       background_embedding: Sequence[float] | None = None, background_radius: float | None = None,
                       foreground: np.ndarray | None = None, foreground_threshold: float = 0.5,
                       g_embeddings: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Embeddings (E, *spatial) -> consecutive labels 1..N (uint64), 0 = background, by
    ``method`` (hdbscan, meanshift or consistency; the module docstring). Consistency
    clustering needs the momentum network's embeddings ``g_embeddings`` of the same image."""
    if method not in METHODS[1:]:
        raise SpocoInputError(f"--clustering must be one of {', '.join(METHODS)}, got {method!r}")
    mask = watershed_mask(embeddings, delta_d, background_embedding=background_embedding,
                          background_radius=background_radius, foreground=foreground,
                          foreground_threshold=foreground_threshold)  # the same pixels as the watershed's
    inside = np.flatnonzero(mask) if mask is not None else np.arange(int(np.prod(embeddings.shape[1:])))
    _check_size(method, len(inside))
    labels = np.zeros(embeddings.shape[1:], np.int64)
    if len(inside) >= 2:
        points = embeddings.reshape(embeddings.shape[0], -1)[:, inside].T.astype(np.float64)
        if method == "hdbscan":
            assignment = _hdbscan(points, delta_v, min_size)
        else:
            assignment = _meanshift(points, delta_v)
        if method == "consistency":
            if g_embeddings is None or g_embeddings.shape != embeddings.shape:
                raise SpocoInputError("--clustering consistency needs the momentum network's embeddings of the "
                                      "same image (a checkpoint trained with the consistency term keeps it)")
            points_g = g_embeddings.reshape(g_embeddings.shape[0], -1)[:, inside].T.astype(np.float64)
            assignment = _consistent(points, points_g, assignment, delta_v, np.random.default_rng(seed))
        assignment = merge_close_clusters(points, assignment, delta_d)
        labels.reshape(-1)[inside] = assignment + 1  # noise (-1) -> 0
        labels = measure.label(labels, background=0, connectivity=1)  # the connected pieces of each cluster
    return clean_up_segments(labels.astype(np.uint64), min_size)
