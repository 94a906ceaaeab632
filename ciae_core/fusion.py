"""Inference of CIAE (paper §IV-C, Eq. 16): proposal selection and panoptic fusion.

Pure functions on tensors (no model; numpy only at the boundary to the optional compiled CPU
kernels), batched over images, device-agnostic:

* :func:`select_proposals` — FCOS post-processing: score threshold, top-k before NMS, class-wise
  NMS, top-N after.
* :func:`fuse_panoptic` — Eq. 16: ``S = P V^T`` between the pixel embeddings P and the query
  embeddings V (stuff memory embeddings + one query per instance proposal), remote-instance
  filtering with the predicted boxes, per-pixel argmax, removal of small stuff regions and of
  mostly hidden instances; returns an id map and a per-segment table. With a stride-4 embedding
  it works coarse-to-fine (:mod:`ciae_core.fusion_coarse`): whole cells are decided from
  bounds at the embedding resolution and only boundary cells are evaluated per pixel; on a CPU
  the same algorithm runs as compiled loops (:mod:`ciae_core.fusion_kernels`, numba, optional).
  :func:`fuse_panoptic` is a short sequence of named steps (the ``_`` functions below it).
* :func:`panoptic_from_raw` — glue used by ``CIAE.postprocess``: raw network outputs → per-image
  results at the network input resolution.

Decision (precision): the public entry points :func:`fuse_panoptic` and :func:`panoptic_from_raw`
promote half-precision (float16/bfloat16) floating inputs to float32 before anything else, so
the fusion always runs in float32 (float64 inputs are left as they are). Half inputs arrive when
``CIAE.inference`` runs under a user's autocast, and the fusion does pixel geometry in the
input dtype: float16 overflows past 65504 (an image area of 256x256 px already is ``inf``,
which turned every stuff region void) and neither type represents pixel centres ``x + 0.5``
exactly from 1024 (float16) or 128 (bfloat16) px on, which moved box edges. The id maps of
half inputs are therefore those of the same values in float32. :func:`select_proposals` already
computes in float32.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from ciae_core import fusion_kernels
# (MASKED_SIMILARITY, bilinear_taps, coarse_to_fine_assignment and first_argmax stay importable from here)
from ciae_core.fusion_coarse import (MASKED_SIMILARITY, _bilinear_at, _compiled_assignment, _pixel_argmax,
                                     _sum_by_slot, _unit_similarities, _values_at, bilinear_taps,
                                     coarse_to_fine_assignment, first_argmax)

# fuse_panoptic's implementations of the same rules ("auto": numba on CPU, else coarse_to_fine, for
# embedding_stride > 1 without a confidence map; dense otherwise)
FUSION_METHODS = ("auto", "dense", "coarse_to_fine", "numba")


def select_proposals(cls_logits: Tensor, box_regression: Tensor, centerness: Tensor, points: Tensor,
                     image_sizes, *, score_threshold: float = 0.05, pre_nms_topk: int = 1000,
                     nms_threshold: float = 0.6, detections_per_img: int = 100) -> list[dict[str, Tensor]]:
    """FCOS proposals per image.

    cls_logits ``(N, A, T)``, box_regression ``(N, A, 4)`` ltrb input pixels, centerness ``(N, A)``
    logits, points ``(A, 2)``, image_sizes: N ``(h, w)``.
    Score = ``sqrt(sigmoid(cls) * sigmoid(centerness))`` (FCOS: centerness down-weights off-centre
    boxes); candidates (location, class) with score > ``score_threshold`` (threshold on the final
    score, as torchvision's FCOS), the ``pre_nms_topk`` best over all levels, boxes clipped to the
    image, class-wise NMS at IoU ``nms_threshold``, then the ``detections_per_img`` best.
    Returns per image ``boxes (n, 4)`` xyxy, ``scores (n,)``, ``labels (n,)`` thing training ids,
    ``locations (n,)`` index into A (where the proposal was generated), sorted by score.
    """
    n_img, a, t = cls_logits.shape
    out = []
    for n in range(n_img):
        h, w = (float(v) for v in image_sizes[n])
        scores = torch.sqrt(torch.sigmoid(cls_logits[n].float()) * torch.sigmoid(centerness[n].float())[:, None])
        flat = scores.flatten()
        cand = (flat > score_threshold).nonzero(as_tuple=True)[0]
        if cand.numel() > pre_nms_topk:
            cand = cand[flat[cand].topk(pre_nms_topk).indices]
        s = flat[cand]
        loc = torch.div(cand, t, rounding_mode="floor")
        lab = cand % t
        ltrb = box_regression[n, loc].float()
        p = points[loc].float()
        boxes = torch.cat([p - ltrb[:, :2], p + ltrb[:, 2:]], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = batched_nms(boxes, s, lab, nms_threshold)[:detections_per_img]
        out.append({"boxes": boxes[keep], "scores": s[keep], "labels": lab[keep], "locations": loc[keep]})
    return out


def _promote_half(t: Tensor) -> Tensor:
    """float16/bfloat16 → float32; any other tensor unchanged (module docstring, precision)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _image_size_tensor(image_sizes, n: int, device) -> Tensor:
    t = torch.as_tensor([[int(h), int(w)] for h, w in image_sizes], dtype=torch.long, device=device)
    if t.shape != (n, 2):
        raise ValueError(f"need {n} image sizes (h, w), got {len(image_sizes)}")
    return t


def panoptic_similarity(embedding: Tensor, queries: Tensor, embedding_stride: int = 1,
                        output_size: tuple[int, int] | None = None) -> Tensor:
    """Eq. 16: ``S = P x V^T`` — cosine similarity of every pixel with every query.

    embedding ``(N, D, h, w)`` unit pixel embeddings P, queries ``(N, K, D)`` unit → ``(N, K, H, W)``.
    With ``embedding_stride > 1`` the similarities are bilinearly up-sampled to
    ``(h*stride, w*stride)`` (or ``output_size``); since up-sampling is linear this equals
    ``up(P) V^T`` up to the order of normalisation.
    """
    sim = torch.einsum("ndhw,nkd->nkhw", embedding, queries.to(embedding.dtype))
    if embedding_stride > 1 or output_size is not None:
        size = output_size or (embedding.shape[-2] * embedding_stride, embedding.shape[-1] * embedding_stride)
        if tuple(sim.shape[-2:]) != tuple(size):
            sim = F.interpolate(sim, size=size, mode="bilinear", align_corners=False)
    return sim


def compile_fusion_kernels() -> bool:
    """Compile (or load from numba's disk cache) the CPU fusion kernels now, on a tiny problem,
    so that the first real frame does not wait for it (a few seconds cold, ~0.1 s cached).
    Returns whether :func:`fuse_panoptic` will use them on CPU (numba installed)."""
    if not fusion_kernels.available():
        return False
    emb = F.normalize(torch.ones(1, 2, 2, 2), dim=1)
    fuse_panoptic(emb, emb[0, :, 0, :1].t(), emb[:, :, 0, :1].transpose(1, 2), torch.tensor([[[0.0, 0.0, 4.0, 4.0]]]),
                  torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool),
                  num_things=1, embedding_stride=4, min_instance_area=64, method="numba")
    return True


