"""Held-out accuracy of checkpoints on VNC sections 13-19 (real EM, mitochondria).

Prints one row per checkpoint: AP@0.5 over 2D objects per section (the primary metric),
the same restricted to the true foreground (diagnoses background fragments), mAP,
adapted Rand error, VOI, object counts, whether the checkpoint segments with test-time
augmentation (set by `spoco-vol calibrate --tta` or `train --tta`) and segmentation time.

    python benchmarks/prepare_vnc.py /tmp/vnc
    python benchmarks/eval_vnc.py --test /tmp/vnc/vnc_test.zarr CKPT [CKPT ...] [--no-background] [--device cuda]
"""
import argparse
import time

import numpy as np

from spoco_vol import io
from spoco_vol.evaluation import evaluate_segmentation, foreground_restricted
from spoco_vol import checkpoint
from spoco_vol.pipeline import segment_array


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--test", default="/tmp/vnc/vnc_test.zarr")
    p.add_argument("--no-background", action="store_true",
                   help="ablation: keep the segments the background rule would remove")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (the U-Net; the rest runs on the CPU)")
    a = p.parse_args()
    raw = np.asarray(io.open_volume(a.test + "/raw")[...])
    gt = np.asarray(io.open_volume(a.test + "/labels")[...])
    vs = io.read_voxel_size(a.test + "/raw")
    header = f"{'checkpoint':<34}{'AP@0.5':>8}{'AP@0.5 fg':>10}{'mAP':>7}{'prec':>6}{'recall':>7}{'ARand':>7}{'VOI':>7}{'#pred':>7}{'#gt':>6}{'tta':>5}{'sec':>7}"
    print(header)
    for path in a.checkpoints:
        ck = checkpoint.load(path)
        if a.no_background:
            ck = ck.with_inference(background_embedding=None)
        t = time.perf_counter()
        pred = segment_array(raw, ck, input_voxel_size=vs, device=a.device)
        sec = time.perf_counter() - t
        m = evaluate_segmentation(pred, gt, per_section=True)
        fg = evaluate_segmentation(foreground_restricted(pred, gt), gt, per_section=True)
        print(f"{path[-34:]:<34}{m['ap@0.5']:>8.3f}{fg['ap@0.5']:>10.3f}{m['map']:>7.3f}{m['precision']:>6.2f}{m['recall']:>7.2f}{m['arand']:>7.3f}"
              f"{m['voi']:>7.2f}{m['n_pred']:>7}{m['n_gt']:>6}{'yes' if ck.inference.tta else 'no':>5}{sec:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
