"""Unit tests of ciae_core.losses against hand-computed values (paper Eq. 1–15)."""

from __future__ import annotations

import math

import pytest
import torch

from ciae_core.losses import (CIAECriterion, TargetError, centerness_targets, cosine_distance, embedding_loss,
                              expand_boxes, fcos_targets, init_memory_embeddings, l2_normalize, log_transform,
                              mean_embeddings, memory_momentum, pixel_embedding_losses, query_distances,
                              remote_instance_mask, topk_pixel_losses, triplet_hinge, update_memory_embeddings)

M = 0.15


def test_eq1_eq2_normalise_and_cosine_distance():
    p = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(l2_normalize(p), torch.tensor([[0.6, 0.8]]))
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-5.0, 0.0]])
    assert torch.allclose(cosine_distance(p, q), torch.tensor([[0.4, 0.2, 1.6]]))


def test_eq3_eq4_means_use_pre_normalisation_embeddings():
    # Two pixels of segment 0 with different lengths, one pixel of segment 1.
    pre = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, -2.0]])
    ids = torch.tensor([0, 0, 1])
    m = mean_embeddings(pre, ids, 3)
    assert torch.allclose(m[0], torch.tensor([3.0, 1.0]) / math.sqrt(10.0))  # sum of raw vectors
    assert not torch.allclose(m[0], torch.tensor([1.0, 1.0]) / math.sqrt(2.0))  # not the mean of unit vectors
    assert torch.allclose(m[1], torch.tensor([0.0, -1.0]))
    assert torch.equal(m[2], torch.zeros(2))  # empty segment


def test_eq5_eq6_distances_and_positive_entry_is_zero():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    d_pos, d_neg = query_distances(p, q, torch.tensor([0, 0]))
    assert torch.allclose(d_pos, torch.tensor([0.0, 1.0]))
    assert torch.allclose(d_neg, torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 1.0]]))


def _hand_losses():
    # pixel 0 = (1,0) → l' = [0.15, 0, 0]; pixel 1 = (0,1) → l' = [1.15, 1.15, 0.15]
    a = math.log(2.15 / 2.0)     # -log(1 - 0.15/2.15)
    b = math.log(2.15 / 1.0)     # -log(1 - 1.15/2.15)
    return a, b


def test_eq7_eq8_hinge_and_log_transform():
    d_pos = torch.tensor([0.0, 1.0])
    d_neg = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 1.0]])
    lp = triplet_hinge(d_pos, d_neg, M)
    assert torch.allclose(lp, torch.tensor([[0.15, 0.0, 0.0], [1.15, 1.15, 0.15]]))
    a, b = _hand_losses()
    assert torch.allclose(log_transform(lp, M), torch.tensor([[a, 0.0, 0.0], [b, b, a]]), atol=1e-6)
    # worst case l' = 2 + margin stays finite
    assert torch.isfinite(log_transform(torch.tensor([[2.15]]), M)).all()


def test_eq9_topk_per_pixel_and_mean():
    a, b = _hand_losses()
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    t = torch.tensor([0, 0])
    per1 = pixel_embedding_losses(p, q, t, margin=M, top_k=1)
    assert torch.allclose(per1, torch.tensor([a, b]), atol=1e-6)
    per2 = pixel_embedding_losses(p, q, t, margin=M, top_k=2)
    assert torch.allclose(per2, torch.tensor([a, 2 * b]), atol=1e-6)
    per5 = pixel_embedding_losses(p, q, t, margin=M, top_k=5)  # K > |M|: all terms
    assert torch.allclose(per5, torch.tensor([a, 2 * b + a]), atol=1e-6)
    assert torch.allclose(embedding_loss(p, q, t, margin=M, top_k=2), torch.tensor((a + 2 * b) / 2), atol=1e-6)
    # dropping the eq. 6 "positive" term leaves only the negative terms
    per_np = pixel_embedding_losses(p, q, t, margin=M, top_k=5, include_positive_term=False)
    assert torch.allclose(per_np, torch.tensor([0.0, b + a]), atol=1e-6)


def test_topk_ignores_invalid_queries():
    losses = torch.tensor([[1.0, 5.0, 2.0]])
    assert torch.allclose(topk_pixel_losses(losses, 2), torch.tensor([7.0]))
    assert torch.allclose(topk_pixel_losses(losses, 2, torch.tensor([[True, False, True]])), torch.tensor([3.0]))


