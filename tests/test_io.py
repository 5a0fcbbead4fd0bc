"""Tests for spoco_vol.io: opening zarr volumes (format 2 and 3), validation, voxel sizes."""
import os

import numpy as np
import pytest
import zarr

from spoco_vol import io
from spoco_vol.errors import SpocoInputError


def _data(shape=(3, 5, 7), dtype=np.uint16):
    return np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)


def _array(path, data, zarr_format=3, chunks=None, attrs=None):
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, zarr_format=zarr_format,
                            chunks=chunks or data.shape)
    arr[...] = data
    if attrs:
        arr.attrs.update(attrs)
    return arr


def _ome_group(path, levels, scales, units=("nanometer",) * 3, zarr_format=3, nested_ome=False,
               inner=None):
    """An OME-Zarr image group: levels[i] stored as dataset str(i) with scales[i]."""
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    group = root.require_group(inner) if inner else root
    for i, lev in enumerate(levels):
        a = group.create_array(str(i), shape=lev.shape, dtype=lev.dtype, chunks=lev.shape)
        a[...] = lev
    ndim = levels[0].ndim
    ms = [{
        "version": "0.5" if nested_ome else "0.4",
        "axes": [{"name": n, "type": "space", "unit": u}
                 for n, u in zip("zyx"[-ndim:], units[-ndim:])],
        "datasets": [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": s}]}
                     for i, s in enumerate(scales)],
    }]
    if nested_ome:
        group.attrs["ome"] = {"version": "0.5", "multiscales": ms}
    else:
        group.attrs["multiscales"] = ms
    return root


# ------------------------------------------------------------------------ open_volume

@pytest.mark.parametrize("zarr_format", [2, 3])
def test_open_array(tmp_path, zarr_format):
    data = _data()
    _array(tmp_path / "vol.zarr", data, zarr_format=zarr_format, chunks=(1, 5, 4))
    marker = ".zarray" if zarr_format == 2 else "zarr.json"
    assert (tmp_path / "vol.zarr" / marker).is_file()
    arr = io.open_volume(tmp_path / "vol.zarr")
    assert isinstance(arr, zarr.Array)
    assert arr.shape == data.shape and arr.dtype == data.dtype
    np.testing.assert_array_equal(arr[...], data)
    np.testing.assert_array_equal(arr[1:3, 2], data[1:3, 2])  # lazily sliceable
    with pytest.raises(Exception):  # opened read-only: the input is never modified
        arr[0, 0, 0] = 1
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "vol.zarr"))[...], data)


def test_open_array_string_path_and_trailing_slash(tmp_path):
    data = _data((4, 6), np.float32)
    _array(tmp_path / "vol.zarr", data)
    np.testing.assert_array_equal(io.open_volume(str(tmp_path / "vol.zarr") + os.sep)[...], data)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_open_group_with_one_array(tmp_path, zarr_format):
    data = _data((2, 3, 4), np.uint8)
    g = zarr.open_group(str(tmp_path / "vol.zarr"), mode="w", zarr_format=zarr_format)
    g.create_array("raw", shape=data.shape, dtype=data.dtype)[...] = data
    g.create_group("not_an_array")  # sub-groups do not count
    arr = io.open_volume(tmp_path / "vol.zarr")
    assert arr.path.endswith("raw")
    np.testing.assert_array_equal(arr[...], data)


