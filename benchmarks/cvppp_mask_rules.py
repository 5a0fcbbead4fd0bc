"""What a ground-truth foreground mask should do to the Mutex Watershed's segments on
CVPPP leaves, measured on the embeddings of one trained checkpoint.

`spoco-vol segment --mask` treats the mask as a perfect foreground classifier: pixels
outside it are background, and inside it the checkpoint's own rules still apply (the
embeddings' background radius, then the size floor, which turns segments below it into
background). With the ground-truth foreground of leaves every masked pixel belongs to a
leaf, so both rules can only remove leaf pixels. The rules compared here (Symmetric
Best Dice and |DiC| per image, as `spoco-vol evaluate --per-section`):

- shipped:     mask AND the background radius, then the floor (what --mask does);
- mask only:   the mask alone decides the background, then the floor;
- mask, fill:  the mask alone, the floor, then every masked pixel left without a segment
               joins the nearest segment (small pieces are absorbed, not deleted);
- each at floors from 0 to 1088 pixels and the checkpoint's own.

Choose on the validation images (the training stack's last 10, which training held out:
`--images val`), report on the test images (`--images test`).

    python benchmarks/cvppp_mask_rules.py /tmp/cvppp/runs/full/best.pt /tmp/cvppp --images val
"""
import argparse
import json
import time

import numpy as np
from skimage.segmentation import expand_labels


def fill_from_nearest(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked pixels without a segment take the label of the nearest pixel that has one."""
    return np.where(mask & (labels == 0), expand_labels(labels, distance=np.inf), labels)


def segment_rules(emb: np.ndarray, mask: np.ndarray, ckpt, floors):
    """{(rule, floor): labels} for one image's embeddings (E, Y, X) and its mask."""
    from spoco_vol.segmentation import segment_embeddings, clean_up_segments
    inf = ckpt.inference
    common = dict(strides=inf.strides, foreground=mask.astype(np.float32), foreground_threshold=0.5)
    raw_seg = {
        "shipped": segment_embeddings(emb, inf.offsets, ckpt.delta_d, background_embedding=inf.background_embedding,
                                      background_radius=inf.background_radius, min_size=0, **common),
        "mask only": segment_embeddings(emb, inf.offsets, ckpt.delta_d, min_size=0, **common),
    }
    out = {}
    for floor in floors:
        for rule, seg in raw_seg.items():
            out[(rule, floor)] = clean_up_segments(seg, floor)
        out[("mask, fill", floor)] = clean_up_segments(fill_from_nearest(out[("mask only", floor)], mask))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("work", help="the folder of benchmarks/prepare_cvppp.py")
    p.add_argument("--images", choices=["val", "test"], default="val")
    p.add_argument("--val-images", type=int, default=10, help="the training stack's last N images (as trained)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from spoco_vol import checkpoint, io
    from spoco_vol.evaluation import evaluate_segmentation
    from spoco_vol.pipeline import predict_array
    ckpt = checkpoint.load(a.checkpoint).with_foreground(None)
    stack = "cvppp_train.zarr" if a.images == "val" else "cvppp_test.zarr"
    raw = np.asarray(io.open_volume(f"{a.work}/{stack}/raw")[...])
    gt = np.asarray(io.open_volume(f"{a.work}/{stack}/labels")[...])
    if a.images == "val":
        raw, gt = raw[:, -a.val_images:], gt[-a.val_images:]
    base = int(ckpt.inference.min_size or 0)
    floors = sorted({0, 68, 136, 272, 544, 1088, base})
    t = time.perf_counter()
    emb = predict_array(raw, ckpt, device="cpu").embeddings  # (E, N, Y, X): the model grid is the input's
    seconds = time.perf_counter() - t
    results = {}
    for z in range(gt.shape[0]):
        for key, lab in segment_rules(emb[:, z], gt[z] > 0, ckpt, floors).items():
            results.setdefault(key, []).append(lab)
    rows = []
    for (rule, floor), labs in results.items():
        m = evaluate_segmentation(np.stack(labs), gt, per_section=True)
        rows.append({"rule": rule, "floor": floor, "sbd": m["sbd"], "abs_dic": m["abs_dic"], "ap@0.5": m["ap@0.5"],
                     "objects": m["n_pred"], "true": m["n_gt"]})
    rows.sort(key=lambda r: (r["rule"], r["floor"]))
    print(f"{a.images} images: {gt.shape[0]}, checkpoint floor {base} px, radius {ckpt.inference.background_radius}, "
          f"prediction {seconds:.0f} s")
    print(f"{'rule':>12} {'floor':>6} {'SBD':>6} {'|DiC|':>6} {'AP@0.5':>7} {'objects':>8}")
    for r in rows:
        print(f"{r['rule']:>12} {r['floor']:>6} {r['sbd']:6.3f} {r['abs_dic']:6.2f} {r['ap@0.5']:7.3f} "
              f"{r['objects']:>4}/{r['true']}")
    if a.json:
        json.dump({"checkpoint": a.checkpoint, "images": a.images, "rows": rows}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
