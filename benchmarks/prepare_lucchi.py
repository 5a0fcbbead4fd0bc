"""Write the Lucchi FIB-SEM stack (../shared/data/lucchi_train) as zarr volumes for the
transfer experiments (benchmarks/transfer_lucchi.sh).

Sections 0-63 -> OUT/lucchi_train.zarr, sections 64-79 -> OUT/lucchi_test.zarr (the test
set: never trained on, never used to choose a setting). Each holds ``raw`` (uint8) and
``labels`` (per-section 2D mitochondria, ids unique over the stack); the voxel size
(5 nm isotropic) is the ``voxel_size`` attribute. The training volume also gets the
sparse annotations a user would bring: ``sparse_p{P}_s{S}`` keeps a seeded random
P percent of the 2D objects of sections 0-63 (the rest 0 = unlabeled), for P in 1, 5, 10
and seeds S in 0, 1, 2.

Data: Lucchi A, Smith K, Achanta R, Knott G, Fua P (2012), IEEE TMI 31(2):474-486;
Lucchi A, Li Y, Fua P (2013), CVPR. No licence statement in the source repository.

    python benchmarks/prepare_lucchi.py OUT_DIR [--data ../shared/data/lucchi_train/train.npz]
"""
import argparse
import os

import numpy as np

from spoco_vol import io
from spoco_vol.data import choose_object_subset

DEFAULT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "lucchi_train", "train.npz")
TEST_START = 64
FRACTIONS = (1, 5, 10)   # percent of the 2D objects
SEEDS = (0, 1, 2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--data", default=DEFAULT)
    a = p.parse_args()
    d = np.load(a.data)
    vs = [float(v) for v in d["resolution_nm"]]
    raw, labels = d["raw"], d["labels_2d"].astype(np.uint32)
    attrs = {"voxel_size": vs, "source": "EPFL hippocampus CA1 FIB-SEM, Lucchi et al. 2012/2013"}
    for name, sl in (("lucchi_train", slice(0, TEST_START)), ("lucchi_test", slice(TEST_START, None))):
        path = os.path.join(a.out, f"{name}.zarr")
        io.create_array(path + "/raw", raw[sl], chunks=(1, 768, 1024), attrs=attrs, overwrite=True)
        io.create_array(path + "/labels", labels[sl], chunks=(1, 768, 1024), attrs=attrs, overwrite=True)
        print("wrote", path)
    train = labels[:TEST_START]
    ids = np.unique(train[train > 0])
    for pct in FRACTIONS:
        for seed in SEEDS:
            keep = choose_object_subset(ids, pct / 100, seed)
            sparse = np.where(np.isin(train, keep), train, 0).astype(np.uint32)
            name = f"sparse_p{pct}_s{seed}"
            io.create_array(os.path.join(a.out, "lucchi_train.zarr", name), sparse, chunks=(1, 768, 1024),
                            attrs=attrs, overwrite=True)
            in_sections = int((sparse.reshape(len(sparse), -1) > 0).any(1).sum())
            print(f"wrote {name}: {len(keep)} of {len(ids)} objects, in {in_sections} of {TEST_START} sections")


if __name__ == "__main__":
    main()
