"""The SPOCO paper's CVPPP A1 table (leaves, RGB) with spoco-vol: Symmetric Best Dice
and |DiC| on the 25 test images of benchmarks/prepare_cvppp.py (never trained on, never
used to choose anything), for

- SPOCO with full labels, segmented with the ground-truth foreground (``--mask``: the
  model's own background rule still applies inside it; and with ``--mask-is-foreground``,
  the paper's protocol, where the mask alone decides the background), with a predicted
  foreground (the foreground classifier trained supervised on the same labels) and
  without a mask;
- SPOCO@0.1, @0.4, @0.8 (seeds 0, 1, 2: other objects annotated), the sparse recipe, with
  its predicted (positive-unlabeled) foreground;
- the discriminative-loss baseline (pull, push, regulariser), and SPOCO with the
  adversarial instance term, both with the ground-truth foreground as in the paper;
- SPOCO with full labels and the paper's U-Net depth (``deep``: features 16..512, five
  poolings, so the bottleneck sees the whole patch; the default 16..128 sees 68 pixels);
- SPOCO with full labels without the consistency term (``no-consistency``): with full
  labels the term covers every pixel and pulls f towards a momentum copy that, after 2000
  iterations at m = 0.999, still carries 14% of its initial weights;
- SPOCO with full labels and the momentum ramp (``ramp``: ``--momentum-ramp``, g is the
  mean of f's iterates until m takes over, so none of f's initial weights stay in it);
- SPOCO with full labels at half resolution (``half``: ``--downsample 1,2,2`` with a nominal
  voxel size of 1, so that ``segment`` reads the test images at half resolution too and
  writes the labels back at full; 240 x 240 patches, nearly the whole plant, as the
  reference code trains on whole images); ``dl-half``: the baseline the same way, and
  ``p0.1-half``, ``p0.4-half``, ``p0.8-half``: SPOCO@p the same way;

Every run trains at ``--lr`` (default 2e-4, the rate of the table's rows; `spoco-vol train`
has defaulted to 1e-3 with full labels since). Another rate names its runs and rows apart
(``--only full --lr 1e-3``: ``full_lr1e-3``, "full, lr 1e-3, ..."), and so does another
length than 2000 iterations (``--iterations 4000``: ``full_it4000``, "full, 4000 iterations, ...").
``--no-tta`` trains the SPOCO@p runs without the sparse recipe's ``--tta`` (``p0.1-half_notta_s0``,
"SPOCO@0.1, half resolution, without TTA"): the recipe keeps TTA unless its held-out objects
score higher without it, and at @0.1 only 24 leaves are held out. ``--colour-jitter 0.4``
trains every run with the reference code's CVPPP colour augmentation (``half_lr1e-3_cj0.4``,
"full, half resolution, lr 1e-3, colour jitter 0.4, ...").

Every run is `spoco-vol train` on cvppp_train.zarr (the last 10 images validate full-label
runs; sparse runs hold out objects), then `spoco-vol segment` and `spoco-vol evaluate
--per-section` of cvppp_test.zarr. Finished runs are not redone; results go to
WORK/cvppp.json and the table to WORK/cvppp.md.

    python benchmarks/prepare_cvppp.py /tmp/cvppp
    python benchmarks/cvppp.py /tmp/cvppp [--only full,deep,no-consistency,ramp,half,dl,dl-half,adversarial,p0.1,p0.4,p0.8,
                                         p0.1-half,p0.4-half,p0.8-half]
        [--seeds 0,1,2] [--iterations N] [--lr LR] [--no-tta] [--colour-jitter S]
        [--extra-masks gt,gt-only]

--seeds applies to every requested setting (default 0 for the full-label ones, whose
seed changes only the initialisation and the patches; 0,1,2 for SPOCO@p). --extra-masks
segments every requested run with these masks too (a sparse run with the ground-truth
foreground in place of its classifier: "SPOCO@0.8, GT foreground").
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

ITERATIONS = 2000
LR = "2e-4"
COMMON = ["--dims", "2", "--patch-shape", "256,256", "--batch-size", "4", "--quiet"]
SPARSE = ["--background-weight", "1", "--background-warmup", "300", "--background-select-radius", "3", "--tta",
          "--foreground-iterations", "600"]
DEEP = "16,32,64,128,256,512"  # the paper's CVPPP U-Net (kreshuklab/spoco README)
FULL = ["--val-sections", "10", "--foreground-iterations", "600"]  # full labels: the last 10 images validate
HALF = ["--voxel-size", "1,1,1", "--downsample", "1,2,2", "--patch-shape", "240,240"]  # the later --patch-shape wins
MASKS = {"gt": "GT foreground", "gt-only": "GT foreground as the only background rule",
         "classifier": "predicted foreground", "none": "no mask"}  # how segment_and_score masks the test images
PAPER = {"full, GT foreground": 0.932, "full, predicted foreground": 0.920, "full, no mask": 0.886,
         "SPOCO@0.1": 0.788, "SPOCO@0.4": 0.824, "SPOCO@0.8": 0.828, "discriminative loss, GT foreground": 0.842}


def runs(only, seeds, lr=LR, iterations=ITERATIONS, extra_masks=(), tta=True, colour_jitter=None):
    """(run name, seed, train options, [(setting, mask kind)]) of each requested run. Seed
    0 of a full-label setting keeps the setting's bare name; other seeds add _s<seed>. Every
    run trains at lr (a string as given to train's --lr) for iterations; another rate than
    LR or another length than ITERATIONS is named apart (``_lr1e-3_it4000``, ", lr 1e-3,
    4000 iterations"). extra_masks: mask kinds to segment every run with besides its own
    (``gt``: a sparse run with the ground-truth foreground in place of its classifier).
    tta=False: the SPOCO@p runs train without --tta, named apart (``_notta``, ", without TTA").
    colour_jitter: every run trains with train's --colour-jitter (a string), named apart
    (``_cj0.4``, ", colour jitter 0.4")."""
    tag, at = (f"_lr{lr}", f", lr {lr}") if lr != LR else ("", "")
    if iterations != ITERATIONS:
        tag, at = f"{tag}_it{iterations}", f"{at}, {iterations} iterations"
    shared_options = ["--lr", lr]
    if colour_jitter:
        tag, at = f"{tag}_cj{colour_jitter}", f"{at}, colour jitter {colour_jitter}"
        shared_options += ["--colour-jitter", colour_jitter]
    full_label = [  # (name, train options, the rows' label, mask kinds)
        ("full", FULL, "full", ("gt", "gt-only", "classifier", "none")),
        ("deep", [*FULL, "--features", DEEP], "full, paper's depth", ("gt", "none")),
        ("no-consistency", [*FULL, "--consistency-weight", "0"], "full, no consistency term", ("gt", "gt-only", "none")),
        ("ramp", [*FULL, "--momentum-ramp"], "full, momentum ramp", ("gt", "gt-only", "none")),
        ("half", [*FULL, *HALF], "full, half resolution", ("gt", "gt-only", "classifier", "none")),
        ("dl", ["--val-sections", "10", "--loss", "discriminative"], "discriminative loss", ("gt",)),
        ("dl-half", ["--val-sections", "10", "--loss", "discriminative", *HALF], "discriminative loss, half resolution",
         ("gt",)),
        ("adversarial", ["--val-sections", "10", "--adversarial-weight", "0.1"], "full + adversarial term", ("gt",)),
    ]
    out = []  # the settings' names are the keys of WORK/cvppp.json
    for name, options, label, kinds in full_label:
        if name in only:
            rows = [(f"{label}{at}, {MASKS[kind]}", kind)
                    for kind in (*kinds, *(k for k in extra_masks if k not in kinds))]
            out += [(name + tag if s == 0 else f"{name}{tag}_s{s}", s, [*options, *shared_options], rows)
                    for s in seeds or [0]]
    sparse = SPARSE if tta else [o for o in SPARSE if o != "--tta"]
    if not tta:
        tag, at = f"{tag}_notta", f"{at}, without TTA"
    for p in ("0.1", "0.4", "0.8"):
        for suffix, resolution, label in (("", [], ""), ("-half", HALF, ", half resolution")):
            if f"p{p}{suffix}" in only:  # its own row, with its (positive-unlabeled) classifier, is named bare
                rows = [(f"SPOCO@{p}{label}{at}", "classifier")]
                rows += [(f"SPOCO@{p}{label}{at}, {MASKS[kind]}", kind) for kind in extra_masks if kind != "classifier"]
                options = ["--object-fraction", p, *sparse, *resolution, *shared_options]
                out += [(f"p{p}{suffix}{tag}_s{s}", s, options, rows) for s in seeds or [0, 1, 2]]
    return out


def segment_and_score(exe, work, model, name, mask_kind, voxel_size=None):
    """voxel_size: the nominal one the run trained with (``half``), given to segment too."""
    test = os.path.join(work, "cvppp_test.zarr")
    out = os.path.join(work, "seg", f"{name}_{mask_kind}.zarr")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [exe, "segment", "--input", f"{test}/raw", "--output", out, "--model", model, "--quiet", "--overwrite"]
    if voxel_size:
        cmd += ["--voxel-size", voxel_size]
    if mask_kind in ("gt", "none"):  # the embeddings' own background rule, and the mask if any
        from spoco_vol import checkpoint
        if checkpoint.load(model).has_foreground:
            cmd.append("--no-foreground-classifier")
    if mask_kind in ("gt", "gt-only"):
        mask = os.path.join(work, "cvppp_test_fg.zarr")
        if not os.path.exists(mask):
            from spoco_vol import io
            io.create_array(mask, (np.asarray(io.open_volume(f"{test}/labels")[...]) > 0).astype(np.uint8))
        cmd += ["--mask", mask] + (["--mask-is-foreground"] if mask_kind == "gt-only" else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    res = subprocess.run([exe, "evaluate", "--pred", out, "--gt", f"{test}/labels", "--per-section", "--json"],
                         check=True, capture_output=True, text=True)
    m = json.loads(res.stdout)
    return {k: m[k] for k in ("sbd", "abs_dic", "ap@0.5", "n_pred", "n_gt")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("--only", default="full,dl,adversarial,p0.1,p0.4,p0.8")
    p.add_argument("--seeds", default=None, help="default: 0 for full-label settings, 0,1,2 for SPOCO@p")
    p.add_argument("--iterations", type=int, default=ITERATIONS)
    p.add_argument("--lr", default=LR, help="train every requested setting at this learning rate")
    p.add_argument("--no-tta", action="store_true", help="train the SPOCO@p runs without --tta")
    p.add_argument("--colour-jitter", default=None, help="train every requested setting with this --colour-jitter")
    p.add_argument("--extra-masks", default="", help=f"also segment every run with these masks, of {','.join(MASKS)}")
    a = p.parse_args()
    path = os.path.join(a.work, "cvppp.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    exe = os.path.join(os.path.dirname(sys.executable), "spoco-vol")
    train = os.path.join(a.work, "cvppp_train.zarr")
    for name, seed, options, evaluations in runs(a.only.split(","), a.seeds and [int(s) for s in a.seeds.split(",")],
                                                a.lr, a.iterations, [k for k in a.extra_masks.split(",") if k],
                                                not a.no_tta, a.colour_jitter):
        out = os.path.join(a.work, "runs", name)
        if not os.path.exists(os.path.join(out, "summary.json")):
            resume = ["--resume"] if os.path.exists(os.path.join(out, "latest.pt")) else ["--overwrite"]
            cmd = [exe, "train", "--raw", f"{train}/raw", "--labels", f"{train}/labels", "--out", out, "--seed",
                   str(seed), "--iterations", str(a.iterations), *COMMON, *options, *resume]
            print("run:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        summary = json.load(open(os.path.join(out, "summary.json")))
        voxel_size = options[options.index("--voxel-size") + 1] if "--voxel-size" in options else None
        for setting, mask_kind in evaluations:
            key = f"{name}:{setting}"
            if key in results:
                continue
            results[key] = {"setting": setting, "run": name, "seed": seed, "train_seconds": summary["seconds"],
                            "test": segment_and_score(exe, a.work, os.path.join(out, "best.pt"), name, mask_kind,
                                                      voxel_size)}
            print(key, json.dumps(results[key]["test"]), flush=True)
            json.dump(results, open(path + ".tmp", "w"), indent=1)
            os.replace(path + ".tmp", path)
    rows = ["| setting | runs | SBD per run | SBD mean | |DiC| mean | paper's SBD |", "|---|---|---|---|---|---|"]
    settings = {}
    for r in results.values():
        settings.setdefault(r["setting"], []).append(r)
    for setting, rs in settings.items():
        rs.sort(key=lambda r: r["seed"])
        sbd = [r["test"]["sbd"] for r in rs]
        rows.append(f"| {setting} | {len(rs)} | {' / '.join(f'{x:.3f}' for x in sbd)} | **{np.mean(sbd):.3f}** | "
                    f"{np.mean([r['test']['abs_dic'] for r in rs]):.2f} | {PAPER.get(setting, '-')} |")
    text = "\n".join(rows)
    open(os.path.join(a.work, "cvppp.md"), "w").write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
