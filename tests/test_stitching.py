"""Face stitching, graph seams and the global merge table (pure functions)."""
import numpy as np
import pytest

from spoco_vol.affinities import default_offsets
from spoco_vol.segmentation import default_bias, segment_affinities
from spoco_vol.stitching import (block_id_offset, fragment_edges, graph_merge_table, intersect_views,
                                 link_sections, merge_table, relabel_block, section_overlap_edges, stitch_faces)
from test_blockwise_affinities import touching_cells
from test_segmentation import noisy_affinities


def test_agreeing_views_and_attractive_face_merge():
    # one object crossing the face: A calls it 5, B calls it 9; a second object only in B
    lower_halo = np.zeros((2, 6), np.uint64)
    lower_halo[:, :3] = 5
    upper_core = np.zeros((2, 6), np.uint64)
    upper_core[:, :3] = 9
    upper_core[:, 4:] = 10
    upper_halo = np.zeros((2, 6), np.uint64)
    upper_halo[:, :3] = 9
    lower_core = np.zeros((2, 6), np.uint64)
    lower_core[:, :3] = 5
    aff = np.ones(6, np.float32)
    edges = stitch_faces(lower_halo, upper_core, upper_halo, lower_core, aff)
    assert edges.tolist() == [[5, 9]]
    # a repulsive face keeps them apart even when the halos agree
    assert len(stitch_faces(lower_halo, upper_core, upper_halo, lower_core, aff * 0.1)) == 0
    # disagreeing halos keep them apart even when the face is attractive
    other = upper_halo.copy()
    other[:, :3] = 0
    bad_lower_halo = lower_halo.copy()
    bad_lower_halo[:, :3] = 0
    assert len(stitch_faces(bad_lower_halo, upper_core, other, lower_core, aff)) == 0


def test_merge_table_is_consecutive_and_order_independent():
    block_shape = (4, 4)
    size = 16
    counts = [2, 3, 0, 1]
    # block 0 object 2 == block 1 object 1 == block 3 object 1
    edges = np.array([[2, size + 1], [size + 1, 3 * size + 1]], np.uint64)
    tables = merge_table(counts, block_shape, edges)
    assert [t.tolist() for t in tables] == [[1, 2], [2, 3, 4], [], [2]]
    shuffled = merge_table(counts, block_shape, edges[::-1, ::-1])
    assert all((a == b).all() for a, b in zip(tables, shuffled))
    assert [t.tolist() for t in merge_table(counts, block_shape, np.zeros((0, 2), np.uint64))] == \
        [[1, 2], [3, 4, 5], [], [6]]


def test_relabel_block_maps_through_the_table():
    offset = block_id_offset(3, (2, 2))
    frag = np.array([[0, offset + 1], [offset + 2, offset + 1]], np.uint64)
    out = relabel_block(frag, 3, (2, 2), np.array([7, 8], np.uint64), dtype=np.uint32)
    assert out.dtype == np.uint32 and out.tolist() == [[0, 7], [8, 7]]


def test_section_overlap_edges_relative_to_the_smaller_object():
    lower = np.zeros((6, 6), np.uint64)
    upper = np.zeros((6, 6), np.uint64)
    lower[:, :3] = 5        # 18 px
    upper[:2, :2] = 9       # 4 px, all on 5: joined
    upper[4:, 2:6] = 11     # 8 px, 2 on 5 (25% of the smaller): not joined at 0.5
    edges = section_overlap_edges(lower, upper, 0.5)
    assert edges.tolist() == [[5, 9]]
    assert sorted(map(tuple, section_overlap_edges(lower, upper, 0.25).tolist())) == [(5, 9), (5, 11)]


