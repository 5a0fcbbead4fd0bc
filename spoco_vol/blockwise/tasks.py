"""The block functions of a blockwise run: arrays in, arrays out, no I/O.

``passes.py`` reads a block's arrays, calls these, and writes what they return.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import fastremap
import numpy as np

from .. import stitching
from ..affinities import embedding_affinities, is_direct
from ..blocks import Block, BlockGrid, intersect
from ..checkpoint import Checkpoint
from ..pipeline import ArrayPrediction, labels_from_embeddings, model_grid_index, predict_array
from ..segmentation import segment_affinities, segment_embeddings, watershed_mask
from ..stitching import block_id_offset
from .plan import SegmentPlan, full_offsets


def face_region(block: Block, axis: int, side: int, depth: int) -> tuple[slice, ...]:
    """Volume region of ``depth`` planes beyond (side=+1) or before (side=-1) the core."""
    sl = list(block.core)
    c = block.core[axis]
    sl[axis] = slice(c.stop, c.stop + depth) if side > 0 else slice(c.start - depth, c.start)
    return tuple(sl)


def relative(region: Sequence[slice], outer: Sequence[slice]) -> tuple[slice, ...]:
    """``region`` (volume coordinates) as slices of an array that covers ``outer``."""
    return tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(region, outer))


def region_text(region: Sequence[slice]) -> str:
    return ",".join(f"{r.start}:{r.stop}" for r in region)


def face_affinity(emb: np.ndarray, read_shape: Sequence[int], block: Block, axis: int,
                  delta_d: float, scale: Sequence[float]) -> np.ndarray:
    """Affinity between the core's last plane and the next plane along ``axis``, on the
    input grid (embeddings sampled nearest-neighbour from the model grid)."""
    last = block.core[axis].stop - 1 - block.read[axis].start
    idx = []
    for a, (n, m) in enumerate(zip(read_shape, emb.shape[1:])):
        if a == axis:
            idx.append(model_grid_index(np.array([last, last + 1]), n, m, scale[a]))
        else:
            cs = block.core_in_read[a]
            idx.append(model_grid_index(np.arange(cs.start, cs.stop), n, m, scale[a]))
    e = emb[(slice(None), *np.ix_(*idx))]
    e0 = np.take(e, 0, axis=axis + 1)
    e1 = np.take(e, 1, axis=axis + 1)
    d = np.sqrt(((e0 - e1) ** 2).sum(0))
    return np.square(np.clip(1 - d / (2 * delta_d), 0, None)).astype(np.float32)


def zero_outside(arr: np.ndarray, region: Sequence[slice], roi: Sequence[slice] | None) -> np.ndarray:
    """``arr`` covers the volume ``region``; voxels outside ``roi`` become 0."""
    if roi is None:
        return arr
    out = np.zeros_like(arr)
    inside = intersect(region, roi)
    if inside is not None:
        sl = tuple(slice(i.start - r.start, i.stop - r.start) for i, r in zip(inside, region))
        out[sl] = arr[sl]
    return out


def given_face_affinity(affinities: np.ndarray, offsets: Sequence[Sequence[int]], block: Block,
                        axis: int) -> np.ndarray:
    """As face_affinity, from given affinities over the block's read region: the
    channel of the direct-neighbour offset along ``axis`` (either sign)."""
    last = block.core[axis].stop - 1 - block.read[axis].start
    for c, o in enumerate(offsets):
        if is_direct(o) and o[axis]:
            # channel c at voxel i pairs i with i + o: the pair (last, last + 1) sits at last + 1
            # for an offset pointing back, at last for one pointing forward
            at = last + 1 if o[axis] < 0 else last
            sl = tuple(at if a == axis else cs for a, cs in enumerate(block.core_in_read))
            return np.asarray(affinities[(c, *sl)], np.float32)
    raise ValueError(f"no direct-neighbour offset along axis {axis}")


@dataclasses.dataclass
class Prediction:
    """A block's network output on the model grid (``networks`` None: a block with
    nothing to do), and the seconds spent so far per stage. A run on given affinities
    has ``affinities`` (C, *read shape) float32 instead, and its --mask over the read
    region in ``mask``."""
    networks: ArrayPrediction | None
    timings: dict
    affinities: np.ndarray | None = None
    mask: np.ndarray | None = None
    on_gpu_worker: bool = False  # predicted on a worker that declares a GPU resource


@dataclasses.dataclass
class Fragments:
    """A block's result: its core's fragments (global ids, 0 = background), the face
    evidence its upper/lower neighbours are stitched with, and its object count."""
    core: np.ndarray
    faces: dict
    n_objects: int
    timings: dict


def predict_block(raw: np.ndarray, block: Block, plan: SegmentPlan, model: Checkpoint, networks, timings: dict,
                  mask: np.ndarray | None = None) -> Prediction:
    """Embeddings (and the classifier's probabilities, and with consistency clustering
    the momentum network's embeddings) of a block's read region; ``networks``: the
    embedding network, the classifier, the momentum network (None where absent);
    ``mask``: the --mask over the read region (its outside is background)."""
    net, foreground_net, momentum_net = networks
    # The halo holds the field of view: context is only added where the block meets the
    # volume's border, as the whole volume's prediction adds it there.
    borders = [(r.start == 0, r.stop == n) for r, n in zip(block.read[-model.dims:], plan.shape[-model.dims:])]
    return Prediction(predict_array(raw, model, input_voxel_size=plan.voxel_size, device=plan.device, timings=timings,
                                    net=net, tta=plan.tta, foreground_net=foreground_net,
                                    intensity_mapping=plan.intensity, momentum_net=momentum_net, mask=mask,
                                    volume_borders=borders),
                      timings)


def block_fragments(pred: Prediction, block: Block, plan: SegmentPlan, model: Checkpoint) -> Fragments:
    """Affinities, watershed, global ids and face evidence of one block (module
    docstring of stitching.py). Voxels outside the plan's ROI are background; with
    --link-sections the per-section objects are first linked across sections."""
    timings = pred.timings
    grid: BlockGrid = plan.grid
    if pred.networks is None and pred.affinities is None:
        return Fragments(np.zeros(block.core_shape, np.uint64), {}, 0, timings)
    read_shape = tuple(r.stop - r.start for r in block.read)
    depth, axes = plan.depth, plan.stitch_axes
    # Labels are needed for the core and the ``depth`` planes around it that stitching
    # compares, not for the whole halo.
    kept = tuple(slice(max(c.start - (depth if a in axes else 0), r.start),
                       min(c.stop + (depth if a in axes else 0), r.stop))
                 for a, (c, r) in enumerate(zip(block.core, block.read)))
    if pred.affinities is not None:
        labels = segment_affinities(pred.affinities, plan.offsets, bias=plan.bias, strides=plan.strides,
                                    mask=pred.mask, min_size=plan.min_size,
                                    timings=timings)[relative(kept, block.read)]
    else:
        emb, scale = pred.networks.embeddings, pred.networks.scale
        labels = labels_from_embeddings(emb, model, read_shape, scale, timings=timings,
                                        region=relative(kept, block.read), foreground=pred.networks.foreground,
                                        clustering=plan.clustering, momentum=pred.networks.momentum)
    t = time.perf_counter()
    labels = zero_outside(labels, kept, plan.roi)
    if plan.link_overlap is not None:
        labels = stitching.link_sections(labels, plan.link_overlap)
    # Core objects get this block's id range; halo-only objects get 0 (not ours).
    core_local = labels[relative(block.core, kept)]
    ids = fastremap.unique(core_local)  # hash-free for small label values: 10x np.unique
    ids = ids[ids != 0]
    n = len(ids)
    # Block-local labels are small (at most the segments of one block): a dense lookup
    # table maps them in one gather.
    lut = np.zeros(int(labels.max()) + 1, np.uint64)
    lut[ids] = np.arange(1, n + 1, dtype=np.uint64) + np.uint64(block_id_offset(block.linear, grid.block_shape))
    faces = {}
    for a in axes:
        for side in (-1, 1):
            if not 0 <= block.index[a] + side < grid.grid_shape[a]:
                continue
            faces[f"halo_{a}_{'p' if side > 0 else 'm'}"] = lut[labels[relative(face_region(block, a, side, depth),
                                                                                  kept)]]
            if side > 0:
                faces[f"aff_{a}"] = (given_face_affinity(pred.affinities, plan.offsets, block, a)
                                     if pred.affinities is not None else
                                     face_affinity(emb, read_shape, block, a, plan.delta_d, scale))
    timings["stitch"] = timings.get("stitch", 0.0) + time.perf_counter() - t
    return Fragments(lut[core_local], faces, n, timings)


def block_view(pred: Prediction, block: Block, plan: SegmentPlan, model: Checkpoint | None) -> np.ndarray:
    """Graph seams, pass 1: the block's segments over its whole read region on the model
    grid (uint32, 0 = background), the view that stitching.intersect_views cuts
    fragments from. No size floor: it applies to whole objects, after the graph's
    watershed."""
    timings = pred.timings
    if pred.affinities is not None:
        labels = segment_affinities(pred.affinities, plan.offsets, bias=plan.bias, strides=plan.strides,
                                    mask=pred.mask, min_size=0, timings=timings)
    else:
        inf = model.inference
        labels = segment_embeddings(pred.networks.embeddings, inf.offsets, model.delta_d, strides=inf.strides,
                                    background_embedding=inf.background_embedding,
                                    background_radius=inf.background_radius, min_size=0,
                                    foreground=pred.networks.foreground,
                                    foreground_threshold=inf.foreground_threshold, timings=timings)
    roi = plan.model_region(plan.roi) if plan.roi is not None else None
    return zero_outside(labels, plan.model_region(block.read), roi).astype(np.uint32)


def core_graph_affinities(pred: ArrayPrediction, block: Block, plan: SegmentPlan, model: Checkpoint) -> np.ndarray:
    """Graph seams, pass 1 of a model run: the affinities (C, *core on the model grid)
    float32 of every edge a core voxel owns (channel c at voxel i pairs i with
    i + offsets[c]), from the block's embeddings, exact over the core and the longest
    offset around it. Computed as the whole volume's watershed computes them (the same
    mask), so that the values, and with them the order of the edges, are the same."""
    emb, inf = pred.embeddings, model.inference
    reach = [max(abs(o[a]) for o in inf.offsets) for a in range(emb.ndim - 1)]
    core = relative(plan.model_region(block.core), plan.model_region(block.read))
    region = tuple(slice(max(c.start - r, 0), min(c.stop + r, n)) for c, r, n in zip(core, reach, emb.shape[1:]))
    fg = pred.foreground[region] if pred.foreground is not None else None
    e = emb[(slice(None), *region)]
    mask = watershed_mask(e, model.delta_d, background_embedding=inf.background_embedding,
                          background_radius=inf.background_radius, foreground=fg,
                          foreground_threshold=inf.foreground_threshold)
    aff = embedding_affinities(e, inf.offsets, model.delta_d, mask)
    return aff[(slice(None), *relative(core, region))]


def core_embeddings(emb: np.ndarray, block: Block, factors: Sequence[int]) -> tuple[tuple[slice, ...], np.ndarray]:
    """The core's embeddings (float16, model grid) and where they go in the volume's
    embeddings array (E, *model grid)."""
    in_read = tuple(slice(c.start // f, -(-c.stop // f)) for c, f in zip(block.core_in_read, factors))
    in_vol = tuple(slice(c.start // f, -(-c.stop // f)) for c, f in zip(block.core, factors))
    return (slice(None),) + in_vol, emb[(slice(None),) + in_read].astype(np.float16)


def core_affinities(pred: ArrayPrediction, block: Block, plan: SegmentPlan,
                    model: Checkpoint) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """The affinities the watershed uses over the block's core on the model grid, at
    every pixel (not only the foreground ones it needs), and its foreground (the pixels
    that take part); where they go in the volume's arrays (C, *model grid). Affinities
    as --save-affinities keeps them: float16, or uint8 holding round(255 w)."""
    factors, emb = plan.embedding_factors, pred.embeddings
    inf = model.inference
    offsets = full_offsets(inf.offsets, emb.ndim - 1)  # a 2D model's on a 3D volume
    reach = [max(abs(o[a]) for o in offsets) for a in range(emb.ndim - 1)]
    core = [slice(c.start // f, -(-c.stop // f)) for c, f in zip(block.core_in_read, factors)]
    # the core and the longest offset's reach around it: every pair of a core pixel
    region = tuple(slice(max(c.start - r, 0), min(c.stop + r, n)) for c, r, n in zip(core, reach, emb.shape[1:]))
    aff = embedding_affinities(emb[(slice(None), *region)], offsets, model.delta_d)
    aff = aff[(slice(None), *relative(core, region))]
    fg = pred.foreground[tuple(core)] if pred.foreground is not None else None
    mask = watershed_mask(emb[(slice(None), *core)], model.delta_d, background_embedding=inf.background_embedding,
                          background_radius=inf.background_radius, foreground=fg,
                          foreground_threshold=inf.foreground_threshold)
    mask = np.ones(aff.shape[1:], bool) if mask is None else mask
    values = np.round(aff * 255).astype(np.uint8) if plan.save_affinities == "uint8" else aff.astype(np.float16)
    in_vol = tuple(slice(c.start // f, -(-c.stop // f)) for c, f in zip(block.core, factors))
    return (slice(None),) + in_vol, values, mask.astype(np.uint8)


def face_edges(lower_faces: dict, upper_faces: dict, lower_core_next: np.ndarray, upper_core_prev: np.ndarray,
               axis: int) -> np.ndarray:
    """Merge edges across the face ``axis`` between a lower block and its upper
    neighbour, from their face evidence and the fragments each wrote next to the face
    (``lower_core_next``: the upper block's first core planes, as written;
    ``upper_core_prev``: the lower block's last ones)."""
    def axis_first(x):
        return np.moveaxis(x, axis, 0)
    return stitching.stitch_faces(axis_first(lower_faces[f"halo_{axis}_p"]), axis_first(lower_core_next),
                                  axis_first(upper_faces[f"halo_{axis}_m"]), axis_first(upper_core_prev),
                                  lower_faces[f"aff_{axis}"])


def downsample_nearest(src: np.ndarray, step: Sequence[int]) -> np.ndarray:
    """The first voxel of each ``step`` block: nearest downsampling of labels."""
    return src[tuple(slice(None, None, k) for k in step)]
