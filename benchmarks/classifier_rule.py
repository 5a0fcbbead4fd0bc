"""Which foreground classifier should a sparse run keep? Its checks are judged on a few
held-out objects, and single iterates' scores jump between checks; since 038da3c what is
judged and kept is a moving average of the classifier's weights
(`spoco_vol.foreground.average_decay`). This measures both rules where the answer is
known without touching the test sections: on the full labels of Lucchi training
sections (5, 15, ..., 55 by default; sparse runs annotated only a few of their objects).

For each run (its best.pt: the embeddings, any classifier set aside) the classifier is
retrained as training does (`spoco-vol train-foreground`: the same held-out objects,
prior and size-floor choice), under each rule and from several training trajectories
(the classifier's own seed shifted; the held-out objects stay the run's), and the
checkpoint is scored as it segments: AP@0.5 per section, averaged.

    python benchmarks/classifier_rule.py /tmp/lucchi fine-tune_p5_s0 fine-tune_p5_s1 ... \
        [--trajectories 0,1] [--sections 5,15,25,35,45,55] [--json FILE]
    python benchmarks/classifier_rule.py --rows FILE   # the table, from saved rows

RUN names follow transfer_lucchi.py: WORK/runs/RUN/best.pt, trained on
WORK/lucchi_train.zarr/sparse_pP_sS with seed S.
"""
import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile

import numpy as np
import torch

from spoco_vol import calibration, checkpoint, foreground
from spoco_vol.inference import predict_foreground

RULES = {"single iterate": lambda step: 0.0,  # the average is the iterate itself (before 038da3c)
         "moving average": foreground.average_decay}
TRAJECTORY_SEED = 1000  # added to the run's seed per trajectory: other batches, other initial weights


def retrain(model, raw, labels, seed, rule, trajectory, out):
    """train-foreground on ``model`` under ``rule`` from trajectory ``trajectory``."""
    train_classifier = foreground.train_classifier

    def shifted(ckpt, cfg, *args, **kwargs):
        return train_classifier(ckpt, dataclasses.replace(cfg, seed=cfg.seed + TRAJECTORY_SEED * trajectory),
                                *args, **kwargs)
    saved = foreground.average_decay, foreground.train_classifier
    foreground.average_decay, foreground.train_classifier = RULES[rule], shifted
    try:
        return foreground.add_classifier(model, [raw], [labels], out, seed=seed, progress=False)
    finally:
        foreground.average_decay, foreground.train_classifier = saved


def sections_ap(ck, images, embeddings, device):
    """Mean AP@0.5 over the dense sections of ``ck`` as it segments (its background rule,
    classifier and size floor) on the given embeddings."""
    settings = ck.inference
    probs = None
    if ck.has_foreground:
        fg = ck.foreground_network().to(device)
        probs = [predict_foreground(fg, raw, device=device, amp=True, tta=settings.tta) for raw, _ in images]
    return calibration.held_out_score(embeddings, [lab for _, lab in images], ck.delta_d, settings, probs)


def measure(work, run, rules, trajectories, sections, device):
    m = re.fullmatch(r"(fine-tune|scratch)_p(\d+)_s(\d+)", run)
    if not m:
        raise SystemExit(f"not a sparse run name: {run}")
    seed = int(m.group(3))
    train = f"{work}/lucchi_train.zarr"
    raw, labels = f"{train}/raw", f"{train}/sparse_p{m.group(2)}_s{seed}"
    model = f"{work}/runs/{run}/best.pt"
    shipped = checkpoint.load(model)
    images = []
    for z in sections:
        images += calibration.held_out_sections(shipped, raw, f"{train}/labels", z_range=(z, z + 1))
    embeddings = calibration.embed(shipped.network().to(device), images, device, True, shipped.inference.tta)
    row = {"run": run, "sections": sections, "trained": round(sections_ap(shipped, images, embeddings, device), 4),
           "trained_iteration": (shipped.data.get("foreground") or {}).get("iterations"),
           "without": round(sections_ap(foreground.without_classifier(shipped), images, embeddings, device), 4),
           "rules": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for rule in rules:
            row["rules"][rule] = []
            for t in trajectories:
                out = os.path.join(tmp, f"{rule}_{t}.pt".replace(" ", "_"))
                result = retrain(model, raw, labels, seed, rule, t, out)
                ap = sections_ap(checkpoint.load(out), images, embeddings, device)
                row["rules"][rule].append({"trajectory": t, "kept": result["foreground_kept"],
                                           "iteration": result.get("iteration"),
                                           "held_out": result.get("val_score"),
                                           "history": result.get("val_score_history"),
                                           "size_floor": result.get("size_floor"), "sections_ap": round(ap, 4)})
                print(f"{run} {rule} trajectory {t}: kept {result['foreground_kept']} at "
                      f"{result.get('iteration')}, held-out {result.get('val_score')}, sections AP@0.5 {ap:.3f}")
                sys.stdout.flush()
    return row


def print_table(rows):
    rules = list(rows[0]["rules"])
    print(f"\nAP@0.5 on sections {rows[0]['sections']}, each classifier as it segments "
          "(per trajectory; the run's own classifier and none for reference)")
    print("| run | without classifier | as trained | " + " | ".join(rules) + " |")
    print("|---|---|---|" + "---|" * len(rules))
    means = {r: [] for r in rules}
    for row in rows:
        cells = []
        for r in rules:
            aps = [x["sections_ap"] for x in row["rules"][r]]
            means[r] += aps
            cells.append(" / ".join(f"{a:.3f}" for a in aps))
        print(f"| {row['run']} | {row['without']:.3f} | {row['trained']:.3f} (it {row['trained_iteration']}) | "
              + " | ".join(cells) + " |")
    spread = {r: np.mean([np.ptp([x["sections_ap"] for x in row["rules"][r]]) for row in rows]) for r in rules}
    print(f"| mean (spread between trajectories) | {np.mean([r['without'] for r in rows]):.3f} | "
          f"{np.mean([r['trained'] for r in rows]):.3f} | " +
          " | ".join(f"{np.mean(means[r]):.3f} ({spread[r]:.3f})" for r in rules) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", nargs="?")
    p.add_argument("runs", nargs="*")
    p.add_argument("--trajectories", default="0,1")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--sections", default="5,15,25,35,45,55", help="fully labeled training sections to score on")
    p.add_argument("--json", help="write the rows here (rewritten after each run)")
    p.add_argument("--rows", help="print the table from rows written by --json instead of measuring")
    a = p.parse_args(argv)
    if a.rows:
        with open(a.rows) as f:
            print_table(json.load(f))
        return
    if not a.work or not a.runs:
        p.error("give WORK and RUN..., or --rows")
    torch.manual_seed(0)
    rows = []
    for run in a.runs:
        rows.append(measure(a.work, run, a.rules.split(","), [int(t) for t in a.trajectories.split(",")],
                            [int(s) for s in a.sections.split(",")], torch.device("cpu")))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
    print_table(rows)


if __name__ == "__main__":
    main()