def fuse_panoptic(embedding: Tensor, stuff_queries: Tensor, instance_queries: Tensor, instance_boxes: Tensor,
                  instance_labels: Tensor, instance_scores: Tensor, instance_valid: Tensor, *, num_things: int,
                  image_sizes=None, embedding_stride: int = 1, min_stuff_area: float = 4096,
                  stuff_area_reference: float = 640 * 480, min_visible_fraction: float = 0.2,
                  min_instance_area: float = 16, outside_box_value: float = 0.0,
                  return_confidence: bool = False, method: str = "auto",
                  normalize_after_upsampling: bool = False) -> dict[str, Tensor]:
    """Panoptic fusion (§IV-C): assign every pixel to the most similar query (Eq. 16).

    Inputs (N images, D dims, S stuff classes, Q instance slots, padded with ``instance_valid``):
      embedding ``(N, D, h, w)`` unit pixel embeddings; stuff_queries ``(S, D)`` memory embeddings of
      the stuff classes (training ids T..T+S-1); instance_queries ``(N, Q, D)`` unit (P at the
      proposal's location); instance_boxes ``(N, Q, 4)`` xyxy in output pixels; instance_labels
      ``(N, Q)`` thing training ids; instance_scores ``(N, Q)``; instance_valid ``(N, Q)`` bool;
      image_sizes: N ``(h, w)`` valid region (top-left) of each image; outside it is void.
      ``normalize_after_upsampling=True`` (with ``embedding_stride > 1``): ``embedding`` is the
      un-normalised stride-s map ``P' + P''`` and the pixel embeddings are the paper's
      ``P = L2norm(up(P' + P''))`` (Eq. 1). The argmax needs no normalisation: ``up`` is linear and
      the norm is a positive per-pixel factor, so ``argmax_k <P(x), V_k> = argmax_k up(E V_k^T)(x)``
      (and the sign against ``outside_box_value = 0`` is kept). Without it the stride-s map is
      unit-normalised before up-sampling (cheaper values, a different embedding near edges).

    Steps (all batched tensor ops):
      1. S = P V^T (:func:`panoptic_similarity`), V = [stuff queries, instance queries].
      2. Remote-instance filtering (§IV-B): an instance's similarity outside its predicted box is
         set to ``outside_box_value`` (0 in the paper). A pixel's centre must be in the box.
      3. argmax over queries (ties go to the lower index: stuff first, then instances in the
         given order — pass instances sorted by score).
      4. Instances with little visible area are dropped and the argmax is redone without them
         (their pixels go to the next best query): visible area < ``min_instance_area`` px or
         < ``min_visible_fraction`` of the box's area inside the image. (Our rule: a proposal
         whose pixels are mostly taken by others is a duplicate or an occluded false positive.)
      5. Stuff regions smaller than ``min_stuff_area * (h*w) / stuff_area_reference`` px become
         void (paper: 4096 px; we read that at COCO's evaluated resolution ~640x480 and scale it
         with the image area; ``stuff_area_reference <= 0`` uses ``min_stuff_area`` as is).
      6. Segment ids 1..n in query order (stuff classes first, then instances).

    Cost (this function was up to half of the end-to-end time): the ``(N, K, H, W)`` similarity
    tensor is the only full-size float tensor and is masked in place (invalid/dropped instances by
    plane, boxes by one broadcast mask); the argmax is :func:`first_argmax` (amax + equality
    pass); box areas are row count x column count; the step-4 argmax is redone only for the
    pixels a dropped instance had won (removing a query changes no other pixel's maximum);
    segment areas and boxes come from one (slot, row) and one (slot, column) histogram instead of
    scatter-min/max over all pixels. Same results as the straightforward version.

    Stuff scores with ``normalize_after_upsampling`` (both methods) are the mean over the segment
    of the up-sampled stride-s cosine similarity to the class query (a smooth stand-in for the
    per-pixel cosine, which would need every pixel's norm; they differ by up to ~0.05 near edges).

    ``method``: ``"dense"`` builds the full ``(N, K, H, W)`` similarity tensor as above;
    ``"coarse_to_fine"`` (``embedding_stride > 1`` only) finds the same argmax without it, see
    :func:`coarse_to_fine_assignment` (cost ~ K x low-res cells + H x W + K x boundary pixels
    instead of K x H x W); ``"auto"`` picks coarse-to-fine when ``embedding_stride > 1`` and no
    confidence map is asked for (the top-1 minus top-2 margin needs every plane at every pixel);
    ``"numba"`` (CPU tensors, numba installed) runs the coarse-to-fine algorithm as compiled loops
    (:mod:`ciae_core.fusion_kernels`: each corner value read once, no ``(N, K, h, w)``
    temporaries, areas and boxes in the same pass; about 4x faster than ``"coarse_to_fine"`` on
    a small model's 512 px frame), and ``"auto"`` prefers it on CPU. All methods give the same
    id map and table (tests compare them).

    float16/bfloat16 inputs are computed in float32 (module docstring); the float outputs are then
    float32.

    Returns tensors (K = S + Q segment slots):
      ``id_map (N, H, W)`` int32 (0 = void; H, W = h*stride, w*stride), ``segment_ids (N, K)``
      int32 (0 = slot unused), ``labels (N, K)`` int64 training ids, ``isthing (N, K)`` bool,
      ``scores (N, K)`` (instances: detection score; stuff: mean similarity of its pixels),
      ``areas (N, K)`` int64, ``boxes (N, K, 4)`` tight xyxy of the segment's pixels (max edge
      exclusive: ``x_max + 1``), optional ``confidence (N, H, W)``: top-1 minus top-2 similarity.
    """
    # half-precision inputs run in float32 (module docstring: area and pixel-centre arithmetic)
    embedding, stuff_queries, instance_queries, instance_boxes, instance_scores = (
        _promote_half(t) for t in (embedding, stuff_queries, instance_queries, instance_boxes, instance_scores))
    n, _, he, we = embedding.shape
    s_num, k_num = stuff_queries.shape[0], stuff_queries.shape[0] + instance_queries.shape[1]
    coarse, compiled = _fusion_path(method, k_num, embedding_stride, return_confidence, normalize_after_upsampling,
                                    embedding.device)
    dtype = embedding.dtype
    queries = torch.cat([stuff_queries[None].expand(n, -1, -1).to(dtype), instance_queries.to(dtype)], dim=1)  # V
    px = _pixel_geometry(image_sizes, instance_boxes.to(dtype), n, he * embedding_stride, we * embedding_stride,
                         per_pixel=not compiled)
    valid = instance_valid.bool()
    hidden = functools.partial(_hidden_instances, valid=valid, box_area=px.box_area, s_num=s_num, dtype=dtype,
                               min_instance_area=min_instance_area, min_visible_fraction=min_visible_fraction)
    # 1.–4. Eq. 16 with the remote-instance filter: first assignment, mostly hidden instances dropped
    if compiled:
        fused = _fuse_compiled(embedding, queries, px, valid, s_num, normalize_after_upsampling, outside_box_value,
                               hidden)
    elif coarse:
        fused = _fuse_coarse_to_fine(embedding, queries, px, valid, s_num, normalize_after_upsampling,
                                     outside_box_value, hidden)
    else:
        fused = _fuse_dense(embedding, queries, px, valid, s_num, embedding_stride, normalize_after_upsampling,
                            outside_box_value, hidden, return_confidence)
    slots = None if compiled else _slots_or_void(fused.assign, px, k_num)  # (N, H*W), void = K
    area, boxes = fused.extents if compiled else _segment_extents(slots, px, k_num)
    # 5. small stuff → void; instances must still satisfy the area rule
    keep = _kept_segments(area, fused.keep_instances, px.sizes, s_num, min_stuff_area, stuff_area_reference,
                          min_instance_area, dtype)
    # 6. ids 1..n in slot order (stuff classes first, then instances): the kept slots
    segment_ids = torch.cumsum(keep.long(), dim=1) * keep.long()
    slot_sums = fused.slot_sums
    if slot_sums is None:  # dense: each pixel's own similarity, summed by slot
        slot_sums = _sum_by_slot(torch.arange(n, device=slots.device)[:, None].expand_as(slots), slots,
                                 fused.values.flatten(1), n, k_num + 1)[:, :k_num]
    out = _segment_table(_id_map(segment_ids, fused.assign, slots), segment_ids, keep, area * keep, boxes.to(dtype),
                         slot_sums, instance_labels, instance_scores, num_things, dtype)
    if fused.confidence is not None:
        out["confidence"] = torch.where(out["id_map"] > 0, fused.confidence, torch.zeros_like(fused.confidence))
    return out


