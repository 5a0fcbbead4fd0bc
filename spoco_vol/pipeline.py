"""Segmenting one in-memory array (a block, or a small volume) and the helpers around it:
resampling to the model's voxel size and back, output checks, OME-Zarr metadata.
The blockwise engine (spoco_vol/blockwise) calls ``predict_array`` and
``labels_from_embeddings`` once per block.
"""
from __future__ import annotations

import os
import time
from typing import NamedTuple, Sequence

import numpy as np
import zarr
from scipy import ndimage

from . import intensity, io, transforms
from .bundled import model_path
from .checkpoint import Checkpoint
from .clustering import cluster_embeddings
from .errors import SpocoInputError
from .inference import for_inference, predict_embeddings, predict_foreground, read_window, resolve_device
from .model import receptive_halo
from .segmentation import segment_embeddings

BUNDLED_MODEL = model_path(None)  # the default model (spoco_vol.bundled)
RESAMPLE_TOLERANCE = 0.2  # voxel sizes within 20% of the model's are used as they are
INTEGER_SNAP = 0.02       # a downsampling within 2% of an integer factor is that factor (block mean)


def model_scale(input_vs: Sequence[float] | None, model_vs: Sequence[float] | None,
                spatial_axes: Sequence[int], ndim: int | None = None) -> list[float]:
    """Zoom factor per axis that brings the input to the model's voxel size (1 = as is)."""
    ndim = ndim or (len(input_vs) if input_vs else max(spatial_axes) + 1)
    scale = [1.0] * ndim
    if not input_vs or not model_vs:
        return scale
    for a, mv in zip(spatial_axes, model_vs[-len(spatial_axes):]):
        ratio = input_vs[a] / mv
        if abs(ratio - 1) > RESAMPLE_TOLERANCE:
            factor = round(1 / ratio)
            # 126.8 nm data for a 255.1 nm model: 2x block means, as in training, not a 0.497 zoom
            scale[a] = 1 / factor if factor >= 2 and abs(1 / ratio - factor) <= INTEGER_SNAP * factor else ratio
    return scale


def input_scale(input_vs: Sequence[float] | None, ckpt: Checkpoint, spatial_axes: Sequence[int],
                ndim: int | None = None) -> list[float]:
    """model_scale for this checkpoint. Where neither the input nor the model has a voxel
    size, the model's training downsampling applies (input pixels per model pixel): such a
    model never saw pixels of the data's own size, and an input without metadata is taken
    to be at the resolution of the data it was trained on."""
    ds = ckpt.inference.downsample
    if input_vs or ckpt.voxel_size or not ds:
        return model_scale(input_vs, ckpt.voxel_size, spatial_axes, ndim)
    scale = [1.0] * (ndim or max(spatial_axes) + 1)
    for a, d in zip(spatial_axes, ds[-len(spatial_axes):]):
        scale[a] = 1.0 / d
    return scale


