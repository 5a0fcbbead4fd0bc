"""Opening and writing zarr volumes (zarr format 2 and 3), and their voxel sizes.

A volume is named by a path: ``vol.zarr`` (an array, a group holding exactly one array,
or an OME-Zarr multiscale image, of which level 0 is taken) or ``vol.zarr/path/in/group``.
Arrays are returned unread: callers slice them, so a volume never has to fit in memory.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import zarr

from .errors import SpocoInputError


def split_volume_path(path: str) -> tuple[str, str]:
    """``a/b.zarr/c/d`` -> (``a/b.zarr``, ``c/d``): the store and the path inside it."""
    return _split_store_path(path)


def _split_store_path(path: str) -> tuple[str, str]:
    """Split ``a/b.zarr/c/d`` into (``a/b.zarr``, ``c/d``): the outermost existing zarr root."""
    path = os.path.normpath(os.path.expanduser(os.fspath(path)))
    parts = path.split(os.sep)
    for i in range(1, len(parts) + 1):
        head = os.sep.join(parts[:i]) or os.sep
        if _is_zarr_node(head):
            return head, "/".join(parts[i:])
    return path, ""


def store_root(path: str | os.PathLike) -> str:
    """The zarr store a volume path lives in: ``a/vol.zarr/raw`` -> ``a/vol.zarr``."""
    return _split_store_path(os.fspath(path))[0]


def is_zarr_store(path: str) -> bool:
    """A directory holding zarr (v2 or v3) metadata."""
    return _is_zarr_node(path)


def _is_zarr_node(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("zarr.json", ".zarray", ".zgroup"))


def _only_array(group: zarr.Group, where: str) -> zarr.Array:
    """The array a group stands for: OME-Zarr level 0, or its single array."""
    ms = _multiscales(group)
    if ms:
        return group[ms[0]["datasets"][0]["path"]]
    arrays = list(group.array_keys())
    if len(arrays) == 1:
        return group[arrays[0]]
    if not arrays:
        raise SpocoInputError(f"{where} is a zarr group without arrays; name one as {where}/NAME")
    raise SpocoInputError(f"{where} holds several arrays ({', '.join(sorted(arrays))}); "
                          f"name one as {where}/NAME")


def open_volume(path: str | os.PathLike, what: str = "input") -> zarr.Array:
    """Open a zarr array read-only, with one clear error for every way the path can be wrong."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SpocoInputError(f"{what} not found: {path}")
    root, inner = _split_store_path(path)
    if not _is_zarr_node(root):
        raise SpocoInputError(f"{what} is not a zarr array or group: {path}")
    try:
        node = zarr.open(root, mode="r", path=inner) if inner else zarr.open(root, mode="r")
    except Exception as exc:
        raise SpocoInputError(f"cannot open {what} {path}: {exc}") from None
    if isinstance(node, zarr.Group):
        node = _only_array(node, path)
    return node


def validate_volume(arr, what: str = "input", *, integer: bool = False,
                    dims: Sequence[int] = (2, 3), channels: int = 1) -> None:
    """Shape and dtype checks that need no data read. ``channels`` > 1: the array holds
    that many channels on its first axis, before the 2D or 3D spatial axes."""
    spatial = arr.ndim - (channels > 1)
    if channels > 1 and (arr.ndim < 3 or arr.shape[0] != channels):
        raise SpocoInputError(f"{what} must hold {channels} channels on its first axis, (C, Y, X) or "
                              f"(C, Z, Y, X), got shape {tuple(arr.shape)}")
    if spatial not in dims:
        raise SpocoInputError(f"{what} must be {' or '.join(f'{d}D' for d in dims)}, got {spatial}D "
                              f"shape {tuple(arr.shape)}")
    if any(s == 0 for s in arr.shape):
        raise SpocoInputError(f"{what} is empty (shape {tuple(arr.shape)})")
    kind = np.dtype(arr.dtype).kind
    if integer and kind not in "ui":
        raise SpocoInputError(f"{what} must hold integer labels, got dtype {arr.dtype}")
    if not integer and kind not in "uif":
        raise SpocoInputError(f"{what} must be numeric (integer or float), got dtype {arr.dtype}")


def format_voxel_size(vs) -> str:
    """``[50, 9.2, 9.2]`` -> ``50 x 9.2 x 9.2 nm``; None -> ``unknown``."""
    return "unknown" if vs is None else " x ".join(f"{v:g}" for v in vs) + " nm"


def check_finite(block: np.ndarray, what: str, where: str = "") -> None:
    if np.dtype(block.dtype).kind == "f" and not np.isfinite(block).all():
        raise SpocoInputError(f"{what} contains NaN or inf{(' in ' + where) if where else ''}")


def _multiscales(group) -> list | None:
    return group.attrs.get("multiscales") or group.attrs.get("ome", {}).get("multiscales")


