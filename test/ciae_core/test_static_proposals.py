"""ciae_core.static_proposals: the fixed-shape proposal selection equals the eager one —
torchvision's batched_nms on random boxes with tied scores, the convergence flag on a suppression
chain, and ciae_core.fusion.select_proposals on random raw outputs and the shipped model's."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from ciae_core.fusion import select_proposals
from ciae_core.static_proposals import greedy_nms_fixed_point, select_proposals_static


def _random_boxes(g: torch.Generator, n: int, clusters: int = 12) -> torch.Tensor:
    """Boxes around a few centres (so that many overlap), xyxy in a 600 px image."""
    centre = torch.rand(clusters, 2, generator=g) * 500 + 50
    c = centre[torch.randint(0, clusters, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 12
    wh = torch.rand(n, 2, generator=g) * 80 + 10
    return torch.cat([c - wh / 2, c + wh / 2], dim=1).clamp(0, 600)


def _static_keep(boxes, scores, labels, thr, iterations):
    """Indices kept by the fixed point, in NMS order (score descending, ties by index)."""
    order = scores.sort(descending=True, stable=True).indices
    ones = torch.ones(1, len(order), dtype=torch.bool)
    keep, converged = greedy_nms_fixed_point(boxes[order][None], labels[order][None], ones, ones, thr, iterations)
    return order[keep[0]], bool(converged[0])


@pytest.mark.parametrize("seed", range(6))
def test_fixed_point_nms_equals_batched_nms_with_tied_scores(seed):
    g = torch.Generator().manual_seed(seed)
    n = 400
    boxes = _random_boxes(g, n)
    scores = torch.randint(1, 9, (n,), generator=g).float() / 8  # 8 levels: many ties
    labels = torch.randint(0, 4, (n,), generator=g)
    for thr in (0.3, 0.5, 0.7):
        want = batched_nms(boxes, scores, labels, thr)
        got, converged = _static_keep(boxes, scores, labels, thr, iterations=64)
        assert converged and torch.equal(got, want), (seed, thr)


def test_convergence_flag_on_a_suppression_chain():
    """Each box overlaps only its neighbours (IoU 0.67 > 0.5), scores fall along the chain: greedy
    keeps every other box, and the fixed point needs about one step per box of the chain."""
    n = 12
    x = torch.arange(n).float() * 4
    boxes = torch.stack([x, torch.zeros(n), x + 20, torch.full((n,), 20.0)], dim=1)
    scores = torch.linspace(0.9, 0.3, n)
    labels = torch.zeros(n, dtype=torch.long)
    want = batched_nms(boxes, scores, labels, 0.5)
    got, converged = _static_keep(boxes, scores, labels, 0.5, iterations=3)
    assert not converged
    got, converged = _static_keep(boxes, scores, labels, 0.5, iterations=n + 1)
    assert converged and torch.equal(got, want) and len(want) < n


def _eager_queries(raw, sizes, **kw):
    ist = kw.pop("instance_score_threshold")
    props = select_proposals(raw["cls_logits"], raw["box_regression"], raw["centerness"], raw["points"], sizes, **kw)
    return [{k: v[p["scores"] >= ist] for k, v in p.items()} for p in props]


def _check_equal(static, eager, q):
    assert static.converged.all()
    for i, p in enumerate(eager):
        m = p["scores"].numel()
        assert int(static.valid[i].sum()) == m and static.valid[i, :m].all()
        assert torch.equal(static.boxes[i, :m], p["boxes"]) and torch.equal(static.scores[i, :m], p["scores"])
        assert torch.equal(static.labels[i, :m], p["labels"]) and torch.equal(static.locations[i, :m], p["locations"])
        assert static.boxes.shape[1] == q


@pytest.mark.parametrize("pre_nms_topk, ist", [(1000, 0.3), (50, 0.3), (1000, 0.0), (7, 0.0)])
def test_static_selection_equals_the_eager_one_on_random_outputs(pre_nms_topk, ist):
    """More and fewer candidates than pre_nms_topk (random float scores: no ties at the cut)."""
    g = torch.Generator().manual_seed(pre_nms_topk)
    n, a, t = 2, 300, 5
    points = torch.rand(a, 2, generator=g) * 200
    raw = dict(cls_logits=torch.randn(n, a, t, generator=g) * 2, box_regression=torch.rand(n, a, 4, generator=g) * 40,
               centerness=torch.randn(n, a, generator=g), points=points)
    sizes = [(180, 200), (200, 150)]
    kw = dict(score_threshold=0.05, pre_nms_topk=pre_nms_topk, nms_threshold=0.6, detections_per_img=30,
              instance_score_threshold=ist)
    eager = _eager_queries(raw, sizes, **kw)
    static = select_proposals_static(*raw.values(), torch.tensor(sizes, dtype=torch.float32), **kw)
    _check_equal(static, eager, 30)
    assert any(p["scores"].numel() for p in eager)


def test_static_selection_equals_the_eager_one_on_the_shipped_model(shipped_model):
    from ciae_core.synth import render_scene

    images = torch.stack([torch.from_numpy(render_scene(s, 192, 256)[0]).permute(2, 0, 1).float() for s in (1, 2)])
    with torch.inference_mode():
        raw = shipped_model.forward_raw(images)
    sizes = [(192, 256), (180, 240)]
    cfg = shipped_model.config
    kw = dict(score_threshold=cfg.score_threshold, pre_nms_topk=cfg.pre_nms_topk, nms_threshold=cfg.nms_threshold,
              detections_per_img=cfg.detections_per_img, instance_score_threshold=cfg.instance_score_threshold)
    eager = _eager_queries(raw, sizes, **kw)
    static = select_proposals_static(raw["cls_logits"], raw["box_regression"], raw["centerness"], raw["points"],
                                     torch.tensor(sizes, dtype=torch.float32), **kw)
    _check_equal(static, eager, cfg.detections_per_img)
    assert all(p["scores"].numel() > 0 for p in eager)
