import itertools
import time

import numpy as np
import pytest

from spoco_vol.errors import SpocoInputError
from spoco_vol.evaluation import (
    adapted_rand_error, average_precision, evaluate_segmentation, format_metrics,
    foreground_restricted, match_objects, variation_of_information,
)


def blobs():
    """3 GT objects of sizes 16, 9, 4 in a 2D image."""
    gt = np.zeros((12, 12), np.uint16)
    gt[0:4, 0:4] = 1   # 16
    gt[6:9, 6:9] = 2   # 9
    gt[10:12, 0:2] = 3  # 4
    return gt


def test_identical():
    gt = blobs()
    r = evaluate_segmentation(gt, gt)
    assert r["ap@0.5"] == r["map"] == 1.0
    assert (r["tp"], r["fp"], r["fn"]) == (3, 0, 0)
    assert r["arand"] == pytest.approx(0.0)
    assert r["voi"] == pytest.approx(0.0)
    assert r["f1"] == 1.0
    table = format_metrics(r)
    assert "arand" in table and len([l for l in table.splitlines() if l.startswith("  ")]) == len(r)


def test_known_ap_tp_fp_tp():
    gt = blobs()
    pred = np.zeros_like(gt)
    pred[0:4, 0:4] = 7        # size 16, exact match of GT 1  -> rank 1, TP
    pred[0:3, 8:11] = 5       # size 9 in background           -> rank 2, FP
    pred[10:12, 0:2] = 2      # size 4, exact match of GT 3   -> rank 3, TP
    # ranked TP, FP, TP; precision 1, 1/2, 2/3; recall 1/3, 1/3, 2/3.
    # envelope at the TPs: 1 and 2/3 -> AP = (1 + 2/3) / 3 = 5/9
    r = average_precision(pred, gt)
    assert r["ap@0.5"] == pytest.approx(5 / 9)
    assert (r["tp"], r["fp"], r["fn"], r["n_pred"], r["n_gt"]) == (2, 1, 1, 3, 3)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    # the FP ranked last instead (smallest) costs nothing: TP, TP, FP -> AP = 2/3
    pred[0:3, 8:11] = 0
    pred[0, 10] = 5
    assert average_precision(pred, gt)["ap@0.5"] == pytest.approx(2 / 3)


def test_match_objects_order_and_fields():
    gt = blobs()
    pred = np.zeros_like(gt)
    pred[10:12, 0:2] = 9
    pred[0:4, 0:4] = 3
    m = match_objects(pred, gt, thresholds=(0.5, 0.9))
    assert list(m["labels"]) == [3, 9] and list(m["sizes"]) == [16, 4]
    assert m["tp"].shape == (2, 2) and m["tp"].all() and m["n_gt"] == 3
    np.testing.assert_allclose(m["iou"], 1.0)


def test_merge_gives_low_iou_for_both():
    gt = np.zeros((4, 12), np.uint8)
    gt[:, 0:5] = 1     # 20 voxels
    gt[:, 6:11] = 2    # 20 voxels
    pred = np.zeros_like(gt)
    pred[:, 0:12] = 4  # covers both plus background: IoU 20/48 each
    m = match_objects(pred, gt)
    assert m["best_iou"][0] == pytest.approx(20 / 48) and m["best_iou"][0] < 0.5
    r = average_precision(pred, gt)
    assert r["ap@0.5"] == 0.0 and (r["tp"], r["fp"], r["fn"]) == (0, 1, 2)


def test_split():
    gt = np.zeros((4, 5), np.uint8)
    gt[:] = 1                     # one object of 20
    pred = np.ones_like(gt)
    pred[:, 0:1] = 2              # pred 1: 16 voxels (IoU 0.8), pred 2: 4 voxels (IoU 0.2)
    r = average_precision(pred, gt, thresholds=(0.5, 0.85))
    # at 0.5: TP then FP -> full recall at precision 1 -> AP 1; at 0.85 nothing matches
    assert r["ap@0.5"] == 1.0 and r["ap@0.85"] == 0.0 and r["map"] == 0.5
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)
    # low threshold: the small piece also passes (0.2 >= 0.1) but the GT is consumed
    r = average_precision(pred, gt, thresholds=(0.1,))
    assert (r["tp"], r["fp"]) == (1, 1)


