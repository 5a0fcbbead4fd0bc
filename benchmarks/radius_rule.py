"""Which background radius should held-out objects choose? (What ships: none; it is
delta_d.) Measured on training sections that were never annotated for the run (Lucchi
sections 5, 25, 45 by default, with their full labels), never on the test sections 64-79.

With sparse labels the background radius was chosen by how well a few held-out objects
are recovered (spoco_vol.validation). Their score is flat over a wide range of radii
and cannot see unannotated objects swallowed by a large radius. For each trained run
this prints, for every candidate rule, the radius it picks from the held-out objects'
score curve, and the AP@0.5 that the embeddings alone (no classifier) reach at that
radius on the fully labeled sections, next to the best radius there.

    python benchmarks/radius_rule.py /tmp/lucchi scratch_p1_s1 scratch_p1_s2 fine-tune_p5_s0 ... [--json F]
    python benchmarks/radius_rule.py --curves benchmarks/results/radius_rule.json  # the table, from saved curves

RUN names follow transfer_lucchi.py: WORK/runs/RUN/best.pt, trained on
WORK/lucchi_train.zarr/sparse_pP_sS with seed S.
"""
import argparse
import json
import re
import sys

import numpy as np

from spoco_vol import calibration, checkpoint, validation
from spoco_vol.config import TrainConfig
from spoco_vol.inference import predict_foreground
from spoco_vol.training_data import object_windows, prepare_volumes

RULES = {
    "largest within tolerance (first rule)": lambda r, s, dd: _largest(r, s),
    "capped at delta_d (second rule)": lambda r, s, dd: min(_largest(r, s), dd),
    "delta_d (shipped)": lambda r, s, dd: dd,
    "searched up to delta_d": lambda r, s, dd: _largest(r[:_below(r, dd)], s[:_below(r, dd)]),
    "middle of the plateau": lambda r, s, dd: _middle(r, s),
    "best score": lambda r, s, dd: r[int(np.argmax(s))],
}


def _plateau(scores):
    s = np.asarray(scores)
    return np.flatnonzero(s >= s.max() - validation.RADIUS_TOLERANCE - 1e-12)


def _largest(radii, scores):  # the first rule: choose_radius as held-out objects use it (now the classifier's radius)
    return validation.choose_radius(radii, scores, objects_held_out=True)[0]


def _below(radii, limit):
    return sum(1 for r in radii if r <= limit + 1e-9)


def _middle(radii, scores):
    idx = _plateau(scores)
    return radii[int(round((idx[0] + idx[-1]) / 2))]


def run_curves(work, run, sections, device="cpu"):
    m = re.fullmatch(r"(fine-tune|scratch)_p(\d+)_s(\d+)", run)
    if not m:
        raise SystemExit(f"not a sparse run name: {run}")
    seed = int(m.group(3))
    train = f"{work}/lucchi_train.zarr"
    ck = checkpoint.load(f"{work}/runs/{run}/best.pt")
    settings = ck.inference
    cfg = TrainConfig(raw=[f"{train}/raw"], labels=[f"{train}/sparse_p{m.group(2)}_s{seed}"], out="", dims=2,
                      seed=seed, mode="sparse", downsample=list(settings.downsample),
                      patch_shape=ck.training["patch_shape"])
    # the same held-out objects as the run (seeded), on its intensity mapping
    _, _, held, _, _ = prepare_volumes(cfg, reference=ck.normalization)
    images, objects = object_windows(held, cfg, ck.normalization)
    net = ck.network().to(device)
    emb = calibration.embed(net, images, device, False, settings.tta)
    labs = [lab for _, lab in images]
    bg = settings.background_embedding
    radii = [float(r) for r in calibration.radius_grid(ck.delta_v, ck.delta_d)]
    held_scores = [calibration.held_out_score(emb, labs, ck.delta_d, settings.with_background(bg, r),
                                              objects=objects) for r in radii]
    dense = []
    for z in sections:
        dense += calibration.held_out_sections(ck, f"{train}/raw", f"{train}/labels", z_range=(z, z + 1))
    dense_emb = calibration.embed(net, dense, device, False, settings.tta)
    dense_scores = [calibration.held_out_score(dense_emb, [lab for _, lab in dense], ck.delta_d,
                                               settings.with_background(bg, r)) for r in radii]
    # the checkpoint as it segments: its own radius, and its foreground classifier if it has one
    probs = None
    if ck.has_foreground:
        fg = ck.foreground_network().to(device)
        probs = [predict_foreground(fg, raw, device=device, amp=False, tta=settings.tta) for raw, _ in dense]
    shipped = calibration.held_out_score(dense_emb, [lab for _, lab in dense], ck.delta_d, settings, probs)
    return {"run": run, "held_out": len(objects), "stored_radius": settings.background_radius,
            "shipped": round(shipped, 4), "prior": (ck.data.get("foreground") or {}).get("prior"),
            "radii": radii, "held_out_scores": [round(s, 4) for s in held_scores],
            "dense_scores": [round(s, 4) for s in dense_scores], "delta_d": ck.delta_d}


