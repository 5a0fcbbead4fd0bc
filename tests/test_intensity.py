"""Inputs as labs store them (spoco_vol.intensity): other dtypes and ranges are brought
to the model's input range by a documented rule, or refused with one line."""
import warnings

import numpy as np
import pytest
import zarr

from spoco_vol import intensity, io
from spoco_vol.blockwise import segment_blockwise
from spoco_vol.demo import SAMPLE
from spoco_vol.errors import SpocoInputError, SpocoWarning
from spoco_vol.evaluation import adapted_rand_error
from spoco_vol.pipeline import BUNDLED_MODEL

UINT8 = {"mean": 128.0, "std": 50.0, "kind": "zscore"}  # a checkpoint without the record: uint8 0..255


def _arr(path, data, chunks=None):
    a = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=chunks or data.shape)
    a[...] = data
    return zarr.open_array(str(path), mode="r")


@pytest.mark.parametrize("data, source, rule", [
    (np.array([[0, 255], [7, 9]], np.uint8), [0, 255], "uint8 as trained"),
    (np.array([[0, 65535], [7, 9]], np.uint16), [0, 65535], "16-bit"),
    (np.array([[0, 4095], [7, 9]], np.uint16), [0, 4095], "12-bit"),     # 12-bit camera data in uint16
    (np.array([[0, 1000], [7, 9]], np.uint16), [0, 1023], "10-bit"),
    (np.array([[-128, 127], [7, 9]], np.int8), [-128, 127], "int8 range"),
    (np.array([[0.0, 1.0], [0.2, 0.5]], np.float32), [0, 1], "float32 in [0, 1]"),
])
def test_rules(tmp_path, data, source, rule):
    m = intensity.volume_mapping(_arr(tmp_path / "a.zarr", data), UINT8)
    assert m["input_range"] == source and rule in m["rule"] and m["model_range"] == [0, 255]
    mapped = intensity.apply(np.array(source, data.dtype), m)
    np.testing.assert_allclose(mapped, [0, 255], atol=1e-3)


def test_float_outside_the_unit_range_needs_the_range_given(tmp_path):
    arr = _arr(tmp_path / "f.zarr", np.array([[-3.0, 700.0]], np.float32))
    with pytest.raises(SpocoInputError, match=r"values in \[-3, 700\].*--intensity-range"):
        intensity.volume_mapping(arr, UINT8)
    m = intensity.volume_mapping(arr, UINT8, given=[-3, 700])
    np.testing.assert_allclose(intensity.apply(np.array([-3.0, 700.0]), m), [0, 255], atol=1e-3)
    with pytest.raises(SpocoInputError, match="LO < HI"):
        intensity.volume_mapping(arr, UINT8, given=[5, 5])


def test_the_range_is_measured_over_every_chunk(tmp_path):
    data = np.zeros((4, 8, 8), np.uint16)
    data[3, 7, 7] = 4000  # the only bright voxel, in the last chunk
    assert intensity.value_range(_arr(tmp_path / "c.zarr", data, chunks=(1, 4, 4))) == (0, 4000)
    nan = np.zeros((2, 4, 4), np.float32)
    nan[1, 2, 2] = np.nan
    with pytest.raises(SpocoInputError, match="NaN"):
        intensity.value_range(_arr(tmp_path / "n.zarr", nan, chunks=(1, 4, 4)))


