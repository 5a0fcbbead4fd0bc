"""Copy a trained checkpoint into the package as the bundled default model.

Keeps only what inference needs (no optimizer or momentum state) and names the data.

    python benchmarks/ship_model.py RUN_DIR/best.pt spoco_vol/data/vnc_mito_2d.pt ["CALIBRATION COMMAND"]
"""
import sys

from spoco_vol.model import checkpoint_checksum, load_checkpoint, save_checkpoint


def main():
    src, dst = sys.argv[1], sys.argv[2]
    ck = load_checkpoint(src)
    ck.pop("training_state", None)
    ck["training_data"] = ("Drosophila L3 VNC ssTEM stack1, sections 0-11 (section 12 validation), "
                           "mitochondria, Gerhard et al. 2013, doi:10.6084/m9.figshare.856713, CC BY-NC-SA 3.0")
    ck["training_command"] = " ".join(ck["training_command"].split())
    if len(sys.argv) > 3:
        ck["calibration_command"] = sys.argv[3]
    save_checkpoint(ck, dst)
    print(dst, checkpoint_checksum(ck))


if __name__ == "__main__":
    main()