def _fusion_path(method: str, k_num: int, embedding_stride: int, return_confidence: bool,
                 normalize_after_upsampling: bool, device: torch.device) -> tuple[bool, bool]:
    """Checks :func:`fuse_panoptic`'s options for ``k_num`` queries; returns ``(coarse, compiled)``:
    whether the assignment runs coarse-to-fine, and whether as the compiled CPU kernels."""
    if k_num == 0:
        raise ValueError("fuse_panoptic needs at least one query (stuff class or instance)")
    if method not in FUSION_METHODS:
        raise ValueError(f"fuse_panoptic: unknown method {method!r} ({', '.join(FUSION_METHODS)})")
    if method in ("coarse_to_fine", "numba") and (embedding_stride <= 1 or return_confidence):
        raise ValueError(f"fuse_panoptic: {method} needs embedding_stride > 1 and return_confidence=False")
    if method == "numba" and (device.type != "cpu" or not fusion_kernels.available()):
        raise ValueError("fuse_panoptic: method 'numba' runs on CPU tensors and needs the numba package "
                         "(pip install numba); use 'auto'")
    if normalize_after_upsampling and embedding_stride <= 1:
        raise ValueError("fuse_panoptic: normalize_after_upsampling needs embedding_stride > 1")
    coarse = method in ("coarse_to_fine", "numba") or (method == "auto" and embedding_stride > 1
                                                       and not return_confidence)
    compiled = method == "numba" or (method == "auto" and coarse and device.type == "cpu"
                                     and fusion_kernels.available())
    return coarse, compiled


