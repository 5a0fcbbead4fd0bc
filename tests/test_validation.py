"""Held-out scores (spoco_vol.validation): recovering held-out objects, PQ, radius and size-floor choice."""
import numpy as np
import pytest

from spoco_vol.evaluation import average_precision
from spoco_vol.validation import (RADIUS_TOLERANCE, choose_radius, choose_size_floor, held_out_score,
                                  object_recovery, panoptic_quality, size_floor_counts)


def _disc(shape, cy, cx, r):
    y, x = np.indices(shape)
    return (y - cy) ** 2 + (x - cx) ** 2 < r * r


def _scene():
    """A held-out object (id 5) and a training object (id 2) elsewhere; 0 = unlabeled."""
    labels = np.zeros((64, 64), np.int64)
    labels[_disc(labels.shape, 20, 20, 8)] = 5
    labels[_disc(labels.shape, 48, 48, 6)] = 2
    return labels


def test_a_perfect_segmentation_recovers_the_object():
    labels = _scene()
    r = object_recovery(labels * 3, labels, 5)  # other ids, same partition
    assert r == {"tp": 1, "fn": 0, "fp": 0, "iou": 1.0}


def test_a_split_object_counts_its_fragment_as_false():
    labels = _scene()
    seg = labels.copy()
    seg[(labels == 5) & (np.indices(labels.shape)[1] > 24)] = 9  # the right quarter split off
    r = object_recovery(seg, labels, 5)
    assert r["tp"] == 1 and r["fp"] == 1 and 0.5 < r["iou"] < 1


def test_a_halved_object_is_missed():
    labels = _scene()
    seg = labels.copy()
    x = np.indices(labels.shape)[1]
    seg[(labels == 5) & (x >= 17)] = 9   # three pieces, none half of it: no match at IoU 0.5
    seg[(labels == 5) & (x >= 23)] = 10
    r = object_recovery(seg, labels, 5)
    assert r["tp"] == 0 and r["fn"] == 1 and r["iou"] == 0


def test_false_objects_next_to_it_count_far_ones_and_annotated_ones_do_not():
    labels = _scene()
    seg = labels.copy()
    seg[_disc(labels.shape, 20, 28, 2) & (labels == 0)] = 7   # a speck right at its border
    seg[_disc(labels.shape, 5, 55, 3)] = 8                     # far away: cannot be told from an object
    r = object_recovery(seg, labels, 5)
    assert r["tp"] == 1 and r["fp"] == 1
    # the training object next door matches its annotation: never a false object
    labels2 = labels.copy()
    labels2[_disc(labels.shape, 20, 33, 4) & (labels == 0)] = 3
    seg2 = labels2.copy()
    assert object_recovery(seg2, labels2, 5)["fp"] == 0


def test_panoptic_quality_pools_objects():
    rs = [{"tp": 1, "fn": 0, "fp": 1, "iou": 0.8}, {"tp": 0, "fn": 1, "fp": 0, "iou": 0.0}]
    assert panoptic_quality(rs) == pytest.approx(0.8 / (1 + 0.5 * 2))
    assert panoptic_quality([]) == 0.0
    labels = _scene()
    assert held_out_score([labels], [labels], [5]) == 1.0
    assert held_out_score([labels], [labels]) == 1.0  # dense: AP@0.5
    assert held_out_score([np.zeros_like(labels)], [labels], [5]) == 0.0


def test_choose_radius():
    radii = [0.5, 1.0, 1.5, 2.0]
    scores = [0.6, 0.8, 0.8 - RADIUS_TOLERANCE / 2, 0.5]
    assert choose_radius(radii, scores, objects_held_out=False, prefer_larger=False) == (1.0, 0.8)
    # held-out objects: the largest radius within the tolerance of the best
    assert choose_radius(radii, scores, objects_held_out=True) == (1.5, pytest.approx(scores[2]))
    tied = [0.8, 0.8, 0.7, 0.5]
    assert choose_radius(radii, tied, False, prefer_larger=False)[0] == 0.5
    assert choose_radius(radii, tied, False, prefer_larger=True)[0] == 1.0


