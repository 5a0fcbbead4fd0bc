"""Instance segmentation metrics on integer label arrays (0 = background in pred and GT).

MitoEM-style average precision (greedy IoU matching, objects ranked by size), adapted
Rand error and variation of information (both with GT background excluded).
All functions are pure numpy; the contingency table is built from sparse pairs.
"""

import dataclasses

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


# ------------------------------------------------------------------ contingency tables
#
# The metrics of two label volumes all follow from one table: (section, pred id, gt id,
# voxels) for every pair that shares voxels (0 included), plus, per object, its first
# voxel in raster order (size ties are broken by it, as in match_objects) and its
# z-range. A block's table is computed from the block alone; tables of blocks merge
# by summing counts and taking minima/maxima, so the metrics of the merged table are
# exactly those of the whole volume (evaluation_blockwise.py builds the dask graph).

@dataclasses.dataclass
class Table:
    pairs: np.ndarray      # (n, 4) int64: section (0 unless per-section), pred, gt, voxels
    pred: np.ndarray       # (m, 5) int64: section, pred id, first raster index, z min, z max
    gt: np.ndarray         # (k, 5) int64: the same for gt objects
    per_section: bool
    shape: tuple


def _unique_rows(keys: np.ndarray):
    """Unique rows of an int64 (n, c) array, their first row index of each and inverse."""
    if not len(keys):
        return keys, np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort(keys.T[::-1])
    k = keys[order]
    start = np.r_[True, (k[1:] != k[:-1]).any(axis=1)]
    group = np.cumsum(start) - 1
    inverse = np.empty(len(keys), np.int64)
    inverse[order] = group
    return k[start], order[start], inverse