def test_greedy_consumes_gt():
    # pred A (largest) overlaps G1 (IoU 0.4) and G2 (IoU 0.25); pred B overlaps G1 (IoU 0.35).
    # at t=0.2: A takes G1 (its best), B's best unmatched GT is none -> FP.
    gt = np.zeros((1, 40), np.uint8)
    gt[0, 0:10] = 1
    gt[0, 10:20] = 2
    pred = np.zeros_like(gt)
    pred[0, 2:10] = 5   # 8 voxels inside G1 ...
    pred[0, 10:15] = 5  # ... + 5 inside G2: size 13, IoU(G1) = 8/15, IoU(G2) = 5/18
    pred[0, 0:2] = 6    # 2 voxels in G1: IoU 0.2
    m = match_objects(pred, gt, thresholds=(0.2, 0.5))
    assert m["tp"][0].tolist() == [True, False]
    assert m["iou"][0, 0] == pytest.approx(8 / 15)
    assert m["tp"][1].tolist() == [True, False]


def test_permuted_label_ids_same_result():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, (6, 20, 20)).astype(np.uint32)
    pred = np.roll(gt, 1, axis=2)
    pred[:, :3] = 0
    ref = evaluate_segmentation(pred, gt)
    perm_p = rng.permutation(100)[:6] * 1000 + 1
    perm_g = np.concatenate([[0], rng.permutation(5) + 2**40])
    perm_p[0] = 0
    r = evaluate_segmentation(perm_p[pred], perm_g[gt].astype(np.uint64))
    for k in ref:
        assert r[k] == pytest.approx(ref[k]), k


def test_swapping_pred_and_gt_swaps_fp_and_fn():
    # torch-em's MitoEM scripts swap prediction and GT: an extra small predicted object
    # must be a false positive, not a false negative.
    gt = blobs()
    pred = gt.copy()
    pred[10:11, 8:9] = 4  # spurious 1-voxel prediction in background
    r = average_precision(pred, gt)
    assert (r["tp"], r["fp"], r["fn"], r["n_pred"], r["n_gt"]) == (3, 1, 0, 4, 3)
    assert r["ap@0.5"] == 1.0 and r["precision"] == 0.75 and r["recall"] == 1.0
    s = average_precision(gt, pred)
    assert (s["fp"], s["fn"]) == (0, 1) and s["ap@0.5"] == pytest.approx(3 / 4)


def test_per_section_pooled():
    gt = np.zeros((2, 6, 6), np.uint8)
    gt[0, 0:2, 0:4] = 1   # object 1 in z=0: 8 voxels
    gt[1, 0:2, 0:2] = 1   # same label in z=1: a separate 2D object of 4 voxels
    pred = gt.copy()
    pred[0, 4:6, 0:3] = 2  # 6-voxel FP in z=0
    # 3D: one GT object, matched exactly; FP after it -> AP 1
    r3 = average_precision(pred, gt)
    assert (r3["n_gt"], r3["tp"], r3["fp"]) == (1, 1, 1) and r3["ap@0.5"] == 1.0
    # per section: GT {(z0,1): 8, (z1,1): 4}; pooled ranking 8 TP, 6 FP, 4 TP
    # precision 1, 1/2, 2/3 -> AP = (1 + 2/3) / 2 = 5/6 (per-section mean would be 1)
    r = average_precision(pred, gt, per_section=True)
    assert (r["n_gt"], r["n_pred"], r["tp"], r["fp"], r["fn"]) == (2, 3, 2, 1, 0)
    assert r["ap@0.5"] == pytest.approx(5 / 6)
    m = match_objects(pred, gt, per_section=True)
    assert m["sections"].tolist() == [0, 0, 1] and m["labels"].tolist() == [1, 2, 1]
    with pytest.raises(SpocoInputError):
        average_precision(pred[0], gt[0], per_section=True)


def test_empty_conventions():
    z = np.zeros((4, 4), np.int32)
    gt = z.copy()
    gt[0, 0] = 1
    assert average_precision(z, z)["ap@0.5"] == 1.0
    assert average_precision(z, gt)["ap@0.5"] == 0.0
    assert average_precision(gt, z)["ap@0.5"] == 0.0
    assert average_precision(z, gt)["fn"] == 1 and average_precision(gt, z)["fp"] == 1


