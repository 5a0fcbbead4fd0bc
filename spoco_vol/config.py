"""The settings of a training run: one name per setting, the same as the CLI option
(``--consistency-weight`` is ``consistency_weight``), as a workflow step's key and as the
Python API's argument. Defaults and validation live here, not in the command line.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from . import bundled
from .errors import SpocoInputError


@dataclasses.dataclass
class TrainConfig:
    raw: Sequence[str]
    labels: Sequence[str]
    out: str
    dims: int | None = None                # [default: --init's, else 2]
    patch_shape: Sequence[int] | None = None  # model pixels [default: --init's training patch, else 256,256 for
                                              # a 2D model; a 3D one from scratch needs it given]
    loss_margin: Sequence[int] | int | None = None  # model pixels per patch side that the loss leaves out
                                                    # (see margins()) [default: --init's, else 0]
    batch_size: int = 4
    iterations: int = 1000
    object_fraction: float = 1.0
    mode: str = "auto"                     # "sparse", "full", or auto: full iff fraction == 1
    init: str | None = None
    lr: float | None = None                # default: learning_rate below
    weight_decay: float = 1e-5
    schedule: str = "cosine"               # or "plateau"
    features: Sequence[int] = (16, 32, 64, 128)
    norm: str = "batch"                    # eval-mode BatchNorm is local: blocks agree exactly
    pool_factors: Sequence[Sequence[int]] | Sequence[int] | None = None  # per level, or flattened
    embedding_dim: int = 16
    delta_v: float = 0.5
    delta_d: float = 2.0
    threshold: float = 0.9
    loss: str = "spoco"                    # or "discriminative": pull + push + regulariser only (the baseline)
    consistency_weight: float = 1.0
    consistency_network: str = "momentum"  # g: momentum, shared, dropout or separate (losses.ConsistencyTeacher)
    dropout: float | None = None           # channel dropout of f [default: 0.1 for the dropout g, else 0]
    unlabeled_weight: float = 1.0
    instance_weight: float = 1.0
    background_weight: float = 0.0         # pseudo-background term (sparse mode; needs g)
    no_background: bool = False            # dense tissue: every voxel belongs to an object, so label 0 is
                                           # unlabeled only and inference has no background rule
    adversarial_weight: float = 0.0        # beta of the adversarial instance term (spoco_vol.adversarial); 0: off
    background_warmup: int = 0             # iterations before it starts (g must mean something)
    background_select_radius: float | None = None  # pseudo-background: g within this of its mode (default delta_d)
    momentum: float = 0.999
    momentum_ramp: bool = False            # g starts as the running mean of f's iterates (mean-teacher ramp)
    offset_distances: Sequence[int] | None = None  # long-range affinity offsets [default: 3, 9, 27 per axis]
    downsample: Sequence[float] | None = None  # input voxels per model pixel, (z, y, x) [default: to --init's
                                               # voxel size when fine-tuning, else 1, 1, 1]
    voxel_size: Sequence[float] | None = None
    val_raw: Sequence[str] = ()
    val_labels: Sequence[str] = ()
    val_sections: int | None = None        # without val volumes: hold out the last N sections [default, full
                                           # labels: 1 (2D), one patch deep (3D); sparse: objects held out]
    val_objects: float = 0.2               # sparse labels, no validation data: share of the annotated
                                           # objects held out to choose the checkpoint and calibrate
    val_every: int = 250
    val_patches: int = 8
    elastic: bool = False
    intensity_jitter: float = 0.1          # per patch: contrast x (1 +- J), brightness +- J (normalised units)
    colour_jitter: float = 0.0             # > 0: each network's own colour jitter (factors 1 +- S), greying
                                           # and blur, as the reference trains on CVPPP (transforms.augment_colour)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    tta: bool = False                      # validation/calibration (and later inference) with test-time flips
    foreground_iterations: int = 0         # then a foreground classifier (spoco_vol.foreground): positive-
                                           # unlabeled with sparse labels, supervised with full ones
    foreground_prior: float | None = None  # object share of the unlabeled pixels [default: from object_fraction]
    intensity_range: Sequence[float] | None = None  # raw values mapped to the model's range [default: by
                                                     # dtype, spoco_vol.intensity]
    threads: int | None = None
    resume: bool = False
    stop_after: int | None = None          # stop (resumably) after N iterations of this run
    overwrite: bool = False
    progress: bool = True
    command: str = ""

    def __post_init__(self):
        # A fine-tuned model keeps its start model's dimensionality, training patch and loss
        # margin, so that `train --init` of a 3D model needs neither --dims 3 nor --patch-shape.
        if self.dims is None or self.patch_shape is None or self.loss_margin is None:
            start = start_model_training(self.init)
            if self.dims is None:
                self.dims = int(start.get("dims", 2))
            if self.patch_shape is None:  # a 3D model from scratch stays None: check() asks for it
                self.patch_shape = start.get("patch_shape") or ([256, 256] if self.dims == 2 else None)
            if self.loss_margin is None:
                self.loss_margin = start.get("loss_margin", 0)

    @property
    def training_mode(self) -> str:
        """sparse (label 0 = unlabeled) or full (label 0 = background, an object)."""
        if self.mode != "auto":
            return self.mode
        return "full" if self.object_fraction >= 1 and not self.no_background else "sparse"

    @property
    def loss_weights(self) -> dict:
        """The SPOCO loss's term weights; the discriminative-loss baseline (De Brabandere
        et al. 2017) keeps pull, push and the regulariser only."""
        w = dict(instance_weight=self.instance_weight, unlabeled_weight=self.unlabeled_weight,
                 consistency_weight=self.consistency_weight, background_weight=self.background_weight)
        return dict.fromkeys(w, 0.0) if self.loss == "discriminative" else w

    @property
    def uses_teacher(self) -> bool:
        """Whether a consistency network g is needed (the consistency or pseudo-background term)."""
        w = self.loss_weights
        return w["consistency_weight"] > 0 or w["background_weight"] > 0

    @property
    def network_dropout(self) -> float:
        if self.dropout is not None:
            return float(self.dropout)
        return 0.1 if self.consistency_network == "dropout" and self.uses_teacher else 0.0

    @property
    def learning_rate(self) -> float:
        """--lr, else 1e-3 from scratch with full labels (VNC, CVPPP and the 3D nuclei each chose it
        over 2e-4 on their validation data: the embeddings were under-trained at CPU budgets),
        2e-4 with sparse ones (the recipe measured on VNC; CVPPP's held-out leaves preferred neither
        at full resolution, 1e-3 at half), 2e-5 fine-tuning from init (where the transfer table was
        measured). benchmarks/RESULTS.md, CVPPP."""
        if self.lr is not None:
            return self.lr
        if self.init:
            return 2e-5
        return 1e-3 if self.training_mode == "full" else 2e-4

    def pools(self) -> list[list[int]]:
        """Pooling factors per level (default: 2 along every axis)."""
        n = len(self.features) - 1
        if self.pool_factors is None:
            return [[2] * self.dims for _ in range(n)]
        flat = list(self.pool_factors)
        if flat and not isinstance(flat[0], (list, tuple)):  # flattened, as the command line gives them
            if len(flat) != n * self.dims:
                raise SpocoInputError(f"--pool-factors needs {n}x{self.dims} = {n * self.dims} numbers for "
                                      f"{len(self.features)} levels")
            return [[int(f) for f in flat[i * self.dims:(i + 1) * self.dims]] for i in range(n)]
        return [[int(f) for f in p] for p in flat]

    def _check_numbers(self) -> None:
        """Types and ranges of the plain numbers: a recipe's values skip the command line's
        parsing (YAML reads 1e3 as a string, 2.5 stays a float), and NaN passes every
        comparison, so each would otherwise fail deep inside training with a traceback."""
        def whole(name, value, least):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise SpocoInputError(f"--{name} must be a whole number >= {least}, got {value!r}")

        def number(name, value, low=0.0, high=None, low_open=False):
            finite = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value)
            if not finite or value < low or (high is not None and value > high) or (low_open and value == low):
                bounds = f"in [{low:g}, {high:g}]" if high is not None else f"{'above' if low_open else '>='} {low:g}"
                raise SpocoInputError(f"--{name} must be a finite number {bounds}, got {value!r}")
        for name in ("iterations", "batch_size", "val_every", "val_patches"):
            whole(name.replace("_", "-"), getattr(self, name), 1)
        for name in ("seed", "background_warmup", "foreground_iterations"):
            whole(name.replace("_", "-"), getattr(self, name), 0)
        for name in ("consistency_weight", "unlabeled_weight", "instance_weight", "background_weight",
                     "adversarial_weight", "weight_decay"):
            number(name.replace("_", "-"), getattr(self, name))
        for name in ("delta_v", "delta_d"):
            number(name.replace("_", "-"), getattr(self, name), low_open=True)
        number("momentum", self.momentum, high=1.0)
        if self.lr is not None:
            number("lr", self.lr, low_open=True)
        if self.background_select_radius is not None:
            number("background-select-radius", self.background_select_radius, low_open=True)
        if self.patch_shape is not None:
            for side in self.patch_shape:
                whole("patch-shape", side, 1)
        if self.pool_factors is not None:
            for factor in np.ravel(np.asarray(self.pool_factors, dtype=object)):
                whole("pool-factors", factor, 1)

    def margins(self) -> list[int]:
        """The loss margin per axis. The U-Net zero-pads at the patch border, so the
        embeddings of pixels within its field of view of that border differ from what
        inference gives them (it predicts with real context, spoco_vol.inference); in 3D
        patches, which are small beside the field of view, the network learns from these
        border embeddings only unless a margin leaves them out of the loss."""
        m = [self.loss_margin] if isinstance(self.loss_margin, (int, np.integer)) else list(self.loss_margin)
        if len(m) == 1:
            m = m * self.dims
        return [int(v) for v in m]

    def check(self) -> "TrainConfig":
        """Numbers that would fail deep inside training fail here, before --out is touched."""
        self._check_numbers()
        if self.dims not in (2, 3):
            raise SpocoInputError("--dims must be 2 or 3")
        if self.mode not in ("auto", "sparse", "full"):
            raise SpocoInputError(f"--mode must be auto, sparse or full, got {self.mode!r}")
        if self.schedule not in ("cosine", "plateau"):
            raise SpocoInputError("--schedule must be 'cosine' or 'plateau'")
        if self.norm not in ("batch", "group"):
            raise SpocoInputError("--norm must be 'batch' or 'group'")
        if self.loss not in ("spoco", "discriminative"):
            raise SpocoInputError(f"--loss must be spoco or discriminative, got {self.loss!r}")
        if self.consistency_network not in ("momentum", "shared", "dropout", "separate"):
            raise SpocoInputError("--consistency-network must be momentum, shared, dropout or separate, "
                                  f"got {self.consistency_network!r}")
        if self.momentum_ramp and self.consistency_network != "momentum":
            raise SpocoInputError("--momentum-ramp ramps the momentum network's m: it needs --consistency-network "
                                  f"momentum, got {self.consistency_network}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise SpocoInputError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.intensity_jitter < 1:
            raise SpocoInputError(f"--intensity-jitter must be in [0, 1), got {self.intensity_jitter}")
        if not 0 <= self.colour_jitter < 1:
            raise SpocoInputError(f"--colour-jitter must be in [0, 1), got {self.colour_jitter}")
        if self.consistency_network == "dropout" and self.dropout == 0 and self.uses_teacher:
            raise SpocoInputError("--consistency-network dropout needs --dropout above 0")
        if self.patch_shape is None:
            raise SpocoInputError("a 3D model trained from scratch needs --patch-shape Z,Y,X (e.g. 32,128,128)")
        if len(self.patch_shape) != self.dims:
            raise SpocoInputError(f"--patch-shape needs {self.dims} numbers for a {self.dims}D model")
        margins = self.margins()
        if len(margins) != self.dims or min(margins) < 0:
            raise SpocoInputError(f"--loss-margin takes one number, or {self.dims} (one per axis), all >= 0")
        if any(p - 2 * m < 1 for p, m in zip(self.patch_shape, margins)):
            raise SpocoInputError(f"--loss-margin {','.join(map(str, margins))} leaves nothing of the patch "
                                  f"{','.join(map(str, self.patch_shape))} to train on: each margin must be below "
                                  "half the patch side")
        if not 0 < self.object_fraction <= 1:
            raise SpocoInputError(f"--object-fraction must be in (0, 1], got {self.object_fraction}")
        if not 0 <= self.val_objects < 1:
            raise SpocoInputError(f"--val-objects must be in [0, 1), got {self.val_objects}")
        if not 0 < self.threshold < 1:
            raise SpocoInputError(f"--threshold must be in (0, 1), got {self.threshold}")
        if self.embedding_dim < 1 or not self.features or min(self.features) < 1:
            raise SpocoInputError("--embedding-dim and --features must be positive")
        self.pools()
        if self.downsample is not None and (len(self.downsample) != 3 or not all(
                np.isfinite(d) and d > 0 for d in self.downsample)):
            raise SpocoInputError("--downsample takes three positive factors (z y x)")
        if self.dims == 2 and self.downsample is not None and self.downsample[0] != 1:
            raise SpocoInputError("a 2D model is trained on single sections: the z factor of --downsample must be 1")
        if self.voxel_size is not None and not all(np.isfinite(v) and v > 0 for v in self.voxel_size):
            raise SpocoInputError(f"--voxel-size must be positive, got {list(self.voxel_size)}")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise SpocoInputError(f"--out {self.out} exists and is not a directory")
        if self.offset_distances is not None and (not len(self.offset_distances) or min(self.offset_distances) < 2):
            raise SpocoInputError("--offset-distances takes long-range distances >= 2 (direct neighbours are always "
                                  "used)")
        if self.no_background:
            # Every term and step below models a background that this tissue does not have.
            if self.training_mode == "full":
                raise SpocoInputError("--no-background: with --mode full label 0 is background; use --mode sparse "
                                      "(label 0 = unlabeled), or no flag if your labels have no 0")
            if self.background_weight > 0:
                raise SpocoInputError("--no-background leaves no background for the pseudo-background term: "
                                      "drop --background-weight")
            if self.foreground_iterations:
                raise SpocoInputError("--no-background leaves no background for a foreground classifier: "
                                      "drop --foreground-iterations")
        if self.foreground_iterations:
            if self.foreground_prior is not None and self.training_mode != "sparse":
                raise SpocoInputError("--foreground-prior is for sparse labels: with full labels the background "
                                      "is annotated")
            if self.foreground_prior is not None and not 0 <= self.foreground_prior < 1:
                raise SpocoInputError(f"--foreground-prior must be in [0, 1), got {self.foreground_prior}")
        return self


#: "I annotated a few objects of my volume": fine-tuning a bundled (or any) model on
#: sparse annotations (label 0 = unlabeled), the recipe measured in benchmarks/RESULTS.md
#: ("Transfer to Lucchi"): pseudo-background, TTA, a foreground classifier, held-out objects.
#: Its keys are TrainConfig fields.
FOREGROUND_ITERATIONS = 600  # the foreground classifier's (`train-foreground`, the recipe's)
FINE_TUNE_RECIPE = dict(mode="sparse", iterations=500, background_weight=1.0, background_warmup=100,
                        background_select_radius=3.0, tta=True, foreground_iterations=FOREGROUND_ITERATIONS)
#: `fine-tune --dense`, "I annotated every object of my volume" (label 0 = background): full
#: labels, held-out sections, a foreground classifier trained supervised on the annotated
#: background. On the 3D nuclei it scored above the sparse recipe on the same annotations
#: (benchmarks/RESULTS.md, 3D): where a model fails on a new specimen's background, the
#: specimen's own annotated background is what teaches it.
FINE_TUNE_DENSE_RECIPE = dict(mode="full", iterations=500, foreground_iterations=FOREGROUND_ITERATIONS)


def start_model_training(init: str | None) -> dict:
    """What a start model (--init: a path or a bundled model's name) says of its training:
    {"dims", "patch_shape", "loss_margin"}; {} without one."""
    if init is None:
        return {}
    from . import checkpoint
    ckpt = checkpoint.load(bundled.model_path(init))
    return {"dims": ckpt.dims, "patch_shape": list(ckpt.training.get("patch_shape") or [256] * ckpt.dims),
            "loss_margin": ckpt.training.get("loss_margin", 0)}


def fine_tune_config(raw: Sequence[str], labels: Sequence[str], out: str, model: str = bundled.DEFAULT,
                     dense: bool = False, **overrides) -> TrainConfig:
    """The TrainConfig of `spoco-vol fine-tune`: FINE_TUNE_RECIPE (``dense``:
    FINE_TUNE_DENSE_RECIPE) from ``model`` (a bundled model's name or a path), its
    dimensionality and patch shape; ``overrides`` replace any TrainConfig field."""
    start = start_model_training(model)
    recipe = dict(FINE_TUNE_DENSE_RECIPE if dense else FINE_TUNE_RECIPE)
    if overrides.get("no_background"):  # the recipe's background steps have nothing to model
        if dense:
            raise SpocoInputError("--dense says label 0 is background, --no-background that there is none: "
                                  "give one of them")
        recipe.update(background_weight=0.0, background_warmup=0, foreground_iterations=0)
    settings = {**start, "init": model, **recipe, **overrides}
    return TrainConfig(raw=list(raw), labels=list(labels), out=out, **settings)
