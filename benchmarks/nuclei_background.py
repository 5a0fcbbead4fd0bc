"""Where a 3D model's errors come from: its background rule or its splitting.

For a checkpoint and a labelled crop (or a z-range of it) the table gives 3D AP@0.5 with
the model's own background rule, and with the ground truth's foreground as the only
background rule (what `spoco-vol segment --mask LABELS --mask-is-foreground` does): the
gap between them is what a perfect foreground would be worth, what is left below 1 is
the splitting. Then the IoU of the model's foreground (voxels at least the background
radius from the background embedding) with the ground truth's, over radii; and the
same two AP figures with the volume's border handled as training handles a patch's
(the network's own zero padding) instead of reflected context. With `--ap-by-radius`: the
model's AP@0.5 over the background radius it uses (the classifier's, where it has one),
with its own offsets and with the default 3, 9, 27: how much the choice that training's
held-out objects made moves the result.

    python benchmarks/nuclei_background.py CKPT CROP.zarr [--z-range Z0,Z1] [--ap-by-radius]
    (CROP.zarr holds raw and labels, as benchmarks/prepare_plantseg.py writes them)
"""
import argparse

import numpy as np

from spoco_vol import checkpoint, io
from spoco_vol.affinities import default_offsets
from spoco_vol.evaluation import evaluate_segmentation
from spoco_vol.pipeline import mask_on_model_grid, predict_array, restore_labels
from spoco_vol.segmentation import segment_embeddings, watershed_mask

RADII = (1.0, 1.5, 2.0, 2.5, 3.0)
AP_RADII = (0.0, 0.5, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


def ap_of(pred, ck, raw, gt, own_background: bool) -> dict:
    inf = ck.inference
    lab = segment_embeddings(pred.embeddings, inf.offsets, ck.delta_d, strides=inf.strides, min_size=inf.min_size,
                             background_embedding=inf.background_embedding if own_background else None,
                             background_radius=inf.background_radius, foreground=pred.foreground,
                             foreground_threshold=inf.foreground_threshold)
    m = evaluate_segmentation(restore_labels(lab, raw.shape, pred.scale), gt)
    return {"ap@0.5": m["ap@0.5"], "n_pred": m["n_pred"], "n_gt": m["n_gt"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("crop", help="zarr group with raw and labels")
    p.add_argument("--z-range", default=None, help="Z0,Z1: only these sections, segmented alone")
    p.add_argument("--ap-by-radius", action="store_true",
                   help="also AP@0.5 over background radii, with the model's offsets and the default ones")
    a = p.parse_args()
    ck = checkpoint.load(a.ckpt)
    z0, z1 = map(int, a.z_range.split(",")) if a.z_range else (None, None)
    raw = np.asarray(io.open_volume(a.crop + "/raw")[z0:z1])
    gt = np.asarray(io.open_volume(a.crop + "/labels")[z0:z1])
    vs = io.read_voxel_size(a.crop + "/raw")
    print(f"{a.ckpt} on {a.crop} sections {z0 or 0}-{(z1 or raw.shape[0]) - 1}")
    print(f"{'volume border':>15} {'background rule':>24} {'AP@0.5':>7} {'objects':>9}")
    for border, borders in (("reflected", None), ("zero padding", [(False, False)] * ck.dims)):
        own = predict_array(raw, ck, input_voxel_size=vs, device="cpu", volume_borders=borders)
        # the same embeddings, the ground truth's foreground as predict_array(mask=) would apply it
        inside = mask_on_model_grid(gt > 0, own.embeddings.shape[1:], own.scale).astype(np.float32)
        masked = own._replace(foreground=inside if own.foreground is None else own.foreground * inside)
        for rule, pred, flag in (("the model's", own, True), ("ground-truth foreground", masked, False)):
            r = ap_of(pred, ck, raw, gt, flag)
            print(f"{border:>15} {rule:>24} {r['ap@0.5']:7.3f} {r['n_pred']:>4} / {r['n_gt']:<3}")
        if borders is None:
            fg = gt > 0
            ious = []
            for radius in RADII:
                m = watershed_mask(own.embeddings, ck.delta_d, background_embedding=ck.inference.background_embedding,
                                   background_radius=radius, foreground=own.foreground,
                                   foreground_threshold=ck.inference.foreground_threshold)
                m = restore_labels(m.astype(np.uint8), raw.shape, own.scale) > 0
                ious.append(f"{radius}: {(m & fg).sum() / max((m | fg).sum(), 1):.3f}")
            print(f"foreground IoU with the ground truth by background radius (the model's: "
                  f"{ck.inference.background_radius}): " + ", ".join(ious))
            if a.ap_by_radius:
                ap_by_radius(own, ck, raw, gt)


def ap_by_radius(pred, ck, raw, gt):
    """AP@0.5 of the same embeddings over background radii (the classifier's where the model
    has one, else the embeddings'), with the model's offsets and with the default ones."""
    which = "the classifier's" if ck.has_foreground else "the embeddings'"
    print(f"AP@0.5 by {which} background radius (the model's: {ck.inference.background_radius})")
    for name, offsets in (("the model's offsets", None), ("offsets 3, 9, 27", default_offsets(ck.dims))):
        base = ck if offsets is None else ck.with_inference(offsets=[list(o) for o in offsets])
        row = []
        for radius in AP_RADII:
            c = base.with_foreground_radius(radius) if ck.has_foreground else base.with_inference(
                background_radius=radius)
            row.append(f"{radius}: {ap_of(pred, c, raw, gt, True)['ap@0.5']:.3f}")
        print(f"{name:>20}: " + ", ".join(row))


if __name__ == "__main__":
    main()
