"""Evaluating two label volumes of any size: the dask graph over their blocks
(``evaluate_zarr``: two zarr paths, what `spoco-vol evaluate` runs).

Each task reads one block of both volumes and returns its contingency table
(evaluation.contingency); tables are merged in a tree of tasks (evaluation.merge_tables,
a fixed fan-in), so no task holds more than a block and a few tables, and the metrics of
the merged table are exactly those of the whole volumes (evaluation.metrics_from_table).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import dask
import numpy as np

from . import io
from .errors import SpocoInputError, warn
from .evaluation import contingency, merge_tables, metrics_from_table

BLOCK_VOXELS = 2 * 2 ** 20  # per task: ~150 bytes of working memory per voxel (300 MB)
FAN_IN = 8                  # tables merged per task


def evaluation_blocks(shape: Sequence[int], chunks: Sequence[int], block_voxels: int = BLOCK_VOXELS) -> list:
    """Blocks (tuples of slices) of at most about ``block_voxels``: whole chunks, grouped
    along the leading axes while they fit; a chunk larger than that is cut along its
    first axis (read twice, decoded twice: memory is what is bounded)."""
    block = list(chunks)
    if np.prod(block) > block_voxels:
        block[0] = max(1, block_voxels // int(np.prod(block[1:])))
    for axis in range(len(shape)):  # grow the first axes in whole chunks
        while block[axis] < shape[axis] and np.prod(block) * 2 <= block_voxels:
            block[axis] = min(shape[axis], block[axis] + chunks[axis])
    starts = itertools.product(*(range(0, n, b) for n, b in zip(shape, block)))
    return [tuple(slice(s, min(s + b, n)) for s, b, n in zip(st, block, shape)) for st in starts]


def _block_table(pred_path: str, gt_path: str, region, per_section: bool, shape):
    pred = np.asarray(io.open_volume(pred_path, "prediction")[region])
    gt = np.asarray(io.open_volume(gt_path, "ground truth")[region])
    table = contingency(pred, gt, per_section, offset=[r.start for r in region], shape=shape)
    del pred, gt
    _return_freed_memory()
    return table


def _return_freed_memory() -> None:
    """Give the block's freed working memory back to the system. glibc keeps freed
    memory in per-thread arenas: with two threads the peak RSS of a 2 GiB evaluation was
    2.0 GiB without this and 0.7 GiB with it (benchmarks/RESULTS.md)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _merge(*tables):
    return merge_tables(tables)


def evaluate_volumes(pred_path: str, gt_path: str, per_section: bool = False, *,
                     block_voxels: int = BLOCK_VOXELS, scheduler: str | None = "threads",
                     num_workers: int | None = None) -> dict:
    """All metrics of evaluation.evaluate_segmentation for two zarr label volumes,
    computed block by block with bounded memory. ``scheduler``/``num_workers``: dask's
    (threads by default; None: the active distributed client, if any)."""
    p, g = io.open_volume(pred_path, "prediction"), io.open_volume(gt_path, "ground truth")
    io.validate_volume(p, f"prediction {pred_path}", integer=True)
    io.validate_volume(g, f"ground truth {gt_path}", integer=True)
    if tuple(p.shape) != tuple(g.shape):
        raise SpocoInputError(f"prediction shape {tuple(p.shape)} does not match ground truth shape "
                              f"{tuple(g.shape)}")
    if per_section and p.ndim != 3:
        raise SpocoInputError(f"--per-section needs 3D (z, y, x) volumes, got shape {tuple(p.shape)}")
    shape = tuple(p.shape)
    tasks = [dask.delayed(_block_table, pure=True)(pred_path, gt_path, region, per_section, shape)
             for region in evaluation_blocks(shape, p.chunks, block_voxels)]
    while len(tasks) > 1:
        tasks = [dask.delayed(_merge, pure=True)(*tasks[i:i + FAN_IN]) for i in range(0, len(tasks), FAN_IN)]
    kwargs = {} if scheduler is None else {"scheduler": scheduler}
    if num_workers:
        kwargs["num_workers"] = num_workers
    (table,) = dask.compute(tasks[0], **kwargs)
    return metrics_from_table(table)


def evaluate_zarr(pred: str, gt: str, per_section: bool = False, **kwargs) -> dict:
    """``evaluate_segmentation`` of two zarr label volumes (paths), block by block with
    bounded memory (evaluation_blockwise). Without ``per_section``, a prediction whose
    objects each lie in one section (a 2D model's) against ground truth whose objects
    span sections gets one warning that --per-section is probably meant."""
    metrics = evaluate_volumes(pred, gt, per_section, **kwargs)
    p_single = metrics.pop("pred_single_section_share", None)
    g_single = metrics.pop("gt_single_section_share", None)
    if not per_section and p_single is not None and p_single >= 0.95 and g_single < 0.5:
        warn(f"{p_single:.0%} of the predicted objects lie in one section each (a 2D model's result) but "
             f"{1 - g_single:.0%} of the ground-truth objects span several: --per-section (2D objects per "
             "section) is probably meant")
    return metrics