def test_thing_pixel_weight_five_times():
    p = l2_normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    q = l2_normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)))
    t = torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.tensor([5.0, 5.0, 1.0, 1.0, 1.0, 1.0])
    per = pixel_embedding_losses(p, q, t, margin=M, top_k=5)
    expected = (5 * per[:2].sum() + per[2:].sum()) / 6
    assert torch.allclose(embedding_loss(p, q, t, margin=M, top_k=5, pixel_weights=w), expected)


def test_remote_instance_filter_expands_boxes_one_and_a_half_times():
    box = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    assert torch.allclose(expand_boxes(box, 1.5), torch.tensor([[7.5, 7.5, 22.5, 22.5]]))
    xy = torch.tensor([[7, 15], [6, 15], [22, 15], [23, 15], [15, 7], [15, 6], [15, 22], [15, 23]])
    inside = remote_instance_mask(xy, box, 1.5)[:, 0]
    assert inside.tolist() == [True, False, True, False, True, False, True, False]
    # without expansion the tight box holds exactly its pixels 10..19
    tight = remote_instance_mask(torch.tensor([[10, 10], [19, 19], [20, 15], [9, 15]]), box, 1.0)[:, 0]
    assert tight.tolist() == [True, True, False, False]


def test_filtered_similarity_becomes_zero():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # query 1 equals the pixels
    mask = torch.tensor([[True, True], [True, False]])  # pixel 1 lies outside instance 1's box
    _, d_neg = query_distances(p, q, torch.tensor([1, 0]), mask)
    # pixel 0 targets query 1 (d_neg 0 there); pixel 1's distance to the filtered query is 1 - 0
    assert torch.allclose(d_neg, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_eq13_momentum_schedule():
    assert memory_momentum(0, 1000) == pytest.approx(1 - 1e-4)
    assert memory_momentum(500, 1000) == pytest.approx(1 - 1e-4 * 0.125)
    assert memory_momentum(1000, 1000) == pytest.approx(1.0)
    assert memory_momentum(5000, 1000) == pytest.approx(1.0)  # clamped
    assert memory_momentum(0, None) == pytest.approx(1 - 1e-4)
    assert memory_momentum(0, 10, scale=1e-2) == pytest.approx(0.99)


def test_eq14_update_only_present_rows():
    mem = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    means = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    present = torch.tensor([True, False, True])
    new = update_memory_embeddings(mem, means, present, 0.5)
    r = 1 / math.sqrt(2)
    assert torch.allclose(new, torch.tensor([[r, r], [1.0, 0.0], [r, r]]))
    assert torch.allclose(update_memory_embeddings(mem, means, present, 1.0), mem)


def test_memory_init_is_normalised_and_merged_things_share_a_row():
    m = init_memory_embeddings(3, 2, 8, merge_things=True, generator=torch.Generator().manual_seed(0))
    assert m.shape == (5, 8)
    assert torch.allclose(m.norm(dim=1), torch.ones(5))
    assert torch.equal(m[0], m[1]) and torch.equal(m[0], m[2])
    assert not torch.allclose(m[3], m[4])
    m2 = init_memory_embeddings(3, 2, 8, merge_things=False, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(m2[0], m2[1])


def test_fcos_positives_must_lie_inside_the_mask():
    # one 32x32 box at the origin whose mask covers only its left half
    pts = torch.tensor([[4.0, 4.0], [12.0, 4.0], [20.0, 4.0], [28.0, 4.0]])
    strides = torch.full((4,), 8.0)
    ranges = torch.tensor([[-1.0, 64.0]]).expand(4, 2)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, :, :16] = True
    pos, lab, box = fcos_targets(pts, strides, ranges, boxes, torch.tensor([2]), mask)
    assert pos.tolist() == [True, True, False, False]
    assert lab.tolist() == [2, 2, -1, -1]
    assert torch.equal(box[0], boxes[0])
    full = torch.ones(1, 32, 32, dtype=torch.bool)
    assert fcos_targets(pts, strides, ranges, boxes, torch.tensor([2]), full)[0].all()
    # scale range: the object is too small for a (64, 128] level
    assert not fcos_targets(pts, strides, torch.tensor([[64.0, 128.0]]).expand(4, 2), boxes, torch.tensor([2]),
                            full)[0].any()
    # center sampling radius 1 stride keeps only locations near the box centre (16, 16)
    pts_c = torch.tensor([[12.0, 12.0], [4.0, 4.0]])
    pos_c = fcos_targets(pts_c, strides[:2], ranges[:2], boxes, torch.tensor([0]), full, center_sampling_radius=1.0)[0]
    assert pos_c.tolist() == [True, False]


def test_fcos_ambiguous_location_takes_smallest_box():
    pts = torch.tensor([[8.0, 8.0]])
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [4.0, 4.0, 14.0, 14.0]])
    masks = torch.ones(2, 40, 40, dtype=torch.bool)
    pos, lab, box = fcos_targets(pts, torch.tensor([8.0]), torch.tensor([[-1.0, 64.0]]), boxes, torch.tensor([0, 1]),
                                 masks)
    assert pos.item() and lab.item() == 1 and torch.equal(box[0], boxes[1])


