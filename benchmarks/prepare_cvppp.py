"""Write the CVPPP A1 leaf images (../shared/data/cvppp_a1) as zarr for training and
testing a multi-channel (RGB) model.

A seeded split of the 128 images: 103 for training, 25 for testing (the test images are
never trained on nor used to choose a setting); the training stack is in a seeded random
order, so that its last images, which validate, are a random draw like the test images.
Each zarr holds ``raw`` (3, N, 530, 500) uint8, the RGB channels first and the images as
sections, and ``labels`` (N, 530, 500) uint16 leaf ids (0 = background), unique over the
stack: in a label volume an id is one object wherever it occurs, so the images' own
numbering (1, 2, ... in every image) would make leaf k of all images one object: SPOCO@p
and the held-out objects would pick leaf numbers, not leaves. Images are photographs: no
voxel size.

Data: Minervini M, Fischbach A, Scharr H, Tsaftaris SA (2016) Pattern Recognition
Letters 81:80-89; Scharr H et al. (2014), FZJ-2014-03837. Research use under the CVPPP
organisers' terms; nothing of it is shipped with spoco-vol.

    python benchmarks/prepare_cvppp.py OUT_DIR [--data ../shared/data/cvppp_a1/a1.npz] [--seed 0]
"""
import argparse
import json
import os

import numpy as np

from spoco_vol import io

DEFAULT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cvppp_a1", "a1.npz")
N_TRAIN = 103


def split(n: int, seed: int) -> tuple[list, list]:
    """(training, test) image indices. The training images stay in the seeded random order:
    training validates on the last images of the stack (``--val-sections``), and in
    image-number order those would be the last plants, whose leaves are larger than the
    test images' (median 3020 px against 1975), which biases every setting chosen there,
    the size floor first."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:N_TRAIN].tolist(), sorted(order[N_TRAIN:].tolist())


def unique_over_images(labels: np.ndarray) -> np.ndarray:
    """(N, Y, X) per-image leaf ids -> ids unique over the stack (0 stays background),
    numbered consecutively from 1 in image order."""
    out = np.zeros(labels.shape, np.uint32)
    next_id = 0
    for z, image in enumerate(labels):
        ids, inverse = np.unique(image, return_inverse=True)
        new = np.arange(next_id, next_id + len(ids), dtype=np.uint32) + (0 if ids[0] == 0 else 1)
        new[ids == 0] = 0
        out[z] = new[inverse.reshape(image.shape)]
        next_id = int(out[z].max()) if out[z].max() else next_id
    return out


def write(path: str, raw: np.ndarray, labels: np.ndarray, names) -> None:
    """raw (N, 3, Y, X) -> (3, N, Y, X); one chunk per image and channel; leaf ids made
    unique over the stack."""
    attrs = {"source": "CVPPP 2017 LSC A1 (Minervini et al. 2016)", "images": list(map(str, names))}
    io.create_array(path + "/raw", np.ascontiguousarray(raw.transpose(1, 0, 2, 3)), chunks=(1, 1, *raw.shape[2:]),
                    attrs=attrs, overwrite=True)
    labels = unique_over_images(labels)
    if labels.max() >= 2 ** 16:
        raise ValueError(f"{labels.max()} leaves do not fit uint16 labels")
    io.create_array(path + "/labels", labels.astype(np.uint16), chunks=(1, *labels.shape[1:]), attrs=attrs,
                    overwrite=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--data", default=DEFAULT)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    d = np.load(a.data)
    train, test = split(len(d["raw"]), a.seed)
    for name, idx in (("cvppp_train", train), ("cvppp_test", test)):
        write(os.path.join(a.out, f"{name}.zarr"), d["raw"][idx], d["labels"][idx], d["names"][idx])
        print(f"wrote {name}.zarr: {len(idx)} images")
    with open(os.path.join(a.out, "split.json"), "w") as f:
        json.dump({"seed": a.seed, "train": train, "test": test}, f)


if __name__ == "__main__":
    main()
