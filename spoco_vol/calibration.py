"""Calibration on held-out data: which embeddings mean "background", how far around them,
(with a foreground classifier) the radius chosen together with it, and (with dense
held-out labels) the size below which objects are dropped.

Used by the embedding training (training.py) at every validation, by the foreground
classifier (foreground.py) to choose its iteration and radius, and by
``spoco-vol calibrate`` (``recalibrate_checkpoint``). The held-out scores themselves
(AP@0.5 of dense labels, PQ of held-out objects) are spoco_vol.validation's.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from . import bundled, checkpoint, data, inference, intensity, losses, validation
from .checkpoint import Checkpoint, InferenceSettings
from .config import TrainConfig
from .errors import SpocoInputError
from .inference import predict_foreground, resolve_device
from .validation import choose_radius, choose_size_floor

RADIUS_STEP = 0.25  # embedding units between the radii searched
SIZE_FLOOR_KEYS = ("min_size", "min_size_base", "min_size_val_f1")  # what calibrate_size_floor records


def held_out_segmentation(embeddings: np.ndarray, delta_d: float, settings: InferenceSettings,
                          foreground=None) -> np.ndarray:
    """Segment held-out embeddings (model grid) as inference would, with ``settings``'
    background rule (and a foreground classifier's probabilities)."""
    from .segmentation import segment_embeddings
    return segment_embeddings(embeddings, settings.offsets, delta_d, strides=settings.strides,
                              background_embedding=settings.background_embedding,
                              background_radius=settings.background_radius, min_size=settings.min_size,
                              foreground=foreground, foreground_threshold=settings.foreground_threshold)


def held_out_score(embeddings, labels, delta_d: float, settings: InferenceSettings, foreground=None,
                   objects=None) -> float:
    """The held-out score (spoco_vol.validation) of held-out images (embeddings on the
    model grid, labels; they may differ in shape) segmented by ``held_out_segmentation``
    (``foreground``: one probability array per image): AP@0.5 of dense labels, or the
    PQ of the held-out ``objects`` (one id per image)."""
    segs = [held_out_segmentation(e, delta_d, settings, None if foreground is None else foreground[i])
            for i, e in enumerate(embeddings)]
    return validation.held_out_score(segs, labels, objects)


def calibrate_background(embeddings, labels, delta_v: float, delta_d: float, settings: InferenceSettings,
                         objects=None) -> dict:
    """The background embedding and the pixel radius around it, for inference, from the
    embeddings of held-out images and their labels.

    The embedding is the mode of the label-0 pixels' embeddings: start at their median,
    then a few mean-shift steps over the pixels within delta_d, so that a minority of
    unannotated objects in the unlabeled region does not pull it off. The radius is the
    one whose segmentation of the held-out images scores best (spoco_vol.validation:
    AP@0.5 of dense labels), searched over ``radius_grid``. With ``objects`` (one
    held-out object id per image) it is delta_d, and their score there is returned: they
    still choose the checkpoint and a classifier's radius (``best_radius``), not this one.
    Whole sections beat random patches here: objects cut by a patch border bias the choice.
    The embeddings must be predicted as inference will (with test-time augmentation if
    ``settings.tta``): the radius fits the embeddings it is measured on.
    When no radius scores above 0 (nothing held out is recovered at all), the radius is
    delta_d, as without scored images.
    Returns {} when the images have no label 0 (dense labels: no background), else
    {background_embedding, background_radius[, background_radius_val_score]}.
    """
    flat = np.concatenate([e.reshape(e.shape[0], -1) for e in embeddings], axis=1).T
    is_bg = np.concatenate([lab.reshape(-1) == 0 for lab in labels])
    bg = torch.from_numpy(flat[is_bg])
    if len(bg) == 0:
        return {}
    background = [float(v) for v in losses.embedding_mode(bg, delta_d)]
    score = _scorer(embeddings, labels, delta_d, objects)
    if score is None:
        return {"background_embedding": background, "background_radius": delta_d}
    if objects is not None:
        # Held-out objects see neither the unannotated objects that a large radius swallows
        # nor the false segments that a small one leaves when they reach beyond the objects'
        # neighbourhoods, and a few objects make a noisy curve: on fully labeled sections
        # that sparse runs never saw, every rule that let them choose this radius (the
        # largest within tolerance, capped at delta_d or not, the plateau's middle, the
        # best score) failed badly on some seed, while delta_d, halfway between the
        # background and where objects are pushed to, stayed within 0.13 of the sections'
        # best radius on eleven of twelve runs (benchmarks/RESULTS.md, transfer;
        # benchmarks/radius_rule.py).
        return {"background_embedding": background, "background_radius": delta_d,
                "background_radius_val_score": score(settings.with_background(background, delta_d))}
    grid = radius_grid(delta_v, delta_d)
    scores = [score(settings.with_background(background, float(r))) for r in grid]
    if max(scores) <= 0:
        # Nothing held out is recovered at any radius: the scores cannot choose.
        return {"background_embedding": background, "background_radius": delta_d,
                "background_radius_val_score": 0.0}
    radius, best = choose_radius(grid, scores, False, prefer_larger=False)
    return {"background_embedding": background, "background_radius": radius,
            "background_radius_val_score": best}


def radius_grid(delta_v: float, delta_d: float) -> np.ndarray:
    """The background radii the calibration searches: delta_v to 2*delta_d + delta_v
    (objects are pushed 2*delta_d from the background), in RADIUS_STEP steps."""
    return np.arange(delta_v, 2 * delta_d + delta_v + 1e-9, RADIUS_STEP)


def score_without_background(embeddings, labels, delta_d: float, settings: InferenceSettings,
                             objects=None) -> dict:
    """For tissue where every voxel belongs to an object (`train --no-background`): no
    background rule to calibrate, only the held-out score (as in ``calibrate_background``)
    of the segmentation without one. {} when no image has an annotated object."""
    score = _scorer(embeddings, labels, delta_d, objects)
    return {} if score is None else {"background_radius_val_score": score(settings.with_background(None, None))}


def _scorer(embeddings, labels, delta_d: float, objects=None):
    """settings -> held-out score of the images with annotated objects (an empty one
    rewards deleting everything, so it cannot score); None when there are none."""
    scored = [k for k, lab in enumerate(labels) if lab.any()]
    if not scored:
        return None
    embs, labs = [embeddings[k] for k in scored], [labels[k] for k in scored]
    objs = None if objects is None else [objects[k] for k in scored]
    return lambda settings: held_out_score(embs, labs, delta_d, settings, objects=objs)


def embed(net, images, device, amp: bool, tta: bool) -> list[np.ndarray]:
    """Embeddings of held-out images (normalised raw, labels), predicted as inference would."""
    return [inference.predict_embeddings(net, raw, device=device, amp=amp, tta=tta) for raw, _ in images]


def classifier_radii(settings: InferenceSettings, delta_d: float) -> list:
    """Background radii to choose from together with a foreground classifier
    (spoco_vol.foreground says why): 0, where the classifier alone decides, up to the
    radius calibrated for the embeddings alone (``settings``), in the calibration's steps."""
    if settings.background_embedding is None:
        return [settings.background_radius]
    stored = settings.background_radius if settings.background_radius is not None else delta_d
    return [float(r) for r in np.arange(0.0, stored + 1e-9, RADIUS_STEP)]


def best_radius(embeddings, labels, delta_d: float, settings: InferenceSettings, probabilities,
                objects=None) -> tuple:
    """(held-out score, radius) of the best of ``classifier_radii`` for held-out images
    (embeddings, labels; ``objects``: one held-out object per image, as in
    spoco_vol.validation) segmented with a classifier's ``probabilities``; ties go to
    the larger radius, the nearer to the embeddings' own."""
    radii = classifier_radii(settings, delta_d)
    scores = [held_out_score(embeddings, labels, delta_d, settings.with_background(settings.background_embedding, r),
                             probabilities, objects) for r in radii]
    radius, score = choose_radius(radii, scores, objects is not None)
    return score, radius


def calibrate_size_floor(model: Checkpoint, images, device, amp: bool, embeddings=None,
                         probabilities=None, objects=None) -> Checkpoint:
    """``model`` with its size floor (``min_size``) chosen on held-out images
    (spoco_vol.validation.choose_size_floor), segmented as inference will: with its
    background rule, its foreground classifier if it has one, and test-time augmentation
    if calibrated with it. ``embeddings`` and the classifier's ``probabilities``: one per
    image of ``images``, if already predicted; ``objects``: with sparse labels, the
    held-out object of each image (its window), else the images' labels are dense.

    The floor training derives from the annotated object sizes (the base, kept as
    ``min_size_base`` so that a recalibration starts from it again) removes specks; the
    slivers a watershed cuts along object borders are larger, and only held-out labels
    tell how large before true objects go too."""
    found = segment_at_base_floor(model, images, device, amp, embeddings, probabilities, objects)
    if found is None:
        return model
    segmentations, labels, base, objects = found
    floor, f1 = choose_size_floor(segmentations, labels, base, objects)
    return model.with_inference(min_size=floor, min_size_base=base, min_size_val_f1=round(f1, 4))


def segment_at_base_floor(model: Checkpoint, images, device, amp: bool, embeddings=None, probabilities=None,
                          objects=None):
    """(segmentations, labels, base floor, objects) of the images of ``images`` that have
    objects, segmented as ``calibrate_size_floor`` scores them (at the training's base
    floor, which the floors tried are multiples of), with their held-out ``objects`` if
    given (else None); None when no image has an object."""
    scored = [k for k, (_, lab) in enumerate(images) if lab.any()]
    if not scored:
        return None
    tta = model.inference.tta
    if embeddings is None:
        embeddings = embed(model.network().to(device), [images[k] for k in scored], device, amp, tta)
    else:
        embeddings = [embeddings[k] for k in scored]
    if not model.has_foreground:
        probabilities = [None] * len(scored)
    elif probabilities is None:
        classifier = model.foreground_network().to(device)
        probabilities = [predict_foreground(classifier, images[k][0], device=device, amp=amp, tta=tta)
                         for k in scored]
    else:
        probabilities = [probabilities[k] for k in scored]
    base = max(1, int(model.inference_record.get("min_size_base", model.inference.min_size)))
    settings = dataclasses.replace(model.inference, min_size=base)
    segmentations = [held_out_segmentation(e, model.delta_d, settings, p) for e, p in zip(embeddings, probabilities)]
    return (segmentations, [images[k][1] for k in scored], base,
            None if objects is None else [objects[k] for k in scored])


def held_out_sections(model: Checkpoint, raw: str, labels: str, z_range=None, out: str = "",
                      intensity_range=None):
    """The labeled held-out images of ``raw``/``labels`` on ``model``'s grid (whole
    sections, or a central crop of a 3D volume), as training validates; ``intensity_range``:
    the raw values that map to the model's range (--intensity-range) [default: by dtype]."""
    from .training_data import validation_images
    vol = data.open_training_volume(raw, labels)
    vol.intensity = intensity.volume_mapping(vol.raw, model.normalization, intensity_range, f"raw {raw}")
    if model.dims > vol.spatial_ndim:
        raise SpocoInputError(f"the model is {model.dims}D but {raw} is {vol.spatial_ndim}D")
    if vol.channels != model.in_channels:
        raise SpocoInputError(f"the model expects {model.in_channels} channel(s); {raw} has {vol.channels}")
    if z_range is not None:
        nz = vol.shape3d[0]
        if len(z_range) != 2 or not 0 <= z_range[0] < z_range[1] <= nz or vol.spatial_ndim != 3:
            raise SpocoInputError(f"--z-range needs START,STOP with 0 <= START < STOP <= {nz} on a 3D volume")
        z_range = (int(z_range[0]), int(z_range[1]))
    vol.z_range = z_range
    dims = model.dims
    cfg = TrainConfig(raw=[raw], labels=[labels], out=out, dims=dims,
                      patch_shape=model.training.get("patch_shape", [256] * dims),
                      downsample=list(model.inference.downsample or (1, 1, 1)))
    images = validation_images([vol], cfg, model.normalization)
    if not any(lab.any() for _, lab in images):
        raise SpocoInputError(f"no annotated object in {labels}")
    return images


def recalibrate_checkpoint(model_path: str, raw: str, labels: str, out: str, *,
                           z_range: tuple[int, int] | None = None, device: str = "auto",
                           amp: bool = True, tta: bool | None = None, intensity_range=None) -> dict:
    """Re-measure a checkpoint's background embedding and radius on labeled held-out data
    (whole sections, as at the end of training) and save it as ``out``. ``tta``: measure
    (and later segment) with test-time augmentation [default: as the checkpoint does].
    A foreground classifier's radius is chosen again too: it was chosen around the old
    background embedding; and then the size floor (``calibrate_size_floor``)."""
    model = checkpoint.load(bundled.model_path(model_path))
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise SpocoInputError(f"cannot write the calibrated checkpoint to {out}")
    images = held_out_sections(model, raw, labels, z_range, out, intensity_range)
    dev = resolve_device(device)
    net = model.network().to(dev)
    tta = model.inference.uses_tta(tta)
    embeddings = embed(net, images, dev, amp, tta)
    own = model.settings(with_classifier=False)
    found = calibrate_background(embeddings, [lab for _, lab in images], model.delta_v, model.delta_d, own)
    model = model.with_inference(**found, tta=tta)
    shown = {k: v for k, v in model.inference_record.items() if k != "background_embedding"}
    # The classifier's radius and the size floor are scored on the images with objects.
    scored = [k for k, (_, lab) in enumerate(images) if lab.any()]
    held, held_embeddings = [images[k] for k in scored], [embeddings[k] for k in scored]
    probabilities = None
    if model.has_foreground:
        classifier = model.foreground_network().to(dev)
        probabilities = [predict_foreground(classifier, raw, device=dev, amp=amp, tta=tta) for raw, _ in held]
        score, radius = best_radius(held_embeddings, [lab for _, lab in held], model.delta_d,
                                    model.settings(with_classifier=False), probabilities)
        model = model.with_foreground_radius(radius)
        shown.update({"foreground_background_radius": radius, "foreground_val_score": round(score, 4)})
    model = calibrate_size_floor(model, held, dev, amp, held_embeddings, probabilities)
    shown.update({k: model.inference_record[k] for k in SIZE_FLOOR_KEYS})
    checkpoint.save(model.for_inference(), out)
    return shown
