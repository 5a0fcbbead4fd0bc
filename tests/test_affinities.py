"""Tests for spoco_vol.affinities: offsets and embedding affinities against a brute force."""
import itertools

import numpy as np
import pytest

from spoco_vol.affinities import pair_slices, default_offsets, embedding_affinities, number_of_attractive


def test_default_offsets_2d():
    assert default_offsets(2) == [[-1, 0], [0, -1], [-3, 0], [0, -3], [-9, 0], [0, -9],
                                  [-27, 0], [0, -27]]


def test_default_offsets_3d_and_axes():
    offs = default_offsets(3, distances=(4, 8))
    assert offs[:3] == [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]  # direct neighbours first
    assert offs[3:] == [[-4, 0, 0], [0, -4, 0], [0, 0, -4], [-8, 0, 0], [0, -8, 0], [0, 0, -8]]
    # thick sections: no long-range z offsets, but the direct z neighbour stays
    offs = default_offsets(3, distances=(3,), axes=[1, 2])
    assert offs == [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -3, 0], [0, 0, -3]]


def test_number_of_attractive():
    assert number_of_attractive(default_offsets(2)) == 2
    assert number_of_attractive(default_offsets(3)) == 3
    assert number_of_attractive(default_offsets(3, axes=[1, 2])) == 3
    assert number_of_attractive([[-1, 0], [0, -3], [0, -1]]) == 1  # only the leading ones
    assert number_of_attractive([[-1, -1], [0, -1]]) == 0           # a diagonal is not direct
    assert number_of_attractive([[0, 1], [1, 0]]) == 2               # sign does not matter
    assert number_of_attractive([]) == 0


def brute_force(emb, offsets, delta_d):
    spatial = emb.shape[1:]
    out = np.zeros((len(offsets), *spatial), np.float64)
    for c, o in enumerate(offsets):
        for i in itertools.product(*[range(s) for s in spatial]):
            j = tuple(a + b for a, b in zip(i, o))
            if all(0 <= v < s for v, s in zip(j, spatial)):
                d = np.sqrt(sum((float(emb[(e, *i)]) - float(emb[(e, *j)])) ** 2
                                for e in range(emb.shape[0])))
                out[(c, *i)] = max(0.0, 1.0 - d / (2 * delta_d)) ** 2
    return out


@pytest.mark.parametrize("dims, shape, offsets", [
    (2, (4, 7, 9), [[-1, 0], [0, -1], [-3, 0], [0, -4], [2, 1], [-2, 3], [1, -1], [0, 8],
                    [0, -9], [7, 0]]),
    (3, (3, 4, 5, 6), [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -3, 0], [1, 2, -2], [-2, 0, 3],
                       [0, 0, 5], [4, 0, 0]]),
])
def test_embedding_affinities_brute_force(dims, shape, offsets):
    rng = np.random.default_rng(dims)
    emb = rng.normal(0, 0.6, shape).astype(np.float32)
    # piecewise constant along the first axis: some exact 1s, plus the random part
    emb[:, :2] = emb[:, :1]
    delta_d = 0.75
    affs = embedding_affinities(emb, offsets, delta_d)
    assert affs.shape == (len(offsets), *shape[1:]) and affs.dtype == np.float32
    ref = brute_force(emb, offsets, delta_d)
    np.testing.assert_allclose(affs, ref, rtol=1e-5, atol=1e-6)
    # the test covers all regimes: identical, partial and clipped pairs
    assert (affs == 1).any() and ((affs > 0) & (affs < 1)).any() and (ref == 0).any()


def test_pairs_leaving_the_array_are_zero():
    emb = np.zeros((2, 5, 6), np.float32)  # all identical: every pair inside has w = 1
    offs = [[-1, 0], [0, 2], [-2, -3], [3, 1], [0, -6], [5, 0]]
    a = embedding_affinities(emb, offs, 1.0)
    np.testing.assert_array_equal(a[0, 0], 0)
    np.testing.assert_array_equal(a[0, 1:], 1)
    np.testing.assert_array_equal(a[1, :, 4:], 0)
    np.testing.assert_array_equal(a[1, :, :4], 1)
    np.testing.assert_array_equal(a[2, :2], 0)
    np.testing.assert_array_equal(a[2, :, :3], 0)
    np.testing.assert_array_equal(a[2, 2:, 3:], 1)
    np.testing.assert_array_equal(a[3, 2:], 0)
    np.testing.assert_array_equal(a[3, :, 5], 0)
    np.testing.assert_array_equal(a[3, :2, :5], 1)
    np.testing.assert_array_equal(a[4], 0)  # offsets as long as the axis: nothing inside
    np.testing.assert_array_equal(a[5], 0)
    assert a[1].sum() == 5 * 4 and a[2].sum() == 3 * 3 and a[3].sum() == 2 * 5


def test_known_values():
    emb = np.zeros((1, 1, 4), np.float32)
    emb[0, 0] = [0.0, 1.0, 3.0, 3.5]
    a = embedding_affinities(emb, [[0, -1]], delta_d=1.0)
    # distances 1, 2, 0.5 -> (1 - d/2)^2 = 0.25, 0, 0.5625
    np.testing.assert_allclose(a[0, 0], [0.0, 0.25, 0.0, 0.5625])


def test_offsets_at_least_twice_the_axis():
    """|o| >= 2n happens to give two empty slices: all zero (the n < |o| < 2n case is a bug)."""
    emb = np.zeros((2, 5, 6), np.float32)
    a = embedding_affinities(emb, [[-27, 0], [0, 30], [10, -12]], 1.0)
    np.testing.assert_array_equal(a, 0)


def test_offset_dimension_mismatch():
    with pytest.raises(ValueError, match="do not fit 2D"):
        embedding_affinities(np.zeros((2, 4, 4), np.float32), [[-1, 0, 0]], 1.0)


@pytest.mark.parametrize("offset", [[-7, 0], [0, -8], [8, 0], [0, 9], [-6, 7]])
def test_offsets_longer_than_the_axis(offset):
    emb = np.random.default_rng(0).normal(size=(3, 5, 6)).astype(np.float32)
    a = embedding_affinities(emb, [[-1, 0], offset], 1.0)
    assert a.shape == (2, 5, 6)
    np.testing.assert_array_equal(a[1], 0)  # no pair lies inside the array
    np.testing.assert_allclose(a[0], brute_force(emb, [[-1, 0]], 1.0)[0], rtol=1e-5, atol=1e-6)


def test_masked_affinities_are_the_full_ones_inside_the_mask():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(4, 9, 11)).astype(np.float32)
    mask = rng.random((9, 11)) > 0.4
    offsets = default_offsets(2, distances=(3,))
    full = embedding_affinities(emb, offsets, 1.0)
    part = embedding_affinities(emb, offsets, 1.0, mask)
    for c, o in enumerate(offsets):
        partner = np.zeros_like(mask)  # mask at i + o, False where it leaves the array
        tgt, src = pair_slices(mask.shape, o)
        partner[tgt] = mask[src]
        both = mask & partner
        np.testing.assert_array_equal(part[c][both], full[c][both])
        assert not part[c][~both].any()
