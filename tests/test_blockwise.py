"""Blockwise segmentation (spoco_vol.blockwise): OME-Zarr output, errors, and agreement
with a single block covering the whole volume."""
import os
import time

import numpy as np
import pytest
import zarr

from spoco_vol import io
from spoco_vol.blockwise import format_report, required_halo, segment_blockwise
from spoco_vol.errors import SpocoInputError
from spoco_vol import checkpoint
from spoco_vol.pipeline import BUNDLED_MODEL
from conftest import tiny_checkpoint

SHORT_OFFSETS = [[-1, 0], [0, -1], [-3, 0], [0, -3]]


def _ome_attrs(group) -> tuple[dict, dict]:
    """(multiscale, image-label) of an OME-Zarr 0.4 (zarr v2) or 0.5 (zarr v3) label image."""
    if group.metadata.zarr_format == 2:
        assert group.attrs["multiscales"][0]["version"] == "0.4"
        return group.attrs["multiscales"][0], group.attrs["image-label"]
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5" and "multiscales" not in group.attrs
    return ome["multiscales"][0], ome["image-label"]


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_output_is_ome_zarr_that_plain_zarr_and_napari_conventions_read(tmp_path, zarr_format):
    """The output's zarr format follows the input's: v2 -> OME-Zarr 0.4, v3 -> 0.5."""
    data = np.random.default_rng(0).integers(0, 256, (3, 40, 36)).astype(np.uint8)
    inp = _input_volume(tmp_path, data, zarr_format=zarr_format)
    model, _ = tiny_checkpoint(tmp_path, inference={"offsets": SHORT_OFFSETS})
    out = str(tmp_path / "seg.zarr")
    segment_blockwise(inp, out, model, voxel_size=[40, 4, 4], device="cpu", workers=0,
                      block_shape=[2, 20, 20], halo=[0, 12, 12])
    assert sorted(os.listdir(tmp_path)) == sorted(["vol.zarr", "seg.zarr", "model.pt"])  # no .partial left
    group = zarr.open_group(out, mode="r")
    assert group.metadata.zarr_format == zarr_format
    ms, label = _ome_attrs(group)
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "nanometer" for a in ms["axes"])
    assert ms["datasets"] == [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [40, 4, 4]}]}]  # no pyramid for so small a volume
    arr = zarr.open_array(os.path.join(out, "0"), mode="r")  # plain zarr reads dataset 0
    assert arr.shape == data.shape and arr.chunks == (2, 20, 20)  # chunks = block grid
    assert sorted(group.keys()) == ["0"]  # fragments and side files are gone
    lab = arr[...]
    ids = np.unique(lab[lab > 0])
    assert (ids == np.arange(1, len(ids) + 1)).all()  # consecutive 1..N
    assert io.read_voxel_size(out) == [40.0, 4.0, 4.0]
    # what napari-ome-zarr does with it: ome-zarr's reader finds a label image (so a
    # labels layer) whose level 0 is the labels, with the scale and axes above
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader
    node = list(Reader(parse_url(out))())[0]
    assert node.load(Label) is not None
    assert np.array_equal(np.asarray(node.data[0]), lab)
    assert node.metadata["coordinateTransformations"][0] == [{"type": "scale", "scale": [40, 4, 4]}]
    assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]


