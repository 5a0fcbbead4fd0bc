"""Held-out scores that choose checkpoints and calibrate the background rule.

Two kinds of held-out data:

- dense: whole labeled sections or volumes (``--val-sections``, ``--val-raw``): every
  object is annotated, so the score is AP@0.5, which sees false objects anywhere;
- objects: a seeded share of the *annotated objects* held out from training (the
  default with sparse labels, where no section is fully annotated). Each held-out
  object is scored in a window around it by how well the segmentation recovers it,
  and by the false fragments in its neighbourhood (its pixels dilated by a quarter of
  its radius: where the annotation tells that nothing else is there, since another
  object there would have to overlap the annotated one). A false object far from every
  annotation cannot be told from an unannotated true one, so this score does not see
  it; so held-out objects do not choose the embeddings' background radius (it is
  delta_d; ``calibration.calibrate_background`` says why), and where they choose a
  foreground classifier's radius they take the largest that still recovers them
  (``choose_radius``). They do choose the size floor, by their own F1
  (``choose_size_floor``): a floor loses small held-out objects in proportion to the small
  true ones, and the slivers it removes are seen where they lie next to them.

The object score is the panoptic quality pooled over the held-out objects:
PQ = sum of matched IoUs / (TP + FP/2 + FN/2), a match being IoU >= 0.5.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

RADIUS_TOLERANCE = 0.02  # object score lost at most, for a larger background radius
TTA_MARGIN = 0.05  # held-out score by which embeddings without test-time augmentation must win to drop it
FLOOR_MULTIPLES = (1, 2, 4, 8, 16)  # size floors tried, in multiples of the training's base floor


def object_recovery(seg: np.ndarray, labels: np.ndarray, obj: int) -> dict:
    """How segmentation ``seg`` recovers annotated object ``obj`` of ``labels`` (other
    label values: the other annotated objects; 0: unlabeled). Returns {"tp", "fn", "fp",
    "iou"}: tp/fn 1 or 0, iou the matched IoU (0 unmatched), fp the predicted segments
    lying mostly (> half of their pixels) in the object's neighbourhood that match no
    annotated object (fragments of a split object, background cut next to it)."""
    seg = np.asarray(seg)
    mask = labels == obj
    size = int(mask.sum())
    if size == 0:
        raise ValueError(f"object {obj} is not in the labels")
    ids, inter = np.unique(seg[mask & (seg > 0)], return_counts=True)
    seg_ids, seg_sizes = np.unique(seg[seg > 0], return_counts=True)
    seg_size = dict(zip(seg_ids.tolist(), seg_sizes.tolist()))
    iou = inter / (np.array([seg_size[i] for i in ids.tolist()], np.float64) + size - inter) if ids.size else inter
    best = int(np.argmax(iou)) if ids.size else -1
    matched = ids[best] if ids.size and iou[best] >= 0.5 else None
    # segments matched to any annotated object are not false ones
    taken = set(_matched_segments(seg, labels).tolist())
    radius = max(2, int(round(0.25 * np.sqrt(size / np.pi))))
    near = ndimage.binary_dilation(mask, iterations=radius)
    in_near_ids, in_near = np.unique(seg[near & (seg > 0)], return_counts=True)
    fp = sum(1 for s, c in zip(in_near_ids.tolist(), in_near.tolist())
             if s != matched and s not in taken and c > 0.5 * seg_size[s])
    return {"tp": int(matched is not None), "fn": int(matched is None), "fp": int(fp),
            "iou": float(iou[best]) if matched is not None else 0.0}


def _matched_segments(seg: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Segment ids that match some annotated object at IoU >= 0.5."""
    both = (seg > 0) & (labels > 0)
    if not both.any():
        return np.zeros(0, np.int64)
    pairs, inter = np.unique(np.stack([seg[both], labels[both]]).astype(np.int64), axis=1, return_counts=True)
    s_ids, s_sizes = np.unique(seg[seg > 0], return_counts=True)
    l_ids, l_sizes = np.unique(labels[labels > 0], return_counts=True)
    ss = s_sizes[np.searchsorted(s_ids, pairs[0])]
    ls = l_sizes[np.searchsorted(l_ids, pairs[1])]
    return pairs[0][inter / (ss + ls - inter) >= 0.5]


def panoptic_quality(recoveries: Sequence[dict]) -> float:
    """PQ pooled over held-out objects (object_recovery results)."""
    tp = sum(r["tp"] for r in recoveries)
    fn = sum(r["fn"] for r in recoveries)
    fp = sum(r["fp"] for r in recoveries)
    den = tp + 0.5 * (fp + fn)
    return float(sum(r["iou"] for r in recoveries) / den) if den else 0.0


