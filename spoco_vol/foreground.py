"""Foreground classification from sparse annotations: does a pixel belong to any object?

Why a second network: trained on a fraction of the objects, the embeddings cannot tell
an object-like background structure (in EM: dark spaces between cells)
from an unannotated object. Both form tight clusters far from the background embedding,
and the Mutex Watershed returns both as objects; on VNC with 10% of the objects most
false objects are of this kind (benchmarks/RESULTS.md). A small U-Net trained
positive-unlabeled (losses.PositiveUnlabeledLoss) on the same annotations makes the
object/background call from appearance. The annotated pixels are its positives; the
share of objects among the unlabeled pixels (the prior) follows from the annotated area
and the annotated fraction of the objects.

At inference a pixel is background if its embedding lies within the background radius
OR the classifier calls it background. The rule is per pixel, so blocks agree at faces.
The radius is chosen again together with the classifier (``classifier_radii``): the
embeddings' own radius, calibrated without it, deletes the unannotated objects whose
embeddings lie near the background's; with the classifier removing the background, a
smaller radius keeps them.

The classifier lives in the SPOCO checkpoint, under ``ckpt["foreground"]``. It is
trained after the embeddings (`spoco-vol train --foreground-iterations N`, or
`spoco-vol train-foreground` for a model trained before). Its iteration and radius are
chosen by the AP@0.5 of the held-out sections, and it is kept only if it raises that AP.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from scipy.special import expit

from . import losses, model as model_mod
from .errors import SpocoInputError
from .inference import autocast_context, autocast_dtype, predict_embeddings, resolve_device
from .validation import RADIUS_TOLERANCE, choose_radius

THRESHOLD = 0.5  # nnPU's decision boundary; the sigmoid outputs are nearly all near 0 or 1


def unlabeled_object_share(annotated_voxels: int, voxels: int, object_fraction: float) -> float:
    """Share of the unlabeled voxels that belong to unannotated objects, when a known
    fraction of the objects is annotated: all objects then cover about
    annotated / fraction voxels."""
    if not 0 < object_fraction < 1:
        raise SpocoInputError(f"the annotated fraction of the objects must be in (0, 1), got {object_fraction}")
    if voxels <= 0 or annotated_voxels <= 0:
        raise SpocoInputError("no annotated voxels: cannot estimate the object share of the unlabeled ones")
    a = annotated_voxels / voxels
    share = (a / object_fraction - a) / (1 - a)
    if not 0 < share < 1:
        raise SpocoInputError(f"annotated area / object fraction ({a / object_fraction:.2f} of the volume) "
                              "is not below 1: give --foreground-prior instead")
    return float(share)


PRIOR_PATCHES = 16  # random training patches segmented to estimate the prior


def estimate_prior(ckpt: dict, train_vols, cfg, device: torch.device) -> float:
    """The share of the unlabeled pixels that belong to objects, as the trained
    embeddings see it, when no annotated fraction says it (a volume that came sparsely
    annotated): the share of unlabeled pixels of random training patches that its
    segmentation (with its background rule and TTA setting) assigns to an object. Its
    false objects make this an overestimate, which leaves the classifier lenient."""
    from . import data, transforms
    from .training import held_out_segmentation
    net = model_mod.model_from_checkpoint(ckpt).to(device)
    tta = model_mod.uses_tta(ckpt)
    sampler = data.PatchSampler(train_vols, cfg.patch_shape, cfg.dims, list(cfg.downsample),
                                rng=np.random.default_rng(cfg.seed + 30_000))
    objects = unlabeled = 0
    for _ in range(PRIOR_PATCHES):
        raw, lab = sampler.sample(around_object=False)
        emb = predict_embeddings(net, transforms.normalize(raw, ckpt["normalization"]), device=device,
                                 amp=cfg.amp, tta=tta)
        seg = held_out_segmentation(emb, ckpt["delta_d"], segmentation_settings(ckpt))
        objects += int(((seg > 0) & (lab == 0)).sum())
        unlabeled += int((lab == 0).sum())
    return float(np.clip(objects / max(unlabeled, 1), 0.01, 0.5))


def classifier_from_checkpoint(ckpt: dict):
    """The foreground U-Net stored in a checkpoint (eval mode), or None."""
    fg = ckpt.get("foreground")
    if not fg:
        return None
    try:
        net = model_mod.build_model(fg["architecture"])
        net.load_state_dict(fg["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpocoInputError(f"the checkpoint's foreground classifier is invalid: {first}") from None
    arch = ckpt["architecture"]
    # The same depth and pooling as the embedding model: its halo (blockwise) covers both.
    if net.embedding_dim != 1 or net.dims != arch["dims"] or list(net.config["features"]) != list(arch["features"]) \
            or net.config["pool_factors"] != [list(p) for p in arch["pool_factors"]]:
        raise SpocoInputError("the checkpoint's foreground classifier does not fit its embedding model "
                              "(it needs one output channel and the model's features and pooling)")
    return net.eval()


def classifier_radii(inference: dict, delta_d: float) -> list:
    """Background radii to choose from together with the classifier (the module
    docstring says why): 0, where the classifier alone decides, up to the radius
    calibrated for the embeddings alone, in the calibration's steps."""
    if inference.get("background_embedding") is None:
        return [inference.get("background_radius")]
    stored = inference.get("background_radius", delta_d)
    return [float(r) for r in np.arange(0.0, stored + 1e-9, 0.25)]