class _PixelGeometry(NamedTuple):
    """The output grid of :func:`fuse_panoptic` (N images, Q instance slots, ``(H, W)`` output)."""

    sizes: Tensor  # (N, 2) long: valid (h, w) of each image (top-left)
    ys: Tensor  # (H,) long row indices
    xs: Tensor  # (W,) long column indices
    row_valid: Tensor  # (N, H) bool
    col_valid: Tensor  # (N, W) bool
    pixel_valid: Tensor | None  # (N, H, W) bool (None where not needed: the compiled path)
    all_valid: bool  # every image fills the whole grid
    in_y: Tensor  # (N, Q, H) bool: the row's pixel centres are inside the instance's box
    in_x: Tensor  # (N, Q, W) bool: the column's pixel centres are inside the instance's box
    box_area: Tensor  # (N, Q) long: pixels of the box inside the valid region


def _pixel_geometry(image_sizes, boxes: Tensor, n: int, hh: int, ww: int, per_pixel: bool) -> _PixelGeometry:
    """Valid regions and step 2's box masks on the ``(H, W) = (hh, ww)`` output grid.

    Remote-instance filtering (§IV-B): a pixel belongs to an instance's box when its centre
    ``(x + 0.5, y + 0.5)`` is in it. boxes ``(N, Q, 4)`` xyxy output pixels in the fusion dtype;
    image_sizes: N ``(h, w)``, or None for the whole grid; ``per_pixel``: also ``pixel_valid``."""
    dev = boxes.device
    sizes = _image_size_tensor(image_sizes, n, dev) if image_sizes is not None else \
        torch.tensor([[hh, ww]] * n, dtype=torch.long, device=dev)
    ys = torch.arange(hh, device=dev)
    xs = torch.arange(ww, device=dev)
    row_valid = ys[None, :] < sizes[:, 0, None]  # (N, H)
    col_valid = xs[None, :] < sizes[:, 1, None]  # (N, W)
    pixel_valid = row_valid[:, :, None] & col_valid[:, None, :] if per_pixel else None
    all_valid = bool((sizes[:, 0] >= hh).all()) and bool((sizes[:, 1] >= ww).all())
    cx = xs.to(boxes.dtype) + 0.5
    cy = ys.to(boxes.dtype) + 0.5
    in_x = (cx[None, None, :] >= boxes[..., 0:1]) & (cx[None, None, :] <= boxes[..., 2:3])  # (N, Q, W)
    in_y = (cy[None, None, :] >= boxes[..., 1:2]) & (cy[None, None, :] <= boxes[..., 3:4])  # (N, Q, H)
    box_area = (in_y & row_valid[:, None]).sum(-1) * (in_x & col_valid[:, None]).sum(-1)  # (N, Q) in-image box px
    return _PixelGeometry(sizes, ys, xs, row_valid, col_valid, pixel_valid, all_valid, in_y, in_x, box_area)