def test_centerness_targets():
    c = centerness_targets(torch.tensor([[5.0, 5.0], [2.0, 5.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2))
    assert torch.allclose(c, torch.tensor([1.0, math.sqrt(2.0 / 8.0)]))


def _tiny_scene(h=16, w=16):
    """Left half stuff (training id 2), two touching thing instances (class 0) on the right."""
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, :, :8] = True
    masks[1, :8, 8:] = True
    masks[2, 8:, 8:] = True
    return {"masks": masks, "labels": torch.tensor([2, 0, 0]), "isthing": torch.tensor([False, True, True]),
            "iscrowd": torch.zeros(3, dtype=torch.bool),
            "boxes": torch.tensor([[0.0, 0.0, 8.0, 16.0], [8.0, 0.0, 16.0, 8.0], [8.0, 8.0, 16.0, 16.0]])}


def test_criterion_embedding_losses_match_manual_computation():
    torch.manual_seed(0)
    crit = CIAECriterion(num_things=2, num_stuff=2, pixel_samples=0, box_expand=1.5)
    pre = torch.randn(1, 4, 16, 16)
    mem = init_memory_embeddings(2, 2, 4, generator=torch.Generator().manual_seed(3))
    t = _tiny_scene()
    l_cae, l_iae, stats = crit.embedding_losses(pre, mem, [t])
    # manual: pixels in raster order
    flat = pre[0].flatten(1).t()
    seg = torch.zeros(16, 16, dtype=torch.long)
    seg[:8, 8:] = 1
    seg[8:, 8:] = 2
    seg = seg.flatten()
    p = l2_normalize(flat)
    # CAE: merged thing class (memory row 0) + stuff rows 2, 3; stuff pixels are class 2 → index 1
    cae_q = mem[[0, 2, 3]]
    cae_t = torch.where(seg == 0, 1, 0)
    exp_cae = embedding_loss(p, cae_q, cae_t, margin=M, top_k=5)
    # IAE: stuff memory rows 2, 3 then the two instance means (Eq. 4, pre-normalisation)
    inst = torch.stack([l2_normalize(flat[seg == 1].sum(0)), l2_normalize(flat[seg == 2].sum(0))])
    iae_q = torch.cat([mem[2:], inst])
    iae_t = torch.where(seg == 0, 0, seg + 1)
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    xy = torch.stack([xs.flatten(), ys.flatten()], 1)
    mask = torch.ones(256, 4, dtype=torch.bool)
    mask[:, 2:] = remote_instance_mask(xy, t["boxes"][1:], 1.5)
    w = torch.where(seg > 0, 5.0, 1.0)
    exp_iae = embedding_loss(p, iae_q, iae_t, margin=M, top_k=5, similarity_mask=mask, pixel_weights=w)
    assert torch.allclose(l_cae, exp_cae, atol=1e-6)
    assert torch.allclose(l_iae, exp_iae, atol=1e-6)
    # the filter matters here: instance 1's expanded box (8..16 x -2..10 → rows < 10) excludes rows >= 10
    assert not mask[xy[:, 1] >= 11, 2].any()
    # class statistics for Eq. 14: merged thing sum in rows 0 and 1, stuff class 2 row, absent class 3 empty
    assert torch.allclose(stats[0, :4], flat[seg > 0].sum(0), atol=1e-5) and stats[0, 4] == 128
    assert torch.equal(stats[1], stats[0])
    assert torch.allclose(stats[2, :4], flat[seg == 0].sum(0), atol=1e-5) and stats[2, 4] == 128
    assert stats[3, 4] == 0


def test_criterion_ignores_crowd_and_void_pixels():
    crit = CIAECriterion(num_things=2, num_stuff=2, pixel_samples=0)
    pre = torch.randn(1, 4, 16, 16)
    mem = init_memory_embeddings(2, 2, 4)
    t = _tiny_scene()
    t["iscrowd"] = torch.tensor([False, False, True])
    _, _, stats = crit.embedding_losses(pre, mem, [t])
    assert stats[0, 4] == 64 and stats[2, 4] == 128  # crowd instance's 64 pixels are void
    _, _, stats2 = crit.embedding_losses(pre, mem, [_tiny_scene()], image_sizes=[(8, 16)])
    assert stats2[0, 4] + stats2[2, 4] == 128  # pixels below the image size are padding


def test_update_memory_uses_reduce_fn_and_schedule():
    calls = []

    def reduce_fn(s):
        calls.append(s.shape)
        return s * 2  # e.g. two identical ranks

    crit = CIAECriterion(num_things=1, num_stuff=1, reduce_fn=reduce_fn, memory_momentum_scale=0.5)
    mem = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    stats = torch.tensor([[0.0, 3.0, 10.0], [0.0, 0.0, 0.0]])
    crit.set_schedule(0, 10)
    lam = crit.update_memory(mem, stats)
    assert calls == [(2, 3)] and lam == pytest.approx(0.5)
    r = 1 / math.sqrt(2)
    assert torch.allclose(mem, torch.tensor([[r, r], [1.0, 0.0]]))
    crit.set_schedule(10, 10)
    before = mem.clone()
    assert crit.update_memory(mem, stats) == pytest.approx(1.0)
    assert torch.allclose(mem, before)


def test_detection_losses_and_bad_targets():
    crit = CIAECriterion(num_things=2, num_stuff=2)
    pts = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]])
    t = _tiny_scene()
    cls = torch.zeros(1, 4, 2, requires_grad=True)
    reg = torch.full((1, 4, 4), 4.0, requires_grad=True)
    ctr = torch.zeros(1, 4, requires_grad=True)
    losses = crit.detection_losses(cls, reg, ctr, pts, [4, 0, 0, 0, 0], [t])
    assert set(losses) == {"loss_cls", "loss_ctr", "loss_reg"}
    # positives: (12,4) in instance 1 and (12,12) in instance 2; boxes predicted as 8x8 around the point
    # equal the GT boxes except for the offset: instance 1 box (8,0,16,8) vs pred (8,0,16,8) → giou loss 0
    assert losses["loss_reg"].item() == pytest.approx(0.0, abs=1e-6)
    sum(losses.values()).backward()
    assert cls.grad.abs().sum() > 0 and ctr.grad.abs().sum() > 0
    bad = dict(t, masks=t["masks"][:2])
    with pytest.raises(TargetError, match="masks"):
        crit(cls_logits=cls, box_regression=reg, centerness=ctr, points=pts, level_sizes=[4, 0, 0, 0, 0],
             embedding_pre=torch.zeros(1, 4, 16, 16), memory=torch.zeros(4, 4), targets=[bad])
    wrong = dict(t, labels=torch.tensor([0, 0, 0]))
    with pytest.raises(TargetError, match="stuff"):
        crit.embedding_losses(torch.zeros(1, 4, 16, 16), torch.zeros(4, 4), [wrong])


