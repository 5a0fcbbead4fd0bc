"""Multi-channel input end to end (an RGB model): training, blockwise segmentation and
evaluation on real CVPPP leaf images (channels first: (3, N, Y, X), labels (N, Y, X))."""
import json
import os

import numpy as np
import pytest

from spoco_vol import checkpoint, io
from spoco_vol.errors import SpocoInputError

CVPPP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cvppp_a1", "a1.npz")


@pytest.fixture(scope="module")
def leaves(tmp_path_factory):
    """Three CVPPP A1 images at half resolution, RGB channels first, with their leaves."""
    d = np.load(CVPPP)
    raw = d["raw"][:3, :, ::2, ::2]                      # (3 images, 3 channels, 265, 250)
    labels = d["labels"][:3, ::2, ::2].astype(np.uint16)
    path = str(tmp_path_factory.mktemp("cvppp") / "leaves.zarr")
    io.create_array(path + "/raw", np.ascontiguousarray(raw.transpose(1, 0, 2, 3)), chunks=(1, 1, 265, 250))
    io.create_array(path + "/labels", labels, chunks=(1, 265, 250))
    return path + "/raw", path + "/labels", raw, labels


@pytest.fixture(scope="module")
def rgb_model(leaves, tmp_path_factory):
    from spoco_vol.config import TrainConfig
    from spoco_vol.training import train
    raw, labels, _, _ = leaves
    out = str(tmp_path_factory.mktemp("rgb") / "run")
    train(TrainConfig(raw=[raw], labels=[labels], out=out, dims=2, patch_shape=(64, 64), batch_size=2,
                      iterations=4, features=(4, 8), val_every=2, amp=False, progress=False,
                      foreground_iterations=2, colour_jitter=0.4))  # each network its own colours
    return out + "/best.pt"


def test_an_rgb_model_is_trained_on_channels_first_data(rgb_model, leaves):
    _, _, raw, _ = leaves
    ck = checkpoint.load(rgb_model)
    assert ck.in_channels == 3 and ck.network().in_channels == 3
    mean = ck.normalization["mean"]
    assert len(mean) == 3  # one mean per colour, measured on the training images (the last validates)
    np.testing.assert_allclose(mean, raw[:2].transpose(1, 0, 2, 3).reshape(3, -1).mean(1), rtol=1e-4)
    summary = json.load(open(os.path.join(os.path.dirname(rgb_model), "summary.json")))
    assert summary["mode"] == "full" and "foreground" in summary  # the classifier trained on RGB embeddings
    assert ck.has_foreground == summary["foreground"]["kept"]  # and is in best.pt where it helped


def test_blockwise_rgb_segmentation_equals_the_whole_image_and_is_evaluated(rgb_model, leaves, tmp_path):
    from spoco_vol.blockwise import segment_blockwise
    from spoco_vol.evaluation import adapted_rand_error, evaluate_segmentation
    from spoco_vol.evaluation_blockwise import evaluate_zarr
    from spoco_vol.pipeline import segment_array
    raw_path, labels_path, raw, labels = leaves
    # an untrained RGB network's varied embeddings break the images into many segments,
    # and blocks must agree on all of them
    import torch
    from spoco_vol.model import UNet
    torch.manual_seed(0)
    net = UNet(dims=2, in_channels=3, features=(4, 8), embedding_dim=4)
    with torch.no_grad():
        net.final.weight.mul_(100.0)  # spread the embeddings beyond the margins
    every_pixel = str(tmp_path / "untrained.pt")
    checkpoint.save(checkpoint.make_checkpoint(
        net, delta_v=0.5, delta_d=2.0,
        normalization={"mean": [100.0] * 3, "std": [50.0] * 3}, voxel_size=None, training_data="",
        training_command=""), every_pixel)
    out = str(tmp_path / "seg.zarr")
    report = segment_blockwise(raw_path, out, every_pixel, block_shape=[1, 265, 128], workers=0, device="cpu")
    assert report["shape"] == [3, 265, 250] and report["blocks"] == 6
    blockwise = np.asarray(io.open_volume(out)[...])
    whole = segment_array(raw.transpose(1, 0, 2, 3), checkpoint.load(every_pixel), device="cpu")
    assert blockwise.shape == labels.shape and whole.max() > 10
    assert adapted_rand_error(blockwise, whole)["arand"] == 0.0
    metrics = evaluate_zarr(out, labels_path, per_section=True)  # block by block, from the zarr stores
    assert metrics["n_gt"] == sum(len(np.unique(image)) - 1 for image in labels)
    in_memory = evaluate_segmentation(whole, labels, per_section=True)
    for key in ("sbd", "abs_dic", "ap@0.5", "n_pred"):
        assert metrics[key] == pytest.approx(in_memory[key]), key


def test_inputs_whose_channels_do_not_fit_are_refused(rgb_model, leaves, tmp_path):
    from spoco_vol.blockwise import segment_blockwise
    _, _, raw, _ = leaves
    gray = str(tmp_path / "gray.zarr")
    io.create_array(gray, raw[:2, 1])  # two one-channel images
    with pytest.raises(SpocoInputError, match="expects 3 channels"):
        segment_blockwise(gray, str(tmp_path / "x.zarr"), rgb_model, workers=0)
    assert not os.path.exists(tmp_path / "x.zarr")
