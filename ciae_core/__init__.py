"""ciae_core: CIAE panoptic segmentation (model, training, evaluation, export, inference).

Imports no ROS. See docs/DESIGN.md for how the modules fit together.
"""

from ciae_core.structures import CategoryInfo, PanopticResult, Segment

__version__ = "0.1.0"

__all__ = ["CategoryInfo", "PanopticResult", "Segment", "__version__"]
