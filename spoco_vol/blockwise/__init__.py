"""Blockwise segmentation of volumes larger than memory, on a dask cluster.

One concern per module:
- ``plan.py``: ``build_plan`` checks everything and decides the run: a frozen
  ``SegmentPlan`` whose fingerprint is the run hash;
- ``tasks.py``: the block functions, arrays in, arrays out;
- ``passes.py``: the passes (segment, stitch, relabel, pyramid) and their tasks' I/O;
- ``workdir.py``: ``<output>.partial``: done markers, side files, error files, finalize;
- ``executor.py``: bounded submission, retries, GPU/CPU pools;
- ``report.py``: the end-of-run table.

Failure semantics (docs/blockwise.md):
- an error found while planning (paths, shapes, dtypes, settings, checkpoint) is one
  SpocoInputError line, and nothing is written;
- an exception inside a task goes to dask, which retries it; a task that still fails
  stops the run with one SpocoRunError line naming the block, its region and the cause,
  its traceback in ``<output>.partial/errors/``; every finished block is kept;
- SIGTERM (walltime, pre-emption) and SIGINT stop the run the same way;
- in every case the same command resumes the run, redoing only unfinished blocks, and a
  command whose output is already complete (same settings) says so and does nothing.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Sequence

from .. import __version__
from ..errors import SpocoInputError, SpocoRunError
from ..pipeline import labels_group, write_ome_metadata
from .executor import Executor
from .passes import PassFailed, _crash_point, run_passes
from .plan import LINK_OVERLAP, SegmentPlan, build_affinity_plan, build_plan, required_halo
from .report import format_report
from .workdir import WorkDir, completed_report

__all__ = ["segment_blockwise", "segment_affinities_blockwise", "build_plan", "build_affinity_plan", "run_plan",
           "SegmentPlan", "format_report", "required_halo"]


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


@contextlib.contextmanager
def _sigterm_stops_the_run():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(plan: SegmentPlan, cause: str, exit_code: int) -> SpocoRunError:
    work = WorkDir(plan.work)
    try:
        n = len(work.finished_blocks())
        kept = f"{plan.work} keeps the {n} of {plan.grid.count(plan.roi)} blocks segmented so far"
    except OSError:
        kept = f"{plan.work} keeps what was finished"
    return SpocoRunError(f"{cause}; {kept}: run the same command again to resume", plan.work, exit_code)


def run_plan(plan: SegmentPlan, *, client=None, cluster_config: dict | None = None, workers: int = 0,
             threads_per_worker: int | None = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Run a plan (module docstring: failure semantics); returns the run's report."""
    t_start = time.perf_counter()
    # --overwrite recomputes even a complete output: its input may have been repaired in place.
    done = None if overwrite else completed_report(plan)
    if done is not None:
        return {**done, "already_complete": True, "output": plan.output,
                "total_seconds": round(time.perf_counter() - t_start, 3)}
    if os.path.exists(plan.output) and not overwrite:
        raise SpocoInputError(f"output {plan.output} exists, made with other settings (use --overwrite to "
                              "replace it)")
    work = WorkDir(plan.work)
    if plan.image is not None:
        labels_group(plan.image, plan.zarr_format)
    state = work.state(plan, overwrite)
    if state == "new":
        work.create(plan)
    if state == "finalize":
        report = work.report()
    else:
        log = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // max(workers, 1))
        try:
            with _sigterm_stops_the_run(), _cluster(client, cluster_config, workers, threads, log) as client:
                figures = run_passes(plan, Executor(client, progress=progress), threads, log)
        except PassFailed as exc:
            f = exc.failure
            path = work.write_error(exc.name, f"{exc.what}\n{f.traceback_text}")
            where = f"traceback in {path}" if path else "its traceback could not be written either"
            raise SpocoRunError(f"{exc.what} failed {f.attempts} times: {f.error} ({where}); {plan.work} keeps "
                                "every finished block: fix the cause and run the same command again to finish the "
                                "run", plan.work) from None
        except KeyboardInterrupt:
            raise _stopped(plan, "interrupted (SIGINT)", 130) from None
        except _Terminated:
            raise _stopped(plan, "terminated (SIGTERM)", 143) from None
        report = {**figures, "shape": list(plan.shape), "voxel_size": list(plan.voxel_size) if plan.voxel_size
                  else None, **({"affinities": plan.affinities, "offsets": [list(o) for o in plan.offsets],
                                  "bias": list(plan.bias) if plan.bias else None} if plan.affinities else
                                 {"model": plan.model_path, "model_sha256": plan.model_sha256,
                                  **({"model_overrides": dict(plan.overrides)} if plan.overrides else {})}),
                  "command": plan.command, "saved_affinities": plan.save_affinities,
                  "version": __version__, "block_shape": list(plan.block_shape), "halo": list(plan.halo),
                  "roi": plan.fingerprint()["roi"], "tta": plan.tta, "intensity": plan.intensity,
                  "voxels": plan.voxels, "embeddings": "embeddings" if plan.save_embeddings else None,
                  "link_overlap": plan.link_overlap, "workers": workers, "run_hash": plan.run_hash,
                  "resumed": state == "resume"}
        # The report in the attributes marks the labels complete; only then the scratch goes.
        work.mark_complete(lambda group: write_ome_metadata(group, len(plan.shape), plan.voxel_size, report,
                                                            plan.pyramid, plan.zarr_format,
                                                            source_image=plan.image is not None))
        _crash_point("finalize")
    work.finalize(plan)
    report["total_seconds"] = round(time.perf_counter() - t_start, 3)
    report["output"] = plan.output
    return report