def test_link_sections_joins_overlapping_objects_and_keeps_first_ids():
    lab = np.zeros((4, 8, 8), np.uint64)
    lab[0, :4, :4] = 3
    lab[1, 1:5, 1:5] = 7     # on 3
    lab[2, 1:5, 1:5] = 8     # on 7
    lab[2, 6:, 6:] = 9       # alone
    lab[3, 6:, 6:] = 2       # on 9; keeps id 9, the group's first object
    out = link_sections(lab, 0.5)
    assert set(np.unique(out[:3][lab[:3] > 0])) == {3, 9}
    assert (out[:3][np.isin(lab[:3], [3, 7, 8])] == 3).all()
    assert (out[lab == 2] == 9).all() and (out[lab == 9] == 9).all()
    assert (out[lab == 0] == 0).all()
    assert np.array_equal(link_sections(lab[:1], 0.5), lab[:1])  # one section: nothing to link


def test_intersect_views_cuts_what_any_view_cuts():
    """A fragment is what every view covering it keeps together; the block's own view
    alone decides the background; fragments are numbered by their first voxel."""
    own = np.array([[1, 1, 1, 1], [1, 1, 0, 2]])
    right = np.array([[7, 8], [7, 8]])  # a neighbour's view over the last two columns cuts 1
    local, sizes = intersect_views(own, [((slice(None), slice(2, 4)), right)])
    assert local.tolist() == [[1, 1, 2, 3], [1, 1, 0, 4]]
    assert sizes.tolist() == [4, 1, 1, 1]
    # a view that agrees everywhere cuts nothing, nor does one that sees only background
    full = (slice(None), slice(None))
    same, _ = intersect_views(own, [(full, own * 3), (full, np.zeros((2, 4), int))])
    assert same.tolist() == [[1, 1, 1, 1], [1, 1, 0, 2]]
    # a view's edge cuts: which views cover a voxel is part of what its fragment is
    half, _ = intersect_views(own, [((slice(0, 1), slice(None)), np.zeros((1, 4), int))])
    assert half.tolist() == [[1, 1, 1, 1], [2, 2, 0, 3]]
    # pieces of one label pair that do not touch are fragments of their own
    apart, _ = intersect_views(np.ones((1, 5), int), [((slice(None), slice(None)), np.array([[5, 6, 6, 6, 5]]))])
    assert apart.tolist() == [[1, 2, 2, 2, 3]]
    empty, sizes = intersect_views(np.zeros((2, 2), int), [])
    assert not empty.any() and len(sizes) == 0


