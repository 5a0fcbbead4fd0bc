"""The SPOCO embedding network: a plain U-Net (its checkpoints: spoco_vol.checkpoint)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn



def _conv(dims: int):
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _norm(kind: str, channels: int, dims: int, num_groups: int) -> nn.Module:
    if kind == "group":
        # GroupNorm needs channels divisible by the group count; fall back to fewer groups.
        groups = min(num_groups, channels)
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm3d(channels)
    raise ValueError(f"unknown norm {kind!r} (use 'group' or 'batch')")


class DoubleConv(nn.Sequential):
    """Two (conv 3^d -> norm -> ReLU) in a row, as in the paper's U-Net."""

    def __init__(self, in_ch: int, out_ch: int, dims: int, norm: str, num_groups: int,
                 kernel: Sequence[int]):
        pad = tuple(k // 2 for k in kernel)
        conv = _conv(dims)
        super().__init__(
            conv(in_ch, out_ch, kernel, padding=pad, bias=False),
            _norm(norm, out_ch, dims, num_groups),
            nn.ReLU(inplace=True),
            conv(out_ch, out_ch, kernel, padding=pad, bias=False),
            _norm(norm, out_ch, dims, num_groups),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net mapping an image to per-pixel embeddings (no final activation).

    ``pool_factors[l]`` is the max-pool factor between level l and l+1, one int per
    spatial axis, e.g. (1, 2, 2) for anisotropic EM with thick sections. The input's
    spatial shape must be divisible by the product of the factors (``shape_multiple``).
    ``dropout``: channel dropout after every double convolution, active in training
    (the "g = f with dropout" consistency network, spoco_vol.losses.ConsistencyTeacher).
    """

    def __init__(self, dims: int = 2, in_channels: int = 1, embedding_dim: int = 16,
                 features: Sequence[int] = (16, 32, 64, 128), norm: str = "batch",
                 num_groups: int = 8, pool_factors: Sequence[Sequence[int]] | None = None, dropout: float = 0.0):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError("dims must be 2 or 3")
        features = list(features)
        if pool_factors is None:
            pool_factors = [[2] * dims for _ in features[1:]]
        pool_factors = [list(p) for p in pool_factors]
        if len(pool_factors) != len(features) - 1 or any(len(p) != dims for p in pool_factors):
            raise ValueError(f"need {len(features) - 1} pool factors of length {dims}")
        self.config = dict(dims=dims, in_channels=in_channels, embedding_dim=embedding_dim,
                           features=features, norm=norm, num_groups=num_groups,
                           pool_factors=pool_factors)
        if dropout:  # only then: checkpoints without dropout keep the architecture they had
            self.config["dropout"] = float(dropout)
        drop = nn.Dropout2d if dims == 2 else nn.Dropout3d
        self.dropout = drop(dropout) if dropout else nn.Identity()
        self.dims = dims
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.pool_factors = pool_factors
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        kernel = (3,) * dims
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        prev = in_channels
        for level, f in enumerate(features):
            self.encoders.append(DoubleConv(prev, f, dims, norm, num_groups, kernel))
            if level < len(features) - 1:
                self.pools.append(pool(pool_factors[level]))
            prev = f
        self.decoders = nn.ModuleList()
        for level in range(len(features) - 2, -1, -1):
            self.decoders.append(DoubleConv(features[level + 1] + features[level], features[level],
                                            dims, norm, num_groups, kernel))
        self.final = _conv(dims)(features[0], embedding_dim, 1)

    @property
    def shape_multiple(self) -> list[int]:
        """Each spatial input size must be a multiple of this (the total pooling)."""
        m = [1] * self.dims
        for p in self.pool_factors:
            m = [a * b for a, b in zip(m, p)]
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, enc in enumerate(self.encoders):
            x = self.dropout(enc(x))
            if level < len(self.pools):
                skips.append(x)
                x = self.pools[level](x)
        for dec, skip, factor in zip(self.decoders, reversed(skips), reversed(self.pool_factors)):
            x = nn.functional.interpolate(x, scale_factor=tuple(float(f) for f in factor), mode="nearest")
            x = self.dropout(dec(torch.cat([skip, x], dim=1)))
        return self.final(x)


def build_model(architecture: dict) -> UNet:
    return UNet(**architecture)


def receptive_halo(model: UNet) -> list[int]:
    """Context (pixels per side) whose absence changes the output: the U-Net's field of view.

    Each level has two 3-convs before pooling and two after; at level l one pixel spans
    prod(pool factors above) input pixels.
    """
    halo = [0] * model.dims
    scale = [1] * model.dims
    for level in range(len(model.config["features"])):
        convs = 2 if level == len(model.config["features"]) - 1 else 4
        halo = [h + convs * s for h, s in zip(halo, scale)]
        if level < len(model.pool_factors):
            # max-pooling by f reaches f - 1 further input steps at this scale
            halo = [h + (f - 1) * s for h, s, f in zip(halo, scale, model.pool_factors[level])]
            scale = [s * f for s, f in zip(scale, model.pool_factors[level])]
    return halo
