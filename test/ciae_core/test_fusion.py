"""Tests of ciae_core.fusion: proposal selection and Eq. 16 fusion on oracle inputs."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ciae_core.fusion import (MASKED_SIMILARITY, fuse_panoptic, instance_queries_at, panoptic_from_raw, panoptic_similarity,
                              select_proposals, split_panoptic)
from ciae_core.synth import SYNTH_CATEGORIES, render_scene

NO_FILTERS = dict(min_stuff_area=0, min_visible_fraction=0.0, min_instance_area=0)


def _read_coco(coco_sample, stem):
    bgr = cv2.imread(str(coco_sample / "panoptic" / f"{stem}.png"), cv2.IMREAD_COLOR)
    rgb = bgr[:, :, ::-1].astype(np.int64)
    pan = rgb[:, :, 0] + 256 * rgb[:, :, 1] + 256 * 256 * rgb[:, :, 2]
    data = json.loads((coco_sample / "panoptic_examples.json").read_text())
    ann = next(a for a in data["annotations"] if a["file_name"].startswith(stem))
    cats = json.loads((coco_sample / "panoptic_coco_categories.json").read_text())
    return pan, ann["segments_info"], cats


def _oracle_inputs(pan, segments, categories, seed=0, noise=0.05, dim=None):
    """Embeddings, queries and boxes built from a GT panoptic map.

    Every GT segment gets its own direction of a random orthonormal basis (plus noise); stuff
    classes absent from the image get unused directions; one extra "void" stuff query explains
    the void pixels, so the whole map can be compared. Instance queries are the directions of the
    thing segments, boxes their tight GT boxes (exclusive max edge).
    """
    things = [c for c in categories if c["isthing"]]
    stuff = [c for c in categories if not c["isthing"]]
    train_id = {c["id"]: i for i, c in enumerate(things + stuff)}
    t_num = len(things)
    seg_by_stuff_cat = {s["category_id"]: s for s in segments if s["category_id"] in train_id
                        and train_id[s["category_id"]] >= t_num}
    inst = [s for s in segments if train_id[s["category_id"]] < t_num]
    d = dim or len(stuff) + 1 + len(inst)
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    basis = basis.float().t()  # rows orthonormal
    seg_dir = {}
    stuff_q = []
    for k, c in enumerate(stuff):
        stuff_q.append(basis[k])
        if c["id"] in seg_by_stuff_cat:
            seg_dir[seg_by_stuff_cat[c["id"]]["id"]] = basis[k]
    void_dir = basis[len(stuff)]
    stuff_q.append(void_dir)
    inst_q, boxes, labels = [], [], []
    for j, s in enumerate(inst):
        v = basis[len(stuff) + 1 + j]
        seg_dir[s["id"]] = v
        inst_q.append(v)
        ys, xs = np.nonzero(pan == s["id"])
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(train_id[s["category_id"]])
    h, w = pan.shape
    emb = void_dir[:, None, None].expand(d, h, w).clone()
    for sid, v in seg_dir.items():
        m = torch.from_numpy(pan == sid)
        emb[:, m] = v[:, None]
    emb = emb + noise * torch.randn(emb.shape, generator=g)
    emb = torch.nn.functional.normalize(emb, dim=0)
    q = len(inst)
    return dict(embedding=emb[None], stuff_queries=torch.stack(stuff_q),
                instance_queries=torch.stack(inst_q)[None] if q else torch.zeros(1, 0, d),
                instance_boxes=torch.tensor(boxes, dtype=torch.float32)[None] if q else torch.zeros(1, 0, 4),
                instance_labels=torch.tensor(labels)[None] if q else torch.zeros(1, 0, dtype=torch.long),
                instance_scores=torch.linspace(1.0, 0.5, q)[None] if q else torch.zeros(1, 0),
                instance_valid=torch.ones(1, q, dtype=torch.bool)), t_num, things + stuff, train_id


def _assert_same_segmentation(pan, segments, result, classes, t_num, void_label):
    """The predicted map equals the GT map up to relabelling, with the same categories."""
    id_map = result["id_map"].numpy()
    label_of = dict(zip(result["ids"].tolist(), result["labels"].tolist()))
    void_ids = {i for i, lab in label_of.items() if lab == void_label}
    pred = np.where(np.isin(id_map, list(void_ids)), 0, id_map)
    pairs = np.unique(np.stack([pan.ravel(), pred.ravel()]), axis=1)
    gt_to_pred = {}
    for g_id, p_id in pairs.T.tolist():
        assert g_id not in gt_to_pred, f"GT segment {g_id} split into several predicted segments"
        gt_to_pred[g_id] = p_id
    assert len(set(gt_to_pred.values())) == len(gt_to_pred), "two GT segments merged"
    assert gt_to_pred.get(0, 0) == 0
    cat_of = {s["id"]: s["category_id"] for s in segments}
    for g_id, p_id in gt_to_pred.items():
        if g_id == 0:
            continue
        assert classes[label_of[p_id]]["id"] == cat_of[g_id]
    # every non-void predicted segment is one GT segment
    assert {i for i in label_of if i not in void_ids} == {p for g, p in gt_to_pred.items() if g != 0}
    # the segment table agrees with the map
    for i, a in zip(result["ids"].tolist(), result["areas"].tolist()):
        assert a == int((id_map == i).sum())


@pytest.mark.parametrize("stem", ["000000142238", "000000439180"])
def test_oracle_fusion_reproduces_coco_ground_truth(coco_sample, stem):
    pan, segments, cats = _read_coco(coco_sample, stem)
    inputs, t_num, classes, _ = _oracle_inputs(pan, segments, cats)
    void_label = t_num + len(classes) - t_num  # the extra stuff query after all stuff classes
    fused = fuse_panoptic(**inputs, num_things=t_num, **NO_FILTERS)
    result = split_panoptic(fused, [pan.shape])[0]
    assert result["id_map"].dtype == torch.int32 and result["id_map"].shape == pan.shape
    _assert_same_segmentation(pan, segments, result, classes + [{"id": 0}], t_num, void_label)
    n_inst = inputs["instance_queries"].shape[1]
    assert int(result["isthing"].sum()) == n_inst  # every instance survives
    # thing scores are the detection scores, in query order
    assert torch.allclose(result["scores"][result["isthing"]], inputs["instance_scores"][0])


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_oracle_fusion_reproduces_synthetic_scenes(seed):
    img, pan, info = render_scene(seed, 96, 128, max_instances=10, void_border=seed % 2)
    cats = [{"id": c.id, "isthing": c.isthing} for c in SYNTH_CATEGORIES]
    inputs, t_num, classes, _ = _oracle_inputs(pan, info, cats, seed=seed)
    fused = fuse_panoptic(**inputs, num_things=t_num, **NO_FILTERS)
    result = split_panoptic(fused, [pan.shape])[0]
    _assert_same_segmentation(pan, info, result, classes + [{"id": 0}], t_num, len(classes))


def test_remote_filter_separates_identical_embeddings_by_box():
    # two same-class instances with *identical* embeddings, disjoint boxes, on one stuff class
    d = 4
    emb = torch.zeros(1, d, 20, 40)
    emb[0, 0] = 1.0                      # stuff everywhere
    emb[0, :, 5:15, 2:12] = torch.tensor([0.0, 1.0, 0, 0])[:, None, None]
    emb[0, :, 5:15, 25:35] = torch.tensor([0.0, 1.0, 0, 0])[:, None, None]
    q = torch.tensor([[[0.0, 1.0, 0, 0], [0.0, 1.0, 0, 0]]])
    boxes = torch.tensor([[[2.0, 5.0, 12.0, 15.0], [25.0, 5.0, 35.0, 15.0]]])
    fused = fuse_panoptic(emb, torch.tensor([[1.0, 0, 0, 0]]), q, boxes, torch.zeros(1, 2, dtype=torch.long),
                          torch.tensor([[0.9, 0.8]]), torch.ones(1, 2, dtype=torch.bool), num_things=1, **NO_FILTERS)
    r = split_panoptic(fused, [(20, 40)])[0]
    idm = r["id_map"]
    assert r["ids"].tolist() == [1, 2, 3] and r["isthing"].tolist() == [False, True, True]
    assert (idm[5:15, 2:12] == 2).all() and (idm[5:15, 25:35] == 3).all()
    assert int((idm == 1).sum()) == 20 * 40 - 200
    assert r["boxes"][1].tolist() == [2.0, 5.0, 12.0, 15.0]
    assert r["areas"].tolist() == [600, 100, 100]
    # without the box the first instance query would take both blobs (ties go to the lower index)
    far = torch.tensor([[[0.0, 0.0, 40.0, 20.0], [0.0, 0.0, 40.0, 20.0]]])
    r2 = split_panoptic(fuse_panoptic(emb, torch.tensor([[1.0, 0, 0, 0]]), q, far,
                                      torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0.9, 0.8]]),
                                      torch.ones(1, 2, dtype=torch.bool), num_things=1, **NO_FILTERS), [(20, 40)])[0]
    assert r2["ids"].tolist() == [1, 2]


def _two_stuff_scene():
    emb = torch.zeros(1, 3, 64, 64)
    emb[0, 0] = 1.0
    emb[0, 0, :, :2] = 0.0
    emb[0, 1, :, :2] = 1.0  # a 128-pixel stripe of stuff class 1
    emb[0, 1, :20, :1] = 0.0
    emb[0, 2, :20, :1] = 1.0  # and 20 pixels of stuff class 2
    return emb, torch.eye(3)


def test_small_stuff_regions_become_void_with_area_scaled_threshold():
    emb, stuff = _two_stuff_scene()
    none = torch.zeros(1, 0, 3)
    args = (emb, stuff, none, torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0),
            torch.zeros(1, 0, dtype=torch.bool))
    # threshold = 4096 * (64*64) / (640*480) = 54.6 px: the 20-px region goes, the 108-px region stays
    r = split_panoptic(fuse_panoptic(*args, num_things=5, min_stuff_area=4096), [(64, 64)])[0]
    assert r["labels"].tolist() == [5, 6]
    assert r["areas"].tolist() == [64 * 64 - 128, 108]
    assert int((r["id_map"] == 0).sum()) == 20
    # absolute threshold (reference <= 0)
    r = split_panoptic(fuse_panoptic(*args, num_things=5, min_stuff_area=10, stuff_area_reference=0), [(64, 64)])[0]
    assert r["labels"].tolist() == [5, 6, 7]
    # stuff score = mean similarity of its pixels
    assert torch.allclose(r["scores"], torch.ones(3))


def test_hidden_and_duplicate_instances_are_dropped_and_pixels_reassigned():
    d = 4
    emb = torch.zeros(1, d, 32, 32)
    emb[0, 0] = 1.0
    emb[0, :, 0:10, 0:10] = torch.tensor([0.0, 1.0, 0.0, 0.0])[:, None, None]
    emb[0, :, 20:22, 20:22] = torch.tensor([0.0, 0.0, 0.8, 0.6])[:, None, None]
    queries = torch.tensor([[[0.0, 1.0, 0, 0], [0.0, 1.0, 0, 0], [0.0, 0.0, 1.0, 0.0]]])
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [12.0, 12.0, 32.0, 32.0]]])
    labels = torch.zeros(1, 3, dtype=torch.long)
    scores = torch.tensor([[0.9, 0.5, 0.7]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    fused = fuse_panoptic(emb, torch.eye(d)[:1], queries, boxes, labels, scores, valid, num_things=1,
                          min_stuff_area=0, min_visible_fraction=0.2, min_instance_area=0, return_confidence=True)
    r = split_panoptic(fused, [(32, 32)])[0]
    # the duplicate (same query, same box, lower rank) gets nothing; the third instance sees 4 of its
    # 400 box pixels (< 20 %): dropped, its pixels go to the next best query (the stuff class)
    assert r["ids"].tolist() == [1, 2]
    assert r["scores"][1].item() == pytest.approx(0.9)
    assert (r["id_map"][20:22, 20:22] == 1).all()
    conf = r["confidence"]
    assert conf.shape == (32, 32) and conf.dtype == torch.float32
    assert conf[5, 5].item() == pytest.approx(1.0)  # duplicate masked: top-2 is the stuff query at 0 → 1 - 0
    assert conf[30, 30].item() == pytest.approx(1.0)
    # padding slots (valid False) never win pixels
    fused2 = fuse_panoptic(emb, torch.eye(d)[:1], queries, boxes, labels, scores,
                           torch.tensor([[False, False, False]]), num_things=1, **NO_FILTERS)
    assert split_panoptic(fused2, [(32, 32)])[0]["ids"].tolist() == [1]


def test_batched_fusion_equals_single_images_and_respects_image_sizes():
    _, a_pan, a_info = render_scene(5, 64, 96, max_instances=6)
    _, b_pan, b_info = render_scene(6, 48, 80, max_instances=6)
    cats = [{"id": c.id, "isthing": c.isthing} for c in SYNTH_CATEGORIES]
    ia, t_num, _, _ = _oracle_inputs(a_pan, a_info, cats, seed=1, dim=24)
    ib, _, _, _ = _oracle_inputs(b_pan, b_info, cats, seed=1, dim=24)
    assert torch.equal(ia["stuff_queries"], ib["stuff_queries"])  # same basis → same stuff queries
    qa, qb = ia["instance_queries"].shape[1], ib["instance_queries"].shape[1]
    q = max(qa, qb)
    emb = torch.zeros(2, 24, 64, 96)
    emb[0] = ia["embedding"][0]
    emb[1, :, :48, :80] = ib["embedding"][0]  # image b sits top-left in a padded batch

    def slots(x, n_q):
        pad = [0, 0] * (x.dim() - 2) + [0, q - n_q]
        return torch.nn.functional.pad(x, pad)

    batch = {k: torch.cat([slots(ia[k], qa), slots(ib[k], qb)])
             for k in ("instance_queries", "instance_boxes", "instance_labels", "instance_scores", "instance_valid")}
    fused = fuse_panoptic(emb, ia["stuff_queries"], **batch, num_things=t_num, image_sizes=[(64, 96), (48, 80)],
                          **NO_FILTERS)
    assert fused["id_map"].shape == (2, 64, 96)
    assert (fused["id_map"][1, 48:] == 0).all() and (fused["id_map"][1, :, 80:] == 0).all()  # padding is void
    both = split_panoptic(fused, [(64, 96), (48, 80)])
    single_a = split_panoptic(fuse_panoptic(**ia, num_things=t_num, **NO_FILTERS), [(64, 96)])[0]
    single_b = split_panoptic(fuse_panoptic(**ib, num_things=t_num, **NO_FILTERS), [(48, 80)])[0]
    for got, want in ((both[0], single_a), (both[1], single_b)):
        assert got["id_map"].shape == want["id_map"].shape
        assert torch.equal(got["id_map"], want["id_map"])
        for k in ("ids", "labels", "isthing", "areas", "boxes"):
            assert torch.equal(got[k], want[k]), k


def test_similarity_is_matrix_product_and_stride_upsamples():
    emb = torch.nn.functional.normalize(torch.randn(2, 8, 5, 7), dim=1)
    q = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=2)
    s = panoptic_similarity(emb, q)
    assert torch.allclose(s[1, 2, 4, 6], emb[1, :, 4, 6] @ q[1, 2], atol=1e-6)
    s4 = panoptic_similarity(emb, q, embedding_stride=4)
    assert s4.shape == (2, 3, 20, 28)


def _raw_from_boxes(boxes, scores, labels, t_num=3):
    """forward_raw-like outputs with one location per given box (exact logits for the scores)."""
    a = len(boxes)
    pts = torch.tensor([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in boxes])
    cls = torch.full((1, a, t_num), -20.0)
    ctr = torch.full((1, a), 20.0)  # sigmoid ≈ 1
    for i, (s, lab) in enumerate(zip(scores, labels)):
        p = s * s  # score = sqrt(p * 1)
        cls[0, i, lab] = math.log(p / (1 - p))
    ltrb = torch.tensor([[p[0] - b[0], p[1] - b[1], b[2] - p[0], b[3] - p[1]] for p, b in zip(pts.tolist(), boxes)])
    return cls, ltrb[None], ctr, pts


def test_select_proposals_threshold_nms_topn():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 11], [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
    scores = [0.9, 0.8, 0.7, 0.6, 0.04]
    labels = [0, 0, 1, 0, 0]
    cls, reg, ctr, pts = _raw_from_boxes(boxes, scores, labels)
    out = select_proposals(cls, reg, ctr, pts, [(60, 60)])[0]
    # box 1 overlaps box 0 (same class, IoU 0.91) → suppressed; box 2 has another class → kept
    assert out["locations"].tolist() == [0, 2, 3]
    assert torch.allclose(out["scores"], torch.tensor([0.9, 0.7, 0.6]), atol=1e-4)
    assert out["labels"].tolist() == [0, 1, 0]
    assert torch.allclose(out["boxes"][2], torch.tensor([20.0, 20.0, 30.0, 30.0]))
    assert select_proposals(cls, reg, ctr, pts, [(60, 60)], detections_per_img=2)[0]["locations"].tolist() == [0, 2]
    assert select_proposals(cls, reg, ctr, pts, [(60, 60)], nms_threshold=0.95)[0]["locations"].tolist() == [0, 1, 2, 3]
    assert select_proposals(cls, reg, ctr, pts, [(60, 60)], pre_nms_topk=1)[0]["locations"].tolist() == [0]
    # boxes are clipped to the image
    clipped = select_proposals(cls, reg, ctr, pts, [(25, 25)])[0]
    assert clipped["boxes"][:, 2:].max() <= 25


def test_panoptic_from_raw_uses_embedding_at_proposal_location():
    # 2 things, 1 stuff; one detected instance at location (12, 12) whose embedding marks its blob
    boxes = [[8, 8, 16, 16]]
    cls, reg, ctr, pts = _raw_from_boxes(boxes, [0.8], [1], t_num=2)
    emb = torch.zeros(1, 2, 24, 24)
    emb[0, 0] = 1.0
    emb[0, 0, 8:16, 8:16] = 0.0
    emb[0, 1, 8:16, 8:16] = 1.0
    memory = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    raw = {"cls_logits": cls, "box_regression": reg, "centerness": ctr, "points": pts, "embedding": emb,
           "memory": memory}
    r = panoptic_from_raw(raw, [(24, 24)], num_things=2, min_stuff_area=0, min_instance_area=0)[0]
    assert r["labels"].tolist() == [2, 1] and r["isthing"].tolist() == [False, True]
    assert (r["id_map"][8:16, 8:16] == 2).all() and int((r["id_map"] == 2).sum()) == 64
    assert torch.allclose(instance_queries_at(emb[0], pts), torch.tensor([[0.0, 1.0]]))
    # below the instance score threshold the proposal is not a query
    r = panoptic_from_raw(raw, [(24, 24)], num_things=2, min_stuff_area=0, instance_score_threshold=0.9)[0]
    assert r["labels"].tolist() == [2]


@pytest.mark.cuda
def test_fusion_on_gpu_matches_cpu(coco_sample):
    pan, segments, cats = _read_coco(coco_sample, "000000142238")
    inputs, t_num, _, _ = _oracle_inputs(pan, segments, cats)
    cpu = fuse_panoptic(**inputs, num_things=t_num, **NO_FILTERS, return_confidence=True)
    gpu = fuse_panoptic(**{k: v.cuda() for k, v in inputs.items()}, num_things=t_num, **NO_FILTERS,
                        return_confidence=True)
    assert gpu["id_map"].is_cuda
    for k in ("id_map", "segment_ids", "labels", "areas", "boxes"):
        assert torch.equal(cpu[k], gpu[k].cpu()), k


def _direct_fusion(emb, stuff_q, inst_q, boxes, valid, stride, min_visible_fraction, min_instance_area,
                   min_stuff_pixels):
    """One image, the paper's rules spelled out with full (K, H, W) masks, torch.max and per-slot loops."""
    queries = torch.cat([stuff_q, inst_q[0]])
    sim = torch.einsum("dhw,kd->khw", emb[0], queries)
    if stride > 1:
        sim = F.interpolate(sim[None], scale_factor=stride, mode="bilinear", align_corners=False)[0]
    s_num, (k, h, w) = stuff_q.shape[0], sim.shape
    cy, cx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    box_masks = []
    for j, (x0, y0, x1, y1) in enumerate(boxes[0].tolist()):
        in_box = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
        box_masks.append(in_box)
        sim[s_num + j][~in_box] = 0.0  # outside_box_value
        if not valid[0, j]:
            sim[s_num + j] = MASKED_SIMILARITY
    assign = sim.max(dim=0).indices
    dropped = []
    for j, in_box in enumerate(box_masks):
        area = int((assign == s_num + j).sum())
        if valid[0, j] and (area < min_instance_area or area < min_visible_fraction * int(in_box.sum())):
            sim[s_num + j] = MASKED_SIMILARITY
            dropped.append(j)
    top = sim.topk(min(2, k), dim=0).values
    assign = sim.max(dim=0).indices
    id_map, next_id = torch.zeros(h, w, dtype=torch.int32), 1
    for slot in range(k):
        area = int((assign == slot).sum())
        if area == 0 or (slot < s_num and area < min_stuff_pixels) or (slot >= s_num and area < min_instance_area):
            continue
        if slot >= s_num and (not valid[0, slot - s_num] or slot - s_num in dropped):
            continue
        id_map[assign == slot] = next_id
        next_id += 1
    confidence = (top[0] - top[1]).clamp(0, 2) if k >= 2 else top[0].clamp(0, 2)
    return id_map, torch.where(id_map > 0, confidence, torch.zeros_like(confidence)), dropped


