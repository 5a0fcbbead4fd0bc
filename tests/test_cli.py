"""The command line as a user meets it: help, bad input, segment and demo end to end."""
import os

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from spoco_vol import io
from spoco_vol.cli import cli
from spoco_vol.checkpoint import make_checkpoint, save as save_checkpoint
from spoco_vol.model import UNet
from spoco_vol.pipeline import BUNDLED_MODEL


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_help_lists_every_command_and_each_has_help():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("train", "segment", "evaluate", "demo", "info"):
        assert cmd in r.output
        sub = invoke(cmd, "--help")
        assert sub.exit_code == 0 and "Usage:" in sub.output


def test_train_help_states_defaults_and_units():
    out = " ".join(invoke("train", "--help").output.split())  # whatever the wrapping
    assert "default: --init's, else 256,256" in out and "nm" in out and "default: 1e-3 with full labels" in out


@pytest.fixture
def tiny_model(tmp_path):
    """An untrained 2D checkpoint: the pipeline's plumbing does not depend on training."""
    torch.manual_seed(0)
    net = UNet(dims=2, features=(4, 8))
    ck = make_checkpoint(net, delta_v=0.5, delta_d=2.0, normalization={"mean": 100.0, "std": 50.0},
                         voxel_size=[10.0, 10.0], training_data="none", training_command="test")
    path = str(tmp_path / "tiny.pt")
    save_checkpoint(ck, path)
    return path