def _ome_image(path, data, zarr_format, scales=((40, 4, 4), (40, 8, 8))):
    """An OME-Zarr image (0.4 in v2, 0.5 in v3) with a level per scale, each the first
    voxel of 2x2 in y and x of the one before."""
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    level = data
    for k in range(len(scales)):
        a = group.create_array(str(k), shape=level.shape, dtype=level.dtype, chunks=(1, *level.shape[1:]))
        a[...] = level
        level = level[:, ::2, ::2]
    ms = {"axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
          "datasets": [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": list(sc)}]}
                       for k, sc in enumerate(scales)]}
    if zarr_format == 2:
        group.attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    return str(path)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_labels_go_into_an_ome_zarr_images_labels_group(tmp_path, zarr_format):
    """An OME-Zarr image as input: by default the labels are written as image/labels/spoco
    and listed in image/labels (the layout napari and neuroglancer read together with
    the image), with a level for each of the image's levels; ome-zarr's reader finds
    them from the image."""
    data = np.random.default_rng(1).integers(0, 256, (2, 64, 48)).astype(np.uint8)
    image = _ome_image(tmp_path / "img.zarr", data, zarr_format)
    model, _ = tiny_checkpoint(tmp_path, inference={"offsets": SHORT_OFFSETS})
    report = segment_blockwise(image, model=model, device="cpu", workers=0, block_shape=[1, 32, 24],
                               halo=[0, 12, 12])
    out = os.path.join(image, "labels", "spoco")
    assert report["output"] == out
    labels_group = zarr.open_group(os.path.join(image, "labels"), mode="r")
    names = labels_group.attrs["labels"] if zarr_format == 2 else labels_group.attrs["ome"]["labels"]
    assert names == ["spoco"]
    group = zarr.open_group(out, mode="r")
    ms, label = _ome_attrs(group)
    assert label["source"] == {"image": "../../"}
    assert [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]] == [[40, 4, 4], [40, 8, 8]]
    lab0, lab1 = group["0"][...], group["1"][...]
    np.testing.assert_array_equal(lab1, lab0[:, ::2, ::2])  # nearest: level 0's voxel at 2x the index
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader
    nodes = list(Reader(parse_url(image))())
    label_nodes = [n for n in nodes if n.load(Label) is not None]
    assert label_nodes and np.array_equal(np.asarray(label_nodes[0].data[0]), lab0)
    again = segment_blockwise(image, model=model, device="cpu", workers=0, block_shape=[1, 32, 24],
                              halo=[0, 12, 12])  # the same command again: already complete, nothing written
    assert again["already_complete"] and again["output"] == out
    with pytest.raises(SpocoInputError, match="exists"):  # other settings into the same labels: --overwrite needed
        segment_blockwise(image, model=model, device="cpu", workers=0, block_shape=[1, 32, 32], halo=[0, 12, 12])
    with pytest.raises(SpocoInputError, match="inside the input"):  # elsewhere in the image: refused
        segment_blockwise(image, os.path.join(image, "mine"), model, device="cpu", workers=0)


def test_label_pyramid_levels():
    from spoco_vol.pipeline import label_pyramid
    # thick sections: z waits until y and x are coarser than it
    assert label_pyramid((20, 1024, 1024), [50, 4.6, 4.6]) == [[1, 1, 1], [1, 2, 2], [1, 4, 4]]
    levels = label_pyramid((100, 4096, 4096), [50, 4.6, 4.6])
    assert levels[3] == [1, 8, 8] and levels[4] == [2, 16, 16]  # from 36.8 nm y/x on, z (50 nm) halves too
    assert label_pyramid((64, 512, 512), [10, 10, 10])[1] == [2, 2, 2]  # isotropic: all axes
    assert label_pyramid((8, 100, 100), [40, 4, 4]) == [[1, 1, 1]]  # small: no pyramid
    # an OME-Zarr image's own levels, where they are integer downsamplings
    assert label_pyramid((8, 100, 100), None, [[40, 4, 4], [40, 8, 8], [80, 16, 16]]) == \
        [[1, 1, 1], [1, 2, 2], [2, 4, 4]]


def test_pyramid_of_a_large_volume_is_built_blockwise(tmp_path):
    """A volume longer than 256 voxels gets levels until every axis is at most 256;
    each level is the nearest downsampling of the one before, computed chunk by chunk."""
    data = np.random.default_rng(2).integers(0, 256, (2, 600, 40)).astype(np.uint8)
    inp = _input_volume(tmp_path, data)
    model, _ = tiny_checkpoint(tmp_path, inference={"offsets": SHORT_OFFSETS})
    out = str(tmp_path / "seg.zarr")
    segment_blockwise(inp, out, model, voxel_size=[4, 4, 4], device="cpu", workers=0, block_shape=[2, 128, 40],
                      halo=[0, 12, 12])
    group = zarr.open_group(out, mode="r")
    ms, _ = _ome_attrs(group)
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[4, 4, 4], [8, 8, 8], [8, 16, 16]]  # z (2 sections) is one voxel from level 1 on
    lab = group["0"][...]
    np.testing.assert_array_equal(group["1"][...], lab[::2, ::2, ::2])
    np.testing.assert_array_equal(group["2"][...], lab[::2, ::4, ::4])


