import numpy as np
import torch

from spoco_vol import loop
from spoco_vol.model import UNet, receptive_halo


def test_interior_crops_embeddings_and_labels_alike():
    emb = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).reshape(2, 3, 6, 8)
    lab = torch.arange(2 * 6 * 8).reshape(2, 6, 8)
    assert loop.interior(emb, [1, 2]).shape == (2, 3, 4, 4)
    assert torch.equal(loop.interior(lab, [1, 2]), lab[:, 1:5, 2:6])
    assert torch.equal(loop.interior(emb, [1, 2])[:, :, 0, 0], emb[:, :, 1, 2])
    assert loop.interior(lab, [0, 0]) is lab


def test_a_margin_of_the_field_of_view_leaves_embeddings_that_inference_also_gives():
    """What the loss sees inside the margin is what a voxel gets with real context around
    it (as in blockwise inference); inside a thinner margin, the zero padding at the
    patch border still reaches it."""
    torch.manual_seed(0)
    net = UNet(dims=3, features=(4, 8)).eval()
    halo = receptive_halo(net)
    volume = torch.randn(1, 1, 64, 64, 64)
    start, side = 8, 24 + 2 * halo[0] - (2 * halo[0]) % 2  # a patch on the pooling grid, inside the volume
    patch = volume[..., start:start + side, start:start + side, start:start + side]
    with torch.no_grad():
        whole, own = net(volume), net(patch)
    def same_voxels(margin):
        ref = whole[..., start + margin:start + side - margin, start + margin:start + side - margin,
                    start + margin:start + side - margin]
        return float((loop.interior(own, [margin] * 3) - ref).abs().max())
    assert same_voxels(halo[0]) < 1e-5
    assert same_voxels(2) > 1e-3