def print_table(rows, sections):
    """One row per run: the AP@0.5 on the sections at the radius each rule picks from the
    run's held-out curve, the best radius there, and the checkpoint as shipped."""
    print(f"\nAP@0.5 (embeddings alone) on sections {sections} at the radius each rule picks")
    names = list(RULES)
    print("| run | " + " | ".join(names) + " | best on the sections | checkpoint as shipped |")
    print("|---|" + "---|" * (len(names) + 2))
    totals = np.zeros(len(names) + 1)
    shipped = []
    for c in rows:
        radii, dense = c["radii"], c["dense_scores"]
        cells = []
        for k, name in enumerate(names):
            r = RULES[name](radii, c["held_out_scores"], c["delta_d"])
            s = dense[radii.index(r)]
            totals[k] += s
            cells.append(f"{s:.3f} (r {r:g})")
        b = int(np.argmax(dense))
        totals[-1] += dense[b]
        if c.get("shipped") is not None:
            shipped.append(c["shipped"])
        run = c["run"] + (f" (trained with {c['trained_with']})" if c.get("trained_with") else "")
        as_shipped = "" if c.get("shipped") is None else f"{c['shipped']:.3f}"
        print(f"| {run} | " + " | ".join(cells) + f" | {dense[b]:.3f} (r {radii[b]:g}) | {as_shipped} |")
    mean_shipped = f"{np.mean(shipped):.3f} ({len(shipped)} runs)" if shipped else ""
    print("| mean | " + " | ".join(f"{t / len(rows):.3f}" for t in totals) + f" | {mean_shipped} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", nargs="?")
    p.add_argument("runs", nargs="*")
    p.add_argument("--sections", default="5,25,45", help="fully labeled training sections to score on")
    p.add_argument("--json", help="write the curves here")
    p.add_argument("--curves", help="print the table from curves written by --json instead of measuring")
    a = p.parse_args(argv)
    if a.curves:
        with open(a.curves) as f:
            print_table(json.load(f), a.sections)
        return
    if not a.work or not a.runs:
        p.error("give WORK and RUN..., or --curves")
    sections = [int(s) for s in a.sections.split(",")]
    rows = []
    for run in a.runs:
        c = run_curves(a.work, run, sections)
        rows.append(c)
        print(f"\n{run}: {c['held_out']} held-out objects, stored radius {c['stored_radius']}")
        print("radius      " + " ".join(f"{r:5.2f}" for r in c["radii"]))
        print("held-out    " + " ".join(f"{s:5.3f}" for s in c["held_out_scores"]))
        print("sections    " + " ".join(f"{s:5.3f}" for s in c["dense_scores"]))
        print(f"as shipped (radius {c['stored_radius']}, classifier prior {c['prior']}): {c['shipped']:.3f}")
        sys.stdout.flush()
    print_table(rows, a.sections)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
