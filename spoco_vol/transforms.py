"""Input normalisation and training augmentations, on numpy patches.

Geometry (flips, in-plane 90-degree rotations, optional elastic deformation) is applied
identically to raw and labels. The momentum network g sees the same geometry but extra
photometric noise (Gaussian noise, blur), which is what the consistency loss exploits:
g's embedding of the unlabeled region must agree with f's despite the noise. With
``--colour-jitter`` each network's input also gets its own colour jitter, greying and blur
(augment_colour), as the reference code trains on CVPPP.

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


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights: the grey of three channels read as RGB


def grey(raw: np.ndarray, channels_first: bool) -> np.ndarray:
    """The intensity of each pixel: the luma of three channels, the mean of other counts."""
    if not channels_first:
        return raw
    weights = np.asarray(LUMA if raw.shape[0] == 3 else [1 / raw.shape[0]] * raw.shape[0], np.float32)
    return np.tensordot(weights, raw, axes=1)


def hue_rotation(turns: float) -> np.ndarray:
    """The 3 x 3 rotation of RGB about the grey axis by ``turns`` of a full turn: a hue
    shift that keeps each pixel's mean and its distance from grey (linear, so it applies
    to raw intensities of any range)."""
    axis = np.full(3, 1 / np.sqrt(3))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = 2 * np.pi * turns
    return (np.cos(angle) * np.eye(3) + np.sin(angle) * cross
            + (1 - np.cos(angle)) * np.outer(axis, axis)).astype(np.float32)


def augment_colour(raw: np.ndarray, rng: np.random.Generator, strength: float, channels_first: bool,
                   jitter_p: float = 0.5, grey_p: float = 0.2, blur_p: float = 0.5,
                   blur_sigma: tuple = (0.1, 2.0)) -> np.ndarray:
    """Photometric augmentation of a raw patch (before normalisation), the reference CVPPP
    recipe's, drawn anew for each network's input: with probability ``jitter_p``
    brightness (x b), contrast (towards the patch's mean grey) and saturation (towards each
    pixel's grey) with factors in [1 - S, 1 + S], and, with three channels, a hue rotation
    of up to S/4 of a turn, in random order; with probability ``grey_p`` every channel set
    to the grey; with probability ``blur_p`` a Gaussian blur of the spatial axes. No clipping:
    raw intensities have no common range. Saturation, hue and grey need several channels;
    a single channel gets brightness, contrast and blur."""
    out = np.asarray(raw, np.float32)
    several = channels_first and out.shape[0] > 1
    if rng.random() < jitter_p:
        ops = ["brightness", "contrast"] + (["saturation"] if several else []) + \
              (["hue"] if several and out.shape[0] == 3 else [])
        for op in rng.permutation(ops):
            if op == "hue":
                out = np.tensordot(hue_rotation(rng.uniform(-strength / 4, strength / 4)), out, axes=1)
                continue
            f = rng.uniform(1 - strength, 1 + strength)
            if op == "brightness":
                out = f * out
            elif op == "contrast":  # towards the patch's mean grey
                out = f * out + (1 - f) * grey(out, channels_first).mean()
            else:  # saturation: towards each pixel's grey
                out = f * out + (1 - f) * grey(out, channels_first)[None]
    if several and rng.random() < grey_p:
        out = np.broadcast_to(grey(out, channels_first)[None], out.shape)
    if rng.random() < blur_p:
        sigma = rng.uniform(*blur_sigma)
        out = ndimage.gaussian_filter(out, (0,) + (sigma,) * (out.ndim - 1) if channels_first else sigma)
    return np.ascontiguousarray(out, np.float32)


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
