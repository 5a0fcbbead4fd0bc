"""How clearly a checkpoint's size floor was chosen: for each floor training tries (its
base floor x 1, 2, 4, 8, 16), on held-out images with dense labels segmented as training
calibrates them, the objects predicted, the true objects matched at IoU 0.5, the F1 that
training's choice maximises (spoco_vol.validation.choose_size_floor) and the mean
Symmetric Best Dice per image (CVPPP's metric). Only held-out (validation) images choose:
run it on test images to report, never to pick a floor.

    python benchmarks/size_floors.py CHECKPOINT RAW LABELS [--z-range START,STOP] [--json OUT]

CHECKPOINT: a trained checkpoint (runs/RUN/best.pt); RAW, LABELS: zarr arrays with dense
labels; --z-range: the sections to use, as `spoco-vol calibrate` takes them (CVPPP's
validation images: the training stack's last 10, `--z-range 93,103`).
"""
import argparse
import json

import numpy as np
import torch

from spoco_vol import checkpoint
from spoco_vol.calibration import held_out_sections, segment_at_base_floor
from spoco_vol.evaluation import evaluate_segmentation
from spoco_vol.segmentation import clean_up_segments
from spoco_vol.validation import FLOOR_MULTIPLES, f1_of_counts, size_floor_counts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("raw")
    p.add_argument("labels")
    p.add_argument("--z-range", default=None, help="START,STOP: the sections to score")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    z_range = tuple(int(v) for v in a.z_range.split(",")) if a.z_range else None
    model = checkpoint.load(a.checkpoint)
    images = held_out_sections(model, a.raw, a.labels, z_range)
    # fp32 on the CPU, as the tables in RESULTS were measured; training calibrates the same way there
    segmentations, labels, base, _ = segment_at_base_floor(model, images, torch.device("cpu"), amp=False)
    floors = [base * m for m in FLOOR_MULTIPLES]
    rows = []
    for floor, (tp, fp, fn) in zip(floors, size_floor_counts(segmentations, labels, floors)):
        sbd = np.mean([evaluate_segmentation(clean_up_segments(np.asarray(s), floor), lab)["sbd"]
                       for s, lab in zip(segmentations, labels)])
        rows.append({"floor": floor, "predicted": tp + fp, "true": tp + fn, "matched": tp,
                     "f1": round(f1_of_counts(tp, fp, fn), 4), "sbd": round(float(sbd), 4)})
    chosen = model.inference_record.get("min_size")
    print(f"{a.checkpoint}: {len(labels)} images, base floor {base} px, the checkpoint's floor {chosen} px")
    print("| floor (px) | objects predicted / true | matched at IoU 0.5 | F1 | SBD |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['floor']} | {r['predicted']} / {r['true']} | {r['matched']} | {r['f1']:.4f} | {r['sbd']:.4f} |")
    if a.json:
        json.dump({"checkpoint": a.checkpoint, "z_range": z_range, "base": base, "chosen": chosen, "rows": rows},
                  open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
