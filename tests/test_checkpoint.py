"""Tests for spoco_vol.checkpoint: self-describing checkpoints and their inference settings."""
import os

import pytest
import torch
from torch import nn

from spoco_vol.checkpoint import FORMAT, VERSION, Checkpoint, InferenceSettings, load, make_checkpoint, save
from spoco_vol.errors import SpocoInputError
from spoco_vol.model import UNet

NORMALIZATION = {"mean": 0.0, "std": 1.0, "kind": "zscore"}


def _ckpt(model, **kw):
    args = dict(delta_v=0.5, delta_d=2.0, normalization=NORMALIZATION, voxel_size=[40.0, 4.0, 4.0],
                training_data="train.zarr", training_command="spoco-vol train ...",
                inference={"strides": [2, 2]})
    args.update(kw)
    return make_checkpoint(model, **args)


def _variant(ckpt, **fields):
    return Checkpoint({**ckpt.data, **fields})


@pytest.mark.parametrize("dims, norm", [(2, "group"), (3, "batch")])
def test_checkpoint_round_trip(tmp_path, dims, norm):
    torch.manual_seed(1)
    pf = None if dims == 2 else [(1, 2, 2)]
    net = UNet(dims=dims, features=(4, 8), embedding_dim=3, norm=norm, pool_factors=pf)
    if norm == "batch":  # move the running statistics away from their defaults
        net.train()
        with torch.no_grad():
            net(torch.rand(2, 1, 2, 8, 8) * 3 + 1)
    net.eval()
    x = torch.rand(1, 1, *((16, 16) if dims == 2 else (3, 8, 8)))
    with torch.no_grad():
        ref = net(x)
    path = tmp_path / "model.pt"
    save(_ckpt(net), path)
    assert path.is_file() and not os.path.exists(str(path) + ".tmp")

    # plain data: loads with weights_only=True
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT and raw["format_version"] == VERSION

    ckpt = load(path)
    assert ckpt.architecture == net.config and ckpt.dims == dims
    assert ckpt.embedding_dim == 3
    assert ckpt.delta_v == 0.5 and ckpt.delta_d == 2.0
    assert ckpt.normalization == NORMALIZATION
    assert ckpt.voxel_size == [40.0, 4.0, 4.0]
    assert ckpt.inference_record == {"strides": [2, 2]}
    assert ckpt.training_data == "train.zarr"
    loaded = ckpt.network()
    assert not loaded.training
    assert loaded.config == net.config
    with torch.no_grad():
        out = loaded(x)
    assert torch.equal(out, ref)
    assert ckpt.sha256 == _ckpt(net).sha256


def test_make_checkpoint_is_a_copy():
    net = UNet(dims=2, features=(4, 8))
    ckpt = _ckpt(net, voxel_size=None, training={"iterations": 7})
    assert ckpt.voxel_size is None and ckpt.training == {"iterations": 7}
    with torch.no_grad():
        net.final.weight.add_(1.0)
    assert not torch.equal(ckpt.state_dict["final.weight"], net.final.weight)


def test_load_checkpoint_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(SpocoInputError, match="checkpoint not found") as e:
        load(path)
    assert str(path) in str(e.value)
    with pytest.raises(SpocoInputError, match="checkpoint not found"):
        load(tmp_path)  # a directory is not a checkpoint file


