"""Stitching block-local objects across block faces, and the global relabel table.

Id scheme (decided once, in writing): a block numbered ``linear`` (C order over the block
grid) labels its core objects ``linear * prod(block_shape) + 1 ... + n``. A core cannot
hold more objects than voxels, so ranges never overlap, and the largest id is below
the volume's voxel count rounded up to whole blocks: uint64 never overflows (2^64 is
1.8e19 voxels). Final ids are consecutive 1..N, numbered in the order of each merged
object's first fragment (block order, then local id), so they do not depend on the order
in which blocks finish.

Evidence that fragment a (lower block A) and b (upper block B) are one object comes from
data whose size grows with the face area, never the volume:
- agreement in the shared halo: A segments ``depth`` planes of B's core as part of its
  halo, and B segments ``depth`` planes of A's core; the Dice of (a, b) in each view;
- the affinity across the face: the mean direct-neighbour affinity between a's voxels on
  A's last core plane and b's on B's first.
"""
from __future__ import annotations

from typing import Sequence

import fastremap
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

LINK_OVERLAP = 0.5  # default --link-overlap (share of the smaller object); see benchmarks/RESULTS.md


def block_id_offset(linear: int, block_shape: Sequence[int]) -> int:
    return int(linear) * int(np.prod(block_shape))


def _pair_counts(a: np.ndarray, b: np.ndarray):
    """Overlap counts of label pairs where both are foreground: (pairs (n,2), counts (n,))."""
    m = (a != 0) & (b != 0)
    if not m.any():
        return np.zeros((0, 2), np.uint64), np.zeros(0, np.int64)
    pairs, counts = np.unique(np.stack([a[m], b[m]], axis=1).astype(np.uint64), axis=0, return_counts=True)
    return pairs, counts


def _sizes(labels: np.ndarray) -> dict:
    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))


def _dice_view(view: np.ndarray, own: np.ndarray, view_is_lower: bool) -> dict:
    """Dice of each (lower id, upper id) pair in one block's view of the other's core."""
    pairs, counts = _pair_counts(view, own)
    sv, so = _sizes(view), _sizes(own)
    out = {}
    for (v, o), c in zip(pairs.tolist(), counts.tolist()):
        key = (v, o) if view_is_lower else (o, v)
        out[key] = 2.0 * c / (sv[v] + so[o])
    return out


def stitch_faces(lower_halo: np.ndarray, upper_core: np.ndarray, upper_halo: np.ndarray,
                 lower_core: np.ndarray, face_affinity: np.ndarray, *,
                 min_agreement: float = 0.5, min_affinity: float = 0.5) -> np.ndarray:
    """Merge edges (n, 2) uint64 across one face, from the two blocks' evidence.

    ``lower_halo``: the lower block's labels over the upper block's first ``depth`` core
    planes (face axis first); ``upper_core``: the upper block's own labels there.
    ``upper_halo`` / ``lower_core``: the same over the lower block's last ``depth`` core
    planes. ``face_affinity``: direct-neighbour affinities between the lower block's
    last core plane and the upper block's first (the cross-section's shape).
    A pair merges when the two segmentations agree on it in the halos (mean Dice of the
    two views >= ``min_agreement``) and the face between them is attractive (mean
    affinity >= ``min_affinity``).
    """
    view_up = _dice_view(lower_halo, upper_core, view_is_lower=True)
    view_down = _dice_view(upper_halo, lower_core, view_is_lower=False)
    a_plane, b_plane = lower_core[-1], upper_core[0]
    m = (a_plane != 0) & (b_plane != 0)
    aff = {}
    if m.any():
        pairs, inv = np.unique(np.stack([a_plane[m], b_plane[m]], axis=1).astype(np.uint64), axis=0,
                               return_inverse=True)
        inv = inv.reshape(-1)
        means = np.bincount(inv, weights=face_affinity[m]) / np.bincount(inv)
        aff = dict(zip(map(tuple, pairs.tolist()), means.tolist()))
    edges = []
    for key in set(view_up) | set(view_down):
        agreement = 0.5 * (view_up.get(key, 0.0) + view_down.get(key, 0.0))
        if agreement >= min_agreement and aff.get(key, 0.0) >= min_affinity:
            edges.append(key)
    return np.array(sorted(edges), dtype=np.uint64).reshape(-1, 2)


