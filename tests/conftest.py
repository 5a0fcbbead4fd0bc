"""Shared fixtures: small synthetic zarr volumes and a tiny training configuration."""
import numpy as np
import pytest
import torch

from spoco_vol import io
from spoco_vol import checkpoint
from spoco_vol.model import UNet


def synthetic_blobs(shape=(4, 64, 64), n=6, seed=0):
    """Bright discs (per-section objects) on a dark noisy background, with their labels."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    labels = np.zeros(shape, np.uint16)
    k = 0
    for zi in range(shape[0]):
        for _ in range(n):
            cy, cx = rng.integers(8, shape[1] - 8), rng.integers(8, shape[2] - 8)
            r = rng.integers(4, 8)
            m = (z == zi) & ((y - cy) ** 2 + (x - cx) ** 2 < r * r) & (labels == 0)
            if m.any():
                k += 1
                labels[m] = k
    raw = (40 + 150 * (labels > 0) + rng.normal(0, 10, shape)).clip(0, 255).astype(np.uint8)
    return raw, labels


@pytest.fixture
def blob_volume(tmp_path):
    raw, labels = synthetic_blobs()
    path = str(tmp_path / "vol.zarr")
    attrs = {"voxel_size": [50.0, 10.0, 10.0]}
    io.create_array(path + "/raw", raw, chunks=(1, 64, 64), attrs=attrs)
    io.create_array(path + "/labels", labels, chunks=(1, 64, 64), attrs=attrs)
    return path + "/raw", path + "/labels"



def tiny_checkpoint(tmp_path, voxel_size=None, inference=None):
    """An untrained 2D checkpoint saved as tmp_path/model.pt: (path, Checkpoint)."""
    torch.manual_seed(0)
    net = UNet(dims=2, features=(4, 8), embedding_dim=4)
    ckpt = checkpoint.make_checkpoint(net, delta_v=0.5, delta_d=2.0,
                                      normalization={"mean": 0.0, "std": 1.0, "kind": "zscore"},
                                      voxel_size=voxel_size, training_data="none", training_command="test",
                                      inference=inference or {})
    path = tmp_path / "model.pt"
    checkpoint.save(ckpt, path)
    return str(path), ckpt
