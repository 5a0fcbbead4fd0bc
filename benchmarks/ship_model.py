"""Copy a trained checkpoint into the package as a bundled model.

Keeps only what inference needs (no optimizer or momentum state) and names the data.

    python benchmarks/ship_model.py RUN_DIR/best.pt spoco_vol/data/vnc_mito_2d.pt [--data TEXT] [--calibration CMD]
"""
import argparse

from spoco_vol.model import checkpoint_checksum, load_checkpoint, save_checkpoint

VNC = ("Drosophila L3 VNC ssTEM stack1, sections 0-11 (section 12 validation), mitochondria, Gerhard et al. 2013, "
       "doi:10.6084/m9.figshare.856713, CC BY-NC-SA 3.0")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--data", default=VNC, help="what it was trained on, with source and licence")
    p.add_argument("--calibration", default=None, help="the calibration command, if it was recalibrated")
    a = p.parse_args()
    ck = load_checkpoint(a.src)
    ck.pop("training_state", None)
    ck["training_data"] = a.data
    ck["training_command"] = " ".join(ck["training_command"].split())
    if a.calibration:
        ck["calibration_command"] = a.calibration
    save_checkpoint(ck, a.dst)
    print(a.dst, checkpoint_checksum(ck))


if __name__ == "__main__":
    main()
