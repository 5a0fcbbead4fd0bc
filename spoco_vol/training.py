"""SPOCO training from sparse (or full) object annotations in zarr volumes.

``train(config)`` validates every input before it writes anything, then runs Adam on
random patches with the SPOCO loss, a momentum copy g of the network for the
consistency term, periodic validation, and best/latest checkpoints. ``latest.pt`` holds
the complete training state (optimizer, scheduler, g, iteration, every RNG), so
``resume=True`` continues a stopped run exactly where it stopped.

The settings are spoco_vol.config's TrainConfig; the data, the validation split and the
batches come from spoco_vol.training_data; the background rule is measured by
spoco_vol.calibration; the loop itself is spoco_vol.loop's, shared with the foreground
classifier (spoco_vol.foreground, trained after the embeddings with
``foreground_iterations``).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import time

import numpy as np
import torch

from . import bundled, calibration, checkpoint, data, intensity, loop, losses, model as model_mod, validation
from .affinities import default_offsets
from .checkpoint import InferenceSettings
from .config import TrainConfig
from .errors import SpocoInputError
from .inference import resolve_device
from .training_data import (augmented_batch, model_voxel_size, object_windows, prepare_volumes, training_downsample,
                            validation_images, validation_patches)

LOG_TERMS = ("total", "pull", "push", "reg", "instance", "unlabeled", "consistency", "background", "adversarial")
SCORE = "background_radius_val_score"  # the held-out score a calibration returns


def stopped_before_first_checkpoint(out: str) -> bool:
    """Whether ``out`` holds a run that stopped before it wrote latest.pt (its first
    checkpoint comes with the first validation): nothing finished to resume from."""
    def has(name):
        return os.path.exists(os.path.join(out, name))
    return has("log.csv") and not has("latest.pt") and not has("summary.json")


def _check_out_dir(cfg: TrainConfig):
    if cfg.resume:
        if os.path.isfile(os.path.join(cfg.out, "latest.pt")):
            return
        if not stopped_before_first_checkpoint(cfg.out):
            raise SpocoInputError(f"--resume: no latest.pt in {cfg.out}")
        # Its log rows (and, with --init, the start model as best.pt) are all it left: start over.
        cfg.resume, cfg.overwrite = False, True
        return
    if os.path.exists(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
        raise SpocoInputError(f"output directory {cfg.out} is not empty (use --overwrite or --resume)")


def _validation_loss(net, loss_fn, patches, device, amp, margins):
    if not patches:
        return None
    net.eval()
    total = 0.0
    with torch.no_grad():
        for raw, lab in patches:
            emb = loop.forward(net, loop.to_batch(raw[None], device, net.in_channels), device, amp)
            t, _ = loss_fn(loop.interior(emb.float(), margins), loop.interior(torch.from_numpy(lab[None]), margins)
                           .to(device))
            total += float(t)
    net.train()
    return total / len(patches)


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


def training_offsets(cfg: TrainConfig, init_ckpt: checkpoint.Checkpoint | None) -> list | None:
    """The affinity offsets the new model is validated and segmented with: --offset-distances,
    else the --init model's (a fine-tuned model keeps its parent's halo and the object sizes
    its offsets were chosen for), else None (the default 3, 9, 27 per axis)."""
    if cfg.offset_distances is not None:
        return default_offsets(cfg.dims, cfg.offset_distances)
    if init_ckpt is not None and init_ckpt.inference_record.get("offsets"):
        return [list(o) for o in init_ckpt.inference_record["offsets"]]
    return None


def train(cfg: TrainConfig) -> dict:
    """Train (or fine-tune, or resume) a SPOCO model; returns a summary dict."""
    cfg.check()
    init_ckpt = checkpoint.load(bundled.model_path(cfg.init)) if cfg.init else None
    _check_out_dir(cfg)
    train_vols, val_vols, held, normalization, info = prepare_volumes(
        cfg, None if init_ckpt is None else init_ckpt.normalization)
    channels = info["channels"]
    if init_ckpt is not None and (init_ckpt.dims != cfg.dims or init_ckpt.in_channels != channels):
        raise SpocoInputError(f"--init model is {init_ckpt.dims}D with {init_ckpt.in_channels} input "
                              f"channel(s); this run needs {cfg.dims}D with {channels}")
    if init_ckpt is not None:
        n = init_ckpt.normalization  # keep the representation's input scale
        normalization = {"input_dtype": intensity.model_dtype(n), "input_range": list(intensity.model_range(n)), **n}
    cfg = dataclasses.replace(cfg, downsample=training_downsample(cfg, init_ckpt, train_vols))
    fine_tuned_from = None if init_ckpt is None else {
        "model": cfg.init, "sha256": init_ckpt.sha256, "training_data": init_ckpt.training_data,
        "training_command": init_ckpt.training_command,
        "fine_tuned_from": init_ckpt.training.get("fine_tuned_from")}
    ds = list(cfg.downsample)
    offsets = training_offsets(cfg, init_ckpt)
    # Specks below a quarter of the smallest annotated objects (1st percentile) are noise.
    # This is the base floor; the final one is chosen at the end on the held-out sections
    # or objects (calibration.calibrate_size_floor).
    min_size = max(1, int(info["object_size_p1"] / float(np.prod(ds)) / 4))
    settings = InferenceSettings.new(cfg.dims, offsets=offsets, min_size=min_size, tta=cfg.tta, downsample=ds)
    rng = np.random.default_rng(cfg.seed)
    margins = cfg.margins()
    sampler = data.PatchSampler(train_vols, cfg.patch_shape, cfg.dims, ds, rng=rng, margin=margins)
    val_patches = validation_patches(val_vols, cfg, normalization, cfg.seed)
    # Checkpoints are chosen by a held-out score (spoco_vol.validation): AP@0.5 of whole
    # labeled sections, or with sparse labels the recovery of held-out objects. The
    # validation loss cannot choose in the sparse setting: it is blind to the unlabeled
    # background, where a sparsely trained model makes its errors (false fragments).
    if held:
        val_images, val_objects = object_windows(held, cfg, normalization)
    else:
        val_images, val_objects = validation_images(val_vols, cfg, normalization), None
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
        net = init_ckpt.network()
        if cfg.network_dropout:  # dropout layers have no weights: the same state loads into them
            net = model_mod.UNet(**{**init_ckpt.architecture, "dropout": cfg.network_dropout})
            net.load_state_dict(init_ckpt.state_dict)
    else:
        net = model_mod.UNet(dims=cfg.dims, in_channels=channels, embedding_dim=cfg.embedding_dim,
                             features=cfg.features, norm=cfg.norm, pool_factors=cfg.pools(),
                             dropout=cfg.network_dropout)
    mult = net.shape_multiple
    if any(p % m for p, m in zip(cfg.patch_shape, mult)):
        raise SpocoInputError(f"--patch-shape {tuple(cfg.patch_shape)} must be a multiple of {mult}")
    net.to(device).train()
    mode = cfg.training_mode
    use_g = cfg.uses_teacher
    weights = cfg.loss_weights
    loss_fn = losses.SpocoLoss(mode=mode, delta_v=cfg.delta_v, delta_d=cfg.delta_d, threshold=cfg.threshold,
                               background_radius=cfg.background_select_radius, **weights)
    val_loss_fn = losses.SpocoLoss(mode=mode, delta_v=cfg.delta_v, delta_d=cfg.delta_d, threshold=cfg.threshold,
                                   **{**weights, "consistency_weight": 0, "background_weight": 0})

    def optimization(network):
        return loop.Optimization(network, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                 schedule=cfg.schedule, iterations=cfg.iterations, device=device, amp=cfg.amp)
    optim = optimization(net)

    def build_g():  # a separately trained g: f's architecture, its own seeded initialisation
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed + 1)
            return model_mod.UNet(**net.config).to(device).train()
    teacher = None if not use_g else losses.ConsistencyTeacher(
        cfg.consistency_network, net, cfg.momentum, build=build_g, optimizer=optimization, loss=val_loss_fn,
        ramp=cfg.momentum_ramp)
    adversary = None
    if cfg.adversarial_weight > 0 and cfg.loss == "spoco":
        from .adversarial import AdversarialTerm
        with torch.random.fork_rng():  # the critic's initialisation leaves the training's random stream alone
            torch.manual_seed(cfg.seed + 2)
            adversary = AdversarialTerm(cfg.dims, cfg.adversarial_weight, device)

    # best_score: the held-out score when there are held-out images, else minus the
    # validation loss; higher is better.
    # start_score: with --init, the start model's held-out score (None: not judged).
    state = {"start": 0, "best_score": -float("inf"), "best_it": 0, "elapsed": 0.0, "start_score": None}
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.overwrite and not cfg.resume:
        for f in ("latest.pt", "best.pt", "log.csv", "loss.png", "summary.json"):
            if os.path.exists(os.path.join(cfg.out, f)):
                os.remove(os.path.join(cfg.out, f))
    log_path = os.path.join(cfg.out, "log.csv")
    if cfg.resume:
        st = checkpoint.load(os.path.join(cfg.out, "latest.pt"))
        ts, saved = st.training_state, st.training
        if ts is None or st.architecture != net.config or saved.get("mode") != mode \
                or list(saved.get("patch_shape", [])) != list(cfg.patch_shape) \
                or saved.get("batch_size") != cfg.batch_size \
                or list(saved.get("loss_margin", [0] * cfg.dims)) != margins \
                or bool(saved.get("no_background")) != cfg.no_background \
                or bool(saved.get("momentum_ramp")) != bool(use_g and cfg.momentum_ramp):
            raise SpocoInputError(f"--resume: {cfg.out}/latest.pt was written by a different configuration "
                                  "(architecture, mode, patch shape, loss margin, --no-background, --momentum-ramp "
                                  "or batch size); "
                                  "rerun with those options")
        net.load_state_dict(st.state_dict)
        if teacher is not None and teacher.keeps_a_network:
            teacher.g.load_state_dict(ts["momentum_state"])
            if ts.get("teacher_optimizer"):
                teacher.optimizer.load_state_dict(ts["teacher_optimizer"])
        optim.load_state_dict(ts)
        if adversary is not None:
            adversary.load_state_dict(ts["adversary"])
        _restore_rng(ts["rng"], rng, gen)
        state.update(start=ts["iteration"], elapsed=ts["elapsed"], best_it=ts.get("best_iteration", 0),
                     best_score=ts.get("best_score", -ts.get("best_val", float("inf"))),
                     start_score=ts.get("start_score"))
        _truncate_log(log_path, state["start"])

    def make(it: int, with_state: bool, background=None, val=None) -> checkpoint.Checkpoint:
        training = {"iterations": it, "mode": mode, "loss": cfg.loss, "object_fraction": cfg.object_fraction,
                    **({"consistency_network": cfg.consistency_network} if use_g else {}),
                    **({"momentum_ramp": True} if use_g and cfg.momentum_ramp else {}),
                    "objects_used": info["objects_used"], "objects_total": info["objects_total"],
                    "objects_annotated": info["objects_annotated"], "objects_held_out": info["objects_held_out"],
                    "validation": score_kind, "seed": cfg.seed,  # train-foreground draws the same objects
                    **({"val_objects": cfg.val_objects} if info["objects_held_out"] else {}),
                    "seconds": round(state["elapsed"], 1), "downsample": ds,
                    "patch_shape": list(cfg.patch_shape), "batch_size": cfg.batch_size,
                    **({"no_background": True} if cfg.no_background else {}),
                    **({"loss_margin": margins} if any(margins) else {}), "fine_tuned_from": fine_tuned_from,
                    **(val or {})}
        inference = {"downsample": ds, "min_size": min_size, "tta": cfg.tta,
                     **({"offsets": offsets} if offsets else {}), **(background or {})}
        training_state = None if not with_state else {
            "iteration": it, "best_score": state["best_score"], "best_iteration": state["best_it"],
            "start_score": state["start_score"], "elapsed": state["elapsed"], **optim.state_dict(),
            "momentum_state": teacher.g.state_dict() if teacher is not None and teacher.keeps_a_network else {},
            **({"teacher_optimizer": teacher.optimizer.state_dict()}
               if teacher is not None and teacher.variant == "separate" else {}),
            **({"adversary": adversary.state_dict()} if adversary is not None else {}),
            "rng": _rng_state(rng, gen)}
        return checkpoint.make_checkpoint(
            net, delta_v=cfg.delta_v, delta_d=cfg.delta_d, normalization=normalization,
            voxel_size=model_voxel_size(cfg, info["voxel_size"]), training_data=", ".join(cfg.raw),
            training_command=cfg.command, inference=inference, training=training, training_state=training_state,
            # g for consistency clustering (latest.pt has it in its training state)
            momentum=teacher.g if teacher is not None and teacher.keeps_a_network and not with_state else None)

    def calibrate_with(network, images, objects, tta: bool) -> dict:
        embeddings = calibration.embed(network, images, device, cfg.amp, tta)
        if cfg.no_background:
            return calibration.score_without_background(embeddings, [lab for _, lab in images], cfg.delta_d,
                                                        settings, objects)
        return calibration.calibrate_background(embeddings, [lab for _, lab in images], cfg.delta_v, cfg.delta_d,
                                                settings, objects)

    def calibrate(network, images, objects=None) -> dict:
        """The background rule (and held-out score) of ``network``. With --tta, measured
        with and without it; the held-out score decides which the checkpoint keeps
        (validation.keeps_tta), and the rule is the one measured on those embeddings."""
        found = calibrate_with(network, images, objects, cfg.tta)
        if cfg.tta:
            plain = calibrate_with(network, images, objects, False)
            with_tta, without = found.get(SCORE), plain.get(SCORE)
            scores = {} if with_tta is None or without is None else \
                {"val_score_with_tta": with_tta, "val_score_without_tta": without}
            found = {**found, "tta": True, **scores} if validation.keeps_tta(with_tta, without) else \
                {**plain, "tta": False, **scores}
        network.train()
        return found

    new_log = not os.path.exists(log_path)
    log_f = open(log_path, "a", newline="")
    writer = csv.writer(log_f)
    if new_log:
        writer.writerow(["iteration", *LOG_TERMS, "lr", "seconds", "val_loss", "val_score"])
    last = {"background": None, "t": time.perf_counter()}

    def step(it: int, due: bool) -> dict:
        raws, labs, graws = augmented_batch(sampler, cfg, normalization, rng, use_g)
        x = loop.to_batch(raws, device, channels)
        y = loop.interior(torch.from_numpy(labs), margins).to(device)

        def forward(network, batch):  # every network's embeddings where the loss sees them
            return loop.interior(loop.forward(network, batch, device, cfg.amp), margins)

        emb = forward(net, x)
        g_emb = None
        if teacher is not None:
            g_emb = teacher.embeddings(forward, loop.to_batch(graws, device, channels))
        loss_fn.weights["background"] = weights["background_weight"] \
            if (mode == "sparse" and it > cfg.background_warmup) else 0.0
        total, terms = loss_fn(emb.float(), y, g_embeddings=g_emb, generator=gen)
        if adversary is not None:
            from .adversarial import instance_masks
            soft, real = instance_masks(emb.float(), y, cfg.delta_v, cfg.threshold, 0 if mode == "sparse" else None)
            adversary.critic_step(soft, real, gen)
            terms["adversarial"] = adversary.embedding_loss(soft)
            total = total + terms["adversarial"]
            terms["adversarial"] = terms["adversarial"].detach()
        optim.step(total)
        if teacher is not None:
            teacher.after_step(forward, x, y, gen, step=it)
        now = time.perf_counter()
        state["elapsed"] += now - last["t"]
        last["t"] = now
        vals = {"total": float(total.detach()), **{k: float(v) for k, v in terms.items()}}
        val_loss, val_score, last["background"] = None, None, None
        if due:
            val_loss = _validation_loss(net, val_loss_fn, val_patches, device, cfg.amp, margins)
            optim.validated(val_loss)
            if val_images:
                last["background"] = calibrate(net, val_images, val_objects)
                val_score = last["background"].get(SCORE)
        writer.writerow([it, *(f"{vals[k]:.6g}" if k in vals else "" for k in LOG_TERMS), f"{optim.lr:.3g}",
                         f"{state['elapsed']:.2f}", "" if val_loss is None else f"{val_loss:.6g}",
                         "" if val_score is None else f"{val_score:.4f}"])
        if due:
            t_save = time.perf_counter()
            score = val_score if val_score is not None else (None if val_loss is None else -val_loss)
            # Without held-out data the newest model is the best one we can name.
            if score is None or score > state["best_score"]:
                state["best_score"] = score if score is not None else state["best_score"]
                state["best_it"] = it
                val = {"val_loss": val_loss, "val_score": val_score,
                       "selected_by": score_kind if val_score is not None else
                       ("validation loss" if val_loss is not None else "newest")}
                checkpoint.save(make(it, False, last["background"], val), os.path.join(cfg.out, "best.pt"))
            log_f.flush()
            checkpoint.save(make(it, True), os.path.join(cfg.out, "latest.pt"))
            last["t"] += time.perf_counter() - t_save  # checkpoint I/O is not training time
        return vals

    if init_ckpt is not None and val_images and state["start"] == 0:
        # The start model is the first candidate: where no fine-tuned checkpoint raises the
        # held-out score (a handful of annotated objects can pull the embeddings together),
        # best.pt stays the model the run started from, calibrated on the same held-out data.
        start_background = calibrate(net, val_images, val_objects)
        if start_background.get(SCORE) is not None:
            state["best_score"] = state["start_score"] = start_background[SCORE]
            val = {"val_loss": None, "val_score": state["best_score"], "selected_by": score_kind}
            checkpoint.save(make(0, False, start_background, val), os.path.join(cfg.out, "best.pt"))
        last["t"] = time.perf_counter()  # judging the start model is not training time
    it, stopping = loop.run(cfg.iterations, step, every=cfg.val_every, start=state["start"], progress=cfg.progress,
                            stop_after=cfg.stop_after)
    if stopping and it % cfg.val_every:  # a checkpoint iteration has just saved it
        log_f.flush()
        checkpoint.save(make(it, True), os.path.join(cfg.out, "latest.pt"))
    log_f.close()
    if stopping:
        return {"stopped_at": it, "iterations": cfg.iterations, "resume_with": "--resume"}

    # Inference needs to know which embeddings mean "background": measure it once per model.
    bg_images = val_images or validation_images(val_vols, cfg, normalization) or \
        validation_patches(train_vols, cfg, normalization, cfg.seed)
    background = last["background"] if last["background"] is not None else calibrate(net, bg_images, val_objects)
    best_path = os.path.join(cfg.out, "best.pt")
    if os.path.exists(best_path) and not val_images:  # else calibrated when it was chosen
        best = checkpoint.load(best_path)
        best_net = best.network().to(device)
        checkpoint.save(best.with_inference(**calibrate(best_net, bg_images)), best_path)
    checkpoint.save(make(cfg.iterations, True, background), os.path.join(cfg.out, "latest.pt"))
    fg_summary = None
    if cfg.foreground_iterations:
        fg_summary = _add_foreground(cfg, best_path, train_vols, val_images, val_objects, info, device)
    floor = None
    if val_images and os.path.exists(best_path):
        # Last, once the segmentation rule (background radius, classifier) is final.
        best = calibration.calibrate_size_floor(checkpoint.load(best_path), val_images, device, cfg.amp,
                                                objects=val_objects)
        checkpoint.save(best, best_path)
        floor = {k: best.inference_record.get(k) for k in calibration.SIZE_FLOOR_KEYS}
    _plot_log(log_path, os.path.join(cfg.out, "loss.png"))
    start, elapsed = state["start"], state["elapsed"]
    summary = {"iterations": cfg.iterations, "seconds": round(elapsed, 1),
               "iterations_per_second": round((cfg.iterations - start) / max(elapsed, 1e-9), 3)
               if cfg.iterations > start else None,
               "best_iteration": state["best_it"],
               **({"start_model_val_score": state["start_score"]} if state["start_score"] is not None else {}),
               "best_val_score": state["best_score"] if val_images and state["best_score"] > -float("inf") else None,
               "validation": score_kind, "downsample": ds,
               "mode": mode, "objects_used": info["objects_used"], "objects_held_out": info["objects_held_out"],
               "objects_total": info["objects_total"],
               "device": str(device)}
    if fg_summary is not None:
        summary["foreground"] = fg_summary
    if floor is not None:
        summary["size_floor"] = floor
    if cfg.tta and os.path.exists(best_path):
        record = checkpoint.load(best_path).inference_record
        summary["tta"] = {"kept": record.get("tta", True), **{k: record[k] for k in (
            "val_score_with_tta", "val_score_without_tta") if k in record}}
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _add_foreground(cfg: TrainConfig, best_path: str, train_vols, val_images, val_objects, info, device) -> dict:
    """Train the foreground classifier for best.pt (its iteration chosen on the held-out
    data best.pt was chosen and calibrated on) and store it in best.pt if it helps
    there. (latest.pt stays as it is: nothing measured that the classifier helps it.)"""
    from . import foreground
    best = checkpoint.load(best_path)
    prior, prior_from = foreground.classifier_prior(best, cfg, train_vols, info, device)
    result = foreground.train_classifier(best, cfg, train_vols, val_images, prior,
                                         iterations=cfg.foreground_iterations, device=device,
                                         progress=cfg.progress, val_objects=val_objects)
    result["prior_from"] = prior_from
    entry = result.pop("foreground")
    if entry is not None:
        checkpoint.save(best.with_foreground(entry), best_path)
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
