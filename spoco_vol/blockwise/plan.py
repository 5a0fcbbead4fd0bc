"""Planning a blockwise run: every check, default and derived setting, before anything
is written.

``build_plan`` reads the input's metadata and the checkpoint once, validates every
setting and returns a frozen ``SegmentPlan``. The plan is all a block task needs (it is
sent to the workers once per run), and its ``fingerprint`` (the fields that determine
the labels) is hashed into the run hash that resume and "already complete" compare.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

from .. import __version__, bundled, checkpoint, intensity, io
from ..affinities import is_direct
from ..blocks import BlockGrid, parse_roi
from ..clustering import METHODS
from ..errors import SpocoInputError, warn
from ..pipeline import check_output_path, default_output_path, label_pyramid, input_scale, labels_of_image
from ..stitching import LINK_OVERLAP

STITCH_DEPTH = 16    # input planes of halo agreement per face
AFFINITY_DTYPES = ("float16", "uint8")  # of saved affinities; uint8 holds round(255 w)


BLOCK_CORE_2D = 768  # model pixels per side of a 2D model's default block core
BLOCK_ROUND = 256    # input voxels: default block sides are multiples of this


def default_block_shape(shape: Sequence[int], model_dims: int, scale: Sequence[float] | None = None) -> list[int]:
    """8 sections of BLOCK_CORE_2D x BLOCK_CORE_2D model pixels for a 2D model (input
    voxels: divided by the zoom to the model grid, rounded up to BLOCK_ROUND), 64 x 256 x
    256 voxels for a 3D one; never more than the volume. Cores this large keep the halo
    the networks also predict (field of view + longest offset, 78 model pixels per side
    for the bundled model) below half the core's pixels: 1.46 model pixels predicted per
    pixel kept, against 2.6 with cores of 256 (benchmarks/RESULTS.md, "Cost of a voxel")."""
    if model_dims == 2:
        zoom = list(scale[-2:]) if scale is not None else [1.0, 1.0]
        side = [int(-(-np.ceil(BLOCK_CORE_2D / z) // BLOCK_ROUND) * BLOCK_ROUND) for z in zoom]
        base = [8, *side]
    else:
        base = [64, 256, 256]
    return [min(s, b) for s, b in zip(shape, base[-len(shape):])]


def required_halo(model: checkpoint.Checkpoint, input_ndim: int, scale: Sequence[float]) -> list[int]:
    """Context (input voxels per side) a block needs: the U-Net's field of view plus the
    longest affinity offset, converted from model pixels to input voxels."""
    dims = model.dims
    reach = [max(abs(o[a]) for o in model.inference.offsets) for a in range(dims)]
    model_halo = [h + r for h, r in zip(model.receptive_halo, reach)]
    halo = [0] * (input_ndim - dims) + model_halo  # a 2D model needs no context across sections
    return [int(np.ceil(h / s)) if s else h for h, s in zip(halo, scale)]


def read_alignment(model: checkpoint.Checkpoint, input_ndim: int, scale: Sequence[float]) -> list[int]:
    """Input voxels on whose multiples a read ROI must start so that the block sees the
    same pooling grid (and resampling grid) as the whole volume."""
    align = [1] * (input_ndim - model.dims) + list(model.shape_multiple)
    for a, s in enumerate(scale):
        f = 1 / s
        if abs(f - round(f)) < 1e-6:  # integer downsampling keeps an exact grid
            align[a] *= int(round(f))
    return align


def embedding_factors(scale: Sequence[float]) -> list[int] | None:
    """Input voxels per model voxel along each axis, or None if the model grid is not an
    integer downsampling of the input grid (then saved embeddings would not tile)."""
    inv = [1 / s for s in scale]
    if all(abs(i - round(i)) < 1e-6 and round(i) >= 1 for i in inv):
        return [int(round(i)) for i in inv]
    return None


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """Everything a blockwise run does, decided before it starts."""
    input_path: str                        # absolute
    output: str                            # the labels' store (or an image's labels/NAME)
    image: str | None                      # the OME-Zarr image whose labels group ``output`` is
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    model_path: str                        # absolute
    model_sha256: str
    model_dims: int
    channels: int                          # on the input's first axis when > 1
    embedding_dim: int
    delta_v: float
    delta_d: float
    voxel_size: tuple[float, ...] | None   # nm per input voxel, None: unknown
    scale: tuple[float, ...]               # zoom from the input grid to the model grid
    block_shape: tuple[int, ...]           # write ROI (core) of a block, input voxels
    halo: tuple[int, ...]
    align: tuple[int, ...]                 # read ROIs start on multiples of this
    offsets: tuple[tuple[int, ...], ...]   # affinity offsets, model pixels
    background_rule: dict                  # the checkpoint's background embedding, radius, min size
    tta: bool
    intensity: dict                        # the input's mapping onto the model's range (spoco_vol.intensity)
    mask_path: str | None
    roi: tuple[slice, ...] | None
    stitch_axes: tuple[int, ...]
    depth: int                             # planes of halo agreement per face
    link_overlap: float | None             # --link-sections
    save_embeddings: bool
    embedding_factors: tuple[int, ...] | None
    out_dtype: str
    zarr_format: int                       # the output's, as the input's
    pyramid: tuple[tuple[int, ...], ...]   # downsampling factors of the label levels
    device: str
    clustering: str = "mws"                # or hdbscan, meanshift, consistency (whole images)
    momentum_sha256: str | None = None     # the momentum network's, for consistency clustering
    command: str = ""
    # segment-affinities: the affinities come from this array (C, *spatial) instead of a model
    affinities: str | None = None
    bias: tuple[float, ...] | None = None  # per channel, mwatershed's convention (None: the SPOCO split)
    strides: tuple[int, ...] | None = None  # repulsive-edge strides of an affinity run
    min_size: int = 0                      # an affinity run's smallest object, voxels
    save_affinities: str | None = None     # keep the watershed's affinities: "float16" or "uint8"
    seams: str = "faces"                   # "faces" (stitch_faces) or "graph" (stitching.graph_merge_table)
    # --min-size / --mask-is-foreground on top of the checkpoint (Checkpoint.with_segment_overrides)
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def grid_factors(self) -> tuple[int, ...]:
        """Input voxels per model voxel along each axis (integer downsampling; 1 for a run
        on given affinities): graph seams work on the model grid."""
        return self.embedding_factors or (1,) * len(self.shape)

    def model_region(self, region: Sequence[slice]) -> tuple[slice, ...]:
        """An input-grid region (starting on whole model voxels) on the model grid: the
        model voxels it covers."""
        return tuple(slice(r.start // f, -(-r.stop // f)) for r, f in zip(region, self.grid_factors))

    @property
    def model_shape(self) -> tuple[int, ...]:
        return tuple(-(-n // f) for n, f in zip(self.shape, self.grid_factors))

    @property
    def model_block(self) -> tuple[int, ...]:
        return tuple(-(-b // f) for b, f in zip(self.block_shape, self.grid_factors))

    @property
    def work(self) -> str:
        """The work directory: everything of an unfinished run lives here."""
        return self.output.rstrip(os.sep) + ".partial"

    @functools.cached_property
    def grid(self) -> BlockGrid:
        return BlockGrid(self.shape, self.block_shape, self.halo, align=self.align)

    def fingerprint(self) -> dict:
        """The settings that determine the labels (not where they go, nor the devices)."""
        return {
            "input": self.input_path, "shape": list(self.shape), "dtype": self.dtype, "chunks": list(self.chunks),
            "block_shape": list(self.block_shape), "halo": list(self.halo), "align": list(self.align),
            "model_sha256": self.model_sha256,
            # `spoco-vol calibrate` changes these and not the weights: blocks of a partial run
            # segmented with another background rule must not be mixed with new ones.
            "background_rule": self.background_rule,
            "offsets": [list(o) for o in self.offsets], "voxel_size": list(self.voxel_size) if self.voxel_size
            else None, "mask": self.mask_path, "roi": [[r.start, r.stop] for r in self.roi] if self.roi else None,
            "stitch": bool(self.stitch_axes), "depth": self.depth, "link_overlap": self.link_overlap,
            "save_embeddings": self.save_embeddings, "output_dtype": self.out_dtype, "tta": self.tta,
            "intensity": self.intensity, "zarr_format": self.zarr_format,
            "pyramid": [list(f) for f in self.pyramid], "version": __version__,
            **({"channels": self.channels} if self.channels > 1 else {}),
            # other clusterings are newer than many partial runs: their hashes stay as they were
            **({"clustering": self.clustering, "momentum_sha256": self.momentum_sha256}
               if self.clustering != "mws" else {}),
            **({"affinities": self.affinities, "bias": list(self.bias) if self.bias else None,
                "strides": list(self.strides) if self.strides else None, "min_size": self.min_size}
               if self.affinities else {}),
            **({"save_affinities": self.save_affinities} if self.save_affinities else {}),
            **({"seams": self.seams} if self.seams != "faces" else {}),
            **({"overrides": dict(self.overrides)} if self.overrides else {})}

    @functools.cached_property
    def run_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()

    @property
    def voxels(self) -> int:
        """Voxels segmented (the ROI's, or the volume's)."""
        return int(np.prod([r.stop - r.start for r in self.roi])) if self.roi else int(np.prod(self.shape))


def build_plan(input_path: str, output: str | None = None, model: str | None = None, *,
               block_shape: Sequence[int] | None = None, halo: Sequence[int] | None = None,
               mask: str | None = None, voxel_size: Sequence[float] | None = None, device: str = "auto",
               overwrite: bool = False, stitch: bool = True, roi: str | Sequence[slice] | None = None,
               save_embeddings: bool = False, link_sections: bool = False, link_overlap: float = LINK_OVERLAP,
               tta: bool | None = None, intensity_range: Sequence[float] | None = None,
               clustering: str = "mws", save_affinities: str | None = None, seams: str = "auto",
               min_size: int | None = None, mask_is_foreground: bool = False,
               no_foreground_classifier: bool = False, command: str = "") -> SegmentPlan:
    """Check every input and setting of a run (one SpocoInputError otherwise) and decide
    what it does; reads metadata only (and, for inputs that need it, the intensity range
    in a chunked pass), writes nothing. Arguments as spoco_vol.blockwise.segment_blockwise."""
    arr = io.open_volume(input_path)
    model_path = os.path.abspath(bundled.model_path(model))
    ckpt = checkpoint.load(model_path)
    model_sha256 = ckpt.sha256  # the file's; the overrides are recorded beside it
    if min_size is not None and min_size < 0:
        raise SpocoInputError(f"--min-size must be non-negative, got {min_size}")
    if mask_is_foreground and not mask:
        raise SpocoInputError("--mask-is-foreground says what the --mask is: give a --mask")
    if no_foreground_classifier and not ckpt.has_foreground:
        raise SpocoInputError(f"--no-foreground-classifier: the model {model_path} has no foreground classifier "
                              "to leave out")
    # hashable (the workers' model cache is keyed by it), only what was asked for
    overrides = ((("min_size", int(min_size)),) if min_size is not None else ()) + \
        ((("mask_is_foreground", True),) if mask_is_foreground else ()) + \
        ((("no_foreground_classifier", True),) if no_foreground_classifier else ())
    ckpt = ckpt.with_segment_overrides(overrides)
    channels = ckpt.in_channels
    if channels > 1 and (arr.ndim < 3 or arr.shape[0] != channels):
        raise SpocoInputError(f"the model expects {channels} channels on the input's first axis, (C, Y, X) or "
                              f"(C, Z, Y, X); the input has shape {tuple(arr.shape)}")
    io.validate_volume(arr, f"input {input_path}", channels=channels)
    output = output or default_output_path(input_path)
    # An existing output is checked by the caller: it may be this very run's result.
    check_output_path(output, input_path, overwrite=True)
    # From here on the input's spatial axes (a leading channel axis is read whole).
    ndim = arr.ndim - (channels > 1)
    shape, chunks = tuple(arr.shape[arr.ndim - ndim:]), tuple(arr.chunks[arr.ndim - ndim:])
    dims = ckpt.dims
    if dims > ndim:
        raise SpocoInputError(f"the model is {dims}D but the input is {ndim}D")
    vs = list(voxel_size) if voxel_size else io.read_voxel_size(input_path)
    if vs is not None and not voxel_size and channels > 1 and len(vs) == arr.ndim:
        vs = vs[1:]  # an OME-Zarr scale that names the channel axis too
    if vs is not None and len(vs) != ndim:
        raise SpocoInputError(f"--voxel-size needs {ndim} values for this {ndim}D input")
    if vs is not None and not all(np.isfinite(v) and v > 0 for v in vs):
        raise SpocoInputError(f"voxel size must be positive, got {vs}")
    if vs is None and ckpt.voxel_size:
        warn(f"the voxel size of {input_path} is unknown (none in its metadata, no --voxel-size): it is segmented "
             f"as if it had the model's {io.format_voxel_size(ckpt.voxel_size[-ndim:])}, without "
             "resampling; give --voxel-size Z,Y,X in nm")
    mapping = intensity.volume_mapping(arr, ckpt.normalization, intensity_range, f"input {input_path}")
    if mask:
        m = io.open_volume(mask, "mask")
        if tuple(m.shape) != tuple(shape):
            raise SpocoInputError(f"mask shape {tuple(m.shape)} differs from the input's {tuple(shape)}")
    spatial_axes = list(range(ndim - dims, ndim))
    scale = input_scale(vs, ckpt, spatial_axes, ndim)
    offsets = ckpt.inference.offsets
    halo = list(halo) if halo is not None else required_halo(ckpt, ndim, scale)
    if clustering not in METHODS:
        raise SpocoInputError(f"--clustering must be one of {', '.join(METHODS)}, got {clustering!r}")
    if clustering != "mws":
        # Clusters of pixel embeddings depend on the whole image they are drawn from: no
        # block may cut an image (a 2D model's section, a 3D model's volume).
        image = list(shape[ndim - dims:])
        if block_shape is not None and list(block_shape)[ndim - dims:] != image:
            raise SpocoInputError(f"--clustering {clustering} runs on whole images: give no --block-shape, or one "
                                  f"that covers the {'sections' if dims < ndim else 'volume'} "
                                  f"({' x '.join(map(str, image))})")
        if block_shape is None:
            block_shape = ([min(shape[0], 8)] if dims < ndim else []) + image
    block_shape = list(block_shape) if block_shape is not None else default_block_shape(shape, dims, scale)
    if len(halo) != ndim or len(block_shape) != ndim:
        raise SpocoInputError(f"--block-shape and --halo need {ndim} values for this {ndim}D input")
    if any(b < 1 for b in block_shape) or any(h < 0 for h in halo):
        raise SpocoInputError("block shape must be positive and halo non-negative")
    reach = [0] * (ndim - dims) + [int(np.ceil(max(abs(o[a]) for o in offsets) / scale[ax]))
                                       for a, ax in enumerate(spatial_axes)]
    for a in range(ndim):
        if halo[a] < reach[a]:
            raise SpocoInputError(f"halo {halo[a]} along axis {a} is shorter than the longest affinity "
                                  f"offset ({reach[a]} voxels)")
        if block_shape[a] < min(shape[a], max(halo[a], 1)):
            raise SpocoInputError(f"block shape {block_shape[a]} along axis {a} is smaller than the "
                                  f"halo {halo[a]} it needs")
    if link_sections:
        if not (dims == 2 and ndim == 3):
            raise SpocoInputError("--link-sections joins the sections of a 2D model's result: it needs a 2D "
                                  f"model and a 3D input (got a {dims}D model, {ndim}D input)")
        if not 0 < link_overlap <= 1:
            raise SpocoInputError(f"--link-overlap takes a fraction in (0, 1], got {link_overlap}")
    if isinstance(roi, str):
        roi = parse_roi(roi, shape)
    roi = tuple(roi) if roi is not None else None
    factors = embedding_factors(scale)
    if save_affinities not in (None, *AFFINITY_DTYPES):
        raise SpocoInputError(f"--save-affinities takes {' or '.join(AFFINITY_DTYPES)}, got {save_affinities!r}")
    if save_affinities and clustering != "mws":
        raise SpocoInputError("--save-affinities keeps the Mutex Watershed's affinities: it needs --clustering mws")
    for flag, wanted in (("--save-embeddings", save_embeddings), ("--save-affinities", save_affinities)):
        if not wanted:
            continue
        if factors is None:
            raise SpocoInputError(f"{flag} needs the model grid to be an integer downsampling of "
                                  f"the input (zoom {scale})")
        if any(b % f for b, f in zip(block_shape, factors)):
            raise SpocoInputError(f"{flag}: the block shape {tuple(block_shape)} must be a multiple "
                                  f"of the model's downsampling {tuple(factors)}")
    stitch_axes = spatial_axes if stitch else []
    grid_factors = embedding_factors(scale)
    # graph seams work on the model grid: every core must start on a whole model voxel
    seams = resolve_seams(seams, stitch, dims == ndim and grid_factors is not None and clustering == "mws"
                          and not link_sections and all(b % f == 0 or b >= n for b, f, n in
                                                        zip(block_shape, grid_factors, shape)),
                          "a model of the input's dimensions, an input that is the model's voxel size or an "
                          "integer multiple of it, a block shape that is a multiple of that factor, "
                          "--clustering mws and no --link-sections",
                          int(np.prod([-(-n // f) for n, f in zip(shape, grid_factors or [1] * ndim)])))
    # Planes of the neighbour's core whose segmentation is compared: the ones next to the
    # face, where both blocks see enough context (the far halo is least reliable).
    depth = max(1, min([halo[a] for a in stitch_axes] + [block_shape[a] for a in stitch_axes] + [STITCH_DEPTH]))
    grid_shape = [-(-n // b) for n, b in zip(shape, block_shape)]
    n_vox = int(np.prod([g * b for g, b in zip(grid_shape, block_shape)]))
    image = labels_of_image(output, input_path)  # the labels go into this OME-Zarr image's labels group
    ome = io.ome_image(input_path)
    levels = label_pyramid(shape, vs, io.ome_scales(ome) if ome else None)
    from ..inference import resolve_device
    resolve_device(device)  # "cuda" without a GPU fails here, not in every block
    return SegmentPlan(
        input_path=os.path.abspath(input_path), output=output, image=image, shape=tuple(shape),
        dtype=str(arr.dtype), chunks=chunks, channels=channels, model_path=model_path, model_sha256=model_sha256,
        model_dims=dims, embedding_dim=ckpt.embedding_dim, delta_v=ckpt.delta_v, delta_d=ckpt.delta_d,
        voxel_size=tuple(vs) if vs else None, scale=tuple(scale), block_shape=tuple(block_shape),
        halo=tuple(halo), align=tuple(read_alignment(ckpt, ndim, scale)),
        offsets=tuple(tuple(int(x) for x in o) for o in offsets),
        background_rule=ckpt.inference.background_rule(), tta=ckpt.inference.uses_tta(tta), intensity=mapping,
        mask_path=os.path.abspath(mask) if mask else None, roi=roi, stitch_axes=tuple(stitch_axes), depth=depth,
        link_overlap=link_overlap if link_sections else None, save_embeddings=bool(save_embeddings),
        embedding_factors=tuple(factors) if factors else None,
        out_dtype="uint32" if n_vox < 2 ** 32 else "uint64", zarr_format=io.zarr_format(arr),
        pyramid=tuple(tuple(int(x) for x in f) for f in levels), device=device, clustering=clustering,
        momentum_sha256=_momentum_sha256(ckpt) if clustering == "consistency" else None, command=command,
        save_affinities=save_affinities, seams=seams, overrides=overrides)


SEAMS = ("auto", "faces", "graph")
# Largest volume (model-grid voxels) that "auto" gives graph seams: they keep 4 bytes per
# voxel and offset of affinities in the work directory (36 GB per 1e9 voxels with 9
# offsets) and hold the graph of all fragments on the client. Larger runs stitch faces
# unless --seams graph is asked for.
GRAPH_AUTO_VOXELS = 10 ** 9


def resolve_seams(seams: str, stitch: bool, graph_fits: bool, needs: str, voxels: int = 0) -> str:
    """--seams: "faces" (each face decided by its two blocks; exact where objects are kept
    apart by background), "graph" (one Mutex Watershed over every block's fragments, the
    whole volume's result; module docstring of spoco_vol.stitching), or "auto": graph
    where it fits (a model or affinities with the volume's own axes: 3D cells touch
    across faces) and the volume has at most GRAPH_AUTO_VOXELS, faces otherwise (a 2D
    model's sections on a 3D volume, terabytes)."""
    if seams not in SEAMS:
        raise SpocoInputError(f"--seams takes {', '.join(SEAMS)}, got {seams!r}")
    if not stitch:
        if seams == "graph":
            raise SpocoInputError("--seams graph joins objects across blocks: it cannot go with --no-stitch")
        return "faces"
    if seams == "graph" and not graph_fits:
        raise SpocoInputError(f"--seams graph needs {needs}; use --seams faces")
    if seams == "auto":
        return "graph" if graph_fits and voxels <= GRAPH_AUTO_VOXELS else "faces"
    return seams


def _momentum_sha256(ckpt: checkpoint.Checkpoint) -> str:
    if ckpt.momentum_state is None:
        raise SpocoInputError("--clustering consistency needs the momentum network g of the consistency term, which "
                              "this checkpoint does not hold (train with --consistency-weight > 0)")
    return ckpt.momentum_sha256


def full_offsets(offsets: Sequence[Sequence[int]], ndim: int) -> tuple[tuple[int, ...], ...]:
    """Offsets of a 2D model (or any with fewer axes than the volume) on the volume's
    axes: the leading axes get 0 (no edge across sections)."""
    return tuple((0,) * (ndim - len(o)) + tuple(int(v) for v in o) for o in offsets)


def affinity_attributes(arr) -> dict:
    """What an affinity array says of itself: ``offsets`` and, when spoco-vol wrote it,
    ``strides``, ``min_size`` and ``voxel_size`` (of the affinity grid)."""
    attrs = arr.attrs.asdict()
    return {k: attrs[k] for k in ("offsets", "strides", "min_size", "voxel_size") if k in attrs}


def build_affinity_plan(affinities: str, output: str | None = None, *, offsets: Sequence[Sequence[int]] | None = None,
                        bias: Sequence[float] | None = None, strides: Sequence[int] | None = None,
                        min_size: int | None = None, mask: str | None = None,
                        voxel_size: Sequence[float] | None = None, block_shape: Sequence[int] | None = None,
                        halo: Sequence[int] | None = None, stitch: bool = True,
                        roi: str | Sequence[slice] | None = None, seams: str = "auto",
                        command: str = "") -> SegmentPlan:
    """As build_plan, for a run on given affinities (C, *spatial): channel c holds the
    affinity in [0, 1] (1 = same object) of voxel i and voxel i + offsets[c], float or
    uint8 (read as value / 255). ``offsets``, ``strides``, ``min_size`` default to what
    the array's attributes say (as `segment --save-affinities` writes them); ``bias``
    follows mwatershed (segmentation.segment_affinities). Labels come on the affinities'
    grid; a block's halo defaults to the longest offset per axis."""
    arr = io.open_volume(affinities, "affinities")
    if arr.ndim not in (3, 4):
        raise SpocoInputError(f"affinities must be (C, Y, X) or (C, Z, Y, X), got shape {tuple(arr.shape)}")
    if not (np.dtype(arr.dtype).kind == "f" or arr.dtype == np.uint8):
        raise SpocoInputError(f"affinities must be float (values in [0, 1]) or uint8 (0..255), got {arr.dtype}")
    ndim = arr.ndim - 1
    shape, chunks = tuple(arr.shape[1:]), tuple(arr.chunks[1:])
    attrs = affinity_attributes(arr)
    offsets = offsets if offsets is not None else attrs.get("offsets")
    if offsets is None:
        raise SpocoInputError(f"{affinities} does not say its offsets: give --offsets, e.g. "
                              "'-1,0,0;0,-1,0;0,0,-1;-9,0,0;0,-9,0;0,0,-9' (one z,y,x per channel)")
    if any(len(o) > ndim or len(o) == 0 for o in offsets) or len({len(o) for o in offsets}) != 1:
        raise SpocoInputError(f"offsets need one value per axis (at most {ndim}) and the same number for every "
                              f"channel, got {[list(o) for o in offsets]}")
    offsets = full_offsets(offsets, ndim)
    if len(offsets) != arr.shape[0]:
        raise SpocoInputError(f"{affinities} has {arr.shape[0]} channels but {len(offsets)} offsets are given")
    if any(not any(o) for o in offsets):
        raise SpocoInputError("an offset of all zeros pairs a voxel with itself")
    if bias is not None:
        bias = [float(b) for b in bias]
        if len(bias) == 1:
            bias = [0.0 if is_direct(o) else bias[0] for o in offsets]
        if len(bias) != len(offsets) or not all(np.isfinite(bias)):
            raise SpocoInputError(f"--bias takes one finite value per offset ({len(offsets)}), or one for the "
                                  f"long-range offsets; got {len(bias)}")
    strides = strides if strides is not None else attrs.get("strides")
    if strides is not None:
        strides = [1] * (ndim - len(strides)) + [int(x) for x in strides]
        if len(strides) != ndim or any(x < 1 for x in strides):
            raise SpocoInputError(f"--strides needs up to {ndim} positive values, got {strides}")
    min_size = int(attrs.get("min_size", 0) if min_size is None else min_size)
    if min_size < 0:
        raise SpocoInputError(f"--min-size must be non-negative, got {min_size}")
    vs = list(voxel_size) if voxel_size else attrs.get("voxel_size")
    if vs is not None and (len(vs) != ndim or not all(np.isfinite(v) and v > 0 for v in vs)):
        raise SpocoInputError(f"voxel size needs {ndim} positive values, got {vs}")
    if mask:
        m = io.open_volume(mask, "mask")
        if tuple(m.shape) != shape:
            raise SpocoInputError(f"mask shape {tuple(m.shape)} differs from the affinities' {shape}")
    reach = [max(abs(o[a]) for o in offsets) for a in range(ndim)]
    moved = [a for a in range(ndim) if reach[a] > 0]
    block_shape = list(block_shape) if block_shape is not None else default_block_shape(shape, ndim - moved[0])
    seams = resolve_seams(seams, stitch, moved[0] == 0, "offsets along every axis of the affinities",
                          int(np.prod(shape)))
    if halo is None and seams == "graph":
        # A view must see beyond the longest offset to cut the right fragments: on noisy
        # touching cells, views of the longest offset left them merged (adapted Rand
        # 0.02-0.09 against the whole volume), twice that gave it exactly (tests).
        halo = [max(r, min(2 * r, b)) for r, b in zip(reach, block_shape)]
    halo = list(halo) if halo is not None else reach
    if len(halo) != ndim or len(block_shape) != ndim:
        raise SpocoInputError(f"--block-shape and --halo need {ndim} values for these {ndim}D affinities")
    if any(b < 1 for b in block_shape) or any(h < 0 for h in halo):
        raise SpocoInputError("block shape must be positive and halo non-negative")
    for a in range(ndim):
        if halo[a] < reach[a]:
            raise SpocoInputError(f"halo {halo[a]} along axis {a} is shorter than the longest offset ({reach[a]})")
        if block_shape[a] < min(shape[a], max(halo[a], 1)):
            raise SpocoInputError(f"block shape {block_shape[a]} along axis {a} is smaller than the halo "
                                  f"{halo[a]} it needs")
    # Faces are stitched where a direct-neighbour offset tells the affinity across them.
    stitch_axes = [a for a in range(ndim) if any(is_direct(o) and o[a] for o in offsets)] if stitch else []
    if isinstance(roi, str):
        roi = parse_roi(roi, shape)
    roi = tuple(roi) if roi is not None else None
    depth = max(1, min([halo[a] for a in stitch_axes] + [block_shape[a] for a in stitch_axes] + [STITCH_DEPTH]))
    output = output or default_output_path(affinities)
    check_output_path(output, affinities, overwrite=True)
    grid_shape = [-(-n // b) for n, b in zip(shape, block_shape)]
    n_vox = int(np.prod([g * b for g, b in zip(grid_shape, block_shape)]))
    return SegmentPlan(
        input_path=os.path.abspath(affinities), output=output, image=None, shape=shape, dtype=str(arr.dtype),
        chunks=chunks, model_path="", model_sha256="", model_dims=ndim - moved[0], channels=1, embedding_dim=0,
        delta_v=0.0, delta_d=0.0, voxel_size=tuple(vs) if vs else None, scale=(1.0,) * ndim,
        block_shape=tuple(block_shape), halo=tuple(halo),
        # strided repulsive edges sit on the volume's grid only if every read starts on it
        align=tuple(strides) if strides else (1,) * ndim, offsets=offsets, background_rule={}, tta=False,
        intensity={}, mask_path=os.path.abspath(mask) if mask else None, roi=roi, stitch_axes=tuple(stitch_axes),
        depth=depth, link_overlap=None, save_embeddings=False, embedding_factors=None,
        out_dtype="uint32" if n_vox < 2 ** 32 else "uint64", zarr_format=io.zarr_format(arr),
        pyramid=tuple(tuple(int(x) for x in f) for f in label_pyramid(shape, vs, None)), device="cpu",
        command=command, affinities=os.path.abspath(affinities), bias=tuple(bias) if bias else None,
        strides=tuple(strides) if strides else None, min_size=min_size, seams=seams)
