"""Tests for spoco_vol.pipeline: resampling, output checks, OME-Zarr writing, end to end."""
import os

import numpy as np
import pytest
import zarr

from spoco_vol.errors import SpocoInputError
from spoco_vol.checkpoint import make_checkpoint
from spoco_vol.model import UNet
from spoco_vol.pipeline import (
    check_output_path, model_scale, resample_raw, restore_labels, segment_array,
)
from conftest import tiny_checkpoint


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


def test_model_scale_snaps_to_an_integer_factor_within_2_percent():
    # 126.8 nm data and a model trained at 2 x 127.6 nm: 2x block means, as in its training
    assert model_scale([283.7, 126.8, 126.8], [283.7, 255.1, 255.1], [0, 1, 2]) == [1.0, 0.5, 0.5]
    # 5 nm data for a 9.2 nm model: 1.84 is no integer, a linear zoom
    assert model_scale([5, 5, 5], [50, 9.2, 9.2], [1, 2]) == [1.0, 5 / 9.2, 5 / 9.2]
    assert model_scale([40, 4.3, 4.3], [40, 9.2, 9.2], [0, 1, 2])[1] == pytest.approx(4.3 / 9.2)  # 2.14: no snap


def test_model_scale_3d_and_unknown():
    assert model_scale([20, 4, 16], [40, 8, 8], [0, 1, 2]) == [0.5, 0.5, 2.0]
    assert model_scale([40, 4, 4], None, [1, 2]) == [1.0, 1.0, 1.0]
    assert model_scale(None, [8, 8], [1, 2], 3) == [1.0, 1.0, 1.0]  # 2D model, 3D input
    assert model_scale(None, [8, 8], [0, 1]) == [1.0, 1.0]


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
    zarr.open_group(str(tmp_path / "out.zarr"), mode="w")
    with pytest.raises(SpocoInputError, match="exists .*--overwrite"):
        check_output_path(str(tmp_path / "out.zarr"), inp, overwrite=False)
    check_output_path(str(tmp_path / "out.zarr"), inp, overwrite=True)
    # --overwrite never replaces something that is not a zarr store (a data folder, a file)
    (tmp_path / "my_data").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for other in ("my_data", "notes.txt"):
        with pytest.raises(SpocoInputError, match="not a zarr store"):
            check_output_path(str(tmp_path / other), inp, overwrite=True)
    # nor works in a directory that holds the input
    with pytest.raises(SpocoInputError, match="work directory"):
        check_output_path(str(tmp_path / "run.zarr"), str(tmp_path / "run.zarr.partial" / "raw"),
                          overwrite=True)


def test_restore_labels_exact_for_integer_factors():
    labels = np.array([[1, 2]])
    assert restore_labels(labels, (1, 4)).tolist() == [[1, 1, 2, 2]]
    # factor 3 with a remainder: input 0-2 -> model 0, input 3 -> model 1 (not [0, 0, 1, 1])
    assert restore_labels(np.array([[5, 6]]), (1, 4), [1, 1 / 3]).tolist() == [[5, 5, 5, 6]]
    assert restore_labels(np.array([[5, 6]]), (1, 4)).tolist() == [[5, 5, 6, 6]]  # no factor: nearest


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


# ------------------------------------------------------------------------ arrays

def test_segment_array_dimension_errors(tmp_path):
    _, ckpt = tiny_checkpoint(tmp_path)
    with pytest.raises(SpocoInputError, match="must be 2D or 3D"):
        segment_array(np.zeros((2, 2, 8, 8), np.float32), ckpt, device="cpu")
    ckpt3 = make_checkpoint(UNet(dims=3, features=(4, 8)), delta_v=0.5, delta_d=2.0,
                            normalization={"mean": 0.0, "std": 1.0}, voxel_size=None,
                            training_data="", training_command="")
    with pytest.raises(SpocoInputError, match="model is 3D but the input is 2D"):
        segment_array(np.zeros((8, 8), np.float32), ckpt3, device="cpu")


def test_segment_array_2d(tmp_path):
    _, ckpt = tiny_checkpoint(tmp_path)
    raw = np.random.default_rng(0).random((32, 48)).astype(np.float32)
    a = segment_array(raw, ckpt, device="cpu")
    assert a.shape == (32, 48) and a.dtype == np.uint64 and a.min() >= 1
    np.testing.assert_array_equal(a, segment_array(raw, ckpt, device="cpu"))  # deterministic


