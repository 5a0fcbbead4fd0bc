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

With full labels the same classifier is trained supervised (label 0 is background):
the paper's "predicted foreground", which lets full supervision segment without the
ground-truth mask.

The classifier lives in the SPOCO checkpoint (spoco_vol.checkpoint, its ``foreground``
entry). It is trained after the embeddings (`spoco-vol train --foreground-iterations N`, or
`spoco-vol train-foreground` for a model trained before). What is judged and kept is a
moving average of its weights; the check (iteration) and radius are chosen by the AP@0.5
of the held-out sections (or the score of the held-out objects), and it is kept only if
it raises that AP (does not lower that score).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from . import bundled, calibration, checkpoint, data, loop, losses, model as model_mod, transforms
from .checkpoint import Checkpoint
from .config import FOREGROUND_ITERATIONS, TrainConfig
from .errors import SpocoInputError
from .inference import predict_embeddings, predict_foreground, resolve_device
from .training_data import augmented_batch, object_windows, prepare_volumes, validation_images
from .validation import RADIUS_TOLERANCE

LEARNING_RATE = 1e-3  # higher than the embeddings': one output channel, and few iterations before
                      # the network starts memorising the annotated objects
AVERAGE_DECAY = 0.99  # the judged and kept classifier is a moving average of the trained one's weights


def average_decay(step: int, decay: float = AVERAGE_DECAY) -> float:
    """The moving average's decay after the ``step``-th update: min(decay, (1 + step) / (10 + step)),
    the rule of TensorFlow's ExponentialMovingAverage with num_updates. The average spans
    about a tenth of the iterations so far (early checks see the recent weights, not the
    random initialisation) and at most 1 / (1 - decay) iterations.

    Why: at this learning rate the classifier's held-out score jumps between neighbouring
    iterates (0.89 -> 0.33 within 100 iterations on Lucchi 1%), and which iterate a check
    lands on decided test AP@0.5 between 0.65 and 0.90 for the same embeddings
    (benchmarks/RESULTS.md, transfer). The average moves slowly, so the checks judge a
    trend rather than one iterate's noise, and the best of them is less of a draw."""
    return min(decay, (1.0 + step) / (10.0 + step))


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


def estimate_prior(ckpt: Checkpoint, train_vols, cfg: TrainConfig, device: torch.device) -> float:
    """The share of the unlabeled pixels that belong to objects, as the trained
    embeddings see it, when no annotated fraction says it (a volume that came sparsely
    annotated): the share of unlabeled pixels of random training patches that its
    segmentation (with its background rule and TTA setting) assigns to an object. Its
    false objects make this an overestimate, which leaves the classifier lenient."""
    net = ckpt.network().to(device)
    tta = ckpt.inference.uses_tta()
    sampler = data.PatchSampler(train_vols, cfg.patch_shape, cfg.dims, list(cfg.downsample),
                                rng=np.random.default_rng(cfg.seed + 30_000))
    objects = unlabeled = 0
    for _ in range(PRIOR_PATCHES):
        raw, lab = sampler.sample(around_object=False)
        emb = predict_embeddings(net, transforms.normalize(raw, ckpt.normalization), device=device,
                                 amp=cfg.amp, tta=tta)
        seg = calibration.held_out_segmentation(emb, ckpt.delta_d, ckpt.inference)
        objects += int(((seg > 0) & (lab == 0)).sum())
        unlabeled += int((lab == 0).sum())
    return float(np.clip(objects / max(unlabeled, 1), 0.01, 0.5))


