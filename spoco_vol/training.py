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

from . import data, losses, model as model_mod, transforms
from .errors import SpocoInputError
from .inference import resolve_device, autocast_context, autocast_dtype

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
    downsample: Sequence[int] = (1, 1, 1)  # input voxels per model pixel, (z, y, x)
    voxel_size: Sequence[float] | None = None
    val_raw: Sequence[str] = ()
    val_labels: Sequence[str] = ()
    val_sections: int = 1                  # without val volumes: hold out the last N sections
    val_every: int = 250
    val_patches: int = 8
    elastic: bool = False
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    tta: bool = False                      # validation/calibration (and later inference) with test-time flips
    foreground_iterations: int = 0         # then a foreground classifier (spoco_vol.foreground), sparse mode
    foreground_prior: float | None = None  # object share of the unlabeled pixels [default: from object_fraction]
    threads: int | None = None
    resume: bool = False
    stop_after: int | None = None          # stop (resumably) after N iterations of this run
    overwrite: bool = False
    progress: bool = True
    command: str = ""


# ----------------------------------------------------------------------------- set-up

def _prepare_volumes(cfg: TrainConfig):
    """Open and check all volumes; split validation; choose the SPOCO@p subset."""
    if len(cfg.raw) != len(cfg.labels) or not cfg.raw:
        raise SpocoInputError("give one --labels for every --raw")
    train_vols = []
    for r, l in zip(cfg.raw, cfg.labels):
        v = data.open_training_volume(r, l, cfg.voxel_size)
        if v.raw.ndim == 2 and cfg.dims == 3:
            raise SpocoInputError(f"a 3D model cannot be trained on the 2D volume {r}")
        train_vols.append(v)
    val_vols = []
    if cfg.val_raw:
        if len(cfg.val_raw) != len(cfg.val_labels):
            raise SpocoInputError("give one --val-labels for every --val-raw")
        val_vols = [data.open_training_volume(r, l, cfg.voxel_size) for r, l in zip(cfg.val_raw, cfg.val_labels)]
        for v in val_vols:
            if v.raw.ndim == 2 and cfg.dims == 3:
                raise SpocoInputError(f"a 3D model cannot be validated on the 2D volume {v.name}")
            data.volume_statistics(v)  # catches NaN/inf before training starts
    elif cfg.val_sections > 0:
        # Hold out the last sections of each 3D volume (thick-section EM: z is the split axis).
        for v in train_vols:
            nz = v.shape3d[0]
            if v.raw.ndim == 3 and nz > cfg.val_sections:
                val_vols.append(dataclasses.replace(v, z_range=(nz - cfg.val_sections, nz)))
                v.z_range = (0, nz - cfg.val_sections)
    # Statistics and the SPOCO@p subset come from the training sections only.
    stats = []
    for v, l in zip(train_vols, cfg.labels):
        s = data.volume_statistics(v)
        if len(s["object_ids"]) == 0:
            raise SpocoInputError(f"labels {l} contain no annotated object (all 0) in the training sections")
        stats.append(s)
    # One normalisation for all volumes, stored in the checkpoint, so that every block of
    # every later volume is normalised the same way (per-block statistics would show seams).
    n = sum(s["object_sizes"].size for s in stats)
    mean = float(np.mean([s["mean"] for s in stats]))
    std = float(np.mean([s["std"] for s in stats]))
    for i, (v, s) in enumerate(zip(train_vols, stats)):
        v.keep_ids = data.choose_object_subset(s["object_ids"], cfg.object_fraction, cfg.seed + i)
    sizes = np.concatenate([s["object_sizes"] for s in stats])
    kept = sum(len(v.keep_ids) if v.keep_ids is not None else len(s["object_ids"])
               for v, s in zip(train_vols, stats))
    annotated = sum(int(s["object_sizes"].sum()) if v.keep_ids is None else
                    int(s["object_sizes"][np.isin(s["object_ids"], v.keep_ids)].sum())
                    for v, s in zip(train_vols, stats))
    vs = train_vols[0].voxel_size
    return train_vols, val_vols, {"mean": mean, "std": std, "kind": "zscore"}, {
        "objects_total": int(n), "objects_used": int(kept),
        "object_size_p1": float(np.percentile(sizes, 1)), "voxel_size": vs,
        "annotated_voxels": annotated, "voxels": sum(s["voxels"] for s in stats)}


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
                raw = np.asarray(v.raw[z] if v.raw.ndim == 3 else v.raw[...], np.float32)[None]
                lab = np.asarray(v.labels[z] if v.labels.ndim == 3 else v.labels[...]).astype(np.int64)[None]
                raw, lab = data.downsample_raw(raw, ds), data.downsample_labels(lab, ds)
                side = int(np.sqrt(max_pixels))
                out.append((transforms.normalize(raw[0, :side, :side], normalization), lab[0, :side, :side]))
                if len(out) >= 8:
                    return out
        else:
            shape = [min(n, c * f) for n, c, f in zip((z1 - z0, *v.shape3d[1:]), (64, 256, 256), ds)]
            start = [z0 + (z1 - z0 - shape[0]) // 2] + [(n - s) // 2 for n, s in zip(v.shape3d[1:], shape[1:])]
            sl = tuple(slice(a, a + s) for a, s in zip(start, shape))
            raw = data.downsample_raw(np.asarray(v.raw[sl], np.float32), ds)
            lab = data.downsample_labels(np.asarray(v.labels[sl]).astype(np.int64), ds)
            out.append((transforms.normalize(raw, normalization), lab))
    return out


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
                         min_size: int = 0, tta: bool = False, embeddings=None) -> dict:
    """The background embedding and the pixel radius around it, for inference.

    The embedding is the mode of the label-0 pixels' embeddings: start at their median,
    then a few mean-shift steps over the pixels within delta_d, so that a minority of
    unannotated objects in the unlabeled region does not pull it off. The radius is the
    one whose segmentation of the held-out images (normalised raw, labels) scores the
    best AP@0.5, searched from delta_v to 2*delta_d + delta_v (objects are pushed 2*delta_d
    from the background). Whole sections beat random patches here: objects cut by a
    patch border bias the choice.
    ``tta``: embed with test-time augmentation (the radius fits the embeddings it is
    measured on, so inference must then use it too).
    ``embeddings``: the images' embeddings, if already predicted (as above).
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
    scored = [(e, lab) for e, lab in zip(embs, labels) if lab.any()]
    if not scored:
        return {"background_embedding": background, "background_radius": delta_d}

    grid = np.arange(delta_v, 2 * delta_d + delta_v + 1e-9, 0.25)
    scores = [held_out_ap([e for e, _ in scored], [lab for _, lab in scored], delta_d,
                          {"background_embedding": background, "background_radius": float(r),
                           "min_size": min_size}) for r in grid]
    radius = float(grid[int(np.argmax(scores))])
    return {"background_embedding": background, "background_radius": radius,
            "background_radius_val_ap": float(max(scores))}


def held_out_ap(embeddings, labels, delta_d: float, inference: dict, foreground=None) -> float:
    """Mean AP@0.5 of held-out images (embeddings on the model grid, full labels; they may
    differ in shape) segmented as inference would, with ``inference``'s background rule
    (and a foreground classifier's probabilities, one array per image)."""
    from .affinities import default_offsets
    from .evaluation import average_precision
    from .segmentation import segment_embeddings
    scores = []
    for i, (e, lab) in enumerate(zip(embeddings, labels)):
        seg = segment_embeddings(e, inference.get("offsets") or default_offsets(e.ndim - 1), delta_d,
                                 strides=[2] * (e.ndim - 1),
                                 background_embedding=inference.get("background_embedding"),
                                 background_radius=inference.get("background_radius"),
                                 min_size=inference.get("min_size", 0),
                                 foreground=None if foreground is None else foreground[i])
        scores.append(average_precision(seg, lab)["ap@0.5"])
    return float(np.mean(scores))


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
    ait = [i for i, r in zip(it, rows) if r.get("val_ap")]
    if ait:
        ax2 = ax.twinx()
        ax2.plot(ait, [float(r["val_ap"]) for r in rows if r.get("val_ap")], "r-s", label="validation AP@0.5")
        ax2.set_ylabel("validation AP@0.5")
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
    if len(cfg.downsample) != 3 or min(cfg.downsample) < 1:
        raise SpocoInputError("--downsample takes three factors >= 1 (z y x)")
    if cfg.dims == 2 and cfg.downsample[0] != 1:
        raise SpocoInputError("a 2D model is trained on single sections: the z factor of --downsample must be 1")
    if cfg.voxel_size is not None and not all(np.isfinite(v) and v > 0 for v in cfg.voxel_size):
        raise SpocoInputError(f"--voxel-size must be positive, got {list(cfg.voxel_size)}")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise SpocoInputError(f"--out {cfg.out} exists and is not a directory")
    if cfg.foreground_iterations < 0:
        raise SpocoInputError("--foreground-iterations must be >= 0")
    if cfg.foreground_iterations:
        sparse = cfg.mode == "sparse" or (cfg.mode == "auto" and cfg.object_fraction < 1)
        if not sparse:
            raise SpocoInputError("--foreground-iterations needs sparse labels (--mode sparse or --object-fraction < 1): "
                                  "with full labels the background is annotated")
        if cfg.foreground_prior is None and cfg.object_fraction >= 1:
            raise SpocoInputError("--foreground-iterations needs --object-fraction < 1 or --foreground-prior (the "
                                  "share of objects among the unlabeled pixels)")
        if cfg.foreground_prior is not None and not 0 <= cfg.foreground_prior < 1:
            raise SpocoInputError(f"--foreground-prior must be in [0, 1), got {cfg.foreground_prior}")


def train(cfg: TrainConfig) -> dict:
    """Train (or fine-tune, or resume) a SPOCO model; returns a summary dict."""
    _check_parameters(cfg)
    init_ckpt = model_mod.load_checkpoint(cfg.init) if cfg.init else None
    _check_out_dir(cfg)
    train_vols, val_vols, normalization, info = _prepare_volumes(cfg)
    if init_ckpt is not None:
        arch = init_ckpt["architecture"]
        if arch["dims"] != cfg.dims or arch["in_channels"] != 1:
            raise SpocoInputError(f"--init model is {arch['dims']}D with {arch['in_channels']} input "
                                  f"channel(s); this run needs {cfg.dims}D with 1")
        normalization = dict(init_ckpt["normalization"])  # keep the representation's input scale
    ds = list(cfg.downsample)
    # Specks below a quarter of the smallest annotated objects (1st percentile) are noise.
    min_size = max(1, int(info["object_size_p1"] / float(np.prod(ds)) / 4))
    rng = np.random.default_rng(cfg.seed)
    sampler = data.PatchSampler(train_vols, cfg.patch_shape, cfg.dims, ds, rng=rng)
    val_patches = _validation_patches(val_vols, cfg, normalization, cfg.seed)
    # Whole labeled held-out sections: checkpoints are chosen by their AP@0.5 there. The
    # validation loss cannot choose in the sparse setting: it is blind to the unlabeled
    # background, where a sparsely trained model makes its errors (false fragments).
    val_images = _validation_images(val_vols, cfg, normalization)
    if not any(lab.any() for _, lab in val_images):
        val_images = []

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
    mode = cfg.mode if cfg.mode != "auto" else ("full" if cfg.object_fraction >= 1 else "sparse")
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
                              "seconds": round(elapsed, 1), "downsample": ds,
                              "patch_shape": list(cfg.patch_shape), "batch_size": cfg.batch_size,
                              **(val or {})}}
        inference = {"downsample": ds,
                     "min_size": min_size,
                     "tta": cfg.tta,
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
        writer.writerow(["iteration", *LOG_TERMS, "lr", "seconds", "val_loss", "val_ap"])
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
        val_loss, val_ap, val_background = None, None, None
        checkpoint_due = it % cfg.val_every == 0 or it == cfg.iterations
        if checkpoint_due:
            val_loss = _validate(net, val_loss_fn, val_patches, device, cfg.amp)
            if cfg.schedule == "plateau" and val_loss is not None:
                sched.step(val_loss)
            if val_images:
                val_background = calibrate_background(net, val_images, device, cfg.amp, cfg.delta_v,
                                                       cfg.delta_d, min_size, cfg.tta)
                val_ap = val_background.get("background_radius_val_ap")
        writer.writerow([it, *(f"{vals[k]:.6g}" if k in vals else "" for k in LOG_TERMS),
                         f"{opt.param_groups[0]['lr']:.3g}", f"{elapsed:.2f}",
                         "" if val_loss is None else f"{val_loss:.6g}",
                         "" if val_ap is None else f"{val_ap:.4f}"])
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)
        bar.update(1)
        if checkpoint_due:
            t_save = time.perf_counter()
            score = val_ap if val_ap is not None else (None if val_loss is None else -val_loss)
            # Without held-out data the newest model is the best one we can name.
            if score is None or score > best_score:
                best_score = score if score is not None else best_score
                best_it = it
                val = {"val_loss": val_loss, "val_ap": val_ap,
                       "selected_by": "validation AP@0.5" if val_ap is not None else
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
                                          cfg.tta)
    best_path = os.path.join(cfg.out, "best.pt")
    if os.path.exists(best_path) and not val_images:  # else calibrated when it was chosen
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        best_net = model_mod.model_from_checkpoint(best).to(device)
        best["inference"].update(calibrate_background(best_net, bg_images, device, cfg.amp,
                                                      cfg.delta_v, cfg.delta_d, min_size, cfg.tta))
        model_mod.save_checkpoint(best, best_path)
    model_mod.save_checkpoint(checkpoint(cfg.iterations, True, background), os.path.join(cfg.out, "latest.pt"))
    fg_summary = None
    if cfg.foreground_iterations:
        fg_summary = _add_foreground(cfg, best_path, train_vols, val_images, info, device)
    _plot_log(log_path, os.path.join(cfg.out, "loss.png"))
    summary = {"iterations": cfg.iterations, "seconds": round(elapsed, 1),
               "iterations_per_second": round((cfg.iterations - start_it) / max(elapsed, 1e-9), 3)
               if cfg.iterations > start_it else None,
               "best_iteration": best_it,
               "best_val_ap": best_score if val_images and best_score > -float("inf") else None,
               "mode": mode, "objects_used": info["objects_used"], "objects_total": info["objects_total"],
               "device": str(device)}
    if fg_summary is not None:
        summary["foreground"] = fg_summary
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _add_foreground(cfg: TrainConfig, best_path: str, train_vols, val_images, info, device) -> dict:
    """Train the foreground classifier for best.pt (its iteration chosen on the held-out
    sections best.pt was chosen and calibrated on) and store it in best.pt if it helps
    there. (latest.pt stays as it is: nothing measured that the classifier helps it.)"""
    from . import foreground
    prior = cfg.foreground_prior if cfg.foreground_prior is not None else \
        foreground.unlabeled_object_share(info["annotated_voxels"], info["voxels"], cfg.object_fraction)
    best = model_mod.load_checkpoint(best_path)
    result = foreground.train_classifier(best, cfg, train_vols, val_images, prior,
                                         iterations=cfg.foreground_iterations, device=device,
                                         progress=cfg.progress)
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
                                                  ckpt["inference"].get("min_size", 0), tta, embeddings), tta=tta)
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
    return {"foreground_background_radius": radius, "foreground_val_ap": round(ap, 4)}
