"""Write the VNC mitochondria stack (../shared/data/vnc_mito) as zarr train/test volumes.

Sections 0-12 -> OUT/vnc_train.zarr, sections 13-19 -> OUT/vnc_test.zarr, each with
arrays ``raw`` (uint8) and ``labels`` (per-section 2D instances, uint16), voxel size in nm
as the ``voxel_size`` attribute. Data: Gerhard et al. 2013, doi:10.6084/m9.figshare.856713,
CC BY-NC-SA 3.0.

    python benchmarks/prepare_vnc.py OUT_DIR [--data ../shared/data/vnc_mito/stack1.npz]
"""
import argparse
import os

import numpy as np

from spoco_vol import io

DEFAULT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "vnc_mito", "stack1.npz")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--data", default=DEFAULT)
    a = p.parse_args()
    d = np.load(a.data)
    vs = [float(v) for v in d["resolution_nm"]]
    for name, sl in (("vnc_train", slice(0, 13)), ("vnc_test", slice(13, 20))):
        path = os.path.join(a.out, f"{name}.zarr")
        attrs = {"voxel_size": vs, "source": "VNC stack1, Gerhard et al. 2013, CC BY-NC-SA 3.0"}
        io.create_array(path + "/raw", d["raw"][sl], chunks=(1, 512, 512), attrs=attrs, overwrite=True)
        io.create_array(path + "/labels", d["labels_2d"][sl], chunks=(1, 512, 512), attrs=attrs, overwrite=True)
        print("wrote", path)


if __name__ == "__main__":
    main()