def best_radius(embeddings, labels, delta_d: float, inference: dict, probabilities, objects=None) -> tuple:
    """(held-out score, radius) of the best of ``classifier_radii`` for held-out images
    (embeddings, labels; ``objects``: one held-out object per image, as in
    spoco_vol.validation) segmented with a classifier's ``probabilities``; ties go to
    the larger radius, the nearer to the embeddings' own."""
    from .training import held_out_score
    radii = classifier_radii(inference, delta_d)
    scores = [held_out_score(embeddings, labels, delta_d, {**inference, "background_radius": r}, probabilities,
                             objects) for r in radii]
    radius, score = choose_radius(radii, scores, objects is not None)
    return score, radius


def segmentation_settings(ckpt: dict) -> dict:
    """The checkpoint's inference settings as segmentation applies them: with a
    foreground classifier, the background radius chosen together with it."""
    inf = dict(ckpt.get("inference", {}))
    fg = ckpt.get("foreground") or {}
    if fg.get("background_radius") is not None:
        inf["background_radius"] = fg["background_radius"]
    return inf


def predict_foreground(net, image: np.ndarray, *, device: torch.device, amp: bool = True,
                       tta: bool = False) -> np.ndarray:
    """Object probability (float32, shape of ``image``) of a normalised image; ``tta``:
    the mean logit of the 8 rotated/flipped predictions, as for the embeddings."""
    return expit(predict_embeddings(net, image, device=device, amp=amp, tta=tta)[0]).astype(np.float32)