def _split_into_fragments(labels, cut):
    """Fragments that refine ``labels``: each object cut by a grid of ``cut`` voxels."""
    cells = np.zeros(labels.shape, np.int64)
    for a, n in enumerate(labels.shape):
        shape = [1] * labels.ndim
        shape[a] = n
        cells = cells * 100 + (np.arange(n) // cut).reshape(shape)
    key = labels.astype(np.int64) * 10 ** 7 + cells
    _, frag = np.unique(key, return_inverse=True)
    frag = frag.reshape(labels.shape).astype(np.uint64) + 1
    frag[labels == 0] = 0
    return frag


@pytest.mark.parametrize("strides, bias", [(None, None), ([2, 2, 2], None), (None, "shifted")])
def test_the_watershed_over_refining_fragments_is_the_voxel_watershed(strides, bias):
    """The lemma the graph seams stand on: for fragments that refine the Mutex Watershed's
    partition, one Mutex Watershed over the fragment graph (each pair's strongest
    attractive and repulsive edge) gives that partition exactly; with strided repulsive
    edges, and with sign-typed edges of a bias."""
    gt = touching_cells(shape=(16, 40, 40), n=12, seed=3)
    offsets = default_offsets(3, distances=(3, 9))
    aff = noisy_affinities(gt, offsets, noise=2.0, seed=1)
    if bias == "shifted":  # the graph path of segment_affinities, a hair off the SPOCO split
        bias = [b + 1e-9 for b in default_bias(offsets)]
    whole = segment_affinities(aff, offsets, bias=bias, strides=strides, min_size=0)
    assert whole.max() > 5  # a partition with something to get wrong
    frag = _split_into_fragments(whole, cut=7)
    n = int(frag.max())
    core = tuple(slice(0, k) for k in gt.shape)
    edges = fragment_edges(frag, core, aff, offsets, origin=(0, 0, 0), bias=bias, strides=strides)
    assert len(edges["attractive"][0]) and len(edges["repulsive"][0])
    assert (edges["attractive"][0][:, 0] < edges["attractive"][0][:, 1]).all()
    sizes = np.bincount(frag.reshape(-1).astype(np.int64), minlength=n + 1)[1:]
    table = graph_merge_table([n], gt.shape, edges["attractive"], edges["repulsive"], sizes)
    labels = relabel_block(frag, 0, gt.shape, table[0])
    pairs = np.unique(np.stack([labels.reshape(-1), whole.reshape(-1)]), axis=1)
    assert len(pairs[0]) == len(np.unique(whole)) == len(np.unique(labels))  # a bijection: the same partition
    # fragments that do NOT refine it (two whole-volume objects in one fragment) cannot be undone
    merged = frag.copy()
    merged[whole == whole.max()] = frag[whole == 1].reshape(-1)[0]
    _, merged = np.unique(merged, return_inverse=True)
    merged = merged.reshape(gt.shape).astype(np.uint64)
    m = int(merged.max())
    e = fragment_edges(merged, core, aff, offsets, origin=(0, 0, 0), bias=bias, strides=strides)
    t = graph_merge_table([m + 1], gt.shape, e["attractive"], e["repulsive"],
                          np.bincount(merged.reshape(-1).astype(np.int64), minlength=m + 2)[1:])
    assert t.objects < len(np.unique(whole))


def test_fragment_edges_of_a_core_reach_into_the_region_around_it():
    """Edges are owned by the voxel that holds the affinity (the core's); the other end
    may lie around the core; the strides' grid is the volume's (``origin``)."""
    frag = np.array([[1, 1, 2, 2, 3, 3]], np.uint64)
    offsets = [[0, -1], [0, -2]]
    core = (slice(0, 1), slice(2, 4))  # voxels 2, 3 of the region; voxel 2 pairs with 1 and 0
    aff = np.array([[[0.9, 0.8]], [[0.3, 0.6]]], np.float32)
    e = fragment_edges(frag, core, aff, offsets, origin=(0, 0))
    assert e["attractive"][0].tolist() == [[1, 2]] and e["attractive"][1].tolist() == pytest.approx([0.9])
    # long-range: voxel 2 -> 0 (1, 2) with 1 - 0.3; voxel 3 -> 1 (1, 2) with 1 - 0.6: the strongest is kept
    assert e["repulsive"][0].tolist() == [[1, 2]] and e["repulsive"][1].tolist() == pytest.approx([0.7])
    # strides 2 from an origin of 1: voxel 2 sits at 3 in the volume, off the grid; voxel 3 at 4, on it
    e = fragment_edges(frag, core, aff, offsets, origin=(0, 1), strides=[1, 2])
    assert e["repulsive"][1].tolist() == pytest.approx([0.4])


def test_graph_merge_table_drops_small_objects_and_numbers_by_first_fragment():
    """Two blocks of 2 and 1 fragments: (b0:1, b1:1) attract, b0:2 is alone and small."""
    block_shape = (1, 4)
    size = 4
    f = lambda block, local: block * size + local  # noqa: E731 - global fragment ids
    attractive = (np.array([[f(0, 1), f(1, 1)]], np.uint64), np.array([0.9]))
    repulsive = (np.array([[f(0, 2), f(1, 1)]], np.uint64), np.array([0.5]))
    table = graph_merge_table([2, 1], block_shape, attractive, repulsive, np.array([3, 1, 2]), min_size=2)
    assert table[0].tolist() == [1, 0] and table[1].tolist() == [1]
    assert table.objects == 1 and table.clusters == 2
