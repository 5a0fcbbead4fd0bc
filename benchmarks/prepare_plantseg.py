"""Write the PlantSeg 3D light-microscopy crops (../shared/data/plantseg_nuclei_crops and
plantseg_ovule_crop) as zarr volumes for the 3D experiments (benchmarks/train_3d.py).

- nuclei: OUT/nuclei_{1135,1136,1137}.zarr with ``raw`` (uint8) and ``labels`` (3D
  nucleus instances), voxel size in nm as the ``voxel_size`` attribute. The three
  rotations train on one crop and test on another. For each crop the script prints
  whether its raw carries an image: the correlation of neighbouring voxels and the mean
  intensity inside and outside the nuclei (1137's raw is uniform noise, see
  benchmarks/train_3d.py). The two real crops are also split along z at NUCLEI_SPLIT_Z:
  ``head_raw``/``head_labels`` (z < 60) and ``tail_raw``/``tail_labels`` (z >= 60), for the
  runs that train on one crop and the head of the other and test on its tail (train_3d.py
  --only nuclei-two). ``head_sparse_p10_s{S}`` keeps a seeded 10% of the head's nuclei
  (at least one; the rest 0 = unlabeled), seeds 0-2: the few nuclei a user annotates
  (fine_tune_3d.py --fractions 10).
- ovule: OUT/ovule.zarr, the 32 x 128 x 128 crop of cells with stained boundaries (dense
  labels), split along x: ``train_raw``/``train_labels`` x < 80, ``test_raw``/
  ``test_labels`` x >= 80 (cells cut by the split are cut in both halves).

Data: kreshuklab/plant-seg test resources at 9d748063 (repository MIT); ovule crop from
Wolny et al. 2020, eLife 9:e57613.

    python benchmarks/prepare_plantseg.py OUT_DIR [--data ../shared/data]
"""
import argparse
import os

import numpy as np
from scipy import ndimage

from spoco_vol import io
from spoco_vol.data import choose_object_subset

DEFAULT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
NUCLEI = ("1135", "1136", "1137")
OVULE_SPLIT_X = 80
NUCLEI_SPLIT_Z = 60
SPARSE_SEEDS = (0, 1, 2)


def _pieces(lab):
    """Each connected piece of each object its own id: an object cut by a split can fall
    apart into pieces."""
    pieces = np.zeros(lab.shape, np.uint32)
    n = 0
    for i in np.unique(lab[lab > 0]):
        comp, k = ndimage.label(lab == i)
        pieces[comp > 0] = comp[comp > 0] + n
        n += k
    return pieces, n


def _relabel(labels):
    """Consecutive ids 1..n (0 kept)."""
    ids = np.unique(labels[labels > 0])
    lut = np.zeros(int(labels.max()) + 1, np.uint32)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--data", default=DEFAULT)
    a = p.parse_args()
    for crop in NUCLEI:
        d = np.load(os.path.join(a.data, "plantseg_nuclei_crops", f"{crop}_mini.npz"))
        attrs = {"voxel_size": [float(v) for v in d["resolution_nm"]],
                 "source": f"PlantSeg test resources, {crop}_mini (kreshuklab/plant-seg, MIT)"}
        path = os.path.join(a.out, f"nuclei_{crop}.zarr")
        io.create_array(path + "/raw", d["raw"], chunks=(50, 100, 100), attrs=attrs, overwrite=True)
        io.create_array(path + "/labels", _relabel(d["labels"]), chunks=(50, 100, 100), attrs=attrs, overwrite=True)
        raw = d["raw"].astype(np.float64)
        corr = np.corrcoef(raw[..., :-1].ravel(), raw[..., 1:].ravel())[0, 1]
        inside = d["labels"] > 0
        print(f"wrote {path}: {int(d['labels'].max())} nuclei; neighbouring voxels correlate {corr:.3f}, "
              f"mean intensity inside / outside the nuclei {raw[inside].mean():.1f} / {raw[~inside].mean():.1f}")
        if crop == "1137":  # noise, see above
            continue
        for name, sl in (("head", np.s_[:NUCLEI_SPLIT_Z]), ("tail", np.s_[NUCLEI_SPLIT_Z:])):
            pieces, n = _pieces(d["labels"][sl])
            io.create_array(f"{path}/{name}_raw", np.ascontiguousarray(d["raw"][sl]), chunks=(50, 100, 100),
                            attrs=attrs, overwrite=True)
            io.create_array(f"{path}/{name}_labels", pieces, chunks=(50, 100, 100), attrs=attrs, overwrite=True)
            print(f"wrote {path}/{name}: {n} nuclei")
            if name == "head":
                for seed in SPARSE_SEEDS:
                    keep = choose_object_subset(np.arange(1, n + 1), 0.1, seed)
                    sparse = np.where(np.isin(pieces, keep), pieces, 0).astype(np.uint32)
                    io.create_array(f"{path}/head_sparse_p10_s{seed}", sparse, chunks=(50, 100, 100), attrs=attrs,
                                    overwrite=True)
                    print(f"wrote {path}/head_sparse_p10_s{seed}: nuclei {keep.tolist()} of {n}")
    d = np.load(os.path.join(a.data, "plantseg_ovule_crop", "sample_ovule.npz"))
    attrs = {"voxel_size": [float(v) for v in d["resolution_nm"]],
             "source": "PlantSeg sample_ovule (Wolny et al. 2020, eLife; kreshuklab/plant-seg, MIT)"}
    path = os.path.join(a.out, "ovule.zarr")
    for name, sl in (("train", np.s_[:, :, :OVULE_SPLIT_X]), ("test", np.s_[:, :, OVULE_SPLIT_X:])):
        pieces, n = _pieces(d["labels"][sl])
        io.create_array(f"{path}/{name}_raw", np.ascontiguousarray(d["raw"][sl]), attrs=attrs, overwrite=True)
        io.create_array(f"{path}/{name}_labels", pieces, attrs=attrs, overwrite=True)
        print("wrote", f"{path}/{name}", n, "cells")


if __name__ == "__main__":
    main()