def test_detection_losses_normalise_by_positives_averaged_over_ranks():
    """FCOS under DDP: each rank divides by the mean positive count of all ranks, not its own."""
    pts = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]])
    t = _tiny_scene()
    cls = torch.randn(1, 4, 2, generator=torch.Generator().manual_seed(0))
    reg = torch.full((1, 4, 4), 3.0)
    ctr = torch.zeros(1, 4)
    local = CIAECriterion(num_things=2, num_stuff=2).detection_losses(cls, reg, ctr, pts, [4, 0, 0, 0, 0], [t])
    # another rank with 6 positives: the sum is (2 + 6, 2 ranks) -> mean 4 positives per rank
    other_rank = torch.tensor([6.0, 1.0])
    crit = CIAECriterion(num_things=2, num_stuff=2, reduce_fn=lambda x: x + other_rank)
    both = crit.detection_losses(cls, reg, ctr, pts, [4, 0, 0, 0, 0], [t])
    for k in ("loss_cls", "loss_ctr", "loss_reg"):  # this batch has 2 positives
        assert both[k].item() == pytest.approx(local[k].item() * 2 / 4, rel=1e-6), k
    assert local["loss_cls"].item() > 0 and local["loss_reg"].item() > 0


def test_update_memory_all_reduces_under_torch_distributed(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", world_size=1, rank=0)
    try:
        crit = CIAECriterion(num_things=1, num_stuff=1, memory_momentum_scale=0.5)
        mem = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        crit.update_memory(mem, torch.tensor([[0.0, 3.0, 10.0], [0.0, 0.0, 0.0]]))
        r = 1 / math.sqrt(2)
        assert torch.allclose(mem, torch.tensor([[r, r], [1.0, 0.0]]))
    finally:
        dist.destroy_process_group()
