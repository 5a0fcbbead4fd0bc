"""Affinities -> objects: the Mutex Watershed (bioimage-cpp) and its clean-up.

``segment_embeddings`` is the whole per-block step as a pure function: embeddings in,
labels out (0 = background), deterministic (regular strides, never random ones).
``segment_affinities`` is the same step on affinities from anywhere (another network,
saved ones), with mwatershed's bias convention.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
from bioimage_cpp.segmentation import mutex_watershed as _bioimage_mws

from .affinities import embedding_affinities, is_direct, number_of_attractive, pair_slices


def library_weights(affinities: np.ndarray, offsets: Sequence[Sequence[int]], copy: bool = True) -> np.ndarray:
    """SPOCO affinities w (1 = same object) -> bioimage-cpp's weights: "higher = stronger"
    on both kinds of channel, so w on the attractive channels and 1 - w on the mutex ones
    (passing w everywhere merges everything)."""
    n_attr = number_of_attractive(offsets)
    weights = affinities.astype(np.float32, copy=copy)
    np.subtract(np.float32(1), weights[n_attr:], out=weights[n_attr:])
    return weights


def mutex_watershed(affinities: np.ndarray, offsets: Sequence[Sequence[int]],
                    strides: Sequence[int] | None = None, mask: np.ndarray | None = None,
                    weights: np.ndarray | None = None) -> np.ndarray:
    """Mutex Watershed on SPOCO affinities w (1 = same object), labels from 1 (uint64).

    Edges that leave the array carry w = 0 and are skipped by the library. Pixels where
    ``mask`` is False are background (0) and take part in no edge. ``weights``: the
    affinities already in the library's convention (``library_weights``), if at hand.
    """
    weights = library_weights(affinities, offsets) if weights is None else weights
    return _bioimage_mws(weights, [list(map(int, o)) for o in offsets], number_of_attractive(offsets),
                         strides=list(strides) if strides is not None else None,
                         randomized_strides=False, mask=mask)


def background_distance(embeddings: np.ndarray, background_embedding: Sequence[float]) -> np.ndarray:
    """Per-pixel distance to the background embedding, shape of the spatial axes."""
    emb = np.moveaxis(embeddings, 0, -1)
    diff = emb - np.asarray(background_embedding, dtype=emb.dtype)
    return np.sqrt(np.einsum("...e,...e->...", diff, diff))


def watershed_mask(embeddings: np.ndarray, delta_d: float, *, background_embedding: Sequence[float] | None = None,
                   background_radius: float | None = None, foreground: np.ndarray | None = None,
                   foreground_threshold: float = 0.5) -> np.ndarray | None:
    """The pixels that take part in the watershed (None: all): those at least
    ``background_radius`` (default delta_d) from the background embedding, and where a
    foreground classifier's probability reaches ``foreground_threshold``."""
    radius = delta_d if background_radius is None else background_radius
    mask = None
    if background_embedding is not None:
        mask = background_distance(embeddings, background_embedding) >= radius
    if foreground is not None:
        if foreground.shape != embeddings.shape[1:]:
            raise ValueError(f"foreground {foreground.shape} does not fit embeddings {embeddings.shape}")
        mask = (foreground >= foreground_threshold) if mask is None else mask & (foreground >= foreground_threshold)
    return mask


def clean_up_segments(labels: np.ndarray, min_size: int = 0, foreground: np.ndarray | None = None) -> np.ndarray:
    """Watershed segments -> consecutive labels 1..N (uint64) in order of first
    occurrence, 0 = background; segments below ``min_size`` voxels (specks at borders)
    become background. ``foreground``: flat indices of the only pixels that can be
    nonzero (the watershed's mask), if known: with the background masked the watershed
    is fast, and a pass over the whole array would cost more than it does.

    (Background segments are removed by the pixel mask alone. Also removing segments
    whose mean embedding lies near the background changed no label on VNC, for the full
    and the 10% models, and cost more than the watershed; see benchmarks/RESULTS.md.)
    """
    flat = labels.reshape(-1)
    fg = np.flatnonzero(flat) if foreground is None else foreground
    ids, first, inv, counts = np.unique(flat[fg], return_index=True, return_inverse=True, return_counts=True)
    keep = (counts >= max(min_size, 1)) & (ids != 0)
    order = np.argsort(first, kind="stable")
    kept = order[keep[order]]
    rank = np.zeros(len(ids), np.uint64)
    rank[kept] = np.arange(1, len(kept) + 1, dtype=np.uint64)
    out = np.zeros(labels.shape, np.uint64)
    out.reshape(-1)[fg] = rank[inv]
    return out


def segment_embeddings(embeddings: np.ndarray, offsets: Sequence[Sequence[int]], delta_d: float, *,
                       strides: Sequence[int] | None = None,
                       background_embedding: Sequence[float] | None = None,
                       background_radius: float | None = None, min_size: int = 0,
                       foreground: np.ndarray | None = None, foreground_threshold: float = 0.5,
                       timings: dict | None = None) -> np.ndarray:
    """Embeddings (E, *spatial) -> consecutive labels 1..N (uint64), 0 = background.

    Pixels within ``background_radius`` (default delta_d, halfway between the background
    cluster and objects pushed 2*delta_d away) of the background embedding are
    background before the watershed runs; the checkpoint stores a radius calibrated on
    held-out patches. ``foreground``: per-pixel object probabilities (spatial shape) of
    a foreground classifier (spoco_vol.foreground); pixels below ``foreground_threshold``
    are background as well.
    """
    timings = timings if timings is not None else {}
    t = time.perf_counter()
    mask = watershed_mask(embeddings, delta_d, background_embedding=background_embedding,
                          background_radius=background_radius, foreground=foreground,
                          foreground_threshold=foreground_threshold)
    inside = None if mask is None else np.flatnonzero(mask)
    weights = library_weights(embedding_affinities(embeddings, offsets, delta_d, mask), offsets, copy=False)
    t1 = time.perf_counter()
    timings["affinities"] = timings.get("affinities", 0.0) + t1 - t
    labels = mutex_watershed(None, offsets, strides, mask=mask, weights=weights)
    labels = clean_up_segments(labels, min_size, inside)
    timings["watershed"] = timings.get("watershed", 0.0) + time.perf_counter() - t1
    return labels


