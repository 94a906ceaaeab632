"""FCOS proposal selection in fixed shapes, without a host synchronisation (paper §IV-C's
proposals, for the CUDA-graph path of the predictor).

:func:`ciae_core.fusion.select_proposals` gives per image a list whose length depends on the data
(``nonzero``, ``batched_nms``), so it synchronises with the host several times and cannot be
captured in a CUDA graph. :func:`select_proposals_static` computes the same proposals — those
that become instance queries — in tensors whose shapes depend only on the input shapes and the
settings:

1. Scores ``sqrt(sigmoid(cls) * sigmoid(ctr))`` ``(N, A*T)`` as in the eager path; candidates
   with score > ``score_threshold`` (the others masked to -inf), the ``k = min(pre_nms_topk,
   A*T)`` best (``topk``), ordered by score, ties by location-class index (:func:`sorted_candidates`).
2. Exact greedy class-wise NMS by fixed-point iteration (:func:`greedy_nms_fixed_point`).
3. The first ``detections_per_img`` kept candidates with score >= ``instance_score_threshold``,
   compacted into Q = ``detections_per_img`` slots with a ``valid`` mask, in score order.

Exactness (against the eager path on the same device): the eager path sorts its candidates
(ascending location-class index, or ``topk``'s order when more than ``pre_nms_topk`` pass the
threshold) stably by score; step 1 gives that order when at most ``pre_nms_topk`` candidates pass,
and otherwise differs only among candidates of equal score (``topk`` orders ties as it likes).
Restricting the NMS to the eligible candidates (score >= ``instance_score_threshold``) is exact:
in score order the eligible candidates are a prefix, greedy NMS decides a candidate only from the
candidates before it, so the keep flags of the prefix do not depend on what follows; and the
``detections_per_img`` cut counts kept candidates in order, so among eligible ones their rank is
the same. Only eligible candidates can become queries (:func:`ciae_core.fusion.panoptic_from_raw`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Candidates(NamedTuple):
    """Step 1: the ``k`` best candidates per image in NMS order (score descending, ties by index)."""

    scores: Tensor  # (N, k) float32 (-inf: no candidate)
    boxes: Tensor  # (N, k, 4) xyxy float32, clipped to the image
    labels: Tensor  # (N, k) long thing training ids
    locations: Tensor  # (N, k) long index into A
    valid: Tensor  # (N, k) bool: score > score_threshold


def sorted_candidates(cls_logits: Tensor, box_regression: Tensor, centerness: Tensor, points: Tensor,
                      image_hw: Tensor, *, score_threshold: float, pre_nms_topk: int) -> Candidates:
    """cls_logits ``(N, A, T)``, box_regression ``(N, A, 4)`` ltrb, centerness ``(N, A)`` logits,
    points ``(A, 2)`` xy, image_hw ``(N, 2)`` float (h, w) to clip the boxes to → :class:`Candidates`
    with ``k = min(pre_nms_topk, A*T)``. Boxes are formed and clipped exactly as the eager path does."""
    n, a, t = cls_logits.shape
    scores = torch.sqrt(torch.sigmoid(cls_logits.float()) * torch.sigmoid(centerness.float())[:, :, None])
    flat = scores.flatten(1)
    masked = torch.where(flat > score_threshold, flat, torch.full_like(flat, float("-inf")))
    k = min(int(pre_nms_topk), a * t)
    top, idx = masked.topk(k, dim=1)
    # NMS order: by score, ties by index (the eager path's candidates are in index order and its
    # NMS sorts them stably)
    idx, perm = idx.sort(dim=1)
    top = top.gather(1, perm)
    top, perm = top.sort(dim=1, descending=True, stable=True)
    idx = idx.gather(1, perm)
    loc = torch.div(idx, t, rounding_mode="floor")
    lab = idx % t
    ltrb = box_regression.float().gather(1, loc[:, :, None].expand(-1, -1, 4))
    p = points.float()[loc]  # (N, k, 2)
    boxes = torch.cat([p - ltrb[..., :2], p + ltrb[..., 2:]], dim=2)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    hw = image_hw.to(boxes.dtype)
    x = torch.minimum(torch.maximum(boxes[..., 0::2], zero), hw[:, None, 1:2])
    y = torch.minimum(torch.maximum(boxes[..., 1::2], zero), hw[:, None, 0:1])
    boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=2)
    return Candidates(top, boxes, lab, loc, top > score_threshold)


def _suppression(boxes: Tensor, labels: Tensor, valid: Tensor, eligible: Tensor, iou_threshold: float) -> Tensor:
    """``S (N, k, k)`` bool: ``S[n, j, i]`` = candidate j (earlier in NMS order) suppresses i if
    kept: both eligible and IoU > ``iou_threshold``, computed as torchvision's ``batched_nms``
    does for up to 1000 boxes on the CPU (and up to its CUDA limit on a GPU): the boxes of the
    NMS call (``valid``) offset per class by ``label * (max coordinate + 1)``, which keeps classes
    apart, and the IoU of the offset boxes in float32; compared in float64 on the CPU (its C++
    kernel's double threshold) and in float32 on a GPU (its CUDA kernel's float threshold)."""
    k = boxes.shape[1]
    neg = torch.full((), float("-inf"), dtype=boxes.dtype, device=boxes.device)
    max_coordinate = torch.where(valid[..., None], boxes, neg).flatten(1).amax(1)  # (N,) over the NMS call's boxes
    offsets = labels.to(boxes) * (max_coordinate[:, None] + torch.ones((), dtype=boxes.dtype, device=boxes.device))
    b = boxes + offsets[..., None]
    x1, y1, x2, y2 = b.unbind(-1)  # (N, k)
    area = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp_min(0)
    h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_min(0)
    inter = w * h
    iou = inter / (area[:, :, None] + area[:, None, :] - inter)
    over = iou.double() > iou_threshold if boxes.device.type == "cpu" else iou > iou_threshold
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(1)  # j < i
    return over & earlier & eligible[:, :, None] & eligible[:, None, :]


def greedy_nms_fixed_point(boxes: Tensor, labels: Tensor, valid: Tensor, eligible: Tensor, iou_threshold: float,
                           iterations: int) -> tuple[Tensor, Tensor]:
    """Exact greedy class-wise NMS of candidates already in NMS order, in fixed shapes.

    boxes ``(N, k, 4)``, labels ``(N, k)``, valid ``(N, k)`` (the boxes of the NMS call, for the
    class offsets), eligible ``(N, k)`` (the candidates whose fate is wanted; False for the
    rest, which then neither suppress nor are kept) → keep ``(N, k)`` bool and converged ``(N,)``.

    Greedy NMS keeps candidate i iff no kept candidate before it suppresses it: ``keep = f(keep)``
    with ``f(x)_i = eligible_i & ~any_j(S[j, i] & x_j)`` (:func:`_suppression`, ``S[j, i]`` only
    for j < i). That fixed point is unique (by induction over i: ``keep_i`` depends only on
    ``keep_j``, j < i), and the Jacobi iteration ``x_{t+1} = f(x_t)`` from ``x_0 = eligible``
    reaches it: once every candidate before i is final, i is final one step later, so after t
    steps the first t are final at least. ``converged = (x_T == x_{T-1})`` proves ``x_T = f(x_T)``,
    the greedy result; a frame that did not converge must be redone another way (the predictor
    redoes it on the eager path). Chains of suppression are short in practice (a few steps).
    """
    s = _suppression(boxes, labels, valid, eligible, iou_threshold)
    keep = eligible
    previous = keep
    for _ in range(max(1, int(iterations))):
        previous = keep
        keep = eligible & ~(s & keep[:, :, None]).any(dim=1)
    return keep, (keep == previous).all(dim=1)


class StaticProposals(NamedTuple):
    """Step 3: Q = ``detections_per_img`` query slots per image, in score order."""

    boxes: Tensor  # (N, Q, 4) xyxy float32
    scores: Tensor  # (N, Q) float32
    labels: Tensor  # (N, Q) long
    locations: Tensor  # (N, Q) long index into A
    valid: Tensor  # (N, Q) bool
    converged: Tensor  # (N,) bool: the NMS reached its fixed point (else redo the frame eagerly)


def _compact(selected: Tensor, q: int, *values: Tensor) -> list[Tensor]:
    """The ``selected (N, k)`` entries of each ``value (N, k, ...)`` moved to the front of ``q``
    slots (in order; the rest zero), without data-dependent shapes."""
    n = selected.shape[0]
    target = torch.where(selected, torch.cumsum(selected.long(), 1) - 1, torch.full_like(selected, q, dtype=torch.long))
    target = target.clamp_max(q)
    out = []
    for v in values:
        idx = target.view(n, -1, *([1] * (v.dim() - 2))).expand_as(v)
        buf = torch.zeros((n, q + 1, *v.shape[2:]), dtype=v.dtype, device=v.device)
        out.append(buf.scatter(1, idx, v)[:, :q])  # the rest lands in the extra slot q, cut off
    return out


def select_proposals_static(cls_logits: Tensor, box_regression: Tensor, centerness: Tensor, points: Tensor,
                            image_hw: Tensor, *, score_threshold: float = 0.05, pre_nms_topk: int = 1000,
                            nms_threshold: float = 0.6, detections_per_img: int = 100,
                            instance_score_threshold: float = 0.3, nms_iterations: int = 16) -> StaticProposals:
    """The proposals of :func:`ciae_core.fusion.select_proposals` that
    :func:`~ciae_core.fusion.panoptic_from_raw` turns into instance queries (score >=
    ``instance_score_threshold``), in Q = ``detections_per_img`` slots (module docstring).

    Inputs as :func:`sorted_candidates` (image_hw ``(N, 2)``: the valid (h, w) of each image, a
    device tensor so that nothing is copied from the host); ``nms_iterations``: the fixed number
    of NMS steps (:func:`greedy_nms_fixed_point`; ``converged`` says whether they sufficed)."""
    c = sorted_candidates(cls_logits, box_regression, centerness, points, image_hw, score_threshold=score_threshold,
                          pre_nms_topk=pre_nms_topk)
    eligible = c.valid & (c.scores >= instance_score_threshold)
    keep, converged = greedy_nms_fixed_point(c.boxes, c.labels, c.valid, eligible, nms_threshold, nms_iterations)
    q = int(detections_per_img)
    selected = keep & (torch.cumsum(keep.long(), 1) <= q)
    boxes, scores, labels, locations = _compact(selected, q, c.boxes, c.scores, c.labels, c.locations)
    valid = torch.arange(q, device=keep.device)[None, :] < selected.sum(1, keepdim=True)
    return StaticProposals(boxes, scores, labels, locations, valid, converged)