def test_the_size_floor_rises_while_it_removes_more_false_objects_than_true_ones():
    """Two objects (about 1250 and 110 pixels) and four 20-pixel slivers along the large
    one's border. AP@0.5 ranks the slivers last and does not see them; F1 does, so the
    floor (base 10: 10, 20, ..., 160) rises to 40, and no further: 160 would drop the
    small object, and among equal scores the smallest floor wins."""
    gt = np.zeros((80, 80), np.int64)
    gt[_disc(gt.shape, 30, 30, 20)] = 1
    gt[_disc(gt.shape, 65, 65, 6)] = 2
    assert 100 <= (gt == 2).sum() < 160
    seg = gt.copy()
    for k, (y, x) in enumerate([(9, 25), (47, 25), (25, 9), (25, 47)]):
        seg[y:y + 4, x:x + 5] = 10 + k  # 20 pixels cut from the large object's border
    assert average_precision(seg, gt)["ap@0.5"] == 1.0 and average_precision(seg, gt)["fp"] == 4
    floor, f1 = choose_size_floor([seg], [gt], base=10)
    assert (floor, f1) == (40, 1.0)
    # one image without slivers beside it: pooled counts, the same choice
    assert choose_size_floor([seg, gt], [gt, gt], base=10)[0] == 40
    # nothing to remove: the base floor stays
    assert choose_size_floor([gt], [gt], base=10) == (10, 1.0)
    with pytest.raises(ValueError):
        choose_size_floor([gt], [gt], base=0)
    # the counts behind the choice (benchmarks/size_floors.py prints them): the four slivers
    # are false objects up to floor 20, the small object is lost (missed) at 160
    assert size_floor_counts([seg], [gt], [10, 20, 40, 160]) == [(2, 4, 0), (2, 4, 0), (2, 0, 0), (1, 0, 1)]


def test_held_out_objects_choose_the_size_floor_from_their_neighbourhoods():
    """Sparse labels: the same scene with object 1 held out in one window and object 2 in
    another, and 0 meaning unlabeled. The slivers cut from object 1 lie in its
    neighbourhood, so they are false; a 30-pixel segment far from both is not seen (it may
    be an unannotated object). The floor rises to 40 and no further (160 would lose the
    small held-out object), as with dense labels."""
    gt = np.zeros((80, 80), np.int64)
    gt[_disc(gt.shape, 30, 30, 20)] = 1
    gt[_disc(gt.shape, 65, 65, 6)] = 2
    seg = gt.copy()
    for k, (y, x) in enumerate([(9, 25), (47, 25), (25, 9), (25, 47)]):
        seg[y:y + 4, x:x + 5] = 10 + k
    seg[70:76, 2:7] = 20  # 30 pixels, far from both objects
    assert size_floor_counts([seg, seg], [gt, gt], [10, 40, 160], objects=[1, 2]) == \
        [(2, 4, 0), (2, 0, 0), (1, 0, 1)]
    assert choose_size_floor([seg, seg], [gt, gt], base=10, objects=[1, 2]) == (40, 1.0)
    # with dense labels the far segment is a false object: the floor must remove it too
    assert size_floor_counts([seg], [gt], [10, 40]) == [(2, 5, 0), (2, 0, 0)]


def test_tta_is_kept_unless_the_score_without_it_is_higher_by_more_than_the_margin():
    from spoco_vol.validation import TTA_MARGIN, keeps_tta
    assert keeps_tta(0.40, 0.40) and keeps_tta(0.40, 0.40 + TTA_MARGIN) and keeps_tta(0.5, 0.1)
    assert not keeps_tta(0.14, 0.40) and not keeps_tta(0.0, TTA_MARGIN + 0.01)
    assert keeps_tta(None, 0.9) and keeps_tta(0.1, None)  # nothing scored: as asked
