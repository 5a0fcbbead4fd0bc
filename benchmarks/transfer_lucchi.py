"""Transfer to a second EM domain (the SPOCO paper's Table 5, on the data we have): the
bundled VNC model on Lucchi FIB-SEM mitochondria, as is, fine-tuned on 1%, 5% and 10%
of the 2D objects of sections 0-63, trained from scratch on the same objects, and
trained from scratch on all labels; scored on sections 64-79 (never trained on, never
used to choose anything).

Every run is the shipped command with its defaults, each seed annotating other objects:
  fine-tuned:   spoco-vol fine-tune --raw TRAIN/raw --labels TRAIN/sparse_pP_sS --out RUN --seed S
  from scratch: spoco-vol train --raw TRAIN/raw --labels TRAIN/sparse_pP_sS --out RUN --seed S
                    --mode sparse --downsample 1,1.84,1.84 --iterations 2000 (+ the recipe's terms:
                    FINE_TUNE_RECIPE without the model)
  all labels:   spoco-vol train --raw TRAIN/raw --labels TRAIN/labels --out RUN --seed S
                    --downsample 1,1.84,1.84 --iterations 2000 --lr 2e-4
The from-scratch runs train at --lr (default 2e-4, the learning rate of the table's rows;
`spoco-vol train` has defaulted to 1e-3 with full labels since); another rate names its
runs and rows apart (``full_s0_lr1e-3``, "from scratch, all labels, lr 1e-3").
Runs already finished are not redone; results go to WORK/transfer.json, one entry per
run, and the table is printed (and written to WORK/transfer.md).

    python benchmarks/prepare_lucchi.py /tmp/lucchi
    python benchmarks/transfer_lucchi.py /tmp/lucchi [--only fine-tune] [--seeds 0,1,2] [--fractions 1,5,10]
        [--lr 2e-4]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SCRATCH_ITERATIONS = 2000
SCRATCH_LR = "2e-4"
DOWNSAMPLE = "1,1.84,1.84"   # 5 nm -> the bundled model's 9.2 nm: the same resolution as fine-tuning


def _recipe_flags():
    from spoco_vol.config import FINE_TUNE_RECIPE as r
    return ["--mode", r["mode"], "--background-weight", str(r["background_weight"]),
            "--background-warmup", str(r["background_warmup"]), "--background-select-radius",
            str(r["background_select_radius"]), "--tta" if r["tta"] else "--no-tta",
            "--foreground-iterations", str(r["foreground_iterations"])]


def lr_tag(kind, lr):
    """What names a from-scratch run at another rate than SCRATCH_LR apart (its key and folder)."""
    return f"_lr{lr}" if kind in ("scratch", "full") and lr != SCRATCH_LR else ""


def commands(work, kind, pct, seed, lr=SCRATCH_LR):
    train = os.path.join(work, "lucchi_train.zarr")
    name = f"{kind}_p{pct}_s{seed}" if pct else f"{kind}_s{seed}"
    out = os.path.join(work, "runs", name + lr_tag(kind, lr))
    labels = f"{train}/sparse_p{pct}_s{seed}"
    if kind == "fine-tune":
        cmd = ["spoco-vol", "fine-tune", "--raw", f"{train}/raw", "--labels", labels, "--out", out,
               "--seed", str(seed), "--quiet"]
    elif kind == "scratch":
        cmd = ["spoco-vol", "train", "--raw", f"{train}/raw", "--labels", labels, "--out", out, "--seed", str(seed),
               "--downsample", DOWNSAMPLE, "--iterations", str(SCRATCH_ITERATIONS), "--lr", lr, "--quiet",
               *_recipe_flags()]
    else:  # all labels, full supervision
        cmd = ["spoco-vol", "train", "--raw", f"{train}/raw", "--labels", f"{train}/labels", "--out", out,
               "--seed", str(seed), "--downsample", DOWNSAMPLE, "--iterations", str(SCRATCH_ITERATIONS), "--lr", lr,
               "--quiet"]
    return out, cmd


def evaluate(ckpt_path, test):
    from spoco_vol import io
    from spoco_vol.evaluation import evaluate_segmentation
    from spoco_vol import checkpoint
    from spoco_vol.pipeline import segment_array
    raw = np.asarray(io.open_volume(test + "/raw")[...])
    gt = np.asarray(io.open_volume(test + "/labels")[...])
    t = time.perf_counter()
    pred = segment_array(raw, checkpoint.load(ckpt_path), input_voxel_size=io.read_voxel_size(test + "/raw"),
                         device="cpu")
    m = evaluate_segmentation(pred, gt, per_section=True)
    return {k: m[k] for k in ("ap@0.5", "ap@0.75", "map", "precision", "recall", "n_pred", "n_gt")} | {
        "segment_seconds": round(time.perf_counter() - t, 1)}


def _mean(values):
    return f"{np.mean(values):.3f}" if values else "-"


def table(results):
    rows = ["| setting | objects annotated | seeds | AP@0.5 per seed | AP@0.5 mean | mAP mean | train min/run |",
            "|---|---|---|---|---|---|---|"]
    groups = {}
    for r in results.values():
        groups.setdefault((r["kind"], r["pct"], r.get("lr", SCRATCH_LR)), []).append(r)
    # "fine-tune-capped", "fine-tune-first", "scratch-first": runs kept from the earlier rules for the
    # background radius, when held-out objects chose it (capped at delta_d; the first rule,
    # uncapped), before it became delta_d; "fine-tune-basefloor": runs from before held-out
    # objects chose the size floor (b319c76); "fine-tune-iterate", "scratch-iterate": runs from
    # before the foreground classifier was judged as a moving average of its weights (038da3c)
    # (benchmarks/RESULTS.md, transfer)
    order = {"bundled": 0, "fine-tune": 1, "fine-tune-iterate": 2, "fine-tune-basefloor": 3, "fine-tune-capped": 4,
             "fine-tune-first": 5, "scratch": 6, "scratch-iterate": 7, "scratch-first": 8, "full": 9}
    for (kind, pct, lr), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] or 0, kv[0][2])):
        rs = sorted(rs, key=lambda r: r["seed"] if r["seed"] is not None else -1)
        name = {"bundled": "bundled VNC model as is", "fine-tune": f"fine-tuned, {pct}% of the objects",
                "fine-tune-iterate": f"fine-tuned, {pct}%, before 038da3c (classifier not averaged)",
                "fine-tune-basefloor": f"fine-tuned, {pct}%, at b8e9896 (size floor at the base)",
                "fine-tune-capped": f"fine-tuned, {pct}%, radius chosen by held-out objects, capped at delta_d",
                "fine-tune-first": f"fine-tuned, {pct}%, radius chosen by held-out objects (first rule)",
                "scratch": f"from scratch, {pct}% of the objects",
                "scratch-iterate": f"from scratch, {pct}%, before 038da3c (classifier not averaged)",
                "scratch-first": f"from scratch, {pct}%, radius chosen by held-out objects (first rule)",
                "full": "from scratch, all labels"}[kind] + (f", lr {lr}" if lr != SCRATCH_LR else "")
        aps = [r["test"]["ap@0.5"] for r in rs]
        # rows kept from RESULTS.md may lack mAP
        maps = [r["test"]["map"] for r in rs if r["test"].get("map") is not None]
        minutes = [r["train_seconds"] / 60 for r in rs if r.get("train_seconds")]
        rows.append(f"| {name} | {rs[0].get('objects', '-')} | {len(rs) if kind != 'bundled' else '-'} | "
                    f"{' / '.join(f'{a:.3f}' for a in aps)} | **{np.mean(aps):.3f}** | {_mean(maps)} | "
                    f"{f'{np.mean(minutes):.0f}' if minutes else '-'} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("--only", choices=["bundled", "fine-tune", "scratch", "full"], action="append")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fractions", default="1,5,10")
    p.add_argument("--lr", default=SCRATCH_LR, help="learning rate of the from-scratch runs")
    a = p.parse_args()
    test = os.path.join(a.work, "lucchi_test.zarr")
    path = os.path.join(a.work, "transfer.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    seeds = [int(s) for s in a.seeds.split(",")]
    fractions = [int(f) for f in a.fractions.split(",")]
    kinds = a.only or ["bundled", "fine-tune", "full", "scratch"]
    plan = []
    for kind in kinds:
        if kind == "bundled":
            plan.append((kind, None, None))
        elif kind == "full":
            plan += [(kind, None, s) for s in seeds]
        else:
            plan += [(kind, pct, s) for pct in fractions for s in seeds]
    bin_dir = os.path.dirname(sys.executable)
    for kind, pct, seed in plan:
        key = f"{kind}_p{pct}_s{seed}" + lr_tag(kind, a.lr)
        if key in results:
            continue
        entry = {"kind": kind, "pct": pct, "seed": seed, **({"lr": a.lr} if lr_tag(kind, a.lr) else {})}
        if kind == "bundled":
            from spoco_vol.pipeline import BUNDLED_MODEL
            entry["checkpoint"] = BUNDLED_MODEL
        else:
            out, cmd = commands(a.work, kind, pct, seed, a.lr)
            cmd[0] = os.path.join(bin_dir, cmd[0])
            if not os.path.exists(os.path.join(out, "summary.json")):
                extra = ["--overwrite"] if os.path.exists(out) and not os.path.exists(out + "/latest.pt") else []
                if os.path.exists(out + "/latest.pt"):
                    extra = ["--resume"]
                print("run:", " ".join(cmd + extra), flush=True)
                subprocess.run(cmd + extra, check=True, stdout=subprocess.DEVNULL)
            summary = json.load(open(os.path.join(out, "summary.json")))
            entry.update(checkpoint=os.path.join(out, "best.pt"), command=" ".join(["spoco-vol", *cmd[1:]]),
                         train_seconds=summary["seconds"] + (summary.get("foreground") or {}).get("seconds", 0),
                         objects=summary.get("objects_used", 0) + summary.get("objects_held_out", 0),
                         summary=summary)
        entry["test"] = evaluate(entry["checkpoint"], test)
        results[key] = entry
        print(key, json.dumps(entry["test"]), flush=True)
        tmp = path + ".tmp"
        json.dump(results, open(tmp, "w"), indent=1)
        os.replace(tmp, path)
    text = table(results)
    open(os.path.join(a.work, "transfer.md"), "w").write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
