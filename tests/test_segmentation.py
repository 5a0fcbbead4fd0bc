"""Tests for spoco_vol.segmentation: embeddings -> Mutex Watershed -> clean labels."""
import numpy as np
import pytest

from spoco_vol.affinities import default_offsets
from spoco_vol.affinities import pair_slices
from spoco_vol.segmentation import (
    clean_up_segments, default_bias, mutex_watershed, segment_affinities, segment_embeddings,
)

DELTA_D = 1.0
CENTRES = {0: [0, 0, 0, 0], 1: [3, 0, 0, 0], 2: [0, 3, 0, 0], 3: [0, 0, 3, 0], 4: [0, 0, 0, 3]}


def _embed(gt, noise=0.05, seed=0):
    """Piecewise-constant embeddings (one centre per GT id) plus small Gaussian noise."""
    rng = np.random.default_rng(seed)
    emb = np.zeros((4, *gt.shape), np.float32)
    for k, c in CENTRES.items():
        emb[:, gt == k] = np.asarray(c, np.float32)[:, None]
    return emb + rng.normal(0, noise, emb.shape).astype(np.float32)


def two_cubes():
    gt = np.zeros((10, 12, 18), np.uint8)
    gt[2:8, 2:8, 2:8] = 1
    gt[2:8, 2:8, 8:14] = 2  # touches cube 1 along x
    return gt


def two_squares():
    gt = np.zeros((20, 26), np.uint8)
    gt[4:12, 4:12] = 1
    gt[4:12, 12:20] = 2    # touches square 1 along x
    gt[12:18, 6:14] = 3    # touches both from below
    return gt


def offsets(ndim):
    """Distances that fit the small test arrays (the defaults are tested separately)."""
    return default_offsets(ndim, distances=(3, 9))


def one_to_one(gt, pred):
    """Each GT region is exactly one predicted id, and different regions different ids."""
    mapping = {}
    for k in np.unique(gt):
        ids = np.unique(pred[gt == k])
        assert len(ids) == 1, f"GT region {k} split into {ids}"
        mapping[int(k)] = int(ids[0])
    assert len(set(mapping.values())) == len(mapping), f"regions merged: {mapping}"
    return mapping


def assert_consecutive(labels):
    ids = set(np.unique(labels).tolist()) - {0}
    assert ids == set(range(1, len(ids) + 1))


@pytest.mark.parametrize("case, strides", [("3d", None), ("3d", [2, 2, 2]), ("2d", None),
                                           ("2d", [2, 2])])
def test_segment_touching_objects(case, strides):
    gt = two_cubes() if case == "3d" else two_squares()
    offs = offsets(gt.ndim)
    labels = segment_embeddings(_embed(gt), offs, DELTA_D, strides=strides)
    assert labels.shape == gt.shape and labels.dtype == np.uint64
    mapping = one_to_one(gt, labels)
    assert sorted(mapping.values()) == list(range(1, len(mapping) + 1))  # background is a segment too
    assert 0 not in mapping.values()
    assert_consecutive(labels)


@pytest.mark.parametrize("case", ["3d", "2d"])
def test_segment_is_deterministic_with_strides(case):
    gt = two_cubes() if case == "3d" else two_squares()
    emb = _embed(gt, noise=0.3, seed=1)  # noisy enough for ties and specks to matter
    offs = offsets(gt.ndim)
    strides = [3] * gt.ndim
    a = segment_embeddings(emb, offs, DELTA_D, strides=strides)
    b = segment_embeddings(emb.copy(), offs, DELTA_D, strides=strides)
    np.testing.assert_array_equal(a, b)
    assert_consecutive(a)


@pytest.mark.parametrize("case", ["3d", "2d"])
def test_background_embedding_removes_background_only(case):
    gt = two_cubes() if case == "3d" else two_squares()
    emb = _embed(gt)
    labels = segment_embeddings(emb, offsets(gt.ndim), DELTA_D, strides=[2] * gt.ndim,
                                background_embedding=CENTRES[0])
    assert (labels[gt == 0] == 0).all()
    assert (labels[gt > 0] > 0).all()
    mapping = one_to_one(gt, labels)
    n = int(gt.max())
    assert mapping[0] == 0 and sorted(mapping[k] for k in range(1, n + 1)) == list(range(1, n + 1))
    # a background embedding near no segment removes nothing
    kept = segment_embeddings(emb, offsets(gt.ndim), DELTA_D, strides=[2] * gt.ndim,
                              background_embedding=[-5, -5, -5, -5])
    assert (kept > 0).all() and kept.max() == n + 1


def test_remove_small_in_segment_embeddings():
    gt = two_squares()
    gt[0:2, 22:24] = 4  # a 4-pixel object
    emb = _embed(gt)
    offs = offsets(2)
    labels = segment_embeddings(emb, offs, DELTA_D, min_size=4)
    assert len(np.unique(labels)) == 5 and labels.max() == 5
    one_to_one(gt, labels)
    labels = segment_embeddings(emb, offs, DELTA_D, min_size=5)
    assert (labels[gt == 4] == 0).all()
    assert labels.max() == 4 and (labels[gt != 4] > 0).all()
    assert_consecutive(labels)
    one_to_one(gt[gt != 4], labels[gt != 4])


