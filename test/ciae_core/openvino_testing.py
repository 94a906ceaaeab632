"""Shared inputs of the OpenVINO tests: the shipped model exported once per test process, test images.

Exports are cached per process (several test modules use them; an export of the small model takes
seconds to tens of seconds on a loaded 2-core machine). Files live in a temporary directory removed
at exit.
"""

from __future__ import annotations

import atexit
import functools
import pathlib
import shutil
import tempfile

import cv2
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
SAMPLE_IMAGES = REPO / "test" / "data" / "coco-panoptic-sample" / "images"


@functools.lru_cache(maxsize=1)
def work_dir() -> pathlib.Path:
    path = pathlib.Path(tempfile.mkdtemp(prefix="ciae-openvino-tests-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def shipped_weights() -> pathlib.Path:
    (path,) = sorted((REPO / "models").glob("*.safetensors"))
    return path


@functools.lru_cache(maxsize=None)
def exported_onnx(shape: str = "dynamic") -> pathlib.Path:
    """The shipped model as ONNX: ``"dynamic"`` or a fixed ``"HxW"`` (batch 1)."""
    from ciae_core.export import export_checkpoint

    out = work_dir() / f"small-{shape}.onnx"
    if shape == "dynamic":
        export_checkpoint(shipped_weights(), out, dynamic=True)
    else:
        export_checkpoint(shipped_weights(), out, size=tuple(int(v) for v in shape.split("x")))
    return out


def coco_images() -> list[np.ndarray]:
    """The COCO sample images, RGB."""
    return [np.ascontiguousarray(cv2.imread(str(p), cv2.IMREAD_COLOR)[..., ::-1])
            for p in sorted(SAMPLE_IMAGES.glob("*.jpg"))]


def rendered_scenes(count: int = 3, height: int = 256, width: int = 320, seed: int = 2000) -> list[tuple]:
    """Held-out synthetic scenes ``(image, pan_ids, segments_info)``: seed 2000 is used neither in
    training (0), validation (1000) nor int8 calibration (3000)."""
    from ciae_core.synth import render_scene

    return [render_scene((seed, i), height, width) for i in range(count)]


def matched_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels on which two id maps agree after mapping each id of ``a`` to the id of
    ``b`` it overlaps most (ids can be numbered differently when two scores swap order)."""
    total = 0
    for k in np.unique(a):
        _, counts = np.unique(b[a == k], return_counts=True)
        total += counts.max()
    return total / a.size
