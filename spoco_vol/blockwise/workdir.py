"""The work directory of a blockwise run, ``<output>.partial``: where an unfinished run
keeps everything, and how finished work is recognised.

Layout (a zarr group; zarr v2 or v3 as the output):
- ``.zattrs``/``zarr.json`` ``spoco_vol_run``: the plan's fingerprint and run hash. A rerun
  with the same hash resumes; another hash is refused unless --overwrite.
- ``fragments``: pass 1's block-local objects with global ids (uint64, one chunk per block).
- ``blocks/<linear>.npz``: a finished block's face evidence and object count, written
  last and atomically: the block's done marker. With graph seams: its view instead (its
  segments over its whole read region), and ``graph_affinities`` (C, *model grid)
  float32: the affinities each core voxel owns, which the fragment graph's edges are made
  of; ``fragments`` is then on the model grid.
- ``0``, ``1``, ...: the labels and their pyramid; ``relabelled/<linear>``: pass 3's
  done markers, written after the block's chunk.
- ``embeddings``: with --save-embeddings.
- ``affinities``, ``foreground``: with --save-affinities (what `segment-affinities` takes).
- ``errors/<pass>-<item>.txt``: the traceback of a task that kept failing.
- ``spoco_vol`` in the attributes: the run report, written when the labels are
  complete; from then on only the move into place remains (``finalize``).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Sequence

import numpy as np
import zarr

from .. import checkpoint, io
from ..errors import SpocoInputError
from ..pipeline import register_label
from .plan import SegmentPlan, full_offsets

SCRATCH = ("blocks", "fragments", "relabelled", "errors", "graph_affinities")  # removed when the run is complete


class WorkDir:
    def __init__(self, path: str):
        self.path = path

    # ---------------------------------------------------------------- state
    def state(self, plan: SegmentPlan, overwrite: bool) -> str:
        """"new", "resume" (an interrupted run of this plan) or "finalize" (one that had
        written its labels and report but not yet moved them into place). A run of
        another plan is refused, or discarded with ``overwrite``."""
        if not os.path.exists(self.path):
            return "new"
        try:
            attrs = zarr.open_group(self.path, mode="r").attrs.asdict()
            same = attrs.get("spoco_vol_run", {}).get("hash") == plan.run_hash
        except Exception:  # unreadable: not a run of ours, or killed while writing its metadata
            attrs, same = {}, False
        if same:
            return "finalize" if "spoco_vol" in attrs else "resume"
        if overwrite:
            shutil.rmtree(self.path)
            return "new"
        raise SpocoInputError(f"{self.path} holds an interrupted run with other settings (input, blocks, model or "
                              "parameters differ): rerun that command to finish it, or use --overwrite to discard it")

    def create(self, plan: SegmentPlan) -> None:
        group = zarr.open_group(self.path, mode="w", zarr_format=plan.zarr_format)
        shape, block_shape = plan.shape, plan.block_shape
        if plan.seams == "graph":  # on the model grid, where the graph is built
            group.create_array("fragments", shape=plan.model_shape, dtype="uint64", chunks=plan.model_block,
                               fill_value=0)
        else:
            group.create_array("fragments", shape=shape, dtype="uint64", chunks=block_shape, fill_value=0)
        group.create_array("0", shape=shape, dtype=plan.out_dtype, chunks=block_shape, fill_value=0)
        for k, f in enumerate(plan.pyramid[1:], start=1):  # the labels' pyramid (pipeline.label_pyramid)
            level_shape = [-(-n // x) for n, x in zip(shape, f)]
            group.create_array(str(k), shape=level_shape, dtype=plan.out_dtype, fill_value=0,
                               chunks=tuple(min(b, n) for b, n in zip(block_shape, level_shape)))
        for d in ("blocks", "relabelled", "errors"):
            os.makedirs(os.path.join(self.path, d))
        if plan.save_embeddings:
            factors = plan.embedding_factors
            emb_arr = group.create_array(
                "embeddings", shape=(plan.embedding_dim, *(-(-n // f) for n, f in zip(shape, factors))),
                dtype="float16", chunks=(plan.embedding_dim, *(b // f for b, f in zip(block_shape, factors))),
                fill_value=0)
            emb_arr.attrs["spoco_vol"] = {
                "description": "SPOCO pixel embeddings (E, *spatial) on the model grid; 0 in skipped blocks",
                "input_voxels_per_element": list(factors), "delta_v": plan.delta_v, "delta_d": plan.delta_d}
        if plan.save_affinities:
            self._create_affinities(group, plan)
        if plan.seams == "graph" and not plan.affinities:
            group.create_array("graph_affinities", shape=(len(plan.offsets), *plan.model_shape), dtype="float32",
                               chunks=(len(plan.offsets), *plan.model_block), fill_value=0)
        # Last: a work directory with this record is one of ours, complete enough to resume.
        group.attrs["spoco_vol_run"] = {"hash": plan.run_hash, "fingerprint": plan.fingerprint()}

    @staticmethod
    def _create_affinities(group, plan: SegmentPlan) -> None:
        """The watershed's affinities (C, *model grid), one chunk per block, with what
        `segment-affinities` needs to redo the watershed in their attributes; and the
        pixels that took part in it (``foreground``, its --mask)."""
        factors, ndim = plan.embedding_factors, len(plan.shape)
        ckpt = checkpoint.load(plan.model_path).with_segment_overrides(plan.overrides)
        offsets = full_offsets(ckpt.inference.offsets, ndim)
        grid = [-(-n // f) for n, f in zip(plan.shape, factors)]
        chunks = [b // f for b, f in zip(plan.block_shape, factors)]
        aff = group.create_array("affinities", shape=(len(offsets), *grid), dtype=plan.save_affinities,
                                 chunks=(len(offsets), *chunks), fill_value=0)
        aff.attrs.update({
            "offsets": [list(o) for o in offsets],
            "strides": [1] * (ndim - len(ckpt.inference.strides)) + list(ckpt.inference.strides),
            "min_size": ckpt.inference.min_size,
            "voxel_size": [v * f for v, f in zip(plan.voxel_size, factors)] if plan.voxel_size else None,
            "spoco_vol": {"description": "Affinities w in [0, 1] (1 = same object) of the Mutex Watershed, channel c "
                                         "pairing voxel i with i + offsets[c], on the model grid; 0 in skipped blocks",
                          "values": "round(255 w)" if plan.save_affinities == "uint8" else "w",
                          "input_voxels_per_element": list(factors), "delta_d": plan.delta_d}})
        group.create_array("foreground", shape=grid, dtype="uint8", chunks=chunks, fill_value=0).attrs.update(
            {"spoco_vol": {"description": "1 where a pixel takes part in the watershed (not background), on the "
                                          "affinities' grid: their --mask in segment-affinities"}})

    # ---------------------------------------------------------------- arrays
    def array(self, name: str, mode: str = "r") -> zarr.Array:
        return zarr.open_array(os.path.join(self.path, name), mode=mode)

    # ---------------------------------------------------------------- pass 1 records
    def side_file(self, linear: int) -> str:
        return os.path.join(self.path, "blocks", f"{linear}.npz")

    def write_block_record(self, linear: int, n_objects: int, faces: dict, result: dict) -> None:
        """The block's face evidence and count, atomically, after its fragments: its done marker."""
        path = self.side_file(linear)
        tmp = path + ".tmp.npz"
        save = np.savez_compressed if "view" in faces else np.savez  # labels of a whole read region
        save(tmp, n_objects=np.int64(n_objects), result=np.array(json.dumps(result)), **faces)
        os.replace(tmp, path)

    def read_faces(self, linear: int) -> dict:
        with np.load(self.side_file(linear)) as f:
            return {k: f[k] for k in f.files}

    def read_view(self, linear: int) -> np.ndarray | None:
        """A finished block's view (graph seams); None for a block with nothing in it, or
        one outside the run's ROI."""
        try:
            with np.load(self.side_file(linear)) as f:
                return f["view"] if "view" in f.files else None
        except FileNotFoundError:
            return None

    def finished_blocks(self) -> set[int]:
        """Blocks whose done marker exists (one directory listing)."""
        out = set()
        for name in os.listdir(os.path.join(self.path, "blocks")):
            stem = name[:-4] if name.endswith(".npz") else ""
            if stem.isdigit():
                out.add(int(stem))
        return out

    def object_counts(self, linears: Sequence[int]) -> np.ndarray:
        """The object counts of finished blocks (a task of the resume pass)."""
        out = np.zeros(len(linears), np.int64)
        for i, b in enumerate(linears):
            with np.load(self.side_file(b)) as f:
                out[i] = int(f["n_objects"])
        return out

    # ---------------------------------------------------------------- pass 3 records
    def mark_relabelled(self, linear: int) -> None:
        open(os.path.join(self.path, "relabelled", str(linear)), "w").close()

    def relabelled_blocks(self) -> set[int]:
        return {int(n) for n in os.listdir(os.path.join(self.path, "relabelled")) if n.isdigit()}

    # ---------------------------------------------------------------- failures
    def write_error(self, name: str, text: str) -> str | None:
        """Keep a failed task's traceback in ``errors/<name>.txt``; its path, or None if it
        could not be written (a full disk)."""
        path = os.path.join(self.path, "errors", f"{name}.txt")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n{text}")
            return path
        except OSError:
            return None

    # ---------------------------------------------------------------- the end
    def mark_complete(self, write_metadata) -> None:
        """``write_metadata(group)`` writes the labels' OME-Zarr metadata and the report:
        from then on the labels are complete and only ``finalize`` remains."""
        write_metadata(zarr.open_group(self.path, mode="r+"))

    def report(self) -> dict:
        return dict(zarr.open_group(self.path, mode="r").attrs["spoco_vol"])

    def finalize(self, plan: SegmentPlan) -> None:
        """Remove the scratch and move the labels into place (and list them in the image's
        labels group when they belong to an OME-Zarr image)."""
        for scratch in SCRATCH:  # a v2 group lists no children: remove them by name
            shutil.rmtree(os.path.join(self.path, scratch), ignore_errors=True)
        if os.path.exists(plan.output):
            shutil.rmtree(plan.output)  # build_plan allowed it: a zarr store, and --overwrite
        os.replace(self.path, plan.output)
        if plan.image is not None:
            register_label(plan.image, os.path.basename(plan.output.rstrip(os.sep)), plan.zarr_format)


def completed_report(plan: SegmentPlan) -> dict | None:
    """The report of an existing output that this very plan made (same run hash), or None."""
    if not io.is_zarr_store(plan.output):
        return None
    try:
        report = dict(zarr.open_group(plan.output, mode="r").attrs.get("spoco_vol") or {})
    except Exception:
        return None
    return report if report.get("run_hash") == plan.run_hash else None
