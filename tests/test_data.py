"""Tests for spoco_vol.data (statistics, SPOCO@p subsets, patch sampling) and
spoco_vol.transforms (geometry augmentation, normalisation)."""
import itertools

import numpy as np
import pytest
import zarr

from spoco_vol import data, transforms
from spoco_vol.errors import SpocoInputError


def _zarr(path, arr, chunks):
    z = zarr.create_array(str(path), shape=arr.shape, dtype=arr.dtype, chunks=chunks)
    z[...] = arr
    return zarr.open_array(str(path), mode="r")


def _position_raw(shape):
    """raw[z, y, x] = 10000 z + 100 y + x: the value says where a voxel came from (exact in f32)."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (10000 * z + 100 * y + x).astype(np.float32)


# ------------------------------------------------------------------------ statistics

def _labelled_volume(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.normal(100, 20, (7, 10, 9)).astype(np.float32)
    lab = np.zeros((7, 10, 9), np.uint32)
    lab[1:6, 2:5, 2:5] = 11    # spans z chunks 0, 1 and 2 (chunks of 2 sections)
    lab[0, 0:2, 0:3] = 3       # only in the first chunk
    lab[6, 7:10, 6:9] = 200    # only in the last (partial) chunk
    lab[3:5, 8, 0] = 7         # inside one chunk, two sections
    return raw, lab, data.TrainingVolume(
        "vol", _zarr(tmp_path / "raw.zarr", raw, (2, 5, 9)), _zarr(tmp_path / "lab.zarr", lab, (2, 10, 9)))


def test_volume_statistics_match_numpy(tmp_path):
    raw, lab, vol = _labelled_volume(tmp_path)
    s = data.volume_statistics(vol)
    assert s["mean"] == pytest.approx(float(raw.astype(np.float64).mean()), rel=1e-12)
    assert s["std"] == pytest.approx(float(raw.astype(np.float64).std()), rel=1e-9)
    np.testing.assert_array_equal(s["object_ids"], [3, 7, 11, 200])
    np.testing.assert_array_equal(s["object_sizes"], [6, 2, 45, 9])
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    np.testing.assert_array_equal(s["object_ids"], ids)
    np.testing.assert_array_equal(s["object_sizes"], counts)


def test_volume_statistics_2d_numpy_and_constant():
    raw = np.full((4, 5), 7, np.uint8)
    lab = np.zeros((4, 5), np.int64)
    vol = data.TrainingVolume("v", raw, lab)
    s = data.volume_statistics(vol)
    assert s["mean"] == 7.0
    assert s["std"] == 1.0  # a constant image: std replaced by 1 (no division by zero later)
    assert s["object_ids"].size == 0 and s["object_sizes"].size == 0


def test_volume_statistics_refuses_nan(tmp_path):
    raw = np.zeros((6, 4, 4), np.float32)
    raw[4, 1, 1] = np.nan
    vol = data.TrainingVolume("myvol", _zarr(tmp_path / "r.zarr", raw, (2, 4, 4)),
                              np.zeros((6, 4, 4), np.uint8))
    with pytest.raises(SpocoInputError, match="raw myvol contains NaN or inf in sections 4-5"):
        data.volume_statistics(vol)


def test_open_training_volume(tmp_path):
    raw = np.zeros((3, 4, 5), np.uint8)
    _zarr(tmp_path / "raw.zarr", raw, (1, 4, 5))
    zarr.open_array(str(tmp_path / "raw.zarr"), mode="a").attrs["voxel_size"] = [40, 4, 4]
    _zarr(tmp_path / "lab.zarr", np.ones((3, 4, 5), np.uint16), (1, 4, 5))
    _zarr(tmp_path / "flab.zarr", np.ones((3, 4, 5), np.float32), (1, 4, 5))
    _zarr(tmp_path / "small.zarr", np.ones((3, 4, 4), np.uint16), (1, 4, 4))
    v = data.open_training_volume(str(tmp_path / "raw.zarr"), str(tmp_path / "lab.zarr"))
    assert v.voxel_size == [40.0, 4.0, 4.0] and v.shape3d == (3, 4, 5)
    v = data.open_training_volume(str(tmp_path / "raw.zarr"), str(tmp_path / "lab.zarr"), [1, 2, 3])
    assert v.voxel_size == [1, 2, 3]
    with pytest.raises(SpocoInputError, match="integer labels"):
        data.open_training_volume(str(tmp_path / "raw.zarr"), str(tmp_path / "flab.zarr"))
    with pytest.raises(SpocoInputError, match=r"shape \(3, 4, 5\) but labels"):
        data.open_training_volume(str(tmp_path / "raw.zarr"), str(tmp_path / "small.zarr"))
    with pytest.raises(SpocoInputError, match="does not match the 3D raw"):
        data.open_training_volume(str(tmp_path / "raw.zarr"), str(tmp_path / "lab.zarr"), [4, 4])


# ------------------------------------------------------------------------ SPOCO@p subset

def test_choose_object_subset():
    ids = np.arange(100, 130)  # 30 objects
    a = data.choose_object_subset(ids, 0.4, seed=5)
    b = data.choose_object_subset(ids, 0.4, seed=5)
    np.testing.assert_array_equal(a, b)                # seeded: deterministic
    assert len(a) == 12 and len(np.unique(a)) == 12    # round(0.4 * 30), no repeats
    assert np.all(np.isin(a, ids)) and np.all(np.diff(a) > 0)  # sorted subset
    c = data.choose_object_subset(ids, 0.4, seed=6)
    assert not np.array_equal(a, c)                    # the seed matters
    assert len(data.choose_object_subset(ids, 0.1, 0)) == 3
    assert len(data.choose_object_subset(ids, 0.7, 0)) == 21
    assert len(data.choose_object_subset(ids, 0.99, 0)) == 30
    assert len(data.choose_object_subset(ids, 0.01, 0)) == 1   # round(0.3) = 0 -> at least one
    assert len(data.choose_object_subset(np.array([9]), 0.2, 0)) == 1


def test_choose_object_subset_full_and_invalid():
    ids = np.arange(1, 11)
    assert data.choose_object_subset(ids, 1.0, seed=0) is None
    assert data.choose_object_subset(ids, 1, seed=0) is None
    for bad in (0, -0.1, 1.01, 2, float("nan")):
        with pytest.raises(SpocoInputError, match="object-fraction must be in"):
            data.choose_object_subset(ids, bad, seed=0)


# ------------------------------------------------------------------------ patch sampler

def test_patch_shapes_and_window(tmp_path):
    shape = (6, 20, 18)
    raw = _position_raw(shape)
    lab = np.random.default_rng(0).integers(0, 5, shape).astype(np.uint16)
    vol = data.TrainingVolume("v", _zarr(tmp_path / "r.zarr", raw, (2, 8, 8)),
                              _zarr(tmp_path / "l.zarr", lab, (2, 8, 8)))
    s3 = data.PatchSampler([vol], (2, 8, 4), dims=3, rng=np.random.default_rng(1))
    s2 = data.PatchSampler([vol], (8, 4), dims=2, rng=np.random.default_rng(1))
    for sampler, pshape in ((s3, (2, 8, 4)), (s2, (8, 4))):
        for _ in range(10):
            r, l = sampler.sample()
            assert r.shape == pshape and l.shape == pshape
            assert r.dtype == np.float32 and l.dtype == np.int64
            r3 = r.reshape((-1, 8, 4))
            v = int(r3[0, 0, 0])
            z, y, x = v // 10000, v % 10000 // 100, v % 100
            window = (slice(z, z + r3.shape[0]), slice(y, y + 8), slice(x, x + 4))
            np.testing.assert_array_equal(r3, raw[window])
            np.testing.assert_array_equal(l.reshape(r3.shape), lab[window])
    rb, lb = s3.batch(3)
    assert rb.shape == (3, 2, 8, 4) and lb.shape == (3, 2, 8, 4)


def test_patch_from_2d_volume():
    raw = _position_raw((1, 12, 12))[0]
    lab = np.ones((12, 12), np.uint8)
    s = data.PatchSampler([data.TrainingVolume("v", raw, lab)], (4, 6), dims=2)
    r, l = s.sample()
    assert r.shape == (4, 6) and l.shape == (4, 6)
    y, x = int(r[0, 0]) // 100, int(r[0, 0]) % 100
    np.testing.assert_array_equal(r, raw[y:y + 4, x:x + 6])


def test_patch_always_contains_object():
    raw = np.zeros((1, 40, 40), np.float32)
    lab = np.zeros((1, 40, 40), np.uint8)
    lab[0, 18:21, 18:21] = 5  # ~9% of random 8x8 patches hit it
    s = data.PatchSampler([data.TrainingVolume("v", raw, lab)], (8, 8), dims=2,
                          rng=np.random.default_rng(0), random_share=0)
    for _ in range(30):
        assert (s.sample()[1] == 5).any()
    # patches placed anywhere do miss it
    assert any(not s.sample(around_object=False)[1].any() for _ in range(30))


class _CountingArray:
    """A read-only array that counts its reads (the cost of finding a patch)."""

    def __init__(self, arr):
        self.arr, self.reads = arr, 0
        self.shape, self.ndim, self.dtype, self.chunks = arr.shape, arr.ndim, arr.dtype, (1, *arr.shape[1:])

    def __getitem__(self, sl):
        self.reads += 1
        return self.arr[sl]


def test_sampling_around_objects_costs_the_same_however_sparse():
    """One annotated 3x3 object in 20 sections of 300 x 300: a random 16 x 16 patch finds
    it once in ~18,000 tries, so sampling by trial and error would fail; around objects
    every patch holds it, at one read of raw and labels per patch."""
    shape = (20, 300, 300)
    lab = np.zeros(shape, np.uint16)
    lab[13, 200:203, 40:43] = 9
    raw, labels = _CountingArray(np.zeros(shape, np.float32)), _CountingArray(lab)
    vol = data.TrainingVolume("v", raw, labels)
    s = data.PatchSampler([vol], (16, 16), dims=2, rng=np.random.default_rng(0), random_share=0)
    raw.reads = labels.reads = 0
    positions = set()
    for _ in range(50):
        r, l = s.sample()
        assert (l == 9).any()
        positions.add(tuple(np.argwhere(l == 9).min(0)))
    assert raw.reads == labels.reads == 50
    assert len(positions) > 10  # the object sits at a random place in the patch


def test_random_share_of_patches():
    raw = np.zeros((1, 200, 200), np.float32)
    lab = np.zeros((1, 200, 200), np.uint8)
    lab[0, 100:104, 100:104] = 1
    s = data.PatchSampler([data.TrainingVolume("v", raw, lab)], (8, 8), dims=2, rng=np.random.default_rng(0))
    hits = sum(bool(s.sample()[1].any()) for _ in range(400))
    # 75% around the object; a random 8x8 patch hits it with probability ~0.003
    assert 0.68 * 400 < hits < 0.82 * 400


def test_patch_without_objects_raises_only_around_objects():
    vol = data.TrainingVolume("v", np.zeros((10, 10), np.float32), np.zeros((10, 10), np.uint8))
    s = data.PatchSampler([vol], (4, 4), dims=2)
    with pytest.raises(SpocoInputError, match="no annotated object in the training sections"):
        s.sample(around_object=True)
    assert s.sample(around_object=False)[0].shape == (4, 4)


def test_inventory_bounding_boxes_and_anchors(tmp_path):
    _, lab, vol = _labelled_volume(tmp_path)
    inv = data.volume_statistics(vol, seed=1)["inventory"]
    np.testing.assert_array_equal(inv.ids, [3, 7, 11, 200])
    for k, o in enumerate(inv.ids):
        where = np.argwhere(lab == o)
        np.testing.assert_array_equal(inv.bbox_lo[k], where.min(0))
        np.testing.assert_array_equal(inv.bbox_hi[k], where.max(0) + 1)
        anchors = inv.anchors[inv.anchor_ids == o]
        assert len(anchors) >= 1 and all(lab[tuple(a)] == o for a in anchors)
    # object 11 spans three z chunks: up to 8 anchors from each
    assert 8 < (inv.anchor_ids == 11).sum() <= 24
    sub = inv.restrict(np.array([7, 200]))
    np.testing.assert_array_equal(sub.ids, [7, 200])
    assert set(sub.anchor_ids.tolist()) == {7, 200}


def test_patch_respects_z_range():
    shape = (10, 6, 6)
    raw = _position_raw(shape)
    lab = np.ones(shape, np.uint8)
    vol = data.TrainingVolume("v", raw, lab, z_range=(3, 6))
    zs = set()
    s = data.PatchSampler([vol], (2, 4, 4), dims=3, rng=np.random.default_rng(0))
    for _ in range(40):
        r, _ = s.sample()
        z = r[:, 0, 0].astype(int) // 10000
        assert 3 <= z.min() and z.max() < 6
        zs.add(int(z[0]))
    assert zs == {3, 4}
    s2 = data.PatchSampler([vol], (6, 6), dims=2, rng=np.random.default_rng(0))
    assert {int(s2.sample()[0][0, 0]) // 10000 for _ in range(40)} == {3, 4, 5}


def test_patch_keep_ids():
    lab = np.zeros((1, 16, 16), np.uint16)
    lab[0, :8, :8], lab[0, :8, 8:], lab[0, 8:, :8], lab[0, 8:, 8:] = 1, 2, 3, 4
    raw = _position_raw(lab.shape)
    vol = data.TrainingVolume("v", raw, lab, keep_ids=np.array([2, 4]))
    s = data.PatchSampler([vol], (6, 6), dims=2, rng=np.random.default_rng(0), random_share=0)
    for _ in range(20):
        r, l = s.sample()
        y, x = int(r[0, 0]) // 100, int(r[0, 0]) % 100
        orig = lab[0, y:y + 6, x:x + 6].astype(np.int64)
        expected = np.where(np.isin(orig, [2, 4]), orig, 0)
        np.testing.assert_array_equal(l, expected)
        assert np.isin(l, [2, 4]).any()  # the object requirement counts kept objects only
    # patches that hold only non-kept objects are never returned
    vol1 = data.TrainingVolume("v", raw, lab, keep_ids=np.array([1]))
    s1 = data.PatchSampler([vol1], (4, 4), dims=2, rng=np.random.default_rng(0), random_share=0)
    for _ in range(10):
        assert set(np.unique(s1.sample()[1])) <= {0, 1} and (s1.sample()[1] == 1).any()


def test_patch_downsample_2d_model():
    shape = (3, 24, 24)
    raw = _position_raw(shape)
    lab = np.random.default_rng(0).integers(1, 50, shape).astype(np.uint32)
    s = data.PatchSampler([data.TrainingVolume("v", raw, lab)], (4, 5), dims=2, downsample=(1, 2, 2),
                          rng=np.random.default_rng(2))
    assert s.read_shape == (1, 8, 10)
    for _ in range(10):
        r, l = s.sample()
        assert r.shape == (4, 5) and l.shape == (4, 5)
        # the block mean of a linear ramp is its value at the block centre (+0.5, +0.5)
        rem = float(r[0, 0])
        z = int(rem // 10000)
        rem = rem - 10000 * z - 50.5
        y, x = int(round(rem)) // 100, int(round(rem)) % 100
        win = raw[z, y:y + 8, x:x + 10]
        np.testing.assert_allclose(r, win.reshape(4, 2, 5, 2).mean(axis=(1, 3)), rtol=0, atol=1e-3)
        np.testing.assert_array_equal(l, lab[z, y + 1:y + 8:2, x + 1:x + 10:2])


def test_patch_downsample_3d_model():
    shape = (8, 12, 12)
    raw = _position_raw(shape)
    lab = np.random.default_rng(0).integers(1, 50, shape).astype(np.uint32)
    s = data.PatchSampler([data.TrainingVolume("v", raw, lab)], (2, 3, 3), dims=3,
                          downsample=(2, 2, 2), rng=np.random.default_rng(0))
    assert s.read_shape == (4, 6, 6)
    r, l = s.sample()
    assert r.shape == (2, 3, 3) and l.shape == (2, 3, 3)
    v = float(r[0, 0, 0]) - 5050.5
    z, y, x = int(round(v)) // 10000, int(round(v)) % 10000 // 100, int(round(v)) % 100
    win = raw[z:z + 4, y:y + 6, x:x + 6]
    np.testing.assert_allclose(r, win.reshape(2, 2, 3, 2, 3, 2).mean(axis=(1, 3, 5)), atol=1e-2)
    np.testing.assert_array_equal(l, lab[z + 1:z + 4:2, y + 1:y + 6:2, x + 1:x + 6:2])


def test_patch_downsample_by_a_fraction():
    """5 nm data for a 9.2 nm model: 1.84 input voxels per model pixel, resampled linearly
    (labels: nearest) from a window that holds the patch."""
    shape = (2, 40, 40)
    raw = _position_raw(shape)
    lab = np.repeat(np.arange(40, dtype=np.uint16)[None, None, :], 40, axis=1).repeat(2, 0) + 1  # label = x + 1
    s = data.PatchSampler([data.TrainingVolume("v", raw, lab)], (5, 5), dims=2, downsample=(1, 1.84, 1.84),
                          rng=np.random.default_rng(0), random_share=1)
    assert s.read_shape == (1, 10, 10)  # ceil(5 * 1.84)
    for _ in range(10):
        r, l = s.sample()
        assert r.shape == (5, 5) and l.shape == (5, 5) and l.dtype == np.int64
        z, y, x = int(r[0, 0]) // 10000, int(r[0, 0]) % 10000 // 100, int(r[0, 0]) % 100
        # a linear ramp stays linear: corners are the window's corners, 9 voxels apart
        np.testing.assert_allclose(r[-1, -1] - r[0, 0], 9 * 100 + 9, atol=1e-3)
        np.testing.assert_allclose(np.diff(r, axis=1), 9 / 4, atol=1e-3)
        assert set(np.unique(l[0])) <= set(range(x + 1, x + 11))  # nearest labels of that window


def test_patch_bigger_than_volume():
    vol = data.TrainingVolume("myvol", np.zeros((4, 10, 10), np.float32), np.ones((4, 10, 10), np.uint8))
    with pytest.raises(SpocoInputError, match="bigger than volume myvol"):
        data.PatchSampler([vol], (5, 8, 8), dims=3)
    with pytest.raises(SpocoInputError, match="bigger than volume"):
        data.PatchSampler([vol], (12, 8), dims=2)
    with pytest.raises(SpocoInputError, match=r"\(1, 12, 12\) voxels"):
        data.PatchSampler([vol], (6, 6), dims=2, downsample=(1, 2, 2))
    data.PatchSampler([vol], (5, 5), dims=2, downsample=(1, 2, 2))  # exactly fits
    vol.z_range = (0, 2)
    with pytest.raises(SpocoInputError, match="bigger than volume"):
        data.PatchSampler([vol], (3, 4, 4), dims=3)
    with pytest.raises(SpocoInputError, match="needs 3 values"):
        data.PatchSampler([vol], (4, 4), dims=3)


def test_downsample_helpers():
    raw = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    out = data.downsample_raw(raw, (2, 3))
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, [[raw[0:2, 0:3].mean(), raw[0:2, 3:6].mean()],
                                     [raw[2:4, 0:3].mean(), raw[2:4, 3:6].mean()]])
    assert data.downsample_raw(raw, (1, 1)) is raw
    lab = np.arange(5 * 7).reshape(5, 7)
    np.testing.assert_array_equal(data.downsample_labels(lab, (2, 3)), [[8, 11], [22, 25]])
    assert data.downsample_labels(lab, (1, 1)) is lab


# ------------------------------------------------------------------------ transforms

def _dihedral(a):
    """All flips of every axis combined with the in-plane rotations of a patch."""
    out = []
    for flips in itertools.product([False, True], repeat=a.ndim):
        f = a
        for ax, fl in enumerate(flips):
            if fl:
                f = np.flip(f, ax)
        for k in range(4):
            out.append(np.rot90(f, k, axes=(-2, -1)))
    return out


@pytest.mark.parametrize("shape", [(6, 6), (4, 6), (3, 5, 5), (2, 4, 6)])
def test_augment_geometry_same_for_raw_and_labels(shape):
    raw = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    labels = raw.astype(np.int64) + 7
    seen = set()
    for seed in range(48):
        r, l = transforms.augment_geometry(raw, labels, np.random.default_rng(seed))
        assert r.shape == shape and l.shape == shape  # non-square patches keep their shape
        assert r.dtype == np.float32 and l.dtype == np.int64
        assert r.flags.c_contiguous and l.flags.c_contiguous
        np.testing.assert_array_equal(l, r.astype(np.int64) + 7)  # same geometry for both
        assert any(np.array_equal(r, d) for d in _dihedral(raw) if d.shape == shape)
        seen.add(r.tobytes())
    distinct = {d.tobytes() for d in _dihedral(raw) if d.shape == shape}
    assert seen == distinct  # every allowed flip/rotation occurs (8 / 4 in 2D, 16 / 8 in 3D)


def test_elastic_deform_consistent():
    lab = np.zeros((32, 32), np.int32)
    lab[4:20, 4:16], lab[20:30, 8:28] = 1, 2
    raw = lab.astype(np.float32) * 10
    r, l = transforms.augment_geometry(raw, lab, np.random.default_rng(0), elastic=True)
    assert r.shape == l.shape == (32, 32) and l.dtype == np.int32 and r.dtype == np.float32
    assert set(np.unique(l)) <= {0, 1, 2}  # nearest neighbour: no new label values
    assert np.mean(r == 10 * l) > 0.85  # raw follows the labels away from borders


def test_hue_rotation_turns_colours_about_grey():
    """A hue turn keeps each pixel's mean and its distance from grey; a third of a turn
    carries red to green (a cyclic permutation); a full turn is the identity."""
    x = np.random.default_rng(0).uniform(0, 255, (3, 50))
    for turns in (0.03, -0.1, 0.25):
        y = transforms.hue_rotation(turns) @ x
        np.testing.assert_allclose(y.mean(0), x.mean(0), rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(y - y.mean(0), axis=0), np.linalg.norm(x - x.mean(0), axis=0),
                                   rtol=1e-4)
        assert np.abs(y - x).max() > 1  # it moves colours
    np.testing.assert_allclose(transforms.hue_rotation(1 / 3) @ [1, 0, 0], [0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(transforms.hue_rotation(1.0), np.eye(3), atol=1e-6)


def test_augment_colour_rgb():
    """Colour jitter on raw RGB: strength 0 changes nothing, greying gives the luma, blur
    moves the spatial axes only, grey pixels stay grey; each draw its own."""
    rng = np.random.default_rng(1)
    raw = rng.uniform(0, 255, (3, 16, 16)).astype(np.float32)
    raw[2] = 40  # a constant channel: a blur that mixed channels or axes would show there
    same = transforms.augment_colour(raw, rng, 0.0, True, jitter_p=1, grey_p=0, blur_p=0)
    np.testing.assert_allclose(same, raw, rtol=1e-5)  # strength 0: only factors of 1 and no turn
    grey = transforms.augment_colour(raw, rng, 0.4, True, jitter_p=0, grey_p=1, blur_p=0)
    luma = 0.299 * raw[0] + 0.587 * raw[1] + 0.114 * raw[2]
    for c in range(3):
        np.testing.assert_allclose(grey[c], luma, rtol=1e-5)
    blurred = transforms.augment_colour(raw, rng, 0.4, True, jitter_p=0, grey_p=0, blur_p=1)
    np.testing.assert_allclose(blurred[2], 40, rtol=1e-5)
    assert blurred[0].std() < raw[0].std()
    assert abs(blurred[0].mean() - raw[0].mean()) < 2
    draws = [transforms.augment_colour(raw, rng, 0.4, True, jitter_p=1, grey_p=0, blur_p=0) for _ in range(20)]
    assert len({d.tobytes() for d in draws}) == 20
    assert all(d.dtype == np.float32 and d.shape == raw.shape for d in draws)
    grey_image = np.broadcast_to(raw[:1], raw.shape)
    for _ in range(10):  # on grey pixels every channel moves alike: no colour is invented
        out = transforms.augment_colour(grey_image, rng, 0.4, True, jitter_p=1, grey_p=0, blur_p=0.5)
        np.testing.assert_allclose(out[1:], np.broadcast_to(out[:1], (2, 16, 16)), rtol=1e-4, atol=1e-3)


def test_augment_colour_single_channel_is_affine():
    """One channel (no channel axis): brightness and contrast only, a x + b with a > 0."""
    rng = np.random.default_rng(2)
    raw = rng.uniform(0, 255, (12, 12)).astype(np.float32)
    for _ in range(10):
        out = transforms.augment_colour(raw, rng, 0.4, False, jitter_p=1, grey_p=1, blur_p=0)
        a, b = np.polyfit(raw.ravel(), out.ravel(), 1)
        np.testing.assert_allclose(out, a * raw + b, rtol=1e-4, atol=1e-3)
        assert 0.6 ** 2 - 1e-6 <= a <= 1.4 ** 2 + 1e-6


def test_normalize():
    raw = np.array([[0, 10], [20, 255]], np.uint8)
    out = transforms.normalize(raw, {"mean": 10.0, "std": 5.0, "kind": "zscore"})
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([[-2, 0], [2, 49]], np.float32))
    out = transforms.normalize(np.float64(3.0) * np.ones((2, 2)), {"mean": 1.0, "std": 0.5})
    np.testing.assert_array_equal(out, np.full((2, 2), 4.0, np.float32))


def test_a_loss_margin_keeps_the_chosen_object_inside_it():
    raw = np.zeros((1, 40, 40), np.float32)
    lab = np.zeros((1, 40, 40), np.uint8)
    lab[0, 20, 20] = 5  # one anchor voxel
    s = data.PatchSampler([data.TrainingVolume("v", raw, lab)], (12, 12), dims=2,
                          rng=np.random.default_rng(0), random_share=0, margin=(4, 3))
    for _ in range(50):
        y, x = np.argwhere(s.sample()[1] == 5)[0]
        assert 4 <= y < 8 and 3 <= x < 9
