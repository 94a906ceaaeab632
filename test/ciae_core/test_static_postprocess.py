"""ciae_core.static_postprocess: the fixed-shape postprocess gives the eager postprocess's results
(here with the eager fusion; the Triton fusion has its own tests in test_fusion_triton.py)."""

from __future__ import annotations

import pytest
import torch

from ciae_core.fusion import panoptic_from_raw, split_panoptic
from ciae_core.static_postprocess import postprocess_static


def assert_same_results(got: list[dict], want: list[dict], score_atol: float = 0.0):
    """Per image: the same id map and segment table (scores to ``score_atol``)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g["id_map"], w["id_map"])
        for k in ("ids", "labels", "isthing", "areas", "boxes"):
            assert torch.equal(g[k], w[k]), k
        assert torch.allclose(g["scores"], w["scores"], atol=score_atol, rtol=0), (g["scores"], w["scores"])


def shipped_raw(model, sizes=((192, 256), (176, 224)), seeds=(1, 2)):
    """The shipped model's raw outputs for two rendered scenes letterboxed into one batch."""
    from ciae_core.synth import render_scene

    hp = max(h for h, _ in sizes)
    wp = max(w for _, w in sizes)
    batch = torch.zeros(len(sizes), 3, hp, wp)
    for i, ((h, w), s) in enumerate(zip(sizes, seeds)):
        batch[i, :, :h, :w] = torch.from_numpy(render_scene(s, h, w)[0]).permute(2, 0, 1).float()
    with torch.inference_mode():
        return model.forward_raw(batch)


def settings(model, **overrides):
    cfg = model.config
    kw = dict(score_threshold=cfg.score_threshold, pre_nms_topk=cfg.pre_nms_topk, nms_threshold=cfg.nms_threshold,
              detections_per_img=cfg.detections_per_img, instance_score_threshold=cfg.instance_score_threshold,
              min_stuff_area=cfg.min_stuff_area, stuff_area_reference=cfg.stuff_area_reference,
              min_visible_fraction=cfg.min_visible_fraction, min_instance_area=cfg.min_instance_area,
              outside_box_value=cfg.outside_box_value)
    kw.update(overrides)
    return dict(num_things=model.num_things, embedding_stride=model.branch_stride,
                normalize_after_upsampling=model.embedding_stride == 1, **kw)


@pytest.mark.parametrize("overrides", [{}, {"instance_score_threshold": 0.0, "score_threshold": 0.0,
                                            "detections_per_img": 20, "min_stuff_area": 0}])
def test_static_postprocess_with_the_eager_fusion_equals_the_eager_postprocess(shipped_model, overrides):
    sizes = [(192, 256), (176, 224)]
    raw = shipped_raw(shipped_model, sizes)
    kw = settings(shipped_model, **overrides)
    want = panoptic_from_raw(raw, sizes, fusion_method="coarse_to_fine", **kw)
    out = postprocess_static(raw, torch.tensor(sizes), fusion="eager", **kw)
    assert out["converged"].all() and out["segment_ids"].shape[1] == shipped_model.num_stuff + kw["detections_per_img"]
    assert_same_results(split_panoptic(out, sizes), want, score_atol=1e-5)  # stuff scores: sums in another order
    assert any(bool(r["isthing"].any()) for r in want)


def test_unknown_fusion_is_refused(shipped_model):
    raw = shipped_raw(shipped_model, ((64, 64),), (1,))
    with pytest.raises(ValueError, match="unknown fusion"):
        postprocess_static(raw, torch.tensor([[64, 64]]), num_things=4, fusion="magic")
