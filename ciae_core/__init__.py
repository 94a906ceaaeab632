"""ciae_core: CIAE panoptic segmentation (model, training, evaluation, export, inference).

Imports no ROS. See docs/DESIGN.md for how the modules fit together. ``ciae_core.Predictor`` and
``ciae_core.PredictorError`` are imported on first use (they pull in torch).
"""

from ciae_core.structures import CategoryInfo, PanopticResult, Segment

__version__ = "0.1.0"

__all__ = ["CategoryInfo", "PanopticResult", "Predictor", "PredictorError", "Segment", "__version__"]


def __getattr__(name):
    if name in ("Predictor", "PredictorError"):
        from ciae_core import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'ciae_core' has no attribute {name!r}")
