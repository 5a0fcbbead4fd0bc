"""Training data: patches sampled on the fly from zarr volumes of any size.

Nothing here reads a whole volume into memory: statistics and object inventories are
gathered chunk by chunk, and patches are sliced straight from the zarr arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from . import intensity, io
from .errors import SpocoInputError

# Labeled voxels are gathered per slab of at most this many voxels (bounded memory).
SLAB_VOXELS = 4 * 2 ** 20
ANCHORS_PER_OBJECT = 8      # random voxels kept per object and slab: patch centres
RANDOM_PATCH_SHARE = 0.25   # patches placed anywhere, so unlabeled context is seen too
MAX_RESAMPLE = 20           # tries to find a patch whose (resampled) labels hold an object


@dataclasses.dataclass
class ObjectInventory:
    """The annotated objects of a volume, found in one chunked pass: ids, voxel counts,
    bounding boxes and a few random voxels of each (``anchors``, with ``anchor_ids``),
    all in (z, y, x) volume coordinates (a 2D volume is one section, z = 0)."""
    ids: np.ndarray          # (n,) sorted
    sizes: np.ndarray        # (n,)
    bbox_lo: np.ndarray      # (n, 3) first voxel
    bbox_hi: np.ndarray      # (n, 3) one past the last voxel
    anchors: np.ndarray      # (m, 3) int64
    anchor_ids: np.ndarray   # (m,)

    def restrict(self, ids: np.ndarray) -> "ObjectInventory":
        """Only the objects in ``ids``."""
        keep = np.isin(self.ids, ids)
        ak = np.isin(self.anchor_ids, ids)
        return ObjectInventory(self.ids[keep], self.sizes[keep], self.bbox_lo[keep], self.bbox_hi[keep],
                               self.anchors[ak], self.anchor_ids[ak])


@dataclasses.dataclass
class TrainingVolume:
    """One raw/labels pair; ``z_range`` restricts sampling to sections (held-out splits).
    A multi-channel raw (``channels`` > 1) has its channels on the first axis,
    (C, Z, Y, X) or (C, Y, X), and the labels the spatial shape."""
    name: str
    raw: object          # zarr.Array (or ndarray): (Z, Y, X) or (Y, X), with a leading C axis if channels > 1
    labels: object
    voxel_size: list[float] | None = None
    z_range: tuple[int, int] | None = None
    keep_ids: np.ndarray | None = None   # sparse subset (SPOCO@p); None = use labels as they are
    inventory: ObjectInventory | None = None  # of the sections in z_range (volume_statistics)
    intensity: dict | None = None  # its mapping onto the model's input range (spoco_vol.intensity)
    channels: int = 1

    def read_raw(self, sl) -> np.ndarray:
        """float32 raw of the spatial region ``sl`` (its channels first), on the model's
        intensity range."""
        if self.channels > 1:
            sl = (slice(None),) + (tuple(sl) if isinstance(sl, tuple) else (sl,))
        return intensity.apply(self.raw[sl], self.intensity)

    @property
    def spatial_ndim(self) -> int:
        return self.labels.ndim

    @property
    def shape3d(self) -> tuple[int, int, int]:
        shape = tuple(self.labels.shape)
        return shape if len(shape) == 3 else (1, *shape)


def iter_slabs(arr, step: int | None = None, z_range: tuple[int, int] | None = None):
    """Yield (slice, block) over the first axis in chunk-sized slabs: bounded memory."""
    z0, z1 = z_range or (0, arr.shape[0])
    step = step or (arr.chunks[0] if hasattr(arr, "chunks") else 1)
    for z in range(z0, z1, step):
        yield slice(z, min(z1, z + step)), np.asarray(arr[z:min(z1, z + step)])


def open_training_volume(raw_path: str, labels_path: str, voxel_size=None) -> TrainingVolume:
    """A raw/labels pair, checked. A raw with one axis more than its labels holds
    channels on that first axis (an RGB image: (3, Y, X) with (Y, X) labels)."""
    raw = io.open_volume(raw_path, "raw")
    labels = io.open_volume(labels_path, "labels")
    io.validate_volume(labels, f"labels {labels_path}", integer=True)
    channels = raw.shape[0] if raw.ndim == labels.ndim + 1 else 1
    io.validate_volume(raw, f"raw {raw_path}", channels=channels)
    if tuple(raw.shape)[raw.ndim - labels.ndim:] != tuple(labels.shape):
        raise SpocoInputError(f"raw {raw_path} has shape {tuple(raw.shape)} but labels "
                              f"{labels_path} have shape {tuple(labels.shape)}")
    vs = list(voxel_size) if voxel_size else io.read_voxel_size(raw_path)
    if vs is not None and len(vs) == raw.ndim and channels > 1:
        vs = vs[1:]  # an OME-Zarr scale that names the channel axis too
    if vs is not None and len(vs) != labels.ndim:
        raise SpocoInputError(f"voxel size {vs} does not match the {labels.ndim}D raw {raw_path}")
    return TrainingVolume(name=raw_path, raw=raw, labels=labels, voxel_size=vs, channels=channels)


def _slab_objects(lab: np.ndarray, z0: int, rng: np.random.Generator, anchors_per_object: int, row0: int = 0):
    """ids, sizes, bounding boxes and up to ``anchors_per_object`` random voxels of each
    object in one 3D slab of labels starting at section ``z0`` (and row ``row0``)."""
    flat = lab.reshape(-1)
    nz = np.flatnonzero(flat)
    if nz.size == 0:
        return None
    ids = flat[nz].astype(np.int64)
    order = np.lexsort((rng.random(nz.size), ids))  # by id, random within an object
    ids, nz = ids[order], nz[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    counts = np.diff(np.r_[starts, ids.size])
    coords = np.stack(np.unravel_index(nz, lab.shape), axis=1).astype(np.int64)
    coords[:, 0] += z0
    coords[:, 1] += row0
    lo = np.minimum.reduceat(coords, starts, axis=0)
    hi = np.maximum.reduceat(coords, starts, axis=0) + 1
    rank = np.arange(ids.size) - np.repeat(starts, counts)
    pick = rank < anchors_per_object
    return ids[starts], counts, lo, hi, coords[pick], ids[pick]


def volume_statistics(vol: TrainingVolume, seed: int = 0,
                      anchors_per_object: int = ANCHORS_PER_OBJECT) -> dict:
    """Mean/std of raw and the inventory of the annotated objects, in one chunked pass.

    Also the place where NaN/inf in raw is caught, before anything is written.
    """
    total, total_sq, count = 0.0, 0.0, 0
    parts = []
    rng = np.random.default_rng(seed)
    z_range = vol.z_range if vol.spatial_ndim == 3 else None
    sub = max(1, SLAB_VOXELS // int(np.prod(vol.shape3d[1:])))  # sections per labeled-voxel pass
    per_channel = vol.channels > 1
    # slabs of the raw's chunks along its first spatial axis (its reads are the costly ones)
    step = vol.raw.chunks[1 if per_channel else 0] if hasattr(vol.raw, "chunks") else None
    for sl, lab in iter_slabs(vol.labels, step=step, z_range=z_range):
        raw = np.asarray(vol.raw[(slice(None), sl) if vol.channels > 1 else sl])
        io.check_finite(raw, f"raw {vol.name}", f"sections {sl.start}-{sl.stop - 1}")
        raw = intensity.apply(raw, vol.intensity).astype(np.float64)
        # one mean and std per channel (sums over everything but the channel axis)
        axes = tuple(range(1, raw.ndim)) if per_channel else None
        total += raw.sum(axis=axes)
        total_sq += (raw ** 2).sum(axis=axes)
        count += raw.size // vol.channels
        if vol.spatial_ndim == 3:
            lab, z0 = np.asarray(lab), sl.start
            for k in range(0, lab.shape[0], sub):
                found = _slab_objects(lab[k:k + sub], z0 + k, rng, anchors_per_object)
                if found is not None:
                    parts.append(found)
        else:  # a 2D volume is one section (z = 0), read in slabs of rows
            found = _slab_objects(np.asarray(lab)[None], 0, rng, anchors_per_object, row0=sl.start)
            if found is not None:
                parts.append(found)
    inventory = _merge_slabs(parts)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    std = np.where(std > 0, std, 1.0)
    if not per_channel:
        mean, std = float(mean), float(std)
    else:
        mean, std = [float(m) for m in mean], [float(s) for s in std]
    return {"mean": mean, "std": std, "object_ids": inventory.ids,
            "object_sizes": inventory.sizes, "voxels": int(count), "inventory": inventory}


def _merge_slabs(parts) -> ObjectInventory:
    """One inventory from per-slab ones: an object spanning slabs appears once per slab."""
    if not parts:
        e3 = np.zeros((0, 3), np.int64)
        return ObjectInventory(np.zeros(0, np.int64), np.zeros(0, np.int64), e3, e3, e3, np.zeros(0, np.int64))
    ids, sizes, lo, hi, anchors, anchor_ids = (np.concatenate(p) for p in zip(*parts))
    uniq, inv = np.unique(ids, return_inverse=True)
    merged = np.bincount(inv, weights=sizes, minlength=len(uniq)).astype(np.int64)
    blo = np.full((len(uniq), 3), np.iinfo(np.int64).max)
    bhi = np.zeros((len(uniq), 3), np.int64)
    np.minimum.at(blo, inv, lo)
    np.maximum.at(bhi, inv, hi)
    return ObjectInventory(uniq, merged, blo, bhi, anchors, anchor_ids)


def object_inventory(vol: TrainingVolume, seed: int = 0) -> ObjectInventory:
    """The volume's inventory (computed once, chunk by chunk, if not known yet)."""
    if vol.inventory is None:
        vol.inventory = volume_statistics(vol, seed)["inventory"]
    return vol.inventory


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
    """Patches (raw float32, labels int64) from several volumes, placed around annotated
    objects: pick an object (uniformly over all kept objects of all volumes, so small
    and rare ones count as much as large ones), one of its anchor voxels, then a patch
    that holds that voxel at a random position. A share ``random_share`` of the patches
    is placed anywhere instead, so the unlabeled context far from the annotations is seen
    too. The cost of a patch does not depend on how sparse the annotation is.

    ``patch_shape`` is in model pixels; ``downsample`` (per axis of the 3D volume) says
    how many input voxels make one model pixel: integer factors average blocks of voxels,
    others (e.g. 1.84 for 5 nm data and a 9.2 nm model) resample linearly (labels:
    nearest), as segmentation resamples its blocks. ``margin`` (model pixels per side,
    per axis of the patch): the border the loss leaves out; the chosen anchor voxel
    lies inside it where the volume allows.
    """

    def __init__(self, volumes: Sequence[TrainingVolume], patch_shape: Sequence[int], dims: int,
                 downsample: Sequence[float] = (1, 1, 1), rng: np.random.Generator | None = None,
                 random_share: float = RANDOM_PATCH_SHARE, margin: Sequence[int] | None = None):
        self.volumes = list(volumes)
        self.dims = dims
        self.patch_shape = tuple(patch_shape)
        if len(self.patch_shape) != dims:
            raise SpocoInputError(f"--patch-shape needs {dims} values for a {dims}D model")
        self.downsample = tuple(int(d) if float(d).is_integer() else float(d) for d in downsample)
        self.rng = rng or np.random.default_rng(0)
        self.random_share = random_share
        # Read shape, in input voxels, as a 3D (z, y, x) window.
        self.model_shape = (1, *self.patch_shape) if dims == 2 else self.patch_shape
        self.read_shape = tuple(int(np.ceil(p * d - 1e-9)) for p, d in zip(self.model_shape, self.downsample))
        margin = [0] * dims if margin is None else list(margin)
        self.read_margin = tuple(int(np.ceil(m * d - 1e-9)) for m, d in
                                 zip([0] * (3 - dims) + margin, self.downsample))
        for v in self.volumes:
            z0, z1 = v.z_range or (0, v.shape3d[0])
            avail = (z1 - z0, *v.shape3d[1:])
            if any(r > a for r, a in zip(self.read_shape, avail)):
                raise SpocoInputError(
                    f"patch {tuple(self.patch_shape)} (x downsample {self.downsample} = "
                    f"{self.read_shape} voxels) is bigger than volume {v.name} {avail}")
        # The anchors of the kept objects in each volume's sections, pooled: (volume, object).
        self._anchors = []
        pool = []
        for i, v in enumerate(self.volumes):
            inv = object_inventory(v)
            if v.keep_ids is not None:
                inv = inv.restrict(v.keep_ids)
            z0, z1 = v.z_range or (0, v.shape3d[0])
            inside = (inv.anchors[:, 0] >= z0) & (inv.anchors[:, 0] < z1)
            anchors, ids = inv.anchors[inside], inv.anchor_ids[inside]
            order = np.argsort(ids, kind="stable")
            anchors, ids = anchors[order], ids[order]
            uniq, first, count = np.unique(ids, return_index=True, return_counts=True)
            self._anchors.append(anchors)
            pool += [(i, f, c) for f, c in zip(first.tolist(), count.tolist())]
        self._objects = np.asarray(pool, np.int64).reshape(-1, 3)  # volume, first anchor, anchor count

    @property
    def n_objects(self) -> int:
        return len(self._objects)

    def _read(self, vol: TrainingVolume, start: Sequence[int]):
        sl = tuple(slice(s, s + r) for s, r in zip(start, self.read_shape))
        if vol.spatial_ndim == 2:
            sl = sl[1:]
        raw = vol.read_raw(sl)
        lab = np.asarray(vol.labels[sl]).astype(np.int64)
        if vol.spatial_ndim == 2:
            raw, lab = np.expand_dims(raw, raw.ndim - 2), lab[None]  # the z axis, after any channel axis
        if vol.keep_ids is not None:
            lab = np.where(np.isin(lab, vol.keep_ids), lab, 0)
        return resample_patch(raw, lab, self.downsample, self.model_shape)

    def _bounds(self, vol: TrainingVolume):
        z0, z1 = vol.z_range or (0, vol.shape3d[0])
        return (z0, 0, 0), (z1, *vol.shape3d[1:])

    def _random_start(self, vol: TrainingVolume) -> list[int]:
        lo, hi = self._bounds(vol)
        return [int(self.rng.integers(a, b - r + 1)) for a, b, r in zip(lo, hi, self.read_shape)]

    def _start_around(self, vol: TrainingVolume, anchor) -> list[int]:
        """A window of read_shape that holds ``anchor`` at a random position (clipping
        to the volume keeps it inside: anchor - offset < lo means anchor < lo + read)."""
        lo, hi = self._bounds(vol)
        return [int(np.clip(a - self.rng.integers(m, max(m + 1, r - m)), l, h - r))
                for a, r, m, l, h in zip(anchor, self.read_shape, self.read_margin, lo, hi)]

    def sample(self, around_object: bool | None = None):
        """One patch: around an annotated object, or (``around_object`` False, or by
        default with probability ``random_share``) anywhere."""
        if around_object is None:
            around_object = self.rng.random() >= self.random_share
        if not around_object or not len(self._objects):
            if around_object:
                raise SpocoInputError("no annotated object in the training sections to sample patches around")
            vol = self.volumes[self.rng.integers(len(self.volumes))]
            raw, lab = self._read(vol, self._random_start(vol))
        else:
            for _ in range(MAX_RESAMPLE):
                i, first, count = self._objects[self.rng.integers(len(self._objects))]
                anchor = self._anchors[i][first + self.rng.integers(count)]
                vol = self.volumes[i]
                raw, lab = self._read(vol, self._start_around(vol, anchor))
                # Resampling can drop a sliver of an object from the model grid: try another.
                if lab.any():
                    break
        if self.dims == 2:
            raw, lab = raw[..., 0, :, :], lab[0]
        return raw, lab

    def batch(self, size: int):
        pairs = [self.sample() for _ in range(size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def resample_patch(raw: np.ndarray, lab: np.ndarray, downsample: Sequence[float], shape: Sequence[int]):
    """A read window (input voxels) on the model grid of ``shape``: block mean and
    strided labels for integer factors, linear zoom and nearest labels otherwise (a
    leading channel axis of ``raw`` is resampled channel by channel)."""
    if raw.ndim > lab.ndim:
        pairs = [resample_patch(c, lab, downsample, shape) for c in raw]
        return np.stack([r for r, _ in pairs]), pairs[0][1]
    if all(isinstance(d, int) for d in downsample):
        raw, lab = downsample_raw(raw, downsample), downsample_labels(lab, downsample)
        return raw, lab
    from scipy import ndimage
    zoom = [m / r for m, r in zip(shape, raw.shape)]
    return (ndimage.zoom(raw, zoom, order=1, mode="nearest").astype(np.float32),
            ndimage.zoom(lab, zoom, order=0, mode="nearest"))


def model_grid_shape(shape: Sequence[int], downsample: Sequence[float]) -> list[int]:
    """The shape a window of ``shape`` input voxels takes on the model grid (to_model_grid)."""
    ds = tuple(int(d) if float(d).is_integer() else float(d) for d in downsample)
    return [n // d if isinstance(d, int) else max(1, int(round(n / d))) for n, d in zip(shape, ds)]


def to_model_grid(raw: np.ndarray, lab: np.ndarray, downsample: Sequence[float]):
    """A whole window (3D, input voxels) on the model grid, as ``resample_patch``."""
    ds = tuple(int(d) if float(d).is_integer() else float(d) for d in downsample)
    return resample_patch(raw, lab, ds, model_grid_shape(lab.shape, ds))


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