def test_clean_up_segments():
    lab = np.array([[1, 1, 1, 2], [3, 3, 0, 2], [5, 5, 5, 5]], np.uint64)
    # small segments (2 and 3 have 2 pixels) go, the rest is renumbered in order of appearance
    out = clean_up_segments(lab, min_size=3)
    np.testing.assert_array_equal(out, [[1, 1, 1, 0], [0, 0, 0, 0], [2, 2, 2, 2]])
    assert out.dtype == np.uint64 and lab[0, 3] == 2  # input untouched
    np.testing.assert_array_equal(clean_up_segments(np.array([[9, 9, 0, 7]], np.uint64)), [[1, 1, 0, 2]])
    # with the watershed's foreground given, only those pixels are looked at
    left = np.zeros(lab.shape, bool)
    left[:, :2] = True
    np.testing.assert_array_equal(clean_up_segments(lab, 0, np.flatnonzero(left)),
                                  [[1, 1, 0, 0], [2, 2, 0, 0], [3, 3, 0, 0]])
    assert not clean_up_segments(np.zeros((2, 2), np.uint64)).any()


def test_mutex_watershed_convention():
    """w = 1 means 'same object' on every channel (the function inverts the mutex ones)."""
    offs = default_offsets(2, distances=(3,))
    affs = np.ones((len(offs), 6, 6), np.float32)
    lab = mutex_watershed(affs, offs)
    assert lab.shape == (6, 6) and len(np.unique(lab)) == 1  # all the same: one object
    # cut between columns 2 and 3: no attraction across, strong repulsion across
    gt = np.zeros((6, 6), int)
    gt[:, 3:] = 1
    for c, o in enumerate(offs):
        shifted = np.roll(gt, -o[1], axis=1) if o[1] else gt
        affs[c] = (shifted == gt).astype(np.float32)
    one_to_one(gt, mutex_watershed(affs, offs))


@pytest.mark.parametrize("case", ["3d", "2d"])
def test_default_offsets_on_arrays_smaller_than_27(case):
    gt = two_cubes() if case == "3d" else two_squares()  # every axis < 27
    labels = segment_embeddings(_embed(gt), default_offsets(gt.ndim), DELTA_D,
                                strides=[2] * gt.ndim)
    one_to_one(gt, labels)


def noisy_affinities(gt, offsets, noise=1.5, seed=0):
    """Affinities of a label image: sigmoid(+-2 + noise) for same/different object, in
    logit space (clipped noise would create ties); 0 where a pair leaves the array."""
    rng = np.random.default_rng(seed)
    aff = np.zeros((len(offsets), *gt.shape), np.float32)
    for c, o in enumerate(offsets):
        tgt, src = pair_slices(gt.shape, o)
        logit = np.where(gt[tgt] == gt[src], 2.0, -2.0) + rng.normal(0, noise, gt[tgt].shape)
        aff[(c, *tgt)] = 1 / (1 + np.exp(-logit))
    return aff


@pytest.mark.parametrize("strides", [None, [2, 2]])
def test_segment_affinities_graph_path_equals_the_grid_path(strides):
    """Any bias but the default runs the graph Mutex Watershed on sign-typed edges; at
    the default bias (shifted by a hair to take that path) it gives the grid MWS's labels,
    strided repulsive edges included."""
    gt = np.zeros((40, 40), int)
    gt[:, 20:], gt[20:, :20] = 1, 2
    offs = default_offsets(2)
    aff = noisy_affinities(gt, offs)
    grid = segment_affinities(aff, offs, strides=strides)
    graph = segment_affinities(aff, offs, bias=[b + 1e-9 for b in default_bias(offs)], strides=strides)
    assert grid.max() > 3  # noisy enough to over-segment: the paths agree on a non-trivial partition
    np.testing.assert_array_equal(grid, graph)


def test_segment_affinities_bias_follows_mwatershed():
    """value = affinity + bias, positive merges, negative repels: two halves joined by
    direct affinities of 0.3 (long-range ones 0.9 everywhere: a repulsion of 0.1 at the
    default bias) merge at the default bias (0 on direct offsets) and split at -0.5
    there; a channel order with long-range offsets first changes nothing."""
    gt = np.zeros((12, 12), int)
    gt[:, 6:] = 1
    offs = default_offsets(2, distances=(3,))
    aff = noisy_affinities(gt, offs, noise=0.0)
    aff[1, :, 6] = 0.3  # the direct x-affinities across the cut
    aff[2:] = 0.9
    merged = segment_affinities(aff, offs)
    assert merged.max() == 1
    split = segment_affinities(aff, offs, bias=[-0.5, -0.5, -1.0, -1.0])
    one_to_one(gt, split)
    order = [2, 3, 0, 1]
    np.testing.assert_array_equal(segment_affinities(aff[order], [offs[c] for c in order]), merged)


def test_segment_affinities_mask_and_min_size():
    gt = two_squares()
    offs = default_offsets(2, distances=(3,))
    aff = noisy_affinities(gt, offs, noise=0.0)
    mask = gt > 0
    labels = segment_affinities(aff, offs, mask=mask)
    one_to_one(gt, labels)
    assert not labels[~mask].any()
    sizes = np.bincount(gt.ravel())[1:]
    assert segment_affinities(aff, offs, mask=mask, min_size=int(sizes.max()) + 1).max() == 0
    with pytest.raises(ValueError, match="offsets"):
        segment_affinities(aff[:2], offs)