@pytest.mark.parametrize("nested_ome", [False, True])
def test_open_ome_multiscale_takes_level_0(tmp_path, nested_ome):
    lev0 = _data((2, 8, 8), np.uint8)
    lev1 = lev0[:, ::2, ::2].copy()
    _ome_group(tmp_path / "img.zarr", [lev0, lev1], [[40, 4, 4], [40, 8, 8]], nested_ome=nested_ome)
    arr = io.open_volume(tmp_path / "img.zarr")
    assert arr.shape == (2, 8, 8)
    np.testing.assert_array_equal(arr[...], lev0)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_open_path_inside_store(tmp_path, zarr_format):
    data = _data((3, 4), np.int32)
    root = zarr.open_group(str(tmp_path / "vol.zarr"), mode="w", zarr_format=zarr_format)
    root.create_array("other", shape=(2,), dtype="u1")
    root.create_group("path").create_group("in").create_array(
        "group", shape=data.shape, dtype=data.dtype)[...] = data
    arr = io.open_volume(tmp_path / "vol.zarr" / "path" / "in" / "group")
    assert arr.shape == (3, 4)
    np.testing.assert_array_equal(arr[...], data)
    assert io.open_volume(tmp_path / "vol.zarr" / "other").shape == (2,)


def test_open_nested_ome_group(tmp_path):
    lev0 = _data((6, 6), np.uint8)
    _ome_group(tmp_path / "vol.zarr", [lev0, lev0[::2, ::2].copy()], [[4, 4], [8, 8]], inner="img")
    arr = io.open_volume(tmp_path / "vol.zarr" / "img")
    np.testing.assert_array_equal(arr[...], lev0)
    # naming a level explicitly works too
    assert io.open_volume(tmp_path / "vol.zarr" / "img" / "1").shape == (3, 3)


def test_open_missing_path(tmp_path):
    with pytest.raises(SpocoInputError, match="input not found") as e:
        io.open_volume(tmp_path / "missing.zarr")
    assert "missing.zarr" in str(e.value)
    with pytest.raises(SpocoInputError, match="^raw not found"):
        io.open_volume(tmp_path / "missing.zarr", what="raw")
    _array(tmp_path / "vol.zarr", _data((2, 2)))
    with pytest.raises(SpocoInputError, match="not found"):
        io.open_volume(tmp_path / "vol.zarr" / "nope")


def test_open_not_zarr(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "file.txt").write_text("hello")
    with pytest.raises(SpocoInputError, match="labels is not a zarr array or group") as e:
        io.open_volume(d, what="labels")
    assert str(d) in str(e.value)
    with pytest.raises(SpocoInputError, match="not a zarr array or group"):
        io.open_volume(d / "file.txt")
    (tmp_path / "fake.zarr").mkdir()  # the name alone does not make a zarr
    with pytest.raises(SpocoInputError, match="not a zarr array or group"):
        io.open_volume(tmp_path / "fake.zarr")


def test_open_group_with_several_arrays(tmp_path):
    g = zarr.open_group(str(tmp_path / "vol.zarr"), mode="w")
    for name in ("raw", "labels", "mask"):
        g.create_array(name, shape=(2, 2), dtype="u1")
    with pytest.raises(SpocoInputError, match="several arrays") as e:
        io.open_volume(tmp_path / "vol.zarr")
    msg = str(e.value)
    assert "labels, mask, raw" in msg  # all named, sorted
    assert f"{tmp_path / 'vol.zarr'}/NAME" in msg


def test_open_group_without_arrays(tmp_path):
    zarr.open_group(str(tmp_path / "vol.zarr"), mode="w").create_group("sub")
    with pytest.raises(SpocoInputError, match="group without arrays"):
        io.open_volume(tmp_path / "vol.zarr")


# ------------------------------------------------------------------------ validation

@pytest.mark.parametrize("shape", [(5,), (2, 2, 2, 2)])
def test_validate_dims(shape):
    with pytest.raises(SpocoInputError, match=f"input must be 2D or 3D, got {len(shape)}D"):
        io.validate_volume(np.zeros(shape, np.uint8))


def test_validate_custom_dims_and_ok():
    io.validate_volume(np.zeros((2, 3), np.uint8))
    io.validate_volume(np.zeros((2, 3, 4), np.float32))
    io.validate_volume(np.zeros((2, 3, 4), np.int64), integer=True)
    with pytest.raises(SpocoInputError, match="must be 3D, got 2D"):
        io.validate_volume(np.zeros((2, 3)), dims=(3,))


