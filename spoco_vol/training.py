"""SPOCO training from sparse (or full) object annotations in zarr volumes.

``train(config)`` validates every input before it writes anything, then runs Adam on
random patches with the SPOCO loss, a momentum copy g of the network for the
consistency term, periodic validation, and best/latest checkpoints. ``latest.pt`` holds
the complete training state (optimizer, scheduler, g, iteration, every RNG), so
``resume=True`` continues a stopped run exactly where it stopped.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Sequence

import numpy as np
import torch

from . import bundled, data, intensity, io, losses, model as model_mod, transforms, validation
from .errors import SpocoInputError, warn
from .inference import resolve_device, autocast_context, autocast_dtype
from .affinities import default_offsets
from .validation import choose_radius

LOG_TERMS = ("total", "pull", "push", "reg", "instance", "unlabeled", "consistency", "background")


@dataclasses.dataclass
class TrainConfig:
    raw: Sequence[str]
    labels: Sequence[str]
    out: str
    dims: int = 2
    patch_shape: Sequence[int] = (256, 256)
    batch_size: int = 4
    iterations: int = 1000
    object_fraction: float = 1.0
    mode: str = "auto"                     # "sparse", "full", or auto: full iff fraction == 1
    init: str | None = None
    lr: float | None = None                # default 2e-4, or 2e-5 when fine-tuning from init
    weight_decay: float = 1e-5
    schedule: str = "cosine"               # or "plateau"
    features: Sequence[int] = (16, 32, 64, 128)
    norm: str = "batch"                   # eval-mode BatchNorm is local: blocks agree exactly
    pool_factors: Sequence[Sequence[int]] | None = None
    embedding_dim: int = 16
    delta_v: float = 0.5
    delta_d: float = 2.0
    threshold: float = 0.9
    w_consistency: float = 1.0
    w_unlabeled: float = 1.0
    w_instance: float = 1.0
    w_background: float = 0.0              # pseudo-background term (sparse mode; needs g)
    background_warmup: int = 0             # iterations before it starts (g must mean something)
    background_select_radius: float | None = None  # pseudo-background: g within this of its mode (default delta_d)
    momentum: float = 0.999
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
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    tta: bool = False                      # validation/calibration (and later inference) with test-time flips
    foreground_iterations: int = 0         # then a foreground classifier (spoco_vol.foreground), sparse mode
    foreground_prior: float | None = None  # object share of the unlabeled pixels [default: from object_fraction]
    intensity_range: Sequence[float] | None = None  # raw values mapped to the model's range [default: by
                                                     # dtype, spoco_vol.intensity]
    threads: int | None = None
    resume: bool = False
    stop_after: int | None = None          # stop (resumably) after N iterations of this run
    overwrite: bool = False
    progress: bool = True
    command: str = ""


#: "I annotated a few objects of my volume": fine-tuning a bundled (or any) model on
#: sparse annotations (label 0 = unlabeled), the recipe measured in benchmarks/RESULTS.md
#: ("Transfer to Lucchi"): pseudo-background, TTA, a foreground classifier, held-out objects.
FINE_TUNE_RECIPE = dict(mode="sparse", iterations=500, w_background=1.0, background_warmup=100,
                        background_select_radius=3.0, tta=True, foreground_iterations=600)


def fine_tune_config(raw: Sequence[str], labels: Sequence[str], out: str, model: str = "vnc-mito-2d",
                     **overrides) -> TrainConfig:
    """The TrainConfig of `spoco-vol fine-tune`: FINE_TUNE_RECIPE from ``model`` (a
    bundled model's name or a path), its dimensionality and patch shape; ``overrides``
    replace any TrainConfig field."""
    ckpt = model_mod.load_checkpoint(bundled.model_path(model))
    dims = ckpt["architecture"]["dims"]
    patch = ckpt.get("training", {}).get("patch_shape") or [256] * dims
    settings = {"dims": dims, "patch_shape": list(patch), "init": model, **FINE_TUNE_RECIPE, **overrides}
    return TrainConfig(raw=list(raw), labels=list(labels), out=out, **settings)


# ----------------------------------------------------------------------------- set-up

def training_mode(cfg: TrainConfig) -> str:
    """sparse (label 0 = unlabeled) or full (label 0 = background, an object)."""
    return cfg.mode if cfg.mode != "auto" else ("full" if cfg.object_fraction >= 1 else "sparse")


@dataclasses.dataclass
class HeldOutObject:
    """An annotated object held out from training, scored in a window around it."""
    volume: data.TrainingVolume
    id: int
    bbox_lo: np.ndarray
    bbox_hi: np.ndarray
    anchor: np.ndarray       # one of its voxels (z, y, x): the section a 2D model sees it in
    annotated_ids: np.ndarray  # all annotated objects of its volume (labeled in its window)


def _section_names(vol: data.TrainingVolume) -> str:
    z0, z1 = vol.z_range or (0, vol.shape3d[0])
    return f"section {z0}" if z1 - z0 == 1 else f"sections {z0}-{z1 - 1}"


def _prepare_volumes(cfg: TrainConfig, reference: dict | None = None):
    """Open and check all volumes; map their intensities onto ``reference``'s range (a
    checkpoint's normalization; None: the first training volume's own, for a model
    trained from scratch); split validation; choose the SPOCO@p subset and, with
    sparse labels and no labeled validation data, the held-out objects."""
    if len(cfg.raw) != len(cfg.labels) or not cfg.raw:
        raise SpocoInputError("give one --labels for every --raw")
    if not 0 <= cfg.val_objects < 1:
        raise SpocoInputError(f"--val-objects must be in [0, 1), got {cfg.val_objects}")
    mode = training_mode(cfg)
    train_vols = []
    for r, l in zip(cfg.raw, cfg.labels):
        v = data.open_training_volume(r, l, cfg.voxel_size)
        if v.raw.ndim == 2 and cfg.dims == 3:
            raise SpocoInputError(f"a 3D model cannot be trained on the 2D volume {r}")
        train_vols.append(v)
    reference = reference or intensity.native_reference(train_vols[0].raw, cfg.intensity_range, train_vols[0].name)
    val_vols = []
    # Sparse labels: no section is fully annotated, so held-out sections cannot score a
    # model; a share of the annotated objects is held out instead (spoco_vol.validation).
    # Full labels: the last section (2D models), or a slab one patch deep (3D models).
    full_default = 1 if cfg.dims == 2 else int(np.ceil(cfg.patch_shape[0] * (cfg.downsample or (1,))[0]))
    val_sections = cfg.val_sections if cfg.val_sections is not None else (0 if mode == "sparse" else full_default)
    hold_out_objects = not cfg.val_raw and cfg.val_sections is None and mode == "sparse" and cfg.val_objects > 0
    if cfg.val_raw:
        if len(cfg.val_raw) != len(cfg.val_labels):
            raise SpocoInputError("give one --val-labels for every --val-raw")
        val_vols = [data.open_training_volume(r, l, cfg.voxel_size) for r, l in zip(cfg.val_raw, cfg.val_labels)]
        for v in val_vols:
            if v.raw.ndim == 2 and cfg.dims == 3:
                raise SpocoInputError(f"a 3D model cannot be validated on the 2D volume {v.name}")
    elif val_sections > 0:
        # Hold out the last sections of each 3D volume (thick-section EM: z is the split axis).
        for v in train_vols:
            nz = v.shape3d[0]
            if v.raw.ndim == 3 and nz > val_sections:
                val_vols.append(dataclasses.replace(v, z_range=(nz - val_sections, nz)))
                v.z_range = (0, nz - val_sections)
    for v in train_vols + [v for v in val_vols if v.intensity is None]:
        v.intensity = intensity.volume_mapping(v.raw, reference, cfg.intensity_range, f"raw {v.name}")
    for v in val_vols:  # catches NaN/inf before training starts, and a validation set that cannot score
        if not len(data.volume_statistics(v)["object_ids"]):
            fix = ("give --val-raw/--val-labels with annotated objects" if cfg.val_raw else
                   "give a --val-sections N whose sections hold annotated objects, or leave --val-sections out: "
                   "with sparse labels a share of the annotated objects is then held out (--val-objects)")
            raise SpocoInputError(f"the validation data ({v.name}, {_section_names(v)}) hold no annotated object; "
                                  f"{fix}")
    # Statistics and the SPOCO@p subset come from the training sections only.
    stats = []
    for i, (v, l) in enumerate(zip(train_vols, cfg.labels)):
        s = data.volume_statistics(v, seed=cfg.seed + i)
        if len(s["object_ids"]) == 0:
            raise SpocoInputError(f"labels {l} contain no annotated object (all 0) in the training sections")
        v.inventory = s["inventory"]
        stats.append(s)
    # One normalisation for all volumes, stored in the checkpoint, so that every block of
    # every later volume is normalised the same way (per-block statistics would show seams).
    n = sum(s["object_sizes"].size for s in stats)
    mean = float(np.mean([s["mean"] for s in stats]))
    std = float(np.mean([s["std"] for s in stats]))
    for i, (v, s) in enumerate(zip(train_vols, stats)):
        v.keep_ids = data.choose_object_subset(s["object_ids"], cfg.object_fraction, cfg.seed + i)
    annotated_ids = [s["object_ids"] if v.keep_ids is None else v.keep_ids for v, s in zip(train_vols, stats)]
    held = _hold_out_objects(train_vols, annotated_ids, cfg) if hold_out_objects else []
    sizes = np.concatenate([s["object_sizes"] for s in stats])
    kept = sum(len(ids) for ids in annotated_ids)
    used_ids = [v.keep_ids if v.keep_ids is not None else s["object_ids"] for v, s in zip(train_vols, stats)]
    annotated = sum(int(s["object_sizes"][np.isin(s["object_ids"], ids)].sum()) for s, ids in zip(stats, used_ids))
    vs = train_vols[0].voxel_size
    normalization = {"mean": mean, "std": std, "kind": "zscore", "input_dtype": intensity.model_dtype(reference),
                     "input_range": list(intensity.model_range(reference))}
    return train_vols, val_vols, held, normalization, {
        "objects_total": int(n), "objects_annotated": int(kept), "objects_held_out": len(held),
        "objects_used": int(kept - len(held)),
        "object_size_p1": float(np.percentile(sizes, 1)), "voxel_size": vs,
        "annotated_voxels": annotated, "voxels": sum(s["voxels"] for s in stats)}


MAX_HELD_OUT_OBJECTS = 24  # enough to choose by; each costs a window's prediction per validation


def _hold_out_objects(train_vols, annotated_ids, cfg: TrainConfig) -> list[HeldOutObject]:
    """A seeded share ``val_objects`` of the annotated objects (at least one, at most
    MAX_HELD_OUT_OBJECTS, and never all), removed from the training labels."""
    pool = [(i, int(o)) for i, ids in enumerate(annotated_ids) for o in ids]
    if len(pool) < 2:
        warn(f"only {len(pool)} annotated object: none can be held out to choose the checkpoint and "
             "calibrate the background, so the newest checkpoint is kept and the background is measured "
             "on training patches")
        return []
    n = int(np.clip(round(cfg.val_objects * len(pool)), 1, min(MAX_HELD_OUT_OBJECTS, len(pool) - 1)))
    rng = np.random.default_rng(cfg.seed + 20_000)
    chosen = sorted(pool[k] for k in rng.choice(len(pool), size=n, replace=False))
    held = []
    for i, v in enumerate(train_vols):
        ids = np.array([o for j, o in chosen if j == i], np.int64)
        if not ids.size:
            continue
        v.keep_ids = np.setdiff1d(annotated_ids[i], ids)
        inv = v.inventory
        for o in ids:
            k = int(np.searchsorted(inv.ids, o))
            anchors = inv.anchors[inv.anchor_ids == o]
            anchor = anchors[np.argsort(anchors[:, 0])[len(anchors) // 2]]  # a voxel in its middle section
            held.append(HeldOutObject(v, int(o), inv.bbox_lo[k], inv.bbox_hi[k], anchor, annotated_ids[i]))
    return held


def training_downsample(cfg: TrainConfig, init_ckpt: dict | None, train_vols) -> list[float]:
    """Input voxels per model pixel (z, y, x): ``--downsample`` if given; when
    fine-tuning, what brings the data to the checkpoint's voxel size by the rule
    segmentation resamples with (pipeline.model_scale: sizes within 20% are used as
    they are); else 1, 1, 1."""
    if cfg.downsample is not None:
        return [int(d) if float(d).is_integer() else float(d) for d in cfg.downsample]
    model_vs = init_ckpt.get("voxel_size") if init_ckpt is not None else None
    if model_vs is None:
        return [1, 1, 1]
    from .pipeline import model_scale
    sizes = [v.voxel_size for v in train_vols]
    if any(vs is None for vs in sizes):
        name = next(v.name for v in train_vols if v.voxel_size is None)
        warn(f"the voxel size of {name} is unknown (none in its metadata, no --voxel-size): training at its own "
             f"resolution, not at the model's {io.format_voxel_size(model_vs)}; give --voxel-size Z,Y,X in nm to "
             "resample it")
        return [1, 1, 1]
    dims = init_ckpt["architecture"]["dims"]
    factors = []
    for v, vs in zip(train_vols, sizes):
        vs3 = [1.0] * (3 - len(vs)) + [float(x) for x in vs]
        scale = model_scale(vs3, model_vs, list(range(3 - dims, 3)), 3)
        factors.append([1 / s for s in scale])
    if any(not np.allclose(f, factors[0], rtol=0.05) for f in factors):
        raise SpocoInputError("the training volumes have different voxel sizes "
                              f"({', '.join(io.format_voxel_size(vs) for vs in sizes)}); give --downsample for all")
    return [int(round(f)) if abs(f - round(f)) < 1e-6 else round(float(f), 6) for f in factors[0]]


def _model_voxel_size(cfg: TrainConfig, vs):
    if vs is None:
        return None
    ds = list(cfg.downsample)[-len(vs):] if len(vs) <= len(cfg.downsample) else list(cfg.downsample)
    return [v * d for v, d in zip(vs, ds)]


def _check_out_dir(cfg: TrainConfig):
    if cfg.resume:
        if not os.path.isfile(os.path.join(cfg.out, "latest.pt")):
            raise SpocoInputError(f"--resume: no latest.pt in {cfg.out}")
        return
    if os.path.exists(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
        raise SpocoInputError(f"output directory {cfg.out} is not empty (use --overwrite or --resume)")


# ----------------------------------------------------------------------------- training

def _to_batch(raws: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raws[:, None])).to(device)


def _augmented_batch(sampler: data.PatchSampler, cfg: TrainConfig, normalization: dict,
                     rng: np.random.Generator, with_g: bool):
    raws, labs, graws = [], [], []
    for _ in range(cfg.batch_size):
        raw, lab = sampler.sample()
        raw = transforms.normalize(raw, normalization)
        raw, lab = transforms.augment_geometry(raw, lab, rng, elastic=cfg.elastic)
        raw = transforms.augment_intensity(raw, rng)
        raws.append(raw)
        labs.append(lab)
        if with_g:
            graws.append(transforms.augment_for_momentum(raw, rng))
    return np.stack(raws), np.stack(labs), (np.stack(graws) if with_g else None)


def _validation_patches(val_vols, cfg: TrainConfig, normalization: dict, seed: int):
    """A fixed, seeded set of held-out patches: the validation loss is comparable over time."""
    if not val_vols:
        return []
    try:
        sampler = data.PatchSampler(val_vols, cfg.patch_shape, cfg.dims, cfg.downsample,
                                    rng=np.random.default_rng(seed + 10_000))
    except SpocoInputError:
        if cfg.val_raw:
            raise  # the user named validation data: it must be usable
        return []
    out = []
    for _ in range(cfg.val_patches):
        raw, lab = sampler.sample()
        out.append((transforms.normalize(raw, normalization), lab))
    return out


def _validation_images(val_vols, cfg: TrainConfig, normalization: dict, max_pixels: int = 2 ** 20):
    """Whole held-out sections (2D models) or a central crop of each held-out volume (3D),
    on the model grid, normalised: for calibrating the background after training."""
    out = []
    for v in val_vols:
        z0, z1 = v.z_range or (0, v.shape3d[0])
        ds = cfg.downsample
        if cfg.dims == 2:
            for z in range(z0, z1):
                raw = v.read_raw(z if v.raw.ndim == 3 else ...)[None]
                lab = np.asarray(v.labels[z] if v.labels.ndim == 3 else v.labels[...]).astype(np.int64)[None]
                raw, lab = data.to_model_grid(raw, lab, ds)
                side = int(np.sqrt(max_pixels))
                out.append((transforms.normalize(raw[0, :side, :side], normalization), lab[0, :side, :side]))
                if len(out) >= 8:
                    return out
        else:
            shape = [min(n, int(np.ceil(c * f))) for n, c, f in zip((z1 - z0, *v.shape3d[1:]), (64, 256, 256), ds)]
            start = [z0 + (z1 - z0 - shape[0]) // 2] + [(n - s) // 2 for n, s in zip(v.shape3d[1:], shape[1:])]
            sl = tuple(slice(a, a + s) for a, s in zip(start, shape))
            raw, lab = data.to_model_grid(v.read_raw(sl),
                                          np.asarray(v.labels[sl]).astype(np.int64), ds)
            out.append((transforms.normalize(raw, normalization), lab))
    return out


def _object_windows(held: list[HeldOutObject], cfg: TrainConfig, normalization: dict):
    """A window around each held-out object, on the model grid and normalised: (images,
    object ids). A window spans the object's bounding box twice over, at least one
    patch and at most two (in model pixels); its labels hold every annotated object of
    the volume (so a segment matching a training object is not a false one), 0 elsewhere.
    A 2D model sees an object in the section of its middle anchor voxel."""
    images, objects = [], []
    ds = [float(d) for d in cfg.downsample]
    ps = (1, *cfg.patch_shape) if cfg.dims == 2 else tuple(cfg.patch_shape)
    for h in held:
        v = h.volume
        z0, z1 = v.z_range or (0, v.shape3d[0])
        lo_vol, hi_vol = np.array([z0, 0, 0]), np.array([z1, *v.shape3d[1:]])
        extent = h.bbox_hi - h.bbox_lo
        size = [min(int(n), int(np.ceil(min(max(2 * e, p * d), 2 * p * d))))
                for n, e, p, d in zip(hi_vol - lo_vol, extent, ps, ds)]
        if cfg.dims == 2:
            size[0], centre = 1, [int(h.anchor[0]), *((h.bbox_lo[1:] + h.bbox_hi[1:]) // 2)]
        else:
            centre = (h.bbox_lo + h.bbox_hi) // 2
        start = [int(np.clip(c - s // 2, lo, hi - s)) for c, s, lo, hi in zip(centre, size, lo_vol, hi_vol)]
        sl = tuple(slice(a, a + s) for a, s in zip(start, size))
        if v.raw.ndim == 2:
            sl = sl[1:]
        raw = v.read_raw(sl).reshape(size)
        lab = np.asarray(v.labels[sl]).astype(np.int64).reshape(size)
        lab = np.where(np.isin(lab, h.annotated_ids), lab, 0)
        raw, lab = data.to_model_grid(raw, lab, ds)
        if cfg.dims == 2:
            raw, lab = raw[0], lab[0]
        if not (lab == h.id).any():  # a sliver the model grid does not keep
            continue
        images.append((transforms.normalize(raw, normalization), lab))
        objects.append(h.id)
    return images, objects


def _validate(net, loss_fn, patches, device, amp):
    if not patches:
        return None
    net.eval()
    total = 0.0
    with torch.no_grad():
        for raw, lab in patches:
            with autocast_context(device, amp):
                emb = net(_to_batch(raw[None], device))
            t, _ = loss_fn(emb.float(), torch.from_numpy(lab[None]).to(device))
            total += float(t)
    net.train()
    return total / len(patches)


def calibrate_background(net, images, device, amp, delta_v: float, delta_d: float,
                         min_size: int = 0, tta: bool = False, embeddings=None, objects=None,
                         offsets=None) -> dict:
    """The background embedding and the pixel radius around it, for inference.

    The embedding is the mode of the label-0 pixels' embeddings: start at their median,
    then a few mean-shift steps over the pixels within delta_d, so that a minority of
    unannotated objects in the unlabeled region does not pull it off. The radius is the
    one whose segmentation of the held-out images (normalised raw, labels) scores best
    (spoco_vol.validation: AP@0.5 of dense labels, or with ``objects``, one held-out
    object id per image, the held-out objects' PQ and the largest radius that keeps
    it), searched from delta_v to 2*delta_d + delta_v (objects are pushed 2*delta_d
    from the background). Whole sections beat random patches here: objects cut by a
    patch border bias the choice.
    ``tta``: embed with test-time augmentation (the radius fits the embeddings it is
    measured on, so inference must then use it too).
    ``embeddings``: the images' embeddings, if already predicted (as above).
    ``offsets``: the affinity offsets inference uses [default: affinities.default_offsets].
    Returns {} when the patches have no label 0 (dense labels: no background).
    """
    from .inference import predict_embeddings
    embs = embeddings
    if embs is None:
        embs = [predict_embeddings(net, raw, device=device, amp=amp, tta=tta) for raw, _ in images]
        net.train()
    labels = [lab for _, lab in images]
    flat = np.concatenate([e.reshape(e.shape[0], -1) for e in embs], axis=1).T
    is_bg = np.concatenate([lab.reshape(-1) == 0 for lab in labels])
    bg = torch.from_numpy(flat[is_bg])
    if len(bg) == 0:
        return {}
    background = [float(v) for v in losses.embedding_mode(bg, delta_d)]
    # Only images with annotated objects can score a radius (an empty one rewards deleting all).
    scored = [k for k, lab in enumerate(labels) if lab.any()]
    if not scored:
        return {"background_embedding": background, "background_radius": delta_d}

    grid = np.arange(delta_v, 2 * delta_d + delta_v + 1e-9, 0.25)
    scores = [held_out_score([embs[k] for k in scored], [labels[k] for k in scored], delta_d,
                             {"background_embedding": background, "background_radius": float(r),
                              "min_size": min_size, "offsets": offsets},
                             objects=None if objects is None else [objects[k] for k in scored]) for r in grid]
    radius, score = choose_radius(grid, scores, objects is not None, prefer_larger=False)
    return {"background_embedding": background, "background_radius": radius,
            "background_radius_val_score": score}


def held_out_segmentation(embeddings: np.ndarray, delta_d: float, inference: dict, foreground=None) -> np.ndarray:
    """Segment held-out embeddings (model grid) as inference would, with ``inference``'s
    background rule (and a foreground classifier's probabilities)."""
    from .segmentation import segment_embeddings
    dims = embeddings.ndim - 1
    return segment_embeddings(embeddings, inference.get("offsets") or default_offsets(dims), delta_d,
                              strides=[2] * dims, background_embedding=inference.get("background_embedding"),
                              background_radius=inference.get("background_radius"),
                              min_size=inference.get("min_size", 0), foreground=foreground)


def held_out_score(embeddings, labels, delta_d: float, inference: dict, foreground=None, objects=None) -> float:
    """The held-out score (spoco_vol.validation) of held-out images (embeddings on the
    model grid, labels; they may differ in shape) segmented by ``held_out_segmentation``
    (``foreground``: one probability array per image): AP@0.5 of dense labels, or the
    PQ of the held-out ``objects`` (one id per image)."""
    segs = [held_out_segmentation(e, delta_d, inference, None if foreground is None else foreground[i])
            for i, e in enumerate(embeddings)]
    return validation.held_out_score(segs, labels, objects)


def _rng_state(rng: np.random.Generator, gen: torch.Generator) -> dict:
    return {"numpy": json.dumps(rng.bit_generator.state), "torch_gen": gen.get_state(),
            "torch_global": torch.get_rng_state()}


def _restore_rng(state: dict, rng: np.random.Generator, gen: torch.Generator):
    rng.bit_generator.state = json.loads(state["numpy"])
    gen.set_state(state["torch_gen"])
    torch.set_rng_state(state["torch_global"])


def _plot_log(log_path: str, png_path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(log_path)))
    if not rows:
        return
    it = [int(r["iteration"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    for term in LOG_TERMS:
        vals = [float(r[term]) if r[term] else np.nan for r in rows]
        if np.any(np.nan_to_num(vals) != 0):
            ax.plot(it, vals, label=term, lw=1 if term != "total" else 2)
    vit = [i for i, r in zip(it, rows) if r.get("val_loss")]
    if vit:
        ax.plot(vit, [float(r["val_loss"]) for r in rows if r.get("val_loss")], "k--o", label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    ait = [i for i, r in zip(it, rows) if r.get("val_score")]
    if ait:
        ax2 = ax.twinx()
        ax2.plot(ait, [float(r["val_score"]) for r in rows if r.get("val_score")], "r-s", label="held-out score")
        ax2.set_ylabel("held-out score (AP@0.5 or object PQ)")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _check_parameters(cfg: TrainConfig) -> None:
    """Numbers that would fail deep inside the loop fail here, before --out is touched."""
    if cfg.dims not in (2, 3):
        raise SpocoInputError("--dims must be 2 or 3")
    if not 0 < cfg.threshold < 1:
        raise SpocoInputError(f"--threshold must be in (0, 1), got {cfg.threshold}")
    if cfg.delta_v <= 0 or cfg.delta_d <= 0:
        raise SpocoInputError("--delta-v and --delta-d must be positive")
    if cfg.embedding_dim < 1 or not cfg.features or min(cfg.features) < 1:
        raise SpocoInputError("--embedding-dim and --features must be positive")
    if cfg.downsample is not None and (len(cfg.downsample) != 3 or not all(
            np.isfinite(d) and d > 0 for d in cfg.downsample)):
        raise SpocoInputError("--downsample takes three positive factors (z y x)")
    if cfg.dims == 2 and cfg.downsample is not None and cfg.downsample[0] != 1:
        raise SpocoInputError("a 2D model is trained on single sections: the z factor of --downsample must be 1")
    if cfg.voxel_size is not None and not all(np.isfinite(v) and v > 0 for v in cfg.voxel_size):
        raise SpocoInputError(f"--voxel-size must be positive, got {list(cfg.voxel_size)}")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise SpocoInputError(f"--out {cfg.out} exists and is not a directory")
    if cfg.offset_distances is not None and (not len(cfg.offset_distances) or min(cfg.offset_distances) < 2):
        raise SpocoInputError("--offset-distances takes long-range distances >= 2 (direct neighbours are always used)")
    if cfg.foreground_iterations < 0:
        raise SpocoInputError("--foreground-iterations must be >= 0")
    if cfg.foreground_iterations:
        if training_mode(cfg) != "sparse":
            raise SpocoInputError("--foreground-iterations needs sparse labels (--mode sparse or --object-fraction < 1): "
                                  "with full labels the background is annotated")
        if cfg.foreground_prior is not None and not 0 <= cfg.foreground_prior < 1:
            raise SpocoInputError(f"--foreground-prior must be in [0, 1), got {cfg.foreground_prior}")


def train(cfg: TrainConfig) -> dict:
    """Train (or fine-tune, or resume) a SPOCO model; returns a summary dict."""
    _check_parameters(cfg)
    init_ckpt = model_mod.load_checkpoint(bundled.model_path(cfg.init)) if cfg.init else None
    if init_ckpt is not None:
        arch = init_ckpt["architecture"]
        if arch["dims"] != cfg.dims or arch["in_channels"] != 1:
            raise SpocoInputError(f"--init model is {arch['dims']}D with {arch['in_channels']} input "
                                  f"channel(s); this run needs {cfg.dims}D with 1")
    _check_out_dir(cfg)
    train_vols, val_vols, held, normalization, info = _prepare_volumes(
        cfg, None if init_ckpt is None else init_ckpt["normalization"])
    if init_ckpt is not None:
        n = init_ckpt["normalization"]  # keep the representation's input scale
        normalization = {"input_dtype": intensity.model_dtype(n), "input_range": list(intensity.model_range(n)), **n}
    cfg = dataclasses.replace(cfg, downsample=training_downsample(cfg, init_ckpt, train_vols))
    fine_tuned_from = None if init_ckpt is None else {
        "model": cfg.init, "sha256": model_mod.checkpoint_checksum(init_ckpt),
        "training_data": init_ckpt.get("training_data"), "training_command": init_ckpt.get("training_command"),
        "fine_tuned_from": init_ckpt.get("training", {}).get("fine_tuned_from")}
    ds = list(cfg.downsample)
    offsets = None if cfg.offset_distances is None else default_offsets(cfg.dims, cfg.offset_distances)
    # Specks below a quarter of the smallest annotated objects (1st percentile) are noise.
    min_size = max(1, int(info["object_size_p1"] / float(np.prod(ds)) / 4))
    rng = np.random.default_rng(cfg.seed)
    sampler = data.PatchSampler(train_vols, cfg.patch_shape, cfg.dims, ds, rng=rng)
    val_patches = _validation_patches(val_vols, cfg, normalization, cfg.seed)
    # Checkpoints are chosen by a held-out score (spoco_vol.validation): AP@0.5 of whole
    # labeled sections, or with sparse labels the recovery of held-out objects. The
    # validation loss cannot choose in the sparse setting: it is blind to the unlabeled
    # background, where a sparsely trained model makes its errors (false fragments).
    if held:
        val_images, val_objects = _object_windows(held, cfg, normalization)
    else:
        val_images, val_objects = _validation_images(val_vols, cfg, normalization), None
    if not any(lab.any() for _, lab in val_images):
        val_images, val_objects = [], None
    score_kind = None if not val_images else (
        "PQ of held-out objects" if val_objects is not None else "AP@0.5 of held-out sections")

    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    if init_ckpt is not None:
        net = model_mod.model_from_checkpoint(init_ckpt)
    else:
        pools = cfg.pool_factors or [[2] * cfg.dims for _ in cfg.features[1:]]
        net = model_mod.UNet(dims=cfg.dims, embedding_dim=cfg.embedding_dim, features=cfg.features,
                             norm=cfg.norm, pool_factors=pools)
    mult = net.shape_multiple
    if any(p % m for p, m in zip(cfg.patch_shape, mult)):
        raise SpocoInputError(f"--patch-shape {tuple(cfg.patch_shape)} must be a multiple of {mult}")
    net.to(device).train()
    mode = training_mode(cfg)
    use_g = cfg.w_consistency > 0 or cfg.w_background > 0
    g_net = losses.make_momentum_network(net) if use_g else None
    loss_fn = losses.SpocoLoss(mode=mode, delta_v=cfg.delta_v, delta_d=cfg.delta_d,
                               threshold=cfg.threshold, w_consistency=cfg.w_consistency,
                               w_unlabeled=cfg.w_unlabeled, w_instance=cfg.w_instance,
                               w_background=cfg.w_background,
                               background_radius=cfg.background_select_radius)
    val_loss_fn = losses.SpocoLoss(mode=mode, delta_v=cfg.delta_v, delta_d=cfg.delta_d,
                                   threshold=cfg.threshold, w_consistency=0)
    lr = cfg.lr if cfg.lr is not None else (2e-5 if cfg.init else 2e-4)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    # fp16 autocast (GPUs without bf16) underflows small gradients unless the loss is scaled.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and autocast_dtype(device) == torch.float16)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.iterations), eta_min=lr / 100)
    elif cfg.schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=4)
    else:
        raise SpocoInputError("--schedule must be 'cosine' or 'plateau'")

    # best_score: validation AP@0.5 when there are labeled held-out sections, else minus
    # the validation loss; higher is better.
    start_it, best_score, best_it, elapsed = 0, -float("inf"), 0, 0.0
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.overwrite and not cfg.resume:
        for f in ("latest.pt", "best.pt", "log.csv", "loss.png", "summary.json"):
            if os.path.exists(os.path.join(cfg.out, f)):
                os.remove(os.path.join(cfg.out, f))
    log_path = os.path.join(cfg.out, "log.csv")
    if cfg.resume:
        st = model_mod.load_checkpoint(os.path.join(cfg.out, "latest.pt"))
        ts = st.get("training_state")
        saved = st.get("training", {})
        if ts is None or st["architecture"] != net.config or saved.get("mode") != mode \
                or list(saved.get("patch_shape", [])) != list(cfg.patch_shape) \
                or saved.get("batch_size") != cfg.batch_size:
            raise SpocoInputError(f"--resume: {cfg.out}/latest.pt was written by a different configuration "
                                  "(architecture, mode, patch shape or batch size); rerun with those options")
        net.load_state_dict(st["state_dict"])
        if use_g:
            g_net.load_state_dict(ts["momentum_state"])
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        if ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        _restore_rng(ts["rng"], rng, gen)
        start_it, elapsed = ts["iteration"], ts["elapsed"]
        best_score, best_it = ts.get("best_score", -ts.get("best_val", float("inf"))), ts.get("best_iteration", 0)
        _truncate_log(log_path, start_it)

    def checkpoint(it: int, with_state: bool, background=None, val=None):
        extra = {"training": {"iterations": it, "mode": mode, "object_fraction": cfg.object_fraction,
                              "objects_used": info["objects_used"], "objects_total": info["objects_total"],
                              "objects_annotated": info["objects_annotated"],
                              "objects_held_out": info["objects_held_out"], "validation": score_kind,
                              "seconds": round(elapsed, 1), "downsample": ds,
                              "patch_shape": list(cfg.patch_shape), "batch_size": cfg.batch_size,
                              "fine_tuned_from": fine_tuned_from, **(val or {})}}
        inference = {"downsample": ds,
                     "min_size": min_size,
                     "tta": cfg.tta,
                     **({"offsets": offsets} if offsets else {}),
                     **(background or {})}
        ck = model_mod.make_checkpoint(
            net, delta_v=cfg.delta_v, delta_d=cfg.delta_d, normalization=normalization,
            voxel_size=_model_voxel_size(cfg, info["voxel_size"]),
            training_data=", ".join(cfg.raw), training_command=cfg.command,
            inference=inference, extra=extra)
        if with_state:
            ck["training_state"] = {
                "iteration": it, "best_score": best_score, "best_iteration": best_it, "elapsed": elapsed,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "momentum_state": g_net.state_dict() if use_g else {},
                "rng": _rng_state(rng, gen)}
        return ck

    new_log = not os.path.exists(log_path)
    log_f = open(log_path, "a", newline="")
    writer = csv.writer(log_f)
    if new_log:
        writer.writerow(["iteration", *LOG_TERMS, "lr", "seconds", "val_loss", "val_score"])
    from tqdm import tqdm
    bar = tqdm(total=cfg.iterations, initial=start_it, disable=not cfg.progress, file=sys.stderr,
               dynamic_ncols=True, desc="train")
    running: dict[str, float] = {}
    val_background = None
    t_last = time.perf_counter()
    stopping = False
    for it in range(start_it + 1, cfg.iterations + 1):
        raws, labs, graws = _augmented_batch(sampler, cfg, normalization, rng, use_g)
        x = _to_batch(raws, device)
        y = torch.from_numpy(labs).to(device)
        with autocast_context(device, cfg.amp):
            emb = net(x)
        g_emb = None
        if use_g:
            with torch.no_grad(), autocast_context(device, cfg.amp):
                g_emb = g_net(_to_batch(graws, device)).float()
        loss_fn.weights["background"] = cfg.w_background if (mode == "sparse" and it > cfg.background_warmup) else 0.0
        total, terms = loss_fn(emb.float(), y, g_embeddings=g_emb, generator=gen)
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        if use_g:
            losses.update_momentum_network(net, g_net, cfg.momentum)
        if cfg.schedule == "cosine":
            sched.step()
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        vals = {"total": float(total.detach()), **{k: float(v) for k, v in terms.items()}}
        for k, v in vals.items():
            running[k] = v if k not in running else 0.95 * running[k] + 0.05 * v
        val_loss, val_score, val_background = None, None, None
        checkpoint_due = it % cfg.val_every == 0 or it == cfg.iterations
        if checkpoint_due:
            val_loss = _validate(net, val_loss_fn, val_patches, device, cfg.amp)
            if cfg.schedule == "plateau" and val_loss is not None:
                sched.step(val_loss)
            if val_images:
                val_background = calibrate_background(net, val_images, device, cfg.amp, cfg.delta_v,
                                                       cfg.delta_d, min_size, cfg.tta, objects=val_objects,
                                                       offsets=offsets)
                val_score = val_background.get("background_radius_val_score")
        writer.writerow([it, *(f"{vals[k]:.6g}" if k in vals else "" for k in LOG_TERMS),
                         f"{opt.param_groups[0]['lr']:.3g}", f"{elapsed:.2f}",
                         "" if val_loss is None else f"{val_loss:.6g}",
                         "" if val_score is None else f"{val_score:.4f}"])
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)
        bar.update(1)
        if checkpoint_due:
            t_save = time.perf_counter()
            score = val_score if val_score is not None else (None if val_loss is None else -val_loss)
            # Without held-out data the newest model is the best one we can name.
            if score is None or score > best_score:
                best_score = score if score is not None else best_score
                best_it = it
                val = {"val_loss": val_loss, "val_score": val_score,
                       "selected_by": score_kind if val_score is not None else
                       ("validation loss" if val_loss is not None else "newest")}
                model_mod.save_checkpoint(checkpoint(it, False, val_background, val),
                                          os.path.join(cfg.out, "best.pt"))
            log_f.flush()
            model_mod.save_checkpoint(checkpoint(it, True), os.path.join(cfg.out, "latest.pt"))
            t_last += time.perf_counter() - t_save  # checkpoint I/O is not training time
        stopping = cfg.stop_after is not None and it - start_it >= cfg.stop_after and it < cfg.iterations
        if stopping:
            if not checkpoint_due:
                log_f.flush()
                model_mod.save_checkpoint(checkpoint(it, True), os.path.join(cfg.out, "latest.pt"))
            break
    bar.close()
    log_f.close()
    if stopping:
        return {"stopped_at": it, "iterations": cfg.iterations, "resume_with": "--resume"}

    # Inference needs to know which embeddings mean "background": measure it once per model.
    bg_images = val_images or _validation_images(val_vols, cfg, normalization) or \
        _validation_patches(train_vols, cfg, normalization, cfg.seed)
    if val_background is not None:  # measured on the same images at the last iteration
        background = val_background
    else:
        background = calibrate_background(net, bg_images, device, cfg.amp, cfg.delta_v, cfg.delta_d, min_size,
                                          cfg.tta, objects=val_objects, offsets=offsets)
    best_path = os.path.join(cfg.out, "best.pt")
    if os.path.exists(best_path) and not val_images:  # else calibrated when it was chosen
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        best_net = model_mod.model_from_checkpoint(best).to(device)
        best["inference"].update(calibrate_background(best_net, bg_images, device, cfg.amp,
                                                      cfg.delta_v, cfg.delta_d, min_size, cfg.tta, offsets=offsets))
        model_mod.save_checkpoint(best, best_path)
    model_mod.save_checkpoint(checkpoint(cfg.iterations, True, background), os.path.join(cfg.out, "latest.pt"))
    fg_summary = None
    if cfg.foreground_iterations:
        fg_summary = _add_foreground(cfg, best_path, train_vols, val_images, val_objects, info, device)
    _plot_log(log_path, os.path.join(cfg.out, "loss.png"))
    summary = {"iterations": cfg.iterations, "seconds": round(elapsed, 1),
               "iterations_per_second": round((cfg.iterations - start_it) / max(elapsed, 1e-9), 3)
               if cfg.iterations > start_it else None,
               "best_iteration": best_it,
               "best_val_score": best_score if val_images and best_score > -float("inf") else None,
               "validation": score_kind, "downsample": ds,
               "mode": mode, "objects_used": info["objects_used"], "objects_held_out": info["objects_held_out"],
               "objects_total": info["objects_total"],
               "device": str(device)}
    if fg_summary is not None:
        summary["foreground"] = fg_summary
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _add_foreground(cfg: TrainConfig, best_path: str, train_vols, val_images, val_objects, info, device) -> dict:
    """Train the foreground classifier for best.pt (its iteration chosen on the held-out
    data best.pt was chosen and calibrated on) and store it in best.pt if it helps
    there. (latest.pt stays as it is: nothing measured that the classifier helps it.)"""
    from . import foreground
    best = model_mod.load_checkpoint(best_path)
    prior, prior_from = cfg.foreground_prior, "--foreground-prior"
    if prior is None and cfg.object_fraction < 1:
        # the held-out objects are unlabeled in training: the annotated fraction shrinks with them
        fraction = cfg.object_fraction * info["objects_used"] / info["objects_annotated"]
        prior, prior_from = foreground.unlabeled_object_share(info["annotated_voxels"], info["voxels"], fraction), \
            "--object-fraction"
    elif prior is None:
        prior, prior_from = foreground.estimate_prior(best, train_vols, cfg, device), "the embeddings"
    result = foreground.train_classifier(best, cfg, train_vols, val_images, prior,
                                         iterations=cfg.foreground_iterations, device=device,
                                         progress=cfg.progress, val_objects=val_objects)
    result["prior_from"] = prior_from
    entry = result.pop("foreground")
    if entry is not None:
        best["foreground"] = entry
        model_mod.save_checkpoint(best, best_path)
    return {"kept": entry is not None, **result}


def _truncate_log(log_path: str, iteration: int):
    """Drop log rows written after the checkpoint we resume from (they will be redone)."""
    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= iteration]
    tmp = log_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)
    shutil.move(tmp, log_path)