def test_the_vnc_sample_gives_the_same_objects_as_uint8_uint16_and_float(tmp_path):
    """The bundled real sample stored three ways (uint8; uint16 x 257; float32 / 255) is
    segmented into the same objects (ARand <= 0.01 between them), and the output
    records the mapping that was applied."""
    d = np.load(SAMPLE)
    raw = d["raw"][:2, :256, :256]
    vs = [float(v) for v in d["voxel_size_nm"]]
    labels = {}
    for name, data in (("u8", raw), ("u16", raw.astype(np.uint16) * 257), ("f32", raw.astype(np.float32) / 255)):
        inp = str(tmp_path / f"{name}.zarr")
        _arr(inp, data, chunks=(1, 256, 256))
        out = str(tmp_path / f"{name}_seg.zarr")
        report = segment_blockwise(inp, out, BUNDLED_MODEL, voxel_size=vs, device="cpu", workers=0,
                                   block_shape=[2, 256, 256])
        labels[name] = zarr.open_array(out + "/0")[...]
        recorded = zarr.open_group(out).attrs["spoco_vol"]["intensity"]
        assert recorded == report["intensity"]
    assert report["intensity"]["rule"] == "float32 in [0, 1]"
    assert labels["u8"].max() >= 5
    for other in ("u16", "f32"):
        assert adapted_rand_error(labels[other], labels["u8"])["arand"] <= 0.01, other


def test_unknown_voxel_size_warns_once_and_writes_no_made_up_scale(tmp_path):
    d = np.load(SAMPLE)
    inp = str(tmp_path / "novs.zarr")
    _arr(inp, d["raw"][:1, :128, :128], chunks=(1, 128, 128))
    out = str(tmp_path / "seg.zarr")
    with pytest.warns(SpocoWarning, match=r"voxel size of .* is unknown.*50 x 9.2 x 9.2 nm.*--voxel-size") as w:
        segment_blockwise(inp, out, BUNDLED_MODEL, device="cpu", workers=0)
    assert len([x for x in w if issubclass(x.category, SpocoWarning)]) == 1
    ms = zarr.open_group(out).attrs["ome"]["multiscales"][0]
    assert all("unit" not in a for a in ms["axes"])  # a scale in voxels, not nanometers
    assert io.read_voxel_size(out) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a voxel size: no warning
        segment_blockwise(inp, str(tmp_path / "seg2.zarr"), BUNDLED_MODEL, voxel_size=[50, 4.6, 4.6],
                          device="cpu", workers=0)


def test_every_command_that_reads_raw_takes_the_range_of_float_data(tmp_path):
    """Float raw outside [0, 1] needs --intensity-range (one line that says so), in
    fine-tune, calibrate and train-foreground as in train and segment; given the range,
    0..255 floats calibrate and train a classifier exactly as the uint8 original does."""
    import json

    from click.testing import CliRunner

    from spoco_vol.cli import cli
    d = np.load(SAMPLE)
    attrs = {"voxel_size": [float(v) for v in d["voxel_size_nm"]]}
    for name, dtype in (("u8", np.uint8), ("f32", np.float32)):
        io.create_array(str(tmp_path / f"{name}.zarr" / "raw"), d["raw"][:3].astype(dtype), attrs=attrs)
        io.create_array(str(tmp_path / f"{name}.zarr" / "labels"), d["labels"][:3].astype(np.uint16),
                        attrs=attrs)

    def run(command, name, out, *extra):
        args = [command, "--raw", str(tmp_path / f"{name}.zarr" / "raw"), "--labels",
                str(tmp_path / f"{name}.zarr" / "labels"), "--out", str(tmp_path / out), *extra]
        return CliRunner().invoke(cli, args + (["--model", "vnc-mito-2d"] if command != "fine-tune" else []))
    for command, extra in (("calibrate", ["--device", "cpu"]),
                           ("train-foreground", ["--iterations", "2", "--object-fraction", "1", "--quiet"])):
        refused = run(command, "f32", "refused.pt", *extra)
        assert refused.exit_code == 2 and "--intensity-range" in refused.output.strip().splitlines()[-1]
        assert not (tmp_path / "refused.pt").exists()
        results = []
        for name, given in (("u8", []), ("f32", ["--intensity-range", "0,255"])):
            r = run(command, name, f"{command}_{name}.pt", *extra, *given)
            assert r.exit_code == 0, r.output
            results.append({k: v for k, v in json.loads(r.output).items() if "second" not in k and k != "out"})
        assert results[1] == results[0], command
    refused = run("fine-tune", "f32", "ft", "--quiet")
    assert refused.exit_code == 2 and "--intensity-range" in refused.output and not (tmp_path / "ft").exists()
