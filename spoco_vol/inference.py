"""Embedding prediction: the U-Net applied to a numpy block, tile by tile.

Tiles overlap by the network's context and only their centres are kept, so the result
does not depend on where the tile borders fall (up to the U-Net's zero padding, which
the context margin keeps away from the kept centre).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Sequence

import numpy as np
import torch

from .errors import SpocoInputError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpocoInputError("--device cuda requested but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise SpocoInputError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (oneDNN's own test: AVX-512 or
    AMX). Without it (AVX2-only CPUs, e.g. many AMD EPYC) bf16 falls back to reference
    kernels: the bundled U-Net ran 46x slower in bf16 than in fp32 on such a machine
    (benchmarks/bench_speed.py)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed precision for the U-Net on ``device``, or None for plain fp32.

    bf16 where the hardware has it (CPUs with fast bf16: 2.4x faster U-Net inference
    than fp32 on an AVX-512 machine; CUDA from Ampere on): its fp32 exponent range needs
    no loss scaling in training. fp16 on older GPUs, where training then scales the loss
    (training.train). fp32 on CPUs without fast bf16, where bf16 is much slower."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast_context(device: torch.device, enabled: bool = True):
    """Mixed precision for the U-Net (dtype from ``autocast_dtype``); off, or on a device
    without a fast half type: plain fp32."""
    dtype = autocast_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


TILE_2D, TILE_3D = 1024, 96  # default tile (core) sides: a 2D block's read is one tile


def for_inference(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` (in place) laid out channels-last, as predict_embeddings then feeds it:
    oneDNN's CPU convolutions run the bundled U-Net 1.5x (fp32) to 2.1x (bf16) faster
    so, with the same embeddings up to float rounding (benchmarks/RESULTS.md, "Cost of
    a voxel"). For networks that only predict: training keeps its own layout."""
    return net.to(memory_format=torch.channels_last if net.dims == 2 else torch.channels_last_3d)


def _layout(net: torch.nn.Module):
    """The memory format of the network's weights (what its input should have)."""
    for p in net.parameters():
        if p.dim() in (4, 5) and p.shape[1] > 1:
            fmt = torch.channels_last if p.dim() == 4 else torch.channels_last_3d
            return fmt if p.is_contiguous(memory_format=fmt) and not p.is_contiguous() else torch.contiguous_format
    return torch.contiguous_format


def _tile_starts(size: int, core: int) -> list[int]:
    return list(range(0, size, core)) if size > core else [0]


# The in-plane symmetries of a square (rotation by 0 or 90 degrees, then flips of the
# last two axes): the training augmentations, so the network should answer each alike.
TEST_TIME_TRANSFORMS = [(rot, flips) for rot in (0, 1) for flips in ((), (-1,), (-2,), (-2, -1))]


def _transform(a: np.ndarray, rot: int, flips: tuple) -> np.ndarray:
    a = np.rot90(a, rot, axes=(-2, -1)) if rot else a
    return np.flip(a, flips) if flips else a


def _untransform(a: np.ndarray, rot: int, flips: tuple) -> np.ndarray:
    a = np.flip(a, flips) if flips else a
    return np.rot90(a, -rot, axes=(-2, -1)) if rot else a


