"""Shared fixtures: small synthetic zarr volumes and a tiny training configuration."""
import os

import numpy as np
import pytest

from spoco_vol import io

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
VNC = os.path.join(SHARED_DATA, "vnc_mito", "stack1.npz")


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

