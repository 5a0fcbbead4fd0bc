"""How far the patch border reaches into a trained network's embeddings.

Training predicts each patch alone, so the U-Net zero-pads at the patch border; inference
predicts every voxel with real context around it (spoco_vol.inference). This prints, for
one training-sized patch taken from the middle of an image, the mean distance between the
embeddings the patch gets alone and the ones the same voxels get inside the whole image,
by distance from the patch border, and the share of the patch's voxels within each
distance. Where the distance is large, the loss trained embeddings that inference never
produces: `train --loss-margin` leaves those voxels out of the loss.

    python benchmarks/bench_patch_border.py CHECKPOINT RAW [--index I]

RAW: a zarr array the checkpoint was trained on (2D models: section I; channel-first
arrays for multi-channel models).
"""
import argparse

import numpy as np
import torch

from spoco_vol import checkpoint, intensity, io
from spoco_vol.model import receptive_halo
from spoco_vol.pipeline import model_grid_image


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("raw")
    p.add_argument("--index", type=int, default=0, help="the section, for a 2D model")
    a = p.parse_args()
    ck = checkpoint.load(a.checkpoint)
    net = ck.network().eval()
    vol = io.open_volume(a.raw)
    if ck.dims == 2:
        raw = np.asarray(vol[:, a.index] if ck.in_channels > 1 else vol[a.index])
    else:
        raw = np.asarray(vol[...])
    scale = [1 / d for d in ck.inference.downsample][3 - ck.dims:]  # the training's resampling
    img = model_grid_image(raw, ck, scale, intensity.volume_mapping(raw, ck.normalization))
    img = img if ck.in_channels > 1 else img[None]  # (C, *spatial)
    mult = net.shape_multiple
    spatial = [n - n % m for n, m in zip(img.shape[1:], mult)]
    img = img[(slice(None), *(slice(0, n) for n in spatial))]
    patch = [min(p, n - 2 * m) - min(p, n - 2 * m) % m
             for p, n, m in zip(ck.training["patch_shape"], spatial, mult)]
    start = [m * ((n - q) // (2 * m)) for n, q, m in zip(spatial, patch, mult)]
    window = tuple(slice(s, s + q) for s, q in zip(start, patch))
    with torch.no_grad():
        whole = net(torch.from_numpy(np.ascontiguousarray(img[None])))[0][(slice(None), *window)]
        alone = net(torch.from_numpy(np.ascontiguousarray(img[(slice(None), *window)][None])))[0]
    diff = (whole - alone).norm(dim=0).numpy()
    # distance of each voxel from the nearest patch face, in model pixels
    grids = np.meshgrid(*[np.minimum(np.arange(q), q - 1 - np.arange(q)) for q in patch], indexing="ij")
    dist = np.minimum.reduce(grids)
    print(f"checkpoint {a.checkpoint}: patch {patch} (trained {ck.training['patch_shape']}), field of view "
          f"{receptive_halo(net)} pixels per side, loss margin {ck.training.get('loss_margin', 0)}")
    print(f"{'from border':>11} {'mean |diff|':>11} {'share of patch within':>22}")
    for k in (0, 2, 4, 8, 12, 16, 24, 32, 48, 64):
        if k >= max(dist.max(), 1):
            break
        print(f"{k:>11} {diff[dist == k].mean():>11.3f} {float((dist <= k).mean()):>22.2f}")


if __name__ == "__main__":
    main()
