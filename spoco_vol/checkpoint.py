"""Self-describing checkpoints: the one module that knows their layout.

A checkpoint file is a dict of tensors and plain Python values only, so that it loads
with ``torch.load(..., weights_only=True)``: no pickled classes, nothing executed on load.
It carries everything needed to *use* the weights (architecture, margins, input
normalisation, voxel size, inference settings, an optional foreground classifier), so
that ``spoco-vol segment`` never asks the user to repeat training-time choices.

``load(path)`` returns a ``Checkpoint``: typed accessors over that dict, with the
inference settings read once into an ``InferenceSettings``. Other modules use these and
never index the dict; code that writes checkpoints builds them with ``make_checkpoint``
and the ``with_*`` methods.

Layout (format_version 1): format, format_version, architecture (UNet kwargs),
embedding_dim, delta_v, delta_d, normalization {mean, std, kind, input_dtype,
input_range}, voxel_size (nm per model pixel, z y x), training_data, training_command,
inference {offsets, strides, background_embedding, background_radius, min_size
(min_size_base: the floor training derived before choosing min_size), tta, downsample,
...}, state_dict; optional: training {...}, training_state (latest.pt only), foreground
{architecture, state_dict, threshold, background_radius, ...}, calibration_command,
fine_tuned_from.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import os
from typing import Any, Sequence

import torch

from .affinities import default_offsets
from .errors import SpocoInputError
from .model import UNet, build_model, receptive_halo

FORMAT = "spoco-vol-checkpoint"
VERSION = 1
FOREGROUND_THRESHOLD = 0.5  # nnPU's decision boundary; the sigmoid outputs are nearly all near 0 or 1


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """How a checkpoint's embeddings become objects, as segmentation applies them."""
    offsets: tuple[tuple[int, ...], ...]      # affinity offsets, model pixels
    strides: tuple[int, ...]                  # mutex-edge strides of the watershed
    background_embedding: tuple[float, ...] | None
    background_radius: float | None           # with a classifier: the radius chosen with it
    min_size: int                             # objects below this (model pixels) are dropped
    tta: bool                                 # calibrated with test-time augmentation
    foreground_threshold: float               # the classifier's probability for "object"
    downsample: tuple[float, ...] | None      # input voxels per model pixel it was trained at

    @classmethod
    def new(cls, dims: int, *, offsets: Sequence[Sequence[int]] | None = None, min_size: int = 0,
            tta: bool = False, downsample: Sequence[float] | None = None) -> "InferenceSettings":
        """The settings of a model in training, before its background is calibrated."""
        return cls(offsets=tuple(tuple(int(x) for x in o) for o in (offsets or default_offsets(dims))),
                   strides=(2,) * dims, background_embedding=None, background_radius=None, min_size=int(min_size),
                   tta=bool(tta), foreground_threshold=FOREGROUND_THRESHOLD,
                   downsample=None if downsample is None else tuple(float(d) for d in downsample))

    def with_background(self, embedding: Sequence[float] | None, radius: float | None) -> "InferenceSettings":
        return dataclasses.replace(self, background_embedding=None if embedding is None else
                                   tuple(float(v) for v in embedding),
                                   background_radius=None if radius is None else float(radius))

    def background_rule(self) -> dict:
        """The rule's numbers, as the run fingerprint records them."""
        return {"background_embedding": list(self.background_embedding) if self.background_embedding else None,
                "background_radius": self.background_radius, "min_size": self.min_size}

    def uses_tta(self, override: bool | None = None) -> bool:
        """Predict with test-time augmentation: ``override`` if given, else as calibrated."""
        return self.tta if override is None else bool(override)


