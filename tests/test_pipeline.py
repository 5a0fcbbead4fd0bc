"""Tests for spoco_vol.pipeline: resampling, output checks, OME-Zarr writing, end to end."""
import os

import numpy as np
import pytest
import torch
import zarr

from spoco_vol import io
from spoco_vol.errors import SpocoInputError
from spoco_vol.model import UNet, checkpoint_checksum, make_checkpoint, save_checkpoint
from spoco_vol.pipeline import (
    check_output_path, model_scale, resample_raw, restore_labels, segment_array, segment_volume,
    write_ome_zarr_labels,
)


# ------------------------------------------------------------------------ model scale

def test_model_scale_within_tolerance_is_one():
    assert model_scale([40, 4, 4], [40, 4.5, 4.5], [0, 1, 2]) == [1.0, 1.0, 1.0]
    assert model_scale([40, 4, 4], [36, 3.5, 4.7], [0, 1, 2]) == [1.0, 1.0, 1.0]
    assert model_scale([4, 4], [4.7, 3.5], [0, 1]) == [1.0, 1.0]


def test_model_scale_2d_model_on_3d_input():
    # 4.6 nm input, 9.2 nm model: halve in-plane only; z (sections) untouched
    assert model_scale([40, 4.6, 4.6], [9.2, 9.2], [1, 2]) == [1.0, 0.5, 0.5]
    # a 2D model whose checkpoint carries a 3D voxel size: its trailing axes count
    assert model_scale([40, 4.6, 4.6], [50, 9.2, 9.2], [1, 2]) == [1.0, 0.5, 0.5]


def test_model_scale_3d_and_unknown():
    assert model_scale([20, 4, 16], [40, 8, 8], [0, 1, 2]) == [0.5, 0.5, 2.0]
    assert model_scale([40, 4, 4], None, [1, 2]) == [1.0, 1.0, 1.0]
    assert model_scale(None, [8, 8], [1, 2]) == [1.0, 1.0]


# ------------------------------------------------------------------------ resampling

def test_resample_raw_block_mean_with_edge_padding():
    raw = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)
    small = resample_raw(raw, [1.0, 0.5, 0.5])
    assert small.shape == (2, 3, 2)
    np.testing.assert_allclose(small[0, 0, 0], raw[0, 0:2, 0:2].mean())
    np.testing.assert_allclose(small[1, 1, 1], raw[1, 2:4, 2:4].mean())
    np.testing.assert_allclose(small[0, 2, 0], raw[0, 4, 0:2].mean())  # padded by edge copy
    assert resample_raw(raw, [1, 1, 1]) is raw


