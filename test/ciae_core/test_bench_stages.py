"""ciae_core.bench_stages: the stage breakdown of one call (CPU here; CUDA events in the cuda test)."""

from __future__ import annotations

import pytest
import torch

from ciae_core.bench_stages import STAGES, SYNC_TIMING, StageMarks, ours_stage_breakdown
from ciae_core.predictor import Predictor
from ciae_core.synth import render_scene


def test_stage_marks_on_the_cpu():
    m = StageMarks(torch.device("cpu"))
    m.mark("a")
    sum(range(10000))
    m.mark("b")
    assert m.ms("a", "b") >= 0 and m.method == SYNC_TIMING


def _breakdown(device: str, graphs_flag=None) -> tuple[dict, Predictor]:
    from ciae_core.gpu_check_probes import shipped_weights

    p = Predictor(shipped_weights(), device=device, input_size=192, detections_per_img=10)
    if graphs_flag is not None:
        p._engine.cuda_graphs = graphs_flag
    scenes = [render_scene(i, 120, 160)[0] for i in range(2)]
    return ours_stage_breakdown(p, scenes, torch.device(device), warmup=1, repeats=2), p


def test_breakdown_has_every_stage_and_restores_the_engine():
    """The staged calls run the forward eagerly (a truthy flag would mean graphs: on the CPU they
    would fail) and the engine's flag is restored afterwards."""
    marker = object()
    stages, p = _breakdown("cpu", graphs_flag=marker)
    assert tuple(stages) == STAGES and all(v >= 0 for v in stages.values())
    assert stages["backbone_fpn"] > 0 and stages["proposal_selection"] > 0
    assert p._engine.cuda_graphs is marker


@pytest.mark.cuda
def test_breakdown_with_cuda_events():
    stages, p = _breakdown("cuda")
    assert tuple(stages) == STAGES and all(v >= 0 for v in stages.values())
    assert stages["backbone_fpn"] > 0 and stages["heads"] > 0 and stages["fusion"] > 0
    assert p._engine.cuda_graphs is True  # graphs off for the staged calls only


def test_eager_calls_turns_both_graph_paths_off_and_back_on():
    from ciae_core.bench_stages import eager_calls
    from ciae_core.full_graph import FullCallGraphs, static_settings
    from ciae_core.gpu_check_probes import shipped_weights

    p = Predictor(shipped_weights(), input_size=192)
    marker = object()
    p._engine.cuda_graphs = marker
    p._full = FullCallGraphs(torch.device("cpu"), p._engine.forward_eager, lambda: static_settings(p))
    with eager_calls(p):
        assert p._engine.cuda_graphs is False and not p._full.enabled
    assert p._engine.cuda_graphs is marker and p._full.enabled
    with pytest.raises(RuntimeError), eager_calls(p):
        raise RuntimeError("boom")
    assert p._engine.cuda_graphs is marker and p._full.enabled