def _slots_or_void(assign: Tensor, px: _PixelGeometry, k_num: int) -> Tensor:
    """``assign (N, H, W)`` slots → ``(N, H*W)`` long with void (= ``k_num``) outside each valid region."""
    if px.all_valid:
        return assign.flatten(1)
    return torch.where(px.pixel_valid, assign, torch.full((), k_num, dtype=torch.long, device=assign.device)).flatten(1)


def _slot_offsets(n: int, k_num: int, device) -> Tensor:
    """``(N, 1)``: image i's slots (void included) are ``i * (K + 1) + slot`` in the joint histograms."""
    return torch.arange(n, device=device)[:, None] * (k_num + 1)


def _slot_counts(assign: Tensor, px: _PixelGeometry, k_num: int) -> Tensor:
    """Valid pixels won by each slot: ``assign (N, H, W)`` → ``(N, K)`` long."""
    n = assign.shape[0]
    keys = _slots_or_void(assign, px, k_num) + _slot_offsets(n, k_num, assign.device)
    return torch.bincount(keys.flatten(), minlength=n * (k_num + 1)).view(n, k_num + 1)[:, :k_num]


def _hidden_instances(area: Tensor, *, valid: Tensor, box_area: Tensor, s_num: int, dtype: torch.dtype,
                      min_instance_area: float, min_visible_fraction: float) -> Tensor:
    """Step 4's rule: pixels per slot ``area (N, K)`` → ``(N, Q)`` bool, the valid instances with
    less than ``min_instance_area`` px or ``min_visible_fraction`` of their in-image box area."""
    inst_area = area[:, s_num:]
    return valid & ((inst_area < min_instance_area) | (inst_area.to(dtype) < min_visible_fraction * box_area))


class _Assignment(NamedTuple):
    """Steps 1–4 of :func:`fuse_panoptic`: every output pixel's slot (K = S stuff + Q instances)."""

    assign: Tensor  # (N, H, W) slot per pixel (compiled: int32, void = K outside the valid regions)
    keep_instances: Tensor  # (N, Q) bool: valid and not dropped in step 4
    slot_sums: Tensor | None  # (N, K) float32 similarity sums of the stuff slots over their pixels
    values: Tensor | None = None  # (N, H, W) each pixel's similarity to its slot (when slot_sums is None)
    confidence: Tensor | None = None  # (N, H, W) top-1 minus top-2 similarity (dense, on request)
    extents: tuple[Tensor, Tensor] | None = None  # compiled: area (N, K), boxes (N, K, 4) xyxy


def _taps(px: _PixelGeometry, he: int, we: int):
    """The bilinear taps from the ``(he, we)`` embedding grid to the output rows and columns."""
    dev = px.ys.device
    return bilinear_taps(px.ys.numel(), he, dev), bilinear_taps(px.xs.numel(), we, dev)


def _fuse_compiled(embedding: Tensor, queries: Tensor, px: _PixelGeometry, valid: Tensor, s_num: int,
                   normalize_after_upsampling: bool, outside_box_value: float, hidden: Callable) -> _Assignment:
    """Steps 1–4 and the segment extents as compiled CPU loops (:mod:`ciae_core.fusion_kernels`).

    embedding ``(N, D, h, w)``, queries ``(N, K, D)``, valid ``(N, Q)``; Eq. 16's ``E V^T`` at the
    embedding resolution with the queries innermost ``(N, h, w, K)`` (the kernels read a cell's K
    values contiguously); the stuff scores sum it divided by the pixel norms (cosines)."""
    n, _, he, we = embedding.shape
    sim_low = torch.einsum("ndhw,nkd->nhwk", embedding.float(), queries.float()).contiguous()
    norms = embedding.float().pow(2).sum(1).sqrt().clamp_min(1e-12) if normalize_after_upsampling else \
        torch.ones(n, he, we)
    assign, slot_sums, keep, extents = _compiled_assignment(sim_low, norms, _taps(px, he, we), s_num, px.in_y, px.in_x,
                                                            valid, px.sizes, outside_box_value, hidden)
    return _Assignment(assign, keep, slot_sums, extents=extents)


def _fuse_coarse_to_fine(embedding: Tensor, queries: Tensor, px: _PixelGeometry, valid: Tensor, s_num: int,
                         normalize_after_upsampling: bool, outside_box_value: float, hidden: Callable) -> _Assignment:
    """Steps 1–4 without the full-resolution similarity tensor (:mod:`ciae_core.fusion_coarse`).

    embedding ``(N, D, h, w)``, queries ``(N, K, D)``, valid ``(N, Q)``. Eq. 16 at the embedding
    resolution ``(N, K, h, w)``; with ``normalize_after_upsampling`` the argmax runs on ``E V^T``
    and the values (stuff scores) come from the unit low-res map."""
    n, _, he, we = embedding.shape
    k_num = queries.shape[1]
    sim_low = torch.einsum("ndhw,nkd->nkhw", embedding, queries).contiguous()
    value_low = _unit_similarities(embedding, queries, sim_low) if normalize_after_upsampling else None
    taps = _taps(px, he, we)
    # 3. first assignment; slot_sums: similarity sums of every slot that is never dropped (stuff included)
    assign, slot_sums = coarse_to_fine_assignment(sim_low, taps, s_num, px.in_y, px.in_x, valid, px.sizes,
                                                  outside_box_value, value_low)
    # 4. drop mostly hidden instances and re-assign the pixels they had won
    drop = hidden(_slot_counts(assign, px, k_num))
    keep = valid & ~drop
    if k_num > s_num and bool(drop.any()):
        dropped_slot = torch.cat([torch.zeros(n, s_num, dtype=torch.bool, device=drop.device), drop], dim=1)
        lost = dropped_slot.gather(1, assign.flatten(1)).view_as(assign) & px.pixel_valid
        idx = lost.nonzero(as_tuple=True)
        t1, assign[idx] = _pixel_argmax(sim_low, taps, idx, s_num, px.in_y, px.in_x, keep, outside_box_value)
        if value_low is not None:
            t1 = _values_at(value_low, taps, idx, assign[idx], s_num, px.in_y, px.in_x, outside_box_value)
        slot_sums += _sum_by_slot(idx[0], assign[idx], t1, n, k_num)
    return _Assignment(assign, keep, slot_sums)