def predict_embeddings(model: torch.nn.Module, image: np.ndarray, *, device: torch.device,
                       tile_shape: Sequence[int] | None = None, context: Sequence[int] | None = None,
                       amp: bool = True, tta: bool = False, image_context: bool = True) -> np.ndarray:
    """Embeddings (E, *spatial shape) float32 for a normalised 2D or 3D image, (C,
    *spatial) for a model with C > 1 input channels.

    The image's spatial dimensionality must equal the model's. Tiles of ``tile_shape`` (cores)
    are predicted with ``context`` extra pixels per side (reflect-padded at the image
    border), padded up to the model's shape multiple. ``image_context=False``: the image
    is its own context (a block read with a halo of at least the field of view): no
    context is added beyond its border, only between its tiles.
    ``tta``: test-time augmentation, the mean of the embeddings of the 8 in-plane
    rotations/flips of the image (8x the time). Averaging cancels the network's
    orientation-dependent noise, which in a sparsely trained model can break background
    structures into false objects (VNC, 10% of the objects, six seeds: mean AP@0.5
    0.45 -> 0.53; the full-label model loses, 0.82 -> 0.75; benchmarks/RESULTS.md).
    """
    dims = model.dims
    channels = model.in_channels
    spatial = image.shape[1:] if channels > 1 else image.shape
    if len(spatial) != dims or (channels > 1 and image.shape[0] != channels):
        raise SpocoInputError(f"a {dims}D model with {channels} channel(s) cannot predict an image of shape "
                              f"{tuple(image.shape)}")
    if tta:
        out = np.zeros((model.embedding_dim, *spatial), dtype=np.float32)
        for rot, flips in TEST_TIME_TRANSFORMS:
            view = np.ascontiguousarray(_transform(image, rot, flips))
            out += _untransform(predict_embeddings(model, view, device=device, tile_shape=tile_shape,
                                                   context=context, amp=amp, image_context=image_context),
                                rot, flips)
        return out / len(TEST_TIME_TRANSFORMS)
    mult = model.shape_multiple
    tile_shape = list(tile_shape or [TILE_2D if dims == 2 else TILE_3D] * dims)
    if context is None:
        from .model import receptive_halo
        context = receptive_halo(model)
    # Tiles and their context start on multiples of the total pooling: the U-Net is only
    # shift-equivariant for such shifts, so tiles then agree with an untiled prediction.
    tile_shape = [-(-t // m) * m for t, m in zip(tile_shape, mult)]
    context = [-(-c // m) * m for c, m in zip(context, mult)]
    out = np.empty((model.embedding_dim, *spatial), dtype=np.float32)
    model = model.to(device).eval()
    layout = _layout(model)
    starts = [_tile_starts(s, t) for s, t in zip(spatial, tile_shape)]
    for start in itertools.product(*starts):
        core = [slice(s, min(s + t, n)) for s, t, n in zip(start, tile_shape, spatial)]
        lo = [c.start - h if image_context or c.start > 0 else 0 for c, h in zip(core, context)]
        hi = [c.stop + h if image_context or c.stop < n else n for c, h, n in zip(core, context, spatial)]
        # Round the read window up to the shape multiple the U-Net needs.
        hi = [l + -(-(h - l) // m) * m for l, h, m in zip(lo, hi, mult)]
        tile = read_window(image, lo, hi)
        x = torch.from_numpy(tile)[None] if channels > 1 else torch.from_numpy(tile)[None, None]
        with torch.no_grad(), autocast_context(device, amp):
            emb = model(x.to(device).contiguous(memory_format=layout)).float()[0]
        emb = emb.cpu().numpy()
        crop = tuple(slice(c.start - l, c.stop - l) for c, l in zip(core, lo))
        out[(slice(None), *core)] = emb[(slice(None), *crop)]
    return out


def read_window(image: np.ndarray, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    """image[lo:hi] with reflect padding where the window leaves the image (over its
    last len(lo) axes: a leading channel axis is taken whole)."""
    lead = image.ndim - len(lo)
    spatial = image.shape[lead:]
    src = (slice(None),) * lead + tuple(slice(max(l, 0), min(h, n)) for l, h, n in zip(lo, hi, spatial))
    block = image[src]
    pad = [(0, 0)] * lead + [(max(0, -l), max(0, h - n)) for l, h, n in zip(lo, hi, spatial)]
    if any(p != (0, 0) for p in pad):
        mode = "reflect" if all(p[0] < s and p[1] < s for p, s in zip(pad, block.shape)) else "symmetric"
        if mode == "symmetric" and any(p[0] > s or p[1] > s for p, s in zip(pad, block.shape)):
            mode = "edge"
        block = np.pad(block, pad, mode=mode)
    return np.ascontiguousarray(block, dtype=np.float32)


def predict_foreground(net, image: np.ndarray, *, device: torch.device, amp: bool = True,
                       tta: bool = False, image_context: bool = True) -> np.ndarray:
    """Object probability (float32, shape of ``image``) of a normalised image from a
    foreground classifier (spoco_vol.foreground); ``tta``: the mean logit of the 8
    rotated/flipped predictions, as for the embeddings; ``image_context`` as there."""
    from scipy.special import expit
    return expit(predict_embeddings(net, image, device=device, amp=amp, tta=tta,
                                    image_context=image_context)[0]).astype(np.float32)
