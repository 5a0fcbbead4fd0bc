"""Where a 3D model's errors come from: its background rule or its splitting.

For a checkpoint and a labelled crop (or a z-range of it) the table gives 3D AP@0.5 with
the model's own background rule, and with the ground truth's foreground as the only
background rule (what `spoco-vol segment --mask LABELS --mask-is-foreground` does): the
gap between them is what a perfect foreground would be worth, what is left below 1 is
the splitting. Then the IoU of the model's foreground (voxels at least the background
radius from the background embedding) with the ground truth's, over radii; and the
same two AP figures with the volume's border handled as training handles a patch's
(the network's own zero padding) instead of reflected context.

    python benchmarks/nuclei_background.py CKPT CROP.zarr [--z-range Z0,Z1]
    (CROP.zarr holds raw and labels, as benchmarks/prepare_plantseg.py writes them)
"""
import argparse

import numpy as np

from spoco_vol import checkpoint, io
from spoco_vol.evaluation import evaluate_segmentation
from spoco_vol.pipeline import mask_on_model_grid, predict_array, restore_labels
from spoco_vol.segmentation import segment_embeddings, watershed_mask

RADII = (1.0, 1.5, 2.0, 2.5, 3.0)


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


if __name__ == "__main__":
    main()
