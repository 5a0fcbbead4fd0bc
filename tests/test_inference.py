"""Tiled embedding prediction equals untiled prediction (the U-Net is local and aligned)."""
import numpy as np
import torch

from spoco_vol.inference import predict_embeddings, resolve_device
from spoco_vol.model import UNet


def test_tiles_agree_exactly_with_one_tile():
    torch.manual_seed(0)
    net = UNet(dims=2, features=(4, 8, 16), norm="batch").eval()
    img = np.random.default_rng(0).normal(size=(100, 90)).astype(np.float32)
    cpu = torch.device("cpu")
    whole = predict_embeddings(net, img, device=cpu, amp=False, tile_shape=[104, 96])
    tiled = predict_embeddings(net, img, device=cpu, amp=False, tile_shape=[24, 32])
    # equal up to float rounding: oneDNN picks its convolution blocking per tile shape
    np.testing.assert_allclose(whole, tiled, rtol=0, atol=1e-5)
    assert whole.shape == (16, 100, 90)


def test_group_norm_is_not_local():
    """Why BatchNorm is the default: GroupNorm statistics depend on the tile."""
    torch.manual_seed(0)
    net = UNet(dims=2, features=(4, 8, 16), norm="group").eval()
    img = np.random.default_rng(0).normal(size=(96, 96)).astype(np.float32)
    cpu = torch.device("cpu")
    whole = predict_embeddings(net, img, device=cpu, amp=False, tile_shape=[96, 96])
    tiled = predict_embeddings(net, img, device=cpu, amp=False, tile_shape=[32, 32])
    assert np.abs(whole - tiled).max() > 1e-3


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
