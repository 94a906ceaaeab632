"""ciae_core.bench_graph_stages: the whole-call path's stages as separate CUDA graphs (CUDA only)."""

from __future__ import annotations

import pytest


@pytest.mark.cuda
def test_stage_graphs_add_up_to_about_the_whole_graph():
    from ciae_core.bench_graph_stages import GRAPH_STAGES, graph_stage_breakdown
    from ciae_core.gpu_check_probes import shipped_weights
    from ciae_core.predictor import Predictor
    from ciae_core.synth import render_scene

    p = Predictor(shipped_weights(), device="cuda", input_size=320, cuda_graphs="full")
    scene = render_scene(2, 480, 640)[0]
    for _ in range(4):  # eager, capture, replays
        p(scene)
    whole = p.timings["graph"] + p.timings["to_host"]
    stages = graph_stage_breakdown(p, scene, repeats=5)
    assert tuple(stages) == GRAPH_STAGES and all(v > 0 for v in stages.values())
    assert 0.3 * whole < sum(stages.values()) < 3 * whole + 1.0
