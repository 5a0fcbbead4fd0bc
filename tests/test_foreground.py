"""The foreground classifier: its prior, its training (positive-unlabeled), and the
background rule it adds at inference, whole-array and blockwise."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import synthetic_blobs, tiny_checkpoint
from spoco_vol import checkpoint, io, losses
from spoco_vol.checkpoint import Checkpoint, InferenceSettings
from spoco_vol.cli import cli
from spoco_vol.errors import SpocoInputError
from spoco_vol.foreground import unlabeled_object_share
from spoco_vol.model import UNet
from spoco_vol.pipeline import BUNDLED_MODEL, predict_array, segment_array


def with_classifier(ckpt: Checkpoint, bias: float | None = None, seed: int = 0) -> Checkpoint:
    """``ckpt`` plus a foreground U-Net of its architecture (random weights; with ``bias``
    its output is that constant logit)."""
    arch = ckpt.architecture
    torch.manual_seed(seed)
    net = UNet(dims=arch["dims"], embedding_dim=1, features=arch["features"], norm=arch["norm"],
               pool_factors=arch["pool_factors"])
    if bias is not None:
        with torch.no_grad():
            net.final.weight.zero_()
            net.final.bias.fill_(bias)
    return ckpt.with_foreground(checkpoint.foreground_entry(net, prior=0.05))


def variant(ckpt: Checkpoint, **fields) -> Checkpoint:
    """A checkpoint whose stored fields are replaced (files as other versions wrote them)."""
    return Checkpoint({**ckpt.data, **fields})


def test_object_share_of_the_unlabeled_pixels_follows_from_the_annotated_area():
    # 10 of 1000 voxels annotated, 10% of the objects: the objects cover ~100 voxels, so
    # 90 of the 990 unlabeled voxels are objects
    assert unlabeled_object_share(10, 1000, 0.1) == pytest.approx(90 / 990)
    assert unlabeled_object_share(10, 1000, 0.5) == pytest.approx(10 / 990)
    for bad in ((10, 1000, 1.0), (10, 1000, 0.0), (0, 1000, 0.1), (200, 1000, 0.1)):
        with pytest.raises(SpocoInputError):
            unlabeled_object_share(*bad)


def test_positive_unlabeled_training_finds_the_unannotated_objects():
    """The point of PU learning: trained with half of the objects annotated and the other
    half unlabeled (like the background), the classifier still calls the unannotated
    objects objects, because the prior says that share of the unlabeled pixels is."""
    raw, labels = synthetic_blobs(shape=(8, 64, 64), n=6, seed=3)
    ids = np.unique(labels[labels > 0])
    annotated = np.where(np.isin(labels, ids[::2]), labels, 0)
    unannotated = (labels > 0) & (annotated == 0)
    prior = unlabeled_object_share(int((annotated > 0).sum()), labels.size, 0.5)
    assert 0 < prior < 0.5
    x = torch.from_numpy(((raw - raw.mean()) / raw.std()).astype(np.float32))[:, None]
    y = torch.from_numpy(annotated.astype(np.int64))
    torch.manual_seed(0)
    net = UNet(dims=2, embedding_dim=1, features=(4, 8))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = losses.PositiveUnlabeledLoss(prior)
    for _ in range(60):
        loss = loss_fn(net(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        p = torch.sigmoid(net(x)[:, 0]).numpy()
    assert p[unannotated].mean() > 0.8
    assert p[labels == 0].mean() < 0.2


def test_pixels_the_classifier_calls_background_are_background(tmp_path):
    data = np.random.default_rng(2).integers(0, 256, (2, 60, 76)).astype(np.uint8)
    _, ckpt = tiny_checkpoint(tmp_path)
    plain = segment_array(data, ckpt, device="cpu")
    assert plain.any()
    assert predict_array(data, ckpt, device="cpu").foreground is None
    np.testing.assert_array_equal(segment_array(data, with_classifier(ckpt, 30.0), device="cpu"), plain)
    assert not segment_array(data, with_classifier(ckpt, -30.0), device="cpu").any()
    mixed = with_classifier(ckpt)
    prob = predict_array(data, mixed, device="cpu").foreground
    assert prob.shape == data.shape and 0.05 < (prob >= 0.5).mean() < 0.95
    labels = segment_array(data, mixed, device="cpu")
    assert labels.any() and not labels[prob < 0.5].any()
    # with test-time augmentation both networks average their 8 rotated/flipped predictions
    prob_tta = predict_array(data, mixed, device="cpu", tta=True).foreground
    assert not np.allclose(prob_tta, prob, atol=0.05)
    assert not segment_array(data, mixed, device="cpu", tta=True)[prob_tta < 0.5].any()


def test_classifier_that_does_not_fit_its_model_is_refused(tmp_path):
    _, ckpt = tiny_checkpoint(tmp_path)
    fg = with_classifier(ckpt).data["foreground"]
    bad = variant(ckpt, foreground={**fg, "architecture": {**fg["architecture"], "features": [4, 8, 16]}})
    with pytest.raises(SpocoInputError, match="foreground classifier is invalid"):
        bad.foreground_network()
    wide = with_classifier(variant(ckpt, architecture={**ckpt.architecture, "features": [8, 16]}))
    with pytest.raises(SpocoInputError, match="does not fit"):
        variant(wide, architecture=ckpt.architecture).foreground_network()


def test_blocks_with_a_classifier_agree_with_one_block(tmp_path):
    """The classifier's rule is per pixel: blocks (with the embedding model's halo, which
    covers the classifier of the same architecture) agree with one block."""
    from spoco_vol.blockwise import segment_blockwise
    from spoco_vol.evaluation import adapted_rand_error
    d = np.load(os.path.join(os.path.dirname(BUNDLED_MODEL), "vnc_sample.npz"))
    raw = str(tmp_path / "crop.zarr")  # two 384 x 384 sections of the bundled real EM sample
    io.create_array(raw, d["raw"][2:4, 64:448, 64:448], chunks=(1, 192, 192),
                    attrs={"voxel_size": [float(v) for v in d["voxel_size_nm"]]})
    ck = with_classifier(checkpoint.load(BUNDLED_MODEL), seed=1)
    # centre the random classifier's logits on this image, so that it calls about half
    # of the pixels background (the model grid is the input's, XY downsampled by 2)
    x = torch.from_numpy(d["raw"][2:4, 64:448:2, 64:448:2].astype(np.float32))[:, None]
    x = (x - ck.normalization["mean"]) / ck.normalization["std"]
    with torch.no_grad():
        ck.data["foreground"]["state_dict"]["final.bias"] -= ck.foreground_network()(x).median()
    model = str(tmp_path / "with_fg.pt")
    checkpoint.save(ck, model)
    runs = {}
    for name, path, bs in (("single", model, [2, 384, 384]), ("blocks", model, [2, 192, 384]),
                           ("plain", BUNDLED_MODEL, [2, 384, 384])):
        out = str(tmp_path / f"{name}.zarr")
        segment_blockwise(raw, out, path, block_shape=bs, workers=0, device="cpu")
        runs[name] = np.asarray(io.open_volume(out)[...])
    assert runs["single"].any() and (runs["single"] > 0).sum() < (runs["plain"] > 0).sum()
    assert adapted_rand_error(runs["blocks"], runs["single"])["arand"] <= 0.005


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


TINY = ["--dims", "2", "--patch-shape", "32,32", "--batch-size", "2", "--features", "4,8",
        "--val-every", "3", "--quiet", "--no-amp"]


def test_train_then_foreground_classifier(blob_volume, tmp_path):
    """train --foreground-iterations: the classifier is validated every iteration here
    (iterations // 6 = 1); a 3-iteration embedding model finds no object on the held-out
    section with or without it, so best.pt keeps none."""
    raw, labels = blob_volume
    out = str(tmp_path / "run")
    r = run(["train", "--raw", raw, "--labels", labels, "--out", out, *TINY, "--iterations", "3",
             "--object-fraction", "0.5", "--val-sections", "1", "--foreground-iterations", "6"])
    assert r.exit_code == 0, r.output
    fg = json.load(open(os.path.join(out, "summary.json")))["foreground"]
    assert [it for it, *_ in fg["val_score_history"]] == [1, 2, 3, 4, 5, 6]
    assert 0 < fg["prior"] < 1
    assert not fg["kept"] and max(a for _, a, _ in fg["val_score_history"]) <= fg["val_score_without"]
    assert not checkpoint.load(os.path.join(out, "best.pt")).has_foreground
    assert not checkpoint.load(os.path.join(out, "latest.pt")).has_foreground


def _constant_model(tmp_path, raw, mode):
    """An embedding model with constant output and no background rule: it makes the
    whole section one object (AP 0). Returns (path, checkpoint, the raw data)."""
    _, ckpt = tiny_checkpoint(tmp_path)
    for k in ("final.weight", "final.bias"):
        ckpt.state_dict[k].zero_()
    data = np.asarray(io.open_volume(raw)[...], np.float32)
    ckpt = variant(ckpt, training={"patch_shape": [32, 32], "batch_size": 2, "mode": mode},
                   normalization={"mean": float(data.mean()), "std": float(data.std()), "kind": "zscore"})
    model = str(tmp_path / f"constant_{mode}.pt")
    checkpoint.save(ckpt, model)
    return model, ckpt, data


def test_full_labels_train_a_supervised_classifier(blob_volume, tmp_path):
    """With full labels (the paper's "predicted foreground") the classifier learns the
    annotated background: trained supervised, it calls the held-out section's pixels
    right (discs vs background), masks the background, and objects appear (touching
    discs stay merged: the constant embeddings cannot part them). `segment
    --no-foreground-classifier` leaves it out again: the model's result without it."""
    from spoco_vol.pipeline import predict_array
    raw, labels = blob_volume
    model, _, data = _constant_model(tmp_path, raw, "full")
    added = str(tmp_path / "added.pt")
    r = run(["train-foreground", "--model", model, "--raw", raw, "--labels", labels, "--iterations", "60",
             "--quiet", "--out", added])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["foreground_kept"] and result["prior"] is None and result["val_score"] > result["val_score_without"]
    ck = checkpoint.load(added)
    assert ck.foreground_record["trained"] == "supervised" and ck.foreground_record["prior"] is None
    held_out = np.asarray(io.open_volume(labels)[3])
    probability = predict_array(data[3].astype(np.uint8), ck, device="cpu").foreground
    assert ((probability >= 0.5) == (held_out > 0)).mean() > 0.9

    def segment(name, model_path, *flags):
        out = str(tmp_path / f"{name}.zarr")
        r = CliRunner().invoke(cli, ["segment", "--input", raw, "--output", out, "--model", model_path,
                                     "--workers", "0", "--device", "cpu", "--quiet", *flags])
        return r, out
    labels_of = {}
    for name, model_path, flags in (("with", added, ()), ("left_out", added, ("--no-foreground-classifier",)),
                                    ("constant", model, ())):
        r, out = segment(name, model_path, *flags)
        assert r.exit_code == 0, r.output
        labels_of[name] = np.asarray(io.open_volume(out)[...])
    np.testing.assert_array_equal(labels_of["left_out"], labels_of["constant"])
    assert (labels_of["with"] > 0).sum() < (labels_of["constant"] > 0).sum()
    r, out = segment("refused", model, "--no-foreground-classifier")
    assert r.exit_code == 2 and "has no foreground classifier" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not os.path.exists(out)


def test_train_foreground_keeps_the_best_classifier_when_it_helps(blob_volume, tmp_path, monkeypatch):
    """The constant model again, with half of the bright discs annotated: the classifier,
    trained positive-unlabeled, masks the dark background, so objects appear: it is kept,
    at its best iteration, as the moving average of its weights that was judged there."""
    averages = {}
    update = losses.update_momentum_network

    def recording(f, g, m):
        update(f, g, m)
        averages[len(averages) + 1] = {k: v.detach().clone() for k, v in g.state_dict().items()}
    monkeypatch.setattr(losses, "update_momentum_network", recording)
    raw, labels = blob_volume
    model, ckpt, data = _constant_model(tmp_path, raw, "sparse")
    added = str(tmp_path / "added.pt")
    args = ["train-foreground", "--model", model, "--raw", raw, "--labels", labels, "--object-fraction", "0.5",
            "--iterations", "100", "--quiet", "--out", added]
    r = run(args)
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["foreground_kept"] and result["val_score_without"] == 0
    best_ap = max(a for _, a, _ in result["val_score_history"])
    assert result["val_score"] == best_ap > 0
    assert {it: a for it, a, _ in result["val_score_history"]}[result["iteration"]] == best_ap
    ck = checkpoint.load(added)
    assert ck.foreground_record["iterations"] == result["iteration"] and ck.foreground_record["threshold"] == 0.5
    assert ck.foreground_network() is not None
    kept, judged = ck.data["foreground"]["state_dict"], averages[result["iteration"]]
    assert len(averages) == 100 and all(torch.equal(kept[k].cpu(), judged[k].cpu()) for k in judged)
    assert not all(torch.equal(kept[k].cpu(), v.cpu()) for k, v in averages[100].items())
    section = data[3].astype(np.uint8)
    assert (segment_array(section, ck, device="cpu") > 0).sum() < \
        (segment_array(section, ckpt, device="cpu") > 0).sum()
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_foreground_options_are_checked_before_anything_is_written(blob_volume, tmp_path):
    raw, labels = blob_volume
    for extra, message in ((["--foreground-iterations", "5", "--foreground-prior", "0.1"], "is for sparse labels"),
                           (["--object-fraction", "0.5", "--foreground-iterations", "5", "--foreground-prior",
                             "1.5"], "must be in [0, 1)")):
        out = str(tmp_path / "run")
        r = CliRunner().invoke(cli, ["train", "--raw", raw, "--labels", labels, "--out", out, *TINY,
                                     "--iterations", "2", *extra])
        assert r.exit_code == 2 and message in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
        assert not os.path.exists(out)
    model, _, _ = _constant_model(tmp_path, raw, "full")  # full labels: supervised, no prior to give
    r = CliRunner().invoke(cli, ["train-foreground", "--model", model, "--raw", raw, "--labels", labels,
                                 "--foreground-prior", "0.1", "--out", str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and "is for sparse labels" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x.pt")


def test_train_foreground_judges_by_the_objects_training_held_out(blob_volume, tmp_path, monkeypatch):
    """A sparse run that held out annotated objects: train-foreground, given only the model
    and the data, trains on the same SPOCO@p subset and is judged on the same held-out
    objects (the seed and share the checkpoint records), never on objects the embeddings
    were trained on; with the seed lost (a checkpoint from before it was recorded) it asks
    for it rather than drawing other objects."""
    from spoco_vol import training_data
    drawn = []
    hold_out = training_data.hold_out_objects

    def recording(*args, **kwargs):
        drawn.append(hold_out(*args, **kwargs))
        return drawn[-1]
    monkeypatch.setattr(training_data, "hold_out_objects", recording)
    raw, labels = blob_volume
    out = str(tmp_path / "run")
    r = run(["train", "--raw", raw, "--labels", labels, "--out", out, *TINY, "--iterations", "2",
             "--object-fraction", "0.5", "--seed", "3", "--val-objects", "0.4"])
    assert r.exit_code == 0, r.output
    model = os.path.join(out, "best.pt")
    assert checkpoint.load(model).training["seed"] == 3
    added = str(tmp_path / "added.pt")
    r = run(["train-foreground", "--model", model, "--raw", raw, "--labels", labels, "--iterations", "2",
             "--quiet", "--out", added])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["validation"] == "PQ of held-out objects" and result["prior_from"] == "--object-fraction"
    assert len(drawn) == 2 and result["objects_held_out"] == len(drawn[0]) > 1
    assert [(o.id, tuple(o.anchor)) for o in drawn[1]] == [(o.id, tuple(o.anchor)) for o in drawn[0]]
    assert result["size_floor"] == checkpoint.load(added).inference_record["min_size"]
    # retraining a model that has a classifier (and the floor chosen with it) starts from
    # its embeddings' own rule at the base floor: the same as without them, down to the
    # prior the embeddings estimate (labels taken as they come: --object-fraction 1)
    first = checkpoint.load(model)
    other = with_classifier(first, -30.0).with_foreground_radius(0.0).with_inference(
        min_size=first.inference_record["min_size"] * 8 + 1)
    checkpoint.save(other, str(tmp_path / "other.pt"))
    results = []
    for name in (model, str(tmp_path / "other.pt")):
        r = run(["train-foreground", "--model", name, "--raw", raw, "--labels", labels, "--object-fraction", "1",
                 "--iterations", "2", "--quiet", "--overwrite", "--out", str(tmp_path / "again.pt")])
        assert r.exit_code == 0, r.output
        results.append(json.loads(r.output))
    assert results[0]["prior_from"] == "the embeddings"
    for key in ("prior", "val_score_without", "val_score_history", "size_floor", "objects_held_out"):
        assert results[1][key] == results[0][key], key
    ck = checkpoint.load(model)
    training = {k: v for k, v in ck.training.items() if k != "seed"}
    lost = str(tmp_path / "lost_seed.pt")
    checkpoint.save(variant(ck, training=training), lost)
    r = CliRunner().invoke(cli, ["train-foreground", "--model", lost, "--raw", raw, "--labels", labels,
                                 "--out", str(tmp_path / "y.pt")])
    assert r.exit_code == 2 and "--seed" in r.output and not os.path.exists(tmp_path / "y.pt")


def test_train_foreground_without_held_out_objects_holds_out_sections_as_dense_labels_would(tmp_path):
    """A 3D sparse model trained without held-out objects (--val-objects 0): its classifier
    is judged on the last sections, as many as dense labels would hold out of that volume:
    a slab one patch deep, at most a third of the volume (18 sections: 6, not the patch's 8)."""
    raw, labels = synthetic_blobs(shape=(18, 64, 64), n=3)
    path = str(tmp_path / "vol.zarr")
    io.create_array(path + "/raw", raw, chunks=(6, 64, 64))
    io.create_array(path + "/labels", labels, chunks=(6, 64, 64))
    torch.manual_seed(0)
    net = UNet(dims=3, features=(4, 8), embedding_dim=4)
    ckpt = checkpoint.make_checkpoint(
        net, delta_v=0.5, delta_d=2.0, normalization={"mean": float(raw.mean()), "std": float(raw.std()),
                                                      "kind": "zscore"},
        voxel_size=None, training_data="test", training_command="test", inference={})
    ckpt = variant(ckpt, training={"patch_shape": [8, 16, 16], "batch_size": 1, "mode": "sparse",
                                   "object_fraction": 0.5, "seed": 0, "objects_held_out": 0})
    model = str(tmp_path / "sparse3d.pt")
    checkpoint.save(ckpt, model)
    r = run(["train-foreground", "--model", model, "--raw", path + "/raw", "--labels", path + "/labels",
             "--iterations", "2", "--quiet", "--out", str(tmp_path / "with_fg.pt")])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["validation"] == "AP@0.5 of held-out sections"
    assert (result["objects_held_out"], result["sections_held_out"]) == (0, 6)
    r = run(["train-foreground", "--model", model, "--raw", path + "/raw", "--labels", path + "/labels",
             "--iterations", "2", "--quiet", "--val-sections", "8", "--out", str(tmp_path / "eight.pt")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["sections_held_out"] == 8


def test_info_shows_the_classifier_without_its_weights(tmp_path):
    _, ckpt = tiny_checkpoint(tmp_path)
    path = str(tmp_path / "with_fg.pt")
    checkpoint.save(with_classifier(ckpt), path)
    r = run(["info", path])
    assert r.exit_code == 0
    shown = json.loads(r.output)["foreground"]
    assert shown["prior"] == 0.05 and shown["threshold"] == 0.5 and "state_dict" not in shown


def test_a_classifier_changes_the_model_checksum_and_so_the_run_hash(tmp_path):
    """A partial blockwise run made without the classifier must not be resumed with it."""
    from spoco_vol.blockwise import segment_blockwise
    _, ckpt = tiny_checkpoint(tmp_path)
    assert with_classifier(ckpt, 1.0).sha256 != ckpt.sha256
    assert with_classifier(ckpt, 1.0).sha256 != with_classifier(ckpt, 2.0).sha256
    inp = str(tmp_path / "in.zarr")
    io.create_array(inp, np.zeros((2, 32, 32), np.uint8), chunks=(1, 32, 32))
    paths = [str(tmp_path / "plain.pt"), str(tmp_path / "fg.pt")]
    checkpoint.save(ckpt, paths[0])
    checkpoint.save(with_classifier(ckpt, 1.0), paths[1])
    # The background rule is part of a run too: `calibrate` changes it and not the weights,
    # and the classifier's training chooses its own radius.
    calibrated = ckpt.with_inference(background_embedding=[0.0] * 4, background_radius=2.0)
    classifier_radius = with_classifier(calibrated, 1.0).with_foreground_radius(0.5)
    paths += [str(tmp_path / "calibrated.pt"), str(tmp_path / "fg_radius.pt")]
    checkpoint.save(calibrated, paths[2])
    checkpoint.save(classifier_radius, paths[3])
    hashes = [segment_blockwise(inp, str(tmp_path / "o.zarr"), p, dry_run=True)["run_hash"] for p in paths]
    assert len(set(hashes)) == 4


def test_the_radius_chosen_with_the_classifier_replaces_the_embeddings_radius(tmp_path):
    """With a radius that calls every pixel background, nothing is segmented; the same
    model with a classifier that chose radius 0 (the classifier alone decides) and calls
    every pixel an object segments as if there were no background rule."""
    from spoco_vol.calibration import classifier_radii
    data = np.random.default_rng(2).integers(0, 256, (2, 60, 76)).astype(np.uint8)
    _, ckpt = tiny_checkpoint(tmp_path)
    no_rule = segment_array(data, ckpt, device="cpu")
    assert no_rule.any()
    everything = ckpt.with_inference(background_embedding=[0.0] * 4, background_radius=1e6)
    assert not segment_array(data, everything, device="cpu").any()
    fg = with_classifier(everything, 30.0)
    assert not segment_array(data, fg, device="cpu").any()  # without a radius of its own: the model's
    fg = fg.with_foreground_radius(0.0)
    assert fg.inference.background_radius == 0.0 and fg.settings(with_classifier=False).background_radius == 1e6
    assert everything.inference.background_radius == 1e6
    np.testing.assert_array_equal(segment_array(data, fg, device="cpu"), no_rule)
    # the candidates: 0 (the classifier alone) up to the embeddings' own radius
    plain = InferenceSettings.new(2)
    assert classifier_radii(plain.with_background([0.0], 1.0), 2.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert classifier_radii(plain.with_background([0.0], None), 0.5) == [0.0, 0.25, 0.5]
    assert classifier_radii(plain, 2.0) == [None]


def test_calibrate_chooses_the_classifiers_radius_again(blob_volume, tmp_path):
    """`calibrate` moves the background embedding, so a classifier's radius is chosen
    again. A classifier that calls every pixel an object changes no segmentation, so
    the best radius with it is the embeddings' own, newly calibrated one."""
    from spoco_vol.calibration import classifier_radii
    raw, labels = blob_volume
    out = str(tmp_path / "run")
    assert run(["train", "--raw", raw, "--labels", labels, "--out", out, *TINY, "--iterations", "2",
                "--object-fraction", "0.5"]).exit_code == 0
    ck = with_classifier(checkpoint.load(out + "/best.pt"), 30.0).with_foreground_radius(0.0)
    model = str(tmp_path / "fg.pt")
    checkpoint.save(ck, model)
    cal = str(tmp_path / "cal.pt")
    r = run(["calibrate", "--model", model, "--raw", raw, "--labels", labels, "--z-range", "3,4", "--out", cal])
    assert r.exit_code == 0, r.output
    ck = checkpoint.load(cal)
    own = ck.settings(with_classifier=False)
    assert ck.foreground_record["background_radius"] == own.background_radius
    assert ck.foreground_record["background_radius"] in classifier_radii(own, ck.delta_d)
    assert "foreground_val_score" in r.output


def test_best_radius_keeps_the_objects_the_embeddings_radius_deletes():
    """An object whose embeddings lie 1.0 from the background embedding is deleted by
    the embeddings' radius 1.5 (AP 0). With a classifier that marks it, every radius up
    to 1.0 keeps it (AP 1); the largest of those, the nearest to the embeddings' own,
    is chosen."""
    from spoco_vol.calibration import best_radius, held_out_score
    yy, xx = np.mgrid[:48, :48]
    disc = (yy - 24) ** 2 + (xx - 24) ** 2 < 100
    labels = disc.astype(np.uint32)
    embeddings = np.zeros((2, 48, 48), np.float32)
    embeddings[0][disc] = 1.0
    inference = InferenceSettings.new(2).with_background([0.0, 0.0], 1.5)
    assert held_out_score([embeddings], [labels], 2.0, inference) == 0.0
    probabilities = [disc.astype(np.float32)]
    assert best_radius([embeddings], [labels], 2.0, inference, probabilities) == (1.0, 1.0)


def test_the_classifier_is_judged_as_a_moving_average_that_spans_a_tenth_of_its_iterations():
    """average_decay: after step t the average weighs the last ~t/10 iterates (not the
    random initialisation early on), at most 1 / (1 - AVERAGE_DECAY) of them."""
    from spoco_vol.foreground import AVERAGE_DECAY, average_decay
    assert average_decay(1) == pytest.approx(2 / 11)
    assert average_decay(100) == pytest.approx(101 / 110)
    assert average_decay(10_000) == AVERAGE_DECAY
    decays = [average_decay(t) for t in range(1, 2000)]
    assert all(a <= b for a, b in zip(decays, decays[1:]))
    # the initial weights' share of the average after t updates: the product of the decays
    share = np.cumprod(decays)
    assert share[9] < 1e-3 and share[99] < 1e-9


def test_a_classifier_not_kept_leaves_the_model_as_it_was(blob_volume, tmp_path):
    """train-foreground whose classifier does not help (the constant model, whose one
    segment no classifier can split into objects) writes the model unchanged: its size
    floor is not chosen again when its segmentation rule did not change."""
    raw, labels = blob_volume
    model, ckpt, _ = _constant_model(tmp_path, raw, "full")
    floored = variant(ckpt, inference={**ckpt.inference_record, "min_size": 7})
    checkpoint.save(floored, model)
    out = str(tmp_path / "same.pt")
    r = run(["train-foreground", "--model", model, "--raw", raw, "--labels", labels, "--iterations", "2",
             "--quiet", "--out", out])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert not result["foreground_kept"] and result["size_floor"] == 7
    assert checkpoint.load(out).inference_record == floored.inference_record


def test_held_out_objects_that_no_check_recovers_keep_no_classifier():
    """Which check of the classifier replaces the best so far. Dense sections: a higher
    AP only. Held-out objects: not below the best (the embeddings' score less the
    tolerance; ties go to the later check), and only where the check recovers one of them:
    a score of 0 cannot tell a classifier that keeps objects from one that deletes them."""
    from spoco_vol.foreground import check_replaces_best
    from spoco_vol.validation import RADIUS_TOLERANCE
    assert check_replaces_best(0.5, 0.4, False, False) and not check_replaces_best(0.4, 0.4, True, False)
    assert check_replaces_best(0.39, 0.4 - RADIUS_TOLERANCE, False, True)  # within the tolerance of the embeddings'
    assert check_replaces_best(0.4, 0.4, True, True) and not check_replaces_best(0.39, 0.4, True, True)
    assert not check_replaces_best(0.0, 0.0 - RADIUS_TOLERANCE, False, True)  # the embeddings' 0, the check's 0
    assert not check_replaces_best(0.0, 0.0, True, True)