@pytest.mark.parametrize("stride,method", [(1, "dense"), (4, "dense"), (4, "coarse_to_fine"), (4, "numba")])
def test_fusion_equals_direct_rules_with_drops_invalid_slots_and_ties(stride, method):
    """The optimised fusion (amax argmax, partial re-assignment, histogram boxes; coarse-to-fine
    argmax) gives exactly the pixels, areas, boxes (and confidences) of the rules applied directly.
    Random embeddings make nearly every cell a boundary cell: the coarse path's worst case."""
    g = torch.Generator().manual_seed(stride)
    h, w, q = 64 // stride, 96 // stride, 12
    emb = F.normalize(torch.randn(1, 8, h, w, generator=g), dim=1)
    stuff_q = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    inst_q = F.normalize(torch.randn(1, q, 8, generator=g), dim=2)
    inst_q[0, 3] = inst_q[0, 2]  # a duplicate: ties with the better-ranked copy
    xy = torch.rand(1, q, 2, generator=g) * torch.tensor([80.0, 50.0])
    boxes = torch.cat([xy, xy + 4 + torch.rand(1, q, 2, generator=g) * 40], dim=2)
    valid = torch.ones(1, q, dtype=torch.bool)
    valid[0, -2:] = False
    kw = dict(min_visible_fraction=0.3, min_instance_area=20)
    fused = fuse_panoptic(emb, stuff_q, inst_q, boxes, torch.zeros(1, q, dtype=torch.long), torch.ones(1, q), valid,
                          num_things=1, embedding_stride=stride, min_stuff_area=50, stuff_area_reference=0,
                          return_confidence=method == "dense", method=method, **kw)
    ref_map, ref_conf, dropped = _direct_fusion(emb, stuff_q, inst_q, boxes, valid, stride, min_stuff_pixels=50, **kw)
    assert dropped, "the scene must exercise the drop-and-reassign step"
    assert torch.equal(fused["id_map"][0], ref_map)
    if method == "dense":
        assert torch.equal(fused["confidence"][0], ref_conf)
    else:
        assert "confidence" not in fused
    r = split_panoptic(fused, [(64, 96)])[0]
    for i, a, b in zip(r["ids"].tolist(), r["areas"].tolist(), r["boxes"].tolist()):
        ys, xs = (ref_map == i).nonzero(as_tuple=True)
        assert a == ys.numel() and b == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def _smooth_scene(seed, n=2, d=8, h=23, w=31, stuff=5, q=14, stride=4):
    """Fusion inputs with spatially smooth embeddings (segments a few cells wide, like a trained
    model's), boxes of all sizes, padded invalid slots and per-image valid regions."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, d, 4, 5, generator=g)
    emb = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    emb = F.normalize(emb + 0.05 * torch.randn(n, d, h, w, generator=g), dim=1)
    xy = torch.rand(n, q, 2, generator=g) * torch.tensor([w * stride * 0.8, h * stride * 0.8])
    boxes = torch.cat([xy, xy + 3 + torch.rand(n, q, 2, generator=g) * 60], dim=2)
    valid = torch.ones(n, q, dtype=torch.bool)
    valid[0, -3:] = False
    return dict(embedding=emb, stuff_queries=F.normalize(torch.randn(stuff, d, generator=g), dim=1),
                instance_queries=F.normalize(torch.randn(n, q, d, generator=g), dim=2), instance_boxes=boxes,
                instance_labels=torch.randint(0, 3, (n, q), generator=g), instance_scores=torch.rand(n, q, generator=g),
                instance_valid=valid)


@pytest.mark.parametrize("seed,stuff,q", [(0, 5, 14), (1, 5, 14), (2, 5, 14), (3, 5, 14), (4, 2, 60), (5, 0, 20)])
def test_coarse_to_fine_fusion_equals_dense_fusion(seed, stuff, q):
    """Same id maps, tables and (to float rounding) stuff scores as the dense (N, K, H, W) path,
    batched, with valid regions smaller than the map, dropped instances and outside_box_value;
    also with many overlapping instances and with no stuff class at all."""
    inputs = _smooth_scene(seed, stuff=stuff, q=q)
    kw = dict(num_things=3, embedding_stride=4, image_sizes=[(92, 124), (87, 117)], min_stuff_area=30,
              stuff_area_reference=0, min_visible_fraction=0.3, min_instance_area=20,
              outside_box_value=[0.0, -0.2, 0.3, 0.0, 0.1, 0.0][seed])
    dense = fuse_panoptic(**inputs, method="dense", **kw)
    auto = fuse_panoptic(**inputs, **kw)
    for method in ("coarse_to_fine", "numba"):
        fast = fuse_panoptic(**inputs, method=method, **kw)
        assert (fast["id_map"] > 0).any() and fast["segment_ids"].max() > 5
        for key in ("id_map", "segment_ids", "labels", "isthing", "areas", "boxes"):
            assert torch.equal(dense[key], fast[key]), (method, key)
            assert torch.equal(auto[key], fast[key]), (method, key)
        torch.testing.assert_close(dense["scores"], fast["scores"], rtol=1e-5, atol=1e-6)


def test_fusion_without_numba_uses_the_tensor_path(monkeypatch):
    """numba is optional: without it "auto" takes the tensor coarse-to-fine path (same result)
    and asking for "numba" is a clear error. (numba's absence is simulated: it is installed here.)"""
    from ciae_core import fusion_kernels

    inputs = _smooth_scene(5)
    kw = dict(num_things=3, embedding_stride=4, min_stuff_area=30, stuff_area_reference=0)
    compiled = fuse_panoptic(**inputs, method="numba", **kw)
    monkeypatch.setattr(fusion_kernels, "numba", None)
    assert not fusion_kernels.available()
    fallback = fuse_panoptic(**inputs, **kw)
    for key in ("id_map", "segment_ids", "areas", "boxes"):
        assert torch.equal(compiled[key], fallback[key]), key
    with pytest.raises(ValueError, match="needs the numba package"):
        fuse_panoptic(**inputs, method="numba", **kw)


def test_compile_fusion_kernels_prepares_what_real_frames_use():
    """The warm-up (run by Predictor on CPU) compiles the signatures a real frame needs, so the
    first frame does not wait for numba: fusing afterwards adds no compiled signature."""
    from ciae_core import fusion_kernels
    from ciae_core.fusion import compile_fusion_kernels

    assert compile_fusion_kernels()
    kernels = (fusion_kernels.assign_cells, fusion_kernels.reassign_dropped, fusion_kernels.segment_extents,
               fusion_kernels.ids_of_slots)
    before = [len(k.signatures) for k in kernels]
    assert all(before)
    for normalize in (False, True):
        fused = fuse_panoptic(**_smooth_scene(8), num_things=3, embedding_stride=4, min_stuff_area=30,
                              stuff_area_reference=0, min_visible_fraction=0.3, method="numba",
                              normalize_after_upsampling=normalize)
        assert fused["segment_ids"].max() > 3
    assert [len(k.signatures) for k in kernels] == before


def test_numba_fusion_rejects_what_it_cannot_do():
    inputs = _smooth_scene(6, n=1)
    with pytest.raises(ValueError, match="embedding_stride > 1"):
        fuse_panoptic(**inputs, num_things=3, embedding_stride=1, method="numba")
    with pytest.raises(ValueError, match="return_confidence=False"):
        fuse_panoptic(**inputs, num_things=3, embedding_stride=4, method="numba", return_confidence=True)
    with pytest.raises(ValueError, match="unknown method"):
        fuse_panoptic(**inputs, num_things=3, embedding_stride=4, method="fast")


def test_coarse_to_fine_fusion_on_the_shipped_model(shipped_model):
    """On a trained model's real outputs (a rendered scene) both fusion paths give the same map."""
    img, _, _ = render_scene(1000, 240, 320)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        raw = shipped_model.forward_raw(x)
        kw = dict(num_things=shipped_model.num_things, embedding_stride=4,
                  normalize_after_upsampling=shipped_model.config.embedding_stride == 1)
        dense = panoptic_from_raw(raw, [(240, 320)], fusion_method="dense", **kw)[0]
        for method in ("coarse_to_fine", "numba"):
            fast = panoptic_from_raw(raw, [(240, 320)], fusion_method=method, **kw)[0]
            assert fast["ids"].numel() >= 5
            for key in ("id_map", "ids", "labels", "areas", "boxes"):
                assert torch.equal(dense[key], fast[key]), (method, key)
            torch.testing.assert_close(dense["scores"], fast["scores"], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_coarse_to_fine_fusion_on_gpu_matches_cpu():
    inputs = _smooth_scene(7)
    kw = dict(num_things=3, embedding_stride=4, image_sizes=[(92, 124), (87, 117)], min_stuff_area=30,
              stuff_area_reference=0, method="coarse_to_fine")
    cpu = fuse_panoptic(**inputs, **kw)
    gpu = fuse_panoptic(**{k: v.cuda() for k, v in inputs.items()}, **kw)
    assert gpu["id_map"].is_cuda
    for k in ("id_map", "segment_ids", "labels", "areas", "boxes"):
        assert torch.equal(cpu[k], gpu[k].cpu()), k


@pytest.mark.parametrize("seed", range(3))
def test_normalize_after_upsampling_equals_the_papers_full_resolution_fusion(seed):
    """Eq. 1 + Eq. 16 spelled out — P = L2norm(up4(E)) at full resolution, queries P at the
    proposal pixels — give the id map that the coarse-to-fine fusion finds from E at stride 4."""
    inputs = _smooth_scene(seed, n=1)
    g = torch.Generator().manual_seed(seed)
    pre = inputs["embedding"] * (0.2 + 3 * torch.rand(1, 1, 23, 31, generator=g))  # un-normalised
    locations = torch.stack([inputs["instance_boxes"][0, :, 0] + 1, inputs["instance_boxes"][0, :, 1] + 1], 1)
    full = F.normalize(F.interpolate(pre, scale_factor=4, mode="bilinear", align_corners=False), dim=1)
    x, y = locations[:, 0].long(), locations[:, 1].long()
    paper_queries = F.normalize(full[0][:, y, x].t(), dim=1)
    queries = instance_queries_at(pre[0], locations, 4, interpolate=True)
    torch.testing.assert_close(queries, paper_queries, rtol=0, atol=1e-5)
    kw = dict(num_things=3, image_sizes=[(90, 121)], min_stuff_area=30, stuff_area_reference=0,
              min_visible_fraction=0.3, min_instance_area=20)
    common = {k: v for k, v in inputs.items() if k not in ("embedding", "instance_queries")}
    paper = fuse_panoptic(full, **common, instance_queries=paper_queries[None], embedding_stride=1, **kw)
    fast = fuse_panoptic(pre, **common, instance_queries=paper_queries[None], embedding_stride=4,
                         normalize_after_upsampling=True, method="coarse_to_fine", **kw)
    compiled = fuse_panoptic(pre, **common, instance_queries=paper_queries[None], embedding_stride=4,
                             normalize_after_upsampling=True, method="numba", **kw)
    dense = fuse_panoptic(pre, **common, instance_queries=paper_queries[None], embedding_stride=4,
                          normalize_after_upsampling=True, method="dense", return_confidence=True, **kw)
    assert paper["segment_ids"].max() > 5
    for key in ("id_map", "segment_ids", "labels", "areas", "boxes"):
        assert torch.equal(paper[key], fast[key]), key
        assert torch.equal(paper[key], compiled[key]), key
        assert torch.equal(paper[key], dense[key]), key
    # stuff scores: both methods average the up-sampled stride-4 cosines; the paper's per-pixel
    # cosines (the stride-1 path) differ from that only a little
    torch.testing.assert_close(dense["scores"], fast["scores"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense["scores"], compiled["scores"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paper["scores"], fast["scores"], rtol=0, atol=5e-2)


def _exact_in(dtype, inputs):
    """``inputs`` with every float tensor rounded to ``dtype`` and back: the float32 reference then
    has exactly the values the half-precision run gets."""
    return {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["dense", "coarse_to_fine", "numba", "auto"])
def test_half_precision_inputs_fuse_as_float32(dtype, method):
    """Half inputs (e.g. CIAE.inference under autocast) give the float32 id map: a 384x480 image
    (184320 px, past float16's 65504, so its area was inf and every stuff region became void) with
    boxes beyond 128 px (where bfloat16 cannot hold pixel centres x + 0.5)."""
    inputs = _smooth_scene(7, n=1, h=96, w=120, q=10)
    inputs["instance_boxes"] = inputs["instance_boxes"].clamp(0, 470).round()  # exact in both types
    inputs = _exact_in(dtype, inputs)
    kw = dict(num_things=3, embedding_stride=4, min_stuff_area=4096, min_visible_fraction=0.2, min_instance_area=16,
              method=method)
    ref = fuse_panoptic(**inputs, **kw)
    half = fuse_panoptic(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}, **kw)
    assert int((ref["segment_ids"][:, :5] > 0).sum()) >= 2 and int((ref["segment_ids"][:, 5:] > 0).sum()) >= 2
    for key in ("id_map", "segment_ids", "labels", "areas", "boxes"):
        assert torch.equal(ref[key], half[key]), key
    assert half["scores"].dtype == torch.float32
    torch.testing.assert_close(ref["scores"], half["scores"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_raw_outputs_give_the_float32_result(shipped_model, dtype):
    """panoptic_from_raw on the shipped model's raw outputs cast to half (what autocast hands it)
    gives the result of the same values in float32, at 384x512."""
    img, _, _ = render_scene(1001, 384, 512)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        raw = shipped_model.forward_raw(x)
    raw = _exact_in(dtype, raw)
    kw = dict(num_things=shipped_model.num_things, embedding_stride=shipped_model.branch_stride,
              normalize_after_upsampling=shipped_model.config.embedding_stride == 1)
    ref = panoptic_from_raw(raw, [(384, 512)], **kw)[0]
    half = panoptic_from_raw({k: v.to(dtype) for k, v in raw.items()}, [(384, 512)], **kw)[0]
    assert ref["ids"].numel() >= 3 and (~ref["isthing"]).any()
    for key in ("id_map", "ids", "labels", "areas", "boxes"):
        assert torch.equal(ref[key], half[key]), key
