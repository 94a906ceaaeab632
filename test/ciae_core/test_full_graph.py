"""ciae_core.full_graph: the whole-call graph's body gives the eager predictor's result (on the CPU,
Triton's interpreter), the graph bookkeeping falls back to the eager path, and (cuda tests) the
captured call replays the eager path's results."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ciae_core.full_graph import FullCallGraphs, static_settings, whole_call
from ciae_core.gpu_check_probes import matched_agreement, shipped_weights
from ciae_core.predictor import Predictor, PredictorError
from ciae_core.synth import render_scene

pytest.importorskip("triton")
FEW = dict(detections_per_img=20)  # the interpreter's time grows with the instance slots


def _host_result(p: Predictor, image: np.ndarray, color: str = "rgb"):
    """whole_call on the predictor's device, outside any graph → (id map, segments)."""
    lb = p.letterbox(*image.shape[:2])
    image_hw = torch.tensor([lb.resized_size], device=p.device)
    with torch.inference_mode():
        flat, table = whole_call(torch.from_numpy(image.reshape(-1)), lb, color == "bgr", image_hw,
                                 p._engine.forward_eager, {**static_settings(p), "nms_iterations": 16})
    table = table.cpu().numpy()
    assert table[-1, 0] == 1.0  # converged
    rows = table[:-1][table[:-1, 0] > 0]
    return flat.cpu().numpy().reshape(image.shape[:2]), p._segments(rows)


@pytest.mark.parametrize("color", ["rgb", "bgr"])
def test_whole_call_body_equals_the_eager_call_on_the_cpu(color):
    """No resize (the letterbox is the identity here, so both paths feed the network the same
    pixels; the CUDA path's resize is geometry's own test): same id map and segments."""
    from ciae_core import fusion_triton

    if not fusion_triton.INTERPRETED:
        pytest.skip("needs Triton's interpreter (CPU machine; test/ciae_core/conftest.py)")
    p = Predictor(shipped_weights(), input_size=192, **FEW)
    scene = render_scene(4, 192, 256)[0]
    image = np.ascontiguousarray(scene[..., ::-1]) if color == "bgr" else scene
    want = p(image, color=color)
    id_map, segments = _host_result(p, image, color)
    np.testing.assert_array_equal(id_map, want.id_map)
    assert [(s.id, s.category_id, s.area, s.bbox) for s in segments] == \
        [(s.id, s.category_id, s.area, s.bbox) for s in want.segments]
    assert np.allclose([s.score for s in segments], [s.score for s in want.segments], atol=1e-5)
    assert any(s.isthing for s in segments)


def test_capture_failure_falls_back_to_the_eager_path(caplog):
    """First sighting: None (eager); second: the capture fails here (no CUDA), is logged once, and
    the full path switches itself off; the predictor then answers through the eager path."""
    from ciae_core.geometry import letterbox

    graphs = FullCallGraphs(torch.device("cpu"), lambda x: {}, lambda: {})
    lb = letterbox(96, 128, 96, 1333)
    image = np.zeros((96, 128, 3), np.uint8)
    assert graphs(image, lb, "rgb") is None and graphs.enabled
    with caplog.at_level(logging.WARNING, logger="ciae_core.full_graph"):
        assert graphs(image, lb, "rgb") is None
    assert not graphs.enabled and "capture failed" in caplog.text
    assert graphs(image, lb, "rgb") is None


def test_cuda_graphs_option_values():
    p = Predictor(shipped_weights(), input_size=192, cuda_graphs="full")  # ignored on the CPU, as any graphs
    assert p._full is None and p._engine.cuda_graphs is False
    with pytest.raises(PredictorError, match="cuda_graphs must be"):
        Predictor(shipped_weights(), input_size=192, cuda_graphs="always")


# ----------------------------------------------------------------------------------------------
# on the GPU


def _scenes():
    return [render_scene(s, 480, 640)[0] for s in (3, 8)]


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_full_graph_replays_the_eager_result(precision):
    """Per shape: eager (first sighting), capture, replay; the replayed results match the eager
    path's of the same predictor (same forward kernels, static vs eager postprocess)."""
    p = Predictor(shipped_weights(), device="cuda", input_size=320, precision=precision, cuda_graphs="full")
    for scene in _scenes():
        first, _, third = p(scene), p(scene), p(scene)
        assert set(p.timings) == {"preprocess", "graph", "to_host"}  # the replayed call's stages
        assert matched_agreement(first.id_map, third.id_map) >= 0.999
        assert abs(len(first.segments) - len(third.segments)) <= 1
    assert len(p._full._graphs) == 1 and p._full.enabled and p._full.fallbacks == 0  # one shape


@pytest.mark.cuda
def test_full_graph_redoes_unconverged_frames_eagerly_and_recaptures_after_update():
    p = Predictor(shipped_weights(), device="cuda", input_size=320, cuda_graphs="full", instance_score_threshold=0.0,
                  score_threshold=0.0)
    p._full.nms_iterations = 1  # one step cannot finish NMS with every candidate in play
    scene = _scenes()[0]
    eager = [p(scene) for _ in range(3)][-1]
    assert p._full.fallbacks >= 1 and "graph" not in p.timings  # the eager path answered
    assert eager.id_map.shape == scene.shape[:2]
    p.update(instance_score_threshold=0.3)
    p._full.nms_iterations = 16
    results = [p(scene)]
    assert not p._full._graphs and "graph" not in p.timings  # new settings: a first sighting again
    results += [p(scene) for _ in range(2)]
    assert "graph" in p.timings and len(p._full._graphs) == 1
    assert matched_agreement(results[0].id_map, results[2].id_map) >= 0.999
