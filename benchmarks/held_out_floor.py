"""Choose a sparse-label checkpoint's size floor on its own held-out objects, as training
does since b319c76, for checkpoints trained before (which kept the base floor): rebuild
the run's held-out objects from the training command the checkpoint records (the same
seeded draw), segment their windows as training calibrates them, print each floor's
counts and F1 (spoco_vol.validation.choose_size_floor), and save the checkpoint with the
chosen floor as OUT. Only held-out objects choose; no test image is read.

    python benchmarks/held_out_floor.py CHECKPOINT OUT [--json ROWS.json]

The training data must be where the command names it, and the same data: the held-out
draw follows the object ids (a CVPPP run trained before df9948e needs the stack that
prepare_cvppp.py wrote before it, in image-number order).
"""
import argparse
import dataclasses
import json
import shlex

import torch

from spoco_vol import bundled, checkpoint
from spoco_vol.calibration import segment_at_base_floor
from spoco_vol.cli import cli
from spoco_vol.config import TrainConfig, fine_tune_config
from spoco_vol.training_data import object_windows, prepare_volumes
from spoco_vol.validation import FLOOR_MULTIPLES, f1_of_counts, floor_of_counts, size_floor_counts


def training_config(model: checkpoint.Checkpoint) -> TrainConfig:
    """The TrainConfig of the command that trained ``model`` (`spoco-vol train` or
    `spoco-vol fine-tune`, built as the command line builds it), on the model's grid."""
    if not model.training_command:
        raise SystemExit("the checkpoint records no training command")
    words = shlex.split(model.training_command)
    command = words[1]
    if command not in ("train", "fine-tune"):
        raise SystemExit(f"the checkpoint was made by `spoco-vol {command}`, not by train or fine-tune")
    settings = dict(cli.commands[command].make_context(command, words[2:]).params)
    if command == "fine-tune":
        cfg = fine_tune_config(list(settings.pop("raw")), list(settings.pop("labels")), settings.pop("out"),
                               settings.pop("model"), **settings)
    else:
        for k in ("raw", "labels", "val_raw", "val_labels"):
            settings[k] = list(settings[k])
        cfg = TrainConfig(**settings)
    return dataclasses.replace(cfg.check(), downsample=list(model.inference.downsample or [1, 1, 1]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    model = checkpoint.load(a.checkpoint)
    cfg = training_config(model)
    init = checkpoint.load(bundled.model_path(cfg.init)) if cfg.init else None
    held = prepare_volumes(cfg, None if init is None else init.normalization)[2]
    if not held:
        raise SystemExit(f"{a.checkpoint}: its run held out no objects (dense validation: spoco-vol calibrate)")
    images, objects = object_windows(held, cfg, model.normalization)
    # fp32 on the CPU, as the tables in RESULTS were measured; training calibrates the same way there
    segmentations, labels, base, objects = segment_at_base_floor(model, images, torch.device("cpu"), amp=False,
                                                                 objects=objects)
    floors = [base * m for m in FLOOR_MULTIPLES]
    counts = size_floor_counts(segmentations, labels, floors, objects)
    floor, f1 = floor_of_counts(floors, counts)  # choose_size_floor's choice, from the counts printed
    print(f"{a.checkpoint}: {len(objects)} held-out objects, base floor {base} px, chosen {floor} px (F1 {f1:.4f})")
    print("| floor (px) | held-out objects matched / missed | false fragments near them | F1 |")
    print("|---|---|---|---|")
    rows = []
    for fl, (tp, fp, fn) in zip(floors, counts):
        rows.append({"floor": fl, "matched": tp, "missed": fn, "false_near": fp,
                     "f1": round(f1_of_counts(tp, fp, fn), 4)})
        print(f"| {fl} | {tp} / {fn} | {fp} | {rows[-1]['f1']:.4f} |")
    checkpoint.save(model.with_inference(min_size=floor, min_size_base=base, min_size_val_f1=round(f1, 4)), a.out)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"checkpoint": a.checkpoint, "base": base, "chosen": floor, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
