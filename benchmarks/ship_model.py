"""Copy a trained checkpoint into the package as a bundled model.

Keeps only what inference needs (no optimizer or momentum state) and names the data.

    python benchmarks/ship_model.py RUN_DIR/best.pt spoco_vol/data/vnc_mito_2d.pt [--data TEXT] [--calibration CMD]
"""
import argparse

from spoco_vol import checkpoint

VNC = ("Drosophila L3 VNC ssTEM stack1, sections 0-11 (section 12 validation), mitochondria, Gerhard et al. 2013, "
       "doi:10.6084/m9.figshare.856713, CC BY-NC-SA 3.0")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--data", default=VNC, help="what it was trained on, with source and licence")
    p.add_argument("--calibration", default=None, help="the calibration command, if it was recalibrated")
    a = p.parse_args()
    ck = checkpoint.load(a.src).for_inference()
    ck = ck.with_record(training_data=a.data, training_command=" ".join(ck.training_command.split()),
                        **({"calibration_command": a.calibration} if a.calibration else {}))
    checkpoint.save(ck, a.dst)
    print(a.dst, ck.sha256)


if __name__ == "__main__":
    main()