class Checkpoint:
    """A loaded checkpoint: typed, read-only accessors over its dict (``data``)."""

    def __init__(self, data: dict[str, Any], path: str | None = None):
        self.data = data
        self.path = path

    # ---------------------------------------------------------------- the network
    @property
    def architecture(self) -> dict:
        return dict(self.data["architecture"])

    @property
    def dims(self) -> int:
        return int(self.data["architecture"]["dims"])

    @property
    def in_channels(self) -> int:
        return int(self.data["architecture"].get("in_channels", 1))

    @property
    def embedding_dim(self) -> int:
        return int(self.data["architecture"].get("embedding_dim", self.data.get("embedding_dim", 16)))

    @property
    def features(self) -> list[int]:
        return list(self.data["architecture"]["features"])

    @functools.cached_property
    def _geometry(self) -> UNet:
        return build_model(self.data["architecture"])

    @property
    def receptive_halo(self) -> list[int]:
        """The U-Net's field of view, model pixels per side."""
        return receptive_halo(self._geometry)

    @property
    def shape_multiple(self) -> list[int]:
        return self._geometry.shape_multiple

    @property
    def state_dict(self) -> dict:
        """The embedding network's weights."""
        return self.data["state_dict"]

    def network(self) -> UNet:
        """The embedding U-Net with its weights, in eval mode."""
        try:
            net = build_model(self.data["architecture"])
        except (TypeError, ValueError) as exc:
            raise SpocoInputError(f"checkpoint architecture is invalid: {exc}") from None
        try:
            net.load_state_dict(self.data["state_dict"])
        except RuntimeError as exc:
            raise SpocoInputError(f"checkpoint weights do not fit its architecture: "
                                  f"{str(exc).splitlines()[0]}") from None
        return net.eval()

    # ---------------------------------------------------------------- margins, input
    @property
    def delta_v(self) -> float:
        return float(self.data["delta_v"])

    @property
    def delta_d(self) -> float:
        return float(self.data["delta_d"])

    @property
    def normalization(self) -> dict:
        """{mean, std, kind, input_dtype, input_range}: how inputs become network inputs."""
        return dict(self.data["normalization"])

    @property
    def voxel_size(self) -> list[float] | None:
        """nm per model pixel (z, y, x), or None if the training data had none."""
        vs = self.data.get("voxel_size")
        return None if vs is None else [float(v) for v in vs]

    # ---------------------------------------------------------------- inference
    @functools.cached_property
    def inference(self) -> InferenceSettings:
        """The inference settings as segmentation applies them (with a foreground
        classifier: the background radius chosen together with it)."""
        return self.settings(with_classifier=True)

    def settings(self, with_classifier: bool = True) -> InferenceSettings:
        """``with_classifier=False``: the embeddings' own background radius, as
        calibrated without the classifier (what the classifier's radius is chosen below)."""
        inf = self.data.get("inference") or {}
        fg = self.data.get("foreground") or {}
        radius = inf.get("background_radius")
        if with_classifier and fg.get("background_radius") is not None:
            radius = fg["background_radius"]
        dims = self.dims
        bg = inf.get("background_embedding")
        ds = inf.get("downsample")
        return InferenceSettings(
            offsets=tuple(tuple(int(x) for x in o) for o in (inf.get("offsets") or default_offsets(dims))),
            strides=tuple(int(s) for s in (inf.get("strides") or [2] * dims)),
            background_embedding=None if bg is None else tuple(float(v) for v in bg),
            background_radius=None if radius is None else float(radius), min_size=int(inf.get("min_size", 0)),
            tta=bool(inf.get("tta", False)), foreground_threshold=float(fg.get("threshold", FOREGROUND_THRESHOLD)),
            downsample=None if ds is None else tuple(float(d) for d in ds))

    @property
    def inference_record(self) -> dict:
        """The stored inference settings as they are (for display and calibration records)."""
        return copy.deepcopy(dict(self.data.get("inference") or {}))

    # ---------------------------------------------------------------- the classifier
    @property
    def has_foreground(self) -> bool:
        return bool(self.data.get("foreground"))

    @property
    def foreground_record(self) -> dict | None:
        """The classifier's entry without its weights (display), or None."""
        fg = self.data.get("foreground")
        return None if not fg else {k: v for k, v in fg.items() if k != "state_dict"}

    def foreground_network(self) -> UNet | None:
        """The foreground U-Net (eval mode), or None without one."""
        fg = self.data.get("foreground")
        if not fg:
            return None
        try:
            net = build_model(fg["architecture"])
            net.load_state_dict(fg["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SpocoInputError(f"the checkpoint's foreground classifier is invalid: {first}") from None
        arch = self.data["architecture"]
        # The same depth and pooling as the embedding model: its halo (blockwise) covers both.
        if net.embedding_dim != 1 or net.dims != arch["dims"] or list(net.config["features"]) != \
                list(arch["features"]) or net.config["pool_factors"] != [list(p) for p in arch["pool_factors"]]:
            raise SpocoInputError("the checkpoint's foreground classifier does not fit its embedding model "
                                  "(it needs one output channel and the model's features and pooling)")
        return net.eval()

    # ---------------------------------------------------------------- the momentum network
    @property
    def momentum_state(self) -> dict | None:
        """The momentum network g's weights (the consistency term's teacher), kept for
        consistency clustering: a ``momentum`` entry, or latest.pt's training state."""
        entry = self.data.get("momentum") or {}
        state = entry.get("state_dict") or (self.data.get("training_state") or {}).get("momentum_state")
        return state or None

    def momentum_network(self) -> UNet | None:
        """g with the embedding network's architecture (eval mode), or None."""
        state = self.momentum_state
        if state is None:
            return None
        net = build_model(self.data["architecture"])
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise SpocoInputError(f"the checkpoint's momentum network does not fit its architecture: "
                                  f"{str(exc).splitlines()[0]}") from None
        return net.eval()

    @functools.cached_property
    def momentum_sha256(self) -> str | None:
        state = self.momentum_state
        if state is None:
            return None
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()

    # ---------------------------------------------------------------- provenance
    @property
    def training(self) -> dict:
        """What training recorded (patch shape, mode, validation, fine_tuned_from, ...)."""
        return copy.deepcopy(dict(self.data.get("training") or {}))

    @property
    def training_data(self) -> str | None:
        return self.data.get("training_data")

    @property
    def training_command(self) -> str | None:
        return self.data.get("training_command")

    @property
    def training_state(self) -> dict | None:
        """latest.pt's full state for --resume, or None."""
        return self.data.get("training_state")

    def summary(self) -> dict:
        """Everything but weights and training state, for ``spoco-vol info``."""
        shown = {k: v for k, v in self.data.items() if k not in ("state_dict", "training_state", "foreground")}
        if self.has_foreground:
            shown["foreground"] = self.foreground_record
        shown["sha256"] = self.sha256
        return shown

    @functools.cached_property
    def sha256(self) -> str:
        """SHA-256 of the weights (and of a foreground classifier's): identifies the model
        in output metadata and run hashes."""
        h = hashlib.sha256()
        # A foreground classifier changes the labels too (a model without one hashes as before).
        fg = self.data.get("foreground") or {}
        for prefix, state in (("", self.data["state_dict"]), ("foreground.", fg.get("state_dict", {}))):
            for k in sorted(state):
                t = state[k].detach().cpu().contiguous()
                h.update((prefix + k).encode())
                h.update(t.float().numpy().tobytes() if t.is_floating_point() else t.numpy().tobytes())
        if fg:
            h.update(f"foreground.threshold={fg.get('threshold')}".encode())
        return h.hexdigest()

    # ---------------------------------------------------------------- changed copies
    def _with(self, **changes) -> "Checkpoint":
        data = dict(self.data)
        data.update(changes)
        return Checkpoint(data, self.path)

    def with_inference(self, **settings) -> "Checkpoint":
        """A copy whose inference settings are updated with ``settings``."""
        return self._with(inference={**(self.data.get("inference") or {}), **settings})

    def with_foreground(self, entry: dict | None) -> "Checkpoint":
        """A copy with this foreground classifier entry (None: without one)."""
        data = dict(self.data)
        data.pop("foreground", None)
        if entry:
            data["foreground"] = entry
        return Checkpoint(data, self.path)

    def with_foreground_radius(self, radius: float) -> "Checkpoint":
        return self.with_foreground({**self.data["foreground"], "background_radius": float(radius)})

    def with_record(self, **fields) -> "Checkpoint":
        """A copy with top-level provenance fields set (training_data, calibration_command, ...)."""
        return self._with(**fields)

    def with_segment_overrides(self, overrides) -> "Checkpoint":
        """The checkpoint as a segmentation run with these overrides (a dict or its items)
        applies it: ``min_size`` replaces the size floor (model voxels);
        ``mask_is_foreground`` drops the model's own background rules (the classifier and
        the embeddings' background radius), so that the run's mask alone decides the
        background; ``no_foreground_classifier`` drops the classifier only, so that the
        embeddings' own background rule (calibrated without it) decides."""
        overrides = dict(overrides)
        unknown = set(overrides) - {"min_size", "mask_is_foreground", "no_foreground_classifier"}
        if unknown:
            raise ValueError(f"unknown segmentation overrides {sorted(unknown)}")
        out = self
        if overrides.get("no_foreground_classifier"):
            out = out.with_foreground(None)
        if overrides.get("mask_is_foreground"):
            out = out.with_foreground(None).with_inference(background_embedding=None, background_radius=None)
        if overrides.get("min_size") is not None:
            out = out.with_inference(min_size=int(overrides["min_size"]))
        return out

    def for_inference(self) -> "Checkpoint":
        """A copy without the optimizer and momentum state (what gets shipped)."""
        data = dict(self.data)
        data.pop("training_state", None)
        return Checkpoint(data, self.path)


def make_checkpoint(model: UNet, *, delta_v: float, delta_d: float, normalization: dict,
                    voxel_size: Sequence[float] | None, training_data: str,
                    training_command: str, inference: dict | None = None, training: dict | None = None,
                    training_state: dict | None = None, momentum: UNet | None = None) -> Checkpoint:
    """Everything needed to use ``model`` later, as plain data; ``inference``: the
    stored inference settings, ``training``: what training records, ``training_state``:
    latest.pt's full state for --resume, ``momentum``: the momentum network g (for
    consistency clustering)."""
    data = {
        "format": FORMAT,
        "format_version": VERSION,
        "architecture": dict(model.config),
        "embedding_dim": model.embedding_dim,
        "delta_v": float(delta_v),
        "delta_d": float(delta_d),
        "normalization": dict(normalization),
        "voxel_size": None if voxel_size is None else [float(v) for v in voxel_size],
        "training_data": str(training_data),
        "training_command": str(training_command),
        "inference": dict(inference or {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    if training is not None:
        data["training"] = dict(training)
    if training_state is not None:
        data["training_state"] = training_state
    if momentum is not None:
        data["momentum"] = {"state_dict": {k: v.detach().cpu().clone() for k, v in momentum.state_dict().items()}}
    return Checkpoint(data)


def foreground_entry(net: UNet, **fields) -> dict:
    """A foreground classifier's checkpoint entry: its architecture and weights plus
    ``fields`` (threshold, background_radius, training record)."""
    return {"architecture": dict(net.config),
            "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
            "threshold": FOREGROUND_THRESHOLD, **fields}


def save(ckpt: Checkpoint, path: str | os.PathLike) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    torch.save(ckpt.data, tmp)
    os.replace(tmp, path)


def load(path: str | os.PathLike) -> Checkpoint:
    """Load and validate a spoco-vol checkpoint (weights_only: no arbitrary unpickling)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SpocoInputError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign/corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpocoInputError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SpocoInputError(f"{path} is not a spoco-vol checkpoint (no '{FORMAT}' header)")
    if data.get("format_version", 0) > VERSION:
        raise SpocoInputError(f"{path} was written by a newer spoco-vol (format {data['format_version']})")
    for key in ("architecture", "state_dict", "delta_v", "delta_d", "normalization"):
        if key not in data:
            raise SpocoInputError(f"checkpoint {path} lacks '{key}'")
    return Checkpoint(data, path)
