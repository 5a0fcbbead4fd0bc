"""Affinities -> objects: the Mutex Watershed (bioimage-cpp) and its clean-up.

``segment_embeddings`` is the whole per-block step as a pure function: embeddings in,
labels out (0 = background), deterministic (regular strides, never random ones).
"""
from __future__ import annotations

from typing import Sequence

import fastremap
import numpy as np
from bioimage_cpp.segmentation import mutex_watershed as _bioimage_mws

from .affinities import embedding_affinities, number_of_attractive


def mutex_watershed(affinities: np.ndarray, offsets: Sequence[Sequence[int]],
                    strides: Sequence[int] | None = None) -> np.ndarray:
    """Mutex Watershed on SPOCO affinities w (1 = same object), labels from 1 (uint64).

    bioimage-cpp wants "higher = stronger" on both kinds of channel: w on the attractive
    channels and 1 - w on the mutex channels (passing w everywhere merges everything).
    Edges that leave the array carry w = 0 and are skipped by the library.
    """
    n_attr = number_of_attractive(offsets)
    weights = affinities.astype(np.float32, copy=True)
    weights[n_attr:] = 1.0 - weights[n_attr:]
    return _bioimage_mws(weights, [list(map(int, o)) for o in offsets], n_attr,
                         strides=list(strides) if strides is not None else None,
                         randomized_strides=False)


def segment_means(labels: np.ndarray, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mean embedding per id (n, E)) of every label in ``labels``."""
    flat = labels.reshape(-1)
    ids, inv = np.unique(flat, return_inverse=True)
    counts = np.bincount(inv, minlength=len(ids)).astype(np.float64)
    means = np.stack([np.bincount(inv, weights=ch.reshape(-1), minlength=len(ids)) / counts
                      for ch in embeddings], axis=1)
    return ids, means


def remove_background(labels: np.ndarray, embeddings: np.ndarray,
                      background_embedding: Sequence[float] | None, radius: float) -> np.ndarray:
    """Set to 0 the segments whose mean embedding lies within ``radius`` of the background's.

    With full supervision background is an object with its own cluster; in the sparse
    setting the checkpoint holds the dominant embedding of the unlabeled region instead.
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
                       min_size: int = 0) -> np.ndarray:
    """Embeddings (E, *spatial) -> consecutive labels 1..N (uint64), 0 = background."""
    affs = embedding_affinities(embeddings, offsets, delta_d)
    labels = mutex_watershed(affs, offsets, strides)
    labels = remove_background(labels, embeddings, background_embedding, radius=delta_d)
    labels = remove_small(labels, min_size)
    labels, _ = fastremap.renumber(labels, in_place=True)
    return labels.astype(np.uint64, copy=False)
