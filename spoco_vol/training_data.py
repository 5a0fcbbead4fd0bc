"""Training data: the volumes of a run opened and checked, their intensities mapped onto
the model's range, the SPOCO@p subset of the objects, the validation split (held-out
sections, or held-out objects with sparse labels), the images validation scores, and the
augmented batches. Shared by the embedding training (training.py) and the foreground
classifier (foreground.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import data, intensity, io, transforms
from .checkpoint import Checkpoint
from .config import TrainConfig
from .errors import SpocoInputError, warn


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


def dense_validation_sections(cfg: TrainConfig, sections: int | None = None) -> int:
    """The last sections held out by default where labels are dense: one section for a 2D
    model, a slab one patch deep for a 3D model (in input sections), but at most a third
    of a volume of ``sections`` sections: a short annotated stack (60 sections for a
    patch 32 deep) keeps two thirds of itself to train on."""
    if cfg.dims == 2:
        return 1
    deep = int(np.ceil(cfg.patch_shape[0] * (cfg.downsample or (1,))[0]))
    return deep if sections is None else min(deep, max(1, sections // 3))


def prepare_volumes(cfg: TrainConfig, reference: dict | None = None, sections_as_dense: bool = False):
    """Open and check all volumes; map their intensities onto ``reference``'s range (a
    checkpoint's normalization; None: the first training volume's own, for a model
    trained from scratch); split validation; choose the SPOCO@p subset and, with
    sparse labels and no labeled validation data, the held-out objects.
    ``sections_as_dense``: without --val-sections, hold out the sections dense labels
    would (per volume), not objects, whatever the labels."""
    if len(cfg.raw) != len(cfg.labels) or not cfg.raw:
        raise SpocoInputError("give one --labels for every --raw")
    if not 0 <= cfg.val_objects < 1:
        raise SpocoInputError(f"--val-objects must be in [0, 1), got {cfg.val_objects}")
    mode = cfg.training_mode
    train_vols = []
    for r, l in zip(cfg.raw, cfg.labels):
        v = data.open_training_volume(r, l, cfg.voxel_size)
        if v.spatial_ndim == 2 and cfg.dims == 3:
            raise SpocoInputError(f"a 3D model cannot be trained on the 2D volume {r}")
        if train_vols and v.channels != train_vols[0].channels:
            raise SpocoInputError(f"{r} has {v.channels} channel(s), {train_vols[0].name} {train_vols[0].channels}")
        train_vols.append(v)
    reference = reference or intensity.native_reference(train_vols[0].raw, cfg.intensity_range, train_vols[0].name)
    val_vols = []
    # Sparse labels: no section is fully annotated, so held-out sections cannot score a
    # model; a share of the annotated objects is held out instead (spoco_vol.validation).
    by_objects = mode == "sparse" and not sections_as_dense
    val_sections = cfg.val_sections if cfg.val_sections is not None else (
        0 if by_objects else dense_validation_sections(cfg))
    objects_held_out = not cfg.val_raw and cfg.val_sections is None and by_objects and cfg.val_objects > 0
    if cfg.val_raw:
        if len(cfg.val_raw) != len(cfg.val_labels):
            raise SpocoInputError("give one --val-labels for every --val-raw")
        val_vols = [data.open_training_volume(r, l, cfg.voxel_size) for r, l in zip(cfg.val_raw, cfg.val_labels)]
        for v in val_vols:
            if v.spatial_ndim == 2 and cfg.dims == 3:
                raise SpocoInputError(f"a 3D model cannot be validated on the 2D volume {v.name}")
            if v.channels != train_vols[0].channels:
                raise SpocoInputError(f"{v.name} has {v.channels} channel(s), the training volumes "
                                      f"{train_vols[0].channels}")
    elif val_sections > 0:
        # Hold out the last sections of each 3D volume (thick-section EM: z is the split axis).
        for v in train_vols:
            nz = v.shape3d[0]
            n = val_sections if cfg.val_sections is not None else dense_validation_sections(cfg, nz)
            if v.spatial_ndim == 3 and nz > n:
                val_vols.append(dataclasses.replace(v, z_range=(nz - n, nz)))
                v.z_range = (0, nz - n)
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
    mean = np.mean([s["mean"] for s in stats], axis=0)  # per channel with several channels
    std = np.mean([s["std"] for s in stats], axis=0)
    mean, std = (float(mean), float(std)) if np.ndim(mean) == 0 else ([float(m) for m in mean],
                                                                      [float(x) for x in std])
    for i, (v, s) in enumerate(zip(train_vols, stats)):
        v.keep_ids = data.choose_object_subset(s["object_ids"], cfg.object_fraction, cfg.seed + i)
    annotated_ids = [s["object_ids"] if v.keep_ids is None else v.keep_ids for v, s in zip(train_vols, stats)]
    held = hold_out_objects(train_vols, annotated_ids, cfg) if objects_held_out else []
    sizes = np.concatenate([_object_sizes(s["inventory"], cfg.dims) for s in stats])
    kept = sum(len(ids) for ids in annotated_ids)
    used_ids = [v.keep_ids if v.keep_ids is not None else s["object_ids"] for v, s in zip(train_vols, stats)]
    annotated = sum(int(s["object_sizes"][np.isin(s["object_ids"], ids)].sum()) for s, ids in zip(stats, used_ids))
    vs = train_vols[0].voxel_size
    normalization = {"mean": mean, "std": std, "kind": "zscore", "input_dtype": intensity.model_dtype(reference),
                     "input_range": list(intensity.model_range(reference))}
    return train_vols, val_vols, held, normalization, {"channels": train_vols[0].channels,
        "objects_total": int(n), "objects_annotated": int(kept), "objects_held_out": len(held),
        "objects_used": int(kept - len(held)),
        "object_size_p1": float(np.percentile(sizes, 1)), "voxel_size": vs,
        "annotated_voxels": annotated, "voxels": sum(s["voxels"] for s in stats)}


def _object_sizes(inventory, dims: int) -> np.ndarray:
    """The objects' sizes as the model sees them: voxels for a 3D model; for a 2D model,
    which segments section by section, the area per section (voxels over the sections the
    object spans; an id that recurs in images stacked as sections, e.g. per-image
    numbering, comes out smaller, the safe side for a size floor)."""
    sizes = inventory.sizes.astype(np.float64)
    if dims == 2:
        sizes = sizes / np.maximum(inventory.bbox_hi[:, 0] - inventory.bbox_lo[:, 0], 1)
    return sizes


MAX_HELD_OUT_OBJECTS = 24  # enough to choose by; each costs a window's prediction per validation


def hold_out_objects(train_vols, annotated_ids, cfg: TrainConfig) -> list[HeldOutObject]:
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


def training_downsample(cfg: TrainConfig, init_ckpt: Checkpoint | None, train_vols) -> list[float]:
    """Input voxels per model pixel (z, y, x): ``--downsample`` if given; when
    fine-tuning, what brings the data to the checkpoint's voxel size by the rule
    segmentation resamples with (pipeline.input_scale: sizes within 20% are used as
    they are; a checkpoint and data both without a voxel size, the checkpoint's own
    downsampling); else 1, 1, 1."""
    if cfg.downsample is not None:
        return [int(d) if float(d).is_integer() else float(d) for d in cfg.downsample]
    if init_ckpt is None:
        return [1, 1, 1]
    from .pipeline import input_scale, model_scale
    model_vs, sizes, dims = init_ckpt.voxel_size, [v.voxel_size for v in train_vols], init_ckpt.dims
    if model_vs is None:
        # a model trained on data without a voxel size: data without one too are taken at
        # that data's resolution and read at the model's own downsampling, as segment reads them
        if any(vs is not None for vs in sizes):
            return [1, 1, 1]
        return _as_factors([1 / s for s in input_scale(None, init_ckpt, list(range(3 - dims, 3)), 3)])
    if any(vs is None for vs in sizes):
        name = next(v.name for v in train_vols if v.voxel_size is None)
        warn(f"the voxel size of {name} is unknown (none in its metadata, no --voxel-size): training at its own "
             f"resolution, not at the model's {io.format_voxel_size(model_vs)}; give --voxel-size Z,Y,X in nm to "
             "resample it")
        return [1, 1, 1]
    factors = []
    for v, vs in zip(train_vols, sizes):
        vs3 = [1.0] * (3 - len(vs)) + [float(x) for x in vs]
        scale = model_scale(vs3, model_vs, list(range(3 - dims, 3)), 3)
        factors.append([1 / s for s in scale])
    if any(not np.allclose(f, factors[0], rtol=0.05) for f in factors):
        raise SpocoInputError("the training volumes have different voxel sizes "
                              f"({', '.join(io.format_voxel_size(vs) for vs in sizes)}); give --downsample for all")
    return _as_factors(factors[0])


def _as_factors(factors) -> list[float]:
    return [int(round(f)) if abs(f - round(f)) < 1e-6 else round(float(f), 6) for f in factors]


def model_voxel_size(cfg: TrainConfig, vs):
    if vs is None:
        return None
    ds = list(cfg.downsample)[-len(vs):] if len(vs) <= len(cfg.downsample) else list(cfg.downsample)
    return [v * d for v, d in zip(vs, ds)]


def augmented_batch(sampler: data.PatchSampler, cfg: TrainConfig, normalization: dict,
                     rng: np.random.Generator, with_g: bool):
    """A batch of augmented patches for f (and, ``with_g``, for the consistency network g,
    which sees f's patch with extra noise). With ``cfg.colour_jitter`` each network's input
    gets its own colours (transforms.augment_colour, on raw intensities, so the geometry
    goes first; normalising commutes with it)."""
    raws, labs, graws = [], [], []
    for _ in range(cfg.batch_size):
        raw, lab = sampler.sample()
        channels_first = raw.ndim > lab.ndim
        g_raw = None
        if cfg.colour_jitter:
            raw, lab = transforms.augment_geometry(np.asarray(raw, np.float32), lab, rng, elastic=cfg.elastic)
            views = [transforms.normalize(transforms.augment_colour(raw, rng, cfg.colour_jitter, channels_first),
                                          normalization) for _ in range(2 if with_g else 1)]
            raw, g_raw = views[0], views[-1]
        else:
            raw, lab = transforms.augment_geometry(transforms.normalize(raw, normalization), lab, rng,
                                                   elastic=cfg.elastic)
        raw = transforms.augment_intensity(raw, rng, scale=cfg.intensity_jitter, shift=cfg.intensity_jitter)
        raws.append(raw)
        labs.append(lab)
        if with_g:
            graws.append(transforms.augment_for_momentum(raw if g_raw is None else g_raw, rng,
                                                         channels_first=channels_first))
    return np.stack(raws), np.stack(labs), (np.stack(graws) if with_g else None)


def validation_patches(val_vols, cfg: TrainConfig, normalization: dict, seed: int):
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


def validation_images(val_vols, cfg: TrainConfig, normalization: dict, max_pixels: int = 2 ** 20,
                      total_pixels: int = 8 * 2 ** 20):
    """Whole held-out sections (2D models) or a central crop of each held-out volume (3D),
    on the model grid, normalised: what checkpoints are chosen by and the background and
    the size floor are calibrated on. A 2D section is cut to its first ``max_pixels``
    (a square), and sections are taken in order until ``total_pixels``: a bound on the
    cost of each validation that takes every held-out section of a small-image stack
    (a count of sections would drop small images for nothing)."""
    out, taken = [], 0
    side = int(np.sqrt(max_pixels))
    for v in val_vols:
        z0, z1 = v.z_range or (0, v.shape3d[0])
        ds = cfg.downsample
        if cfg.dims == 2:
            _, gy, gx = data.model_grid_shape((1, *v.shape3d[1:]), ds)
            size = min(gy, side) * min(gx, side)  # what a section adds, known before reading it
            for z in range(z0, z1):
                if out and taken + size > total_pixels:
                    return out
                raw = v.read_raw(z if v.spatial_ndim == 3 else ...)
                raw = np.expand_dims(raw, raw.ndim - 2)  # the z axis, after any channel axis
                lab = np.asarray(v.labels[z] if v.labels.ndim == 3 else v.labels[...]).astype(np.int64)[None]
                raw, lab = data.to_model_grid(raw, lab, ds)
                raw, lab = raw[..., 0, :side, :side], lab[0, :side, :side]
                out.append((transforms.normalize(raw, normalization), lab))
                taken += lab.size
        else:
            shape = [min(n, int(np.ceil(c * f))) for n, c, f in zip((z1 - z0, *v.shape3d[1:]), (64, 256, 256), ds)]
            start = [z0 + (z1 - z0 - shape[0]) // 2] + [(n - s) // 2 for n, s in zip(v.shape3d[1:], shape[1:])]
            sl = tuple(slice(a, a + s) for a, s in zip(start, shape))
            raw, lab = data.to_model_grid(v.read_raw(sl),
                                          np.asarray(v.labels[sl]).astype(np.int64), ds)
            out.append((transforms.normalize(raw, normalization), lab))
    return out


def object_windows(held: list[HeldOutObject], cfg: TrainConfig, normalization: dict):
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
        if v.spatial_ndim == 2:
            sl = sl[1:]
        raw = v.read_raw(sl)
        raw = raw.reshape((raw.shape[0], *size) if v.channels > 1 else size)
        lab = np.asarray(v.labels[sl]).astype(np.int64).reshape(size)
        lab = np.where(np.isin(lab, h.annotated_ids), lab, 0)
        raw, lab = data.to_model_grid(raw, lab, ds)
        if cfg.dims == 2:
            raw, lab = raw[..., 0, :, :], lab[0]
        if not (lab == h.id).any():  # a sliver the model grid does not keep
            continue
        images.append((transforms.normalize(raw, normalization), lab))
        objects.append(h.id)
    return images, objects
