"""Training data: patches sampled on the fly from zarr volumes of any size.

Nothing here reads a whole volume into memory: statistics and object inventories are
gathered chunk by chunk, and patches are sliced straight from the zarr arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from . import io
from .errors import SpocoInputError

MAX_RESAMPLE = 200  # tries to find a patch that contains an annotated object


@dataclasses.dataclass
class TrainingVolume:
    """One raw/labels pair; ``sections`` restricts sampling to a z-range (held-out splits)."""
    name: str
    raw: object          # zarr.Array (or ndarray): (Z, Y, X) or (Y, X)
    labels: object
    voxel_size: list[float] | None = None
    z_range: tuple[int, int] | None = None
    keep_ids: np.ndarray | None = None   # sparse subset (SPOCO@p); None = use labels as they are

    @property
    def shape3d(self) -> tuple[int, int, int]:
        return tuple(self.raw.shape) if self.raw.ndim == 3 else (1, *self.raw.shape)


def iter_slabs(arr, step: int | None = None, z_range: tuple[int, int] | None = None):
    """Yield (slice, block) over the first axis in chunk-sized slabs: bounded memory."""
    z0, z1 = z_range or (0, arr.shape[0])
    step = step or (arr.chunks[0] if hasattr(arr, "chunks") else 1)
    for z in range(z0, z1, step):
        yield slice(z, min(z1, z + step)), np.asarray(arr[z:min(z1, z + step)])


def open_training_volume(raw_path: str, labels_path: str, voxel_size=None) -> TrainingVolume:
    raw = io.open_volume(raw_path, "raw")
    labels = io.open_volume(labels_path, "labels")
    io.validate_volume(raw, f"raw {raw_path}")
    io.validate_volume(labels, f"labels {labels_path}", integer=True)
    if tuple(raw.shape) != tuple(labels.shape):
        raise SpocoInputError(f"raw {raw_path} has shape {tuple(raw.shape)} but labels "
                              f"{labels_path} have shape {tuple(labels.shape)}")
    vs = list(voxel_size) if voxel_size else io.read_voxel_size(raw_path)
    if vs is not None and len(vs) != raw.ndim:
        raise SpocoInputError(f"voxel size {vs} does not match the {raw.ndim}D raw {raw_path}")
    return TrainingVolume(name=raw_path, raw=raw, labels=labels, voxel_size=vs)


def volume_statistics(vol: TrainingVolume) -> dict:
    """Mean/std of raw, and the annotated objects with their sizes, in one chunked pass.

    Also the place where NaN/inf in raw is caught, before anything is written.
    """
    total, total_sq, count = 0.0, 0.0, 0
    ids, sizes = [], []
    z_range = vol.z_range if vol.raw.ndim == 3 else None
    for sl, raw in iter_slabs(vol.raw, z_range=z_range):
        io.check_finite(raw, f"raw {vol.name}", f"sections {sl.start}-{sl.stop - 1}")
        raw = raw.astype(np.float64)
        total += raw.sum()
        total_sq += (raw ** 2).sum()
        count += raw.size
        lab = np.asarray(vol.labels[sl])
        u, c = np.unique(lab[lab != 0], return_counts=True)
        ids.append(u)
        sizes.append(c)
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    # An object spanning slabs appears once per slab: merge its counts.
    uniq, inv = np.unique(ids, return_inverse=True)
    merged = np.bincount(inv, weights=sizes, minlength=len(uniq)).astype(np.int64)
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean ** 2, 0.0)))
    return {"mean": float(mean), "std": std if std > 0 else 1.0, "object_ids": uniq,
            "object_sizes": merged, "voxels": int(count)}


def choose_object_subset(object_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray | None:
    """SPOCO@p: a seeded random subset of round(p*n) objects (at least one); None for p = 1."""
    if not 0 < fraction <= 1:
        raise SpocoInputError(f"--object-fraction must be in (0, 1], got {fraction}")
    if fraction >= 1:
        return None
    n = max(1, int(round(fraction * len(object_ids))))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(object_ids, size=n, replace=False))


class PatchSampler:
    """Random patches (raw float32, labels int64) from several volumes.

    ``patch_shape`` is in model pixels; ``downsample`` (per axis of the 3D volume) says
    how many input voxels make one model pixel, so a model trained at 2x-downsampled XY
    reads ``patch_shape * downsample`` voxels and averages them.
    """

    def __init__(self, volumes: Sequence[TrainingVolume], patch_shape: Sequence[int], dims: int,
                 downsample: Sequence[int] = (1, 1, 1), rng: np.random.Generator | None = None):
        self.volumes = list(volumes)
        self.dims = dims
        self.patch_shape = tuple(patch_shape)
        if len(self.patch_shape) != dims:
            raise SpocoInputError(f"--patch-shape needs {dims} values for a {dims}D model")
        self.downsample = tuple(downsample)
        self.rng = rng or np.random.default_rng(0)
        # Read shape, in input voxels, as a 3D (z, y, x) window.
        ps3 = (1, *self.patch_shape) if dims == 2 else self.patch_shape
        self.read_shape = tuple(p * d for p, d in zip(ps3, self.downsample))
        for v in self.volumes:
            z0, z1 = v.z_range or (0, v.shape3d[0])
            avail = (z1 - z0, *v.shape3d[1:])
            if any(r > a for r, a in zip(self.read_shape, avail)):
                raise SpocoInputError(
                    f"patch {tuple(self.patch_shape)} (x downsample {self.downsample} = "
                    f"{self.read_shape} voxels) is bigger than volume {v.name} {avail}")

    def _read(self, vol: TrainingVolume, start: Sequence[int]):
        sl = tuple(slice(s, s + r) for s, r in zip(start, self.read_shape))
        if vol.raw.ndim == 2:
            sl = sl[1:]
        raw = np.asarray(vol.raw[sl], dtype=np.float32)
        lab = np.asarray(vol.labels[sl]).astype(np.int64)
        if vol.raw.ndim == 2:
            raw, lab = raw[None], lab[None]
        if vol.keep_ids is not None:
            lab = np.where(np.isin(lab, vol.keep_ids), lab, 0)
        return downsample_raw(raw, self.downsample), downsample_labels(lab, self.downsample)

    def sample(self, require_object: bool = True):
        """One patch; resampled until it holds an annotated object (when required)."""
        for _ in range(MAX_RESAMPLE):
            vol = self.volumes[self.rng.integers(len(self.volumes))]
            z0, z1 = vol.z_range or (0, vol.shape3d[0])
            lo = (z0, 0, 0)
            hi = (z1, *vol.shape3d[1:])
            start = [int(self.rng.integers(a, b - r + 1)) for a, b, r in zip(lo, hi, self.read_shape)]
            raw, lab = self._read(vol, start)
            if not require_object or lab.any():
                if self.dims == 2:
                    raw, lab = raw[0], lab[0]
                return raw, lab
        raise SpocoInputError(f"no annotated object found in {MAX_RESAMPLE} random patches; "
                              "is the patch shape too small or the annotation too sparse?")

    def batch(self, size: int):
        pairs = [self.sample() for _ in range(size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def downsample_raw(raw: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Block mean by integer factors (anti-aliased, unlike strided picking)."""
    if all(f == 1 for f in factors):
        return raw
    shape = []
    for s, f in zip(raw.shape, factors):
        shape += [s // f, f]
    trimmed = raw[tuple(slice(0, (s // f) * f) for s, f in zip(raw.shape, factors))]
    return trimmed.reshape(shape).mean(axis=tuple(range(1, 2 * raw.ndim, 2)))


def downsample_labels(labels: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Strided picking (labels cannot be averaged)."""
    if all(f == 1 for f in factors):
        return labels
    return np.ascontiguousarray(labels[tuple(slice(f // 2, None, f) for f in factors)][
        tuple(slice(0, s // f) for s, f in zip(labels.shape, factors))])
