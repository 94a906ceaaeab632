"""ciae_core.bench_contenders: interleaved timed rounds, the onnxruntime provider option, the selection timing."""

from __future__ import annotations

import pytest


def test_timed_calls_interleave_models_round_by_round():
    """Every round calls each model once on the same image, the starting model rotating; a model
    that fails is dropped with its error while the others go on."""
    import torch

    from ciae_core.bench_contenders import Contender, interleaved_rounds

    log = []

    def model(name, fail_at=None):
        def call(i):
            if i == fail_at:
                raise RuntimeError(f"{name} broke")
            log.append((name, i))
        return Contender(name, "torch", call, {})

    a, b, c = model("a"), model("b"), model("c", fail_at=2)
    failed = interleaved_rounds([a, b, c], torch.device("cpu"), repeats=4)
    assert log[:6] == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1)]
    assert log[6:] == [("a", 2), ("b", 2), ("a", 3), ("b", 3)]  # round 2 starts at c, which fails
    assert [(x.model, str(e)) for x, e in failed] == [("c", "c broke")]
    assert len(a.times) == len(b.times) == 4 and c.times is None and all(t >= 0 for t in a.times)


def test_ort_providers_option():
    import torch

    from ciae_core.bench_contenders import ort_providers

    assert ort_providers(None, torch.device("cpu")) is None  # the predictor's choice: CPU
    assert ort_providers(None, torch.device("cuda")) == ["cuda"]
    assert ort_providers("tensorrt, cuda", torch.device("cuda")) == ["tensorrt", "cuda"]
    assert ort_providers("cuda", torch.device("cpu")) == ["cuda"]  # passed on: that row fails, visibly


def test_stage_breakdown_times_the_selection_inside_the_postprocess_call():
    """The fusion stage is postprocess minus the proposal selection of that same call: a timing
    wrapper around ciae_core.fusion.select_proposals records each call (what panoptic_from_raw
    calls) and is removed afterwards, also when the timed code raises."""
    import torch

    from ciae_core import fusion
    from ciae_core.bench_contenders import _timed_proposal_selection

    select = fusion.select_proposals
    a, t = 6, 3
    g = torch.Generator().manual_seed(0)
    raw = dict(cls_logits=torch.randn(1, a, t, generator=g), box_regression=torch.rand(1, a, 4, generator=g) * 8,
               centerness=torch.randn(1, a, generator=g), points=torch.rand(a, 2, generator=g) * 16)
    spans = []
    with _timed_proposal_selection(torch.device("cpu"), spans):
        out = fusion.select_proposals(*raw.values(), [(16, 16)], score_threshold=0.0)
    assert len(spans) == 1 and spans[0] >= 0 and fusion.select_proposals is select
    assert torch.equal(out[0]["boxes"], select(*raw.values(), [(16, 16)], score_threshold=0.0)[0]["boxes"])
    with pytest.raises(RuntimeError, match="stop"):
        with _timed_proposal_selection(torch.device("cpu"), spans):
            raise RuntimeError("stop")
    assert fusion.select_proposals is select and len(spans) == 1