class SupervisedForegroundLoss(torch.nn.Module):
    """Full labels: every pixel's class is known (label > 0 object, 0 background), so the
    classifier learns it with the logistic loss (the paper's "predicted foreground")."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), (labels > 0).float())


def train_classifier(ckpt: Checkpoint, cfg: TrainConfig, train_vols, val_images, prior: float | None, *,
                     iterations: int, device: torch.device, progress: bool = False, val_objects=None) -> dict:
    """Train the foreground U-Net on ``train_vols`` (their SPOCO@p subset already
    chosen): positive-unlabeled with the object share ``prior`` of the unlabeled pixels
    (sparse labels), or supervised (``prior`` None: full labels, label 0 is background).
    Checks judge (and keep) a moving average of its weights (``average_decay``).
    Its iteration is chosen on ``val_images`` (normalised raw, labels; ``val_objects``:
    one held-out object per image), segmented with ``ckpt``'s embeddings and background rule.

    Returns {"foreground": the checkpoint entry, or None when no iteration beats the
    embeddings alone on the held-out images (or there are none to judge by), ...figures}.
    """
    keep = [k for k, (_, lab) in enumerate(val_images) if lab.any()]
    scored = [val_images[k] for k in keep]
    objects = None if val_objects is None else [val_objects[k] for k in keep]
    if not scored:
        return {"foreground": None, "reason": "no labeled held-out sections to judge it by"}
    t0 = time.perf_counter()
    own = ckpt.settings(with_classifier=False)
    tta = own.uses_tta()  # both networks are judged as inference will run them
    embeddings = calibration.embed(ckpt.network().to(device), scored, device, cfg.amp, tta)
    labels = [lab for _, lab in scored]
    baseline = calibration.held_out_score(embeddings, labels, ckpt.delta_d, own, objects=objects)
    # Dense held-out labels see false objects anywhere: the classifier must raise the
    # score. Held-out objects only see their neighbourhoods, not the false objects far
    # from them that the classifier is for: there it must not lower the score.
    margin = 0.0 if objects is None else RADIUS_TOLERANCE

    arch = ckpt.architecture
    torch.manual_seed(cfg.seed)
    net = model_mod.UNet(dims=arch["dims"], in_channels=ckpt.in_channels, embedding_dim=1,
                         features=arch["features"], norm=arch["norm"],
                         num_groups=arch.get("num_groups", 8), pool_factors=arch["pool_factors"]).to(device)
    rng = np.random.default_rng(cfg.seed)
    sampler = data.PatchSampler(train_vols, cfg.patch_shape, cfg.dims, list(cfg.downsample), rng=rng)
    loss_fn = SupervisedForegroundLoss() if prior is None else losses.PositiveUnlabeledLoss(prior)
    optim = loop.Optimization(net, lr=LEARNING_RATE, weight_decay=cfg.weight_decay, schedule="cosine",
                              iterations=iterations, device=device, amp=cfg.amp)
    averaged = losses.make_momentum_network(net)
    best = {"val_score": baseline - margin, "iteration": 0, "weights": None}
    history = []

    def step(it: int, due: bool) -> dict:
        nonlocal best
        net.train()
        raws, labs, _ = augmented_batch(sampler, cfg, ckpt.normalization, rng, False)
        logits = loop.forward(net, loop.to_batch(raws, device, ckpt.in_channels), device, cfg.amp)[:, 0]
        loss = loss_fn(logits, torch.from_numpy(labs).to(device))
        optim.step(loss)
        losses.update_momentum_network(net, averaged, average_decay(it))
        if due:
            averaged.eval()
            probs = [predict_foreground(averaged, raw, device=device, amp=cfg.amp, tta=tta) for raw, _ in scored]
            score, radius = calibration.best_radius(embeddings, labels, ckpt.delta_d, own, probs, objects)
            history.append((it, round(score, 4), radius))
            if check_replaces_best(score, best["val_score"], best["weights"] is not None, objects is not None):
                best = {"val_score": score, "iteration": it, "radius": radius,
                        "weights": {k: v.detach().cpu().clone() for k, v in averaged.state_dict().items()}}
        return {"foreground": float(loss.detach())}
    loop.run(iterations, step, every=max(1, iterations // 6), progress=progress, desc="foreground")
    out = {"val_score_without": round(baseline, 4), "val_score_history": history,
           "seconds": round(time.perf_counter() - t0, 1), "prior": None if prior is None else round(prior, 5)}
    if best["weights"] is None:
        return {"foreground": None, "reason": "no iteration raised the held-out score" if objects is None else
                "every iteration lowered the held-out objects' score or recovered none of them", **out}
    net.load_state_dict(best["weights"])
    entry = checkpoint.foreground_entry(net, prior=None if prior is None else float(prior),
                                        trained="supervised" if prior is None else "positive-unlabeled",
                                        iterations=best["iteration"],
                                        val_score=float(best["val_score"]), val_score_without=float(baseline),
                                        background_radius=best["radius"])
    return {"foreground": entry, "iteration": best["iteration"], "val_score": round(best["val_score"], 4),
            "background_radius": best["radius"], **out}


def check_replaces_best(score: float, best: float, best_is_a_check: bool, objects_held_out: bool) -> bool:
    """Whether a check of the classifier, held-out score ``score``, replaces the best so far
    (``best``: the embeddings alone, less the tolerance with held-out objects, or an
    earlier check). Dense held-out sections: a higher score; ties keep the embeddings
    alone, or the earlier check. Held-out objects: a score not below the best (ties go to
    the later check), and at least one held-out object recovered: a check that recovers
    none of them (score 0) cannot tell a classifier that keeps objects from one that
    deletes them all. (Fine-tuning 1135's one-crop model on 4 nuclei kept one whose score
    was 0 like the embeddings', and it deleted most nuclei of the test sections:
    benchmarks/RESULTS.md, 3D.)"""
    if not objects_held_out:
        return score > best
    return score > 0 and (score > best or (best_is_a_check and score >= best))


def classifier_prior(ckpt: Checkpoint, cfg: TrainConfig, train_vols, info: dict,
                     device: torch.device) -> tuple[float | None, str]:
    """(prior, where it came from) for the classifier of ``ckpt`` trained on ``train_vols``
    (prepare_volumes' volumes and ``info``): None with full labels (supervised);
    --foreground-prior; the annotated area and --object-fraction; else the embeddings'
    view (a volume that came sparsely annotated: ``estimate_prior``)."""
    if cfg.training_mode == "full":  # the background is annotated: supervised, no prior
        return None, "full labels"
    if cfg.foreground_prior is not None:
        return cfg.foreground_prior, "--foreground-prior"
    if cfg.object_fraction < 1:
        # the held-out objects are unlabeled in training: the annotated fraction shrinks with them
        fraction = cfg.object_fraction * info["objects_used"] / info["objects_annotated"]
        return unlabeled_object_share(info["annotated_voxels"], info["voxels"], fraction), "--object-fraction"
    return estimate_prior(ckpt, train_vols, cfg, device), "the embeddings"


def without_classifier(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` segmenting with its embeddings' own rule, as training had it before the
    classifier: no classifier, and the base size floor if a floor was chosen since."""
    base = ckpt.inference_record.get("min_size_base")
    plain = ckpt.with_foreground(None)
    return plain if base is None else plain.with_inference(min_size=base)


def add_classifier(model_path: str, raw: list, labels: list, out: str, *, object_fraction: float | None = None,
                   seed: int | None = None, foreground_prior: float | None = None,
                   iterations: int = FOREGROUND_ITERATIONS, val_sections: int | None = None,
                   val_objects: float | None = None, device: str = "auto", threads: int | None = None,
                   intensity_range=None, progress: bool = True) -> dict:
    """`spoco-vol train-foreground`: train a classifier for a trained checkpoint on its
    training data and write the checkpoint with it to ``out``.

    The classifier is trained and judged as training would have: on the same SPOCO@p
    subset (``object_fraction`` and ``seed``, by default as the checkpoint records them)
    and, for a run that held out annotated objects, on the same held-out objects (the
    checkpoint's seed and ``val_objects``), which the embeddings never saw. Without
    held-out objects (or with ``val_sections``), the last sections judge it."""
    ckpt = checkpoint.load(bundled.model_path(model_path))
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise SpocoInputError(f"cannot write the checkpoint to {out}")
    if iterations < 1:
        raise SpocoInputError("--iterations must be at least 1")
    tr, dims = ckpt.training, ckpt.dims
    object_fraction = object_fraction if object_fraction is not None else tr.get("object_fraction", 1.0)
    sparse = tr.get("mode", "sparse" if object_fraction < 1 else "full") == "sparse"
    held_out = sparse and val_sections is None and tr.get("objects_held_out", 0) > 0
    if held_out and seed is None and "seed" not in tr:
        raise SpocoInputError("the checkpoint held out annotated objects but does not record the seed that drew "
                              "them: give --seed as given to train (or --val-sections N to judge by sections)")
    cfg = TrainConfig(raw=list(raw), labels=list(labels), out=out, dims=dims,
                      patch_shape=tr.get("patch_shape", [256] * dims), batch_size=tr.get("batch_size", 4),
                      object_fraction=object_fraction, seed=seed if seed is not None else tr.get("seed", 0),
                      mode="sparse" if sparse else "full", foreground_prior=foreground_prior,
                      downsample=list(ckpt.inference.downsample or (1, 1, 1)),
                      val_sections=val_sections,
                      val_objects=val_objects if val_objects is not None else tr.get("val_objects",
                                                                                      TrainConfig.val_objects),
                      intensity_range=intensity_range, device=device)
    if foreground_prior is not None and not sparse:
        raise SpocoInputError("--foreground-prior is for sparse labels: this checkpoint was trained on full labels")
    # Full labels: prepare_volumes holds out what training held out (its default per volume);
    # sparse labels without held-out objects: the sections dense labels would give, per volume.
    train_vols, val_vols, held, _, info = prepare_volumes(cfg, ckpt.normalization, sections_as_dense=not held_out)
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads or os.cpu_count() or 1)
    # As training's tail: the embeddings' own rule at the base size floor (any classifier
    # and the floor chosen with it set aside), the classifier, then the floor again if the
    # rule changed.
    embeddings_only = without_classifier(ckpt)
    prior, prior_from = classifier_prior(embeddings_only, cfg, train_vols, info, dev)
    if held:
        val, objects = object_windows(held, cfg, ckpt.normalization)
    else:
        val, objects = validation_images(val_vols, cfg, ckpt.normalization), None
    result = train_classifier(embeddings_only, cfg, train_vols, val, prior, iterations=iterations, device=dev,
                              progress=progress, val_objects=objects)
    entry = result.pop("foreground")
    model = ckpt  # nothing kept and nothing removed: the segmentation rule, floor included, stays
    if entry is not None or ckpt.has_foreground:
        model = calibration.calibrate_size_floor(embeddings_only.with_foreground(entry), val, dev, cfg.amp,
                                                 objects=objects)
    checkpoint.save(model.for_inference(), out)
    return {"foreground_kept": entry is not None, "prior_from": prior_from,
            "validation": "PQ of held-out objects" if held else "AP@0.5 of held-out sections",
            "objects_held_out": len(held), "sections_held_out": sum(v.z_range[1] - v.z_range[0] for v in val_vols
                                                                   if v.z_range is not None),
            "size_floor": model.inference_record.get("min_size"), **result}