def _pair_counts(pred, gt):
    """Brute-force Rand precision/recall over voxel pairs in GT foreground."""
    p, g = pred[gt > 0].ravel(), gt[gt > 0].ravel()
    sp = sg = both = 0
    for i, j in itertools.combinations(range(p.size), 2):
        sp += p[i] == p[j]
        sg += g[i] == g[j]
        both += (p[i] == p[j]) and (g[i] == g[j])
    return both / sp, both / sg  # precision, recall


def test_arand_ignores_gt_background_and_directions():
    gt = np.zeros((3, 8), np.uint8)
    gt[:, 0:3] = 1
    gt[:, 4:7] = 2
    base = adapted_rand_error(gt, gt)
    assert base["arand"] == pytest.approx(0.0)
    extra = gt.copy()
    extra[:, 3] = 9
    extra[:, 7] = 8       # new objects only in GT background
    assert adapted_rand_error(extra, gt) == pytest.approx(base)

    merged = gt.copy()
    merged[merged == 2] = 1
    m = adapted_rand_error(merged, gt)
    assert m["arand"] > 0 and m["rand_precision"] < 1 and m["rand_recall"] == pytest.approx(1)
    assert (m["rand_precision"], m["rand_recall"]) == pytest.approx(_pair_counts(merged, gt))

    split = gt.copy()
    split[0, 0:3] = 5
    s = adapted_rand_error(split, gt)
    assert s["arand"] > 0 and s["rand_recall"] < 1 and s["rand_precision"] == pytest.approx(1)
    assert (s["rand_precision"], s["rand_recall"]) == pytest.approx(_pair_counts(split, gt))


def test_voi_split_merge():
    gt = np.zeros((2, 8), np.uint8)
    gt[:, 0:4] = 1
    gt[:, 4:8] = 2
    split = gt.copy()
    split[:, 0:2] = 3      # GT 1 halved: H(pred|gt) = 0.5 * 1 bit
    v = variation_of_information(split, gt)
    assert v["voi_split"] == pytest.approx(0.5) and v["voi_merge"] == pytest.approx(0.0)
    merged = np.ones_like(gt)
    v = variation_of_information(merged, gt)
    assert v["voi_merge"] == pytest.approx(1.0) and v["voi_split"] == pytest.approx(0.0)
    assert v["voi"] == pytest.approx(1.0)


def test_foreground_restricted():
    gt = blobs()
    pred = np.full_like(gt, 3)
    fr = foreground_restricted(pred, gt)
    assert fr.dtype == pred.dtype and (fr[gt == 0] == 0).all() and (fr[gt > 0] == 3).all()


