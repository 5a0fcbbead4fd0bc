"""The passes of a blockwise run and their tasks (what a worker does for one block).

1. segment: read core + halo -> embeddings -> affinities -> Mutex Watershed -> the core's
   fragments (global ids) into ``fragments``, the face evidence into a side file.
2. stitch: per block, merge edges across the faces it shares with its upper neighbours.
3. relabel: per block, fragments -> final consecutive ids through the merge table.
4. pyramid: the labels' lower-resolution levels, chunk by chunk.
Each task reads its inputs, calls the pure functions of tasks.py, and writes only its
own chunk, so the result does not depend on the order in which blocks finish. A block
finished by an earlier (interrupted) run is not redone.
"""
from __future__ import annotations

import functools
import itertools
import os
import signal
import time

import numpy as np

from .. import checkpoint, io, stitching
from ..errors import SpocoInputError
from ..blocks import intersect
from ..pipeline import restore_labels
from ..stitching import block_id_offset, merge_table, relabel_block
from . import tasks
from .executor import Executor, TaskFailed, on_gpu_worker
from .plan import SegmentPlan
from .report import STAGES, Tally, peak_rss_mib
from .workdir import WorkDir

RESUME_BATCH = 1024  # finished blocks whose object counts one task of the resume pass reads


def _plan_model(plan: SegmentPlan, with_momentum: bool = False):
    """The plan's checkpoint (with its overrides) and networks, loaded once per worker."""
    return _load_model(plan.model_path, with_momentum, plan.overrides)


@functools.lru_cache(maxsize=4)
def _load_model(path: str, with_momentum: bool = False, overrides: tuple = ()):
    """One model load per worker process, not per block: the checkpoint and its networks
    (embeddings, foreground classifier, and for consistency clustering the momentum one)."""
    from ..inference import for_inference
    model = checkpoint.load(path).with_segment_overrides(overrides)
    nets = (model.network(), model.foreground_network(), model.momentum_network() if with_momentum else None)
    return model, tuple(for_inference(n) if n is not None else None for n in nets)


