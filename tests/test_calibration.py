"""Calibration on held-out data (spoco_vol.calibration): the background radius when the
held-out data cannot choose one."""
import numpy as np
import pytest

from spoco_vol.calibration import calibrate_background
from spoco_vol.checkpoint import InferenceSettings


@pytest.mark.parametrize("objects", [None, [5]])
def test_a_radius_that_no_score_can_choose_is_delta_d(objects):
    """Embeddings in which the held-out object sits on the background embedding: every
    radius deletes it and scores 0. A tie would choose the largest radius (held-out
    objects) or the smallest (dense labels); neither is measured, so the radius is
    delta_d, halfway between the background and objects pushed 2 * delta_d from it."""
    labels = np.zeros((32, 32), np.int64)
    labels[8:20, 8:20] = 5
    embeddings = np.zeros((16, 32, 32), np.float32)
    found = calibrate_background([embeddings], [labels], 0.5, 2.0, InferenceSettings.new(2), objects)
    assert found["background_radius"] == 2.0 and found["background_radius_val_score"] == 0.0
    # an object 4.0 from the background is recovered by every radius up to 4.0: held-out
    # objects take the largest of those, dense labels the smallest
    embeddings[0, labels == 5] = 4.0
    found = calibrate_background([embeddings], [labels], 0.5, 2.0, InferenceSettings.new(2), objects)
    assert found["background_radius_val_score"] == 1.0
    assert found["background_radius"] == (0.5 if objects is None else 4.0)
