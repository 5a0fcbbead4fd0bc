"""Tests for spoco_vol.model: the U-Net (its checkpoints: test_checkpoint.py)."""
import pytest
import torch
from torch import nn

from spoco_vol.model import UNet, build_model, receptive_halo


def _norms(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


# ------------------------------------------------------------------------ architecture

@pytest.mark.parametrize("emb", [3, 16])
def test_unet_2d_output_shape(emb):
    torch.manual_seed(0)
    net = UNet(dims=2, embedding_dim=emb, features=(4, 8, 16)).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, 24, 32))
    assert out.shape == (2, emb, 24, 32)
    assert out.dtype == torch.float32
    assert net.embedding_dim == emb


def test_unet_3d_anisotropic_pooling():
    torch.manual_seed(0)
    net = UNet(dims=3, embedding_dim=5, features=(4, 8, 16),
               pool_factors=[(1, 2, 2), (1, 2, 2)]).eval()
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool3d)]
    assert [tuple(p.kernel_size) for p in pools] == [(1, 2, 2), (1, 2, 2)]
    assert net.shape_multiple == [1, 4, 4]
    # z = 3 is fine: no pooling along z.
    with torch.no_grad():
        out = net(torch.rand(1, 1, 3, 16, 12))
    assert out.shape == (1, 5, 3, 16, 12)


def test_unet_3d_isotropic_default():
    net = UNet(dims=3, embedding_dim=4, features=(4, 8)).eval()
    assert net.pool_factors == [[2, 2, 2]]
    with torch.no_grad():
        assert net(torch.rand(1, 1, 4, 8, 6)).shape == (1, 4, 4, 8, 6)


def test_unet_in_channels():
    net = UNet(dims=2, in_channels=3, embedding_dim=2, features=(4, 8)).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 8, 8)).shape == (1, 2, 8, 8)


@pytest.mark.parametrize("dims, features, pool_factors, expected", [
    (2, (16, 32, 64, 128), None, [8, 8]),
    (2, (4,), None, [1, 1]),
    (3, (4, 8, 16), None, [4, 4, 4]),
    (3, (4, 8, 16, 32), [(1, 2, 2), (1, 2, 2), (2, 2, 2)], [2, 8, 8]),
    (2, (4, 8), [(3, 2)], [3, 2]),
])
def test_shape_multiple(dims, features, pool_factors, expected):
    assert UNet(dims=dims, features=features, pool_factors=pool_factors).shape_multiple == expected


def test_bad_arguments():
    with pytest.raises(ValueError, match="dims"):
        UNet(dims=4)
    with pytest.raises(ValueError, match="pool factors"):
        UNet(dims=3, features=(4, 8, 16), pool_factors=[(1, 2, 2)])
    with pytest.raises(ValueError, match="pool factors"):
        UNet(dims=3, features=(4, 8), pool_factors=[(2, 2)])
    with pytest.raises(ValueError, match="unknown norm"):
        UNet(dims=2, features=(4, 8), norm="layer")


def test_group_norm_group_count():
    # 6 channels with 4 groups requested -> falls back to 3; 12 channels -> 4 groups.
    net = UNet(dims=2, features=(6, 12), num_groups=4, embedding_dim=2, norm="group")
    gns = _norms(net, nn.GroupNorm)
    assert gns and not _norms(net, nn.BatchNorm2d)
    groups = {(g.num_channels, g.num_groups) for g in gns}
    assert groups == {(6, 3), (12, 4)}
    # fewer channels than groups -> one group per channel
    net = UNet(dims=2, features=(2, 4), num_groups=8, norm="group")
    assert {(g.num_channels, g.num_groups) for g in _norms(net, nn.GroupNorm)} == {(2, 2), (4, 4)}


@pytest.mark.parametrize("dims, cls", [(2, nn.BatchNorm2d), (3, nn.BatchNorm3d)])
def test_batch_norm(dims, cls):
    net = UNet(dims=dims, features=(4, 8), norm="batch", embedding_dim=3)
    assert len(_norms(net, cls)) == 6  # 2 per DoubleConv: 2 encoders + 1 decoder
    assert not _norms(net, nn.GroupNorm)
    net.train()
    shape = (2, 1, 8, 8) if dims == 2 else (2, 1, 4, 8, 8)
    out = net(torch.rand(shape))
    assert out.shape == (2, 3, *shape[2:])
    out.sum().backward()  # trains: gradients reach the first conv
    assert net.encoders[0][0].weight.grad is not None


# ------------------------------------------------------------------------ receptive halo

def test_receptive_halo_values_and_growth():
    h1 = receptive_halo(UNet(dims=2, features=(4,)))
    h2 = receptive_halo(UNet(dims=2, features=(4, 8)))
    h3 = receptive_halo(UNet(dims=2, features=(4, 8, 16)))
    h4 = receptive_halo(UNet(dims=2, features=(4, 8, 16, 32)))
    for h in (h1, h2, h3, h4):
        assert len(h) == 2 and all(v > 0 for v in h)
    assert h1[0] < h2[0] < h3[0] < h4[0]
    assert h1 == [2, 2]  # one level: two 3x3 convs


def test_receptive_halo_anisotropic():
    h = receptive_halo(UNet(dims=3, features=(4, 8, 16), pool_factors=[(1, 2, 2), (1, 2, 2)]))
    assert len(h) == 3 and h[0] > 0
    assert h[1] == h[2] and h[0] < h[1]  # no pooling along z: less context there


def _measured_extent(net, n=56):
    """Largest one-sided distance from which an input pixel influences an output pixel."""
    centres = list(range(24, 32))  # all alignments with respect to the pooling grid (up to 8)
    x = torch.rand(len(centres), 1, n, n, requires_grad=True)
    out = net(x)  # BatchNorm in eval mode: the batch items do not interact
    sum(out[b, :, c, c].sum() for b, c in enumerate(centres)).backward()
    worst = 0
    for b, c in enumerate(centres):
        nz = torch.nonzero(x.grad[b, 0].abs() > 0)
        worst = max(worst, c - int(nz[:, 0].min()), int(nz[:, 0].max()) - c,
                    c - int(nz[:, 1].min()), int(nz[:, 1].max()) - c)
    return worst


@pytest.mark.parametrize("features", [(4, 8), (4, 8, 16)])
def test_receptive_halo_covers_field_of_view(features):
    torch.manual_seed(0)
    # BatchNorm in eval mode keeps the net local (GroupNorm would be global); positive
    # weights and inputs keep every ReLU open so the gradient shows the whole field.
    net = UNet(dims=2, features=features, norm="batch", embedding_dim=2).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    extent = _measured_extent(net)
    assert extent <= receptive_halo(net)[0]


def test_build_model_from_config():
    net = UNet(dims=3, features=(4, 8), pool_factors=[(1, 2, 2)], embedding_dim=6, norm="batch")
    again = build_model(net.config)
    assert again.config == net.config
    assert again.state_dict().keys() == net.state_dict().keys()