def test_prediction_follows_the_checkpoints_test_time_augmentation(tmp_path):
    """A model calibrated with TTA segments with it unless told otherwise."""
    from spoco_vol.pipeline import predict_array
    _, plain = tiny_checkpoint(tmp_path)
    _, with_tta = tiny_checkpoint(tmp_path, inference={"tta": True})
    raw = np.random.default_rng(0).random((32, 48)).astype(np.float32)
    off = predict_array(raw, plain, device="cpu").embeddings
    on = predict_array(raw, with_tta, device="cpu").embeddings
    np.testing.assert_array_equal(on, predict_array(raw, plain, device="cpu", tta=True).embeddings)
    np.testing.assert_array_equal(off, predict_array(raw, with_tta, device="cpu", tta=False).embeddings)
    assert np.abs(on - off).max() > 1e-3


def test_inputs_without_voxel_size_are_read_at_the_training_downsampling_of_a_model_without(tmp_path):
    """A model trained with --downsample on data without a voxel size has none either: an
    input without one is taken to be at the training data's resolution and read at the
    model's training downsampling (the model never saw finer pixels); the labels come back
    at the input's size. A voxel size on either side decides as before."""
    from spoco_vol.pipeline import input_scale, predict_array
    _, ckpt = tiny_checkpoint(tmp_path, inference={"downsample": [1, 2, 2]})
    raw = np.random.default_rng(0).random((32, 48)).astype(np.float32)
    assert predict_array(raw, ckpt, device="cpu").embeddings.shape[1:] == (16, 24)
    assert segment_array(raw, ckpt, device="cpu").shape == (32, 48)
    assert input_scale(None, ckpt, [1, 2], 3) == [1.0, 0.5, 0.5]  # a 2D model on a stack: z as is
    assert input_scale([40, 4, 4], ckpt, [1, 2]) == [1.0, 1.0, 1.0]
    from spoco_vol import checkpoint, io
    from spoco_vol.blockwise.plan import build_plan
    io.create_array(str(tmp_path / "in.zarr/raw"), (raw * 255).astype(np.uint8))
    checkpoint.save(ckpt, str(tmp_path / "ds.pt"))
    plan = build_plan(str(tmp_path / "in.zarr/raw"), str(tmp_path / "out.zarr"), str(tmp_path / "ds.pt"), device="cpu")
    assert plan.scale == (0.5, 0.5)  # segment, blockwise: the same rule
    _, plain = tiny_checkpoint(tmp_path)
    assert predict_array(raw, plain, device="cpu").embeddings.shape[1:] == (32, 48)
    _, sized = tiny_checkpoint(tmp_path, voxel_size=[8.0, 8.0], inference={"downsample": [1, 2, 2]})
    assert input_scale(None, sized, [0, 1]) == [1.0, 1.0]  # segment warns: give --voxel-size
    assert input_scale([4.0, 4.0], sized, [0, 1]) == [0.5, 0.5]


def test_segment_array_small_image(tmp_path):
    _, ckpt = tiny_checkpoint(tmp_path)
    raw = np.random.default_rng(0).random((20, 24)).astype(np.float32)
    assert segment_array(raw, ckpt, device="cpu").shape == (20, 24)


@pytest.mark.parametrize("scale", [[1.0, 0.5, 0.5], [1.0, 1 / 3, 0.5], [1.0, 0.8, 0.7]])
def test_restore_labels_of_a_region_is_the_crop_of_the_whole(scale):
    shape = (2, 61, 47)
    small = resample_raw(np.zeros(shape, np.float32), scale)
    lab = np.random.default_rng(1).integers(0, 1000, small.shape).astype(np.uint64)
    whole = restore_labels(lab, shape, scale)
    region = (slice(1, 2), slice(7, 38), slice(0, 45))
    np.testing.assert_array_equal(restore_labels(lab, shape, scale, region), whole[region])


def test_a_mask_on_the_model_grid():
    """Integer downsampling: a model pixel is inside when most of its input voxels are;
    otherwise the input voxel at its centre decides."""
    from spoco_vol.pipeline import mask_on_model_grid
    mask = np.zeros((8, 8), bool)
    mask[:, :3] = True  # columns 0-2: model column 0 fully, column 1 half (2-3)
    down = mask_on_model_grid(mask, (4, 4), [0.5, 0.5])
    assert down[:, 0].all() and down[:, 1].all() and not down[:, 2:].any()  # half counts as inside
    up = mask_on_model_grid(mask, (16, 16), [2.0, 2.0])
    assert up[:, :6].all() and not up[:, 6:].any()
    assert mask_on_model_grid(mask, (8, 8), [1.0, 1.0]) is mask
