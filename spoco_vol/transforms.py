"""Input normalisation and training augmentations, on numpy patches.

Geometry (flips, in-plane 90-degree rotations, optional elastic deformation) is applied
identically to raw and labels. The momentum network g sees the same geometry but extra
photometric noise (Gaussian noise, blur), which is what the consistency loss exploits:
g's embedding of the unlabeled region must agree with f's despite the noise.

A multi-channel raw patch (RGB, several stains) has its channels on a leading axis,
(C, *spatial), and its labels the spatial shape: the geometry moves the spatial axes
only, normalisation has per-channel statistics.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def normalize(raw: np.ndarray, normalization: dict) -> np.ndarray:
    """Z-score with the statistics stored in the checkpoint (fixed, so blocks agree);
    per-channel statistics (lists) apply along a leading channel axis."""
    mean, std = normalization["mean"], normalization["std"]
    raw = np.asarray(raw, dtype=np.float32)
    if np.ndim(mean):
        shape = (-1,) + (1,) * (raw.ndim - 1)
        mean = np.reshape(np.asarray(mean, np.float32), shape)
        std = np.reshape(np.asarray(std, np.float32), shape)
    return ((raw - mean) / std).astype(np.float32)


def augment_geometry(raw: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                     elastic: bool = False):
    """Random flips and in-plane rot90 (last two axes), optionally elastic; same for both
    (a leading channel axis of ``raw`` is left alone)."""
    channel_axes = raw.ndim - labels.ndim
    for axis in range(labels.ndim):
        if rng.random() < 0.5:
            raw, labels = np.flip(raw, axis + channel_axes), np.flip(labels, axis)
    k = int(rng.integers(4))
    if raw.shape[-1] != raw.shape[-2]:
        k = 2 * (k % 2)  # non-square patches keep their shape with 0 or 180 degrees only
    raw, labels = np.rot90(raw, k, axes=(-2, -1)), np.rot90(labels, k, axes=(-2, -1))
    if elastic:
        raw, labels = elastic_deform(raw, labels, rng)
    return np.ascontiguousarray(raw), np.ascontiguousarray(labels)


def elastic_deform(raw: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                   alpha: float = 4.0, sigma: float = 8.0):
    """Smooth random in-plane displacement of at most ``alpha`` pixels; nearest for labels."""
    shape = raw.shape

    def field():
        d = ndimage.gaussian_filter(rng.uniform(-1, 1, shape[-2:]), sigma)
        return d / (np.abs(d).max() + 1e-12) * alpha

    dy, dx = field(), field()
    yy, xx = np.meshgrid(np.arange(shape[-2]), np.arange(shape[-1]), indexing="ij")
    coords = [yy + dy, xx + dx]

    def warp(img, order):
        if img.ndim == 2:
            return ndimage.map_coordinates(img, coords, order=order, mode="reflect")
        return np.stack([warp(s, order) for s in img])  # sections, channels: the same field

    return warp(raw, 1).astype(raw.dtype), warp(labels, 0).astype(labels.dtype)


def augment_intensity(raw: np.ndarray, rng: np.random.Generator, scale: float = 0.1,
                      shift: float = 0.1) -> np.ndarray:
    """Contrast and brightness jitter on a normalised patch."""
    return (raw * (1 + rng.uniform(-scale, scale)) + rng.uniform(-shift, shift)).astype(np.float32)


def augment_for_momentum(raw: np.ndarray, rng: np.random.Generator, noise: float = 0.1,
                         max_blur: float = 1.0, channels_first: bool = False) -> np.ndarray:
    """The g branch's extra photometric noise: Gaussian blur (of the spatial axes) then
    Gaussian noise."""
    out = raw
    sigma = rng.uniform(0, max_blur)
    if sigma > 0.1:
        out = ndimage.gaussian_filter(out, (0,) + (sigma,) * (raw.ndim - 1) if channels_first else sigma)
    out = out + rng.normal(0, noise * rng.uniform(0, 1), out.shape)
    return augment_intensity(out.astype(np.float32), rng)