# ------------------------------------------------------------------------ end to end

def _input_volume(tmp_path, data, name="vol.zarr", zarr_format=3):
    arr = zarr.create_array(str(tmp_path / name), shape=data.shape, dtype=data.dtype,
                            chunks=(1, *data.shape[1:]), zarr_format=zarr_format)
    arr[...] = data
    return str(tmp_path / name)


def test_segment_end_to_end(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (2, 64, 64)).astype(np.uint8)
    data[:, 16:40, 16:40] = 200
    inp = _input_volume(tmp_path, data)
    model, ckpt = tiny_checkpoint(tmp_path)
    report = segment_blockwise(inp, model=model, device="cpu", workers=0, command="spoco-vol segment test")
    out = str(tmp_path / "vol_labels.zarr")  # default output name beside the input
    assert report["output"] == out
    group = zarr.open_group(out, mode="r")
    assert "multiscales" in group.attrs["ome"]  # a zarr v3 input: OME-Zarr 0.5
    labels = zarr.open_array(out + "/0", mode="r")
    assert labels.shape == (2, 64, 64)
    assert np.dtype(labels.dtype).kind == "u"
    lab = labels[...]
    assert int(lab.max()) == report["objects"] >= 1
    # per-section objects get ids unique over the volume
    assert not (set(np.unique(lab[0])) - {0}) & (set(np.unique(lab[1])) - {0})
    assert report["shape"] == [2, 64, 64]
    assert report["model_sha256"] == ckpt.sha256
    assert group.attrs["spoco_vol"]["model_sha256"] == ckpt.sha256
    assert group.attrs["spoco_vol"]["command"] == "spoco-vol segment test"
    np.testing.assert_array_equal(io.open_volume(inp)[...], data)  # input untouched
    # a second run with other settings refuses to overwrite, the output is kept
    with pytest.raises(SpocoInputError, match="exists"):
        segment_blockwise(inp, model=model, device="cpu", workers=0, stitch=False)
    np.testing.assert_array_equal(zarr.open_array(out + "/0", mode="r")[...], lab)


def test_segment_resamples_to_model_voxel_size(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, (1, 60, 60)).astype(np.uint8)
    inp = _input_volume(tmp_path, data)
    model, _ = tiny_checkpoint(tmp_path, voxel_size=[9.2, 9.2])
    out = str(tmp_path / "seg.zarr")
    report = segment_blockwise(inp, out, model, voxel_size=[40, 4.6, 4.6], device="cpu", workers=0)
    labels = zarr.open_array(out + "/0", mode="r")[...]
    assert labels.shape == (1, 60, 60)
    assert report["voxel_size"] == [40, 4.6, 4.6]
    assert io.read_voxel_size(out) == [40.0, 4.6, 4.6]  # output on the input grid
    # labels were made on a 30x30 grid: constant over each 2x2 block
    blocks = labels[0].reshape(30, 2, 30, 2)
    assert (blocks == blocks[:, :1, :, :1]).all()


def test_segment_refuses_nan(tmp_path):
    data = np.zeros((2, 32, 32), np.float32)
    data[1, 5, 7] = np.nan
    inp = _input_volume(tmp_path, data)
    model, _ = tiny_checkpoint(tmp_path)
    before = sorted(os.listdir(tmp_path))
    out = str(tmp_path / "seg.zarr")
    with pytest.raises(SpocoInputError, match="NaN"):
        segment_blockwise(inp, out, model, device="cpu", workers=0)
    assert not os.path.exists(out)
    assert sorted(os.listdir(tmp_path)) == before  # no temporary either


