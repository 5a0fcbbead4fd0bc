"""The recommended path for a 3D user, measured: fine-tune a one-crop nuclei model on the
first 60 sections of another specimen, test on that specimen's last 40 sections.

`spoco-vol fine-tune` (the README's command: the sparse recipe, label 0 = unlabeled, a
fifth of the annotated nuclei held out to choose the checkpoint and calibrate the
background, the data resampled to the model's voxel size, the start model's offsets) from
the model trained on the other crop alone: for test 1136 the bundled lm-nuclei-3d (trained
on 1135), for test 1135 the full-label model trained on 1136 (`train_3d.py --only nuclei
--settings full` leaves it in WORK/runs/nuclei_test1135_full). Annotations: every nucleus
of the 60 sections (fraction 100), or a seeded 10% of them (fraction 10: 2 of 1136's 23,
4 of 1135's 41; prepare_plantseg.py's head_sparse_p10_sS). Scored on the whole test
sections (3D AP@0.5, mAP, precision / recall, adapted Rand error, the foreground IoU of the
segmentation with the labels) and blockwise with blocks smaller than the test sections in
every axis (train_3d.evaluate) against the whole. `train_3d.py --only nuclei-two` trains
from scratch on the same sections for comparison. `--dense`: the same with `fine-tune
--dense` on every nucleus (label 0 is background: full labels, the last 20 of the 60
sections held out, the classifier trained supervised).

    python benchmarks/prepare_plantseg.py /tmp/plantseg
    python benchmarks/train_3d.py /tmp/plantseg --only nuclei --settings full   # the model for test 1135
    python benchmarks/fine_tune_3d.py /tmp/plantseg [--fractions 100,10] [--seeds 0] [--dense]

Results go to WORK/results_fine_tune_3d.json; finished runs are not redone.
"""
import argparse
import json
import os
import subprocess
import sys

from train_3d import evaluate, one_crop_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("--fractions", default="100", help="percent of the 60 sections' nuclei annotated: 100 and/or 10")
    p.add_argument("--seeds", default="0", help="fraction 10: which seeded draws of nuclei (0-2)")
    p.add_argument("--dense", action="store_true", help="fine-tune --dense on every nucleus instead")
    a = p.parse_args()
    path = os.path.join(a.work, "results_fine_tune_3d.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    exe = os.path.join(os.path.dirname(sys.executable), "spoco-vol")
    fractions = [100] if a.dense else [int(f) for f in a.fractions.split(",")]
    plan = [(test, pct, seed) for pct in fractions
            for seed in ([None] if pct == 100 else [int(s) for s in a.seeds.split(",")]) for test in ("1136", "1135")]
    for test, pct, seed in plan:
        key = ("fine_tune_dense" if a.dense else "fine_tune") + f"_test{test}tail" + (
            "" if pct == 100 else f"_p{pct}_s{seed}")
        if key in results:
            continue
        model = one_crop_model(a.work, test, bundled_first=True)  # for 1136 the shipped model, as measured
        if model is None:
            sys.exit(f"no model trained without crop {test}: run train_3d.py --only nuclei --settings full first")
        crop = os.path.join(a.work, f"nuclei_{test}.zarr")
        labels = f"{crop}/head_labels" if pct == 100 else f"{crop}/head_sparse_p{pct}_s{seed}"
        out = os.path.join(a.work, "runs", key)
        cmd = [exe, "fine-tune", *(["--dense"] if a.dense else []), "--model", model, "--raw", f"{crop}/head_raw",
               "--labels", labels, "--out", out, "--quiet"]
        if not os.path.exists(os.path.join(out, "summary.json")):
            resume = ["--resume"] if os.path.exists(os.path.join(out, "latest.pt")) else ["--overwrite"]
            print("run:", " ".join(cmd + resume), flush=True)
            subprocess.run(cmd + resume, check=True, stdout=subprocess.DEVNULL)
        summary = json.load(open(os.path.join(out, "summary.json")))
        results[key] = {"command": " ".join(["spoco-vol", *cmd[1:]]), "start_model": model, "fraction": pct,
                        "seed": seed, "train_seconds": summary["seconds"],
                        "best_iteration": summary["best_iteration"], "objects_used": summary["objects_used"],
                        "objects_held_out": summary["objects_held_out"],
                        "objects_total": summary["objects_total"],
                        "test": evaluate(os.path.join(out, "best.pt"), f"{crop}/tail_raw", f"{crop}/tail_labels", out)}
        print(key, json.dumps(results[key]["test"]), flush=True)
        json.dump(results, open(path + ".tmp", "w"), indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