def _fuse_dense(embedding: Tensor, queries: Tensor, px: _PixelGeometry, valid: Tensor, s_num: int,
                embedding_stride: int, normalize_after_upsampling: bool, outside_box_value: float, hidden: Callable,
                return_confidence: bool) -> _Assignment:
    """Steps 1–4 on the full ``(N, K, H, W)`` similarity tensor, masked in place (``method="dense"``).

    embedding ``(N, D, h, w)``, queries ``(N, K, D)``, valid ``(N, Q)``. Eq. 16: ``S = P V^T``
    (:func:`panoptic_similarity`); with ``normalize_after_upsampling`` P is the paper's
    ``L2norm(up(E))`` and the values (stuff scores) are the up-sampled stride-s cosines, as
    coarse-to-fine. Also the confidence map when asked for."""
    n, _, he, we = embedding.shape
    k_num = queries.shape[1]
    if normalize_after_upsampling:  # the paper's P at full resolution
        size = (px.ys.numel(), px.xs.numel())
        low = embedding
        embedding = F.normalize(F.interpolate(embedding, size=size, mode="bilinear", align_corners=False), dim=1)
        sim = panoptic_similarity(embedding, queries).contiguous()
    else:
        sim = panoptic_similarity(embedding, queries, embedding_stride).contiguous()
    inst_sim = sim[:, s_num:]  # (N, Q, H, W) view
    if k_num > s_num:  # 2. remote-instance filtering
        inst_sim.masked_fill_(~px.in_y[..., :, None] | ~px.in_x[..., None, :], outside_box_value)
        if not bool(valid.all()):
            inst_sim[~valid] = MASKED_SIMILARITY  # whole planes
    # 3. first assignment
    top1, assign = first_argmax(sim, 1)
    # 4. drop mostly hidden instances; re-assign the pixels they had won
    drop = hidden(_slot_counts(assign, px, k_num))
    keep = valid & ~drop
    if k_num > s_num and bool(drop.any()):
        inst_sim[drop] = MASKED_SIMILARITY  # whole planes
        dropped_slot = torch.cat([torch.zeros(n, s_num, dtype=torch.bool, device=drop.device), drop], dim=1)
        lost = dropped_slot.gather(1, assign.flatten(1)).view_as(assign)  # (N, H, W)
        t1, a1 = sim.permute(0, 2, 3, 1)[lost].max(dim=-1)  # (M, K) rows: first index of the max
        top1[lost] = t1
        assign[lost] = a1
    confidence = None
    if return_confidence and k_num >= 2:
        # second-best value = max after removing the best entry (what topk(2) returns); sim is done
        sim.scatter_(1, assign[:, None], float("-inf"))
        confidence = (top1 - sim.amax(1)).clamp(0.0, 2.0)
    elif return_confidence:
        confidence = top1.clamp(0.0, 2.0)
    values = top1
    if normalize_after_upsampling:  # stuff scores from the up-sampled stride-s cosines, as coarse-to-fine
        value_low = _unit_similarities(low, queries).contiguous()
        grid = torch.meshgrid(torch.arange(n, device=assign.device), px.ys, px.xs, indexing="ij")
        values = _values_at(value_low, _taps(px, he, we), tuple(g.reshape(-1) for g in grid), assign.reshape(-1),
                            s_num, px.in_y, px.in_x, outside_box_value).view_as(assign)
    return _Assignment(assign, keep, None, values=values, confidence=confidence)


