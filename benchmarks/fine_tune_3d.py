"""The recommended path for a 3D user, measured: fine-tune a one-crop nuclei model on the
first 60 sections of another specimen, test on that specimen's last 40 sections.

`spoco-vol fine-tune` (the README's command: the sparse recipe, label 0 = unlabeled, a
fifth of the annotated nuclei held out to choose the checkpoint and calibrate the
background, the data resampled to the model's voxel size) from the model trained on the
other crop alone: for test 1136 the bundled lm-nuclei-3d (trained on 1135), for test 1135
the full-label model trained on 1136 (`train_3d.py --only nuclei --settings full` leaves
it in WORK/runs/nuclei_test1135_full). Scored on the whole test sections (3D AP@0.5, mAP,
precision / recall, adapted Rand error, the foreground IoU of the segmentation with the
labels); no blockwise comparison: fine-tune trains with the default offsets (up to 27
voxels), so the fine-tuned models' halo (50 sections, 100 pixels) is longer than the 40
test sections and no block can be smaller than them in every axis.
`train_3d.py --only nuclei-two` trains from scratch on the same sections for comparison.

    python benchmarks/prepare_plantseg.py /tmp/plantseg
    python benchmarks/train_3d.py /tmp/plantseg --only nuclei --settings full   # the model for test 1135
    python benchmarks/fine_tune_3d.py /tmp/plantseg

Results go to WORK/results_fine_tune_3d.json; finished runs are not redone.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

from train_3d import one_crop_model


def score(ckpt_path, raw_path, gt_path):
    from spoco_vol import checkpoint, io
    from spoco_vol.evaluation import evaluate_segmentation
    from spoco_vol.pipeline import segment_array
    raw, gt = np.asarray(io.open_volume(raw_path)[...]), np.asarray(io.open_volume(gt_path)[...])
    seg = segment_array(raw, checkpoint.load(ckpt_path), input_voxel_size=io.read_voxel_size(raw_path), device="cpu")
    m = evaluate_segmentation(seg, gt)
    return {**{k: m[k] for k in ("ap@0.5", "map", "arand", "precision", "recall", "n_pred", "n_gt")},
            "foreground_iou": float(((seg > 0) & (gt > 0)).sum() / ((seg > 0) | (gt > 0)).sum())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("work")
    a = p.parse_args()
    path = os.path.join(a.work, "results_fine_tune_3d.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    exe = os.path.join(os.path.dirname(sys.executable), "spoco-vol")
    for test in ("1136", "1135"):
        key = f"fine_tune_test{test}tail"
        if key in results:
            continue
        model = one_crop_model(a.work, test, bundled_first=True)  # for 1136 the shipped model, as measured
        if model is None:
            sys.exit(f"no model trained without crop {test}: run train_3d.py --only nuclei --settings full first")
        crop = os.path.join(a.work, f"nuclei_{test}.zarr")
        out = os.path.join(a.work, "runs", key)
        cmd = [exe, "fine-tune", "--model", model, "--raw", f"{crop}/head_raw", "--labels", f"{crop}/head_labels",
               "--out", out, "--quiet"]
        if not os.path.exists(os.path.join(out, "summary.json")):
            resume = ["--resume"] if os.path.exists(os.path.join(out, "latest.pt")) else ["--overwrite"]
            print("run:", " ".join(cmd + resume), flush=True)
            subprocess.run(cmd + resume, check=True, stdout=subprocess.DEVNULL)
        summary = json.load(open(os.path.join(out, "summary.json")))
        best = os.path.join(out, "best.pt")
        test_raw, test_gt = f"{crop}/tail_raw", f"{crop}/tail_labels"
        results[key] = {"command": " ".join(["spoco-vol", *cmd[1:]]), "start_model": model,
                        "train_seconds": summary["seconds"], "best_iteration": summary["best_iteration"],
                        "objects_used": summary["objects_used"], "objects_total": summary["objects_total"],
                        "test": score(best, test_raw, test_gt)}
        print(key, json.dumps(results[key]["test"]), flush=True)
        json.dump(results, open(path + ".tmp", "w"), indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
