"""Affinities -> objects: the Mutex Watershed (bioimage-cpp) and its clean-up.

``segment_embeddings`` is the whole per-block step as a pure function: embeddings in,
labels out (0 = background), deterministic (regular strides, never random ones).
"""
from __future__ import annotations

import time
from typing import Sequence

import fastremap
import numpy as np
from bioimage_cpp.segmentation import mutex_watershed as _bioimage_mws

from .affinities import embedding_affinities, number_of_attractive


def mutex_watershed(affinities: np.ndarray, offsets: Sequence[Sequence[int]],
                    strides: Sequence[int] | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """Mutex Watershed on SPOCO affinities w (1 = same object), labels from 1 (uint64).

    bioimage-cpp wants "higher = stronger" on both kinds of channel: w on the attractive
    channels and 1 - w on the mutex channels (passing w everywhere merges everything).
    Edges that leave the array carry w = 0 and are skipped by the library. Pixels where
    ``mask`` is False are background (0) and take part in no edge.
    """
    n_attr = number_of_attractive(offsets)
    weights = affinities.astype(np.float32, copy=True)
    weights[n_attr:] = 1.0 - weights[n_attr:]
    return _bioimage_mws(weights, [list(map(int, o)) for o in offsets], n_attr,
                         strides=list(strides) if strides is not None else None,
                         randomized_strides=False, mask=mask)


def segment_means(labels: np.ndarray, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mean embedding per id (n, E)) of every label in ``labels``."""
    flat = labels.reshape(-1)
    ids, inv = np.unique(flat, return_inverse=True)
    counts = np.bincount(inv, minlength=len(ids)).astype(np.float64)
    means = np.stack([np.bincount(inv, weights=ch.reshape(-1), minlength=len(ids)) / counts
                      for ch in embeddings], axis=1)
    return ids, means


def background_distance(embeddings: np.ndarray, background_embedding: Sequence[float]) -> np.ndarray:
    """Per-pixel distance to the background embedding, shape of the spatial axes."""
    emb = np.moveaxis(embeddings, 0, -1)
    diff = emb - np.asarray(background_embedding, dtype=emb.dtype)
    return np.sqrt(np.einsum("...e,...e->...", diff, diff))


def remove_background(labels: np.ndarray, embeddings: np.ndarray,
                      background_embedding: Sequence[float] | None, radius: float) -> np.ndarray:
    """Set to 0 the segments whose mean embedding lies within ``radius`` of the background's.

    With full supervision background is an object with its own cluster; in the sparse
    setting the checkpoint holds the dominant embedding of the unlabeled region instead.
    This catches background fragments whose pixels straddle the pixel-level radius.
    """
    if background_embedding is None:
        return labels
    ids, means = segment_means(labels, embeddings)
    dist = np.linalg.norm(means - np.asarray(background_embedding)[None], axis=1)
    bg = ids[(dist < radius) & (ids != 0)]
    if len(bg):
        labels = labels.copy()
        labels[np.isin(labels, bg)] = 0
    return labels


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Objects below ``min_size`` voxels become background (MWS leaves specks at borders)."""
    if min_size <= 1:
        return labels
    ids, counts = fastremap.unique(labels, return_counts=True)
    small = ids[(counts < min_size) & (ids != 0)]
    if len(small):
        labels = fastremap.mask(labels, small)
    return labels


def segment_embeddings(embeddings: np.ndarray, offsets: Sequence[Sequence[int]], delta_d: float, *,
                       strides: Sequence[int] | None = None,
                       background_embedding: Sequence[float] | None = None,
                       background_radius: float | None = None, min_size: int = 0,
                       timings: dict | None = None) -> np.ndarray:
    """Embeddings (E, *spatial) -> consecutive labels 1..N (uint64), 0 = background.

    Pixels within ``background_radius`` (default delta_d, halfway between the background
    cluster and objects pushed 2*delta_d away) of the background embedding are
    background before the watershed runs; the checkpoint stores a radius calibrated on
    held-out patches.
    """
    timings = timings if timings is not None else {}
    t = time.perf_counter()
    radius = delta_d if background_radius is None else background_radius
    mask = None
    if background_embedding is not None:
        mask = background_distance(embeddings, background_embedding) >= radius
    affs = embedding_affinities(embeddings, offsets, delta_d)
    t1 = time.perf_counter()
    timings["affinities"] = timings.get("affinities", 0.0) + t1 - t
    labels = mutex_watershed(affs, offsets, strides, mask=mask)
    labels = remove_background(labels, embeddings, background_embedding, radius=radius)
    labels = remove_small(labels, min_size)
    labels, _ = fastremap.renumber(labels, in_place=True)
    timings["watershed"] = timings.get("watershed", 0.0) + time.perf_counter() - t1
    return labels.astype(np.uint64, copy=False)