def _object_rows(compact: np.ndarray, orig: np.ndarray, zz: np.ndarray, flat: np.ndarray,
                 per_section: bool) -> np.ndarray:
    """(section, id, first raster index, z min, z max) of each label value of a block
    (0 included), from its compact ids. A stable sort keeps raster order within each
    object, and raster order is global order within a block: an object's first element
    is its first voxel (and lowest z), its last the highest z."""
    key = compact.ravel() + (zz * len(orig) if per_section else 0)
    order = np.argsort(key, kind="stable")
    k = key[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    ends = np.r_[starts[1:], len(k)] - 1
    sec = k[starts] // len(orig) if per_section else np.zeros(len(starts), np.int64)
    ids = orig[k[starts] % len(orig)].astype(np.int64)
    return np.stack([sec, ids, flat[order[starts]], zz[order[starts]], zz[order[ends]]], axis=1)


def contingency(pred, gt, per_section: bool = False, offset=None, shape=None) -> Table:
    """The table of a block (``offset``: its first voxel in a volume of ``shape``; by
    default the arrays are the whole volume)."""
    pred, gt = _check(pred, gt)
    if per_section and pred.ndim != 3:
        raise SpocoInputError(f"per_section needs a 3D (z, y, x) array, got shape {pred.shape}")
    shape = tuple(shape or pred.shape)
    offset = tuple(offset or (0,) * pred.ndim)
    # compact ids first: np.unique on one int64 key instead of rows of original ids
    pc, porig = _compact(pred)
    gc, gorig = _compact(gt)
    coords = [(c + o).astype(np.int64) for c, o in zip(np.indices(pred.shape, sparse=True), offset)]
    flat = np.ravel_multi_index(np.broadcast_arrays(*coords), shape).ravel().astype(np.int64)
    zz = (np.broadcast_to(coords[0], pred.shape).ravel() if pred.ndim == 3 else np.zeros(pred.size, np.int64))
    n_p, n_g = len(porig), len(gorig)
    key = pc.ravel() * n_g + gc.ravel()
    if per_section:
        key = key + zz * (n_p * n_g)
    u, counts = np.unique(key, return_counts=True)
    sec = u // (n_p * n_g) if per_section else np.zeros_like(u)
    rest = u % (n_p * n_g)
    pairs = np.stack([sec, porig[rest // n_g].astype(np.int64), gorig[rest % n_g].astype(np.int64), counts], axis=1)
    return Table(pairs, _object_rows(pc, porig, zz, flat, per_section),
                 _object_rows(gc, gorig, zz, flat, per_section), per_section, shape)


def merge_tables(tables) -> Table:
    """One table from the tables of disjoint blocks of the same volume."""
    tables = list(tables)
    pairs = np.concatenate([t.pairs for t in tables])
    keys, _, inv = _unique_rows(pairs[:, :3])
    merged_pairs = np.concatenate([keys, np.bincount(inv, weights=pairs[:, 3]).astype(np.int64)[:, None]], axis=1)

    def objects(rows):
        keys, _, inv = _unique_rows(rows[:, :2])
        first = np.full(len(keys), np.iinfo(np.int64).max)
        zmin = np.full(len(keys), np.iinfo(np.int64).max)
        zmax = np.full(len(keys), np.iinfo(np.int64).min)
        np.minimum.at(first, inv, rows[:, 2])
        np.minimum.at(zmin, inv, rows[:, 3])
        np.maximum.at(zmax, inv, rows[:, 4])
        return np.concatenate([keys, first[:, None], zmin[:, None], zmax[:, None]], axis=1)
    return Table(merged_pairs, objects(np.concatenate([t.pred for t in tables])),
                 objects(np.concatenate([t.gt for t in tables])), tables[0].per_section, tables[0].shape)


#: AP by object size: the MitoEM challenge's bins (voxels): small, medium, large
SIZE_BINS = {"small": (0, 5_000), "medium": (5_000, 15_000), "large": (15_000, np.inf)}


def _objects_of(table: Table, which: str):
    """(keys (section, id) of the nonzero objects in first-appearance order, sizes,
    single-section flags)."""
    rows = table.pred if which == "pred" else table.gt
    rows = rows[rows[:, 1] != 0]
    rows = rows[np.argsort(rows[:, 2], kind="stable")]
    col = 1 if which == "pred" else 2
    pk, _, inv = _unique_rows(table.pairs[:, [0, col]])
    size_of = np.bincount(inv, weights=table.pairs[:, 3]).astype(np.int64)
    idx = _row_index(pk, rows[:, :2])
    return rows[:, :2], size_of[idx], rows[:, 3] == rows[:, 4]


def _row_index(sorted_keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Index of each query row (section, id) in lexicographically sorted unique rows."""
    both, _, inv = _unique_rows(np.concatenate([sorted_keys, query]))
    where = np.empty(len(both), np.int64)
    where[inv[:len(sorted_keys)]] = np.arange(len(sorted_keys))
    return where[inv[len(sorted_keys):]]


def metrics_from_table(table: Table, thresholds=MITOEM_THRESHOLDS, size_bins=SIZE_BINS) -> dict:
    """Every metric of evaluate_segmentation, from a (merged) contingency table."""
    pkeys, psize, p_single = _objects_of(table, "pred")
    gkeys, gsize, g_single = _objects_of(table, "gt")
    n_pred, n_gt = len(pkeys), len(gkeys)
    fg = table.pairs[(table.pairs[:, 1] != 0) & (table.pairs[:, 2] != 0)]
    pp = _row_index(pkeys[np.lexsort(pkeys.T[::-1])], fg[:, [0, 1]]) if n_pred else np.zeros(0, np.int64)
    gg = _row_index(gkeys[np.lexsort(gkeys.T[::-1])], fg[:, [0, 2]]) if n_gt else np.zeros(0, np.int64)
    # back to first-appearance order (pkeys/gkeys are in it)
    p_sorted = np.lexsort(pkeys.T[::-1]) if n_pred else np.zeros(0, np.int64)
    g_sorted = np.lexsort(gkeys.T[::-1]) if n_gt else np.zeros(0, np.int64)
    pp, gg = p_sorted[pp], g_sorted[gg]
    inter = fg[:, 3].astype(np.float64)
    iou = inter / (psize[pp] + gsize[gg] - inter) if len(fg) else inter
    thresholds = np.atleast_1d(np.asarray(thresholds, np.float64))
    order = np.argsort(-psize, kind="stable")
    rank = np.empty(n_pred, np.int64)
    rank[order] = np.arange(n_pred)
    tp, matched_gt = _greedy(rank[pp], gg, iou, n_pred, thresholds)
    out = {f"ap@{t:g}": _ap(row, n_gt) for t, row in zip(thresholds, tp)}
    out["map"] = float(np.mean([out[f"ap@{t:g}"] for t in thresholds]))
    k = int(np.flatnonzero(np.isclose(thresholds, 0.5))[0]) if np.isclose(thresholds, 0.5).any() else 0
    n_tp = int(tp[k].sum())
    empty = 1.0 if n_pred == 0 and n_gt == 0 else 0.0
    out.update(tp=n_tp, fp=n_pred - n_tp, fn=n_gt - n_tp, n_pred=n_pred, n_gt=n_gt,
               precision=_ratio(n_tp, n_pred, empty), recall=_ratio(n_tp, n_gt, empty),
               f1=_ratio(2 * n_tp, n_pred + n_gt, empty))
    # AP by size (COCO convention): GT outside the bin and the predictions matched to
    # them are ignored, as are unmatched predictions outside the bin.
    psize_ranked = psize[order]
    for name, (lo, hi) in size_bins.items():
        g_in = (gsize > lo) & (gsize <= hi)
        for t in (0.5, 0.75):
            kk = int(np.flatnonzero(np.isclose(thresholds, t))[0]) if np.isclose(thresholds, t).any() else None
            if kk is None:
                continue
            m = matched_gt[kk]  # (n_pred,) ranked: matched gt index or -1
            keep = np.where(m >= 0, g_in[np.maximum(m, 0)], (psize_ranked > lo) & (psize_ranked <= hi))
            if g_in.any() or keep.any():  # a bin without objects has no AP (left out)
                out[f"ap@{t:g}_{name}"] = _ap(tp[kk][keep], int(g_in.sum()))
    out.update(_rand_and_voi(table))
    out.update(_best_dice(table, pkeys, psize, gkeys, gsize, pp, gg, inter))
    if table.pred.shape[0] and len(table.shape) == 3:  # for the --per-section hint (evaluation_blockwise)
        out["pred_single_section_share"] = float(p_single.mean()) if n_pred else 1.0
        out["gt_single_section_share"] = float(g_single.mean()) if n_gt else 1.0
    return out


def _greedy(pr, gg, iou, n_pred, thresholds):
    """The greedy matching of match_objects on pairs (pred rank, gt index, IoU): tp
    (n_thresholds, n_pred) in rank order, and the matched gt index (-1: none)."""
    srt = np.lexsort((gg, -iou, pr))
    pr, gg, iou = pr[srt], gg[srt], iou[srt]
    tp = np.zeros((len(thresholds), n_pred), dtype=bool)
    matched = np.full((len(thresholds), n_pred), -1, np.int64)
    for k, t in enumerate(thresholds):
        sel = iou >= t
        p_k, g_k = pr[sel], gg[sel]
        used_p, used_g = set(), set()
        for p, g in zip(p_k.tolist(), g_k.tolist()):
            if p in used_p or g in used_g:
                continue
            used_p.add(p)
            used_g.add(g)
            tp[k, p], matched[k, p] = True, g
    return tp, matched


def _rand_and_voi(table: Table) -> dict:
    """Adapted Rand error and VOI (as adapted_rand_error and variation_of_information:
    voxels with gt 0 excluded, sections pooled) from the table."""
    keys, _, inv = _unique_rows(table.pairs[:, [1, 2]])  # sections pooled: whole-volume ids
    n = np.bincount(inv, weights=table.pairs[:, 3])
    fg = keys[:, 1] != 0
    keys, n = keys[fg], n[fg]
    total = n.sum()
    if total == 0:
        return {"arand": float("nan"), "rand_precision": float("nan"), "rand_recall": float("nan"),
                "voi_split": 0.0, "voi_merge": 0.0, "voi": 0.0}
    _, _, gi = _unique_rows(keys[:, [1]])
    _, _, pi = _unique_rows(keys[:, [0]])
    a = np.bincount(gi, weights=n)   # gt sizes (in gt foreground)
    b = np.bincount(pi, weights=n)   # pred sizes within gt foreground
    sum_ij2 = n @ n - total
    sum_a2 = a @ a - total
    sum_b2 = b @ b - total
    if sum_a2 == 0 or sum_b2 == 0:
        arand, prec, rec = (0.0 if sum_ij2 == sum_a2 == sum_b2 else 1.0), float("nan"), float("nan")
    else:
        rec, prec = sum_ij2 / sum_a2, sum_ij2 / sum_b2
        arand = 1.0 - sum_ij2 / (0.5 * sum_a2 + 0.5 * sum_b2)
    p = n / total
    pa, pb = a / total, b / total
    split = max(float(-(p * np.log2(p / pa[gi])).sum()), 0.0)   # H(pred | gt)
    merge = max(float(-(p * np.log2(p / pb[pi])).sum()), 0.0)   # H(gt | pred)
    return {"arand": float(arand), "rand_precision": float(prec), "rand_recall": float(rec),
            "voi_split": split, "voi_merge": merge, "voi": split + merge}


def _best_dice(table, pkeys, psize, gkeys, gsize, pp, gg, inter) -> dict:
    """Symmetric Best Dice and |DiC| (CVPPP), per image: per section with per-section
    objects (the mean over sections holding objects), else over the whole array."""
    dice = 2 * inter / (psize[pp] + gsize[gg]) if len(inter) else inter
    best_p = np.zeros(len(pkeys))
    best_g = np.zeros(len(gkeys))
    np.maximum.at(best_p, pp, dice)
    np.maximum.at(best_g, gg, dice)
    sections = np.union1d(pkeys[:, 0], gkeys[:, 0])
    sbd, dic = [], []
    for z in sections:
        bp, bg = best_p[pkeys[:, 0] == z], best_g[gkeys[:, 0] == z]
        bd_pg = bp.mean() if bp.size else (1.0 if not bg.size else 0.0)
        bd_gp = bg.mean() if bg.size else (1.0 if not bp.size else 0.0)
        sbd.append(min(bd_pg, bd_gp))
        dic.append(abs(bp.size - bg.size))
    return {"sbd": float(np.mean(sbd)) if sbd else 1.0, "abs_dic": float(np.mean(dic)) if dic else 0.0}


def evaluate_segmentation(pred, gt, per_section=False):
    """All metrics in one flat dict (metrics_from_table of the arrays' table): AP at the
    MitoEM thresholds (ap@0.5, ap@0.75, ..., map), AP@0.5/0.75 by object size
    (SIZE_BINS), counts/precision/recall/f1 at IoU 0.5, arand and VOI (these two on the
    whole array, per_section only affects the object-level metrics), SBD and |DiC|."""
    out = metrics_from_table(contingency(pred, gt, per_section))
    out.pop("pred_single_section_share", None)
    out.pop("gt_single_section_share", None)
    return out


_GROUPS = (
    ("objects, IoU >= 0.5", ("tp", "fp", "fn", "n_pred", "n_gt", "precision", "recall", "f1")),
    ("average precision (MitoEM / COCO)", None),
    ("by object size (voxels: small <= 5000 < medium <= 15000 < large)", "_"),
    ("voxel pairs (GT background excluded)", ("arand", "rand_precision", "rand_recall", "voi_split", "voi_merge",
                                              "voi")),
    ("CVPPP", ("sbd", "abs_dic")),
)


def format_metrics(d):
    """The metrics as a terminal table: one aligned (name, value) row each, in groups."""
    width = max((len(k) for k in d), default=0)

    def row(k):
        v = d[k]
        return f"  {k:<{width}}  {f'{v:.4f}' if isinstance(v, (float, np.floating)) else str(v):>10}"
    ap = [k for k in d if k.startswith("ap@") and "_" not in k] + (["map"] if "map" in d else [])
    by_size = [k for k in d if k.startswith("ap@") and "_" in k]
    lines, shown = [], set()
    for title, keys in _GROUPS:
        keys = ap if keys is None else by_size if keys == "_" else [k for k in keys if k in d]
        if keys:
            lines.append(title)
            lines += [row(k) for k in keys]
            shown |= set(keys)
    rest = [k for k in d if k not in shown]
    if rest:
        lines.append("other")
        lines += [row(k) for k in rest]
    return "\n".join(lines)


def foreground_restricted(pred, gt):
    """pred with voxels where gt == 0 set to 0 (diagnostic: AP restricted to true foreground)."""
    pred, gt = _check(pred, gt)
    return np.where(gt != 0, pred, np.zeros((), dtype=pred.dtype))
