"""Embeddings -> long-range affinities, the input of the Mutex Watershed.

For offset o, channel c holds w_o(i) = [1 - ||e_i - e_{i+o}|| / (2 delta_d)]_+^2 (1 = same
object). Offsets are in numpy axis order and point backwards (negative), the
affogato/bioimage-cpp convention; pairs that leave the array get 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def default_offsets(dims: int, distances: Sequence[int] = (3, 9, 27),
                    axes: Sequence[int] | None = None) -> list[list[int]]:
    """Direct neighbours first (the attractive channels), then each long-range distance
    along each axis in ``axes`` (default: all; leave z out for thick-section EM)."""
    axes = list(range(dims)) if axes is None else list(axes)
    offsets = []
    for a in range(dims):
        o = [0] * dims
        o[a] = -1
        offsets.append(o)
    for d in distances:
        for a in axes:
            o = [0] * dims
            o[a] = -int(d)
            offsets.append(o)
    return offsets


def is_direct(offset: Sequence[int]) -> bool:
    """A direct-neighbour offset (one step along one axis): an attractive channel."""
    return sum(abs(int(v)) for v in offset) == 1


def number_of_attractive(offsets: Sequence[Sequence[int]]) -> int:
    """Offsets of length one (direct neighbours) lead the list and are attractive."""
    n = 0
    for o in offsets:
        if not is_direct(o):
            break
        n += 1
    return n


def pair_slices(shape: Sequence[int], offset: Sequence[int]):
    """Slices (target, source) so that target[i] pairs voxel i with voxel i + offset."""
    tgt, src = [], []
    for n, o in zip(shape, offset):
        k = min(abs(int(o)), n)  # an offset longer than the axis pairs nothing
        if o >= 0:
            tgt.append(slice(0, n - k))
            src.append(slice(k, n))
        else:
            tgt.append(slice(k, n))
            src.append(slice(0, n - k))
    return tuple(tgt), tuple(src)


def embedding_affinities(embeddings: np.ndarray, offsets: Sequence[Sequence[int]],
                         delta_d: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Affinities (len(offsets), *spatial) float32 from embeddings (E, *spatial).

    ``mask``: pixels that take part in the watershed. Edges touching a pixel outside it
    are never used, so they are left 0 and only pairs inside the mask are computed (in
    EM, mitochondria cover a few percent of the pixels).
    """
    spatial = embeddings.shape[1:]
    if any(len(o) != len(spatial) for o in offsets):
        raise ValueError(f"offsets {offsets} do not fit {len(spatial)}D embeddings")
    out = np.zeros((len(offsets), *spatial), dtype=np.float32)
    scale = 1.0 / (2.0 * delta_d)
    if mask is not None:
        # Few pixels: gather each pair's two embeddings (E, n) straight from the E-major array.
        emb = np.asarray(embeddings, dtype=np.float32)
        for c, o in enumerate(offsets):
            tgt, src = pair_slices(spatial, o)
            both = mask[tgt] & mask[src]
            diff = emb[(slice(None), *tgt)][:, both] - emb[(slice(None), *src)][:, both]
            dist = np.sqrt(np.einsum("en,en->n", diff, diff))
            out[(c, *tgt)][both] = np.square(np.clip(1.0 - dist * scale, 0.0, None))
        return out
    # Pixel-major layout: the norm over E then reduces contiguous memory (16x faster).
    emb = np.ascontiguousarray(np.moveaxis(embeddings, 0, -1), dtype=np.float32)
    for c, o in enumerate(offsets):
        tgt, src = pair_slices(spatial, o)
        diff = emb[tgt] - emb[src]
        dist = np.sqrt(np.einsum("...e,...e->...", diff, diff))
        out[(c, *tgt)] = np.square(np.clip(1.0 - dist * scale, 0.0, None))
    return out
