"""Training from zarr volumes: outputs, exact resume, sparse subsets, fine-tuning, bad input."""
import csv
import dataclasses
import json
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spoco_vol import bundled, checkpoint, io
from spoco_vol.cli import cli
from spoco_vol.config import TrainConfig
from spoco_vol.errors import SpocoInputError
from spoco_vol.validation import FLOOR_MULTIPLES


def load_checkpoint(path):
    """The stored layout of a checkpoint file (spoco_vol.checkpoint's docstring)."""
    return checkpoint.load(path).data


TINY = ["--dims", "2", "--patch-shape", "32,32", "--batch-size", "2", "--features", "4,8",
        "--val-every", "3", "--quiet", "--no-amp"]


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def train_args(raw, labels, out, *extra):
    return ["train", "--raw", raw, "--labels", labels, "--out", out, *TINY, *extra]


def test_train_writes_checkpoints_log_and_plot(blob_volume, tmp_path):
    raw, labels = blob_volume
    out = str(tmp_path / "run")
    r = run(train_args(raw, labels, out, "--iterations", "6", "--downsample", "1,2,2"))
    assert r.exit_code == 0, r.output
    for f in ("best.pt", "latest.pt", "log.csv", "loss.png", "summary.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    rows = list(csv.DictReader(open(os.path.join(out, "log.csv"))))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 7))
    assert all(float(r["pull"]) >= 0 and r["total"] for r in rows)
    assert rows[2]["val_loss"] and not rows[0]["val_loss"]  # validation every 3 iterations
    ck = load_checkpoint(os.path.join(out, "best.pt"))
    assert ck["voxel_size"] == [50.0, 20.0, 20.0]  # data voxel size x downsample
    assert ck["architecture"]["features"] == [4, 8] and ck["embedding_dim"] == 16
    assert ck["delta_v"] == 0.5 and ck["delta_d"] == 2.0
    assert ck["training_command"].startswith("spoco-vol train --raw")
    assert ck["training_data"] == raw
    assert ck["normalization"]["std"] > 0
    assert len(ck["inference"]["background_embedding"]) == 16
    assert ck["training"]["mode"] == "full"
    # dense held-out labels choose the size floor from multiples of the base floor
    inf = ck["inference"]
    assert inf["min_size"] in [inf["min_size_base"] * m for m in FLOOR_MULTIPLES]
    assert 0 <= inf["min_size_val_f1"] <= 1
    assert json.load(open(os.path.join(out, "summary.json")))["size_floor"]["min_size"] == inf["min_size"]


def test_best_checkpoint_is_the_one_with_the_highest_validation_ap(blob_volume, tmp_path):
    """In the sparse setting the validation loss is blind to background fragments, so
    best.pt is chosen by AP@0.5 on the labeled held-out sections, and carries the background
    calibration measured there."""
    raw, labels = blob_volume
    out = str(tmp_path / "run")
    assert run(train_args(raw, labels, out, "--iterations", "9", "--object-fraction", "0.5",
                          "--val-sections", "1")).exit_code == 0
    rows = [r for r in csv.DictReader(open(os.path.join(out, "log.csv"))) if r["val_score"]]
    assert [int(r["iteration"]) for r in rows] == [3, 6, 9]
    aps = [float(r["val_score"]) for r in rows]
    first_best = int(rows[aps.index(max(aps))]["iteration"])  # ties: the earliest stays best
    ck = load_checkpoint(os.path.join(out, "best.pt"))
    assert ck["training"]["iterations"] == first_best
    assert ck["training"]["selected_by"] == "AP@0.5 of held-out sections"
    assert ck["training"]["val_score"] == pytest.approx(max(aps), abs=1e-4)
    assert ck["inference"]["background_radius_val_score"] == pytest.approx(max(aps), abs=1e-4)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["best_iteration"] == first_best


def test_tta_training_validates_and_calibrates_with_it(blob_volume, tmp_path, monkeypatch):
    """train --tta scores its validation sections with test-time augmentation and
    without it, and keeps it unless the score without it is higher by more than the
    margin (validation.keeps_tta); its checkpoints segment as they were calibrated: a
    calibration of best.pt on the same section with its own setting reproduces its
    background exactly (float32)."""
    from spoco_vol import inference
    from spoco_vol.calibration import recalibrate_checkpoint
    from spoco_vol.validation import keeps_tta
    real, asked, depth = inference.predict_embeddings, [], [0]

    def recording(*args, **kwargs):
        # With TTA, predict_embeddings calls itself once per view (through this spy):
        # record the outermost calls only, or every TTA call would also log a False.
        if not depth[0]:
            asked.append(kwargs.get("tta", False))
        depth[0] += 1
        try:
            return real(*args, **kwargs)
        finally:
            depth[0] -= 1
    monkeypatch.setattr(inference, "predict_embeddings", recording)
    raw, labels = blob_volume
    for tta in (False, True):
        asked.clear()
        out = str(tmp_path / f"run{tta}")
        r = run(train_args(raw, labels, out, "--iterations", "3", "--object-fraction", "0.5", "--no-amp",
                           "--val-sections", "1", "--tta" if tta else "--no-tta"))
        assert r.exit_code == 0, r.output
        assert any(asked) == tta and (not tta or not all(asked))  # --tta: measured both ways
        for name in ("best.pt", "latest.pt"):
            inf = load_checkpoint(os.path.join(out, name))["inference"]
            if tta:
                assert inf["tta"] is keeps_tta(inf["val_score_with_tta"], inf["val_score_without_tta"])
                assert inf["background_radius_val_score"] == \
                    inf["val_score_with_tta" if inf["tta"] else "val_score_without_tta"]
            else:
                assert inf["tta"] is False and "val_score_without_tta" not in inf
    ck = load_checkpoint(os.path.join(out, "best.pt"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["tta"]["kept"] is ck["inference"]["tta"]
    path = str(tmp_path / "cal.pt")
    recalibrate_checkpoint(out + "/best.pt", raw, labels, path, z_range=(3, 4), device="cpu", amp=False)
    cal = load_checkpoint(path)["inference"]
    assert cal["tta"] is ck["inference"]["tta"]  # kept from the checkpoint
    assert cal["background_radius_val_score"] == pytest.approx(ck["training"]["val_score"], abs=1e-6)
    np.testing.assert_allclose(cal["background_embedding"], ck["inference"]["background_embedding"], atol=1e-5)


@pytest.mark.parametrize("margin, kept", [(-1.0, False), (float("inf"), True)])
def test_tta_is_dropped_only_where_held_out_objects_score_higher_without_it(blob_volume, tmp_path, monkeypatch,
                                                                           margin, kept):
    """Sparse labels, held-out objects: at a margin no score can beat, TTA stays; at one
    every score beats, the run drops it, and the foreground classifier is trained and
    judged, and the size floor chosen, on predictions made the way the checkpoint will
    segment (with TTA or without); a later calibration keeps its setting."""
    from spoco_vol import calibration, foreground, validation
    from spoco_vol.calibration import recalibrate_checkpoint
    monkeypatch.setattr(validation, "TTA_MARGIN", margin)
    after_embeddings = []  # the tta of every prediction made for the classifier and the floor
    for module, name in ((foreground, "predict_embeddings"), (foreground, "predict_foreground"),
                         (calibration, "predict_foreground")):
        def recording(*args, _real=getattr(module, name), **kwargs):
            after_embeddings.append(kwargs.get("tta", False))
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, recording)
    raw, labels = blob_volume
    out = str(tmp_path / "run")
    r = run(train_args(raw, labels, out, "--iterations", "3", "--object-fraction", "0.6", "--tta",
                       "--foreground-iterations", "2"))
    assert r.exit_code == 0, r.output
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["validation"] == "PQ of held-out objects"
    assert summary["tta"]["kept"] is kept
    assert {"val_score_with_tta", "val_score_without_tta"} <= set(summary["tta"])
    best = checkpoint.load(os.path.join(out, "best.pt"))
    assert best.inference.tta is kept and best.inference_record["tta"] is kept
    assert after_embeddings and set(after_embeddings) == {kept}
    if not kept:  # the stored rule was measured on plain embeddings
        path = str(tmp_path / "cal.pt")
        recalibrate_checkpoint(out + "/best.pt", raw, labels, path, z_range=(3, 4), device="cpu", amp=False)
        cal = load_checkpoint(path)["inference"]
        assert cal["tta"] is False


def _same_latest_weights(run_a, run_b):
    """The two runs' latest.pt (loaded), after checking that their weights are equal."""
    a, b = (torch.load(os.path.join(r, "latest.pt"), weights_only=True) for r in (run_a, run_b))
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    return a, b


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_over(blob_volume, tmp_path):
    """Stopped before its first validation, a run leaves log rows (and, with --init, the
    start model as best.pt) but no latest.pt: --resume (and a recipe's rerun) starts it
    over, as the same run from scratch; a directory without a run stays refused."""
    raw, labels = blob_volume
    straight, stopped = str(tmp_path / "a"), str(tmp_path / "b")
    args = ("--iterations", "4", "--object-fraction", "0.5")
    assert run(train_args(raw, labels, straight, *args)).exit_code == 0
    assert run(train_args(raw, labels, stopped, *args)).exit_code == 0
    for name in ("latest.pt", "summary.json"):  # what a stop before the first checkpoint leaves
        os.remove(os.path.join(stopped, name))
    refused = run(train_args(raw, labels, stopped, *args))
    assert refused.exit_code == 2 and "--resume" in refused.output
    assert run(train_args(raw, labels, stopped, *args, "--resume")).exit_code == 0
    _same_latest_weights(straight, stopped)
    rows = list(csv.DictReader(open(os.path.join(stopped, "log.csv"))))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]  # the old rows are gone, not doubled
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    r = run(train_args(raw, labels, str(mine), *args, "--resume"))
    assert r.exit_code == 2 and "no latest.pt" in r.output and (mine / "notes.txt").read_text() == "x"


def test_threads_option_sets_the_torch_thread_count(blob_volume, tmp_path):
    raw, labels = blob_volume
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that the option has something to change
    try:
        assert run(train_args(raw, labels, str(tmp_path / "run"), "--iterations", "1", "--threads", "1")).exit_code == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("ramp", [[], ["--momentum-ramp"]])
def test_resume_continues_exactly(blob_volume, tmp_path, ramp):
    raw, labels = blob_volume
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    args = ("--iterations", "6", "--object-fraction", "0.5", *ramp)
    assert run(train_args(raw, labels, straight, *args)).exit_code == 0
    r = run(train_args(raw, labels, split, *args, "--stop-after", "4"))
    assert r.exit_code == 0 and '"stopped_at": 4' in r.output
    assert run(train_args(raw, labels, split, *args, "--resume")).exit_code == 0
    a, b = _same_latest_weights(straight, split)
    for k in a["training_state"]["momentum_state"]:
        assert torch.equal(a["training_state"]["momentum_state"][k], b["training_state"]["momentum_state"][k])
    assert a["training"].get("momentum_ramp", False) == bool(ramp)
    la = list(csv.DictReader(open(os.path.join(straight, "log.csv"))))
    lb = list(csv.DictReader(open(os.path.join(split, "log.csv"))))
    assert [r["total"] for r in la] == [r["total"] for r in lb]


# the scaler skips the optimizer step while its scale is too high for fp16: PyTorch then
# warns that the schedule stepped first, which is what skipping means
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_fp16_training_scales_the_loss_and_resumes_exactly(blob_volume, tmp_path, monkeypatch):
    """GPUs without bf16 train in fp16 with a GradScaler; its state is saved with the
    run so --resume stays exact. Emulated here: fp16 autocast on the CPU."""
    from spoco_vol import inference, loop
    monkeypatch.setattr(inference, "autocast_dtype", lambda device: torch.float16)
    monkeypatch.setattr(loop, "autocast_dtype", lambda device: torch.float16)
    raw, labels = blob_volume
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    args = ("--iterations", "4", "--object-fraction", "0.5", "--amp")  # TINY has --no-amp
    assert run(train_args(raw, labels, straight, *args)).exit_code == 0
    assert run(train_args(raw, labels, split, *args, "--stop-after", "2")).exit_code == 0
    assert run(train_args(raw, labels, split, *args, "--resume")).exit_code == 0
    a = torch.load(os.path.join(straight, "latest.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "latest.pt"), weights_only=True)
    assert a["training_state"]["scaler"]["scale"] > 0  # the scaler ran and was saved
    assert a["training_state"]["scaler"] == b["training_state"]["scaler"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert all(torch.isfinite(v).all() for v in a["state_dict"].values() if v.is_floating_point())


def test_resume_after_a_stop_at_a_checkpoint_iteration(blob_volume, tmp_path):
    """Stopping exactly where validation runs must still record that best model."""
    raw, labels = blob_volume
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(train_args(raw, labels, straight, "--iterations", "6")).exit_code == 0
    assert run(train_args(raw, labels, split, "--iterations", "6", "--stop-after", "3")).exit_code == 0
    assert run(train_args(raw, labels, split, "--iterations", "6", "--resume")).exit_code == 0
    for name in ("best.pt", "latest.pt"):
        a = torch.load(os.path.join(straight, name), weights_only=True)
        b = torch.load(os.path.join(split, name), weights_only=True)
        assert a["training"]["iterations"] == b["training"]["iterations"]
        for k in a["state_dict"]:
            assert torch.equal(a["state_dict"][k], b["state_dict"][k]), (name, k)


def test_bad_parameters_write_nothing(blob_volume, tmp_path):
    raw, labels = blob_volume
    out = str(tmp_path / "out")
    for extra, word in ((["--threshold", "1.5"], "threshold"), (["--downsample", "1,0,1"], "downsample"),
                        (["--downsample", "2,1,1"], "z factor"), (["--voxel-size", "0,1,1"], "voxel-size"),
                        (["--delta-v", "0"], "delta-v"), (["--loss-margin", "16"], "loss-margin"),
                        (["--loss-margin", "1,2,3"], "loss-margin"),
                        (["--momentum-ramp", "--consistency-network", "shared"], "momentum-ramp")):
        r = CliRunner().invoke(cli, train_args(raw, labels, out, *extra))
        assert r.exit_code == 2 and word in r.output and not os.path.exists(out), (extra, r.output)
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(cli, train_args(raw, labels, str(tmp_path / "afile")))
    assert r.exit_code == 2 and "not a directory" in r.output


def test_resume_refuses_a_different_configuration(blob_volume, tmp_path):
    raw, labels = blob_volume
    out = str(tmp_path / "run")
    assert run(train_args(raw, labels, out, "--iterations", "4", "--stop-after", "2")).exit_code == 0
    r = CliRunner().invoke(cli, train_args(raw, labels, out, "--iterations", "4", "--resume", "--batch-size", "3"))
    assert r.exit_code == 2 and "different configuration" in r.output
    r = CliRunner().invoke(cli, train_args(raw, labels, out, "--iterations", "4", "--resume", "--loss-margin", "2"))
    assert r.exit_code == 2 and "different configuration" in r.output
    r = CliRunner().invoke(cli, train_args(raw, labels, out, "--iterations", "4", "--resume", "--momentum-ramp"))
    assert r.exit_code == 2 and "different configuration" in r.output
    # a margin is recorded, so resuming without it is refused too
    out2 = str(tmp_path / "run_margin")
    margin_run = train_args(raw, labels, out2, "--iterations", "4", "--stop-after", "2", "--loss-margin", "2")
    assert run(margin_run).exit_code == 0
    assert load_checkpoint(os.path.join(out2, "latest.pt"))["training"]["loss_margin"] == [2, 2]
    r = CliRunner().invoke(cli, train_args(raw, labels, out2, "--iterations", "4", "--resume"))
    assert r.exit_code == 2 and "different configuration" in r.output
    out3 = str(tmp_path / "run_sparse")
    sparse_run = train_args(raw, labels, out3, "--iterations", "4", "--stop-after", "2", "--mode", "sparse")
    assert run(sparse_run).exit_code == 0
    r = CliRunner().invoke(cli, train_args(raw, labels, out3, "--iterations", "4", "--resume", "--mode", "sparse",
                                           "--no-background"))
    assert r.exit_code == 2 and "different configuration" in r.output


def test_object_fraction_keeps_seeded_subset(blob_volume, tmp_path):
    raw, labels = blob_volume
    out = str(tmp_path / "sparse")
    assert run(train_args(raw, labels, out, "--iterations", "2", "--object-fraction", "0.25")).exit_code == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    # sparse labels: a share (0.2) of the kept objects is held out for validation
    n = int(np.unique(io.open_volume(labels)[...]).size - 1)
    kept = round(0.25 * n)
    assert s["mode"] == "sparse" and s["objects_total"] == n and s["validation"] == "PQ of held-out objects"
    assert s["objects_held_out"] == round(0.2 * kept) and s["objects_used"] == kept - round(0.2 * kept)
    out = str(tmp_path / "sparse_sections")  # with --val-sections the last section is held out instead
    assert run(train_args(raw, labels, out, "--iterations", "2", "--object-fraction", "0.25",
                          "--val-sections", "1")).exit_code == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    n = int(np.unique(io.open_volume(labels)[:-1]).size - 1)
    assert s["objects_total"] == n and s["objects_used"] == round(0.25 * n) and s["objects_held_out"] == 0


def test_default_learning_rate_by_labels_and_init(blob_volume, tmp_path):
    """1e-3 from scratch with full labels, 2e-4 with sparse ones, 2e-5 fine-tuning (compared as
    ratios: the logged rate is the cosine schedule's after the first of two steps)."""
    raw, labels = blob_volume
    runs = {"full": [], "sparse": ["--object-fraction", "0.5"], "tuned": ["--init", str(tmp_path / "full/best.pt")]}
    first_lr = {}
    for name, extra in runs.items():
        out = str(tmp_path / name)
        assert run(train_args(raw, labels, out, "--iterations", "2", *extra)).exit_code == 0
        first_lr[name] = float(next(csv.DictReader(open(out + "/log.csv")))["lr"])
    assert first_lr["full"] / first_lr["sparse"] == pytest.approx(5, rel=0.01)
    assert first_lr["full"] / first_lr["tuned"] == pytest.approx(50, rel=0.01)
    # the values themselves, where the optimiser takes them from; --lr wins over every default
    def rate(**settings):
        return TrainConfig(raw=[raw], labels=[labels], out=str(tmp_path / "cfg"), **settings).learning_rate
    parent = str(tmp_path / "full/best.pt")
    assert (rate(), rate(object_fraction=0.5), rate(init=parent), rate(init=parent, lr=0.01)) == (1e-3, 2e-4, 2e-5, 0.01)


def test_init_keeps_the_models_offsets_unless_given(blob_volume, tmp_path):
    """A model trained from --init is segmented with its parent's offsets (and halo);
    --offset-distances still chooses others, and a parent without stored offsets gives the default."""
    raw, labels = blob_volume
    parent = str(tmp_path / "parent")
    assert run(train_args(raw, labels, parent, "--iterations", "1", "--offset-distances", "3")).exit_code == 0
    short = checkpoint.load(parent + "/best.pt").inference.offsets
    assert max(abs(v) for o in short for v in o) == 3
    runs = {"kept": [], "chosen": ["--offset-distances", "3,9"]}
    for name, extra in runs.items():
        r = run(train_args(raw, labels, str(tmp_path / name), "--iterations", "1", "--init", parent + "/best.pt", *extra))
        assert r.exit_code == 0, r.output
    assert checkpoint.load(str(tmp_path / "kept/best.pt")).inference.offsets == short
    chosen = checkpoint.load(str(tmp_path / "chosen/best.pt")).inference.offsets
    assert chosen != short and max(abs(v) for o in chosen for v in o) == 9
    default = str(tmp_path / "default")
    assert run(train_args(raw, labels, default, "--iterations", "1")).exit_code == 0
    assert run(train_args(raw, labels, str(tmp_path / "from_default"), "--iterations", "1",
                          "--init", default + "/best.pt")).exit_code == 0
    assert "offsets" not in checkpoint.load(str(tmp_path / "from_default/best.pt")).inference_record


def test_init_takes_the_models_dims_patch_and_margin_unless_given(blob_volume, tmp_path):
    """`train --init` of a 3D model needs neither --dims 3 nor --patch-shape: the start
    model's dimensionality, training patch and loss margin are the run's unless given."""
    raw, labels = blob_volume
    small = ["--batch-size", "1", "--features", "4,8", "--val-every", "1", "--iterations", "1", "--quiet", "--no-amp"]
    parent = str(tmp_path / "parent")
    r = run(["train", "--raw", raw, "--labels", labels, "--out", parent, "--dims", "3", "--patch-shape", "4,48,48",
             "--loss-margin", "0,8,8", "--val-sections", "0", *small])
    assert r.exit_code == 0, r.output
    child = str(tmp_path / "child")
    r = run(["train", "--raw", raw, "--labels", labels, "--out", child, "--init", parent + "/best.pt",
             "--val-sections", "0", *small])
    assert r.exit_code == 0, r.output
    trained = checkpoint.load(child + "/best.pt")
    assert trained.dims == 3 and trained.training["patch_shape"] == [4, 48, 48]
    assert trained.training["loss_margin"] == [0, 8, 8]
    given = TrainConfig(raw=[raw], labels=[labels], out="o", init=parent + "/best.pt", patch_shape=(4, 32, 32),
                        loss_margin=2)
    assert (given.dims, list(given.patch_shape), given.margins()) == (3, [4, 32, 32], [2, 2, 2])
    bundled_3d = TrainConfig(raw=[raw], labels=[labels], out="o", init="lm-nuclei-3d")
    assert (bundled_3d.dims, list(bundled_3d.patch_shape)) == (3, [32, 48, 48])
    scratch = TrainConfig(raw=[raw], labels=[labels], out="o")
    assert (scratch.dims, list(scratch.patch_shape), scratch.margins()) == (2, [256, 256], [0, 0])
    with pytest.raises(SpocoInputError, match="needs --patch-shape"):
        TrainConfig(raw=[raw], labels=[labels], out="o", dims=3).check()


def _bad(tmp_path, name, raw, labels, *extra):
    out = str(tmp_path / "out")
    r = CliRunner().invoke(cli, train_args(raw, labels, out, "--iterations", "2", *extra))
    assert r.exit_code == 2, r.output
    assert not os.path.exists(out), "nothing may be written on bad input"
    lines = [l for l in r.output.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.output
    return lines[0]


def test_bad_inputs_give_one_line_and_write_nothing(blob_volume, tmp_path):
    raw, labels = blob_volume
    root = os.path.dirname(raw)
    assert "not found" in _bad(tmp_path, "missing", root + "/nope", labels)
    io.create_array(root + "/short", np.zeros((2, 64, 64), np.uint16))
    assert "shape" in _bad(tmp_path, "mismatch", raw, root + "/short")
    io.create_array(root + "/flabels", np.zeros((4, 64, 64), np.float32))
    assert "integer" in _bad(tmp_path, "float labels", raw, root + "/flabels")
    io.create_array(root + "/empty_labels", np.zeros((4, 64, 64), np.uint16))
    assert "no annotated object" in _bad(tmp_path, "no objects", raw, root + "/empty_labels")
    nan = np.asarray(io.open_volume(raw)[...]).astype(np.float32)
    nan[1, 5, 5] = np.nan
    io.create_array(root + "/nanraw", nan)
    assert "NaN" in _bad(tmp_path, "nan", root + "/nanraw", labels)
    for option, value, says in (("--momentum", "1.5", "--momentum must be a finite number in [0, 1]"),
                                ("--lr", "-1e-3", "--lr must be a finite number above 0"),
                                ("--seed", "-1", "--seed must be a whole number >= 0"),
                                ("--delta-v", "nan", "--delta-v must be a finite number above 0"),
                                ("--instance-weight", "nan", "--instance-weight must be a finite number >= 0"),
                                ("--patch-shape", "0,32", "--patch-shape must be a whole number >= 1"),
                                ("--pool-factors", "0,2", "--pool-factors must be a whole number >= 1")):
        extra = ("--features", "4,8") if option == "--pool-factors" else ()
        assert says in _bad(tmp_path, option, raw, labels, option, value, *extra)


def test_recipe_values_that_skip_the_command_line_are_checked_too(tmp_path):
    """A workflow step's values come from YAML, not click: 1e3 is a string, 2.5 a float."""
    for field, value, says in (("iterations", "1e3", "--iterations must be a whole number >= 1, got '1e3'"),
                               ("iterations", 2.5, "--iterations must be a whole number >= 1, got 2.5"),
                               ("background_warmup", True, "--background-warmup must be a whole number"),
                               ("consistency_weight", "1", "--consistency-weight must be a finite number")):
        cfg = TrainConfig(raw=["r"], labels=["l"], out=str(tmp_path / "out"), **{field: value})
        with pytest.raises(SpocoInputError, match=re.escape(says)):
            cfg.check()


def test_patch_bigger_than_volume_and_foreign_init(blob_volume, tmp_path):
    raw, labels = blob_volume
    out = str(tmp_path / "out")
    r = CliRunner().invoke(cli, train_args(raw, labels, out, "--patch-shape", "128,128"))
    assert r.exit_code == 2 and "bigger than volume" in r.output and not os.path.exists(out)
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"weights": torch.zeros(3)}, foreign)
    r = CliRunner().invoke(cli, train_args(raw, labels, out, "--init", foreign))
    assert r.exit_code == 2 and "not a spoco-vol checkpoint" in r.output and not os.path.exists(out)


def test_non_empty_out_needs_overwrite(blob_volume, tmp_path):
    raw, labels = blob_volume
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = CliRunner().invoke(cli, train_args(raw, labels, str(out), "--iterations", "1"))
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (out / "keep.txt").read_text() == "mine"


def test_training_without_validation_data_still_checkpoints(tmp_path):
    """A single 2D image has no sections to hold out: best.pt is then the newest model."""
    from conftest import synthetic_blobs
    raw, labels = synthetic_blobs(shape=(1, 64, 64), n=8)
    path = str(tmp_path / "img.zarr")
    io.create_array(path + "/raw", raw[0])
    io.create_array(path + "/labels", labels[0])
    out = str(tmp_path / "run")
    r = run(train_args(path + "/raw", path + "/labels", out, "--iterations", "4"))
    assert r.exit_code == 0, r.output
    assert os.path.isfile(out + "/best.pt") and os.path.isfile(out + "/latest.pt")
    assert not any(row["val_loss"] for row in csv.DictReader(open(out + "/log.csv")))


def test_calibrate_command(blob_volume, tmp_path):
    raw, labels = blob_volume
    out = str(tmp_path / "run")
    assert run(train_args(raw, labels, out, "--iterations", "2")).exit_code == 0
    cal = str(tmp_path / "cal.pt")
    r = run(["calibrate", "--model", out + "/best.pt", "--raw", raw, "--labels", labels, "--z-range", "3,4",
             "--out", cal])
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(cal)
    assert 0.5 <= ck["inference"]["background_radius"] <= 4.5 and "training_state" not in ck
    assert ck["inference"]["tta"] is False  # as trained
    trained = load_checkpoint(out + "/best.pt")["inference"]
    assert ck["inference"]["min_size_base"] == trained["min_size_base"]
    assert ck["inference"]["min_size"] in [trained["min_size_base"] * m for m in FLOOR_MULTIPLES]
    r = run(["calibrate", "--model", out + "/best.pt", "--raw", raw, "--labels", labels, "--z-range", "3,4",
             "--out", cal, "--overwrite", "--tta"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(cal)["inference"]["tta"] is True
    bad = CliRunner().invoke(cli, ["calibrate", "--model", out + "/best.pt", "--raw", raw, "--labels", labels,
                                   "--z-range", "3", "--out", str(tmp_path / "c2.pt")])
    assert bad.exit_code == 2 and "--z-range" in bad.output


# ------------------------------------------------------------------ sparse annotations

def _sparse_volume(tmp_path, sections=(0, 1, 2), shape=(4, 64, 64), voxel_size=(50.0, 10.0, 10.0)):
    """The blobs with only the objects of ``sections`` annotated: a volume as a user
    brings it, sparse labels, 0 = unlabeled."""
    from conftest import synthetic_blobs
    raw, labels = synthetic_blobs(shape=shape, n=6)
    sparse = np.zeros_like(labels)
    for z in sections:
        ids = np.unique(labels[z][labels[z] > 0])[::2]
        sparse[z] = np.where(np.isin(labels[z], ids), labels[z], 0)
    path = str(tmp_path / "sparse.zarr")
    attrs = {"voxel_size": list(voxel_size)} if voxel_size else {}
    io.create_array(path + "/raw", raw, chunks=(1, 64, 64), attrs=attrs)
    io.create_array(path + "/labels", sparse, chunks=(1, 64, 64), attrs=attrs)
    return path + "/raw", path + "/labels", sparse


def test_sparse_labels_hold_out_objects_and_choose_by_them(tmp_path):
    """With sparse labels (--mode sparse) and no validation data, a seeded share of the
    annotated objects is held out: never in a training patch, and the score that
    chooses best.pt and calibrates the background is how well they are recovered."""
    from spoco_vol import data
    from spoco_vol.training_data import prepare_volumes
    raw, labels, sparse = _sparse_volume(tmp_path)
    n = int(np.unique(sparse).size - 1)
    cfg = TrainConfig(raw=[raw], labels=[labels], out=str(tmp_path / "x"), mode="sparse", patch_shape=(32, 32))
    vols, val_vols, held, _, info = prepare_volumes(cfg)
    assert not val_vols and info["objects_held_out"] == len(held) == round(0.2 * n) >= 1
    assert info["objects_used"] == n - len(held) and info["objects_annotated"] == n
    held_ids = {h.id for h in held}
    sampler = data.PatchSampler(vols, (32, 32), 2, rng=np.random.default_rng(0))
    seen = set()
    for _ in range(200):
        seen |= set(np.unique(sampler.sample()[1]).tolist())
    assert not seen & held_ids and seen - {0}  # training patches never show a held-out object
    for h in held:  # the anchor is a voxel of the object, inside its bounding box
        assert sparse[tuple(h.anchor)] == h.id
        assert np.all(h.bbox_lo <= h.anchor) and np.all(h.anchor < h.bbox_hi)
    out = str(tmp_path / "run")
    r = run(train_args(raw, labels, out, "--iterations", "6", "--mode", "sparse"))
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(out + "/best.pt")
    assert ck["training"]["selected_by"] == "PQ of held-out objects"
    assert ck["training"]["objects_held_out"] == len(held)
    scores = [float(r["val_score"]) for r in csv.DictReader(open(out + "/log.csv")) if r["val_score"]]
    assert len(scores) == 2 and ck["training"]["val_score"] == pytest.approx(max(scores), abs=1e-4)
    assert ck["inference"]["background_radius_val_score"] == pytest.approx(max(scores), abs=1e-4)
    # the held-out objects choose the size floor too, by their F1 (validation.choose_size_floor):
    # the same choice, recomputed on their windows, with the base floor as training had it
    from spoco_vol.calibration import calibrate_size_floor
    from spoco_vol.training_data import object_windows
    inf = ck["inference"]
    assert inf["min_size"] in [inf["min_size_base"] * m for m in FLOOR_MULTIPLES]
    assert json.load(open(out + "/summary.json"))["size_floor"]["min_size"] == inf["min_size"]
    model = checkpoint.load(out + "/best.pt")
    images, objects = object_windows(held, dataclasses.replace(cfg, downsample=[1, 1, 1]), model.normalization)
    again = calibrate_size_floor(model.with_inference(min_size=inf["min_size_base"]), images, torch.device("cpu"),
                                 amp=False, objects=objects).inference_record
    assert (again["min_size"], again["min_size_val_f1"]) == (inf["min_size"], inf["min_size_val_f1"])


def _dense_cells(tmp_path, keep=3):
    """Tissue where every pixel belongs to a cell (2D Voronoi cells with dark membranes,
    no label 0), of which every ``keep``-th cell per section is annotated."""
    from scipy.spatial import cKDTree
    rng = np.random.default_rng(0)
    shape = (4, 64, 64)
    labels = np.zeros(shape, np.uint16)
    raw = np.zeros(shape, np.float64)
    grid = np.indices(shape[1:]).reshape(2, -1).T
    for z in range(shape[0]):
        seeds = rng.uniform(0, 64, (12, 2))
        dist, idx = cKDTree(seeds).query(grid, k=2)
        labels[z] = (idx[:, 0] + 1 + 12 * z).reshape(shape[1:])
        raw[z] = np.where((dist[:, 1] - dist[:, 0] < 1.5).reshape(shape[1:]), 30, 170)
    raw = (raw + rng.normal(0, 10, shape)).clip(0, 255).astype(np.uint8)
    sparse = np.where(np.isin(labels, np.unique(labels)[::keep]), labels, 0).astype(np.uint16)
    path = str(tmp_path / "cells.zarr")
    io.create_array(path + "/raw", raw, chunks=(1, 64, 64), attrs={"voxel_size": [50.0, 10.0, 10.0]})
    io.create_array(path + "/labels", sparse, chunks=(1, 64, 64), attrs={"voxel_size": [50.0, 10.0, 10.0]})
    assert labels.min() > 0 and (sparse == 0).mean() > 0.5
    return path + "/raw", path + "/labels"


def test_no_background_trains_dense_tissue_without_a_background_rule(tmp_path):
    """--no-background (cells that fill the tissue, a few annotated): label 0 is
    unlabeled, the run is sparse without --mode, and the model is chosen by its held-out
    objects but gets no background rule; the same labels without the flag get one (the
    mode of the unlabeled pixels, here other cells)."""
    raw, labels = _dense_cells(tmp_path)
    out, usual = str(tmp_path / "dense"), str(tmp_path / "usual")
    assert run(train_args(raw, labels, out, "--iterations", "6", "--no-background")).exit_code == 0
    assert run(train_args(raw, labels, usual, "--iterations", "6", "--mode", "sparse")).exit_code == 0
    ck, ck_usual = load_checkpoint(out + "/best.pt"), load_checkpoint(usual + "/best.pt")
    assert ck["training"]["mode"] == "sparse" and ck["training"]["no_background"] is True
    assert ck["training"]["selected_by"] == "PQ of held-out objects"
    assert ck["inference"].get("background_embedding") is None and ck["inference"].get("background_radius") is None
    scores = [float(r["val_score"]) for r in csv.DictReader(open(out + "/log.csv")) if r["val_score"]]
    assert len(scores) == 2 and ck["inference"]["background_radius_val_score"] == pytest.approx(max(scores), abs=1e-4)
    assert ck_usual["inference"]["background_embedding"] is not None and "no_background" not in ck_usual["training"]
    assert checkpoint.load(out + "/best.pt").inference.background_rule()["background_embedding"] is None


def test_no_background_refuses_the_steps_that_model_a_background(tmp_path):
    from spoco_vol.config import fine_tune_config
    raw, labels = _dense_cells(tmp_path)
    for extra, word in ((["--mode", "full"], "--mode sparse"), (["--background-weight", "1"], "pseudo-background"),
                        (["--foreground-iterations", "5"], "foreground classifier")):
        assert word in _bad(tmp_path, "no background", raw, labels, "--no-background", *extra)
    base = str(tmp_path / "base")
    assert run(train_args(raw, labels, base, "--iterations", "1")).exit_code == 0
    cfg = fine_tune_config([raw], [labels], str(tmp_path / "ft"), base + "/best.pt", no_background=True).check()
    assert cfg.no_background and cfg.background_weight == 0 and cfg.foreground_iterations == 0
    assert cfg.training_mode == "sparse" and cfg.tta  # the rest of the recipe stays


def test_a_2d_models_size_floor_is_an_area(tmp_path):
    """A 2D model segments section by section, so its size floor (a quarter of the
    1st-percentile object) is measured in pixels of a section, whether an id spans
    sections (a 3D object) or recurs in images stacked as sections (per-image numbering)."""
    from spoco_vol.config import TrainConfig
    from spoco_vol.training_data import prepare_volumes
    labels = np.zeros((6, 64, 64), np.uint16)
    for z in range(6):  # ids 1-4: one 10 x 10 square per section, the same ids in every section
        for k in range(4):
            labels[z, 4 + 15 * k:14 + 15 * k, 10:20] = k + 1
    raw = np.where(labels > 0, 200, 20).astype(np.uint8)
    path = str(tmp_path / "stack.zarr")
    io.create_array(path + "/raw", raw, chunks=(1, 64, 64))
    io.create_array(path + "/labels", labels, chunks=(1, 64, 64))
    for dims, area in ((2, 100), (3, 600)):
        cfg = TrainConfig(raw=[path + "/raw"], labels=[path + "/labels"], out=str(tmp_path / "x"), dims=dims,
                          patch_shape=(32, 32) if dims == 2 else (4, 32, 32), val_sections=0)
        info = prepare_volumes(cfg)[4]
        assert info["object_size_p1"] == pytest.approx(area)


def test_a_validation_set_without_objects_is_one_error_naming_its_sections(tmp_path):
    raw, labels, _ = _sparse_volume(tmp_path, sections=(0, 1))
    line = _bad(tmp_path, "empty validation", raw, labels, "--mode", "sparse", "--val-sections", "1")
    assert "section 3" in line and "hold no annotated object" in line and "--val-objects" in line
    io.create_array(os.path.dirname(raw) + "/none", np.zeros((4, 64, 64), np.uint16))
    line = _bad(tmp_path, "empty validation volume", raw, labels, "--val-raw", raw,
                "--val-labels", os.path.dirname(raw) + "/none")
    assert "hold no annotated object" in line and "--val-raw/--val-labels" in line  # _bad: nothing written


def test_fine_tuning_resamples_to_the_models_voxel_size(tmp_path):
    """--init: the data (10 nm here) are resampled to the checkpoint's voxel size (20 nm):
    the model is trained at its own resolution without --downsample; sizes within 20%
    are taken as they are; a volume without voxel size trains as it is, with one warning
    (for a model without one: at that model's downsampling)."""
    from spoco_vol.errors import SpocoWarning
    from spoco_vol.config import TrainConfig
    from spoco_vol.training import train
    raw, labels, _ = _sparse_volume(tmp_path, sections=(0, 1, 2, 3))
    base = str(tmp_path / "base")
    assert run(train_args(raw, labels, base, "--iterations", "1", "--downsample", "1,2,2")).exit_code == 0
    assert load_checkpoint(base + "/best.pt")["voxel_size"] == [50.0, 20.0, 20.0]
    small = dict(dims=2, patch_shape=(16, 16), batch_size=2, iterations=1, val_every=1, progress=False, amp=False,
                 mode="sparse")
    tuned = train(TrainConfig(raw=[raw], labels=[labels], out=str(tmp_path / "t1"), init=base + "/best.pt", **small))
    assert tuned["downsample"] == [1, 2, 2]
    assert load_checkpoint(str(tmp_path / "t1/best.pt"))["voxel_size"] == [50.0, 20.0, 20.0]
    tuned = train(TrainConfig(raw=[raw], labels=[labels], out=str(tmp_path / "t2"), init=base + "/best.pt",
                              voxel_size=[50, 11, 11], **small))
    assert tuned["downsample"] == [1, pytest.approx(20 / 11), pytest.approx(20 / 11)]
    tuned = train(TrainConfig(raw=[raw], labels=[labels], out=str(tmp_path / "t3"), init=base + "/best.pt",
                              voxel_size=[50, 18, 18], **small))
    assert tuned["downsample"] == [1, 1, 1]  # within 20%: as it is
    raw2, labels2, _ = _sparse_volume(tmp_path / "novs", sections=(0, 1, 2, 3), voxel_size=None)
    with pytest.warns(SpocoWarning, match=r"voxel size of .* is unknown.*model's 50 x 20 x 20 nm.*--voxel-size"):
        tuned = train(TrainConfig(raw=[raw2], labels=[labels2], out=str(tmp_path / "t4"), init=base + "/best.pt",
                                  **small))
    assert tuned["downsample"] == [1, 1, 1]
    # a model trained with --downsample on data without a voxel size has none either: data
    # without one are fine-tuned at its downsampling, as segment reads them
    plain = str(tmp_path / "plain")
    assert run(train_args(raw2, labels2, plain, "--iterations", "1", "--downsample", "1,2,2")).exit_code == 0
    assert load_checkpoint(plain + "/best.pt")["voxel_size"] is None
    tuned = train(TrainConfig(raw=[raw2], labels=[labels2], out=str(tmp_path / "t5"), init=plain + "/best.pt", **small))
    assert tuned["downsample"] == [1, 2, 2]
    ck = load_checkpoint(str(tmp_path / "t1/best.pt"))
    assert ck["training"]["fine_tuned_from"]["model"] == base + "/best.pt"
    assert ck["training"]["fine_tuned_from"]["sha256"] == checkpoint.load(base + "/best.pt").sha256


def test_fine_tune_command_on_a_sparsely_annotated_real_volume(tmp_path, monkeypatch):
    """`spoco-vol fine-tune` with nothing but the data: the bundled VNC sample (real EM)
    declared as 5 nm data with every 5th object annotated. The data are resampled to
    the bundled model's 9.2 nm, the annotations trained as sparse, objects held out to
    choose and calibrate, TTA and the classifier attempted, and the checkpoint says what
    it was fine-tuned from and with which command."""
    from spoco_vol import config
    from spoco_vol.demo import write_sample
    monkeypatch.setitem(config.FINE_TUNE_RECIPE, "foreground_iterations", 2)  # the recipe's 600 take minutes
    raw, labels = write_sample(str(tmp_path / "vol.zarr"))
    lab = np.asarray(io.open_volume(labels)[...])
    sparse = np.where(np.isin(lab, np.unique(lab[lab > 0])[::5]), lab, 0)
    io.create_array(str(tmp_path / "vol.zarr" / "sparse"), sparse, chunks=(1, 512, 512))
    out = str(tmp_path / "run")
    r = run(["fine-tune", "--raw", raw, "--labels", str(tmp_path / "vol.zarr" / "sparse"), "--out", out,
             "--voxel-size", "50,5,5", "--iterations", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    s = json.load(open(out + "/summary.json"))
    assert s["mode"] == "sparse" and s["downsample"] == [1, 1.84, 1.84]
    assert s["validation"] == "PQ of held-out objects" and s["objects_held_out"] >= 1
    assert "foreground" in s
    ck = load_checkpoint(out + "/best.pt")
    assert ck["inference"]["tta"] is True and ck["voxel_size"] == [50.0, pytest.approx(9.2), pytest.approx(9.2)]
    assert ck["training"]["fine_tuned_from"]["model"] == "vnc-mito-2d"
    assert ck["training_command"].startswith("spoco-vol fine-tune --raw")
    assert ck["training"]["objects_annotated"] == int(np.unique(sparse).size - 1)
    # the start model is the first candidate: best.pt is it unless a check scores higher on the held-out objects
    checks = [float(row["val_score"]) for row in csv.DictReader(open(out + "/log.csv")) if row["val_score"]]
    assert checks and (s["best_iteration"] == 0) == (max(checks) <= s["start_model_val_score"])
    # a run that wrecks the embeddings (a learning rate 50000x the recipe's) hands the start model back
    from spoco_vol.config import fine_tune_config
    from spoco_vol.training import train
    wrecked = str(tmp_path / "wrecked")
    s = train(fine_tune_config([raw], [str(tmp_path / "vol.zarr" / "sparse")], wrecked, voxel_size=[50, 5, 5],
                               iterations=2, lr=1.0, foreground_iterations=0, progress=False))
    checks = [float(row["val_score"]) for row in csv.DictReader(open(wrecked + "/log.csv")) if row["val_score"]]
    assert s["best_iteration"] == 0 and max(checks) < s["start_model_val_score"] == s["best_val_score"]
    start, best = checkpoint.load(bundled.model_path("vnc-mito-2d")), checkpoint.load(wrecked + "/best.pt")
    assert best.training["iterations"] == 0
    assert all(torch.equal(a, b) for a, b in zip(start.network().state_dict().values(),
                                                 best.network().state_dict().values()))


def test_fine_tune_dense_trains_every_annotated_object_as_full_labels(tmp_path, monkeypatch):
    """`fine-tune --dense` (every object annotated, label 0 background) on the bundled VNC
    sample: full labels, the last section held out to choose and calibrate (no objects held
    out), the classifier trained supervised on the annotated background; --dense with
    --no-background is one error line and writes nothing."""
    from spoco_vol import config
    from spoco_vol.demo import write_sample
    monkeypatch.setitem(config.FINE_TUNE_DENSE_RECIPE, "foreground_iterations", 2)  # the recipe's 600 take minutes
    raw, labels = write_sample(str(tmp_path / "vol.zarr"))
    out = str(tmp_path / "run")
    args = ["fine-tune", "--dense", "--raw", raw, "--labels", labels, "--voxel-size", "50,5,5", "--iterations", "2",
            "--quiet"]
    r = run([*args, "--out", out])
    assert r.exit_code == 0, r.output
    s = json.load(open(out + "/summary.json"))
    assert s["mode"] == "full" and s["downsample"] == [1, 1.84, 1.84] and s["objects_held_out"] == 0
    assert s["validation"] == "AP@0.5 of held-out sections"
    assert s["foreground"]["prior_from"] == "full labels" and s["foreground"]["prior"] is None
    ck = load_checkpoint(out + "/best.pt")
    assert ck["training"]["mode"] == "full" and ck["training"]["fine_tuned_from"]["model"] == "vnc-mito-2d"
    assert ck["training_command"].startswith("spoco-vol fine-tune") and "--dense" in ck["training_command"]
    bad = str(tmp_path / "bad")
    r = CliRunner().invoke(cli, [*args, "--out", bad, "--no-background"])
    assert r.exit_code == 2 and "--dense" in r.output and "--no-background" in r.output and not os.path.exists(bad)


def test_the_discriminative_baseline_has_no_instance_term(blob_volume, tmp_path):
    """--loss discriminative: pull, push and the regulariser only, no momentum network."""
    raw, labels = blob_volume
    out = str(tmp_path / "dl")
    assert run(train_args(raw, labels, out, "--iterations", "2", "--loss", "discriminative")).exit_code == 0
    rows = list(csv.DictReader(open(os.path.join(out, "log.csv"))))
    assert all(r["pull"] and r["push"] and r["reg"] for r in rows)
    assert not any(r["instance"] or r["unlabeled"] or r["consistency"] or r["background"] for r in rows)
    ck = checkpoint.load(os.path.join(out, "best.pt"))
    assert ck.training["loss"] == "discriminative" and ck.momentum_state is None


@pytest.mark.parametrize("variant", ["momentum", "shared", "dropout", "separate"])
def test_consistency_network_variants(variant):
    """What makes each g what it is: the momentum g gets no gradient and follows f by
    EMA; shared g is f; the dropout g is f with other units dropped; the separate g is
    its own network, trained by its own optimizer and never by the moving average."""
    from spoco_vol import loop, losses
    from spoco_vol.model import UNet
    torch.manual_seed(0)
    f = UNet(dims=2, features=(4, 8), embedding_dim=4, dropout=0.5 if variant == "dropout" else 0.0).train()
    x = torch.randn(2, 1, 16, 16)
    y = torch.zeros(2, 16, 16, dtype=torch.long)
    y[:, 2:8, 2:8], y[:, 9:14, 9:14] = 1, 2
    loss = losses.SpocoLoss("full", consistency_weight=0)
    made = {}

    def optimizer(net):
        made["optim"] = loop.Optimization(net, lr=1e-2, weight_decay=0, schedule="cosine", iterations=10,
                                          device=torch.device("cpu"), amp=False)
        return made["optim"]
    teacher = losses.ConsistencyTeacher(variant, f, momentum=0.5, build=lambda: UNet(dims=2, features=(4, 8),
                                        embedding_dim=4), optimizer=optimizer, loss=loss)

    def forward(net, b):
        return net(b)
    g_before = {k: v.clone() for k, v in teacher.network().state_dict().items()}
    emb = teacher.embeddings(forward, x)
    assert not emb.requires_grad
    if variant == "shared":
        torch.manual_seed(1)
        assert torch.equal(emb, f(x).detach()) and teacher.network() is f and not teacher.keeps_a_network
    if variant == "dropout":
        assert not torch.equal(emb, teacher.embeddings(forward, x))  # other units dropped each time
    f_opt = torch.optim.SGD(f.parameters(), lr=0.1)
    total, _ = loss(f(x), y, generator=torch.Generator().manual_seed(0))
    f_opt.zero_grad()
    total.backward()
    f_opt.step()
    if variant == "momentum":
        assert all(p.grad is None for p in teacher.g.parameters())  # g is not trained by the loss
        teacher.after_step(forward, x, y)
        for k, v in teacher.g.state_dict().items():
            if v.is_floating_point() and "running" not in k:
                torch.testing.assert_close(v, 0.5 * g_before[k] + 0.5 * f.state_dict()[k])
    if variant == "separate":
        assert teacher.keeps_a_network and teacher.g is not f
        assert not torch.equal(teacher.g.final.weight, f.final.weight)  # its own initialisation
        assert teacher.after_step(forward, x, y, torch.Generator().manual_seed(0)) > 0
        changed = [k for k, v in teacher.g.state_dict().items() if not torch.equal(v, g_before[k])]
        assert "final.weight" in changed  # trained by its own optimizer
        moved = {k: v.clone() for k, v in teacher.g.state_dict().items()}
        teacher.after_step(forward, x, y, torch.Generator().manual_seed(0))
        assert not torch.equal(teacher.g.final.weight, moved["final.weight"])
        assert not torch.allclose(teacher.g.final.weight, 0.5 * moved["final.weight"] + 0.5 * f.final.weight)


@pytest.mark.parametrize("variant", ["shared", "separate"])
def test_training_with_another_consistency_network_resumes_exactly(blob_volume, tmp_path, variant):
    raw, labels = blob_volume
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    args = ("--iterations", "4", "--object-fraction", "0.5", "--consistency-network", variant)
    assert run(train_args(raw, labels, straight, *args)).exit_code == 0
    assert run(train_args(raw, labels, split, *args, "--stop-after", "2")).exit_code == 0
    assert run(train_args(raw, labels, split, *args, "--resume")).exit_code == 0
    a = checkpoint.load(os.path.join(straight, "latest.pt"))
    b = checkpoint.load(os.path.join(split, "latest.pt"))
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert (a.momentum_state is not None) == (variant == "separate")
    assert checkpoint.load(os.path.join(straight, "best.pt")).training["consistency_network"] == variant


def test_validation_takes_every_held_out_section_up_to_a_pixel_budget(tmp_path):
    """--val-sections 10 of small images: all 10 choose the checkpoint and calibrate the
    floor (a cap of 8 sections once dropped two of CVPPP's ten for nothing); large
    sections are cut to max_pixels each and taken until total_pixels."""
    from spoco_vol import data
    from spoco_vol.training_data import validation_images
    rng = np.random.default_rng(0)
    raw, labels = str(tmp_path / "raw.zarr"), str(tmp_path / "labels.zarr")
    io.create_array(raw, rng.integers(0, 255, (12, 40, 50), dtype=np.uint8))
    io.create_array(labels, np.arange(12 * 40 * 50, dtype=np.int64).reshape(12, 40, 50) % 7)
    vol = data.open_training_volume(raw, labels)
    vol.z_range = (2, 12)
    cfg = TrainConfig(raw=[raw], labels=[labels], out=str(tmp_path / "x"), dims=2, patch_shape=(32, 32),
                      downsample=[1, 1, 1])
    norm = {"mean": 100.0, "std": 50.0}
    images = validation_images([vol], cfg, norm)
    assert len(images) == 10 and all(lab.shape == (40, 50) for _, lab in images)
    assert np.array_equal(images[-1][1], np.asarray(io.open_volume(labels)[11]))
    # each section cut to 30 x 30 (900 pixels): 2700 pixels hold three of them
    reads = []
    read_raw = vol.read_raw
    vol.read_raw = lambda where: reads.append(where) or read_raw(where)
    cut = validation_images([vol], cfg, norm, max_pixels=900, total_pixels=2700)
    assert len(cut) == 3 and all(lab.shape == (30, 30) for _, lab in cut)
    assert reads == [2, 3, 4]  # no section is read past the budget
    vol.read_raw = read_raw
    assert len(validation_images([vol], cfg, norm, max_pixels=900, total_pixels=100)) == 1  # never none


def test_intensity_jitter_sets_the_contrast_and_brightness_range_of_the_patches(tmp_path):
    """--intensity-jitter J: each patch is a*x + b of its normalised self (then flipped or
    rotated), a in [1-J, 1+J], b in [-J, J]; J=0 leaves the intensities as they are."""
    from spoco_vol.training_data import augmented_batch
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (16, 16)).astype(np.float32)

    class OnePatch:
        def sample(self):
            return raw.copy(), np.ones((16, 16), np.int64)

    norm = {"mean": 100.0, "std": 50.0}
    x = np.sort((raw - 100.0) / 50.0, axis=None)
    found = []
    for jitter in (0.0, 0.5):
        cfg = TrainConfig(raw=["r"], labels=["l"], out=str(tmp_path), dims=2, patch_shape=(16, 16),
                          batch_size=8, intensity_jitter=jitter)
        batch, _, _ = augmented_batch(OnePatch(), cfg, norm, np.random.default_rng(1), with_g=False)
        for patch in batch:
            a, b = np.polyfit(x, np.sort(patch, axis=None), 1)  # geometry keeps the values, only moves them
            assert abs(a - 1) <= jitter + 1e-4 and abs(b) <= jitter + 1e-4
            found.append((a, b))
    assert max(abs(a - 1) for a, _ in found[8:]) > 0.2 and max(abs(b) for _, b in found[8:]) > 0.2
    from spoco_vol.errors import SpocoInputError
    with pytest.raises(SpocoInputError, match="intensity-jitter"):
        TrainConfig(raw=["r"], labels=["l"], out=str(tmp_path), dims=2, intensity_jitter=1.5).check()


def test_colour_jitter_gives_each_network_its_own_colours_on_the_same_geometry(tmp_path):
    """--colour-jitter S: f's and g's patches of an RGB image are flipped and rotated alike
    (the labels say where) but coloured apart; without it a patch keeps the image's own
    colours, normalised."""
    from spoco_vol.training_data import augmented_batch
    raw = np.empty((3, 16, 16), np.float32)
    raw[:] = np.array([90.0, 140.0, 60.0])[:, None, None]  # a leaf green everywhere ...
    raw[:, 1:5, 3:8] = 250.0                              # ... but a bright grey block, labeled 2
    lab = np.ones((16, 16), np.int64)
    lab[1:5, 3:8] = 2  # no flip or rotation of the patch leaves it where it was

    class OnePatch:
        def sample(self):
            return raw.copy(), lab.copy()

    norm = {"mean": [90.0, 140.0, 60.0], "std": [30.0, 30.0, 30.0]}
    cfg = TrainConfig(raw=["r"], labels=["l"], out=str(tmp_path), dims=2, patch_shape=(16, 16),
                      batch_size=16, colour_jitter=0.4, intensity_jitter=0.0)
    f, labs, g = augmented_batch(OnePatch(), cfg, norm, np.random.default_rng(1), with_g=True)
    assert f.shape == g.shape == (16, 3, 16, 16) and labs.shape == (16, 16, 16)
    assert len({p.tobytes() for p in labs}) > 2  # several flips and rotations
    for fp, gp, lp in zip(f, g, labs):
        for patch in (fp, gp):  # the bright block is where its label went, in both views (blurred, noisy)
            brightness = patch.sum(0)
            assert brightness[lp == 2].mean() > brightness[lp == 1].mean() + 1  # about 13, at least 2.7
    assert np.mean([np.abs(fp - gp).mean() for fp, gp in zip(f, g)]) > 0.1  # colours apart
    plain = TrainConfig(raw=["r"], labels=["l"], out=str(tmp_path), dims=2, patch_shape=(16, 16),
                        batch_size=16, intensity_jitter=0.0)
    f0, labs0, _ = augmented_batch(OnePatch(), plain, norm, np.random.default_rng(1), with_g=False)
    for fp, lp in zip(f0, labs0):  # without it the colours are the image's own, normalised
        np.testing.assert_allclose(fp[:, lp == 1], 0, atol=1e-6)
    from spoco_vol.errors import SpocoInputError
    with pytest.raises(SpocoInputError, match="colour-jitter"):
        TrainConfig(raw=["r"], labels=["l"], out=str(tmp_path), dims=2, colour_jitter=1.0).check()


def test_dense_labels_hold_out_one_section_or_a_slab_one_patch_deep():
    """What train and train-foreground hold out from dense labels without --val-sections:
    a 2D model's last section; a 3D model's last patch depth of input sections, at most a
    third of the volume's."""
    from spoco_vol.config import TrainConfig
    from spoco_vol.training_data import dense_validation_sections
    assert dense_validation_sections(TrainConfig(raw=["r"], labels=["l"], out="o", dims=2), 2) == 1
    cfg = TrainConfig(raw=["r"], labels=["l"], out="o", dims=3, patch_shape=(32, 48, 48), downsample=(1.5, 2, 2))
    assert dense_validation_sections(cfg) == dense_validation_sections(cfg, 200) == 48
    assert (dense_validation_sections(cfg, 60), dense_validation_sections(cfg, 2)) == (20, 1)