def test_load_checkpoint_random_bytes(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(SpocoInputError, match="cannot read checkpoint") as e:
        load(path)
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_load_checkpoint_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(SpocoInputError, match="cannot read checkpoint"):
        load(path)


def test_load_checkpoint_foreign_torch_file(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(SpocoInputError, match="not a spoco-vol checkpoint"):
        load(path)
    torch.save(torch.zeros(3), path)  # not even a dict
    with pytest.raises(SpocoInputError, match="not a spoco-vol checkpoint"):
        load(path)
    # a plain state dict (what torch users usually save)
    torch.save(UNet(dims=2, features=(4, 8)).state_dict(), path)
    with pytest.raises(SpocoInputError, match="not a spoco-vol checkpoint"):
        load(path)


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save(nn.Linear(2, 2), path)  # needs unpickling of a class: refused by weights_only
    with pytest.raises(SpocoInputError, match="cannot read checkpoint"):
        load(path)


def test_load_checkpoint_newer_format_and_missing_keys(tmp_path):
    net = UNet(dims=2, features=(4, 8))
    path = tmp_path / "new.pt"
    save(_variant(_ckpt(net), format_version=VERSION + 1), path)
    with pytest.raises(SpocoInputError, match="newer spoco-vol"):
        load(path)
    for key in ("architecture", "state_dict", "delta_v", "delta_d", "normalization"):
        data = dict(_ckpt(net).data)
        del data[key]
        save(Checkpoint(data), path)
        with pytest.raises(SpocoInputError, match=f"lacks '{key}'"):
            load(path)


def test_weights_do_not_fit_architecture(tmp_path):
    ckpt = _ckpt(UNet(dims=2, features=(4, 8)))
    ckpt = _variant(ckpt, architecture={**ckpt.architecture, "features": [4, 16]})  # shapes differ
    path = tmp_path / "m.pt"
    save(ckpt, path)
    with pytest.raises(SpocoInputError, match="do not fit its architecture"):
        load(path).network()

    ckpt = _ckpt(UNet(dims=2, features=(4, 8)))
    del ckpt.state_dict["final.weight"]  # missing key
    with pytest.raises(SpocoInputError, match="do not fit its architecture"):
        ckpt.network()

    ckpt = _ckpt(UNet(dims=2, features=(4, 8), embedding_dim=16))
    ckpt = _variant(ckpt, architecture={**ckpt.architecture, "embedding_dim": 8})  # final layer differs
    with pytest.raises(SpocoInputError, match="do not fit its architecture"):
        ckpt.network()


@pytest.mark.parametrize("change", [{"dims": 4}, {"dims": 3}, {"unknown_option": 1},
                                    {"norm": "layer"}])
def test_invalid_architecture_is_an_input_error(change):
    ckpt = _ckpt(UNet(dims=2, features=(4, 8)))
    with pytest.raises(SpocoInputError):
        _variant(ckpt, architecture={**ckpt.architecture, **change}).network()


def test_checkpoint_checksum():
    torch.manual_seed(0)
    net = UNet(dims=2, features=(4, 8), norm="batch")
    base = _ckpt(net).sha256
    assert len(base) == 64 and int(base, 16) >= 0
    # metadata does not enter the checksum; key order does not either
    other = _ckpt(net, delta_d=3.0, training_command="x")
    other = _variant(other, state_dict=dict(reversed(list(other.state_dict.items()))))
    assert other.sha256 == base
    # one weight changed by a tiny amount
    ckpt = _ckpt(net)
    ckpt.state_dict["encoders.0.0.weight"][0, 0, 0, 0] += 1e-3
    changed = ckpt.sha256
    assert changed != base
    # an integer buffer changes it too
    ckpt2 = _ckpt(net)
    ckpt2.state_dict["encoders.0.1.num_batches_tracked"] += 1
    assert ckpt2.sha256 not in (base, changed)


def test_inference_settings_are_read_once_with_their_defaults():
    """A checkpoint that names no offsets gets the default ones (affinities.default_offsets,
    the one place they are defined); stored strides, background rule and TTA are read;
    a foreground classifier's radius replaces the embeddings' own for segmentation."""
    from spoco_vol.affinities import default_offsets
    net = UNet(dims=2, features=(4, 8), embedding_dim=2)
    plain = _ckpt(net, inference={})
    inf = plain.inference
    assert [list(o) for o in inf.offsets] == default_offsets(2) and inf.strides == (2, 2)
    assert inf.background_embedding is None and inf.background_radius is None and inf.min_size == 0
    assert not inf.tta and inf.uses_tta(True) and not inf.uses_tta(None)
    stored = _ckpt(net, inference={"offsets": [[-1, 0], [0, -1], [0, -5]], "background_embedding": [1.0, 2.0],
                                   "background_radius": 1.5, "min_size": 9, "tta": True, "downsample": [1, 2, 2]})
    inf = stored.inference
    assert inf.offsets == ((-1, 0), (0, -1), (0, -5)) and inf.background_embedding == (1.0, 2.0)
    assert inf.background_radius == 1.5 and inf.min_size == 9 and inf.tta and inf.downsample == (1.0, 2.0, 2.0)
    assert inf.background_rule() == {"background_embedding": [1.0, 2.0], "background_radius": 1.5, "min_size": 9}
    fg = UNet(dims=2, features=(4, 8), embedding_dim=1)
    from spoco_vol.checkpoint import foreground_entry
    with_fg = stored.with_foreground(foreground_entry(fg, background_radius=0.25))
    assert with_fg.inference.background_radius == 0.25
    assert with_fg.settings(with_classifier=False).background_radius == 1.5
    assert with_fg.inference.foreground_threshold == 0.5 and with_fg.foreground_network() is not None
    assert not with_fg.with_foreground(None).has_foreground


def test_inference_settings_of_a_model_in_training():
    new = InferenceSettings.new(3, offsets=[[0, 0, -1]], min_size=4, tta=True, downsample=[1, 2, 2])
    assert new.offsets == ((0, 0, -1),) and new.strides == (2, 2, 2) and new.background_embedding is None
    calibrated = new.with_background([0.5] * 4, 2.25)
    assert calibrated.background_embedding == (0.5,) * 4 and calibrated.background_radius == 2.25
    assert new.background_radius is None  # frozen: a copy
    with pytest.raises(Exception):
        new.min_size = 3


def test_checkpoint_changes_make_copies():
    net = UNet(dims=2, features=(4, 8), embedding_dim=2)
    ckpt = _ckpt(net, inference={"min_size": 3}, training_state={"iteration": 5})
    calibrated = ckpt.with_inference(background_embedding=[0.0, 0.0], background_radius=1.0)
    assert ckpt.inference.background_radius is None and calibrated.inference.background_radius == 1.0
    assert calibrated.inference.min_size == 3
    assert ckpt.training_state == {"iteration": 5} and calibrated.for_inference().training_state is None
    assert "state_dict" not in ckpt.summary() and ckpt.summary()["sha256"] == ckpt.sha256


def test_segment_overrides_replace_the_floor_and_drop_the_background_rules():
    """`segment --min-size` replaces the size floor; `--mask-is-foreground` drops the
    classifier and the embeddings' background radius (the mask alone decides the
    background), `--no-foreground-classifier` the classifier only; a dict and its items
    (as a segment plan holds them) give the same checkpoint; an unknown key is refused;
    the original is left as it was."""
    from spoco_vol.checkpoint import foreground_entry
    net = UNet(dims=2, features=(4, 8), embedding_dim=2)
    ckpt = _ckpt(net, inference={"background_embedding": [1.0, 2.0], "background_radius": 1.5, "min_size": 9})
    ckpt = ckpt.with_foreground(foreground_entry(UNet(dims=2, features=(4, 8), embedding_dim=1),
                                                 background_radius=0.25))
    floor = ckpt.with_segment_overrides({"min_size": 40})
    assert floor.inference.min_size == 40 and floor.has_foreground and floor.inference.background_radius == 0.25
    only_mask = ckpt.with_segment_overrides((("mask_is_foreground", True),))
    assert not only_mask.has_foreground and only_mask.inference.min_size == 9
    assert only_mask.inference.background_embedding is None and only_mask.inference.background_radius is None
    both = ckpt.with_segment_overrides((("min_size", 0), ("mask_is_foreground", True)))
    assert both.inference.background_rule() == ckpt.with_segment_overrides(
        {"mask_is_foreground": True, "min_size": 0}).inference.background_rule()
    assert both.inference.min_size == 0 and not both.has_foreground
    assert ckpt.with_segment_overrides(()).inference.background_rule() == ckpt.inference.background_rule()
    # without the classifier: the embeddings' own rule, its radius calibrated without the classifier
    embeddings_only = ckpt.with_segment_overrides({"no_foreground_classifier": True})
    assert not embeddings_only.has_foreground and embeddings_only.inference.background_radius == 1.5
    assert list(embeddings_only.inference.background_embedding) == [1.0, 2.0]
    assert ckpt.has_foreground and ckpt.inference.min_size == 9 and ckpt.inference.background_radius == 0.25
    with pytest.raises(ValueError, match="unknown segmentation overrides"):
        ckpt.with_segment_overrides({"tta": True})
