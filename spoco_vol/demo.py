"""``spoco-vol demo``: the bundled sample through the bundled model, offline.

The sample is a 7 x 512 x 512 crop of the Drosophila VNC ssTEM stack (sections 13-19,
held out from the bundled model's training), Gerhard et al. 2013,
doi:10.6084/m9.figshare.856713, CC BY-NC-SA 3.0. See data/ATTRIBUTION.md.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from . import io
from .errors import SpocoInputError
from .evaluation import evaluate_segmentation, format_metrics
from .blockwise import format_report, segment_blockwise

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "vnc_sample.npz")
EXPECTED_AP = 0.70  # the bundled model on this 512 x 512 crop, blockwise as below (0.824 on the whole sections)


def write_sample(path: str, overwrite: bool = False) -> tuple[str, str]:
    """Write the bundled sample as ``path/raw`` and ``path/labels`` (zarr, voxel size in nm)."""
    d = np.load(SAMPLE)
    attrs = {"voxel_size": [float(v) for v in d["voxel_size_nm"]],
             "source": "Drosophila VNC ssTEM, Gerhard et al. 2013, doi:10.6084/m9.figshare.856713, "
                       "CC BY-NC-SA 3.0"}
    io.create_array(os.path.join(path, "raw"), d["raw"], chunks=(1, 512, 512), attrs=attrs,
                          overwrite=overwrite)
    io.create_array(os.path.join(path, "labels"), d["labels"], chunks=(1, 512, 512), attrs=attrs,
                    overwrite=overwrite)
    return os.path.join(path, "raw"), os.path.join(path, "labels")


def run_demo(out: str | None = None, device: str = "auto", overwrite: bool = False, workers: int = 2) -> dict:
    out = out or tempfile.mkdtemp(prefix="spoco-vol-demo-")
    sample = os.path.join(out, "vnc_sample.zarr")
    labels_out = os.path.join(out, "vnc_sample_labels.zarr")
    for p in (sample, labels_out):
        if os.path.exists(p) and not overwrite:
            raise SpocoInputError(f"{p} exists from an earlier demo (use --overwrite or another --out)")
    os.makedirs(out, exist_ok=True)
    raw_path, gt_path = write_sample(sample, overwrite=overwrite)
    report = segment_blockwise(raw_path, labels_out, device=device, overwrite=overwrite,
                               block_shape=[7, 256, 256], workers=workers, command="spoco-vol demo")
    pred = np.asarray(io.open_volume(labels_out)[...])
    gt = np.asarray(io.open_volume(gt_path)[...])
    metrics = evaluate_segmentation(pred, gt, per_section=True)
    text = "\n".join([
        f"sample:  {raw_path}  {tuple(report['shape'])} at {report['voxel_size']} nm (VNC sections 13-19, held out)",
        format_report(report),
        "accuracy against the ground truth (2D objects per section):",
        format_metrics(metrics),
        "",
        "What these mean: AP@0.5 is the average precision of the predicted mitochondria, a prediction",
        "counting as found when it overlaps a true one by IoU >= 0.5 (1 = every object found, no false",
        "ones); mAP averages AP over IoU 0.50-0.95 (boundary accuracy); ARand and VOI measure",
        "splits and merges over voxel pairs (0 = perfect).",
        f"Expected here: AP@0.5 about {EXPECTED_AP:.2f} (the crop cuts objects at its border; on the whole "
        "1024 x 1024 sections 0.824, benchmarks/RESULTS.md);",
        f"this run: {metrics['ap@0.5']:.3f}" + ("" if abs(metrics["ap@0.5"] - EXPECTED_AP) < 0.05 else
                                              "  -- far from it: check the installation"),
    ])
    return {"report": report, "metrics": metrics, "text": text}
