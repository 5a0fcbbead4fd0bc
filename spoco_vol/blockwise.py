"""Blockwise segmentation of volumes larger than memory, as a dask graph.

Three passes, each a set of independent tasks (graph size linear in the number of blocks):
1. ``segment``: per block, read core + halo -> normalise -> embeddings -> affinities ->
   Mutex Watershed -> crop to the core; write the core's fragments (global ids, see
   stitching.py) chunk-aligned into ``fragments``, and the block's face evidence (its
   halo labels and the affinities across its faces) to a small side file.
2. ``stitch``: per pair of face-adjacent blocks, merge edges from both blocks' evidence.
3. ``relabel``: per block, fragments -> final consecutive ids through the merge table.
Each task is a pure function of its inputs and writes only its own chunk, so the result
does not depend on the order in which blocks finish. Work happens in ``<output>.partial``
and is moved into place at the end: an interrupted run never leaves a half-written output.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from typing import Callable, Sequence

import dask
import fastremap
import numpy as np
import zarr

from . import __version__, bundled, intensity, io, model as model_mod
from .affinities import default_offsets
from .blocks import Block, BlockGrid, intersect, parse_roi
from .errors import SpocoInputError, warn
from .foreground import classifier_from_checkpoint, segmentation_settings
from .pipeline import (check_output_path, default_output_path, label_pyramid, labels_from_embeddings,
                       labels_group, labels_of_image, model_grid_index, model_scale, predict_array,
                       register_label, write_ome_metadata)
from . import stitching
from .stitching import block_id_offset, merge_table, relabel_block, section_overlap_edges, stitch_faces

MAX_IN_FLIGHT = 2000  # tasks submitted to the scheduler at once
STITCH_DEPTH = 16  # input planes of halo agreement per face
LINK_OVERLAP = 0.5  # default --link-overlap; see benchmarks/RESULTS.md
STAGES = ("read", "predict", "affinities", "watershed", "stitch", "relabel", "write", "pyramid")


# ----------------------------------------------------------------------------- planning

def required_halo(ckpt: dict, input_ndim: int, scale: Sequence[float]) -> list[int]:
    """Context (input voxels per side) a block needs: the U-Net's field of view plus the
    longest affinity offset, converted from model pixels to input voxels."""
    net = model_mod.model_from_checkpoint(ckpt)
    dims = ckpt["architecture"]["dims"]
    offsets = ckpt.get("inference", {}).get("offsets") or default_offsets(dims)
    reach = [max(abs(o[a]) for o in offsets) for a in range(dims)]
    model_halo = [h + r for h, r in zip(model_mod.receptive_halo(net), reach)]
    halo = [0] * (input_ndim - dims) + model_halo  # a 2D model needs no context across sections
    return [int(np.ceil(h / s)) if s else h for h, s in zip(halo, scale)]


def read_alignment(ckpt: dict, input_ndim: int, scale: Sequence[float]) -> list[int]:
    """Input voxels on whose multiples a read ROI must start so that the block sees the
    same pooling grid (and resampling grid) as the whole volume."""
    net = model_mod.model_from_checkpoint(ckpt)
    dims = ckpt["architecture"]["dims"]
    align = [1] * (input_ndim - dims) + list(net.shape_multiple)
    for a, s in enumerate(scale):
        f = 1 / s
        if abs(f - round(f)) < 1e-6:  # integer downsampling keeps an exact grid
            align[a] *= int(round(f))
    return align


def default_block_shape(shape: Sequence[int], model_dims: int) -> list[int]:
    base = [8, 512, 512] if model_dims == 2 else [64, 256, 256]
    return [min(s, b) for s, b in zip(shape, base[-len(shape):])]


# ----------------------------------------------------------------------------- block tasks

@functools.lru_cache(maxsize=4)
def _load_model(path: str):
    """One model load per worker process, not per block."""
    ckpt = model_mod.load_checkpoint(path)
    return ckpt, model_mod.model_from_checkpoint(ckpt), classifier_from_checkpoint(ckpt)


def _face_region(block: Block, axis: int, side: int, depth: int) -> tuple[slice, ...]:
    """Volume region of ``depth`` planes beyond (side=+1) or before (side=-1) the core."""
    sl = list(block.core)
    c = block.core[axis]
    sl[axis] = slice(c.stop, c.stop + depth) if side > 0 else slice(c.start - depth, c.start)
    return tuple(sl)


def _relative(region: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
    """``region`` (volume coordinates) as slices of an array that covers ``outer``."""
    return tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(region, outer))


def _face_affinity(emb: np.ndarray, read_shape: Sequence[int], block: Block, axis: int,
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


def _zero_outside(arr: np.ndarray, region: tuple[slice, ...], roi: tuple[slice, ...] | None) -> np.ndarray:
    """``arr`` covers the volume ``region``; voxels outside ``roi`` become 0."""
    if roi is None:
        return arr
    out = np.zeros_like(arr)
    inside = intersect(region, roi)
    if inside is not None:
        sl = tuple(slice(i.start - r.start, i.stop - r.start) for i, r in zip(inside, region))
        out[sl] = arr[sl]
    return out


def embedding_factors(scale: Sequence[float]) -> list[int] | None:
    """Input voxels per model voxel along each axis, or None if the model grid is not an
    integer downsampling of the input grid (then saved embeddings would not tile)."""
    inv = [1 / s for s in scale]
    if all(abs(i - round(i)) < 1e-6 and round(i) >= 1 for i in inv):
        return [int(round(i)) for i in inv]
    return None


def _write_embeddings(emb: np.ndarray, block: Block, factors: Sequence[int], path: str) -> None:
    """The core's embeddings (model grid) into the chunk of ``path`` that holds it."""
    in_read = tuple(slice(c.start // f, -(-c.stop // f)) for c, f in zip(block.core_in_read, factors))
    in_vol = tuple(slice(c.start // f, -(-c.stop // f)) for c, f in zip(block.core, factors))
    zarr.open_array(path, mode="r+")[(slice(None),) + in_vol] = emb[(slice(None),) + in_read].astype(np.float16)


def _crash_point(name: str) -> None:
    """Fault injection for the resume tests: with SPOCO_VOL_CRASH_AT=<name> the process
    kills itself (SIGKILL, as a node failure would) when it reaches that point."""
    if os.environ.get("SPOCO_VOL_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _region_text(region: Sequence[slice]) -> str:
    return ",".join(f"{r.start}:{r.stop}" for r in region)


def _reported(fn: Callable, block: Block, *args, **kwargs) -> dict:
    """Run a block task; a failure comes back as {"error": message naming the block and
    its region}: bad input fails the same way on every try, so it is reported, not
    retried (retries are for workers that die)."""
    try:
        return fn(*args, block, **kwargs)
    except SpocoInputError as exc:
        return {"block": block.linear, "error": str(exc)}
    except Exception as exc:  # e.g. a corrupt chunk: say where, not just what
        return {"block": block.linear, "error": f"block {block.index} (voxels {_region_text(block.read)}) "
                                                f"failed: {type(exc).__name__}: {exc}"}


def segment_block(block: Block, **kwargs) -> dict:
    """Pass 1 for one block, prediction and CPU part in one task."""
    return _reported(_segment_block, block, **kwargs)


def predict_block(block: Block, **kwargs) -> dict:
    """Pass 1, the prediction half (for a worker that declares a GPU)."""
    return _reported(_predict_block, block, **kwargs)


def finish_block(pred: dict, block: Block, **kwargs) -> dict:
    """Pass 1, the CPU half, from ``predict_block``'s result."""
    if "error" in pred:
        return pred
    return _reported(_finish_block, block, pred, **kwargs)


def _segment_block(block: Block, **kwargs) -> dict:
    """Pass 1 for one block in one task: prediction, then the CPU part."""
    return _finish_block(_predict_block(block, **kwargs), block, **kwargs)


def _predict_block(block: Block, *, input_path: str, model_path: str, voxel_size, device: str,
                   mask_path: str | None = None, threads: int | None = None, tta: bool = False,
                   intensity_mapping: dict | None = None, **_) -> dict:
    """The GPU part of pass 1: read core + halo, check it, embed it (model grid)."""
    timings = dict.fromkeys(STAGES, 0.0)
    if threads:
        import torch
        torch.set_num_threads(threads)  # workers share the cores instead of oversubscribing them
    t = time.perf_counter()
    ckpt, net, foreground_net = _load_model(model_path)
    raw = np.asarray(io.open_volume(input_path)[block.read])
    io.check_finite(raw, "input", f"block {block.index} (voxels {_region_text(block.read)})")
    skip = not raw.any()
    if mask_path and not skip:
        skip = not np.asarray(io.open_volume(mask_path, "mask")[block.core]).any()
    timings["read"] += time.perf_counter() - t
    if skip:
        return {"skip": True, "timings": timings}
    emb, scale, foreground = predict_array(raw, ckpt, input_voxel_size=voxel_size, device=device, timings=timings,
                                           net=net, tta=tta, foreground_net=foreground_net,
                                           intensity_mapping=intensity_mapping)
    return {"skip": False, "embeddings": emb, "scale": scale, "foreground": foreground, "timings": timings}


def _finish_block(pred: dict, block: Block, *, model_path: str, work: str, grid: BlockGrid, depth: int,
                  stitch_axes: Sequence[int], roi: tuple[slice, ...] | None = None, save_embeddings: bool = False,
                  link_overlap: float | None = None, **_) -> dict:
    """The CPU part of pass 1: affinities, watershed, ids, face evidence, writes. Fragments
    go to ``work/fragments``, face evidence beside them (and with ``save_embeddings`` the
    core's embeddings to ``work/embeddings``). Voxels outside ``roi`` are background. With
    ``link_overlap`` (2D model on a 3D volume) the per-section objects are first linked
    across sections."""
    timings = pred["timings"]
    frag = zarr.open_array(os.path.join(work, "fragments"), mode="r+")
    faces = {}
    if pred["skip"]:
        n = 0
        core = np.zeros(block.core_shape, np.uint64)
    else:
        ckpt = _load_model(model_path)[0]
        emb, scale = pred["embeddings"], pred["scale"]
        read_shape = tuple(r.stop - r.start for r in block.read)
        # Labels are needed for the core and the ``depth`` planes around it that stitching
        # compares, not for the whole halo.
        kept = tuple(slice(max(c.start - (depth if a in stitch_axes else 0), r.start),
                           min(c.stop + (depth if a in stitch_axes else 0), r.stop))
                     for a, (c, r) in enumerate(zip(block.core, block.read)))
        labels = labels_from_embeddings(emb, ckpt, read_shape, scale, timings=timings,
                                        region=_relative(kept, block.read), foreground=pred.get("foreground"))
        if save_embeddings:
            t = time.perf_counter()
            _write_embeddings(emb, block, embedding_factors(scale), os.path.join(work, "embeddings"))
            timings["write"] += time.perf_counter() - t
        t = time.perf_counter()
        labels = _zero_outside(labels, kept, roi)
        if link_overlap is not None:
            labels = stitching.link_sections(labels, link_overlap)
        # Core objects get this block's id range; halo-only objects get 0 (not ours).
        core_local = labels[_relative(block.core, kept)]
        ids = fastremap.unique(core_local)  # hash-free for small label values: 10x np.unique
        ids = ids[ids != 0]
        n = len(ids)
        # Block-local labels are small (at most the segments of one block): a dense lookup
        # table maps them in one gather.
        lut = np.zeros(int(labels.max()) + 1, np.uint64)
        lut[ids] = np.arange(1, n + 1, dtype=np.uint64) + np.uint64(block_id_offset(block.linear, grid.block_shape))

        def to_global(arr):
            return lut[arr]
        core = to_global(core_local)
        for a in stitch_axes:
            for side in (-1, 1):
                nb = block.index[a] + side
                if not 0 <= nb < grid.grid_shape[a]:
                    continue
                region = _face_region(block, a, side, depth)
                faces[f"halo_{a}_{'p' if side > 0 else 'm'}"] = to_global(labels[_relative(region, kept)])
                if side > 0:
                    faces[f"aff_{a}"] = _face_affinity(emb, read_shape, block, a, ckpt["delta_d"], scale)
        timings["stitch"] += time.perf_counter() - t
    t = time.perf_counter()
    frag[block.core] = core
    timings["write"] += time.perf_counter() - t
    result = {"block": block.linear, "objects": n, "timings": timings, "peak_rss_mib": _peak_rss_mib()}
    side_file = _side_file(work, block)
    tmp = side_file + ".tmp.npz"
    np.savez(tmp, n_objects=np.int64(n), result=np.array(json.dumps(result)), **faces)
    os.replace(tmp, side_file)  # written last and atomically: the block's done marker
    _crash_point(f"segment:{block.linear}")
    return result


def _side_file(work: str, block: Block) -> str:
    return os.path.join(work, "blocks", f"{block.linear}.npz")


def _done_result(work: str, block: Block) -> dict | None:
    """The recorded result of a block finished by an earlier (interrupted) run, or None."""
    path = _side_file(work, block)
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        result = json.loads(str(f["result"]))
    result["timings"] = dict.fromkeys(result["timings"], 0.0)  # its work was not done by this run
    return result


def stitch_faces_of_block(lower: Block, faces: list, *, work: str, depth: int,
                          min_overlap: float | None = None) -> dict:
    """Pass 2 for the faces ``lower`` shares with its upper neighbours: merge edges from
    halo agreement and face affinity ((upper, axis, "stitch")), or section links across a
    z face ((upper, 0, "link"), with --link-sections)."""
    t = time.perf_counter()
    edges = [_face_edges(lower, up, ax, work=work, depth=depth) if kind == "stitch"
             else _link_edges(lower, up, work=work, min_overlap=min_overlap) for up, ax, kind in faces]
    _crash_point("stitch")
    return {"edges": np.concatenate(edges) if edges else np.zeros((0, 2), np.uint64),
            "seconds": time.perf_counter() - t}


def _face_edges(lower: Block, upper: Block, axis: int, *, work: str, depth: int) -> np.ndarray:
    a = np.load(os.path.join(work, "blocks", f"{lower.linear}.npz"))
    b = np.load(os.path.join(work, "blocks", f"{upper.linear}.npz"))
    if int(a["n_objects"]) == 0 or int(b["n_objects"]) == 0:
        return np.zeros((0, 2), np.uint64)
    frag = zarr.open_array(os.path.join(work, "fragments"), mode="r")
    upper_core = np.asarray(frag[_face_region(lower, axis, +1, depth)])
    lower_core = np.asarray(frag[_face_region(upper, axis, -1, depth)])

    def axis_first(x):
        return np.moveaxis(x, axis, 0)
    return stitch_faces(axis_first(a[f"halo_{axis}_p"]), axis_first(upper_core),
                        axis_first(b[f"halo_{axis}_m"]), axis_first(lower_core), a[f"aff_{axis}"])


def _link_edges(lower: Block, upper: Block, *, work: str, min_overlap: float) -> np.ndarray:
    """With --link-sections: link edges between the lower block's last core section and
    the upper block's first (both already written fragments)."""
    frag = zarr.open_array(os.path.join(work, "fragments"), mode="r")
    last = np.asarray(frag[_face_region(upper, 0, -1, 1)])[0]
    first = np.asarray(frag[_face_region(lower, 0, +1, 1)])[0]
    return section_overlap_edges(last, first, min_overlap)


def relabel_one_block(block: Block, table: np.ndarray, *, work: str, grid: BlockGrid, dtype: str) -> dict:
    """Pass 3 for one block: final ids, written chunk-aligned into dataset "0"."""
    t = time.perf_counter()
    frag = np.asarray(zarr.open_array(os.path.join(work, "fragments"), mode="r")[block.core])
    out = relabel_block(frag, block.linear, grid.block_shape, table, dtype=np.dtype(dtype))
    zarr.open_array(os.path.join(work, "0"), mode="r+")[block.core] = out
    open(_relabel_marker(work, block), "w").close()  # after the chunk is complete
    _crash_point(f"relabel:{block.linear}")
    return {"seconds": time.perf_counter() - t, "peak_rss_mib": _peak_rss_mib()}


def pyramid_chunk(start: Sequence[int], *, work: str, level: int, step: Sequence[int]) -> dict:
    """Pass 4 for one chunk of pyramid level ``level``: level - 1 downsampled by
    ``step`` per axis, nearest (the first voxel of each step block, so level k holds
    level 0's voxel at k's index times the cumulative factor). Chunk-aligned writes."""
    t = time.perf_counter()
    dst = zarr.open_array(os.path.join(work, str(level)), mode="r+")
    src = zarr.open_array(os.path.join(work, str(level - 1)), mode="r")
    region = tuple(slice(c, min(c + ch, n)) for c, ch, n in zip(start, dst.chunks, dst.shape))
    src_region = tuple(slice(r.start * k, min(r.stop * k, n)) for r, k, n in zip(region, step, src.shape))
    dst[region] = np.asarray(src[src_region])[tuple(slice(None, None, k) for k in step)]
    return {"seconds": time.perf_counter() - t, "peak_rss_mib": _peak_rss_mib()}


def _pyramid_passes(work: str, levels, client, progress: bool) -> float:
    """The label pyramid, level by level (each reads the one before); returns seconds of work."""
    import itertools
    seconds = 0.0
    for k in range(1, len(levels)):
        step = [a // b for a, b in zip(levels[k], levels[k - 1])]
        arr = zarr.open_array(os.path.join(work, str(k)), mode="r")
        starts = list(itertools.product(*(range(0, n, c) for n, c in zip(arr.shape, arr.chunks))))
        results = _compute((dask.delayed(pyramid_chunk, pure=False)(st, work=work, level=k, step=step)
                            for st in starts), client, f"pyramid {k}", progress, total=len(starts))
        seconds += sum(r["seconds"] for r in results)
        _crash_point(f"pyramid:{k}")
    return seconds


def _relabel_marker(work: str, block: Block) -> str:
    return os.path.join(work, "relabelled", str(block.linear))


# ----------------------------------------------------------------------------- driver

def _compute(tasks, client, desc: str = "", progress: bool = False, total: int | None = None) -> list:
    """Run delayed tasks on the cluster (retrying a lost worker's tasks), or in-process, in
    order; ``tasks`` may be a generator of ``total`` tasks, made only as they are
    submitted. With ``progress`` a bar of tasks done / total with rate and ETA on stderr
    (on a cluster, where stderr goes to a log file, one line every 30 s)."""
    total = len(tasks) if total is None else total
    if not total:
        return []
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    bar = tqdm(total=total, desc=desc, unit="task", disable=not progress, file=sys.stderr,
               mininterval=0.5 if tty else 30, dynamic_ncols=tty, ascii=not tty)
    try:
        if client is None:
            out = []
            for task in tasks:
                out.append(dask.compute(task, scheduler="synchronous")[0])
                bar.update(1)
            return out
        # At most MAX_IN_FLIGHT tasks are submitted at once, topped up in batches as they
        # finish, and finished results are gathered in batches: the scheduler's graph stays
        # bounded however many blocks there are (a terabyte is ~500k blocks), and the client
        # makes one round trip per batch, not per task.
        from distributed import as_completed
        out = [None] * total
        index = {}
        pending = iter(enumerate(tasks))

        def submit(n):
            batch = [item for item in (next(pending, None) for _ in range(n)) if item is not None]
            futures = client.compute([t for _, t in batch], retries=2) if batch else []
            for (i, _), f in zip(batch, futures):
                index[f.key] = i
            return futures
        first = submit(MAX_IN_FLIGHT)
        in_flight = len(first)
        running = as_completed(first)
        for batch in running.batches():
            for future, result in zip(batch, client.gather(batch)):
                out[index.pop(future.key)] = result
                future.release()
            bar.update(len(batch))
            in_flight -= len(batch)
            if in_flight <= MAX_IN_FLIGHT // 2:
                more = submit(MAX_IN_FLIGHT - in_flight)
                in_flight += len(more)
                running.update(more)
        return out
    finally:
        bar.close()


def _worker_pools(client) -> dict:
    """Whether any worker declares a GPU resource, or a CPU one (a CPU pool)."""
    pools = {"GPU": False, "CPU": False}
    if client is not None:
        for w in client.scheduler_info(n_workers=-1)["workers"].values():
            for r in pools:
                pools[r] = pools[r] or bool(w.get("resources", {}).get(r))
    return pools


def _compute_split(blocks: list, client, common: dict, pools: dict, progress: bool) -> list:
    """Pass 1 as two tasks per block: ``predict_block`` on a worker with a GPU resource,
    ``finish_block`` (affinities, watershed, writes) on a CPU-pool worker if there is one.
    While one block's watershed runs, the GPU predicts the next. Embeddings stay in
    worker memory, never on disk."""
    if not blocks:
        return []
    from distributed import as_completed
    from tqdm import tqdm
    bar = tqdm(total=len(blocks), desc="segment", unit="block", disable=not progress, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 30, ascii=not sys.stderr.isatty())
    cpu = {"CPU": 1} if pools["CPU"] else None
    out = [None] * len(blocks)
    index, held = {}, {}
    pending = iter(enumerate(blocks))

    def submit(n):
        futures = []
        for _ in range(n):
            item = next(pending, None)
            if item is None:
                break
            i, b = item
            pred = client.submit(predict_block, b, **common, resources={"GPU": 1}, retries=2, pure=False)
            fin = client.submit(finish_block, pred, b, **common, resources=cpu, retries=2, pure=False)
            index[fin.key], held[fin.key] = i, pred
            futures.append(fin)
        return futures
    # Embeddings waiting for a CPU worker sit in worker memory (tens of MB per block): keep
    # only about two blocks per worker in flight, enough for the pools to overlap.
    window = max(4, 2 * len(client.scheduler_info(n_workers=-1)["workers"]))
    try:
        running = as_completed(submit(window))
        for future in running:
            out[index.pop(future.key)] = future.result()
            held.pop(future.key).release()  # the embeddings can go
            future.release()
            bar.update(1)
            running.update(submit(1))
    finally:
        bar.close()
    return out


def _open_work(work: str, run_hash: str, overwrite: bool) -> str:
    """"new", "resume" (an interrupted run with the same fingerprint) or "finalize" (one
    that had written its labels and report but not yet moved them into place)."""
    if not os.path.exists(work):
        return "new"
    try:
        attrs = zarr.open_group(work, mode="r").attrs.asdict()
        same = attrs.get("spoco_vol_run", {}).get("hash") == run_hash
    except Exception:  # unreadable: not a run of ours, or killed while writing its metadata
        attrs, same = {}, False
    if same:
        return "finalize" if "spoco_vol" in attrs else "resume"
    if overwrite:
        shutil.rmtree(work)
        return "new"
    raise SpocoInputError(f"{work} holds an interrupted run with other settings (input, blocks, model or "
                          "parameters differ): rerun that command to finish it, or use --overwrite to discard it")


def _create_work(work: str, shape, block_shape, out_dtype: str, emb_ckpt: dict | None, factors,
                 zarr_format: int = 2, levels=()) -> None:
    group = zarr.open_group(work, mode="w", zarr_format=zarr_format)
    group.create_array("fragments", shape=shape, dtype="uint64", chunks=tuple(block_shape), fill_value=0)
    group.create_array("0", shape=shape, dtype=out_dtype, chunks=tuple(block_shape), fill_value=0)
    for k, f in enumerate(levels[1:], start=1):  # the labels' pyramid (pyramid_level)
        level_shape = [-(-n // x) for n, x in zip(shape, f)]
        group.create_array(str(k), shape=level_shape, dtype=out_dtype, fill_value=0,
                           chunks=tuple(min(b, n) for b, n in zip(block_shape, level_shape)))
    os.makedirs(os.path.join(work, "blocks"))
    os.makedirs(os.path.join(work, "relabelled"))
    if emb_ckpt is not None:
        e_dim = emb_ckpt["architecture"]["embedding_dim"]
        emb_arr = group.create_array(
            "embeddings", shape=(e_dim, *(-(-n // f) for n, f in zip(shape, factors))), dtype="float16",
            chunks=(e_dim, *(b // f for b, f in zip(block_shape, factors))), fill_value=0)
        emb_arr.attrs["spoco_vol"] = {
            "description": "SPOCO pixel embeddings (E, *spatial) on the model grid; 0 in skipped blocks",
            "input_voxels_per_element": factors, "delta_v": emb_ckpt["delta_v"], "delta_d": emb_ckpt["delta_d"]}


def _run_passes(grid: BlockGrid, roi, *, work: str, client, workers: int, block_shape, stitch_axes, depth: int,
                link: float | None, out_dtype: str, common: dict, progress: bool = False,
                cluster_config: dict | None = None, log=None, levels=((1, 1, 1),)) -> dict:
    """The passes (segment, stitch, relabel, pyramid); blocks an earlier run completed
    are not redone. Returns the report's figures."""
    stack = contextlib.ExitStack()
    if client is None and (cluster_config is not None or workers > 0):
        from .cluster import open_cluster, validate_cluster_config
        config = cluster_config or validate_cluster_config(
            {"kind": "local", "workers": workers, "threads_per_worker": common["threads"]}, "--workers")
        client = stack.enter_context(open_cluster(config, log=log))
    with stack:
        blocks = grid.blocks(roi)
        t = time.perf_counter()
        done = [r for b in blocks if (r := _done_result(work, b)) is not None]
        finished = {r["block"] for r in done}
        todo = [b for b in blocks if b.linear not in finished]
        pools = _worker_pools(client)
        if pools["GPU"]:  # prediction on the GPU workers, the rest on CPU threads/workers meanwhile
            results = done + _compute_split(todo, client, common, pools, progress)
        else:
            results = done + _compute((dask.delayed(segment_block, pure=False)(b, **common) for b in todo),
                                      client, "segment", progress, total=len(todo))
        failed = [r for r in results if "error" in r]
        if failed:
            more = f" (and {len(failed) - 1} more block(s))" if len(failed) > 1 else ""
            raise SpocoInputError(min(failed, key=lambda r: r["block"])["error"] + more)
        wall_segment = time.perf_counter() - t
        results.sort(key=lambda r: r["block"])
        t = time.perf_counter()
        # One task per block for the faces it shares with its upper neighbours (not one per
        # face): three times fewer tasks for a 3D grid.
        faces_of: dict[int, list] = {}
        for lo, up, ax in grid.faces(stitch_axes, roi):
            faces_of.setdefault(lo.linear, [lo]).append((up, ax, "stitch"))
        if link is not None:  # sections meet across z faces too
            for lo, up, _ in grid.faces([0], roi):
                faces_of.setdefault(lo.linear, [lo]).append((up, 0, "link"))
        face_results = _compute((dask.delayed(stitch_faces_of_block, pure=False)(
                                     group[0], group[1:], work=work, depth=depth, min_overlap=link)
                                 for _, group in sorted(faces_of.items())), client, "stitch", progress,
                                total=len(faces_of))
        edges = np.concatenate([f["edges"] for f in face_results]) if face_results else np.zeros((0, 2), np.uint64)
        t_merge = time.perf_counter()
        objects_per_block = [0] * len(grid)  # blocks outside the ROI hold no objects
        for r in results:
            objects_per_block[r["block"]] = r["objects"]
        tables = merge_table(objects_per_block, block_shape, edges)
        merge_seconds = time.perf_counter() - t_merge
        wall_stitch = time.perf_counter() - t
        t = time.perf_counter()
        to_relabel = [b for b in blocks if not os.path.exists(_relabel_marker(work, b))]
        relabel_results = _compute((dask.delayed(relabel_one_block, pure=False)(b, tables[b.linear], work=work,
                                                                              grid=grid, dtype=out_dtype)
                                    for b in to_relabel), client, "relabel", progress, total=len(to_relabel))
        wall_relabel = time.perf_counter() - t
        t = time.perf_counter()
        pyramid_seconds = _pyramid_passes(work, levels, client, progress)
        wall_pyramid = time.perf_counter() - t
    work_seconds = dict.fromkeys(STAGES, 0.0)
    for r in results:
        for k, v in r["timings"].items():
            work_seconds[k] += v
    work_seconds["relabel"] = float(sum(r["seconds"] for r in relabel_results))
    work_seconds["pyramid"] = float(pyramid_seconds)
    work_seconds["stitch"] += float(sum(f["seconds"] for f in face_results)) + merge_seconds
    # Block tasks run in worker processes (or here, with workers=0): their peak is what
    # a block costs; this process's own peak covers the merge table.
    worker_peak = max([r["peak_rss_mib"] for r in results + relabel_results] or [0.0])
    return {"objects": int(max((int(t.max()) for t in tables if len(t)), default=0)),
            "blocks": len(blocks), "blocks_done_before": len(done), "merges": int(len(edges)),
            "prediction_on_gpu_workers": bool(pools["GPU"]),
            "wall_seconds": {"segment": round(wall_segment, 3), "stitch+merge": round(wall_stitch, 3),
                             "relabel": round(wall_relabel, 3), "pyramid": round(wall_pyramid, 3)},
            "seconds": {k: round(v, 3) for k, v in work_seconds.items()},
            "peak_rss_mib": {"worker": round(worker_peak, 1), "client": round(_peak_rss_mib(), 1)}}


def segment_blockwise(input_path: str, output: str | None = None, model: str | None = None, *,
                      block_shape: Sequence[int] | None = None, halo: Sequence[int] | None = None,
                      mask: str | None = None, voxel_size: Sequence[float] | None = None,
                      workers: int | None = None, device: str = "auto", overwrite: bool = False,
                      stitch: bool = True, roi: str | Sequence[slice] | None = None,
                      save_embeddings: bool = False, link_sections: bool = False,
                      link_overlap: float = LINK_OVERLAP, threads_per_worker: int | None = None,
                      client=None, cluster: str | dict | None = None, command: str = "",
                      progress: bool = False, dry_run: bool = False, tta: bool | None = None,
                      intensity_range: Sequence[float] | None = None) -> dict:
    """Segment a zarr volume block by block on a dask cluster; returns a report dict.

    ``client``: a distributed Client to run on; without one, a LocalCluster of ``workers``
    processes (default: one per core) is started, or with ``workers=0`` everything runs in
    this process.
    ``threads_per_worker``: torch threads of each block task [default: the cores divided
    among the workers].
    ``roi``: only this region (``"z0:z1,y0:y1,x0:x1"`` or slices) is segmented; the output
    keeps the input's shape and is 0 elsewhere. Blocks keep the whole volume's grid, so
    inside the ROI the objects are those of a whole-volume run, cut at the ROI's border.
    ``save_embeddings``: also keep the embeddings (float16, model grid) as the output's
    ``embeddings`` array, (E, *model-grid shape), one chunk per block.
    ``link_sections``: with a 2D model on a 3D volume, join per-section objects across
    sections when their overlap covers at least ``link_overlap`` of the smaller one.
    ``cluster``: a cluster config (name or path of a YAML file in cluster_configs/, or a
    dict, see spoco_vol.cluster) to start and run on; ``workers`` (if > 0) overrides its
    worker count.
    ``progress``: progress bars of tasks done per pass, with rate and ETA, on stderr.
    An interrupted run leaves ``<output>.partial``; the same call again finishes it.
    ``tta``: test-time augmentation, 8 rotated/flipped predictions averaged (8x the
    prediction time) [default: as the model was calibrated, its ``inference.tta``].
    ``intensity_range``: the input values that map to the model's intensity range
    [default: by the input's dtype, spoco_vol.intensity; measured once over the volume].
    ``dry_run``: check everything, start and write nothing; returns the output path, the
    run's fingerprint and its hash (an existing output with that hash is this run's result).
    """
    t_start = time.perf_counter()
    cluster_config = None
    if cluster is not None and client is None:
        from .cluster import load_cluster_config, threads_per_worker as cluster_threads, validate_cluster_config
        cluster_config = (validate_cluster_config(dict(cluster)) if isinstance(cluster, dict)
                          else load_cluster_config(cluster))
        if workers is not None:  # an explicit worker count beats the file's
            cluster_config["jobs" if cluster_config["kind"] == "slurm" else "workers"] = workers
        threads_per_worker = threads_per_worker or cluster_threads(cluster_config)
        workers = cluster_config.get("jobs", cluster_config.get("workers"))
    # One single-threaded worker per core by default: the CPU stages are single-threaded,
    # so 2 workers x 1 thread beat 1 worker x 2 threads by 1.35x (benchmarks/RESULTS.md).
    workers = (os.cpu_count() or 1) if workers is None else workers
    arr = io.open_volume(input_path)
    io.validate_volume(arr, f"input {input_path}")
    output = output or default_output_path(input_path)
    check_output_path(output, input_path, overwrite)
    image = labels_of_image(output, input_path)  # the labels go into this OME-Zarr image's labels group
    out_format = io.zarr_format(arr)  # the output's zarr (and OME-Zarr) version follows the input's
    model_path = os.path.abspath(bundled.model_path(model))
    ckpt = model_mod.load_checkpoint(model_path)
    dims = ckpt["architecture"]["dims"]
    tta = model_mod.uses_tta(ckpt, tta)
    if dims > arr.ndim:
        raise SpocoInputError(f"the model is {dims}D but the input is {arr.ndim}D")
    if ckpt["architecture"]["in_channels"] != 1:
        raise SpocoInputError(f"the model expects {ckpt['architecture']['in_channels']} channels; "
                              "the input has one")
    vs = list(voxel_size) if voxel_size else io.read_voxel_size(input_path)
    if vs is not None and len(vs) != arr.ndim:
        raise SpocoInputError(f"--voxel-size needs {arr.ndim} values for this {arr.ndim}D input")
    if vs is not None and not all(np.isfinite(v) and v > 0 for v in vs):
        raise SpocoInputError(f"voxel size must be positive, got {vs}")
    if vs is None and ckpt.get("voxel_size"):
        warn(f"the voxel size of {input_path} is unknown (none in its metadata, no --voxel-size): it is segmented "
             f"as if it had the model's {io.format_voxel_size(ckpt['voxel_size'][-arr.ndim:])}, without "
             "resampling; give --voxel-size Z,Y,X in nm")
    intensity_mapping = intensity.volume_mapping(arr, ckpt["normalization"], intensity_range, f"input {input_path}")
    if mask:
        m = io.open_volume(mask, "mask")
        if tuple(m.shape) != tuple(arr.shape):
            raise SpocoInputError(f"mask shape {tuple(m.shape)} differs from the input's {tuple(arr.shape)}")
    spatial_axes = list(range(arr.ndim - dims, arr.ndim))
    scale = model_scale(vs, ckpt.get("voxel_size"), spatial_axes, arr.ndim)
    needed = required_halo(ckpt, arr.ndim, scale)
    halo = list(halo) if halo is not None else needed
    block_shape = list(block_shape) if block_shape is not None else default_block_shape(arr.shape, dims)
    if len(halo) != arr.ndim or len(block_shape) != arr.ndim:
        raise SpocoInputError(f"--block-shape and --halo need {arr.ndim} values for this {arr.ndim}D input")
    offsets = ckpt.get("inference", {}).get("offsets") or default_offsets(dims)
    reach = [0] * (arr.ndim - dims) + [int(np.ceil(max(abs(o[a]) for o in offsets) / scale[ax]))
                                       for a, ax in enumerate(spatial_axes)]
    for a in range(arr.ndim):
        if halo[a] < reach[a]:
            raise SpocoInputError(f"halo {halo[a]} along axis {a} is shorter than the longest affinity "
                                  f"offset ({reach[a]} voxels)")
        if block_shape[a] < min(arr.shape[a], max(halo[a], 1)):
            raise SpocoInputError(f"block shape {block_shape[a]} along axis {a} is smaller than the "
                                  f"halo {halo[a]} it needs")
    if link_sections:
        if not (dims == 2 and arr.ndim == 3):
            raise SpocoInputError("--link-sections joins the sections of a 2D model's result: it needs a 2D "
                                  f"model and a 3D input (got a {dims}D model, {arr.ndim}D input)")
        if not 0 < link_overlap <= 1:
            raise SpocoInputError(f"--link-overlap takes a fraction in (0, 1], got {link_overlap}")
    if isinstance(roi, str):
        roi = parse_roi(roi, arr.shape)
    roi = tuple(roi) if roi is not None else None
    factors = embedding_factors(scale)
    if save_embeddings:
        if factors is None:
            raise SpocoInputError(f"--save-embeddings needs the model grid to be an integer downsampling of "
                                  f"the input (zoom {scale})")
        if any(b % f for b, f in zip(block_shape, factors)):
            raise SpocoInputError(f"--save-embeddings: the block shape {tuple(block_shape)} must be a multiple "
                                  f"of the model's downsampling {tuple(factors)}")
    grid = BlockGrid(arr.shape, block_shape, halo, align=read_alignment(ckpt, arr.ndim, scale))
    stitch_axes = spatial_axes if stitch else []
    # Planes of the neighbour's core whose segmentation is compared: the ones next to the
    # face, where both blocks see enough context (the far halo is least reliable).
    depth = max(1, min([halo[a] for a in stitch_axes] + [block_shape[a] for a in stitch_axes] + [STITCH_DEPTH]))

    n_vox = int(np.prod([g * b for g, b in zip(grid.grid_shape, block_shape)]))
    out_dtype = "uint32" if n_vox < 2 ** 32 else "uint64"
    link = link_overlap if link_sections else None
    rule = segmentation_settings(ckpt)
    levels = label_pyramid(arr.shape, vs, io.ome_scales(io.ome_image(input_path)) if io.ome_image(input_path)
                           else None)
    fingerprint = {
        "input": os.path.abspath(input_path), "shape": list(arr.shape), "dtype": str(arr.dtype),
        "chunks": list(arr.chunks), "block_shape": list(block_shape), "halo": list(halo),
        "align": list(grid.align), "model_sha256": model_mod.checkpoint_checksum(ckpt),
        # `spoco-vol calibrate` changes these and not the weights: blocks of a partial run
        # segmented with another background rule must not be mixed with new ones.
        "background_rule": {k: rule.get(k) for k in ("background_embedding", "background_radius", "min_size")},
        "offsets": [list(map(int, o)) for o in offsets], "voxel_size": vs,
        "mask": os.path.abspath(mask) if mask else None, "roi": [[r.start, r.stop] for r in roi] if roi else None,
        "stitch": bool(stitch), "depth": depth, "link_overlap": link, "save_embeddings": bool(save_embeddings),
        "output_dtype": out_dtype, "tta": tta, "intensity": intensity_mapping, "zarr_format": out_format,
        "pyramid": levels, "version": __version__}
    run_hash = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    if dry_run:
        return {"output": output, "run_hash": run_hash, "fingerprint": fingerprint}
    work = output.rstrip(os.sep) + ".partial"
    if image is not None:
        labels_group(image, out_format)
    state = _open_work(work, run_hash, overwrite)
    try:
        if state == "new":
            _create_work(work, arr.shape, block_shape, out_dtype, ckpt if save_embeddings else None, factors,
                         out_format, levels)
            zarr.open_group(work, mode="r+").attrs["spoco_vol_run"] = {"hash": run_hash, "fingerprint": fingerprint}
        if state != "finalize":
            report = _run_passes(grid, roi, work=work, client=client, workers=workers, block_shape=block_shape,
                                 stitch_axes=stitch_axes, depth=depth, link=link, out_dtype=out_dtype,
                                 progress=progress, cluster_config=cluster_config, levels=levels,
                                 log=(lambda line: print(line, file=sys.stderr, flush=True)) if progress
                                 else (lambda line: None),
                                 common=dict(roi=roi, save_embeddings=save_embeddings, link_overlap=link,
                                             input_path=os.path.abspath(input_path), model_path=model_path,
                                             work=work, grid=grid, voxel_size=vs, device=device, depth=depth,
                                             stitch_axes=stitch_axes, tta=tta, intensity_mapping=intensity_mapping,
                                             mask_path=os.path.abspath(mask) if mask else None,
                                             threads=threads_per_worker or max(1, (os.cpu_count() or 1)
                                                                               // max(workers, 1))))
            report.update({
                "shape": list(arr.shape), "voxel_size": vs, "model": model_path,
                "model_sha256": fingerprint["model_sha256"], "command": command, "version": __version__,
                "block_shape": block_shape, "halo": halo, "roi": fingerprint["roi"], "tta": tta,
                "intensity": intensity_mapping,
                "voxels": int(np.prod([r.stop - r.start for r in roi])) if roi else int(np.prod(arr.shape)),
                "embeddings": "embeddings" if save_embeddings else None, "link_overlap": link,
                "workers": workers, "run_hash": run_hash, "resumed": state == "resume"})
            # The report in the attributes marks the labels complete; only then the scratch goes.
            write_ome_metadata(zarr.open_group(work, mode="r+"), arr.ndim, vs, report, levels, out_format,
                               source_image=image is not None)
            _crash_point("finalize")
        else:
            report = dict(zarr.open_group(work, mode="r").attrs["spoco_vol"])
        for scratch in ("blocks", "fragments", "relabelled"):  # a v2 group lists no children
            shutil.rmtree(os.path.join(work, scratch), ignore_errors=True)
        if os.path.exists(output):
            shutil.rmtree(output)  # check_output_path allowed it: a zarr store, and --overwrite
        os.replace(work, output)
        if image is not None:
            register_label(image, os.path.basename(output.rstrip(os.sep)), out_format)
    except SpocoInputError:
        shutil.rmtree(work, ignore_errors=True)  # bad input found inside a block: leave nothing behind
        raise
    # Any other interruption (kill, Ctrl-C, a lost cluster) keeps <output>.partial: the same
    # command resumes from the blocks it completed.
    report["total_seconds"] = round(time.perf_counter() - t_start, 3)
    report["output"] = output
    return report


def format_report(report: dict) -> str:
    """The end-of-run table: per stage seconds of work, share and Mvox/s; objects; memory."""
    lines = [f"wrote {report['output']}: {report['objects']} objects, shape {tuple(report['shape'])}"]
    if "blocks" in report:
        lines.append(f"{report['blocks']} blocks of {tuple(report['block_shape'])}, halo {tuple(report['halo'])}, "
                     f"{report['merges']} merges across faces, {report.get('workers', 1)} worker(s)"
                     + (", test-time augmentation (8 views)" if report.get("tta") else ""))
    total = sum(report["seconds"].values()) or 1.0
    mvox = float(report.get("voxels") or np.prod(report["shape"])) / 1e6
    lines.append(f"{'stage':<10}{'seconds':>9}{'share':>8}{'Mvox/s':>9}")
    for stage, s in report["seconds"].items():
        rate = f"{mvox / s:>9.2f}" if s > 0 else f"{'-':>9}"
        lines.append(f"{stage:<10}{s:>9.2f}{100 * s / total:>7.0f}%{rate}")
    peak = report.get("peak_rss_mib", {})
    lines.append(f"total {report['total_seconds']:.1f} s wall; peak RSS {peak.get('worker', float('nan')):.0f} MiB "
                 f"per worker, {_peak_rss_mib():.0f} MiB in this process")
    return "\n".join(lines)


def _peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