def keeps_tta(with_tta: float | None, without: float | None) -> bool:
    """Whether a run asked for test-time augmentation (``--tta``) keeps it, from the
    held-out scores of its embeddings with and without it: yes unless the score without
    it is higher by more than TTA_MARGIN (or a score is missing). Averaging the 8
    rotations/flips assumes the network maps a turned image to turned embeddings. One
    that has learned orientation instead (CVPPP at half resolution, the whole plant in
    each patch: a leaf's embedding depends on where it points) averages every object
    towards the others and the background, and the watershed merges or deletes them
    (SPOCO@0.8, test AP@0.5 0.25 with TTA against 0.75 without; benchmarks/RESULTS.md,
    CVPPP). The margin keeps TTA where the scores differ by the noise of a few held-out
    objects: on VNC with 10% of the objects it raised held-out AP@0.5 on five of six seeds."""
    if with_tta is None or without is None:
        return True
    return not without > with_tta + TTA_MARGIN


def held_out_score(segmentations: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                   objects: Sequence[int] | None = None) -> float:
    """The held-out score of segmentations of held-out images: with ``objects`` (one
    held-out object id per image) the pooled object PQ, else the mean AP@0.5 of the
    images' (dense) labels."""
    if objects is not None:
        return panoptic_quality([object_recovery(s, lab, o) for s, lab, o in zip(segmentations, labels, objects)])
    from .evaluation import average_precision
    return float(np.mean([average_precision(s, lab)["ap@0.5"] for s, lab in zip(segmentations, labels)]))


def choose_radius(radii: Sequence[float], scores: Sequence[float], objects_held_out: bool,
                  prefer_larger: bool = True) -> tuple[float, float]:
    """(radius, score) chosen from a radius search. Dense held-out data: the best score
    (among equal ones the larger radius with ``prefer_larger``, else the smaller).
    Held-out objects: the largest radius within RADIUS_TOLERANCE of the best score,
    because a larger radius also removes the false objects far from the annotations
    that this score cannot see."""
    scores = np.asarray(scores, np.float64)
    tolerance = RADIUS_TOLERANCE if objects_held_out else 0.0
    candidates = np.flatnonzero(scores >= scores.max() - tolerance - 1e-12)
    i = int(candidates[-1] if prefer_larger or objects_held_out else candidates[0])
    return (None if radii[i] is None else float(radii[i])), float(scores[i])


def size_floor_counts(segmentations: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                      floors: Sequence[int], objects: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
    """(true, false, missed) objects at IoU 0.5, pooled over held-out images, after each
    size floor of ``floors`` cleans up ``segmentations``. Dense labels: every object of the
    images. With ``objects`` (one held-out object id per image): the held-out objects and
    the false fragments in their neighbourhoods (``object_recovery``)."""
    from .evaluation import average_precision
    from .segmentation import clean_up_segments
    counts = []
    for floor in floors:
        tp = fp = fn = 0
        for k, (seg, lab) in enumerate(zip(segmentations, labels)):
            clean = clean_up_segments(np.asarray(seg), floor)
            m = average_precision(clean, lab) if objects is None else object_recovery(clean, lab, objects[k])
            tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
        counts.append((tp, fp, fn))
    return counts


def f1_of_counts(tp: int, fp: int, fn: int) -> float:
    """F1 of objects: a false object weighs as much as a missed one (1 when there are none)."""
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def choose_size_floor(segmentations: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                      base: int, objects: Sequence[int] | None = None) -> tuple[int, float]:
    """(floor, F1) for segmentations of held-out images (segmented with the floor ``base``
    or none): of the floors ``base`` x FLOOR_MULTIPLES, the one whose cleaned-up
    segmentations have the best F1 of objects matched at IoU 0.5, pooled over the images
    (the smallest floor among equal scores). ``objects``: one held-out object id per
    image (sparse labels); without, the labels are dense.

    Why F1 and not the checkpoint's AP@0.5: AP ranks predictions by size, so false
    fragments below the smallest true object come last in the ranking and hardly lower it,
    while a user counting objects sees every one of them; F1 weighs a false object as much
    as a missed one, so the floor rises only while it removes more false objects than
    true ones.

    With held-out objects the F1 is theirs: a floor that drops a small held-out object
    counts it as missed, and the fragments it removes count only in the objects'
    neighbourhoods, where the annotation tells that they are false. The held-out objects
    are a random draw of the annotated ones, so the true objects a floor drops are seen in
    proportion; the false fragments far from every annotation are not seen at all (they
    may be unannotated true objects), so this choice errs towards the smaller floor.
    """
    if base < 1:
        raise ValueError(f"the base size floor must be at least 1, got {base}")
    floors = [int(base) * m for m in FLOOR_MULTIPLES]
    return floor_of_counts(floors, size_floor_counts(segmentations, labels, floors, objects))


def floor_of_counts(floors: Sequence[int], counts: Sequence[tuple[int, int, int]]) -> tuple[int, float]:
    """(floor, F1): the floor of ``floors`` whose (true, false, missed) ``counts`` have the
    best F1, the smallest among equal scores (``choose_size_floor``'s rule)."""
    scores = [f1_of_counts(*c) for c in counts]
    i = int(np.argmax(scores))  # the first maximum: the smallest floor among ties
    return floors[i], float(scores[i])
