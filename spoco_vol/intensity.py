"""Bringing a volume's intensities to the model's input distribution.

A checkpoint records the intensity range of the data it was trained on
(``normalization["input_range"]``, e.g. [0, 255] for uint8 EM) and z-scores inputs with
that data's mean and std. A volume stored differently is first mapped linearly so that
its own range lands on the model's (documented in README "Inputs as they come"):

1. ``--intensity-range LO,HI`` if given: LO -> the model's low end, HI -> its high end.
2. Integer data of the model's training dtype: as they are.
3. Other integer data: the range their values can take. Unsigned: 0 up to the
   effective bit depth, 2^b - 1 with b the smallest of 8, 10, 12, 14, 16, 32 bits that
   holds the volume's maximum (12-bit camera data in uint16 -> 0..4095; uint8 data
   scaled by 257 into uint16 -> 0..65535, i.e. divided by 257). Signed: the dtype's range
   (int8 -128..127 -> +128).
4. Float data within [0, 1]: 0..1. Other float data: refused with one line that asks
   for ``--intensity-range`` (no rule can know what such values mean).

The minimum and maximum are measured once over the volume in a chunked pass (every
chunk, or an even sample of at most MAX_CHUNKS chunks for very large volumes), and the
mapping is recorded in the output's metadata and the run fingerprint.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from .errors import SpocoInputError

MAX_CHUNKS = 512
DEFAULT_MODEL_RANGE = (0.0, 255.0)   # checkpoints that predate the record: trained on uint8
BIT_DEPTHS = (8, 10, 12, 14, 16, 32)


def model_range(normalization: dict) -> tuple[float, float]:
    lo, hi = normalization.get("input_range") or DEFAULT_MODEL_RANGE
    return float(lo), float(hi)


def model_dtype(normalization: dict) -> str:
    return normalization.get("input_dtype", "uint8")


def value_range(arr, max_chunks: int = MAX_CHUNKS) -> tuple[float, float]:
    """(min, max) of a zarr array (or ndarray) in chunks: all of them, or an even
    sample of ``max_chunks``. NaN/inf are refused."""
    chunks = getattr(arr, "chunks", arr.shape)
    grid = [range(0, n, c) for n, c in zip(arr.shape, chunks)]
    starts = list(itertools.product(*grid))
    if len(starts) > max_chunks:
        starts = [starts[i] for i in np.linspace(0, len(starts) - 1, max_chunks).round().astype(int)]
    lo, hi = np.inf, -np.inf
    for st in starts:
        block = np.asarray(arr[tuple(slice(s, s + c) for s, c in zip(st, chunks))])
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            raise SpocoInputError("the input contains NaN or inf in the chunk at "
                                  f"{', '.join(map(str, st))}")
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return lo, hi


def input_range(arr, normalization: dict, given: Sequence[float] | None = None,
                what: str = "input") -> tuple[tuple[float, float], str]:
    """The intensity range of ``arr`` that maps onto the model's, and the rule that
    chose it (module docstring)."""
    if given is not None:
        if len(given) != 2 or not all(np.isfinite(given)) or given[1] <= given[0]:
            raise SpocoInputError(f"--intensity-range takes LO,HI with LO < HI, got {list(given)}")
        return (float(given[0]), float(given[1])), "--intensity-range"
    dtype = np.dtype(arr.dtype)
    if dtype.kind in "ui" and dtype.name == model_dtype(normalization):
        return model_range(normalization), f"{dtype.name} as trained"
    if dtype.kind == "i":
        info = np.iinfo(dtype)
        return (float(info.min), float(info.max)), f"{dtype.name} range"
    lo, hi = value_range(arr)
    if dtype.kind == "u":
        bits = next((b for b in BIT_DEPTHS if hi < 2 ** b), 64)
        return (0.0, float(2 ** bits - 1)), f"{dtype.name}, {bits}-bit data (maximum {hi:g})"
    if dtype.kind == "f" and lo >= 0 and hi <= 1:
        return (0.0, 1.0), f"{dtype.name} in [0, 1]"
    raise SpocoInputError(f"{what} is {dtype.name} with values in [{lo:g}, {hi:g}]: no rule says which of them "
                          "are dark and bright; give --intensity-range LO,HI (the values that map to the model's "
                          f"{model_range(normalization)[0]:g}..{model_range(normalization)[1]:g})")


def native_reference(arr, given: Sequence[float] | None = None, what: str = "input") -> dict:
    """The intensity record of a model trained from scratch on ``arr``: its dtype and
    the range the rules above give it (uint8: 0..255)."""
    dtype = np.dtype(arr.dtype)
    if given is None and dtype.kind == "u" and dtype.itemsize == 1:
        return {"input_dtype": dtype.name, "input_range": [0.0, 255.0]}
    (lo, hi), _ = input_range(arr, {"input_dtype": "", "input_range": [0.0, 1.0]}, given, what)
    return {"input_dtype": dtype.name, "input_range": [lo, hi]}


def linear_map(source: Sequence[float], target: Sequence[float]) -> tuple[float, float]:
    """(scale, offset) with source[0] -> target[0] and source[1] -> target[1]."""
    scale = (target[1] - target[0]) / (source[1] - source[0])
    return float(scale), float(target[0] - source[0] * scale)


def volume_mapping(arr, normalization: dict, given: Sequence[float] | None = None, what: str = "input") -> dict:
    """The mapping of a volume's intensities onto the model's input range, as recorded
    in outputs and fingerprints: {"rule", "input_range", "model_range", "scale", "offset"}."""
    source, rule = input_range(arr, normalization, given, what)
    target = model_range(normalization)
    scale, offset = linear_map(source, target)
    return {"rule": rule, "input_range": list(source), "model_range": list(target), "scale": scale,
            "offset": offset}


def apply(raw: np.ndarray, mapping: dict | None) -> np.ndarray:
    """float32 intensities on the model's range (identity without a mapping)."""
    raw = np.asarray(raw, dtype=np.float32)
    if not mapping or (mapping["scale"] == 1 and mapping["offset"] == 0):
        return raw
    return (raw * np.float32(mapping["scale"]) + np.float32(mapping["offset"])).astype(np.float32)