def test_resample_restore_round_trip():
    raw = np.random.default_rng(0).random((3, 63, 50)).astype(np.float32)
    small = resample_raw(raw, [1.0, 0.5, 0.5])
    assert small.shape == (3, 32, 25)
    # labels that name their model-grid pixel; back on the input grid each voxel must get
    # the label of the 2x2 block it was averaged into
    lab = (np.arange(32)[:, None] * 100 + np.arange(25)[None, :]).astype(np.uint64)
    lab = np.broadcast_to(lab, (3, 32, 25))
    back = restore_labels(lab, raw.shape)
    assert back.shape == (3, 63, 50) and back.dtype == np.uint64
    y, x = np.meshgrid(np.arange(63), np.arange(50), indexing="ij")
    np.testing.assert_array_equal(back[1], (y // 2) * 100 + x // 2)
    assert restore_labels(back, back.shape) is back


@pytest.mark.parametrize("scale", [[1.0, 1.5, 1.5], [1.0, 0.7, 0.3], [2.0, 0.5, 1.0]])
def test_resample_restore_shapes_non_integer(scale):
    raw = np.random.default_rng(1).random((3, 21, 17)).astype(np.float32)
    small = resample_raw(raw, scale)
    assert small.shape == tuple(int(round(n * s)) for n, s in zip(raw.shape, scale))
    lab = np.arange(small.size, dtype=np.uint32).reshape(small.shape)
    back = restore_labels(lab, raw.shape)
    assert back.shape == raw.shape
    assert set(np.unique(back)) <= set(np.unique(lab))


# ------------------------------------------------------------------------ output checks

def _input(tmp_path, name="vol.zarr"):
    zarr.create_array(str(tmp_path / name), shape=(2, 4, 4), dtype="u1")
    return str(tmp_path / name)


def test_check_output_path_ok(tmp_path):
    inp = _input(tmp_path)
    check_output_path(str(tmp_path / "out.zarr"), inp, overwrite=False)
    check_output_path(str(tmp_path / "vol.zarr2"), inp, overwrite=False)  # a prefix is not inside


def test_check_output_path_exists(tmp_path):
    inp = _input(tmp_path)
    (tmp_path / "out.zarr").mkdir()
    with pytest.raises(SpocoInputError, match="exists .*--overwrite"):
        check_output_path(str(tmp_path / "out.zarr"), inp, overwrite=False)
    check_output_path(str(tmp_path / "out.zarr"), inp, overwrite=True)


def test_check_output_path_inside_input(tmp_path):
    inp = _input(tmp_path)
    for out in (inp, inp + "/labels", inp + "/a/b"):
        with pytest.raises(SpocoInputError, match="lies inside the input"):
            check_output_path(out, inp, overwrite=True)
    # the input named by a path inside its store: the whole store is protected
    g = zarr.open_group(str(tmp_path / "store.zarr"), mode="w")
    g.create_array("raw", shape=(2, 2), dtype="u1")
    with pytest.raises(SpocoInputError, match="lies inside the input"):
        check_output_path(str(tmp_path / "store.zarr" / "seg"), str(tmp_path / "store.zarr" / "raw"),
                          overwrite=True)


def test_check_output_path_unwritable_parent(tmp_path):
    inp = _input(tmp_path)
    with pytest.raises(SpocoInputError, match="is not a writable directory"):
        check_output_path(str(tmp_path / "no" / "such" / "out.zarr"), inp, overwrite=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SpocoInputError, match="is not a writable directory"):
        check_output_path(str(tmp_path / "afile" / "out.zarr"), inp, overwrite=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_check_output_path_read_only_parent(tmp_path):
    inp = _input(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(SpocoInputError, match="is not a writable directory"):
            check_output_path(str(ro / "out.zarr"), inp, overwrite=False)
    finally:
        ro.chmod(0o700)


def test_check_output_path_refuses_output_containing_input(tmp_path):
    (tmp_path / "data").mkdir()
    inp = _input(tmp_path / "data")
    with pytest.raises(SpocoInputError):
        check_output_path(str(tmp_path / "data"), inp, overwrite=True)


# ------------------------------------------------------------------------ OME-Zarr output

def test_write_ome_zarr_labels_3d(tmp_path):
    labels = np.random.default_rng(0).integers(0, 9, (3, 6, 5)).astype(np.uint32)
    path = str(tmp_path / "seg.zarr")
    write_ome_zarr_labels(path, labels, [40, 4, 4], {"objects": 8, "command": "x"}, overwrite=False)
    assert sorted(os.listdir(tmp_path)) == ["seg.zarr"]  # no temporary left behind
    group = zarr.open_group(path, mode="r")
    ms = group.attrs["multiscales"]
    assert [a["name"] for a in ms[0]["axes"]] == ["z", "y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "nanometer" for a in ms[0]["axes"])
    assert ms[0]["datasets"] == [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [40, 4, 4]}]}]
    assert group.attrs["spoco_vol"] == {"objects": 8, "command": "x"}
    arr = zarr.open_array(os.path.join(path, "0"), mode="r")  # plain zarr reads dataset 0
    assert arr.dtype == np.uint32
    np.testing.assert_array_equal(arr[...], labels)
    # and spoco-vol's own reader understands it
    np.testing.assert_array_equal(io.open_volume(path)[...], labels)
    assert io.read_voxel_size(path) == [40.0, 4.0, 4.0]


def test_write_ome_zarr_labels_2d_without_voxel_size(tmp_path):
    labels = np.arange(12, dtype=np.uint64).reshape(3, 4)
    path = str(tmp_path / "seg.zarr")
    write_ome_zarr_labels(path, labels, None, {}, overwrite=False)
    ms = zarr.open_group(path, mode="r").attrs["multiscales"]
    assert [a["name"] for a in ms[0]["axes"]] == ["y", "x"]
    assert ms[0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0]
    np.testing.assert_array_equal(zarr.open_array(path + "/0", mode="r")[...], labels)


def test_write_ome_zarr_labels_existing_output(tmp_path):
    path = tmp_path / "seg.zarr"
    path.mkdir()
    (path / "precious.txt").write_text("keep me")
    labels = np.ones((4, 4), np.uint32)
    with pytest.raises(SpocoInputError, match="exists"):
        write_ome_zarr_labels(str(path), labels, None, {}, overwrite=False)
    assert os.listdir(path) == ["precious.txt"]
    assert (path / "precious.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["seg.zarr"]  # temporary removed
    write_ome_zarr_labels(str(path), labels, None, {}, overwrite=True)
    assert not (path / "precious.txt").exists()
    np.testing.assert_array_equal(zarr.open_array(str(path / "0"), mode="r")[...], labels)
    assert sorted(os.listdir(tmp_path)) == ["seg.zarr"]


def test_write_ome_zarr_labels_conforms_to_ngff(tmp_path):
    path = str(tmp_path / "seg.zarr")
    write_ome_zarr_labels(path, np.ones((2, 4, 4), np.uint32), [40, 4, 4], {}, overwrite=False)
    group = zarr.open_group(path, mode="r")
    zarr_format = group.metadata.zarr_format
    if zarr_format == 2:
        assert group.attrs["multiscales"][0]["version"] == "0.4"
    else:
        ome = group.attrs.get("ome", {})
        assert ome.get("version") == "0.5" and ome.get("multiscales")


# ------------------------------------------------------------------------ end to end

def _tiny_checkpoint(tmp_path, voxel_size=None, inference=None):
    torch.manual_seed(0)
    net = UNet(dims=2, features=(4, 8), embedding_dim=4)
    ckpt = make_checkpoint(net, delta_v=0.5, delta_d=2.0,
                           normalization={"mean": 0.0, "std": 1.0, "kind": "zscore"},
                           voxel_size=voxel_size, training_data="none", training_command="test",
                           inference=inference or {})
    path = tmp_path / "model.pt"
    save_checkpoint(ckpt, path)
    return str(path), ckpt


def _input_volume(tmp_path, data, name="vol.zarr"):
    arr = zarr.create_array(str(tmp_path / name), shape=data.shape, dtype=data.dtype,
                            chunks=(1, *data.shape[1:]))
    arr[...] = data
    return str(tmp_path / name)


def test_segment_volume_end_to_end(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (2, 64, 64)).astype(np.uint8)
    data[:, 16:40, 16:40] = 200
    inp = _input_volume(tmp_path, data)
    model, ckpt = _tiny_checkpoint(tmp_path)
    report = segment_volume(inp, model=model, device="cpu", command="spoco-vol segment test")
    out = str(tmp_path / "vol_labels.zarr")  # default output name beside the input
    assert report["output"] == out
    group = zarr.open_group(out, mode="r")
    assert "multiscales" in group.attrs
    labels = zarr.open_array(out + "/0", mode="r")
    assert labels.shape == (2, 64, 64)
    assert np.dtype(labels.dtype).kind == "u"
    lab = labels[...]
    assert int(lab.max()) == report["objects"] >= 1
    # per-section objects get ids unique over the volume
    assert not (set(np.unique(lab[0])) - {0}) & (set(np.unique(lab[1])) - {0})
    assert report["shape"] == [2, 64, 64]
    assert report["model_sha256"] == checkpoint_checksum(ckpt)
    assert group.attrs["spoco_vol"]["model_sha256"] == checkpoint_checksum(ckpt)
    assert group.attrs["spoco_vol"]["command"] == "spoco-vol segment test"
    np.testing.assert_array_equal(io.open_volume(inp)[...], data)  # input untouched
    # a second run refuses to overwrite, the output is kept
    with pytest.raises(SpocoInputError, match="exists"):
        segment_volume(inp, model=model, device="cpu")
    np.testing.assert_array_equal(zarr.open_array(out + "/0", mode="r")[...], lab)


def test_segment_volume_resamples_to_model_voxel_size(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, (1, 60, 60)).astype(np.uint8)
    inp = _input_volume(tmp_path, data)
    model, _ = _tiny_checkpoint(tmp_path, voxel_size=[9.2, 9.2])
    out = str(tmp_path / "seg.zarr")
    report = segment_volume(inp, out, model, voxel_size=[40, 4.6, 4.6], device="cpu")
    labels = zarr.open_array(out + "/0", mode="r")[...]
    assert labels.shape == (1, 60, 60)
    assert report["voxel_size"] == [40, 4.6, 4.6]
    assert io.read_voxel_size(out) == [40.0, 4.6, 4.6]  # output on the input grid
    # labels were made on a 30x30 grid: constant over each 2x2 block
    blocks = labels[0].reshape(30, 2, 30, 2)
    assert (blocks == blocks[:, :1, :, :1]).all()


def test_segment_volume_refuses_nan(tmp_path):
    data = np.zeros((2, 32, 32), np.float32)
    data[1, 5, 7] = np.nan
    inp = _input_volume(tmp_path, data)
    model, _ = _tiny_checkpoint(tmp_path)
    before = sorted(os.listdir(tmp_path))
    out = str(tmp_path / "seg.zarr")
    with pytest.raises(SpocoInputError, match="NaN"):
        segment_volume(inp, out, model, device="cpu")
    assert not os.path.exists(out)
    assert sorted(os.listdir(tmp_path)) == before  # no temporary either


def test_segment_volume_input_errors(tmp_path):
    model, _ = _tiny_checkpoint(tmp_path)
    with pytest.raises(SpocoInputError, match="not found"):
        segment_volume(str(tmp_path / "missing.zarr"), model=model, device="cpu")
    inp = _input_volume(tmp_path, np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(SpocoInputError, match="needs 3 values"):
        segment_volume(inp, str(tmp_path / "o.zarr"), model, voxel_size=[4, 4], device="cpu")
    with pytest.raises(SpocoInputError, match="checkpoint not found"):
        segment_volume(inp, str(tmp_path / "o.zarr"), str(tmp_path / "nope.pt"), device="cpu")
    assert not os.path.exists(tmp_path / "o.zarr")


def test_segment_array_dimension_errors(tmp_path):
    _, ckpt = _tiny_checkpoint(tmp_path)
    with pytest.raises(SpocoInputError, match="must be 2D or 3D"):
        segment_array(np.zeros((2, 2, 8, 8), np.float32), ckpt, device="cpu")
    ckpt3 = make_checkpoint(UNet(dims=3, features=(4, 8)), delta_v=0.5, delta_d=2.0,
                            normalization={"mean": 0.0, "std": 1.0}, voxel_size=None,
                            training_data="", training_command="")
    with pytest.raises(SpocoInputError, match="model is 3D but the input is 2D"):
        segment_array(np.zeros((8, 8), np.float32), ckpt3, device="cpu")


def test_segment_array_2d(tmp_path):
    _, ckpt = _tiny_checkpoint(tmp_path)
    raw = np.random.default_rng(0).random((32, 48)).astype(np.float32)
    a = segment_array(raw, ckpt, device="cpu")
    assert a.shape == (32, 48) and a.dtype == np.uint64 and a.min() >= 1
    np.testing.assert_array_equal(a, segment_array(raw, ckpt, device="cpu"))  # deterministic


def test_segment_array_small_image(tmp_path):
    _, ckpt = _tiny_checkpoint(tmp_path)
    raw = np.random.default_rng(0).random((20, 24)).astype(np.float32)
    assert segment_array(raw, ckpt, device="cpu").shape == (20, 24)
