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

That is exact where objects are kept apart by background (mitochondria, nuclei), but the
Mutex Watershed is not local: in tissue of touching cells a block can merge two cells
that the whole volume keeps apart, because the repulsive chain that separates them runs
beyond its halo. The graph seams (``--seams graph``) do not decide locally:
- fragments: a core voxel's fragment is the set of core voxels that *every* block view
  covering it (its own, and its neighbours' halos) puts in one segment, cut into pieces
  that touch (``intersect_views``). A merge made for want of context in one view is cut
  by the view that has the context;
- edges: between fragments, the strongest attractive and the strongest repulsive edge of
  the voxel graph (``fragment_edges``), from affinities exact in each core;
- one Mutex Watershed over the graph of all fragments (``graph_merge_table``).
If the fragments refine the whole volume's partition, this gives that partition exactly:
the Mutex Watershed on the contracted graph takes the same decisions in the same order
(an edge inside a fragment joins voxels the whole run joins anyway, and of the parallel
edges between two fragments only the strongest of each kind can change anything).
"""
from __future__ import annotations

from typing import Sequence

import fastremap
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage import measure

from .affinities import is_direct
from .segmentation import clean_up_segments

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

    def __init__(self, final: np.ndarray, start: np.ndarray, clusters: int | None = None):
        self.final, self.start = final, start
        # groups the fragments were merged into, before a size floor dropped any
        self.clusters = int(final.max()) if clusters is None and len(final) else (clusters or 0)

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


def _fragment_index(objects_per_block: Sequence[int], block_shape: Sequence[int]):
    """(each block's first row in the table, the number of fragments, a function from
    global fragment ids to table rows 0..n-1)."""
    start = np.concatenate([[0], np.cumsum(np.asarray(objects_per_block, dtype=np.int64))])
    size = np.uint64(int(np.prod(block_shape)))

    def index(ids: np.ndarray) -> np.ndarray:
        # global id -> block = (id - 1) // size, local = (id - 1) % size + 1
        return start[((ids - 1) // size).astype(np.int64)] + ((ids - 1) % size).astype(np.int64)
    return start, int(start[-1]), index


def merge_table(objects_per_block: Sequence[int], block_shape: Sequence[int],
                edges: np.ndarray) -> MergeTable:
    """Final consecutive ids per block (MergeTable).

    Size: one entry per object, never per voxel. Components of the merge graph are
    numbered by their first fragment in (block, local id) order.
    """
    start, n, index = _fragment_index(objects_per_block, block_shape)
    if n == 0:
        return MergeTable(np.zeros(0, np.uint64), start)
    compact = index(np.asarray(edges, dtype=np.uint64).reshape(-1, 2))
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


# ----------------------------------------------------------------------------- graph seams

def intersect_views(own: np.ndarray,
                    views: Sequence[tuple[tuple[slice, ...], np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """A block's fragments: (labels 1..n over its core, uint64, 0 = background; voxel
    count of each, (n,) int64). ``own``: the block's own segments over its core (0 =
    background: its embeddings are exact there, so it alone decides the background);
    ``views``: (region of the core, another block's segments there). Two core voxels
    share a fragment when every view puts them in one segment (or leaves both out) and
    they are connected through such voxels (direct neighbours). Fragments are numbered
    in order of their first voxel (C order): deterministic."""
    key = np.asarray(own, np.int64)
    for region, labels in views:
        full = np.zeros(own.shape, np.int64)  # 0: the view does not reach here
        full[region] = np.asarray(labels, np.int64) + 1
        # pair (key, view label) -> one compact integer; renumbering keeps values small
        key, _ = fastremap.renumber(key * (int(full.max()) + 1) + full, preserve_zero=False)
        key = key.astype(np.int64, copy=False)
    # The watershed's segments are connected (it merges along direct neighbours only), so
    # a fragment's pieces that do not touch are cut too: a few voxels of one cell can be
    # left in another's fragment where all views err alike, and one such voxel would
    # join the two cells in the graph.
    key = measure.label(np.where(np.asarray(own) != 0, key + 1, 0), background=0, connectivity=1)
    out = clean_up_segments(key)  # consecutive, in order of first voxel
    return out, np.bincount(out.reshape(-1).astype(np.int64))[1:]


def _max_per_pair(uv: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (n, 2) with u < v and weights -> each pair once, with its largest weight."""
    if not len(uv):
        return np.zeros((0, 2), np.uint64), np.zeros(0, np.float64)
    pairs, inv = np.unique(uv, axis=0, return_inverse=True)
    best = np.full(len(pairs), -np.inf)
    np.maximum.at(best, inv.reshape(-1), w)
    return pairs.astype(np.uint64), best


def fragment_edges(fragments: np.ndarray, core: Sequence[slice], affinities: np.ndarray,
                   offsets: Sequence[Sequence[int]], *, origin: Sequence[int],
                   bias: Sequence[float] | None = None, strides: Sequence[int] | None = None) -> dict:
    """The fragment graph's edges owned by one block: ``{"attractive": (uv, w),
    "repulsive": (uv, w)}``, uv (n, 2) uint64 with u < v, each pair once with its
    strongest edge (only that one can change the Mutex Watershed's decisions).

    ``fragments``: global fragment ids over a region around the core (0 = background),
    reaching every voxel a core voxel's offsets pair it with inside the volume;
    ``core``: the core within that region; ``affinities`` (C, *core shape): channel c at
    voxel i pairs i with i + offsets[c] (the affinity convention); ``origin``: the
    region's first voxel in the volume, which places the strides' grid. Edge kinds as
    segmentation.segment_affinities: without ``bias`` (the SPOCO split) direct offsets
    attract with w and long-range ones repel with 1 - w, as the grid watershed takes
    them; with a bias, value = w + bias attracts when positive and repels when negative.
    ``strides``: long-range edges only from voxels on the volume's stride grid."""
    kinds = {"attractive": ([], []), "repulsive": ([], [])}
    core_shape = tuple(c.stop - c.start for c in core)
    for c, o in enumerate(offsets):
        # the pairs (i, i + o) with i in the core and i + o inside the region
        lo = [max(s.start, -v) - s.start for s, v in zip(core, o)]
        hi = [min(s.stop, n - v) - s.start for s, v, n in zip(core, o, fragments.shape)]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        at = tuple(slice(l, h) for l, h in zip(lo, hi))  # in the core
        u = fragments[tuple(slice(s.start + l, s.start + h) for s, l, h in zip(core, lo, hi))]
        v = fragments[tuple(slice(s.start + l + d, s.start + h + d) for s, l, h, d in zip(core, lo, hi, o))]
        w = np.asarray(affinities[(c, *at)], np.float64)
        keep = (u != 0) & (v != 0) & (u != v)
        if strides is not None and not is_direct(o):
            grid = np.ones(w.shape, bool)
            for a, (s, l, h) in enumerate(zip(core, lo, hi)):
                coord = np.arange(origin[a] + s.start + l, origin[a] + s.start + h)
                shape = [1] * len(core_shape)
                shape[a] = len(coord)
                grid &= (coord % int(strides[a]) == 0).reshape(shape)
            keep &= grid
        if bias is None:
            kind, value = ("attractive", w) if is_direct(o) else ("repulsive", 1.0 - w)
            sel = {kind: keep}
            values = {kind: value}
        else:
            value = w + float(bias[c])
            sel = {"attractive": keep & (value > 0), "repulsive": keep & (value < 0)}
            values = {"attractive": value, "repulsive": -value}
        for kind, m in sel.items():
            if m.any():
                a, b = u[m].astype(np.uint64), v[m].astype(np.uint64)
                kinds[kind][0].append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
                kinds[kind][1].append(values[kind][m])
    out = {}
    for kind, (uv, w) in kinds.items():
        out[kind] = _max_per_pair(np.concatenate(uv) if uv else np.zeros((0, 2), np.uint64),
                                  np.concatenate(w) if w else np.zeros(0))
    return out


def graph_merge_table(objects_per_block: Sequence[int], block_shape: Sequence[int], attractive, repulsive,
                      sizes: np.ndarray, min_size: int = 0) -> MergeTable:
    """Final ids of every block's fragments (MergeTable) from one Mutex Watershed over the
    graph of all fragments. ``attractive``/``repulsive``: (uv (n, 2) global fragment ids,
    weights), as fragment_edges gives them (pairs may repeat across blocks);
    ``sizes``: voxels per fragment in table order. Objects below ``min_size`` voxels
    become background (id 0), as the whole volume's clean-up makes them; the others are
    numbered 1..N by their first fragment in (block, local id) order."""
    from bioimage_cpp.graph import UndirectedGraph
    from bioimage_cpp.graph.mutex_watershed import mutex_watershed_clustering

    start, n, index = _fragment_index(objects_per_block, block_shape)
    if n == 0:
        return MergeTable(np.zeros(0, np.uint64), start)

    def compact(uv):
        return index(np.asarray(uv, np.uint64).reshape(-1, 2)).astype(np.uint64)

    a_uv, a_w = _max_per_pair(compact(attractive[0]), np.asarray(attractive[1], np.float64))
    r_uv, r_w = _max_per_pair(compact(repulsive[0]), np.asarray(repulsive[1], np.float64))
    graph = UndirectedGraph(n)
    ids = graph.insert_edges(a_uv) if len(a_uv) else np.zeros(0, np.int64)
    costs = np.zeros(graph.number_of_edges, np.float64)
    costs[np.asarray(ids, np.int64)] = a_w
    cluster = np.asarray(mutex_watershed_clustering(graph, costs, r_uv, r_w), np.int64)
    # clusters -> objects: drop the small ones, number the rest by their first fragment
    _, cluster = np.unique(cluster, return_inverse=True)
    cluster = cluster.reshape(-1)
    voxels = np.bincount(cluster, weights=np.asarray(sizes, np.float64), minlength=cluster.max() + 1)
    first = np.full(len(voxels), n, np.int64)
    np.minimum.at(first, cluster, np.arange(n))
    kept = voxels >= max(min_size, 1)
    order = np.argsort(first, kind="stable")
    final = np.zeros(len(voxels), np.uint64)
    ranked = order[kept[order]]
    final[ranked] = np.arange(1, len(ranked) + 1, dtype=np.uint64)
    return MergeTable(final[cluster], start, clusters=len(voxels))
