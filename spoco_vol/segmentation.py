"""Affinities -> objects: the Mutex Watershed (bioimage-cpp) and its clean-up.

``segment_embeddings`` is the whole per-block step as a pure function: embeddings in,
labels out (0 = background), deterministic (regular strides, never random ones).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
from bioimage_cpp.segmentation import mutex_watershed as _bioimage_mws

from .affinities import embedding_affinities, number_of_attractive


def library_weights(affinities: np.ndarray, offsets: Sequence[Sequence[int]], copy: bool = True) -> np.ndarray:
    """SPOCO affinities w (1 = same object) -> bioimage-cpp's weights: "higher = stronger"
    on both kinds of channel, so w on the attractive channels and 1 - w on the mutex ones
    (passing w everywhere merges everything)."""
    n_attr = number_of_attractive(offsets)
    weights = affinities.astype(np.float32, copy=copy)
    weights[n_attr:] = 1.0 - weights[n_attr:]
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
    radius = delta_d if background_radius is None else background_radius
    mask = None
    if background_embedding is not None:
        mask = background_distance(embeddings, background_embedding) >= radius
    if foreground is not None:
        if foreground.shape != embeddings.shape[1:]:
            raise ValueError(f"foreground {foreground.shape} does not fit embeddings {embeddings.shape}")
        mask = (foreground >= foreground_threshold) if mask is None else mask & (foreground >= foreground_threshold)
    inside = None if mask is None else np.flatnonzero(mask)
    weights = library_weights(embedding_affinities(embeddings, offsets, delta_d, mask), offsets, copy=False)
    t1 = time.perf_counter()
    timings["affinities"] = timings.get("affinities", 0.0) + t1 - t
    labels = mutex_watershed(None, offsets, strides, mask=mask, weights=weights)
    labels = clean_up_segments(labels, min_size, inside)
    timings["watershed"] = timings.get("watershed", 0.0) + time.perf_counter() - t1
    return labels
