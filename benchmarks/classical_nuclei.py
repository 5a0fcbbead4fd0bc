"""A classical reference for the 3D nuclei crops: Gaussian smoothing, Otsu threshold,
distance-transform seeds and a watershed (scikit-image), scored with the same metrics as
the learned models (3D AP@0.5 over the whole crop). Nothing is learned or tuned: it prints
a small grid of the two parameters, to say how hard each crop is, not to choose anything.

    python benchmarks/prepare_plantseg.py /tmp/plantseg
    python benchmarks/classical_nuclei.py /tmp/plantseg
"""
import argparse

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.segmentation import watershed

from spoco_vol import io
from spoco_vol.evaluation import evaluate_segmentation


def classical_nuclei(raw: np.ndarray, sigma: float, min_distance: int, anisotropy: float) -> np.ndarray:
    """Labels of a (z, y, x) nuclei image: smoothed (sigma in y/x pixels), thresholded by
    Otsu, one seed per local maximum of the distance to the background."""
    smooth = gaussian(raw.astype(np.float32), sigma=(sigma / anisotropy, sigma, sigma))
    fg = smooth > threshold_otsu(smooth)
    dist = ndi.distance_transform_edt(fg, sampling=(anisotropy, 1, 1))
    peaks = peak_local_max(dist, min_distance=min_distance, labels=ndi.label(fg)[0], exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=fg)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("work")
    a = p.parse_args()
    print(f"{'crop':>5} {'sigma':>5} {'min dist':>8} {'fg IoU':>6} {'AP@0.5':>6} {'mAP':>5} {'prec':>5} {'recall':>6}"
          f" {'pred':>4} {'true':>4}")
    for crop in ("1135", "1136"):
        path = f"{a.work}/nuclei_{crop}.zarr"
        raw, gt = np.asarray(io.open_volume(path + "/raw")[...]), np.asarray(io.open_volume(path + "/labels")[...])
        vs = io.read_voxel_size(path + "/raw")
        for sigma in (1.5, 2.5):
            for min_distance in (4, 7):
                seg = classical_nuclei(raw, sigma, min_distance, vs[0] / vs[1])
                m = evaluate_segmentation(seg, gt)
                iou = ((seg > 0) & (gt > 0)).sum() / ((seg > 0) | (gt > 0)).sum()
                print(f"{crop:>5} {sigma:>5} {min_distance:>8} {iou:>6.2f} {m['ap@0.5']:>6.3f} {m['map']:>5.3f} "
                      f"{m['precision']:>5.2f} {m['recall']:>6.2f} {m['n_pred']:>4} {m['n_gt']:>4}")


if __name__ == "__main__":
    main()