def _scale_of(ms: list, dataset: str, ndim: int) -> list[float] | None:
    """Scale of one OME-Zarr dataset, converted to nm where the axes say micrometer."""
    axes = [a for a in ms[0].get("axes", []) if isinstance(a, dict)][-ndim:]
    if axes and not any(a.get("unit") for a in axes):
        return None  # a scale in voxels: the physical size is unknown
    factor = 1000.0 if any(a.get("unit") == "micrometer" for a in axes) else 1.0
    for ds in ms[0]["datasets"]:
        if ds["path"] == dataset:
            for t in ds.get("coordinateTransformations", []):
                if t.get("type") == "scale":
                    return [float(x) * factor for x in t["scale"]][-ndim:]
    return None


def read_voxel_size(path: str | os.PathLike) -> list[float] | None:
    """Voxel size (nm, array axis order) from OME-Zarr or a ``voxel_size``-like attribute.

    ``None`` when the volume does not say; callers then need ``--voxel-size``.
    """
    arr = open_volume(path)
    for key in ("voxel_size", "resolution", "resolution_nm"):
        if key in arr.attrs and len(arr.attrs[key]) == arr.ndim:
            return [float(x) for x in arr.attrs[key]]
    root, inner = _split_store_path(os.fspath(path))
    # The array's own path inside the store tells which group could hold its OME metadata.
    array_path = arr.path
    parent = "/".join(array_path.split("/")[:-1])
    try:
        group = zarr.open_group(root, mode="r", path=parent) if parent else zarr.open_group(root, mode="r")
    except Exception:
        return None
    ms = _multiscales(group)
    return _scale_of(ms, array_path.split("/")[-1], arr.ndim) if ms else None


def zarr_format(arr) -> int:
    """2 or 3: the zarr format an opened array is stored in."""
    return int(getattr(arr.metadata, "zarr_format", 3))


def ome_image(path: str | os.PathLike) -> str | None:
    """The directory of the OME-Zarr multiscale image a volume path opens (the group, or
    the group of the level-0 array named), or None for a plain zarr array."""
    path = os.fspath(path)
    root, inner = _split_store_path(path)
    try:
        node = zarr.open(root, mode="r", path=inner) if inner else zarr.open(root, mode="r")
    except Exception:
        return None
    if isinstance(node, zarr.Group):
        return os.path.normpath(path) if _multiscales(node) else None
    parent = "/".join(node.path.split("/")[:-1])
    try:
        group = zarr.open_group(root, mode="r", path=parent) if parent else zarr.open_group(root, mode="r")
    except Exception:
        return None
    ms = _multiscales(group)
    if ms and node.path.split("/")[-1] == ms[0]["datasets"][0]["path"]:
        return os.path.normpath(os.path.join(root, *parent.split("/"))) if parent else os.path.normpath(root)
    return None


def ome_scales(image_dir: str) -> list[list[float]] | None:
    """The scale of each level of an OME-Zarr image (as stored), level 0 first."""
    group = zarr.open_group(image_dir, mode="r")
    ms = _multiscales(group)
    if not ms:
        return None
    out = []
    for ds in ms[0]["datasets"]:
        scale = next((t["scale"] for t in ds.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
        if scale is None:
            return None
        out.append([float(x) for x in scale])
    return out


def create_array(path: str, data_or_shape, dtype=None, chunks=None, attrs: dict | None = None,
                 overwrite: bool = False) -> zarr.Array:
    """Create a zarr (format 3) array at ``path`` (``store.zarr`` or ``store.zarr/name``)."""
    if isinstance(data_or_shape, np.ndarray):
        shape, dtype = data_or_shape.shape, data_or_shape.dtype
    else:
        shape = tuple(data_or_shape)
    chunks = chunks or tuple(min(s, 256) for s in shape)
    root, inner = _split_zarr_suffix(path)
    if inner:
        group = zarr.open_group(root, mode="a")
        arr = group.create_array(inner, shape=shape, dtype=dtype, chunks=chunks, overwrite=overwrite)
    else:
        arr = zarr.create_array(root, shape=shape, dtype=dtype, chunks=chunks, overwrite=overwrite)
    if isinstance(data_or_shape, np.ndarray):
        arr[...] = data_or_shape
    if attrs:
        arr.attrs.update(attrs)
    return arr


def _split_zarr_suffix(path: str) -> tuple[str, str]:
    """``x/vol.zarr/raw`` -> (``x/vol.zarr``, ``raw``): split at the last ``.zarr`` component."""
    parts = os.path.normpath(path).split(os.sep)
    idx = max((i for i, p in enumerate(parts) if p.endswith(".zarr")), default=None)
    if idx is None or idx == len(parts) - 1:
        return path, ""
    return os.sep.join(parts[:idx + 1]), "/".join(parts[idx + 1:])