@contextlib.contextmanager
def _cluster(client, cluster_config: dict | None, workers: int, threads: int, log):
    """The client to run on: the caller's, a started cluster's, or None (this process)."""
    if client is not None or (cluster_config is None and workers <= 0):
        yield client
        return
    from ..cluster import open_cluster, validate_cluster_config
    config = cluster_config or validate_cluster_config(
        {"kind": "local", "workers": workers, "threads_per_worker": threads}, "--workers")
    with open_cluster(config, log=log) as started:
        yield started


def segment_blockwise(input_path: str, output: str | None = None, model: str | None = None, *,
                      block_shape: Sequence[int] | None = None, halo: Sequence[int] | None = None,
                      mask: str | None = None, voxel_size: Sequence[float] | None = None,
                      workers: int | None = None, device: str = "auto", overwrite: bool = False,
                      stitch: bool = True, roi: str | Sequence[slice] | None = None,
                      save_embeddings: bool = False, link_sections: bool = False,
                      link_overlap: float = LINK_OVERLAP, threads_per_worker: int | None = None,
                      client=None, cluster: str | dict | None = None, command: str = "",
                      progress: bool = False, dry_run: bool = False, tta: bool | None = None,
                      intensity_range: Sequence[float] | None = None, clustering: str = "mws",
                      save_affinities: str | None = None, seams: str = "auto", min_size: int | None = None,
                      mask_is_foreground: bool = False, no_foreground_classifier: bool = False) -> dict:
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
    ``tta``: test-time augmentation, 8 rotated/flipped predictions averaged (8x the
    prediction time) [default: as the model was calibrated].
    ``intensity_range``: the input values that map to the model's intensity range
    [default: by the input's dtype, spoco_vol.intensity; measured once over the volume].
    ``clustering``: mws (the Mutex Watershed, blockwise), or hdbscan, meanshift,
    consistency (spoco_vol.clustering), which cluster whole images: whole sections of a
    2D model, the whole volume of a 3D one (small volumes).
    ``save_affinities``: "float16" or "uint8": also keep the Mutex Watershed's affinities
    (model grid, channels first, offsets in the attributes) as the output's
    ``affinities`` array, and the pixels that take part in it as ``foreground``;
    ``segment_affinities_blockwise(output + "/affinities", mask=output + "/foreground")``
    redoes the watershed from them.
    ``seams``: how objects are joined across blocks: "faces" (each face by its two blocks;
    exact where objects are kept apart by background), "graph" (one Mutex Watershed over
    all blocks' fragments: the whole volume's result also for touching cells; keeps the
    core affinities, 4 bytes per voxel and offset, in the work directory until the run
    ends), or "auto" [default]: graph for a model with the volume's own axes (at its voxel
    size or an integer downsampling of it) on up to 1e9 voxels (plan.GRAPH_AUTO_VOXELS),
    faces otherwise (a 2D model's sections, larger volumes).
    ``min_size``: objects smaller than this many model voxels become background
    [default: the checkpoint's floor, chosen on its validation data].
    ``mask_is_foreground``: every voxel inside ``mask`` belongs to some object (e.g. a
    ground-truth or semantic foreground): the mask alone decides the background, the
    model's own background rules (its classifier, its background embedding) are not
    applied [default: the mask only adds background, e.g. a tissue mask].
    ``no_foreground_classifier``: leave the model's foreground classifier out; its
    embeddings' own background rule decides the background (the paper's "without
    foreground"; the model must have a classifier).
    ``dry_run``: check everything, start and write nothing; returns the output path, the
    run's fingerprint and its hash (an existing output with that hash is this run's result).
    Failures (module docstring): SpocoInputError before anything is written,
    SpocoRunError when a started run stops; the same call again resumes it.
    """
    plan = build_plan(input_path, output, model, block_shape=block_shape, halo=halo, mask=mask,
                      voxel_size=voxel_size, device=device, overwrite=overwrite, stitch=stitch, roi=roi,
                      save_embeddings=save_embeddings, link_sections=link_sections, link_overlap=link_overlap,
                      tta=tta, intensity_range=intensity_range, clustering=clustering,
                      save_affinities=save_affinities, seams=seams, min_size=min_size,
                      mask_is_foreground=mask_is_foreground, no_foreground_classifier=no_foreground_classifier,
                      command=command)
    return _run_with(plan, dry_run=dry_run, client=client, cluster=cluster, workers=workers,
                     threads_per_worker=threads_per_worker, overwrite=overwrite, progress=progress)


def segment_affinities_blockwise(affinities: str, output: str | None = None, *,
                                 offsets: Sequence[Sequence[int]] | None = None, bias: Sequence[float] | None = None,
                                 strides: Sequence[int] | None = None, min_size: int | None = None,
                                 mask: str | None = None, voxel_size: Sequence[float] | None = None,
                                 block_shape: Sequence[int] | None = None, halo: Sequence[int] | None = None,
                                 stitch: bool = True, roi: str | Sequence[slice] | None = None,
                                 workers: int | None = None, threads_per_worker: int | None = None, client=None,
                                 cluster: str | dict | None = None, overwrite: bool = False, command: str = "",
                                 progress: bool = False, dry_run: bool = False, seams: str = "auto") -> dict:
    """Segment given affinities (C, *spatial; from spoco-vol's --save-affinities or any
    other network) through the same blockwise Mutex Watershed, stitching, relabelling,
    resume and clusters as ``segment_blockwise``; labels on the affinities' grid.

    ``offsets``: per channel, the offset (z, y, x) of the voxel each affinity pairs with
    [default: the array's ``offsets`` attribute]. ``bias``: per channel, or one value for
    the long-range channels, in mwatershed's convention (value = affinity + bias; > 0
    merges, < 0 repels) [default: 0 direct, -1 long-range, the SPOCO split].
    ``strides``: thin out repulsive edges on a regular grid; ``min_size``: smaller objects
    become background [defaults: the array's attributes, else none and 0]. ``mask``:
    voxels outside it are background. ``seams``: as for ``segment_blockwise``; "auto" is
    graph for offsets along every axis, faces for per-section ones. Other arguments as
    ``segment_blockwise``."""
    plan = build_affinity_plan(affinities, output, offsets=offsets, bias=bias, strides=strides, min_size=min_size,
                               mask=mask, voxel_size=voxel_size, block_shape=block_shape, halo=halo, stitch=stitch,
                               roi=roi, seams=seams, command=command)
    return _run_with(plan, dry_run=dry_run, client=client, cluster=cluster, workers=workers,
                     threads_per_worker=threads_per_worker, overwrite=overwrite, progress=progress)


def _run_with(plan: SegmentPlan, *, dry_run: bool, client, cluster, workers, threads_per_worker, overwrite,
              progress) -> dict:
    """Run a plan on the caller's client, a cluster config's cluster, or local workers."""
    if dry_run:
        return {"output": plan.output, "run_hash": plan.run_hash, "fingerprint": plan.fingerprint()}
    cluster_config = None
    if cluster is not None and client is None:
        from ..cluster import load_cluster_config, threads_per_worker as cluster_threads, validate_cluster_config
        cluster_config = (validate_cluster_config(dict(cluster)) if isinstance(cluster, dict)
                          else load_cluster_config(cluster))
        if workers is not None:  # an explicit worker count beats the file's
            if workers < 1:  # a cluster of no workers would wait for one until its timeout
                raise SpocoInputError(f"--workers {workers} runs in this process, without a cluster: give "
                                      "--workers 1 or more with --cluster")
            cluster_config["jobs" if cluster_config["kind"] == "slurm" else "workers"] = workers
        threads_per_worker = threads_per_worker or cluster_threads(cluster_config)
        workers = cluster_config.get("jobs", cluster_config.get("workers"))
    # One single-threaded worker per core by default: the CPU stages are single-threaded,
    # so 2 workers x 1 thread beat 1 worker x 2 threads by 1.35x (benchmarks/RESULTS.md).
    workers = (os.cpu_count() or 1) if workers is None else workers
    return run_plan(plan, client=client, cluster_config=cluster_config, workers=workers,
                    threads_per_worker=threads_per_worker, overwrite=overwrite, progress=progress)