def section_overlap_edges(lower: np.ndarray, upper: np.ndarray, min_overlap: float) -> np.ndarray:
    """Link edges (n, 2) between the objects of two consecutive sections (2D arrays):
    (a, b) when their overlap covers at least ``min_overlap`` of the smaller of the two.
    Relative to the smaller object, so a small piece joins the large one it sits on."""
    pairs, counts = _pair_counts(lower, upper)
    if not len(pairs):
        return pairs
    sl, su = _sizes(lower), _sizes(upper)
    smaller = np.array([min(sl[a], su[b]) for a, b in pairs.tolist()], dtype=np.float64)
    return pairs[counts / smaller >= min_overlap]


def link_sections(labels: np.ndarray, min_overlap: float) -> np.ndarray:
    """Per-section objects of a (Z, Y, X) array -> 3D objects: objects of consecutive
    sections that overlap (see ``section_overlap_edges``) become one. Ids of the result
    are those of each linked group's first object in (section, id) order, so the input's
    id ranges (and so the block id scheme) are kept."""
    edges = [section_overlap_edges(labels[z], labels[z + 1], min_overlap) for z in range(labels.shape[0] - 1)]
    edges = np.concatenate(edges) if edges else np.zeros((0, 2), np.uint64)
    if not len(edges):
        return labels
    # first occurrence order of the ids, section by section
    ids = np.concatenate([np.unique(labels[z][labels[z] != 0]) for z in range(labels.shape[0])])
    ids = ids[np.sort(np.unique(ids, return_index=True)[1])]
    index = {int(v): i for i, v in enumerate(ids.tolist())}
    rows = np.array([index[int(a)] for a in edges[:, 0]])
    cols = np.array([index[int(b)] for b in edges[:, 1]])
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(len(ids), len(ids)))
    _, comp = connected_components(graph, directed=False)
    first = np.full(comp.max() + 1, -1, np.int64)
    for i in range(len(ids) - 1, -1, -1):  # components take their first member's id
        first[comp[i]] = i
    new_ids = ids[first[comp]]
    return fastremap.remap(labels, dict(zip(ids.tolist(), new_ids.tolist())), preserve_missing_labels=True)


class MergeTable:
    """Final ids of every block's objects: ``table[b][l - 1]`` is the id of block b's
    object l. Two flat arrays (one entry per object, one offset per block), not one array
    per block: a terabyte run has ~500k blocks."""

    def __init__(self, final: np.ndarray, start: np.ndarray):
        self.final, self.start = final, start

    def __len__(self) -> int:
        return len(self.start) - 1

    def __getitem__(self, block: int) -> np.ndarray:
        return self.final[self.start[block]:self.start[block + 1]]

    def __iter__(self):
        return (self[b] for b in range(len(self)))

    @property
    def objects(self) -> int:
        """The number of final objects."""
        return int(self.final.max()) if len(self.final) else 0


def merge_table(objects_per_block: Sequence[int], block_shape: Sequence[int],
                edges: np.ndarray) -> MergeTable:
    """Final consecutive ids per block (MergeTable).

    Size: one entry per object, never per voxel. Components of the merge graph are
    numbered by their first fragment in (block, local id) order.
    """
    counts = np.asarray(objects_per_block, dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(counts)])
    n = int(start[-1])
    if n == 0:
        return MergeTable(np.zeros(0, np.uint64), start)
    size = int(np.prod(block_shape))
    edges = np.asarray(edges, dtype=np.uint64).reshape(-1, 2)
    # global id -> compact index: block = (id - 1) // size, local = (id - 1) % size + 1
    blk = ((edges - 1) // np.uint64(size)).astype(np.int64)
    loc = ((edges - 1) % np.uint64(size)).astype(np.int64)
    compact = start[blk] + loc
    graph = coo_matrix((np.ones(len(compact), np.int8), (compact[:, 0], compact[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    # scipy numbers components in order of their lowest node: consecutive and deterministic
    return MergeTable(component.astype(np.uint64) + np.uint64(1), start)


def relabel_block(fragments: np.ndarray, linear: int, block_shape: Sequence[int],
                  table: np.ndarray, dtype=np.uint64) -> np.ndarray:
    """Block fragments (global ids) -> final ids through the block's table."""
    out = np.zeros(fragments.shape, dtype=dtype)
    fg = fragments != 0
    if fg.any():
        local = fragments[fg] - np.uint64(block_id_offset(linear, block_shape) + 1)
        out[fg] = table[local.astype(np.int64)].astype(dtype)
    return out