def test_bad_inputs():
    with pytest.raises(SpocoInputError, match="shape"):
        evaluate_segmentation(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(SpocoInputError, match="integer"):
        average_precision(np.zeros((4, 4), float), np.zeros((4, 4), int))


def test_large_random_is_fast():
    rng = np.random.default_rng(1)
    # many small objects with huge ids, plus voxel-noise labels: lots of sparse pairs
    gt = (rng.integers(0, 3000, (8, 256, 256)).astype(np.uint64) + 2**50) * (rng.random((8, 256, 256)) > 0.2)
    pred = rng.integers(0, 3000, (8, 256, 256)).astype(np.int64)
    t0 = time.perf_counter()
    r = evaluate_segmentation(pred, gt)
    r2 = average_precision(pred, gt, per_section=True)
    assert time.perf_counter() - t0 < 10
    assert 0.0 <= r["map"] <= 1.0 and r2["n_gt"] > 3000


def _naive_tp(pred, gt, t):
    """Reference: literal per-object greedy loop over dense IoUs (tiny inputs only)."""
    pids = [i for i in np.unique(pred) if i]
    gids = [j for j in np.unique(gt) if j]
    # largest first, ties by first appearance in raster order
    first = {i: np.flatnonzero(pred.ravel() == i)[0] for i in pids}
    pids.sort(key=lambda i: (-(pred == i).sum(), first[i]))
    gfirst = {j: np.flatnonzero(gt.ravel() == j)[0] for j in gids}
    free, tp = set(gids), []
    for i in pids:
        ious = {j: ((pred == i) & (gt == j)).sum() / ((pred == i) | (gt == j)).sum() for j in free}
        best = max(ious, key=lambda j: (ious[j], -gfirst[j]), default=None)
        ok = best is not None and ious[best] >= t
        if ok:
            free.discard(best)
        tp.append(ok)
    return tp


@pytest.mark.parametrize("seed", range(4))
def test_matches_naive_greedy(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 5, (6, 7))
    pred = rng.integers(0, 6, (6, 7)) * (rng.random((6, 7)) > 0.3)
    th = (0.1, 0.2, 0.3, 0.5)
    m = match_objects(pred, gt, thresholds=th)
    for k, t in enumerate(th):
        assert m["tp"][k].tolist() == _naive_tp(pred, gt, t)


# ------------------------------------------------------------------ tables, blockwise

def _cases():
    """Hand-made predictions of blobs(): what each should score at IoU 0.5."""
    gt = blobs()
    perfect = gt * 5
    split = gt.copy()
    split[0:4, 0:2] = 8                     # GT 1 (16) split into 8 + 8: one half matches (IoU 0.5), one is false
    merge = gt.copy()
    merge[6:9, 6:12] = 2                    # GT 2 grows into the background: IoU 9/18 (still 0.5)
    merge2 = gt.copy()
    merge2[0:9, 0:9] = 1                    # GT 1 and 2 merged with background: both missed
    missed = gt.copy()
    missed[gt == 3] = 0
    false = gt.copy()
    false[0:2, 8:12] = 9
    return gt, {"perfect": (perfect, 3, 0, 0), "split": (split, 3, 1, 0), "merge": (merge, 3, 0, 0),
                "merge2": (merge2, 1, 1, 2), "missed": (missed, 2, 0, 1), "false": (false, 3, 1, 0),
                "empty": (np.zeros_like(gt), 0, 0, 3)}


def test_hand_made_cases():
    gt, cases = _cases()
    for name, (pred, tp, fp, fn) in cases.items():
        r = evaluate_segmentation(pred, gt)
        assert (r["tp"], r["fp"], r["fn"]) == (tp, fp, fn), name
    r = evaluate_segmentation(cases["perfect"][0], gt)
    assert r["sbd"] == 1.0 and r["abs_dic"] == 0 and r["arand"] == pytest.approx(0) and r["voi"] == pytest.approx(0)
    r = evaluate_segmentation(cases["empty"][0], gt)
    assert r["ap@0.5"] == 0 and r["sbd"] == 0 and r["abs_dic"] == 3
    r = evaluate_segmentation(cases["missed"][0], gt)
    assert r["sbd"] == pytest.approx(2 / 3) and r["abs_dic"] == 1  # BestDice(gt, pred) = (1 + 1 + 0) / 3
    r = evaluate_segmentation(cases["split"][0], gt)
    # pred objects: 8 (Dice 2*8/24 with GT 1), 8 (same), 2 and 3 exact: BD(pred, gt) = (2/3 + 2/3 + 2) / 4
    assert r["sbd"] == pytest.approx(min((2 / 3 * 2 + 2) / 4, (2 / 3 + 2) / 3))


def test_table_metrics_equal_skimage_and_the_array_functions():
    from skimage.metrics import adapted_rand_error as sk_arand, variation_of_information as sk_voi
    gt, cases = _cases()
    for name, (pred, *_) in cases.items():
        r = evaluate_segmentation(pred, gt)
        err, prec, rec = sk_arand(gt, pred, ignore_labels=(0,))
        assert r["arand"] == pytest.approx(err, abs=1e-12) and r["rand_recall"] == pytest.approx(prec)
        split, merge = sk_voi(gt, pred, ignore_labels=(0,))
        assert r["voi_split"] == pytest.approx(max(split, 0), abs=1e-12)
        assert r["voi_merge"] == pytest.approx(max(merge, 0), abs=1e-12)
        ref = average_precision(pred, gt, thresholds=(0.5, 0.75))
        assert r["ap@0.5"] == ref["ap@0.5"] and r["ap@0.75"] == ref["ap@0.75"], name


@pytest.mark.parametrize("per_section", [False, True])
def test_blockwise_tables_give_exactly_the_whole_volumes_metrics(tmp_path, per_section):
    """Blocks that cut objects in every axis (and size ties broken by first appearance
    across blocks): the merged table gives the whole-array metrics bit for bit."""
    import zarr
    from scipy import ndimage
    from spoco_vol.evaluation import contingency, merge_tables, metrics_from_table
    from spoco_vol.evaluation_blockwise import evaluate_volumes
    from conftest import synthetic_blobs
    _, gt = synthetic_blobs((6, 64, 64), n=8, seed=1)
    gt[1:4, 30:40, 30:40] = 77  # an object spanning sections
    pred = (ndimage.grey_dilation(gt, size=(1, 3, 3)).astype(np.int64) * 3).astype(np.uint32)
    pred[2, 10:20, 10:20] = 999
    pred[4, 50:53, 50:53] = 5000
    whole = evaluate_segmentation(pred, gt, per_section)
    tables = [contingency(pred[a:a + 4, b:b + 23, c:c + 40], gt[a:a + 4, b:b + 23, c:c + 40], per_section,
                          offset=(a, b, c), shape=gt.shape)
              for a in range(0, 6, 4) for b in range(0, 64, 23) for c in range(0, 64, 40)]
    merged = metrics_from_table(merge_tables(tables[::-1]))  # the order of the blocks does not matter
    for k, v in whole.items():
        assert merged[k] == v, k
    for name, arr in (("pred", pred), ("gt", gt)):
        z = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=arr.shape, dtype=arr.dtype, chunks=(2, 16, 32))
        z[...] = arr
    r = evaluate_volumes(str(tmp_path / "pred.zarr"), str(tmp_path / "gt.zarr"), per_section, block_voxels=2048)
    for k, v in whole.items():
        assert r[k] == v, k