def test_segment_input_errors(tmp_path):
    model, _ = tiny_checkpoint(tmp_path)
    with pytest.raises(SpocoInputError, match="not found"):
        segment_blockwise(str(tmp_path / "missing.zarr"), model=model, device="cpu", workers=0)
    inp = _input_volume(tmp_path, np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(SpocoInputError, match="needs 3 values"):
        segment_blockwise(inp, str(tmp_path / "o.zarr"), model, voxel_size=[4, 4], device="cpu", workers=0)
    with pytest.raises(SpocoInputError, match="checkpoint not found"):
        segment_blockwise(inp, str(tmp_path / "o.zarr"), str(tmp_path / "nope.pt"), device="cpu", workers=0)
    assert not os.path.exists(tmp_path / "o.zarr")




def test_blockwise_equals_single_block_on_real_em(tmp_path):
    """Real VNC EM (the bundled held-out sample) with the bundled model: 4 blocks stitched
    across their faces give the single block's objects; without stitching they do not."""
    from spoco_vol.demo import write_sample
    from spoco_vol.evaluation import adapted_rand_error
    raw, _ = write_sample(str(tmp_path / "sample.zarr"))
    runs = {}
    for name, bs, stitch in (("single", [7, 512, 512], True), ("blocks", [7, 256, 256], True),
                             ("unstitched", [7, 256, 256], False)):
        out = str(tmp_path / f"{name}.zarr")
        report = segment_blockwise(raw, out, BUNDLED_MODEL, block_shape=bs, workers=0, stitch=stitch,
                                   device="cpu")
        runs[name] = (np.asarray(io.open_volume(out)[...]), report)
    assert runs["blocks"][1]["blocks"] == 4 and runs["blocks"][1]["merges"] > 0
    single = runs["single"][0]
    assert adapted_rand_error(runs["blocks"][0], single)["arand"] <= 0.005
    assert adapted_rand_error(runs["unstitched"][0], single)["arand"] > 0.02


def test_halo_and_block_shape_checks(tmp_path):
    inp = _input_volume(tmp_path, np.zeros((2, 64, 64), np.uint8))
    model, ckpt = tiny_checkpoint(tmp_path)
    need = required_halo(checkpoint.load(model), 3, [1.0, 1.0, 1.0])
    assert need[0] == 0 and need[1] == need[2] >= 27  # 2D model: no context across sections
    with pytest.raises(SpocoInputError, match="shorter than the longest affinity offset"):
        segment_blockwise(inp, str(tmp_path / "o.zarr"), model, halo=[0, 5, 5], workers=0)
    with pytest.raises(SpocoInputError, match="smaller than the halo"):
        segment_blockwise(inp, str(tmp_path / "o.zarr"), model, block_shape=[2, 16, 16], workers=0)
    with pytest.raises(SpocoInputError, match="mask shape"):
        io.create_array(str(tmp_path / "mask.zarr"), np.ones((2, 8, 8), np.uint8))
        segment_blockwise(inp, str(tmp_path / "o.zarr"), model, mask=str(tmp_path / "mask.zarr"), workers=0)
    assert not os.path.exists(tmp_path / "o.zarr") and not os.path.exists(tmp_path / "o.zarr.partial")


def test_masked_and_empty_blocks_are_written_zero(tmp_path, monkeypatch):
    """A block whose core is masked out, and one whose raw (core and halo) is all 0, are
    not predicted and are written 0; inside a predicted block the mask holds per voxel."""
    from spoco_vol.blockwise import tasks
    data = np.full((2, 64, 64), 120, np.uint8)
    data[:, :, 24:] = 0  # the right blocks read x 24-63 with their halo of 8: raw entirely 0
    inp = _input_volume(tmp_path, data)
    model, _ = tiny_checkpoint(tmp_path, inference={"offsets": SHORT_OFFSETS})
    mask = np.zeros((2, 64, 64), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    mask[:, (yy >= 32) & (xx < 32) & (yy - 32 > xx)] = 1  # a triangle in the lower-left block
    mask[:, :, 32:] = 1  # the right blocks are inside the mask: only their empty raw skips them
    io.create_array(str(tmp_path / "mask.zarr"), mask)
    real, predicted = tasks.predict_block, []

    def recording(raw, block, *args, **kwargs):
        predicted.append(block.index)
        return real(raw, block, *args, **kwargs)
    monkeypatch.setattr(tasks, "predict_block", recording)
    out = str(tmp_path / "o.zarr")
    segment_blockwise(inp, out, model, block_shape=[2, 32, 32], halo=[0, 8, 8], workers=0,
                      mask=str(tmp_path / "mask.zarr"))
    assert predicted == [(0, 1, 0)]  # the lower-left block only
    lab = np.asarray(io.open_volume(out)[...])
    assert not lab[:, :32, :].any() and not lab[:, :, 32:].any()
    left, left_mask = lab[:, :, :32], mask[:, :, :32]
    assert left[left_mask == 1].any() and not left[left_mask == 0].any()  # inside a block the mask holds per voxel


def test_min_size_and_mask_is_foreground_override_the_models_rules(tmp_path):
    """Real EM with the bundled model (2x downsampling, a background embedding, a floor
    of 25 model pixels): --min-size replaces the floor; with --mask-is-foreground the
    ground-truth foreground alone decides the background, where a plain --mask only adds
    background to the model's own rule. Both are part of the run's identity."""
    d = np.load(os.path.join(os.path.dirname(BUNDLED_MODEL), "vnc_sample.npz"))
    inp = _real_crop(tmp_path)
    # the sample's mitochondria on whole 2x2 input blocks: the model grid sees the same mask
    fg = d["labels"][2:4, 64:448, 64:448] > 0
    fg = np.repeat(np.repeat(fg[:, ::2, ::2], 2, axis=1), 2, axis=2).astype(np.uint8)
    mask = str(tmp_path / "fg.zarr")
    io.create_array(mask, fg)
    run = dict(model=BUNDLED_MODEL, block_shape=[1, 192, 192], workers=0, device="cpu")

    def labels(name, **kw):
        report = segment_blockwise(inp, str(tmp_path / f"{name}.zarr"), **run, **kw)
        return np.asarray(io.open_volume(str(tmp_path / f"{name}.zarr"))[...]), report

    shipped, _ = labels("shipped")
    no_floor, report = labels("no_floor", min_size=0)
    assert report["model_overrides"] == {"min_size": 0}
    assert ((shipped > 0) <= (no_floor > 0)).all() and report["objects"] > int(shipped.max())
    assert not labels("huge_floor", min_size=10 ** 6)[0].any()
    plain, _ = labels("plain", mask=mask, min_size=0)
    only, report = labels("only", mask=mask, min_size=0, mask_is_foreground=True)
    assert report["model_overrides"] == {"min_size": 0, "mask_is_foreground": True}
    np.testing.assert_array_equal(only > 0, fg > 0)  # every masked voxel is in some object
    assert ((plain > 0) <= (fg > 0)).all() and (plain > 0).sum() < (fg > 0).sum()
    hashes = {segment_blockwise(inp, str(tmp_path / "x.zarr"), **run, dry_run=True, **kw)["run_hash"]
              for kw in ({}, {"min_size": 0}, {"min_size": 5}, {"mask": mask},
                         {"mask": mask, "mask_is_foreground": True})}
    assert len(hashes) == 5
    with pytest.raises(SpocoInputError, match="give a --mask"):
        segment_blockwise(inp, str(tmp_path / "x.zarr"), **run, mask_is_foreground=True)
    with pytest.raises(SpocoInputError, match="non-negative"):
        segment_blockwise(inp, str(tmp_path / "x.zarr"), **run, min_size=-1)
    assert not os.path.exists(tmp_path / "x.zarr")


def test_roi_gives_the_whole_runs_objects_inside_and_zero_outside(tmp_path):
    """Real EM sample: a run restricted to an unaligned ROI touches only the blocks
    overlapping it, writes nothing outside it, and inside it finds the whole run's objects."""
    from spoco_vol.demo import write_sample
    from spoco_vol.evaluation import variation_of_information
    raw, _ = write_sample(str(tmp_path / "sample.zarr"))
    full_out, roi_out = str(tmp_path / "full.zarr"), str(tmp_path / "roi.zarr")
    segment_blockwise(raw, full_out, BUNDLED_MODEL, block_shape=[7, 256, 256], workers=0, device="cpu")
    report = segment_blockwise(raw, roi_out, BUNDLED_MODEL, block_shape=[7, 256, 256], workers=0,
                               device="cpu", roi="2:6,100:300,0:200")
    assert report["blocks"] == 2 and report["roi"] == [[2, 6], [100, 300], [0, 200]]
    full = np.asarray(io.open_volume(full_out)[...])
    part = np.asarray(io.open_volume(roi_out)[...])
    inside = (slice(2, 6), slice(100, 300), slice(0, 200))
    outside = np.ones(part.shape, bool)
    outside[inside] = False
    assert not part[outside].any() and part[inside].any()
    ids = np.unique(part[part > 0])
    assert (ids == np.arange(1, len(ids) + 1)).all()
    voi = variation_of_information(part[inside], full[inside])
    assert voi["voi"] <= 0.02, voi  # objects may only differ where they leave and re-enter the ROI


def test_saved_embeddings_tile_the_model_grid_like_a_single_block(tmp_path):
    """--save-embeddings: float16 embeddings on the model grid (here XY downsampled by 2),
    one chunk per block, equal to the whole volume's embeddings."""
    from spoco_vol.pipeline import segment_array
    data = np.random.default_rng(2).integers(0, 256, (2, 60, 76)).astype(np.uint8)
    inp = _input_volume(tmp_path, data)
    model, ckpt = tiny_checkpoint(tmp_path, voxel_size=[8.0, 8.0], inference={"offsets": SHORT_OFFSETS})
    out = str(tmp_path / "seg.zarr")
    report = segment_blockwise(inp, out, model, voxel_size=[40, 4, 4], device="cpu", workers=0,
                               block_shape=[1, 32, 32], halo=[0, 16, 16], save_embeddings=True)
    emb = zarr.open_array(out + "/embeddings", mode="r")
    assert emb.shape == (4, 2, 30, 38) and emb.chunks == (4, 1, 16, 16) and emb.dtype == np.float16
    assert emb.attrs["spoco_vol"]["input_voxels_per_element"] == [1, 2, 2]
    assert report["embeddings"] == "embeddings"
    _, whole = segment_array(data, checkpoint.load(model), input_voxel_size=[40, 4, 4], device="cpu",
                             keep_embeddings=True)
    np.testing.assert_allclose(emb[...].astype(np.float32), whole, atol=0.02, rtol=0.01)
    with pytest.raises(SpocoInputError, match="multiple of the model's downsampling"):
        segment_blockwise(inp, str(tmp_path / "o.zarr"), model, voxel_size=[40, 4, 4], device="cpu",
                          workers=0, block_shape=[1, 31, 32], halo=[0, 16, 16], save_embeddings=True)
    with pytest.raises(SpocoInputError, match="integer downsampling"):
        segment_blockwise(inp, str(tmp_path / "o.zarr"), model, voxel_size=[40, 5.5, 5.5], device="cpu",
                          workers=0, save_embeddings=True)
    assert not os.path.exists(tmp_path / "o.zarr")


def test_link_sections_joins_sections_the_same_across_z_blocks(tmp_path):
    """Real EM sample, 2D model: --link-sections turns per-section objects into 3D ones,
    and blocks split along z (linked across their z faces) give the single block's."""
    from spoco_vol.demo import write_sample
    raw, _ = write_sample(str(tmp_path / "sample.zarr"))
    runs = {}
    for name, bs, link in (("flat", [7, 512, 512], False), ("single", [7, 512, 512], True),
                           ("blocks", [3, 256, 256], True)):
        out = str(tmp_path / f"{name}.zarr")
        report = segment_blockwise(raw, out, BUNDLED_MODEL, block_shape=bs, workers=0, device="cpu",
                                   link_sections=link)
        runs[name] = (np.asarray(io.open_volume(out)[...]), report)
    flat, single, blocks = (runs[k][0] for k in ("flat", "single", "blocks"))
    assert runs["single"][1]["objects"] < runs["flat"][1]["objects"] / 2
    spans = [len(np.unique(np.nonzero(single == i)[0])) for i in range(1, int(single.max()) + 1)]
    assert max(spans) == 7  # some mitochondria run through every section
    assert (single > 0).sum() == (flat > 0).sum()  # linking only renames
    # the same objects (ids follow the block order, so they may be numbered differently)
    pairs = np.unique(np.stack([blocks.ravel(), single.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    model, _ = tiny_checkpoint(tmp_path)
    two_d = _input_volume(tmp_path, np.zeros((32, 32), np.uint8), name="two_d.zarr")
    with pytest.raises(SpocoInputError, match="3D input"):
        segment_blockwise(two_d, str(tmp_path / "o.zarr"), model, workers=0, link_sections=True)
    with pytest.raises(SpocoInputError, match="--link-overlap"):
        segment_blockwise(raw, str(tmp_path / "o.zarr"), model, workers=0, link_sections=True, link_overlap=0)


# ------------------------------------------------------------------------ resume

def _real_crop(tmp_path):
    """Two 384 x 384 sections of the bundled real EM sample, as a zarr array."""
    d = np.load(os.path.join(os.path.dirname(BUNDLED_MODEL), "vnc_sample.npz"))
    io.create_array(str(tmp_path / "crop.zarr"), d["raw"][2:4, 64:448, 64:448], chunks=(1, 192, 192),
                    attrs={"voxel_size": [float(v) for v in d["voxel_size_nm"]]})
    return str(tmp_path / "crop.zarr")


def _segment_cli(inp, out, *more, crash_at=None):
    import subprocess
    import sys
    env = dict(os.environ)
    env.pop("SPOCO_VOL_CRASH_AT", None)
    if crash_at:
        env["SPOCO_VOL_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-c", "from spoco_vol.cli import cli; cli()", "segment", "--input", inp,
                           "--output", out, "--block-shape", "1,192,192", "--workers", "0", "--device", "cpu", *more],
                          env=env, capture_output=True, text=True)


@pytest.mark.parametrize("crash_at", ["segment:0", "stitch", "relabel:2", "pyramid:1", "finalize"])
def test_rerun_after_kill_resumes_to_bit_identical_labels(tmp_path, crash_at):
    """The whole run is SIGKILLed at a point of each pass; the same command again
    finishes it, and the labels are bit-identical to an uninterrupted run's."""
    inp = _real_crop(tmp_path)
    ref = str(tmp_path / "ref.zarr")
    segment_blockwise(inp, ref, BUNDLED_MODEL, block_shape=[1, 192, 192], workers=0, device="cpu")
    out = str(tmp_path / "out.zarr")
    crashed = _segment_cli(inp, out, crash_at=crash_at)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert not os.path.exists(out) and os.path.exists(out + ".partial")
    done_before = len(os.listdir(out + ".partial/blocks")) if crash_at != "finalize" else None
    resumed = _segment_cli(inp, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not os.path.exists(out + ".partial")
    a, b = zarr.open_array(ref + "/0", mode="r"), zarr.open_array(out + "/0", mode="r")
    assert a.dtype == b.dtype and np.array_equal(a[...], b[...]) and int(a[...].max()) > 5
    report = zarr.open_group(out, mode="r").attrs["spoco_vol"]
    if crash_at.startswith("segment"):
        assert report["resumed"] and report["blocks_done_before"] == done_before and 1 <= done_before < 8
    elif crash_at != "finalize":
        assert report["blocks_done_before"] == 8  # every block was segmented before the kill
    assert sorted(zarr.open_group(out, mode="r").keys()) == ["0", "1"]  # the labels and their pyramid
    np.testing.assert_array_equal(zarr.open_array(out + "/1", mode="r")[...], a[...][:, ::2, ::2])


def test_partial_run_with_other_settings_is_refused(tmp_path):
    inp = _real_crop(tmp_path)
    out = str(tmp_path / "out.zarr")
    assert _segment_cli(inp, out, crash_at="segment:1").returncode == -9
    before = sorted(os.listdir(out + ".partial/blocks"))
    other = _segment_cli(inp, out, "--no-stitch")
    assert other.returncode == 2 and "--overwrite" in other.stderr and other.stderr.count("\n") == 1
    assert sorted(os.listdir(out + ".partial/blocks")) == before  # untouched
    again = _segment_cli(inp, out, "--no-stitch", "--overwrite")
    assert again.returncode == 0 and not os.path.exists(out + ".partial")
    assert zarr.open_group(out, mode="r").attrs["spoco_vol"]["blocks_done_before"] == 0


def test_test_time_augmentation_blockwise(tmp_path):
    """With --tta every block averages its 8 rotated/flipped predictions; blocks still
    agree with one block over the whole crop, and the run's fingerprint records it."""
    from spoco_vol.evaluation import adapted_rand_error
    inp = _real_crop(tmp_path)
    runs = {}
    for name, bs in (("single", [2, 384, 384]), ("blocks", [2, 192, 384])):
        out = str(tmp_path / f"{name}.zarr")
        runs[name] = segment_blockwise(inp, out, BUNDLED_MODEL, block_shape=bs, workers=0, device="cpu", tta=True)
        runs[name + "_labels"] = np.asarray(io.open_volume(out)[...])
    assert runs["blocks"]["tta"] and "test-time augmentation" in format_report(runs["blocks"])
    assert adapted_rand_error(runs["blocks_labels"], runs["single_labels"])["arand"] <= 0.005
    plain = segment_blockwise(inp, str(tmp_path / "plain.zarr"), BUNDLED_MODEL, block_shape=[2, 384, 384],
                              workers=0, device="cpu")
    assert not plain["tta"]
    assert not np.array_equal(np.asarray(io.open_volume(str(tmp_path / "plain.zarr"))[...]), runs["single_labels"])
    dry = [segment_blockwise(inp, str(tmp_path / "x.zarr"), BUNDLED_MODEL, dry_run=True, tta=t)["run_hash"]
           for t in (None, False, True)]
    assert dry[0] == dry[1] != dry[2]


def test_labels_are_bit_identical_for_any_worker_count(tmp_path, monkeypatch):
    """In-process, and on LocalClusters of 1, 2 and 4 worker processes (so other torch
    thread counts and other block completion orders): the same labels, bit for bit.
    Only 3 tasks are in flight at a time, so the top-up of the submission window runs."""
    from spoco_vol.blockwise import executor
    monkeypatch.setattr(executor, "MAX_IN_FLIGHT", 3)
    inp = _real_crop(tmp_path)
    runs = []
    for workers in (0, 1, 2, 4):
        out = str(tmp_path / f"w{workers}.zarr")
        segment_blockwise(inp, out, BUNDLED_MODEL, block_shape=[1, 192, 192], workers=workers, device="cpu")
        runs.append(zarr.open_array(out + "/0", mode="r")[...])
    assert int(runs[0].max()) > 5
    for other in runs[1:]:
        assert other.dtype == runs[0].dtype and np.array_equal(other, runs[0])


def _kill_when_first_block_is_done(out, kill):
    """Background thread: wait for a block's done marker in <out>.partial, then ``kill()``."""
    import threading

    def watch():
        blocks = out + ".partial/blocks"
        for _ in range(3000):
            if os.path.isdir(blocks) and any(f.endswith(".npz") and ".tmp" not in f for f in os.listdir(blocks)):
                kill()
                return
            time.sleep(0.05)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t