def recalibrate_checkpoint(model_path: str, raw: str, labels: str, out: str, *,
                           z_range: tuple[int, int] | None = None, device: str = "auto",
                           amp: bool = True, tta: bool | None = None) -> dict:
    """Re-measure a checkpoint's background embedding and radius on labeled held-out data
    (whole sections, as at the end of training) and save it as ``out``. ``tta``: measure
    (and later segment) with test-time augmentation [default: as the checkpoint does]."""
    ckpt = model_mod.load_checkpoint(model_path)
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise SpocoInputError(f"cannot write the calibrated checkpoint to {out}")
    vol = data.open_training_volume(raw, labels)
    vol.intensity = intensity.volume_mapping(vol.raw, ckpt["normalization"], what=f"raw {raw}")
    if ckpt["architecture"]["dims"] > vol.raw.ndim:
        raise SpocoInputError(f"the model is {ckpt['architecture']['dims']}D but {raw} is {vol.raw.ndim}D")
    if z_range is not None:
        nz = vol.shape3d[0]
        if len(z_range) != 2 or not 0 <= z_range[0] < z_range[1] <= nz or vol.raw.ndim != 3:
            raise SpocoInputError(f"--z-range needs START,STOP with 0 <= START < STOP <= {nz} on a 3D volume")
        z_range = (int(z_range[0]), int(z_range[1]))
    vol.z_range = z_range
    tr = ckpt.get("training", {})
    dims = ckpt["architecture"]["dims"]
    cfg = TrainConfig(raw=[raw], labels=[labels], out=out, dims=dims,
                      patch_shape=tr.get("patch_shape", [256] * dims),
                      downsample=ckpt.get("inference", {}).get("downsample", [1, 1, 1]))
    val = _validation_images([vol], cfg, ckpt["normalization"])
    if not any(lab.any() for _, lab in val):
        raise SpocoInputError(f"no annotated object in {labels}")
    dev = resolve_device(device)
    net = model_mod.model_from_checkpoint(ckpt).to(dev)
    tta = model_mod.uses_tta(ckpt, tta)
    from .inference import predict_embeddings
    embeddings = [predict_embeddings(net, raw, device=dev, amp=amp, tta=tta) for raw, _ in val]
    ckpt["inference"].update(calibrate_background(net, val, dev, amp, ckpt["delta_v"], ckpt["delta_d"],
                                                  ckpt["inference"].get("min_size", 0), tta, embeddings,
                                                  offsets=ckpt["inference"].get("offsets")), tta=tta)
    shown = {k: v for k, v in ckpt["inference"].items() if k != "background_embedding"}
    if ckpt.get("foreground"):
        shown.update(_recalibrate_classifier_radius(ckpt, embeddings, val, dev, amp, tta))
    ckpt.pop("training_state", None)
    model_mod.save_checkpoint(ckpt, out)
    return shown


def _recalibrate_classifier_radius(ckpt: dict, embeddings, val, device, amp: bool, tta: bool) -> dict:
    """A foreground classifier's radius was chosen around the old background embedding:
    choose it again, with the classifier, on the same held-out images (``val``, and
    their ``embeddings``)."""
    from .foreground import best_radius, classifier_from_checkpoint, predict_foreground
    classifier = classifier_from_checkpoint(ckpt).to(device)
    scored = [(e, raw, lab) for e, (raw, lab) in zip(embeddings, val) if lab.any()]
    probabilities = [predict_foreground(classifier, raw, device=device, amp=amp, tta=tta) for _, raw, _ in scored]
    ap, radius = best_radius([e for e, _, _ in scored], [lab for _, _, lab in scored], ckpt["delta_d"],
                             ckpt["inference"], probabilities)
    ckpt["foreground"]["background_radius"] = radius
    return {"foreground_background_radius": radius, "foreground_val_score": round(ap, 4)}
