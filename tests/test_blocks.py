"""Block grid geometry: cores tile the volume exactly, read ROIs add the halo, faces."""
import numpy as np
import pytest

from spoco_vol.blocks import BlockGrid
from spoco_vol.errors import SpocoInputError


def test_cores_tile_the_volume_once_and_reads_add_the_halo():
    grid = BlockGrid((10, 33, 20), (4, 16, 20), (0, 5, 3))
    assert grid.grid_shape == (3, 3, 1) and len(grid) == 9
    cover = np.zeros((10, 33, 20), int)
    for b in grid:
        cover[b.core] += 1
        for c, r, h, n in zip(b.core, b.read, grid.halo, grid.shape):
            assert r.start == max(c.start - h, 0) and r.stop == min(c.stop + h, n)
        inner = tuple(slice(s.start, s.stop) for s in b.core_in_read)
        assert tuple(s.stop - s.start for s in inner) == b.core_shape
    assert (cover == 1).all()
    assert [b.linear for b in grid] == list(range(9))


def test_faces_pair_each_neighbour_once():
    grid = BlockGrid((8, 8), (4, 4), (1, 1))
    faces = [(a.index, b.index, ax) for a, b, ax in grid.faces()]
    assert sorted(faces) == sorted([((0, 0), (1, 0), 0), ((0, 1), (1, 1), 0),
                                    ((0, 0), (0, 1), 1), ((1, 0), (1, 1), 1)])
    assert [f for f in grid.faces(axes=[1])] and all(ax == 1 for _, _, ax in grid.faces(axes=[1]))


def test_bad_grid_parameters():
    with pytest.raises(SpocoInputError):
        BlockGrid((8, 8), (4,), (1, 1))
    with pytest.raises(SpocoInputError):
        BlockGrid((8, 8), (0, 4), (1, 1))


def test_read_rois_start_on_the_alignment_grid():
    grid = BlockGrid((40, 100), (10, 30), (3, 7), align=(1, 16))
    for b in grid:
        assert b.read[1].start % 16 == 0
        assert b.core[1].start - b.read[1].start >= min(7, b.core[1].start)  # still at least the halo


def test_parse_roi_and_blocks_in_roi():
    from spoco_vol.blocks import parse_roi
    assert parse_roi("1:3,:,10:", (4, 50, 60)) == (slice(1, 3), slice(0, 50), slice(10, 60))
    for bad, msg in (("0:2,0:5", "needs 3 ranges"), ("0:2,5:5,:", "empty"), ("0:2,0:99,:", "outside"),
                     ("0:2,a:b,:", "not a range"), ("0:2,3,:", "not a range")):
        with pytest.raises(SpocoInputError, match=msg):
            parse_roi(bad, (4, 50, 60))
    grid = BlockGrid((4, 50, 60), (2, 20, 20), (0, 4, 4))
    roi = parse_roi(":,25:45,0:20", grid.shape)
    assert [b.index for b in grid.blocks(roi)] == [(0, 1, 0), (0, 2, 0), (1, 1, 0), (1, 2, 0)]
    pairs = [(lo.index, up.index, a) for lo, up, a in grid.faces([1, 2], roi)]
    assert pairs == [((0, 1, 0), (0, 2, 0), 1), ((1, 1, 0), (1, 2, 0), 1)]
    assert len(grid.blocks(None)) == len(grid)
