"""Instance segmentation metrics on integer label arrays (0 = background in pred and GT).

MitoEM-style average precision (greedy IoU matching, objects ranked by size), adapted
Rand error and variation of information (both with GT background excluded).
All functions are pure numpy; the contingency table is built from sparse pairs.
"""

import numpy as np
import fastremap
from skimage.metrics import adapted_rand_error as _sk_arand
from skimage.metrics import contingency_table as _sk_table
from skimage.metrics import variation_of_information as _sk_voi

from spoco_vol.errors import SpocoInputError

#: MitoEM / COCO thresholds 0.50:0.05:0.95 (rounded so the keys read "ap@0.55", not 0.5500000001).
MITOEM_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())


def _check(pred, gt):
    pred, gt = np.asarray(pred), np.asarray(gt)
    for name, a in (("prediction", pred), ("ground truth", gt)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise SpocoInputError(f"{name} must be an integer label array, got dtype {a.dtype}")
    if pred.shape != gt.shape:
        raise SpocoInputError(
            f"prediction shape {pred.shape} does not match ground truth shape {gt.shape}")
    return pred, gt


def _compact(a):
    """Relabel to 1..n (0 kept) in order of first appearance; return (ids, originals).

    First-appearance order makes size ties break the same way under any permutation of
    label ids, and compact ids keep int64 pair keys and sparse shapes small whatever
    the input label values (uint64 ids up to 2**64 included).
    """
    a = np.ascontiguousarray(a)
    if a.dtype == bool:
        a = a.view(np.uint8)
    c, remap = fastremap.renumber(a, preserve_zero=True)
    orig = np.zeros(len(remap) + 1, dtype=a.dtype)
    orig[np.fromiter(remap.values(), np.int64, len(remap))] = np.fromiter(
        remap.keys(), a.dtype, len(remap))
    return c.astype(np.int64, copy=False), orig[: int(c.max(initial=0)) + 1]


def _sectioned(c, orig):
    """Per-section objects: (z, label) pairs become separate compact ids."""
    z = np.arange(c.shape[0], dtype=np.int64).reshape(-1, *([1] * (c.ndim - 1)))
    key = np.where(c > 0, z * (len(orig)) + c, 0)
    c2, keys = _compact(key)
    keys = keys.astype(np.int64)
    return c2, orig[keys % len(orig)], keys // len(orig)


def match_objects(pred, gt, thresholds=(0.5,), per_section=False):
    """Greedy MitoEM matching of predicted to GT objects, for several IoU thresholds.

    Predicted objects are processed largest first (size = confidence); each takes the
    not-yet-matched GT object of highest IoU, and it is a TP at threshold t if that IoU
    >= t, which consumes the GT object. Only pairs with IoU >= t can be taken, so the
    greedy loop runs over those pairs only (for t > 0.5 they are one-to-one anyway).

    Returns a dict (arrays over predicted objects, largest first; ties broken by first
    appearance in raster order, so label ids do not matter):
      labels      original pred label values
      sections    z index of each object (per_section only, else None)
      sizes       voxel counts
      best_iou    highest IoU with any GT object (ignoring consumption)
      iou         (n_thresholds, n_pred) IoU of the greedy match, 0 where unmatched
      tp          (n_thresholds, n_pred) bool
      n_gt        number of GT objects; thresholds: the thresholds as an array
    """
    pred, gt = _check(pred, gt)
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    pc, porig = _compact(pred)
    gc, gorig = _compact(gt)
    sections = None
    if per_section:
        if pred.ndim != 3:
            raise SpocoInputError(f"per_section needs a 3D (z, y, x) array, got shape {pred.shape}")
        pc, porig, sections = _sectioned(pc, porig)
        gc, gorig, _ = _sectioned(gc, gorig)
    n_pred, n_gt = len(porig) - 1, len(gorig) - 1
    psize = np.bincount(pc.ravel(), minlength=n_pred + 1)[1:]
    gsize = np.bincount(gc.ravel(), minlength=n_gt + 1)[1:]

    # Sparse contingency: only (pred, gt) pairs that actually overlap, via unique keys.
    both = (pc > 0) & (gc > 0)
    keys, inter = np.unique(pc[both] * (n_gt + 1) + gc[both], return_counts=True)
    pp, gg = keys // (n_gt + 1) - 1, keys % (n_gt + 1) - 1  # 0-based object indices
    iou = inter / (psize[pp] + gsize[gg] - inter)

    order = np.argsort(-psize, kind="stable")  # stable: ties keep first-appearance order
    rank = np.empty(n_pred, dtype=np.int64)
    rank[order] = np.arange(n_pred)
    best = np.zeros(n_pred)
    np.maximum.at(best, rank[pp], iou)

    # Pairs sorted by (pred rank, IoU descending, GT first appearance).
    srt = np.lexsort((gg, -iou, rank[pp]))
    pr, gg, iou = rank[pp][srt], gg[srt], iou[srt]
    tp = np.zeros((len(thresholds), n_pred), dtype=bool)
    miou = np.zeros((len(thresholds), n_pred))
    for k, t in enumerate(thresholds):
        sel = iou >= t
        p_k, g_k, i_k = pr[sel], gg[sel], iou[sel]
        if len(np.unique(p_k)) == len(p_k) and len(np.unique(g_k)) == len(g_k):
            tp[k, p_k], miou[k, p_k] = True, i_k  # conflict-free: every candidate is a match
            continue
        used_p, used_g = set(), set()
        for p, g, i in zip(p_k.tolist(), g_k.tolist(), i_k.tolist()):
            if p in used_p or g in used_g:
                continue
            used_p.add(p)
            used_g.add(g)
            tp[k, p], miou[k, p] = True, i
    return {
        "labels": porig[1:][order],
        "sections": None if sections is None else sections[1:][order],
        "sizes": psize[order],
        "best_iou": best,
        "iou": miou,
        "tp": tp,
        "n_gt": int(n_gt),
        "thresholds": thresholds,
    }


def _ap(tp, n_gt):
    """Area under the monotone precision envelope (VOC 2010+/COCO all points)."""
    if n_gt == 0:
        return 1.0 if tp.size == 0 else 0.0
    if tp.size == 0:
        return 0.0
    prec = np.cumsum(tp) / np.arange(1, tp.size + 1)
    env = np.maximum.accumulate(prec[::-1])[::-1]
    # Recall rises by 1/n_gt exactly at each TP; the envelope there is max precision
    # over all points of equal or higher recall.
    return float(env[tp].sum() / n_gt)


def _ratio(num, den, both_empty):
    return float(num / den) if den else both_empty


def average_precision(pred, gt, thresholds=(0.5,), per_section=False):
    """MitoEM-style AP at each threshold; "map" is their mean.

    per_section=True (3D): the objects are the label values within each z-section
    (no connected-component relabelling); matching happens within sections and all
    sections' objects are pooled into one size-ranked list (n_gt = sum over sections).
    Conventions: no predictions -> AP 0; no GT but predictions -> AP 0; both empty ->
    AP 1 (and precision = recall = f1 = 1). tp/fp/fn/precision/recall/f1 are at the
    first threshold.
    """
    m = match_objects(pred, gt, thresholds, per_section=per_section)
    n_pred, n_gt = m["tp"].shape[1], m["n_gt"]
    out = {f"ap@{t:g}": _ap(row, n_gt) for t, row in zip(m["thresholds"], m["tp"])}
    out["map"] = float(np.mean(list(out.values())))
    tp = int(m["tp"][0].sum())
    empty = 1.0 if n_pred == 0 and n_gt == 0 else 0.0
    out.update(tp=tp, fp=n_pred - tp, fn=n_gt - tp, n_pred=n_pred, n_gt=n_gt,
               precision=_ratio(tp, n_pred, empty), recall=_ratio(tp, n_gt, empty),
               f1=_ratio(2 * tp, n_pred + n_gt, empty))
    return out


def adapted_rand_error(pred, gt):
    """Adapted Rand error (CREMI / SNEMI3D), voxels with GT 0 excluded.

    Pair-counting, with "pairs" = voxel pairs inside GT foreground:
      rand_precision = P(same GT object | same pred object): lowered by false MERGES
      rand_recall    = P(same pred object | same GT object): lowered by false SPLITS
    skimage returns (error, "precision", "recall") where its "precision" divides by the
    pairs of the *true* image, i.e. it is the recall above (skimage #6485), so the two
    are swapped here. arand = 1 - F1 of the two; nan when GT has no foreground pairs.
    """
    pred, gt = _check(pred, gt)
    if not (gt != 0).any():
        return {"arand": float("nan"), "rand_precision": float("nan"), "rand_recall": float("nan")}
    # Compact ids: skimage sizes its sparse table by the largest label value.
    gc, pc = _compact(gt)[0], _compact(pred)[0]
    table = _sk_table(gc, pc, ignore_labels=(0,), sparse_type="array")
    with np.errstate(divide="ignore", invalid="ignore"):
        err, sk_prec, sk_rec = _sk_arand(table=table)
    return {"arand": float(err), "rand_precision": float(sk_rec), "rand_recall": float(sk_prec)}


def variation_of_information(pred, gt):
    """VOI in bits (log2), voxels with GT 0 excluded.

    skimage.metrics.variation_of_information(image0, image1) returns
    [H(image1|image0), H(image0|image1)]; called as (gt, pred) that is
    [H(pred|gt), H(gt|pred)] = [split (over-segmentation), merge (under-segmentation)].
    """
    pred, gt = _check(pred, gt)
    if not (gt != 0).any():
        return {"voi_split": 0.0, "voi_merge": 0.0, "voi": 0.0}
    gc, pc = _compact(gt)[0], _compact(pred)[0]
    split, merge = _sk_voi(gc, pc, ignore_labels=(0,))
    split, merge = max(float(split), 0.0), max(float(merge), 0.0)  # clip -0.0 / rounding
    return {"voi_split": split, "voi_merge": merge, "voi": split + merge}


def evaluate_segmentation(pred, gt, per_section=False):
    """All metrics in one flat dict: AP (MitoEM thresholds; ap@0.5, ap@0.75, map),
    counts/precision/recall/f1 at IoU 0.5, arand and VOI (these two on the whole array,
    per_section only affects the object-level metrics)."""
    ap = average_precision(pred, gt, MITOEM_THRESHOLDS, per_section=per_section)
    out = {k: ap[k] for k in ("ap@0.5", "ap@0.75", "map")}
    out.update({k: v for k, v in ap.items() if not k.startswith("ap@") and k != "map"})
    out.update(adapted_rand_error(pred, gt))
    out.update(variation_of_information(pred, gt))
    return out


def format_metrics(d):
    """One aligned two-column table (name, value) for CLI output."""
    width = max((len(k) for k in d), default=0)
    rows = []
    for k, v in d.items():
        s = f"{v:.4f}" if isinstance(v, (float, np.floating)) else str(v)
        rows.append(f"{k:<{width}}  {s:>10}")
    return "\n".join(rows)


def foreground_restricted(pred, gt):
    """pred with voxels where gt == 0 set to 0 (diagnostic: AP restricted to true foreground)."""
    pred, gt = _check(pred, gt)
    return np.where(gt != 0, pred, np.zeros((), dtype=pred.dtype))


def evaluate_zarr(pred: str, gt: str, per_section: bool = False) -> dict:
    """``evaluate_segmentation`` of two zarr label arrays (paths), checked first."""
    from . import io
    p, g = io.open_volume(pred, "prediction"), io.open_volume(gt, "ground truth")
    io.validate_volume(p, "prediction", integer=True)
    io.validate_volume(g, "ground truth", integer=True)
    return evaluate_segmentation(np.asarray(p[...]), np.asarray(g[...]), per_section=per_section)
