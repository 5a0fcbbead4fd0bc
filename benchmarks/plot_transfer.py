"""Figures of the Lucchi transfer experiment (benchmarks/transfer_lucchi.py): AP@0.5
against the annotated fraction (fine-tuned vs from scratch, with the bundled model as
is and the all-labels ceiling), and one picture per setting of a test section: raw,
embeddings (first three principal components as RGB), segmentation, ground truth.

    python benchmarks/plot_transfer.py /tmp/lucchi [--section 8] [--out benchmarks/figures] [--no-pictures]
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def ap_plot(results, path):
    fig, ax = plt.subplots(figsize=(6, 4.2))
    # today's rules, and the runs just before the last change to them (the classifier not
    # averaged); the rows of older rules are in the results file and RESULTS.md's history
    for kind, colour, label in (("fine-tune", "tab:blue", "fine-tuned from the VNC model"),
                                ("fine-tune-iterate", "tab:gray", "fine-tuned, classifier not averaged"),
                                ("scratch", "tab:orange", "trained from scratch"),
                                ("scratch-iterate", "tan", "from scratch, classifier not averaged")):
        rs = [r for r in results.values() if r["kind"] == kind]
        pcts = sorted({r["pct"] for r in rs})
        if not pcts:
            continue
        for r in rs:
            ax.plot(r["pct"], r["test"]["ap@0.5"], "o", color=colour, alpha=0.35, ms=4)
        ax.plot(pcts, [np.mean([r["test"]["ap@0.5"] for r in rs if r["pct"] == p]) for p in pcts], "-o",
                color=colour, label=f"{label} (mean of seeds)")
    for kind, style, label in (("bundled", "k:", "VNC model as is"), ("full", "k--", "from scratch, all labels")):
        rs = [r for r in results.values() if r["kind"] == kind]
        if rs:
            ax.axhline(np.mean([r["test"]["ap@0.5"] for r in rs]), ls=style[1:], color="k", label=label)
    ax.set_xscale("log")
    ax.set_xticks([1, 5, 10])
    ax.set_xticklabels(["1%", "5%", "10%"])
    ax.set_xlabel("annotated 2D objects of sections 0-63")
    ax.set_ylabel("AP@0.5, test sections 64-79")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Lucchi FIB-SEM mitochondria")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pca_rgb(emb):
    flat = emb.reshape(emb.shape[0], -1).T
    flat = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(flat[:: max(1, len(flat) // 20000)], full_matrices=False)
    rgb = flat @ vt[:3].T
    lo, hi = np.percentile(rgb, 1, axis=0), np.percentile(rgb, 99, axis=0)
    return np.clip((rgb - lo) / (hi - lo + 1e-9), 0, 1).reshape(*emb.shape[1:], 3)


def _colour(labels, seed=0):
    rng = np.random.default_rng(seed)
    lut = rng.uniform(0.2, 1, (int(labels.max()) + 1, 3))
    lut[0] = 0
    return lut[labels]


def _checkpoint(result) -> str:
    """A result's checkpoint file: a bundled model's name or a path ("" when none)."""
    from spoco_vol.bundled import model_path
    return model_path(result["checkpoint"]) if result.get("checkpoint") else ""


def pictures(results, test, section, path):
    from spoco_vol import io
    from spoco_vol import checkpoint
    from spoco_vol.pipeline import labels_from_embeddings, predict_array
    raw = np.asarray(io.open_volume(test + "/raw")[section])
    gt = np.asarray(io.open_volume(test + "/labels")[section])
    vs = io.read_voxel_size(test + "/raw")[1:]
    picks = []
    for kind in ("bundled", "fine-tune", "scratch", "full"):
        # one row per setting (seed 0) under today's rules (the runs of earlier rules wrote to the same
        # folders, so their checkpoint paths now hold today's runs)
        rs = sorted([r for r in results.values() if r["kind"] == kind and r["seed"] in (None, 0)
                     and os.path.exists(_checkpoint(r))],
                    key=lambda r: r["pct"] or 0)
        picks += rs
    fig, axes = plt.subplots(len(picks), 4, figsize=(12, 2.6 * len(picks)))
    axes = np.atleast_2d(axes)
    for row, r in zip(axes, picks):
        ck = checkpoint.load(_checkpoint(r))
        pred = predict_array(raw, ck, input_voxel_size=vs, device="cpu")
        emb = pred.embeddings
        seg = labels_from_embeddings(emb, ck, raw.shape, pred.scale, foreground=pred.foreground)
        name = {"bundled": "VNC model as is", "fine-tune": f"fine-tuned, {r['pct']}%",
                "scratch": f"from scratch, {r['pct']}%",
                "full": "from scratch, all labels"}[r["kind"]] + (f", lr {r['lr']}" if r.get("lr") else "")
        for ax, img, title in zip(row, (raw, _pca_rgb(emb), _colour(seg), _colour(gt, 1)),
                                  (f"{name}: raw", f"embeddings (PCA) AP@0.5 {r['test']['ap@0.5']:.2f}",
                                   "segmentation", "ground truth")):
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("--section", type=int, default=8, help="test section (0-15 = Lucchi sections 64-79)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "figures"))
    p.add_argument("--results", default=None, help="results file [default: WORK/transfer.json]")
    p.add_argument("--no-pictures", action="store_true",
                   help="the AP plot only (the pictures need the runs' checkpoints on disk)")
    a = p.parse_args()
    results = json.load(open(a.results or os.path.join(a.work, "transfer.json")))
    os.makedirs(a.out, exist_ok=True)
    ap_plot(results, os.path.join(a.out, "lucchi_transfer_ap.png"))
    if not a.no_pictures:
        pictures(results, os.path.join(a.work, "lucchi_test.zarr"), a.section,
                 os.path.join(a.out, "lucchi_transfer_pictures.png"))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