def _crash_point(name: str) -> None:
    """Fault injection for the resume tests: with SPOCO_VOL_CRASH_AT=<name> the process
    kills itself (SIGKILL, as a node failure would) when it reaches that point."""
    if os.environ.get("SPOCO_VOL_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- pass 1

def read_affinities(block, plan: SegmentPlan, timings: dict) -> tasks.Prediction:
    """Pass 1 of a run on given affinities: read them over core + halo, check them."""
    t = time.perf_counter()
    aff = np.asarray(io.open_volume(plan.affinities)[(slice(None),) + block.read])
    where = f"block {block.index} (voxels {tasks.region_text(block.read)})"
    # One pass each for the smallest and largest value: NaN shows in both, and the
    # largest says whether the block holds anything.
    lo, hi = aff.min(), aff.max()
    if aff.dtype != np.uint8 and not (np.isfinite(lo) and np.isfinite(hi)):
        raise SpocoInputError(f"affinities contain NaN or inf in {where}")
    if aff.dtype != np.uint8 and (lo < 0 or hi > 1):
        raise ValueError(f"affinities outside [0, 1] in {where}: {lo:g}..{hi:g}")
    mask = None
    if hi > 0 and plan.mask_path:
        mask = np.asarray(io.open_volume(plan.mask_path, "mask")[block.read]) != 0
    timings["read"] += time.perf_counter() - t
    # all 0 (a block `segment --save-affinities` skipped) or masked out: nothing to do
    if hi == 0 or (mask is not None and not mask[tasks.relative(block.core, block.read)].any()):
        return tasks.Prediction(None, timings)
    if aff.dtype == np.uint8:
        aff = aff.astype(np.float32) / np.float32(255)
    return tasks.Prediction(None, timings, affinities=aff.astype(np.float32, copy=False), mask=mask)


def predict_block(linear: int, plan: SegmentPlan, threads: int) -> tasks.Prediction:
    """Pass 1, the GPU part: read core + halo, check it, embed it (model grid); or, in a
    run on given affinities, read those."""
    pred = _predict_block(linear, plan, threads)
    pred.on_gpu_worker = on_gpu_worker()
    return pred


def _predict_block(linear: int, plan: SegmentPlan, threads: int) -> tasks.Prediction:
    timings = dict.fromkeys(STAGES, 0.0)
    if plan.affinities:
        return read_affinities(plan.grid.block_at(linear), plan, timings)
    if threads:
        import torch
        torch.set_num_threads(threads)  # workers share the cores instead of oversubscribing them
    block = plan.grid.block_at(linear)
    t = time.perf_counter()
    model, networks = _plan_model(plan, plan.clustering == "consistency")
    raw = np.asarray(io.open_volume(plan.input_path)[(slice(None),) * (plan.channels > 1) + block.read])
    io.check_finite(raw, "input", f"block {block.index} (voxels {tasks.region_text(block.read)})")
    skip = not raw.any()
    mask = None
    if plan.mask_path and not skip:
        mask = np.asarray(io.open_volume(plan.mask_path, "mask")[block.read])
        skip = not mask[tasks.relative(block.core, block.read)].any()
    timings["read"] += time.perf_counter() - t
    if skip:
        return tasks.Prediction(None, timings)
    return tasks.predict_block(raw, block, plan, model, networks, timings, mask)


def finish_block(pred: tasks.Prediction, linear: int, plan: SegmentPlan, threads: int = 0) -> dict:
    """Pass 1, the CPU part: fragments and face evidence, written; the side file last."""
    block = plan.grid.block_at(linear)
    work = WorkDir(plan.work)
    model = None if plan.affinities else _plan_model(plan, plan.clustering == "consistency")[0]
    if plan.seams == "graph":
        return _finish_graph_block(pred, block, plan, model, work)
    frag = tasks.block_fragments(pred, block, plan, model)
    timings = frag.timings
    t = time.perf_counter()
    _save_requested(pred, block, plan, model, work)
    work.array("fragments", "r+")[block.core] = frag.core
    timings["write"] += time.perf_counter() - t
    result = {"block": linear, "objects": frag.n_objects, "timings": timings, "peak_rss_mib": peak_rss_mib(),
              **_where_it_ran(pred)}
    work.write_block_record(linear, frag.n_objects, frag.faces, result)  # the block's done marker
    _crash_point(f"segment:{linear}")
    return result


def _where_it_ran(pred: tasks.Prediction) -> dict:
    return {"predicted_on_gpu_worker": pred.on_gpu_worker, "finished_on_gpu_worker": on_gpu_worker()}


def _save_requested(pred: tasks.Prediction, block, plan: SegmentPlan, model, work: WorkDir) -> None:
    """--save-embeddings, --save-affinities: the core's share, written."""
    if plan.save_embeddings and pred.networks is not None:
        where, values = tasks.core_embeddings(pred.networks.embeddings, block, plan.embedding_factors)
        work.array("embeddings", "r+")[where] = values
    if plan.save_affinities and pred.networks is not None:
        where, values, foreground = tasks.core_affinities(pred.networks, block, plan, model)
        work.array("affinities", "r+")[where] = values
        work.array("foreground", "r+")[where[1:]] = foreground


def _finish_graph_block(pred: tasks.Prediction, block, plan: SegmentPlan, model, work: WorkDir) -> dict:
    """Pass 1 with graph seams: the block's view (its segments over the read region) in
    its side file, and in a model run its core's affinities; fragments come in pass 2."""
    timings = pred.timings
    empty = pred.networks is None and pred.affinities is None
    view = None if empty else tasks.block_view(pred, block, plan, model)
    t = time.perf_counter()
    _save_requested(pred, block, plan, model, work)
    if pred.networks is not None:
        work.array("graph_affinities", "r+")[(slice(None), *plan.model_region(block.core))] = \
            tasks.core_graph_affinities(pred.networks, block, plan, model)
    timings["write"] += time.perf_counter() - t
    # the block's fragments, and so its count, come from pass 2a
    result = {"block": block.linear, "objects": 0, "timings": timings, "peak_rss_mib": peak_rss_mib(),
              **_where_it_ran(pred)}
    work.write_block_record(block.linear, 0, {} if view is None else {"view": view}, result)
    _crash_point(f"segment:{block.linear}")
    return result


def segment_block(linear: int, plan: SegmentPlan, threads: int) -> dict:
    """Pass 1 for one block in one task: prediction, then the CPU part."""
    return finish_block(predict_block(linear, plan, threads), linear, plan)


def count_objects(linears: list, plan: SegmentPlan) -> np.ndarray:
    """The resume pass: object counts of blocks an earlier run finished."""
    return WorkDir(plan.work).object_counts(linears)


# ----------------------------------------------------------------------------- pass 2

def stitch_block(job: tuple, plan: SegmentPlan) -> dict:
    """Pass 2 for the faces a block shares with its upper neighbours: ``job`` is (lower,
    [(upper, axis, "stitch" | "link"), ...]). Merge edges from halo agreement and face
    affinity, or section links across a z face (--link-sections)."""
    lower_linear, faces = job
    t = time.perf_counter()
    work = WorkDir(plan.work)
    lower = plan.grid.block_at(lower_linear)
    frag = work.array("fragments")
    edges, own = [], None
    for upper_linear, axis, kind in faces:
        upper = plan.grid.block_at(upper_linear)
        if kind == "link":  # the lower block's last core section and the upper block's first
            last = np.asarray(frag[tasks.face_region(upper, 0, -1, 1)])[0]
            first = np.asarray(frag[tasks.face_region(lower, 0, +1, 1)])[0]
            edges.append(stitching.section_overlap_edges(last, first, plan.link_overlap))
            continue
        own = own if own is not None else work.read_faces(lower_linear)
        other = work.read_faces(upper_linear)
        if int(own["n_objects"]) == 0 or int(other["n_objects"]) == 0:
            continue
        upper_core = np.asarray(frag[tasks.face_region(lower, axis, +1, plan.depth)])
        lower_core = np.asarray(frag[tasks.face_region(upper, axis, -1, plan.depth)])
        edges.append(tasks.face_edges(own, other, upper_core, lower_core, axis))
    _crash_point("stitch")
    return {"edges": np.concatenate(edges) if edges else np.zeros((0, 2), np.uint64),
            "seconds": time.perf_counter() - t}


def stitch_jobs(plan: SegmentPlan):
    """One job per block with upper neighbours (not one per face: three times fewer
    tasks for a 3D grid), made one at a time."""
    grid = plan.grid
    for b in grid.linear_indices(plan.roi):
        faces = [(up, a, "stitch") for up, a in grid.upper_neighbours(b, plan.stitch_axes, plan.roi)]
        if plan.link_overlap is not None:  # sections meet across z faces too
            faces += [(up, 0, "link") for up, _ in grid.upper_neighbours(b, [0], plan.roi)]
        if faces:
            yield b, faces


def count_stitch_jobs(plan: SegmentPlan) -> int:
    ranges = plan.grid.index_ranges(plan.roi)
    axes = set(plan.stitch_axes) | ({0} if plan.link_overlap is not None else set())
    if not axes:
        return 0
    # blocks with no upper neighbour along any of the axes: the last index on all of them
    without = int(np.prod([1 if a in axes else len(r) for a, r in enumerate(ranges)]))
    return int(np.prod([len(r) for r in ranges])) - without


# ----------------------------------------------------------------------------- pass 2, graph seams

def graph_fragments(linear: int, plan: SegmentPlan) -> dict:
    """Pass 2a with graph seams: the block's fragments (stitching.intersect_views of its
    own view and every neighbour view that reaches into its core), written with the
    block's global ids; their count and voxel counts."""
    t = time.perf_counter()
    work, grid = WorkDir(plan.work), plan.grid
    block = grid.block_at(linear)
    own = work.read_view(linear)
    core = plan.model_region(block.core)  # all of it on the model grid
    sizes = np.zeros(0, np.int64)
    local = np.zeros(tuple(c.stop - c.start for c in core), np.uint64)
    if own is not None:
        views = []
        for other in grid.reading(block.core, plan.roi):
            if other.linear == linear:
                continue
            view, read = work.read_view(other.linear), plan.model_region(other.read)
            inside = intersect(read, core)
            if view is not None and inside is not None:
                views.append((tasks.relative(inside, core), view[tasks.relative(inside, read)]))
        local, sizes = stitching.intersect_views(own[tasks.relative(core, plan.model_region(block.read))], views)
    out = local
    if len(sizes):
        out = np.where(local != 0, local + np.uint64(block_id_offset(linear, plan.block_shape)), np.uint64(0))
    work.array("fragments", "r+")[core] = out
    return {"objects": len(sizes), "sizes": sizes, "seconds": time.perf_counter() - t}


def graph_edges(linear: int, plan: SegmentPlan) -> dict:
    """Pass 2b with graph seams: the fragment graph's edges that the block's core voxels
    own (stitching.fragment_edges), from the affinities kept in pass 1 (a model run) or
    the given ones."""
    t = time.perf_counter()
    work, block = WorkDir(plan.work), plan.grid.block_at(linear)
    offsets, strides = plan.offsets, plan.strides
    core = plan.model_region(block.core)
    if plan.affinities:
        aff = np.asarray(io.open_volume(plan.affinities)[(slice(None), *core)])
        aff = aff.astype(np.float32) / np.float32(255) if aff.dtype == np.uint8 else aff.astype(np.float32)
    else:
        inf = _plan_model(plan)[0].inference
        offsets, strides = inf.offsets, inf.strides
        aff = np.asarray(work.array("graph_affinities")[(slice(None), *core)])
    reach = [max(abs(o[a]) for o in offsets) for a in range(len(plan.shape))]
    region = tuple(slice(max(c.start - r, 0), min(c.stop + r, n)) for c, r, n in zip(core, reach, plan.model_shape))
    frag = np.asarray(work.array("fragments")[region])
    edges = stitching.fragment_edges(frag, tasks.relative(core, region), aff, offsets,
                                     origin=[r.start for r in region], bias=plan.bias, strides=strides)
    _crash_point("edges")
    return {**edges, "seconds": time.perf_counter() - t}


def _graph_table(plan: SegmentPlan, run, objects_per_block: np.ndarray, tally: Tally) -> tuple:
    """Passes 2a and 2b with graph seams, then one Mutex Watershed over all fragments on
    the client: (MergeTable, fragments, graph edges)."""
    grid = plan.grid
    n_blocks = grid.count(plan.roi)
    sizes = [np.zeros(0, np.int64)] * len(grid)
    seconds = 0.0
    for b, r in run("fragments", graph_fragments, grid.linear_indices(plan.roi), plan, total=n_blocks):
        objects_per_block[b], sizes[b] = r["objects"], r["sizes"]
        seconds += r["seconds"]
    kinds = {"attractive": ([], []), "repulsive": ([], [])}
    for _, r in run("edges", graph_edges, grid.linear_indices(plan.roi), plan, total=n_blocks):
        for kind, (uv, w) in kinds.items():
            uv.append(r[kind][0])
            w.append(r[kind][1])
        seconds += r["seconds"]
    t = time.perf_counter()
    min_size = plan.min_size if plan.affinities else plan.background_rule["min_size"]
    edges = {k: (np.concatenate(uv), np.concatenate(w)) for k, (uv, w) in kinds.items()}
    table = stitching.graph_merge_table(objects_per_block, plan.block_shape, edges["attractive"],
                                        edges["repulsive"], np.concatenate(sizes), min_size)
    tally.add(stitch=seconds + time.perf_counter() - t)
    return table, int(objects_per_block.sum()), sum(len(uv) for uv, _ in edges.values())


# ----------------------------------------------------------------------------- pass 3, 4

def relabel_one_block(job: tuple, plan: SegmentPlan) -> dict:
    """Pass 3 for one block (``job``: its number and its slice of the merge table):
    final ids, written chunk-aligned into dataset "0"."""
    linear, table = job
    t = time.perf_counter()
    work = WorkDir(plan.work)
    block = plan.grid.block_at(linear)
    if plan.seams == "graph":  # fragments on the model grid: each model voxel's block of input voxels
        frag = np.asarray(work.array("fragments")[plan.model_region(block.core)])
        out = relabel_block(frag, linear, plan.block_shape, table, dtype=np.dtype(plan.out_dtype))
        out = tasks.zero_outside(restore_labels(out, block.core_shape, plan.scale), block.core, plan.roi)
    else:
        frag = np.asarray(work.array("fragments")[block.core])
        out = relabel_block(frag, linear, plan.block_shape, table, dtype=np.dtype(plan.out_dtype))
    work.array("0", "r+")[block.core] = out
    work.mark_relabelled(linear)  # after the chunk is complete
    _crash_point(f"relabel:{linear}")
    return {"seconds": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib()}


def pyramid_chunk(job: tuple, plan: SegmentPlan) -> dict:
    """Pass 4 for one chunk of a pyramid level (``job``: level, chunk start, step): the
    level before downsampled by ``step`` per axis, nearest (the first voxel of each step
    block, so level k holds level 0's voxel at k's index times the cumulative factor)."""
    level, start, step = job
    t = time.perf_counter()
    work = WorkDir(plan.work)
    dst, src = work.array(str(level), "r+"), work.array(str(level - 1))
    region = tuple(slice(c, min(c + ch, n)) for c, ch, n in zip(start, dst.chunks, dst.shape))
    src_region = tuple(slice(r.start * k, min(r.stop * k, n)) for r, k, n in zip(region, step, src.shape))
    dst[region] = tasks.downsample_nearest(np.asarray(src[src_region]), step)
    return {"seconds": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib()}


# ----------------------------------------------------------------------------- the run

class PassFailed(Exception):
    """A task that kept failing: ``what`` names it and its region for the user, ``name``
    is the stem of its error file, ``failure`` the executor's TaskFailed."""

    def __init__(self, what: str, name: str, failure: TaskFailed):
        super().__init__(f"{what}: {failure.error}")
        self.what, self.name, self.failure = what, name, failure


def _describe(pass_name: str, item, plan: SegmentPlan) -> tuple[str, str]:
    """(what failed, in words; a file-name stem) for an item of a pass."""
    if pass_name == "resume":
        return f"reading the records of finished blocks {item[0]}-{item[-1]}", f"resume-{item[0]}"
    if pass_name.startswith("pyramid"):
        level, start, _ = item
        return f"pyramid level {level}, chunk at {tuple(start)}", f"pyramid-{level}-{'-'.join(map(str, start))}"
    linear = item if pass_name in ("segment", "fragments", "edges") else item[0]
    block = plan.grid.block_at(linear)
    region = block.read if pass_name == "segment" else block.core
    what = {"segment": "block", "stitch": "stitching the faces of block", "relabel": "relabelling block",
            "fragments": "the fragments of block", "edges": "the graph edges of block"}[pass_name]
    return f"{what} {block.index} (voxels {tasks.region_text(region)})", f"{pass_name}-{linear}"


def run_passes(plan: SegmentPlan, executor: Executor, threads: int, log=lambda line: None) -> dict:
    """The passes; blocks an earlier run completed are not redone. Returns the report's
    figures. A task that keeps failing raises PassFailed, with everything finished kept
    in the work directory."""
    work = WorkDir(plan.work)
    grid = plan.grid
    tally = Tally()

    def run(pass_name, fn, items, *args, total, split=None):
        """executor.map (or map_split with ``split``, the CPU half) of one pass; a task
        that keeps failing becomes PassFailed, naming it."""
        try:
            if split is not None:
                yield from executor.map_split(fn, split, items, *args, total=total, desc=pass_name)
            else:
                yield from executor.map(fn, items, *args, total=total, desc=pass_name)
        except TaskFailed as failure:
            raise PassFailed(*_describe(pass_name, failure.item, plan), failure) from None
    objects_per_block = np.zeros(len(grid), np.int64)  # blocks outside the ROI hold no objects
    n_blocks = grid.count(plan.roi)

    t = time.perf_counter()
    finished = work.finished_blocks()
    done = sorted(finished.intersection(grid.linear_indices(plan.roi))) if finished else []
    if done:  # the resume pass: the finished blocks' object counts, read in parallel
        batches = [done[i:i + RESUME_BATCH] for i in range(0, len(done), RESUME_BATCH)]
        for batch, counts in run("resume", count_objects, batches, plan, total=len(batches)):
            objects_per_block[batch] = counts
        log(f"resuming: {len(done)} of {n_blocks} blocks were finished before")
    finished = set(done)
    todo = (b for b in grid.linear_indices(plan.roi) if b not in finished)  # made as they are submitted
    pools = executor.pools()
    if pools["GPU"]:  # prediction on the GPU workers, the rest on CPU workers meanwhile
        results = run("segment", predict_block, todo, plan, threads, total=n_blocks - len(done), split=finish_block)
    else:
        results = run("segment", segment_block, todo, plan, threads, total=n_blocks - len(done))
    on_gpu = {"predicted": 0, "finished": 0}  # blocks of this run whose half ran on a GPU worker
    for b, r in results:
        objects_per_block[b] = r["objects"]
        tally.add(r["timings"], r["peak_rss_mib"])
        for half in on_gpu:
            on_gpu[half] += r[f"{half}_on_gpu_worker"]
    wall_segment = time.perf_counter() - t

    t = time.perf_counter()
    graph = {}
    if plan.seams == "graph":
        table, fragments, graph_edges_n = _graph_table(plan, run, objects_per_block, tally)
        merges = fragments - table.clusters
        graph = {"seams": "graph", "fragments": fragments, "graph_edges": graph_edges_n}
    else:
        edges, stitch_seconds = [], 0.0
        for _, r in run("stitch", stitch_block, stitch_jobs(plan), plan, total=count_stitch_jobs(plan)):
            if len(r["edges"]):
                edges.append(r["edges"])
            stitch_seconds += r["seconds"]
        edges = np.concatenate(edges) if edges else np.zeros((0, 2), np.uint64)
        t_merge = time.perf_counter()
        table = merge_table(objects_per_block, plan.block_shape, edges)
        tally.add(stitch=stitch_seconds + time.perf_counter() - t_merge)
        merges = int(len(edges))
    wall_stitch = time.perf_counter() - t

    t = time.perf_counter()
    relabelled = work.relabelled_blocks()
    jobs = ((b, table[b]) for b in grid.linear_indices(plan.roi) if b not in relabelled)
    for _, r in run("relabel", relabel_one_block, jobs, plan, total=n_blocks - len(relabelled)):
        tally.add(relabel=r["seconds"], peak=r["peak_rss_mib"])
    wall_relabel = time.perf_counter() - t

    t = time.perf_counter()
    for level in range(1, len(plan.pyramid)):  # each level reads the one before
        step = [a // b for a, b in zip(plan.pyramid[level], plan.pyramid[level - 1])]
        arr = work.array(str(level))
        starts = list(itertools.product(*(range(0, n, c) for n, c in zip(arr.shape, arr.chunks))))
        for _, r in run(f"pyramid {level}", pyramid_chunk, ((level, st, step) for st in starts), plan,
                        total=len(starts)):
            tally.add(pyramid=r["seconds"])
        _crash_point(f"pyramid:{level}")
    wall_pyramid = time.perf_counter() - t
    return {"objects": table.objects, "blocks": n_blocks, "blocks_done_before": len(done),
            "merges": merges, **graph,
            "blocks_predicted_on_gpu_workers": on_gpu["predicted"],
            "blocks_finished_on_gpu_workers": on_gpu["finished"],
            "wall_seconds": {"segment": round(wall_segment, 3), "stitch+merge": round(wall_stitch, 3),
                             "relabel": round(wall_relabel, 3), "pyramid": round(wall_pyramid, 3)},
            "seconds": {k: round(v, 3) for k, v in tally.seconds.items()},
            # Block tasks run in worker processes (or here, with workers=0): their peak is
            # what a block costs; this process's own peak covers the merge table.
            "peak_rss_mib": {"worker": round(tally.worker_peak, 1), "client": round(peak_rss_mib(), 1)}}