def test_validate_zarr_array_without_reading(tmp_path):
    """The checks read metadata only: a volume whose chunks are unreadable passes them,
    or fails them on its shape and dtype, never on its data."""
    arr = _array(tmp_path / "v.zarr", np.ones((2, 4, 4), np.float32), chunks=(1, 4, 4))
    chunks = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "v.zarr") for f in files
              if f != "zarr.json"]
    assert len(chunks) == 2
    for chunk in chunks:
        with open(chunk, "wb") as f:
            f.write(b"not a chunk")
    with pytest.raises(Exception):
        np.asarray(arr[...])  # reading the data would fail
    io.validate_volume(io.open_volume(tmp_path / "v.zarr"))
    with pytest.raises(SpocoInputError, match="must hold integer labels, got dtype float32"):
        io.validate_volume(io.open_volume(tmp_path / "v.zarr"), integer=True)
    _array(tmp_path / "e.zarr", np.zeros((0, 4, 4), np.uint8))
    with pytest.raises(SpocoInputError, match=r"is empty \(shape \(0, 4, 4\)\)"):
        io.validate_volume(io.open_volume(tmp_path / "e.zarr"))


def test_validate_dtypes():
    with pytest.raises(SpocoInputError, match="labels must hold integer labels, got dtype float32"):
        io.validate_volume(np.zeros((2, 2), np.float32), "labels", integer=True)
    with pytest.raises(SpocoInputError, match="integer labels"):
        io.validate_volume(np.zeros((2, 2), bool), "labels", integer=True)
    with pytest.raises(SpocoInputError, match="must be numeric"):
        io.validate_volume(np.zeros((2, 2), bool))
    with pytest.raises(SpocoInputError, match="must be numeric"):
        io.validate_volume(np.zeros((2, 2), np.complex64))


def test_check_finite():
    io.check_finite(np.zeros((2, 2), np.float32), "raw")
    io.check_finite(np.zeros((2, 2), np.uint8), "raw")
    block = np.zeros((2, 3), np.float64)
    block[1, 2] = np.nan
    with pytest.raises(SpocoInputError, match="^raw contains NaN or inf in sections 4-5$"):
        io.check_finite(block, "raw", "sections 4-5")
    block[1, 2] = -np.inf
    with pytest.raises(SpocoInputError, match="^input contains NaN or inf$"):
        io.check_finite(block.astype(np.float16), "input")


# ------------------------------------------------------------------------ voxel size

@pytest.mark.parametrize("key", ["voxel_size", "resolution", "resolution_nm"])
def test_voxel_size_from_attrs(tmp_path, key):
    _array(tmp_path / "v.zarr", _data(), attrs={key: [40, 4, 4.5]})
    vs = io.read_voxel_size(tmp_path / "v.zarr")
    assert vs == [40.0, 4.0, 4.5] and all(isinstance(v, float) for v in vs)


def test_voxel_size_wrong_length_or_missing(tmp_path):
    _array(tmp_path / "a.zarr", _data(), attrs={"voxel_size": [4, 4]})
    assert io.read_voxel_size(tmp_path / "a.zarr") is None
    _array(tmp_path / "b.zarr", _data())
    assert io.read_voxel_size(tmp_path / "b.zarr") is None
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    g.create_array("raw", shape=(2, 2), dtype="u1")
    assert io.read_voxel_size(tmp_path / "c.zarr") is None


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_voxel_size_from_ome(tmp_path, zarr_format):
    lev0 = _data((2, 8, 8), np.uint8)
    _ome_group(tmp_path / "img.zarr", [lev0, lev0[:, ::2, ::2].copy()],
               [[40, 4, 4], [40, 8, 8]], zarr_format=zarr_format)
    assert io.read_voxel_size(tmp_path / "img.zarr") == [40.0, 4.0, 4.0]
    assert io.read_voxel_size(tmp_path / "img.zarr" / "0") == [40.0, 4.0, 4.0]
    assert io.read_voxel_size(tmp_path / "img.zarr" / "1") == [40.0, 8.0, 8.0]