def _segment_extents(slots: Tensor, px: _PixelGeometry, k_num: int) -> tuple[Tensor, Tensor]:
    """Area ``(N, K)`` and tight box ``(N, K, 4)`` xyxy (max edge exclusive; long) of every slot
    from one (slot, row) and one (slot, column) histogram of ``slots (N, H*W)`` (void = K)."""
    n = slots.shape[0]
    hh, ww = px.ys.numel(), px.xs.numel()
    g = (slots + _slot_offsets(n, k_num, slots.device)).view(n, hh, ww)
    row_hist = torch.bincount((g * hh + px.ys[None, :, None]).flatten(), minlength=n * (k_num + 1) * hh)
    col_hist = torch.bincount((g * ww + px.xs[None, None, :]).flatten(), minlength=n * (k_num + 1) * ww)
    row_hist = row_hist.view(n, k_num + 1, hh)[:, :k_num]
    col_hist = col_hist.view(n, k_num + 1, ww)[:, :k_num]
    r = (row_hist > 0).to(torch.uint8)  # first / last occupied row and column
    c = (col_hist > 0).to(torch.uint8)
    y0, x0 = r.argmax(-1), c.argmax(-1)
    y1, x1 = hh - r.flip(-1).argmax(-1), ww - c.flip(-1).argmax(-1)
    return row_hist.sum(-1), torch.stack([x0, y0, x1, y1], dim=-1)


def _kept_segments(area: Tensor, keep_instances: Tensor, sizes: Tensor, s_num: int, min_stuff_area: float,
                   stuff_area_reference: float, min_instance_area: float, dtype: torch.dtype) -> Tensor:
    """Step 5: slots that become segments ``(N, K)`` bool from their areas ``(N, K)``: a stuff
    region needs ``min_stuff_area * (h*w) / stuff_area_reference`` px of its image's valid area
    (``sizes (N, 2)``; as is when ``stuff_area_reference <= 0``), an instance must be kept by step
    4 ``keep_instances (N, Q)`` and still have ``min_instance_area`` px."""
    img_area = (sizes[:, 0] * sizes[:, 1]).to(dtype)
    if stuff_area_reference and stuff_area_reference > 0:
        stuff_thr = min_stuff_area * img_area / float(stuff_area_reference)
    else:
        stuff_thr = torch.full_like(img_area, float(min_stuff_area))
    keep = area > 0
    keep[:, :s_num] &= area[:, :s_num].to(dtype) >= stuff_thr[:, None]
    keep[:, s_num:] &= keep_instances & (area[:, s_num:] >= min_instance_area)
    return keep


def _id_map(segment_ids: Tensor, assign: Tensor, slots: Tensor | None) -> Tensor:
    """Step 6: the id of every pixel's slot ``(N, H, W)`` int32 (0 = void) from ``segment_ids
    (N, K)``; from ``slots (N, H*W)`` (void = K), or without them from the compiled path's
    ``assign`` (void already K) with :func:`ciae_core.fusion_kernels.ids_of_slots`."""
    n = segment_ids.shape[0]
    ext = torch.cat([segment_ids, torch.zeros(n, 1, dtype=torch.long, device=segment_ids.device)], dim=1)
    ext = ext.to(torch.int32)
    if slots is not None:
        return ext.gather(1, slots).view(assign.shape)
    return torch.from_numpy(fusion_kernels.ids_of_slots(assign.numpy(), ext.contiguous().numpy()))


def _segment_table(id_map: Tensor, segment_ids: Tensor, keep: Tensor, area: Tensor, boxes: Tensor, slot_sums: Tensor,
                   instance_labels: Tensor, instance_scores: Tensor, num_things: int,
                   dtype: torch.dtype) -> dict[str, Tensor]:
    """:func:`fuse_panoptic`'s result from the kept slots: area ``(N, K)`` of the kept segments,
    boxes ``(N, K, 4)``, similarity sums ``(N, K)`` (a stuff score is its segment's mean),
    instance labels and scores ``(N, Q)``."""
    n, q_num = instance_labels.shape
    s_num = segment_ids.shape[1] - q_num
    dev = segment_ids.device
    boxes = torch.where((area > 0)[..., None], boxes, torch.zeros_like(boxes))
    stuff_scores = slot_sums[:, :s_num].to(dtype) / area[:, :s_num].clamp_min(1).to(dtype)
    scores = torch.cat([stuff_scores, instance_scores.to(dtype)], dim=1)
    labels = torch.cat([torch.arange(num_things, num_things + s_num, device=dev)[None].expand(n, -1),
                        instance_labels.long()], dim=1)
    isthing = torch.cat([torch.zeros(n, s_num, dtype=torch.bool, device=dev),
                         torch.ones(n, q_num, dtype=torch.bool, device=dev)], dim=1)
    return {"id_map": id_map, "segment_ids": segment_ids.to(torch.int32), "labels": labels, "isthing": isthing,
            "scores": torch.where(keep, scores, torch.zeros_like(scores)), "areas": area, "boxes": boxes}


def split_panoptic(fused: dict[str, Tensor], image_sizes) -> list[dict[str, Tensor]]:
    """Batched :func:`fuse_panoptic` output → one dict per image, cropped to its size.

    Each dict: ``id_map (h, w)`` int32, ``ids (n,)`` int32 in id order, ``labels (n,)`` training
    ids, ``isthing (n,)``, ``scores (n,)``, ``areas (n,)``, ``boxes (n, 4)``; ``confidence (h, w)``
    when present.
    """
    results = []
    for i, (h, w) in enumerate(image_sizes):
        h, w = int(h), int(w)
        used = fused["segment_ids"][i] > 0
        r = {"id_map": fused["id_map"][i, :h, :w].contiguous(), "ids": fused["segment_ids"][i][used],
             "labels": fused["labels"][i][used], "isthing": fused["isthing"][i][used],
             "scores": fused["scores"][i][used], "areas": fused["areas"][i][used],
             "boxes": fused["boxes"][i][used]}
        if "confidence" in fused:
            r["confidence"] = fused["confidence"][i, :h, :w].contiguous()
        results.append(r)
    return results