def one_error_line(r):
    """Exactly one error line and no traceback (a run that got as far as starting its
    cluster may have printed where the cluster is, and progress, before it)."""
    assert r.exit_code == 2, r.output
    errors = [l for l in r.output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in r.output and "Exception" not in r.output, r.output
    return errors[0]


def test_segment_writes_ome_zarr(blob_volume, tmp_path, tiny_model):
    raw, _ = blob_volume
    out = str(tmp_path / "seg.zarr")
    r = invoke("segment", "--input", raw, "--output", out, "--model", tiny_model)
    assert r.exit_code == 0, r.output
    g = zarr.open_group(out, mode="r")
    assert g["0"].shape == (4, 64, 64) and np.dtype(g["0"].dtype).kind == "u"
    ms = (g.attrs.get("ome") or g.attrs)["multiscales"][0]  # OME-Zarr 0.5 for a zarr v3 input
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [50.0, 10.0, 10.0]
    assert g.attrs["spoco_vol"]["model_sha256"]
    for stage in ("read", "predict", "affinities", "watershed", "stitch", "relabel", "write", "worker"):
        assert stage in r.output


def test_segment_bad_inputs(blob_volume, tmp_path, tiny_model):
    raw, labels = blob_volume
    root = os.path.dirname(raw)
    out = str(tmp_path / "seg.zarr")
    seg = lambda inp, *more: invoke("segment", "--input", inp, "--output", out, "--model", tiny_model, *more)
    assert "not found" in one_error_line(seg(root + "/missing"))
    os.makedirs(tmp_path / "plain_dir")
    assert "not a zarr" in one_error_line(seg(str(tmp_path / "plain_dir")))
    io.create_array(root + "/one_d", np.zeros(10, np.uint8))
    assert "1D" in one_error_line(seg(root + "/one_d"))
    io.create_array(root + "/four_d", np.zeros((2, 2, 8, 8), np.uint8))
    assert "4D" in one_error_line(seg(root + "/four_d"))
    io.create_array(root + "/empty", np.zeros((0, 8, 8), np.uint8), chunks=(1, 8, 8))
    assert "empty" in one_error_line(seg(root + "/empty"))
    nan = np.ones((2, 32, 32), np.float32)
    nan[0, 3, 3] = np.nan
    io.create_array(root + "/nan", nan)
    assert "NaN" in one_error_line(seg(root + "/nan"))
    (tmp_path / "garbage.pt").write_bytes(os.urandom(256))
    assert "cannot read checkpoint" in one_error_line(
        invoke("segment", "--input", raw, "--output", out, "--model", str(tmp_path / "garbage.pt")))
    torch.save({"weights": torch.zeros(2)}, str(tmp_path / "foreign.pt"))
    assert "not a spoco-vol checkpoint" in one_error_line(
        invoke("segment", "--input", raw, "--output", out, "--model", str(tmp_path / "foreign.pt")))
    net3d = UNet(dims=3, features=(4, 8))
    ck = make_checkpoint(net3d, delta_v=0.5, delta_d=2.0, normalization={"mean": 0, "std": 1},
                         voxel_size=None, training_data="x", training_command="x")
    save_checkpoint(ck, str(tmp_path / "m3.pt"))
    io.create_array(root + "/two_d", np.zeros((32, 32), np.uint8))
    assert "3D" in one_error_line(invoke("segment", "--input", root + "/two_d", "--output", out,
                                         "--model", str(tmp_path / "m3.pt")))
    rgb = UNet(dims=2, in_channels=3, features=(4, 8))
    save_checkpoint(make_checkpoint(rgb, delta_v=0.5, delta_d=2.0, normalization={"mean": 0, "std": 1},
                                    voxel_size=None, training_data="x", training_command="x"),
                    str(tmp_path / "rgb.pt"))
    assert "channels" in one_error_line(invoke("segment", "--input", raw, "--output", out,
                                               "--model", str(tmp_path / "rgb.pt")))
    assert "--roi" in one_error_line(seg(raw, "--roi", "0:2,0:999,:"))
    assert "--roi" in one_error_line(seg(raw, "--roi", "0:2,0:8"))
    assert "give a --mask" in one_error_line(seg(raw, "--mask-is-foreground"))
    assert not os.path.exists(out), "no output may be left behind by bad input"
    assert "inside the input" in one_error_line(
        invoke("segment", "--input", raw, "--output", root + "/labels_out", "--model", tiny_model))
    assert "not a writable directory" in one_error_line(
        invoke("segment", "--input", raw, "--output", "/nonexistent/dir/out.zarr", "--model", tiny_model))


def test_existing_output_is_kept_without_overwrite(blob_volume, tmp_path, tiny_model):
    """The same command again on its complete output says so and exits 0 (a job script
    rerun after a kill that landed just after the final rename); other settings are
    refused unless --overwrite; nothing is touched either way."""
    raw, _ = blob_volume
    out = str(tmp_path / "seg.zarr")
    assert invoke("segment", "--input", raw, "--output", out, "--model", tiny_model).exit_code == 0
    before = sorted(os.listdir(out))
    zarr.open_group(out, mode="a").attrs["marker"] = "old"
    again = invoke("segment", "--input", raw, "--output", out, "--model", tiny_model)
    assert again.exit_code == 0 and "already complete" in again.output
    assert "--overwrite" in one_error_line(invoke("segment", "--input", raw, "--output", out, "--model", tiny_model,
                                                  "--no-stitch"))
    assert zarr.open_group(out, mode="r").attrs["marker"] == "old" and sorted(os.listdir(out)) == before
    r = invoke("segment", "--input", raw, "--output", out, "--model", tiny_model, "--overwrite")
    assert r.exit_code == 0 and "marker" not in zarr.open_group(out, mode="r").attrs


def test_evaluate_command(blob_volume):
    _, labels = blob_volume
    r = invoke("evaluate", "--pred", labels, "--gt", labels, "--per-section")
    assert r.exit_code == 0 and "ap@0.5" in r.output and "1.0000" in r.output


def test_info_shows_the_bundled_model_card():
    r = invoke("info")
    assert r.exit_code == 0, r.output
    assert "vnc" in r.output.lower() and '"voxel_size"' in r.output and "sha256" in r.output


def test_demo_segments_the_bundled_real_sample(tmp_path):
    """End to end on real EM (VNC sections 13-19, held out from the bundled model's training)."""
    assert os.path.isfile(BUNDLED_MODEL)
    r = invoke("demo", "--out", str(tmp_path / "demo"))
    assert r.exit_code == 0, r.output
    ap = float(next(l for l in r.output.splitlines() if l.split()[:1] == ["ap@0.5"]).split()[-1])
    assert ap >= 0.6, r.output  # a 512x512 crop: objects cut by its border; full figures in RESULTS.md
    again = invoke("demo", "--out", str(tmp_path / "demo"))
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_models_are_listed_and_chosen_by_name(blob_volume, tmp_path):
    from spoco_vol.bundled import MODELS, model_path
    r = invoke("models")
    assert r.exit_code == 0
    for name in MODELS:
        assert name in r.output and os.path.isfile(model_path(name))
    assert "9.2" in r.output and "held out" in r.output
    assert model_path("vnc-mito-2d") == BUNDLED_MODEL and model_path(None) == BUNDLED_MODEL
    raw, _ = blob_volume
    bad = invoke("segment", "--input", raw, "--output", str(tmp_path / "s.zarr"), "--model", "no-such-model")
    assert bad.exit_code == 2 and "no bundled model named 'no-such-model'" in bad.output
    assert invoke("info", "vnc-mito-2d").exit_code == 0