def default_bias(offsets: Sequence[Sequence[int]]) -> list[float]:
    """mwatershed's bias that equals the SPOCO split (w attractive, 1 - w mutex): 0 on
    the direct-neighbour offsets, -1 on the long-range ones."""
    return [0.0 if is_direct(o) else -1.0 for o in offsets]


def segment_affinities(affinities: np.ndarray, offsets: Sequence[Sequence[int]], *,
                       bias: Sequence[float] | None = None, strides: Sequence[int] | None = None,
                       mask: np.ndarray | None = None, min_size: int = 0, timings: dict | None = None) -> np.ndarray:
    """Affinities (C, *spatial) in [0, 1] (1 = same object; channel c pairs voxel i with
    i + offsets[c]) -> consecutive labels 1..N (uint64), 0 = background (outside ``mask``,
    or in segments below ``min_size``).

    ``bias``, per channel, as mwatershed and volara take it: an edge's value is
    affinity + bias; a positive value merges, a negative one forbids the merge, and edges
    are taken in descending |value|. The default (0 on direct offsets, -1 on long-range
    ones) is the SPOCO split and runs bioimage-cpp's grid Mutex Watershed; any other bias
    runs its graph Mutex Watershed on edges typed by their sign. ``strides`` thin out the
    repulsive edges on a regular grid, as in segment_embeddings.
    """
    timings = timings if timings is not None else {}
    t = time.perf_counter()
    offsets = [tuple(int(v) for v in o) for o in offsets]
    if len(offsets) != affinities.shape[0]:
        raise ValueError(f"{affinities.shape[0]} affinity channels but {len(offsets)} offsets")
    split = default_bias(offsets)
    bias = split if bias is None else [float(b) for b in bias]
    if len(bias) != len(offsets):
        raise ValueError(f"{len(bias)} bias values for {len(offsets)} offsets")
    inside = None if mask is None else np.flatnonzero(mask)
    if bias == split:
        # Direct offsets first: the library takes the leading channels as attractive.
        order = sorted(range(len(offsets)), key=lambda c: not is_direct(offsets[c]))
        ordered = [offsets[c] for c in order]
        # indexing by ``order`` makes the one copy, turned in place into the library's convention
        weights = library_weights(np.asarray(affinities)[order], ordered, copy=False)
        labels = mutex_watershed(None, ordered, strides, mask=mask, weights=weights)
    else:
        labels = _graph_mutex_watershed(np.asarray(affinities, np.float64), offsets, bias, strides, mask)
    labels = clean_up_segments(labels, min_size, inside)
    timings["watershed"] = timings.get("watershed", 0.0) + time.perf_counter() - t
    return labels


def _graph_mutex_watershed(affinities, offsets, bias, strides, mask) -> np.ndarray:
    """The Mutex Watershed with per-edge types: value = affinity + bias, > 0 attractive,
    < 0 mutex (strided on the long-range offsets), 0 no edge; voxels as graph nodes."""
    from bioimage_cpp.graph import UndirectedGraph
    from bioimage_cpp.graph.mutex_watershed import mutex_watershed_clustering

    spatial = affinities.shape[1:]
    node = np.arange(int(np.prod(spatial)), dtype=np.uint64).reshape(spatial)
    on_stride = None
    if strides is not None:  # the voxels whose long-range edges are kept
        on_stride = np.zeros(spatial, bool)
        on_stride[tuple(slice(None, None, int(s)) for s in strides)] = True
    attractive, repulsive = ([], []), ([], [])
    for c, o in enumerate(offsets):
        tgt, src = pair_slices(spatial, o)
        value = affinities[(c, *tgt)] + bias[c]
        keep = np.ones(value.shape, bool) if mask is None else mask[tgt] & mask[src]
        if on_stride is not None and not is_direct(o):
            keep &= on_stride[tgt]
        for kind, sel in ((attractive, keep & (value > 0)), (repulsive, keep & (value < 0))):
            kind[0].append(np.stack([node[tgt][sel], node[src][sel]], axis=1))
            kind[1].append(np.abs(value[sel]))
    uv = np.concatenate(attractive[0])
    graph = UndirectedGraph(len(node.reshape(-1)))
    edge_ids = graph.insert_edges(uv) if len(uv) else np.zeros(0, np.int64)
    costs = np.zeros(graph.number_of_edges, np.float64)
    # an edge met along two offsets keeps its strongest value
    np.maximum.at(costs, np.asarray(edge_ids, np.int64), np.concatenate(attractive[1]))
    labels = mutex_watershed_clustering(graph, costs, np.concatenate(repulsive[0]), np.concatenate(repulsive[1]))
    labels = np.asarray(labels, np.uint64).reshape(spatial) + np.uint64(1)
    if mask is not None:
        labels[~mask] = 0
    return labels
