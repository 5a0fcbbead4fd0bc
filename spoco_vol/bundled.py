"""The models shipped with spoco-vol, chosen by name wherever a checkpoint is asked for
(``--model vnc-mito-2d``, ``--init vnc-mito-2d``) or by path. Each has a model card in
spoco_vol/data; ``spoco-vol models`` lists them."""
from __future__ import annotations

import os

from .errors import SpocoInputError

DATA = os.path.join(os.path.dirname(__file__), "data")

#: name -> file in spoco_vol/data, what it segments, its card and its held-out scores
MODELS = {
    "vnc-mito-2d": {
        "file": "vnc_mito_2d.pt",
        "modality": "EM (ssTEM, FIB-SEM after fine-tuning), mitochondria, 2D sections",
        "card": "MODEL_CARD.md",
        "held_out": "AP@0.5 0.824 on VNC sections 13-19 (2D objects)",
    },
    "lm-nuclei-3d": {
        "file": "lm_nuclei_3d.pt",
        "modality": "3D light microscopy (confocal, nuclear stain), nuclei",
        "card": "MODEL_CARD_lm_nuclei_3d.md",
        "held_out": "3D AP@0.5 0.291 on PlantSeg nuclei crop 1136 (not trained on); 0.794 given its true "
                    "foreground (--mask FG --mask-is-foreground)",
    },
}
DEFAULT = "vnc-mito-2d"


def model_path(name_or_path: str | None) -> str:
    """The checkpoint file of a bundled model's name (``bundled`` or None: the
    default model), or the path as given."""
    if name_or_path is None or name_or_path == "bundled":
        name_or_path = DEFAULT
    if name_or_path in MODELS:
        return os.path.join(DATA, MODELS[name_or_path]["file"])
    if not os.path.exists(name_or_path) and os.sep not in name_or_path and not name_or_path.endswith(".pt"):
        raise SpocoInputError(f"no bundled model named {name_or_path!r} (bundled: {', '.join(MODELS)}) "
                              "and no such file")
    return name_or_path


def list_models() -> list[dict]:
    """One row per bundled model: name, file, voxel size, dimensionality, modality,
    held-out scores, card."""
    from . import checkpoint
    rows = []
    for name, entry in MODELS.items():
        path = os.path.join(DATA, entry["file"])
        ck = checkpoint.load(path)
        rows.append({"name": name, "path": path, "dims": ck.dims,
                     "voxel_size_nm": ck.voxel_size, "modality": entry["modality"],
                     "held_out": entry["held_out"], "card": os.path.join(DATA, entry["card"])})
    return rows