def instance_queries_at(embedding: Tensor, locations_xy: Tensor, embedding_stride: int = 1,
                        interpolate: bool = False) -> Tensor:
    """Query embedding of a proposal = P at the location that produced it (§IV-C).

    embedding ``(D, h, w)``, locations_xy ``(Q, 2)`` input pixels → ``(Q, D)`` unit (clamped to
    the map). ``interpolate=False``: the stride-s sample containing the pixel;
    ``interpolate=True``: the bilinear up-sampling of the map at that pixel (the paper's
    ``P = L2norm(up(P' + P''))`` at the location, for ``normalize_after_upsampling``).
    """
    _, h, w = embedding.shape
    px = locations_xy[:, 0].long()
    py = locations_xy[:, 1].long()
    if interpolate and embedding_stride > 1:
        hh, ww = h * embedding_stride, w * embedding_stride
        taps = (bilinear_taps(hh, h, embedding.device), bilinear_taps(ww, w, embedding.device))
        py, px = py.clamp(0, hh - 1), px.clamp(0, ww - 1)
        e = embedding.float()
        p = _bilinear_at(lambda r, c: e[:, r, c], taps, py, px)  # (D, Q)
        return F.normalize(p.t(), dim=1).to(embedding.dtype)
    x = torch.div(px, embedding_stride, rounding_mode="floor").clamp(0, w - 1)
    y = torch.div(py, embedding_stride, rounding_mode="floor").clamp(0, h - 1)
    return F.normalize(embedding[:, y, x].t(), dim=1)


def panoptic_from_raw(raw: dict[str, Tensor], image_sizes, *, num_things: int, embedding_stride: int = 1,
                      score_threshold: float = 0.05, pre_nms_topk: int = 1000, nms_threshold: float = 0.6,
                      detections_per_img: int = 100, instance_score_threshold: float = 0.3,
                      min_stuff_area: float = 4096, stuff_area_reference: float = 640 * 480,
                      min_visible_fraction: float = 0.2, min_instance_area: float = 16,
                      outside_box_value: float = 0.0, return_confidence: bool = False,
                      fusion_method: str = "auto", normalize_after_upsampling: bool = False) -> list[dict[str, Tensor]]:
    """``CIAE.forward_raw`` outputs → per-image panoptic results (see :func:`split_panoptic`).

    Proposals from :func:`select_proposals`; only those with score >= ``instance_score_threshold``
    become instance queries (our decision: low-score proposals of the 0.05 detection threshold
    would otherwise claim pixels as spurious segments; 0.3 is a panoptic-quality operating
    point, lower it for recall). Stuff queries are ``memory[T:]``. Half-precision outputs (autocast)
    are promoted to float32 first (module docstring).
    """
    raw = {k: _promote_half(v) if isinstance(v, Tensor) else v for k, v in raw.items()}
    emb = raw["embedding"]
    n = emb.shape[0]
    props = select_proposals(raw["cls_logits"], raw["box_regression"], raw["centerness"], raw["points"], image_sizes,
                             score_threshold=score_threshold, pre_nms_topk=pre_nms_topk, nms_threshold=nms_threshold,
                             detections_per_img=detections_per_img)
    props = [{k: v[p["scores"] >= instance_score_threshold] for k, v in p.items()} for p in props]
    q = max([p["scores"].numel() for p in props] + [0])
    d = emb.shape[1]
    dev = emb.device
    queries = emb.new_zeros(n, q, d)
    boxes = emb.new_zeros(n, q, 4)
    labels = torch.zeros(n, q, dtype=torch.long, device=dev)
    scores = emb.new_zeros(n, q)
    valid = torch.zeros(n, q, dtype=torch.bool, device=dev)
    for i, p in enumerate(props):
        m = p["scores"].numel()
        if m == 0:
            continue
        queries[i, :m] = instance_queries_at(emb[i], raw["points"][p["locations"]], embedding_stride,
                                             interpolate=normalize_after_upsampling)
        boxes[i, :m] = p["boxes"].to(emb.dtype)
        labels[i, :m] = p["labels"]
        scores[i, :m] = p["scores"].to(emb.dtype)
        valid[i, :m] = True
    fused = fuse_panoptic(emb, raw["memory"][num_things:], queries, boxes, labels, scores, valid,
                          num_things=num_things, image_sizes=image_sizes, embedding_stride=embedding_stride,
                          min_stuff_area=min_stuff_area, stuff_area_reference=stuff_area_reference,
                          min_visible_fraction=min_visible_fraction, min_instance_area=min_instance_area,
                          outside_box_value=outside_box_value, return_confidence=return_confidence,
                          method=fusion_method, normalize_after_upsampling=normalize_after_upsampling)
    return split_panoptic(fused, image_sizes)
