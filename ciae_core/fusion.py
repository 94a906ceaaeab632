"""Inference of CIAE (paper §IV-C, Eq. 16): proposal selection and panoptic fusion.

Pure functions on tensors (no model, no numpy), batched over images, device-agnostic:

* :func:`select_proposals` — FCOS post-processing: score threshold, top-k before NMS, class-wise
  NMS, top-N after.
* :func:`fuse_panoptic` — Eq. 16: ``S = P V^T`` between the pixel embeddings P and the query
  embeddings V (stuff memory embeddings + one query per instance proposal), remote-instance
  filtering with the predicted boxes, per-pixel argmax, removal of small stuff regions and of
  mostly hidden instances; returns an id map and a per-segment table.
* :func:`panoptic_from_raw` — glue used by ``CIAE.postprocess``: raw network outputs → per-image
  results at the network input resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

# similarity given to queries that must not win a pixel (cosine similarities are >= -1)
MASKED_SIMILARITY = -4.0


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


def first_argmax(sim: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """``sim.max(dim)`` — values and the *first* index of the maximum, exactly — computed as
    ``amax`` plus an equality pass: ``torch.max``/``argmax`` over a non-innermost dimension is
    up to 10x slower on CPU than ``amax`` (at 83 x 800 x 1216 about 300 ms vs 30 ms), and
    transposing the queries innermost costs more than it saves. Finite inputs.
    """
    top = sim.amax(dim, keepdim=True)
    k = sim.shape[dim]
    shape = [1] * sim.dim()
    shape[dim] = k
    is_top = sim == top
    if k <= 255:  # reinterpret the bool mask as 0/1 bytes (no copy)
        key_dtype, key = torch.uint8, is_top.view(torch.uint8)
    else:
        key_dtype = torch.int16 if k < 2 ** 15 else torch.int32
        key = is_top.to(key_dtype)
    rev = torch.arange(k, 0, -1, dtype=key_dtype, device=sim.device).view(shape)  # first index → largest key
    key.mul_(rev)
    return top.squeeze(dim), k - key.amax(dim).long()


def fuse_panoptic(embedding: Tensor, stuff_queries: Tensor, instance_queries: Tensor, instance_boxes: Tensor,
                  instance_labels: Tensor, instance_scores: Tensor, instance_valid: Tensor, *, num_things: int,
                  image_sizes=None, embedding_stride: int = 1, min_stuff_area: float = 4096,
                  stuff_area_reference: float = 640 * 480, min_visible_fraction: float = 0.2,
                  min_instance_area: float = 16, outside_box_value: float = 0.0,
                  return_confidence: bool = False) -> dict[str, Tensor]:
    """Panoptic fusion (§IV-C): assign every pixel to the most similar query (Eq. 16).

    Inputs (N images, D dims, S stuff classes, Q instance slots, padded with ``instance_valid``):
      embedding ``(N, D, h, w)`` unit pixel embeddings; stuff_queries ``(S, D)`` memory embeddings of
      the stuff classes (training ids T..T+S-1); instance_queries ``(N, Q, D)`` unit (P at the
      proposal's location); instance_boxes ``(N, Q, 4)`` xyxy in output pixels; instance_labels
      ``(N, Q)`` thing training ids; instance_scores ``(N, Q)``; instance_valid ``(N, Q)`` bool;
      image_sizes: N ``(h, w)`` valid region (top-left) of each image; outside it is void.

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
    segment areas/boxes come from bincounts and (slot, row)/(slot, column) presence tables
    instead of scatter-min/max over all pixels. Same results as the straightforward version.

    Returns tensors (K = S + Q segment slots):
      ``id_map (N, H, W)`` int32 (0 = void; H, W = h*stride, w*stride), ``segment_ids (N, K)``
      int32 (0 = slot unused), ``labels (N, K)`` int64 training ids, ``isthing (N, K)`` bool,
      ``scores (N, K)`` (instances: detection score; stuff: mean similarity of its pixels),
      ``areas (N, K)`` int64, ``boxes (N, K, 4)`` tight xyxy of the segment's pixels (max edge
      exclusive: ``x_max + 1``), optional ``confidence (N, H, W)``: top-1 minus top-2 similarity.
    """
    n, d, he, we = embedding.shape
    dev = embedding.device
    s_num = stuff_queries.shape[0]
    q_num = instance_queries.shape[1]
    k_num = s_num + q_num
    if k_num == 0:
        raise ValueError("fuse_panoptic needs at least one query (stuff class or instance)")
    queries = torch.cat([stuff_queries[None].expand(n, -1, -1).to(embedding.dtype),
                         instance_queries.to(embedding.dtype)], dim=1)
    sim = panoptic_similarity(embedding, queries, embedding_stride).contiguous()
    _, _, hh, ww = sim.shape
    sizes = _image_size_tensor(image_sizes, n, dev) if image_sizes is not None else \
        torch.tensor([[hh, ww]] * n, dtype=torch.long, device=dev)
    ys = torch.arange(hh, device=dev)
    xs = torch.arange(ww, device=dev)
    row_valid = ys[None, :] < sizes[:, 0, None]  # (N, H)
    col_valid = xs[None, :] < sizes[:, 1, None]  # (N, W)
    pixel_valid = row_valid[:, :, None] & col_valid[:, None, :]
    # 2. remote-instance filtering with the predicted boxes, in place on the similarity tensor
    boxes = instance_boxes.to(sim.dtype)
    cx = xs.to(sim.dtype) + 0.5
    cy = ys.to(sim.dtype) + 0.5
    in_x = (cx[None, None, :] >= boxes[..., 0:1]) & (cx[None, None, :] <= boxes[..., 2:3])  # (N, Q, W)
    in_y = (cy[None, None, :] >= boxes[..., 1:2]) & (cy[None, None, :] <= boxes[..., 3:4])  # (N, Q, H)
    inst_sim = sim[:, s_num:]  # (N, Q, H, W) view
    valid = instance_valid.bool()
    if q_num:
        inst_sim.masked_fill_(~in_y[..., :, None] | ~in_x[..., None, :], outside_box_value)
        if not bool(valid.all()):
            inst_sim[~valid] = MASKED_SIMILARITY  # whole planes
    void = k_num  # extra slot index for void pixels
    void_fill = torch.full((), void, dtype=torch.long, device=dev)
    slot_offset = torch.arange(n, device=dev)[:, None] * (k_num + 1)

    def counts(assign: Tensor) -> Tensor:
        a = torch.where(pixel_valid, assign, void_fill).flatten(1) + slot_offset
        return torch.bincount(a.flatten(), minlength=n * (k_num + 1)).view(n, k_num + 1)[:, :k_num]

    # 3. first assignment
    top1, assign = first_argmax(sim, 1)
    area1 = counts(assign)
    # 4. drop mostly hidden instances; re-assign the pixels they had won
    box_area = (in_y & row_valid[:, None]).sum(-1) * (in_x & col_valid[:, None]).sum(-1)  # (N, Q) in-image box px
    inst_area = area1[:, s_num:]
    drop = valid & ((inst_area < min_instance_area) | (inst_area.to(sim.dtype) < min_visible_fraction * box_area))
    keep_inst = valid & ~drop
    if q_num and bool(drop.any()):
        inst_sim[drop] = MASKED_SIMILARITY  # whole planes
        dropped_slot = torch.cat([torch.zeros(n, s_num, dtype=torch.bool, device=dev), drop], dim=1)
        lost = dropped_slot.gather(1, assign.flatten(1)).view(n, hh, ww)  # (N, H, W)
        t1, a1 = sim.permute(0, 2, 3, 1)[lost].max(dim=-1)  # (M, K) rows: first index of the max
        top1[lost] = t1
        assign[lost] = a1
    if return_confidence and k_num >= 2:
        # second-best value = max after removing the best entry (what topk(2) returns); sim is done
        sim.scatter_(1, assign[:, None], float("-inf"))
        confidence = (top1 - sim.amax(1)).clamp(0.0, 2.0)
    else:
        confidence = top1.clamp(0.0, 2.0)
    area = counts(assign)
    # 5. small stuff → void; instances must still satisfy the area rule
    img_area = (sizes[:, 0] * sizes[:, 1]).to(sim.dtype)
    if stuff_area_reference and stuff_area_reference > 0:
        stuff_thr = min_stuff_area * img_area / float(stuff_area_reference)
    else:
        stuff_thr = torch.full_like(img_area, float(min_stuff_area))
    keep = area > 0
    keep[:, :s_num] &= area[:, :s_num].to(sim.dtype) >= stuff_thr[:, None]
    keep[:, s_num:] &= keep_inst & (area[:, s_num:] >= min_instance_area)
    # 6. ids
    seg_ids = torch.cumsum(keep.long(), dim=1) * keep.long()
    ext = torch.cat([seg_ids, torch.zeros(n, 1, dtype=torch.long, device=dev)], dim=1)
    a_flat = torch.where(pixel_valid, assign, void_fill).flatten(1)
    id_flat = ext.gather(1, a_flat)
    id_map = id_flat.view(n, hh, ww).to(torch.int32)
    # final per-slot statistics on the final map
    final_slot = torch.where(id_flat > 0, a_flat, void_fill)  # (N, H*W)
    global_slot = final_slot + slot_offset
    area = torch.bincount(global_slot.flatten(), minlength=n * (k_num + 1)).view(n, k_num + 1)[:, :k_num]
    # tight boxes from (slot, row) / (slot, column) presence tables: idempotent writes, no atomics
    slot_map = global_slot.view(n, hh, ww)
    rows = torch.zeros(n * (k_num + 1), hh, dtype=torch.bool, device=dev)
    cols = torch.zeros(n * (k_num + 1), ww, dtype=torch.bool, device=dev)
    rows[slot_map, ys[None, :, None].expand(n, hh, ww)] = True
    cols[slot_map, xs[None, None, :].expand(n, hh, ww)] = True
    r = rows.view(n, k_num + 1, hh)[:, :k_num].to(torch.uint8)
    c = cols.view(n, k_num + 1, ww)[:, :k_num].to(torch.uint8)
    y0, x0 = r.argmax(-1), c.argmax(-1)
    y1, x1 = hh - r.flip(-1).argmax(-1), ww - c.flip(-1).argmax(-1)
    seg_boxes = torch.stack([x0, y0, x1, y1], dim=-1).to(sim.dtype)
    seg_boxes = torch.where((area > 0)[..., None], seg_boxes, torch.zeros_like(seg_boxes))
    sim_sum = torch.zeros(n, k_num + 1, dtype=sim.dtype, device=dev).scatter_add_(1, final_slot, top1.flatten(1))
    stuff_scores = sim_sum[:, :s_num] / area[:, :s_num].clamp_min(1).to(sim.dtype)
    scores = torch.cat([stuff_scores, instance_scores.to(sim.dtype)], dim=1)
    labels = torch.cat([torch.arange(num_things, num_things + s_num, device=dev)[None].expand(n, -1),
                        instance_labels.long()], dim=1)
    isthing = torch.cat([torch.zeros(n, s_num, dtype=torch.bool, device=dev),
                         torch.ones(n, q_num, dtype=torch.bool, device=dev)], dim=1)
    out = {"id_map": id_map, "segment_ids": seg_ids.to(torch.int32), "labels": labels, "isthing": isthing,
           "scores": torch.where(keep, scores, torch.zeros_like(scores)), "areas": area, "boxes": seg_boxes}
    if return_confidence:
        out["confidence"] = torch.where(id_map > 0, confidence, torch.zeros_like(confidence))
    return out


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


def instance_queries_at(embedding: Tensor, locations_xy: Tensor, embedding_stride: int = 1) -> Tensor:
    """Query embedding of a proposal = P at the location that produced it (§IV-C).

    embedding ``(D, h, w)``, locations_xy ``(Q, 2)`` input pixels → ``(Q, D)`` (clamped to the map).
    """
    _, h, w = embedding.shape
    x = torch.div(locations_xy[:, 0].long(), embedding_stride, rounding_mode="floor").clamp(0, w - 1)
    y = torch.div(locations_xy[:, 1].long(), embedding_stride, rounding_mode="floor").clamp(0, h - 1)
    return F.normalize(embedding[:, y, x].t(), dim=1)


def panoptic_from_raw(raw: dict[str, Tensor], image_sizes, *, num_things: int, embedding_stride: int = 1,
                      score_threshold: float = 0.05, pre_nms_topk: int = 1000, nms_threshold: float = 0.6,
                      detections_per_img: int = 100, instance_score_threshold: float = 0.3,
                      min_stuff_area: float = 4096, stuff_area_reference: float = 640 * 480,
                      min_visible_fraction: float = 0.2, min_instance_area: float = 16,
                      outside_box_value: float = 0.0, return_confidence: bool = False) -> list[dict[str, Tensor]]:
    """``CIAE.forward_raw`` outputs → per-image panoptic results (see :func:`split_panoptic`).

    Proposals from :func:`select_proposals`; only those with score >= ``instance_score_threshold``
    become instance queries (our decision: low-score proposals of the 0.05 detection threshold
    would otherwise claim pixels as spurious segments; 0.3 is a panoptic-quality operating
    point, lower it for recall). Stuff queries are ``memory[T:]``.
    """
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
        queries[i, :m] = instance_queries_at(emb[i], raw["points"][p["locations"]], embedding_stride)
        boxes[i, :m] = p["boxes"].to(emb.dtype)
        labels[i, :m] = p["labels"]
        scores[i, :m] = p["scores"].to(emb.dtype)
        valid[i, :m] = True
    fused = fuse_panoptic(emb, raw["memory"][num_things:], queries, boxes, labels, scores, valid,
                          num_things=num_things, image_sizes=image_sizes, embedding_stride=embedding_stride,
                          min_stuff_area=min_stuff_area, stuff_area_reference=stuff_area_reference,
                          min_visible_fraction=min_visible_fraction, min_instance_area=min_instance_area,
                          outside_box_value=outside_box_value, return_confidence=return_confidence)
    return split_panoptic(fused, image_sizes)
