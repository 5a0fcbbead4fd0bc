"""Face stitching and the global merge table (pure functions)."""
import numpy as np

from spoco_vol.stitching import (block_id_offset, link_sections, merge_table, relabel_block,
                                 section_overlap_edges, stitch_faces)


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