def test_voxel_size_ome_micrometer(tmp_path):
    lev0 = _data((2, 4, 4), np.uint8)
    _ome_group(tmp_path / "img.zarr", [lev0], [[0.05, 0.008, 0.008]], units=("micrometer",) * 3)
    assert io.read_voxel_size(tmp_path / "img.zarr") == pytest.approx([50.0, 8.0, 8.0])


def test_voxel_size_ome_05_and_nested(tmp_path):
    lev0 = _data((4, 4), np.uint8)
    _ome_group(tmp_path / "a.zarr", [lev0], [[0.004, 0.005]], units=("micrometer",) * 2,
               nested_ome=True)
    assert io.read_voxel_size(tmp_path / "a.zarr") == pytest.approx([4.0, 5.0])
    _ome_group(tmp_path / "b.zarr", [lev0], [[6, 7]], inner="img/raw")
    assert io.read_voxel_size(tmp_path / "b.zarr" / "img" / "raw") == [6.0, 7.0]


def test_voxel_size_ome_with_channel_axis(tmp_path):
    """Scale and units are read for the trailing spatial axes of the array."""
    root = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    root.create_array("0", shape=(5, 6), dtype="u1")
    root.attrs["multiscales"] = [{
        "axes": [{"name": "t", "type": "time", "unit": "second"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [2.0, 0.01, 0.02]}]}],
    }]
    assert io.read_voxel_size(tmp_path / "img.zarr") == pytest.approx([10.0, 20.0])


def test_voxel_size_attrs_win_over_ome(tmp_path):
    lev0 = _data((4, 4), np.uint8)
    root = _ome_group(tmp_path / "img.zarr", [lev0], [[8, 8]])
    root["0"].attrs["voxel_size"] = [3, 3]
    assert io.read_voxel_size(tmp_path / "img.zarr") == [3.0, 3.0]


# ------------------------------------------------------------------------ create_array

def test_create_array_round_trip(tmp_path):
    data = np.random.default_rng(0).integers(0, 1000, (3, 300, 20)).astype(np.uint32)
    path = str(tmp_path / "out.zarr")
    arr = io.create_array(path, data, attrs={"voxel_size": [40, 4, 4]})
    assert arr.chunks == (3, 256, 20)  # at most 256 per axis
    assert (tmp_path / "out.zarr" / "zarr.json").is_file()  # zarr format 3
    back = io.open_volume(path)
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back[...], data)
    assert io.read_voxel_size(path) == [40.0, 4.0, 4.0]


def test_create_array_in_group_and_from_shape(tmp_path):
    path = str(tmp_path / "store.zarr")
    raw = io.create_array(path + "/raw", (4, 5), dtype="float32", chunks=(2, 5))
    assert raw.chunks == (2, 5) and raw.shape == (4, 5)
    raw[...] = 1.5
    io.create_array(path + "/labels", np.ones((4, 5), np.uint8))
    np.testing.assert_array_equal(io.open_volume(path + "/raw")[...], np.full((4, 5), 1.5, np.float32))
    np.testing.assert_array_equal(io.open_volume(path + "/labels")[...], np.ones((4, 5)))
    with pytest.raises(SpocoInputError, match="several arrays"):
        io.open_volume(path)


def test_create_array_overwrite(tmp_path):
    path = str(tmp_path / "out.zarr")
    io.create_array(path, np.zeros((2, 2), np.uint8))
    with pytest.raises(Exception):
        io.create_array(path, np.ones((2, 2), np.uint8))
    np.testing.assert_array_equal(io.open_volume(path)[...], 0)
    io.create_array(path, np.ones((3, 3), np.uint8), overwrite=True)
    np.testing.assert_array_equal(io.open_volume(path)[...], np.ones((3, 3)))
