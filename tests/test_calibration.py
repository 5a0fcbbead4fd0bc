"""Calibration on held-out data (spoco_vol.calibration): the background radius when the
held-out data cannot choose one, and why held-out objects do not choose it."""
import numpy as np
import pytest

from spoco_vol.calibration import calibrate_background, held_out_segmentation
from spoco_vol.checkpoint import InferenceSettings


@pytest.mark.parametrize("objects", [None, [5]])
def test_a_radius_that_no_score_can_choose_is_delta_d(objects):
    """Embeddings in which the held-out object sits on the background embedding: every
    radius deletes it and scores 0. With dense labels a tie would choose the smallest
    radius, which is not measured either, so the radius is delta_d (halfway between the
    background and objects pushed 2 * delta_d from it), as held-out objects always
    leave it; the score says that nothing was recovered."""
    labels = np.zeros((32, 32), np.int64)
    labels[8:20, 8:20] = 5
    embeddings = np.zeros((16, 32, 32), np.float32)
    found = calibrate_background([embeddings], [labels], 0.5, 2.0, InferenceSettings.new(2), objects)
    assert found["background_radius"] == 2.0 and found["background_radius_val_score"] == 0.0
    # an object 4.0 from the background is recovered by every radius up to 4.0: dense
    # labels take the smallest of those, held-out objects leave the radius at delta_d
    embeddings[0, labels == 5] = 4.0
    found = calibrate_background([embeddings], [labels], 0.5, 2.0, InferenceSettings.new(2), objects)
    assert found["background_radius_val_score"] == 1.0
    assert found["background_radius"] == (0.5 if objects is None else 2.0)


def test_held_out_objects_leave_the_radius_at_delta_d():
    """Sparse labels: an unannotated object (label 0) whose embeddings lie 3.0 from the
    background is invisible to the held-out object's score, which is as high at a radius
    of 4.0 as at 2.0; the radius stays delta_d, so the unannotated object stays an object.
    A held-out object nearer the background than delta_d does not pull the radius down
    either (its noisy score would, on real data, leave the background as false objects):
    it is lost, and the score says so."""
    labels = np.zeros((48, 48), np.int64)
    labels[4:16, 4:16] = 5
    embeddings = np.zeros((16, 48, 48), np.float32)
    embeddings[0, labels == 5] = 4.0
    embeddings[1, 28:40, 28:40] = 3.0  # not annotated
    settings = InferenceSettings.new(2)
    found = calibrate_background([embeddings], [labels], 0.5, 2.0, settings, [5])
    assert found["background_radius"] == 2.0 and found["background_radius_val_score"] == 1.0
    seg = held_out_segmentation(embeddings, 2.0, settings.with_background(found["background_embedding"],
                                                                           found["background_radius"]))
    assert seg[34, 34] > 0 and seg[10, 10] > 0 and seg[34, 34] != seg[10, 10] and seg[24, 44] == 0
    embeddings[0, labels == 5] = 1.6
    found = calibrate_background([embeddings], [labels], 0.5, 2.0, settings, [5])
    assert found["background_radius"] == 2.0 and found["background_radius_val_score"] == 0.0
    # fully labeled, the same section scores every radius (AP@0.5 sees false objects
    # anywhere) and takes the smallest that recovers both objects
    labels[28:40, 28:40] = 7
    found = calibrate_background([embeddings], [labels], 0.5, 2.0, settings)
    assert found["background_radius"] == 0.5 and found["background_radius_val_score"] == 1.0