def resample_raw(raw: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """To the model grid: block mean for integer downsampling, linear zoom otherwise."""
    if all(s == 1 for s in scale):
        return raw
    inv = [1 / s for s in scale]
    if all(abs(i - round(i)) < 1e-6 and round(i) >= 1 for i in inv):
        from .data import downsample_raw
        f = [int(round(i)) for i in inv]
        pad = [(0, (-n) % k) for n, k in zip(raw.shape, f)]
        return downsample_raw(np.pad(raw, pad, mode="edge"), f)
    return ndimage.zoom(raw, scale, order=1)


def restore_labels(labels: np.ndarray, shape: Sequence[int], scale: Sequence[float] | None = None,
                   region: Sequence[slice] | None = None) -> np.ndarray:
    """Nearest-neighbour labels back on the input grid of ``shape`` (``scale`` as given to
    resample_raw: integer downsampling then maps each input voxel to its own block);
    only ``region`` of that grid (slices), if given."""
    if tuple(labels.shape) == tuple(shape):
        return labels if region is None else labels[tuple(region)]
    region = tuple(region) if region is not None else tuple(slice(0, n) for n in shape)
    scale = scale or [None] * len(shape)
    factors = [1 / s if s else None for s in scale]
    if all(f is not None and abs(f - round(f)) < 1e-6 and round(f) >= 1 for f in factors):
        # integer downsampling: repeat each model voxel f times and crop (4x faster than a gather)
        fs = [int(round(f)) for f in factors]
        out = labels[tuple(slice(r.start // f, -(-r.stop // f)) for r, f in zip(region, fs))]
        for a, f in enumerate(fs):
            if f > 1:
                out = out.repeat(f, axis=a)
        return out[tuple(slice(r.start - r.start // f * f, r.stop - r.start // f * f) for r, f in zip(region, fs))]
    return labels[np.ix_(*(model_grid_index(np.arange(r.start, r.stop), n, m, s)
                           for r, n, m, s in zip(region, shape, labels.shape, scale)))]


def model_grid_index(i: np.ndarray, n: int, m: int, scale: float | None = None) -> np.ndarray:
    """Model-grid index of input index ``i`` on an axis of n input and m model voxels:
    block membership i // f for integer downsampling by f = 1/scale, nearest otherwise."""
    if scale:
        f = 1 / scale
        if abs(f - round(f)) < 1e-6 and round(f) >= 1:
            return np.minimum(i // int(round(f)), m - 1)
    return np.minimum((i * (m / n)).astype(np.int64), m - 1)


LABELS_NAME = "spoco"  # the labels' name inside an OME-Zarr image (image.zarr/labels/spoco)
PYRAMID_MIN = 256        # the label pyramid stops when every axis is at most this long
PYRAMID_LEVELS = 8


def default_output_path(input_path: str) -> str:
    """Into the image's own labels group (``image.zarr/labels/spoco``, the OME-Zarr
    labels layout) when the input is an OME-Zarr image; else ``<store>_labels.zarr``
    beside it, with the array's path in the name (``vol.zarr/raw`` ->
    ``vol_raw_labels.zarr``), so that two arrays of one store do not collide."""
    image = io.ome_image(input_path)
    if image is not None:
        return os.path.join(image, "labels", LABELS_NAME)
    root, inner = io.split_volume_path(input_path)
    stem = root.rstrip(os.sep).removesuffix(".zarr")
    return stem + ("_" + inner.strip("/").replace("/", "_") if inner else "") + "_labels.zarr"


def labels_of_image(output: str, input_path: str) -> str | None:
    """The OME-Zarr image whose labels group ``output`` is (``image/labels/NAME``), or None."""
    image = io.ome_image(input_path)
    out = os.path.abspath(output)
    if image is not None and os.path.dirname(out) == os.path.join(os.path.abspath(image), "labels") \
            and os.path.basename(out) not in ("", ".", ".."):
        return image
    return None


def check_output_path(output: str, input_path: str, overwrite: bool) -> None:
    out = os.path.abspath(output)
    inp = os.path.abspath(io.store_root(input_path))
    inside_image = labels_of_image(output, input_path) is not None
    if (out == inp or out.startswith(inp + os.sep)) and not inside_image:
        raise SpocoInputError(f"output {output} lies inside the input {input_path} (only an OME-Zarr image's "
                              "labels/NAME may)")
    if inp.startswith(out + os.sep):
        raise SpocoInputError(f"output {output} contains the input {input_path}")
    if os.path.exists(out) and not overwrite:
        raise SpocoInputError(f"output {output} exists (use --overwrite to replace it)")
    if os.path.exists(out) and not io.is_zarr_store(out):
        raise SpocoInputError(f"output {output} exists and is not a zarr store: not replacing it")
    partial = out + ".partial"  # the work directory, removed before a run
    if inp == partial or inp.startswith(partial + os.sep):
        raise SpocoInputError(f"input {input_path} lies in the output's work directory {partial}")
    parent = os.path.dirname(out) or "."
    if inside_image:
        parent = os.path.dirname(parent)  # the labels group is made when the run starts
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise SpocoInputError(f"cannot write output {output}: {parent} is not a writable directory")


def label_pyramid(shape: Sequence[int], voxel_size: Sequence[float] | None,
                  image_scales: Sequence[Sequence[float]] | None = None) -> list[list[int]]:
    """Downsampling factors of each level of the labels' pyramid (level 0 first),
    relative to the input grid. An OME-Zarr input's own levels where they are integer
    downsamplings of its level 0 (so the labels overlay each level of the image);
    otherwise halving, per level, the axes whose voxels are finest (an axis thicker than
    twice the finest waits: thick EM sections keep z until x and y catch up), until no
    axis is longer than PYRAMID_MIN."""
    ndim = len(shape)
    if image_scales and len(image_scales) > 1:
        base = image_scales[0]
        levels = [[1] * ndim]
        for sc in image_scales[1:]:
            f = [s / b for s, b in zip(sc[-ndim:], base[-ndim:])]
            if not all(abs(x - round(x)) < 1e-6 and round(x) >= 1 for x in f):
                break
            levels.append([int(round(x)) for x in f])
        if len(levels) > 1:
            return levels
    vs = list(voxel_size) if voxel_size else [1.0] * ndim
    levels = [[1] * ndim]
    while len(levels) < PYRAMID_LEVELS:
        f = levels[-1]
        cur = [-(-n // x) for n, x in zip(shape, f)]
        if max(cur) <= PYRAMID_MIN:
            break
        size = [v * x for v, x in zip(vs, f)]
        finest = min(s for s, c in zip(size, cur) if c > 1)
        step = [2 if c > 1 and s < 2 * finest else 1 for s, c in zip(size, cur)]
        levels.append([x * k for x, k in zip(f, step)])
    return levels


def write_ome_metadata(group: zarr.Group, ndim: int, voxel_size: Sequence[float] | None, attrs: dict,
                       levels: Sequence[Sequence[int]] = ((1, 1, 1),), zarr_format: int = 2,
                       source_image: bool = False) -> None:
    """OME-Zarr multiscales of a label image (datasets "0", "1", ... at ``levels``'
    downsampling factors), plus our run report: version 0.4 in a zarr v2 group, 0.5
    (under "ome") in a zarr v3 group. Without a voxel size the axes carry no unit and the
    scale counts voxels: no made-up physical size. ``source_image``: the labels live in
    an image's labels group (``source`` points back to it)."""
    axes = ["z", "y", "x"][-ndim:]
    vs = list(voxel_size) if voxel_size else [1.0] * ndim
    unit = {"unit": "nanometer"} if voxel_size else {}
    multiscale = {
        "name": "labels",
        "axes": [{"name": a, "type": "space", **unit} for a in axes],
        "datasets": [{"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [float(v * f) for v, f in zip(vs, list(fac)[-ndim:])]}]}
            for k, fac in enumerate(levels)],
    }
    # "image-label" marks the image as a label image: OME-Zarr readers (ome-zarr-py, and
    # napari-ome-zarr on top of it) then open it as a labels layer, not as intensities.
    label = {"source": {"image": "../../"}} if source_image else {}
    if zarr_format == 2:
        group.attrs["multiscales"] = [{"version": "0.4", **multiscale}]
        group.attrs["image-label"] = {"version": "0.4", **label}
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale], "image-label": label}
    group.attrs["spoco_vol"] = attrs


def labels_group(image: str, zarr_format: int) -> str:
    """The ``labels`` group of an OME-Zarr image (made if missing): its directory."""
    path = os.path.join(image, "labels")
    if not io.is_zarr_store(path):
        zarr.open_group(path, mode="a", zarr_format=zarr_format)
    return path


def register_label(image: str, name: str, zarr_format: int) -> None:
    """List ``name`` in the image's labels group (the OME-Zarr labels layout)."""
    group = zarr.open_group(labels_group(image, zarr_format), mode="r+")
    if zarr_format == 2:
        names = list(group.attrs.get("labels", []))
        group.attrs["labels"] = names + ([name] if name not in names else [])
    else:
        ome = dict(group.attrs.get("ome", {"version": "0.5"}))
        names = list(ome.get("labels", []))
        ome["labels"] = names + ([name] if name not in names else [])
        group.attrs["ome"] = ome


class ArrayPrediction(NamedTuple):
    """What the networks of a checkpoint make of an array, on the model grid."""
    embeddings: np.ndarray                 # (E, *model-grid shape) float32
    scale: list                            # zoom from the input grid to the model grid
    foreground: np.ndarray | None          # the foreground classifier's object probabilities
    momentum: np.ndarray | None = None     # the momentum network's embeddings (consistency clustering)


def model_grid_image(raw: np.ndarray, ckpt: Checkpoint, scale: Sequence[float],
                     intensity_mapping: dict | None = None) -> np.ndarray:
    """What the networks see of ``raw`` (channel-first with several channels): mapped
    onto the model's intensity range (spoco_vol.intensity; None: as it is), resampled by
    ``scale`` to the model grid, normalised."""
    mapped = intensity.apply(raw, intensity_mapping)
    multi = ckpt.in_channels > 1
    resampled = np.stack([resample_raw(c, scale) for c in mapped]) if multi else resample_raw(mapped, scale)
    return transforms.normalize(resampled, ckpt.normalization)


def predict_array(raw: np.ndarray, ckpt: Checkpoint, *, input_voxel_size=None, device="auto",
                  timings: dict | None = None, net=None, tta: bool | None = None, foreground_net=None,
                  intensity_mapping: dict | None = None, momentum_net=None,
                  mask: np.ndarray | None = None,
                  volume_borders: Sequence[tuple[bool, bool]] | None = None) -> ArrayPrediction:
    """The networks' output for an in-memory 2D/3D array (ArrayPrediction): the
    embeddings, the zoom from the input grid to the model grid, and the object
    probabilities of the checkpoint's foreground classifier (None without one). A 2D
    model predicts section by section. ``tta``: test-time augmentation of every network
    [default: as the checkpoint was calibrated]. ``net``/``foreground_net``: the
    checkpoint's networks, if already built. ``momentum_net``: also predict with the
    momentum network g (consistency clustering). ``intensity_mapping``: the input
    volume's mapping onto the model's intensity range (spoco_vol.intensity; None: as it is).
    ``mask``: a foreground mask of the input's spatial shape (e.g. the ground truth's):
    pixels outside it are background, as if a perfect classifier had called them so
    (with a classifier: outside the mask, or called background by it).
    ``volume_borders``: ``raw`` is a block read with a halo of at least the networks'
    field of view: per model axis, (low side, high side) True where the block meets the
    volume's border. Only there is context added (reflected, as for the whole volume);
    elsewhere the halo is the context, so the networks predict no pixel twice over
    [default: ``raw`` is the whole volume]."""
    timings = timings if timings is not None else {}
    dims, channels = ckpt.dims, ckpt.in_channels
    io.validate_volume(raw, "input", channels=channels)
    ndim = raw.ndim - (channels > 1)  # spatial
    if dims > ndim:
        raise SpocoInputError(f"the model is {dims}D but the input is {ndim}D")
    io.check_finite(raw, "input")
    spatial_axes = list(range(ndim - dims, ndim))
    scale = input_scale(input_voxel_size, ckpt, spatial_axes, ndim)
    t = time.perf_counter()
    image = model_grid_image(raw, ckpt, scale, intensity_mapping)
    timings["read"] = timings.get("read", 0) + time.perf_counter() - t
    t = time.perf_counter()
    net = net if net is not None else for_inference(ckpt.network())
    if foreground_net is None and ckpt.has_foreground:
        foreground_net = for_inference(ckpt.foreground_network())
    dev = resolve_device(device)
    tta = ckpt.inference.uses_tta(tta)
    grid = image.shape[1:] if channels > 1 else image.shape  # the model grid
    sections = [image] if dims == ndim else [image[..., z, :, :] for z in range(grid[0])]
    embeddings = np.zeros((net.embedding_dim, *grid), np.float32)
    momentum = None if momentum_net is None else np.zeros_like(embeddings)
    probabilities = None if foreground_net is None else np.zeros(grid, np.float32)
    pad = None
    if volume_borders is not None:
        context = [-(-h // m) * m for h, m in zip(receptive_halo(net), net.shape_multiple)]
        pad = [(c if lo else 0, c if hi else 0) for c, (lo, hi) in zip(context, volume_borders)]
    for z, sec in enumerate(sections):
        at = (slice(None),) if dims == ndim else (slice(None), z)
        if pad is not None:  # context at the volume's border only, cropped off again below
            n = sec.shape[sec.ndim - dims:]
            sec = read_window(sec, [-lo for lo, _ in pad], [k + hi for k, (_, hi) in zip(n, pad)])
        crop = (slice(None),) + tuple(slice(lo, lo + k) for k, (lo, _) in zip(n, pad)) if pad else (slice(None),)
        embeddings[at] = predict_embeddings(net, sec, device=dev, tta=tta, image_context=pad is None)[crop]
        if momentum_net is not None:
            momentum[at] = predict_embeddings(momentum_net, sec, device=dev, tta=tta,
                                              image_context=pad is None)[crop]
        if foreground_net is not None:
            probabilities[at[1:]] = predict_foreground(foreground_net, sec, device=dev, tta=tta,
                                                       image_context=pad is None)[crop[1:]]
    if mask is not None:  # on the model grid, nearest (integer downsampling: the block's majority)
        inside = mask_on_model_grid(np.asarray(mask) != 0, grid, scale)
        probabilities = inside.astype(np.float32) if probabilities is None else probabilities * inside
    timings["predict"] = timings.get("predict", 0) + time.perf_counter() - t
    return ArrayPrediction(embeddings, scale, probabilities, momentum)


def mask_on_model_grid(mask: np.ndarray, grid: Sequence[int], scale: Sequence[float]) -> np.ndarray:
    """A boolean mask of the input grid on the model grid of shape ``grid``: with
    integer downsampling a model pixel is inside when most of its input voxels are, else
    the nearest input voxel decides."""
    factors = [1 / s for s in scale]
    if all(abs(f - round(f)) < 1e-6 and round(f) >= 1 for f in factors) and any(round(f) > 1 for f in factors):
        from .data import downsample_raw
        f = [int(round(x)) for x in factors]
        pad = [(0, (-n) % k) for n, k in zip(mask.shape, f)]
        mean = downsample_raw(np.pad(mask.astype(np.float32), pad, mode="edge"), f)
        return mean[tuple(slice(0, g) for g in grid)] >= 0.5
    if tuple(mask.shape) == tuple(grid):
        return mask
    # the input voxel at each model pixel's centre
    return mask[np.ix_(*(np.minimum(((np.arange(g) + 0.5) * (n / g)).astype(np.int64), n - 1)
                         for g, n in zip(grid, mask.shape)))]


def labels_from_embeddings(embeddings: np.ndarray, ckpt: Checkpoint, input_shape: Sequence[int],
                           scale: Sequence[float], *, strides: Sequence[int] | None = None,
                           timings: dict | None = None, region: Sequence[slice] | None = None,
                           foreground: np.ndarray | None = None, clustering: str = "mws",
                           momentum: np.ndarray | None = None) -> np.ndarray:
    """Embeddings on the model grid -> labels on the input grid of ``input_shape`` (only
    ``region`` of it, if given): affinities, Mutex Watershed and clean-up (or another
    ``clustering``, spoco_vol.clustering), per section for a 2D model on a 3D input, with
    ids unique over the sections. ``foreground``: the foreground classifier's
    probabilities on the model grid, ``momentum``: the momentum network's embeddings
    (consistency clustering), both as predict_array gives them."""
    timings = timings if timings is not None else {}
    inf = ckpt.inference
    strides = strides or inf.strides
    per_section = ckpt.dims < len(input_shape)
    out = np.zeros(embeddings.shape[1:], dtype=np.uint64)
    next_id = 0
    for z in range(out.shape[0] if per_section else 1):
        emb = embeddings[:, z] if per_section else embeddings
        fg = foreground if foreground is None or not per_section else foreground[z]
        if clustering == "mws":
            lab = segment_embeddings(emb, inf.offsets, ckpt.delta_d, strides=strides,
                                     background_embedding=inf.background_embedding,
                                     background_radius=inf.background_radius, min_size=inf.min_size,
                                     foreground=fg, foreground_threshold=inf.foreground_threshold, timings=timings)
        else:
            t = time.perf_counter()
            g = momentum if momentum is None or not per_section else momentum[:, z]
            lab = cluster_embeddings(emb, clustering, delta_v=ckpt.delta_v, delta_d=ckpt.delta_d,
                                     min_size=inf.min_size, background_embedding=inf.background_embedding,
                                     background_radius=inf.background_radius, foreground=fg,
                                     foreground_threshold=inf.foreground_threshold, g_embeddings=g)
            timings["watershed"] = timings.get("watershed", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        lab[lab > 0] += np.uint64(next_id)  # per-section objects get ids unique over the volume
        next_id = int(lab.max()) if lab.max() > 0 else next_id
        if per_section:
            out[z] = lab
        else:
            out[...] = lab
        timings["write"] = timings.get("write", 0) + time.perf_counter() - t  # assembling the labels
    t = time.perf_counter()
    labels = restore_labels(out, input_shape, scale, region)
    timings["write"] = timings.get("write", 0) + time.perf_counter() - t  # back to the input grid
    return labels


def segment_array(raw: np.ndarray, ckpt: Checkpoint, *, input_voxel_size=None, device="auto",
                  strides: Sequence[int] | None = None, timings: dict | None = None,
                  net=None, keep_embeddings: bool = False, region: Sequence[slice] | None = None,
                  tta: bool | None = None, intensity_mapping: dict | None = None, clustering: str = "mws"):
    """Segment an in-memory 2D/3D array with a checkpoint; labels on the input grid.

    With ``keep_embeddings`` also returns the embeddings on the model grid,
    (E, *model-grid shape), for callers that need affinities at block faces.
    ``region``: only these slices of the input grid are returned (a block keeps its core
    and the planes it stitches with, not its whole halo).
    ``intensity_mapping``: as for predict_array [default: measured on ``raw`` by the
    rules of spoco_vol.intensity].
    ``clustering``: mws (the Mutex Watershed), or hdbscan, meanshift, consistency
    (spoco_vol.clustering; consistency needs a checkpoint with its momentum network).
    """
    if intensity_mapping is None:
        intensity_mapping = intensity.volume_mapping(raw, ckpt.normalization)
    timings = timings if timings is not None else {}
    pred = predict_array(raw, ckpt, input_voxel_size=input_voxel_size, device=device, timings=timings, net=net,
                         tta=tta, intensity_mapping=intensity_mapping,
                         momentum_net=momentum_network(ckpt) if clustering == "consistency" else None)
    shape = raw.shape[1:] if ckpt.in_channels > 1 else raw.shape
    labels = labels_from_embeddings(pred.embeddings, ckpt, shape, pred.scale, strides=strides, timings=timings,
                                    region=region, foreground=pred.foreground, clustering=clustering,
                                    momentum=pred.momentum)
    return (labels, pred.embeddings) if keep_embeddings else labels


def momentum_network(ckpt: Checkpoint):
    """The checkpoint's momentum network, which consistency clustering needs."""
    net = ckpt.momentum_network()
    if net is None:
        raise SpocoInputError("--clustering consistency needs the momentum network g of the consistency term, which "
                              "this checkpoint does not hold (train with --consistency-weight > 0)")
    return for_inference(net)