def test_evaluate_command_json_and_the_per_section_hint(tmp_path):
    """A 2D model's result (one section per object) against 3D labels: one warning that
    --per-section is probably meant; --json prints the metrics as JSON."""
    import json
    import warnings
    import zarr
    from click.testing import CliRunner
    from spoco_vol.cli import cli
    from spoco_vol.errors import SpocoWarning
    from spoco_vol.evaluation_blockwise import evaluate_zarr
    gt = np.zeros((4, 16, 16), np.uint16)
    gt[:, 2:8, 2:8] = 1
    gt[:, 10:14, 9:15] = 2
    pred = (gt + 10 * np.arange(4)[:, None, None] * (gt > 0)).astype(np.uint16)  # per-section ids
    for name, arr in (("pred", pred), ("gt", gt)):
        zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=arr.shape, dtype=arr.dtype, chunks=(1, 16, 16))[...] = arr
    p, g = str(tmp_path / "pred.zarr"), str(tmp_path / "gt.zarr")
    with pytest.warns(SpocoWarning, match="--per-section"):
        r = evaluate_zarr(p, g)
    assert r["tp"] == 0 and "pred_single_section_share" not in r
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate_zarr(p, g, per_section=True)["ap@0.5"] == 1.0
    out = CliRunner().invoke(cli, ["evaluate", "--pred", p, "--gt", g, "--per-section", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["ap@0.5"] == 1.0
    out = CliRunner().invoke(cli, ["evaluate", "--pred", p, "--gt", g, "--per-section"])
    assert "average precision" in out.output and "ap@0.5" in out.output


def test_evaluation_blocks_cover_the_volume_once_within_the_budget():
    from spoco_vol.evaluation_blockwise import evaluation_blocks
    for shape, chunks, budget in (((10, 20, 30), (3, 7, 30), 500), ((10, 20, 30), (4, 20, 30), 1000),
                                  ((5, 6), (2, 2), 10 ** 6)):
        blocks = evaluation_blocks(shape, chunks, budget)
        cover = np.zeros(shape, np.int64)
        for b in blocks:
            cover[b] += 1
            assert np.prod([s.stop - s.start for s in b]) <= max(budget, np.prod(chunks))
        assert (cover == 1).all()
    # a chunk above the budget is cut along its first axis
    assert evaluation_blocks((8, 100, 100), (8, 100, 100), 20_000)[0][0] == slice(0, 2)
