"""The torch engine: channels_last on the CPU, CUDA graphs (through the Predictor that configures it)."""

from __future__ import annotations

import pathlib
import sys

import cv2
import numpy as np
import pytest
import torch

from ciae_core.predictor import Predictor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_predictor import FAST, SAMPLE_IMAGES, matched_agreement, tiny_model_path  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> pathlib.Path:
    return tiny_model_path(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def coco_image() -> np.ndarray:
    path = sorted(SAMPLE_IMAGES.glob("*.jpg"))[0]
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].copy()


def test_cpu_default_is_channels_last_with_the_same_results_as_nchw(weights):
    """channels_last is the CPU default (oneDNN's NHWC convolutions are faster there); it must not
    change a single pixel of the result on the shipped model's scenes."""
    from ciae_core.synth import render_scene

    default, nchw = Predictor(weights), Predictor(weights, channels_last=False)
    assert default._engine.channels_last and not nchw._engine.channels_last
    conv = next(m for m in default._engine.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for seed in (1, 2):
        scene = render_scene(seed, 240, 320)[0]
        a, b = default(scene), nchw(scene)
        np.testing.assert_array_equal(a.id_map, b.id_map)
        assert [(s.id, s.category_id) for s in a.segments] == [(s.id, s.category_id) for s in b.segments]


@pytest.mark.cuda
def test_cuda_graphs_match_eager(weights, coco_image):
    small = np.ascontiguousarray(coco_image[50:351, 20:221])
    eager = Predictor(weights, device="cuda", input_size=256, cuda_graphs=False, **FAST)
    graphed = Predictor(weights, device="cuda", input_size=256, **FAST)  # graphs are the CUDA default
    for k, im in enumerate((coco_image, small) * 3):  # eager (first sighting), capture, replay
        a, b = eager(im), graphed(im)
        assert matched_agreement(a.id_map, b.id_map) >= 0.999
        assert len(graphed._engine._graphs) == max(0, min(2, k - 1))
    assert graphed._engine.cuda_graphs
