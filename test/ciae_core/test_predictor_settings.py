"""Predictor settings without a model: threshold checks and aliases, input-size policy, no torch import."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ciae_core.predictor_error import PredictorError
from ciae_core.predictor_settings import (SMALL_BACKBONES, THRESHOLD_NAMES, _checked_thresholds, default_input_size,
                                          input_size_range)


def test_checked_thresholds_converts_aliases_and_types_and_leaves_the_input_alone():
    current = {"score_threshold": 0.05, "min_stuff_area": 0}
    new = _checked_thresholds(current, {"stuff_area_min": np.int64(64), "detections_per_img": 50.0,
                                        "nms_threshold": np.float32(0.5)})
    assert new == {"score_threshold": 0.05, "min_stuff_area": 64, "detections_per_img": 50, "nms_threshold": 0.5}
    assert type(new["min_stuff_area"]) is int and type(new["nms_threshold"]) is float
    assert current == {"score_threshold": 0.05, "min_stuff_area": 0}


@pytest.mark.parametrize("changes,match", [({"score_treshold": 0.2}, "unknown threshold"),
                                           ({"score_threshold": True}, "finite number"),
                                           ({"score_threshold": float("nan")}, "finite number"),
                                           ({"instance_score_threshold": 1.5}, r"\[0, 1\]"),
                                           ({"pre_nms_topk": 2.5}, "positive integer"),
                                           ({"min_instance_area": -1}, "non-negative integer")])
def test_checked_thresholds_refuses_with_one_line(changes, match):
    with pytest.raises(PredictorError, match=match) as e:
        _checked_thresholds({}, changes)
    assert "\n" not in str(e.value)


def test_input_size_policy_per_backbone():
    for backbone in SMALL_BACKBONES:
        assert default_input_size(backbone) == 320 and input_size_range(backbone) == (192, 800)
    assert default_input_size("resnet50") == 640 and input_size_range("resnet50") == (512, 800)
    for backbone in SMALL_BACKBONES + ("resnet50", "resnet101"):
        lo, hi = input_size_range(backbone)
        assert lo <= default_input_size(backbone) <= hi


def test_settings_import_without_torch():
    code = ("import sys, ciae_core.predictor_settings as s; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(len(s.THRESHOLD_NAMES))")
    repo = pathlib.Path(__file__).resolve().parents[2]  # the source tree, not an installed copy
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo).stdout
    assert int(out) == len(THRESHOLD_NAMES)
