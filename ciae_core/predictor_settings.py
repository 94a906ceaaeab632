"""What a :class:`~ciae_core.predictor.Predictor` accepts: threshold names and checks, input-size policy.

Plain Python (no torch), so a caller (e.g. the ROS node's parameter layer) can check settings
without loading a model.

* **Thresholds** are in network-input pixels (``min_stuff_area`` is interpreted by the fusion
  relative to ``stuff_area_reference``); defaults come from the model config
  (:class:`ciae_core.model.CIAEConfig`); :meth:`~ciae_core.predictor.Predictor.update` changes them
  between calls.
* **Input size**: default 640 for ResNet-50/101 models and 320 for the small backbones
  (resnet18/34, mobilenet_v3_large); the valid range is [512, 800] for the large backbones (the
  paper's operating points) and [192, 800] for the small ones; ``input_size_range`` overrides it.
* ``ENGINES`` and ``PRECISIONS``: the ``engine`` and ``precision`` values the predictor takes;
  ``ENGINE_PRECISIONS``: which precisions each engine runs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ciae_core.predictor_error import PredictorError
from ciae_core.user_input import quote

THRESHOLD_NAMES = ("score_threshold", "pre_nms_topk", "nms_threshold", "detections_per_img",
                   "instance_score_threshold", "min_stuff_area", "stuff_area_reference", "min_visible_fraction",
                   "min_instance_area", "outside_box_value")
_UNIT_INTERVAL = ("score_threshold", "nms_threshold", "instance_score_threshold", "min_visible_fraction")
# accepted alternative spellings (the ROS node's parameter names)
THRESHOLD_ALIASES = {"stuff_area_min": "min_stuff_area"}
_POSITIVE_INT = ("pre_nms_topk", "detections_per_img", "stuff_area_reference")
_NON_NEGATIVE_INT = ("min_stuff_area", "min_instance_area")
SMALL_BACKBONES = ("resnet18", "resnet34", "mobilenet_v3_large")
ENGINES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "auto")
# what each engine runs ("auto": resolved at construction, :func:`ciae_core.cpu_features.choose_precision`)
ENGINE_PRECISIONS = {"torch": ("fp32", "fp16", "bf16", "auto"), "onnxruntime": ("fp32", "auto"),
                     "openvino": ("fp32", "bf16", "int8", "fp16", "auto")}


def _checked_thresholds(current: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``current`` updated with ``changes`` (names or :data:`THRESHOLD_ALIASES`), each value checked;
    :class:`PredictorError` (one line) on an unknown name or a bad value."""
    changes = {THRESHOLD_ALIASES.get(k, k): v for k, v in changes.items()}
    unknown = sorted(set(changes) - set(THRESHOLD_NAMES))
    if unknown:
        raise PredictorError(f"unknown threshold(s) {', '.join(unknown)}; valid: {', '.join(THRESHOLD_NAMES)}")
    new = dict(current)
    for k, v in changes.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise PredictorError(f"{k} must be a finite number, got {quote(v)}")
        if k in _UNIT_INTERVAL and not 0.0 <= v <= 1.0:
            raise PredictorError(f"{k} must be in [0, 1], got {v}")
        if k in _POSITIVE_INT and (int(v) != v or v < 1):
            raise PredictorError(f"{k} must be a positive integer, got {v}")
        if k in _NON_NEGATIVE_INT and (int(v) != v or v < 0):
            raise PredictorError(f"{k} must be a non-negative integer, got {v}")
        new[k] = int(v) if k in _POSITIVE_INT + _NON_NEGATIVE_INT else float(v)
    return new


# ----------------------------------------------------------------------------------------------
# input-size policy


def check_engine_and_precision_names(engine: str, precision: str) -> None:
    """:class:`PredictorError` (one line) for an unknown engine or precision, or int8 outside OpenVINO."""
    if engine not in ENGINES:
        raise PredictorError(f"unknown engine {quote(engine)}; choose one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise PredictorError(f"unknown precision {quote(precision)}; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and engine != "openvino":
        raise PredictorError(f"unknown precision 'int8' for the {engine} engine: int8 runs in engine='openvino' "
                             f"from a file written by ciae-export --int8")


def default_input_size(backbone: str) -> int:
    """640 for ResNet-50/101 models (between the paper's 512 and 800 points), 320 for the small
    backbones (the shipped MobileNetV3 model, trained at 224-288, scores PQ 85.3 at 320 against
    82.9 at 256 on its held-out scenes, models/README.md: small things gain from the upscale)."""
    return 320 if backbone in SMALL_BACKBONES else 640


def input_size_range(backbone: str) -> tuple[int, int]:
    """Valid shorter-side sizes: the paper's [512, 800] for large backbones, [192, 800] for small."""
    return (192, 800) if backbone in SMALL_BACKBONES else (512, 800)


def input_size_range_for(config) -> tuple[int, int]:
    """:func:`input_size_range` of a model config."""
    return input_size_range(config.backbone)