def train_classifier(ckpt: dict, cfg, train_vols, val_images, prior: float, *, iterations: int,
                     device: torch.device, progress: bool = False, val_objects=None) -> dict:
    """Train the foreground U-Net positive-unlabeled on ``train_vols`` (their SPOCO@p
    subset already chosen) and choose its iteration on ``val_images`` (normalised raw,
    full labels), segmented with ``ckpt``'s embeddings and background rule.

    Returns {"foreground": the checkpoint entry, or None when no iteration beats the
    embeddings alone on the held-out images (or there are none to judge by), ...figures}.
    """
    from . import data
    from .training import _augmented_batch, _to_batch, held_out_score  # as the embeddings' training
    keep = [k for k, (_, lab) in enumerate(val_images) if lab.any()]
    scored = [val_images[k] for k in keep]
    objects = None if val_objects is None else [val_objects[k] for k in keep]
    if not scored:
        return {"foreground": None, "reason": "no labeled held-out sections to judge it by"}
    t0 = time.perf_counter()
    spoco = model_mod.model_from_checkpoint(ckpt).to(device)
    inf = ckpt.get("inference", {})
    tta = model_mod.uses_tta(ckpt)  # both networks are judged as inference will run them
    embeddings = [predict_embeddings(spoco, raw, device=device, amp=cfg.amp, tta=tta) for raw, _ in scored]
    labels = [lab for _, lab in scored]
    baseline = held_out_score(embeddings, labels, ckpt["delta_d"], inf, objects=objects)
    # Dense held-out labels see false objects anywhere: the classifier must raise the
    # score. Held-out objects only see their neighbourhoods, not the false objects far
    # from them that the classifier is for: there it must not lower the score.
    margin = 0.0 if objects is None else RADIUS_TOLERANCE

    arch = ckpt["architecture"]
    torch.manual_seed(cfg.seed)
    net = model_mod.UNet(dims=arch["dims"], embedding_dim=1, features=arch["features"], norm=arch["norm"],
                         num_groups=arch.get("num_groups", 8), pool_factors=arch["pool_factors"]).to(device)
    rng = np.random.default_rng(cfg.seed)
    sampler = data.PatchSampler(train_vols, cfg.patch_shape, cfg.dims, list(cfg.downsample), rng=rng)
    loss_fn = losses.PositiveUnlabeledLoss(prior)
    # A higher rate than the embeddings': one output channel, and few iterations before
    # the network starts memorising the annotated objects.
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations, eta_min=1e-5)
    # fp16 autocast (GPUs without bf16) underflows small gradients unless the loss is scaled.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and autocast_dtype(device) == torch.float16)
    every = max(1, iterations // 6)
    best = {"val_score": baseline - margin, "iteration": 0, "state_dict": None}
    history = []
    from tqdm import tqdm
    for it in tqdm(range(1, iterations + 1), disable=not progress, desc="foreground", dynamic_ncols=True):
        net.train()
        raws, labs, _ = _augmented_batch(sampler, cfg, ckpt["normalization"], rng, False)
        with autocast_context(device, cfg.amp):
            logits = net(_to_batch(raws, device))[:, 0]
        loss = loss_fn(logits, torch.from_numpy(labs).to(device))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        if it % every == 0 or it == iterations:
            net.eval()
            probs = [predict_foreground(net, raw, device=device, amp=cfg.amp, tta=tta) for raw, _ in scored]
            ap, radius = best_radius(embeddings, labels, ckpt["delta_d"], inf, probs, objects)
            history.append((it, round(ap, 4), radius))
            # dense: ties keep the embeddings alone, or the earlier classifier; objects: the later one
            if ap > best["val_score"] or (objects is not None and best["state_dict"] is not None
                                          and ap >= best["val_score"]):
                best = {"val_score": ap, "iteration": it, "radius": radius,
                        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}
    out = {"val_score_without": round(baseline, 4), "val_score_history": history,
           "seconds": round(time.perf_counter() - t0, 1), "prior": round(prior, 5)}
    if best["state_dict"] is None:
        return {"foreground": None, "reason": "no iteration raised the held-out score" if objects is None else
                "every iteration lowered the held-out objects' score", **out}
    entry = {"architecture": dict(net.config), "state_dict": best["state_dict"], "prior": float(prior),
             "threshold": THRESHOLD, "iterations": best["iteration"], "val_score": float(best["val_score"]),
             "val_score_without": float(baseline), "background_radius": best["radius"]}
    return {"foreground": entry, "iteration": best["iteration"], "val_score": round(best["val_score"], 4),
            "background_radius": best["radius"], **out}


def add_classifier(model_path: str, raw: list, labels: list, out: str, *, object_fraction: float = 1.0,
                   seed: int = 0, prior: float | None = None, iterations: int = 600, val_sections: int = 1,
                   device: str = "auto", threads: int | None = None, progress: bool = True) -> dict:
    """`spoco-vol train-foreground`: train a classifier for a trained checkpoint on its
    training data (the same SPOCO@p subset: same ``object_fraction`` and ``seed``) and
    write the checkpoint with it to ``out``."""
    from .training import TrainConfig, _prepare_volumes, _validation_images
    ckpt = model_mod.load_checkpoint(model_path)
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise SpocoInputError(f"cannot write the checkpoint to {out}")
    if iterations < 1:
        raise SpocoInputError("--iterations must be at least 1")
    tr, arch = ckpt.get("training", {}), ckpt["architecture"]
    cfg = TrainConfig(raw=list(raw), labels=list(labels), out=out, dims=arch["dims"],
                      patch_shape=tr.get("patch_shape", [256] * arch["dims"]),
                      batch_size=tr.get("batch_size", 4), object_fraction=object_fraction, seed=seed,
                      downsample=ckpt.get("inference", {}).get("downsample", [1, 1, 1]),
                      val_sections=val_sections, device=device)
    if prior is None and object_fraction >= 1:
        raise SpocoInputError("give --object-fraction (< 1) or --foreground-prior: the classifier needs the "
                              "share of objects among the unlabeled pixels")
    train_vols, val_vols, _, _, info = _prepare_volumes(cfg, ckpt["normalization"])
    if prior is None:
        prior = unlabeled_object_share(info["annotated_voxels"], info["voxels"], object_fraction)
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads or os.cpu_count() or 1)
    val = _validation_images(val_vols, cfg, ckpt["normalization"])
    result = train_classifier(ckpt, cfg, train_vols, val, prior, iterations=iterations, device=dev,
                              progress=progress)
    ckpt.pop("training_state", None)
    entry = result.pop("foreground")
    ckpt.pop("foreground", None)
    if entry is not None:
        ckpt["foreground"] = entry
    model_mod.save_checkpoint(ckpt, out)
    return {"foreground_kept": entry is not None, **result}
