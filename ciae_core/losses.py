"""Training targets and losses of CIAE (paper §III, §IV-A/B, Eq. 1–15) and the memory update.

* FCOS detector targets with the CIAE change: a location is positive only if it lies inside a
  ground-truth *mask* (and in the level's scale range; optional centre sampling).
  Losses: sigmoid focal (classification), BCE (centerness), IoU/GIoU (regression).
* CIAE-loss: triplet-style loss of pixel embeddings against query embeddings (Eq. 5–9),
  L_CAE against the category memory embeddings, L_IAE against instance means + stuff memory
  embeddings, L_CIAE = L_CAE + alpha * L_IAE (Eq. 10–12), remote-instance filtering (§IV-B).
* Category-aware memory embeddings (§III-C, Eq. 13–14).

Shapes: ``N`` images, ``A`` locations over P3..P7, ``T`` thing classes, ``S`` stuff classes,
``D`` embedding dim, ``P`` sampled pixels, ``K`` queries.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

logger = logging.getLogger(__name__)


class TargetError(ValueError):
    """Malformed training targets (one-line message)."""


# ----------------------------------------------------------------------------------------------
# embedding geometry (Eq. 1–4)


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """Eq. 1: ``p / ||p||_2`` along ``dim`` (zero vectors stay zero)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def cosine_distance(p: Tensor, q: Tensor) -> Tensor:
    """Eq. 2: ``1 - p·q / (||p|| ||q||)`` for all pairs; p ``(P, D)``, q ``(K, D)`` → ``(P, K)``."""
    return 1.0 - l2_normalize(p) @ l2_normalize(q).t()


def segment_sums(embedding_pre: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Sum of pre-normalisation pixel embeddings per segment.

    embedding_pre ``(P, D)``, segment_ids ``(P,)`` in ``0..num_segments-1`` → ``(num_segments, D)``.
    """
    out = embedding_pre.new_zeros(num_segments, embedding_pre.shape[1])
    return out.index_add(0, segment_ids, embedding_pre)


def mean_embeddings(embedding_pre: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Eq. 3–4: ``m^k = L2norm(sum_{i: id_i = k} p_i)`` over the *pre-normalisation* map.

    With category ids this is M_c (Eq. 3), with segment ids M_s (Eq. 4). The paper computes the
    means before L2 normalisation "to suppress noise": pixels with a confident (long) embedding
    weigh more. Segments without pixels get a zero vector.
    embedding_pre ``(P, D)``, segment_ids ``(P,)`` → ``(num_segments, D)``.
    """
    return l2_normalize(segment_sums(embedding_pre, segment_ids, num_segments))


# ----------------------------------------------------------------------------------------------
# CIAE-loss (Eq. 5–12)


def query_distances(pixel_emb: Tensor, queries: Tensor, target: Tensor,
                    similarity_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Eq. 5–6: positive and negative cosine distances of each pixel to the queries.

    pixel_emb ``(P, D)`` unit, queries ``(K, D)`` unit, target ``(P,)`` index of each pixel's
    query. ``similarity_mask`` ``(P, K)`` bool: where False the similarity is set to 0 (remote
    instance filtering, §IV-B), i.e. the distance becomes 1.
    Returns ``d_pos (P,)`` = D(p_i, m^{c_i}) and ``d_neg (P, K)`` = D(p_i, m^k), 0 at k = c_i.
    """
    sim = pixel_emb @ queries.t()
    if similarity_mask is not None:
        sim = torch.where(similarity_mask, sim, torch.zeros_like(sim))
    dist = 1.0 - sim
    d_pos = dist.gather(1, target[:, None]).squeeze(1)
    is_pos = F.one_hot(target, queries.shape[0]).bool()
    d_neg = torch.where(is_pos, torch.zeros_like(dist), dist)
    return d_pos, d_neg


def triplet_hinge(d_pos: Tensor, d_neg: Tensor, margin: float) -> Tensor:
    """Eq. 7: ``l' = max(d_pos - d_neg + margin, 0)``; d_pos ``(P,)``, d_neg ``(P, K)`` → ``(P, K)``."""
    return (d_pos[:, None] - d_neg + margin).clamp_min(0.0)


def log_transform(l_prime: Tensor, margin: float, eps: float = 1e-6) -> Tensor:
    """Eq. 8: ``l = -log(1 - l' / (2 + margin))``.

    ``l'`` lies in ``[0, 2 + margin]`` (cosine distances are in [0, 2]); the ratio is clamped to
    ``1 - eps`` so the worst case gives a large finite loss instead of infinity.
    """
    ratio = (l_prime / (2.0 + margin)).clamp(max=1.0 - eps)
    return -torch.log1p(-ratio)


def topk_pixel_losses(losses: Tensor, top_k: int, query_valid: Tensor | None = None) -> Tensor:
    """Eq. 9 (inner sum): per pixel, sum of its ``top_k`` largest query losses ``(P, K)`` → ``(P,)``.

    Our reading of tau_K: "only the top-K highest losses are selected" is applied *per pixel*
    over its |M| query terms, i.e. tau_K is the pixel's K-th largest l^{ik} (the K hardest
    queries; with fewer than K queries all are kept). Invalid (padding) queries are zeroed.
    """
    if query_valid is not None:
        losses = torch.where(query_valid, losses, torch.zeros_like(losses))
    k = min(top_k, losses.shape[1])
    if k == 0:
        return losses.new_zeros(losses.shape[0])
    return losses.topk(k, dim=1).values.sum(dim=1)


def pixel_embedding_losses(pixel_emb: Tensor, queries: Tensor, target: Tensor, *, margin: float = 0.15,
                           top_k: int = 5, similarity_mask: Tensor | None = None,
                           include_positive_term: bool = True) -> Tensor:
    """Eq. 5–9 before the 1/N mean: ``sum_k I[l^{ik} > tau_K] l^{ik}`` for every pixel ``(P,)``.

    ``include_positive_term``: Eq. 6 sets d_neg = 0 for the pixel's own query, so that term is
    ``l' = d_pos + margin`` — a pure "pull" term that competes in the top-K like the others.
    We keep it (literal reading); False drops it (pure triplet over the other queries).
    """
    d_pos, d_neg = query_distances(pixel_emb, queries, target, similarity_mask)
    losses = log_transform(triplet_hinge(d_pos, d_neg, margin), margin)
    if not include_positive_term:
        losses = losses.masked_fill(F.one_hot(target, queries.shape[0]).bool(), 0.0)
    return topk_pixel_losses(losses, top_k)


def embedding_loss(pixel_emb: Tensor, queries: Tensor, target: Tensor, *, margin: float = 0.15, top_k: int = 5,
                   similarity_mask: Tensor | None = None, pixel_weights: Tensor | None = None,
                   include_positive_term: bool = True) -> Tensor:
    """Eq. 9: ``L_emb(P, M) = 1/N sum_i sum_k I[l^{ik} > tau_K] l^{ik}`` (optionally pixel-weighted).

    ``pixel_weights`` ``(P,)`` multiplies each pixel's loss (×5 for thing pixels in L_IAE); the
    normaliser N stays the pixel count.
    """
    per_pixel = pixel_embedding_losses(pixel_emb, queries, target, margin=margin, top_k=top_k,
                                       similarity_mask=similarity_mask, include_positive_term=include_positive_term)
    if pixel_weights is not None:
        per_pixel = per_pixel * pixel_weights
    return per_pixel.sum() / max(1, per_pixel.numel())


def expand_boxes(boxes: Tensor, factor: float) -> Tensor:
    """Scale xyxy boxes ``(K, 4)`` about their centres by ``factor`` (§IV-B: 1.5× in training)."""
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * factor
    return torch.cat([c - half, c + half], dim=1)


def pixels_in_boxes(xy: Tensor, boxes: Tensor) -> Tensor:
    """Which pixels lie in which boxes: pixel (x, y) integer coords ``(P, 2)``, boxes xyxy ``(K, 4)``.

    A pixel is inside when its centre ``(x + 0.5, y + 0.5)`` is inside the box (so a tight box
    ``(x_min, y_min, x_max + 1, y_max + 1)`` contains exactly its pixels). Returns ``(P, K)`` bool.
    """
    cx = xy[:, 0:1].to(boxes.dtype) + 0.5
    cy = xy[:, 1:2].to(boxes.dtype) + 0.5
    return (cx >= boxes[None, :, 0]) & (cx <= boxes[None, :, 2]) & (cy >= boxes[None, :, 1]) & (cy <= boxes[None, :, 3])


def remote_instance_mask(xy: Tensor, boxes: Tensor, factor: float = 1.5) -> Tensor:
    """§IV-B filtering strategy: ``(P, K)`` True where pixel i may be compared with instance k.

    The similarity to instance k is set to 0 outside its box; in training the GT box is expanded
    ``factor`` times (1.5 in the paper).
    """
    return pixels_in_boxes(xy, expand_boxes(boxes, factor))


# ----------------------------------------------------------------------------------------------
# memory embeddings (§III-C, Eq. 13–14)


def init_memory_embeddings(num_things: int, num_stuff: int, dim: int, merge_things: bool = True,
                           generator: torch.Generator | None = None) -> Tensor:
    """M_0: random-normal, L2-normalised rows ``(T+S, D)``.

    With ``merge_things`` all thing rows share one vector (the merged "thing" class of L_CAE).
    """
    m = torch.randn(num_things + num_stuff, dim, generator=generator)
    if merge_things and num_things > 0:
        m[:num_things] = m[0]
    return l2_normalize(m)


def memory_momentum(iteration: int, total_iterations: int | None, scale: float = 1e-4) -> float:
    """Eq. 13: ``lambda_t = 1 - scale * (1 - t/T)^3`` (scale = 1e-4 in the paper).

    t is clamped to [0, T]; without a schedule (T unknown) t/T = 0, i.e. lambda = 1 - scale.
    """
    if not total_iterations:
        frac = 0.0
    else:
        frac = min(max(iteration / total_iterations, 0.0), 1.0)
    return 1.0 - scale * (1.0 - frac) ** 3


def update_memory_embeddings(memory: Tensor, class_means: Tensor, present: Tensor, momentum: float) -> Tensor:
    """Eq. 14: ``M_t = L2norm(lambda_t M_{t-1} + (1 - lambda_t) M_c)`` for the classes present.

    memory ``(C, D)``, class_means ``(C, D)`` (the batch's M_c, Eq. 3), present ``(C,)`` bool.
    Rows of absent classes are kept. Returns the new memory (does not modify the input).
    """
    new = l2_normalize(momentum * memory + (1.0 - momentum) * class_means)
    return torch.where(present[:, None], new, memory)


# ----------------------------------------------------------------------------------------------
# FCOS targets and detector losses


def fcos_targets(points: Tensor, point_strides: Tensor, point_ranges: Tensor, boxes: Tensor, labels: Tensor,
                 masks: Tensor, center_sampling_radius: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """FCOS assignment with mask-aware positives (§IV-A) for one image.

    points ``(A, 2)`` xy input pixels, point_strides ``(A,)``, point_ranges ``(A, 2)`` scale range
    (lo, hi] of max(l, t, r, b) per location; boxes ``(G, 4)`` xyxy, labels ``(G,)``, masks
    ``(G, H, W)`` bool of the thing instances (crowd already removed).
    A location is positive for GT g iff it falls inside g's *mask* (the paper's change to FCOS,
    which uses the whole box), inside g's box, max(ltrb) is in the level's range and, when
    ``center_sampling_radius > 0``, it lies within radius*stride of the box centre. Ambiguous
    locations take the GT with the smallest box area (FCOS).
    Returns ``positive (A,)`` bool, ``labels (A,)`` (−1 for negatives), ``box_targets (A, 4)`` xyxy.
    """
    a = points.shape[0]
    g = boxes.shape[0]
    if g == 0:
        return (torch.zeros(a, dtype=torch.bool, device=points.device),
                torch.full((a,), -1, dtype=torch.long, device=points.device), points.new_zeros(a, 4))
    h, w = masks.shape[-2:]
    xs = points[:, 0].long()
    ys = points[:, 1].long()
    in_img = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    in_mask = masks[:, ys.clamp(0, h - 1), xs.clamp(0, w - 1)].t() & in_img[:, None]  # (A, G)
    px, py = points[:, 0:1], points[:, 1:2]
    ltrb = torch.stack([px - boxes[None, :, 0], py - boxes[None, :, 1], boxes[None, :, 2] - px,
                        boxes[None, :, 3] - py], dim=2)  # (A, G, 4)
    in_box = ltrb.min(dim=2).values > 0
    max_reg = ltrb.max(dim=2).values
    in_range = (max_reg >= point_ranges[:, 0:1]) & (max_reg <= point_ranges[:, 1:2])
    cand = in_mask & in_box & in_range
    if center_sampling_radius > 0:
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        r = point_strides[:, None].to(points.dtype) * center_sampling_radius
        cand &= ((px - centre[None, :, 0]).abs() < r) & ((py - centre[None, :, 1]).abs() < r)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area = torch.where(cand, area[None, :].expand(a, g), torch.full_like(max_reg, math.inf))
    min_area, idx = area.min(dim=1)
    positive = torch.isfinite(min_area)
    lab = torch.where(positive, labels[idx], torch.full_like(labels[idx], -1))
    return positive, lab, boxes[idx]


def centerness_targets(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS centerness ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))``; points ``(P,2)``, boxes ``(P,4)``."""
    l = points[:, 0] - boxes[:, 0]
    t = points[:, 1] - boxes[:, 1]
    r = boxes[:, 2] - points[:, 0]
    b = boxes[:, 3] - points[:, 1]
    lr = torch.stack([l, r], 1).clamp_min(1e-6)
    tb = torch.stack([t, b], 1).clamp_min(1e-6)
    return torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))


def decode_boxes(points: Tensor, ltrb: Tensor) -> Tensor:
    """ltrb distances ``(..., 4)`` at points ``(..., 2)`` → xyxy boxes."""
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


def iou_loss(pred: Tensor, target: Tensor, kind: str = "giou") -> Tensor:
    """Per-box regression loss: ``1 - GIoU`` (torchvision) or UnitBox ``-log(IoU)`` (paper ref. [49])."""
    if kind == "giou":
        return generalized_box_iou_loss(pred, target, reduction="none")
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(1)
    union = (pred[:, 2:] - pred[:, :2]).clamp_min(0).prod(1) + (target[:, 2:] - target[:, :2]).prod(1) - inter
    return -torch.log((inter / union.clamp_min(1e-6)).clamp_min(1e-6))


# ----------------------------------------------------------------------------------------------
# criterion


def _check_target(t: dict, h: int, w: int, i: int) -> None:
    for key in ("masks", "labels", "isthing", "boxes"):
        if key not in t:
            raise TargetError(f"target {i} lacks '{key}' (need masks, labels, isthing, iscrowd, boxes)")
    k = t["labels"].shape[0]
    if t["masks"].shape != (k, h, w):
        raise TargetError(f"target {i}: masks have shape {tuple(t['masks'].shape)}, expected ({k}, {h}, {w}) "
                          "(one mask per label, same size as the padded image)")
    if t["boxes"].shape != (k, 4) or t["isthing"].shape != (k,):
        raise TargetError(f"target {i}: boxes must be ({k}, 4) and isthing ({k},)")


class CIAECriterion(nn.Module):
    """All training losses of CIAE (Eq. 15) for one batch.

    Arguments mirror :class:`ciae_core.model.CIAEConfig` (see there). Decisions where the paper
    is silent:

    * ``pixel_samples``: the embedding losses (Eq. 5–9) are evaluated on at most this many
      uniformly sampled non-void pixels per image (0 = all pixels); the mean embeddings (Eq. 3–4)
      and the memory update always use all pixels. Uniform sampling keeps the loss unbiased.
    * Mean embeddings keep their gradient (they are functions of P); memory embeddings are
      buffers (no gradient).
    * L_IAE: thing pixels weigh ``thing_pixel_weight`` (5); N is the number of pixels. The
      reported ``loss_iae`` already includes ``iae_weight`` (alpha of Eq. 12), so Eq. 15's total
      is the plain sum of the returned terms.
    * Detector losses are normalised by the number of positive locations per rank averaged over
      the DDP ranks (as FCOS does), so an image's loss weight does not depend on which rank saw
      it; at least 1. Without a process group it is the batch's own count.
    * ``merge_things_in_cae``: all thing classes form one category in L_CAE (paper default,
      Table IV); False uses the T thing classes.

    Memory schedule: :meth:`set_schedule` (t, T) sets lambda_t of Eq. 13. Memory all-reduce under
    DDP: :meth:`update_memory` sums the batch class statistics with ``reduce_fn`` if set (a
    callable taking and returning a tensor), else with ``torch.distributed.all_reduce`` when a
    process group is initialised, so every rank applies the same update.
    """

    def __init__(self, num_things: int, num_stuff: int, strides=(8, 16, 32, 64, 128),
                 sizes_of_interest=(64.0, 128.0, 256.0, 512.0), center_sampling_radius: float = 0.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, iou_loss: str = "giou", margin: float = 0.15,
                 top_k: int = 5, iae_weight: float = 2.0, thing_pixel_weight: float = 5.0, box_expand: float = 1.5,
                 merge_things_in_cae: bool = True, include_positive_term: bool = True, pixel_samples: int = 16384,
                 memory_momentum_scale: float = 1e-4, reduce_fn: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        self.num_things = num_things
        self.num_stuff = num_stuff
        self.strides = tuple(strides)
        bounds = (-1.0,) + tuple(float(s) for s in sizes_of_interest) + (math.inf,)
        self.ranges = [(bounds[i], bounds[i + 1]) for i in range(len(self.strides))]
        self.center_sampling_radius = center_sampling_radius
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.iou_loss = iou_loss
        self.margin = margin
        self.top_k = top_k
        self.iae_weight = iae_weight
        self.thing_pixel_weight = thing_pixel_weight
        self.box_expand = box_expand
        self.merge_things_in_cae = merge_things_in_cae
        self.include_positive_term = include_positive_term
        self.pixel_samples = pixel_samples
        self.memory_momentum_scale = memory_momentum_scale
        self.reduce_fn = reduce_fn
        self.iteration = 0
        self.total_iterations: int | None = None

    # -- schedule / memory ----------------------------------------------------------------------
    def set_schedule(self, iteration: int, total_iterations: int) -> None:
        """Current iteration t and total T of Eq. 13."""
        self.iteration = int(iteration)
        self.total_iterations = int(total_iterations)

    @property
    def num_cae_classes(self) -> int:
        return (1 if self.merge_things_in_cae else self.num_things) + self.num_stuff

    def cae_memory_rows(self, device=None) -> Tensor:
        """Memory rows used as M_c: merged → [0 (the thing row), T..T+S-1], else all rows."""
        if self.merge_things_in_cae:
            rows = [0] + list(range(self.num_things, self.num_things + self.num_stuff))
        else:
            rows = list(range(self.num_things + self.num_stuff))
        return torch.tensor(rows, dtype=torch.long, device=device)

    @torch.no_grad()
    def update_memory(self, memory: Tensor, class_stats: Tensor) -> float:
        """Apply Eq. 13–14 in place to ``memory (T+S, D)`` from ``class_stats (T+S, D+1)``.

        ``class_stats`` holds per memory row the sum of the batch's pre-normalisation embeddings
        and (last column) the pixel count. It is summed across DDP ranks first (see class doc).
        Returns lambda_t used.
        """
        stats = self._sum_over_ranks(class_stats.detach().clone())
        lam = memory_momentum(self.iteration, self.total_iterations, self.memory_momentum_scale)
        means = l2_normalize(stats[:, :-1])
        present = stats[:, -1] > 0
        memory.copy_(update_memory_embeddings(memory, means.to(memory.dtype), present, lam))
        return lam

    # -- losses --------------------------------------------------------------------------------
    def forward(self, *, cls_logits: Tensor, box_regression: Tensor, centerness: Tensor, points: Tensor,
                level_sizes: list[int], embedding_pre: Tensor, memory: Tensor, targets: list[dict],
                image_sizes=None) -> tuple[dict[str, Tensor], Tensor]:
        """Compute the terms of Eq. 15: ``L = L_centerness + L_class + L_reg + L_CIAE``.

        Eq. 12, ``L_CIAE = L_CAE + alpha * L_IAE``, is split over two entries: ``loss_cae`` = L_CAE
        (Eq. 10) and ``loss_iae`` = alpha * L_IAE (Eq. 11, alpha = ``iae_weight`` = 2), so the
        total loss is the plain sum of the returned dict.

        cls_logits ``(N, A, T)``, box_regression ``(N, A, 4)`` ltrb pixels, centerness ``(N, A)``,
        points ``(A, 2)``, level_sizes: locations per level, embedding_pre ``(N, D, H, W)`` =
        up4(P' + P'') before Eq. 1, memory ``(T+S, D)`` = M_{t-1}; targets as in docs/DESIGN.md.
        Returns (loss dict, class statistics ``(T+S, D+1)`` for :meth:`update_memory`).
        """
        n, _, h, w = embedding_pre.shape
        for i, t in enumerate(targets):
            _check_target(t, h, w, i)
        # losses and the memory statistics in float32, autocast off: sums over ~1e6 pixels overflow
        # fp16 and bf16 similarities are too coarse for a 0.15 margin
        cls_logits, box_regression, centerness = cls_logits.float(), box_regression.float(), centerness.float()
        embedding_pre = embedding_pre.float()
        with torch.autocast(embedding_pre.device.type, enabled=False):
            losses = self.detection_losses(cls_logits, box_regression, centerness, points, level_sizes, targets)
            l_cae, l_iae, stats = self.embedding_losses(embedding_pre, memory.float(), targets, image_sizes)
        losses["loss_cae"] = l_cae
        losses["loss_iae"] = self.iae_weight * l_iae
        return losses, stats

    def _sum_over_ranks(self, t: Tensor) -> Tensor:
        """``t`` summed over the DDP ranks (``reduce_fn`` if set, else all_reduce when a process
        group is initialised; unchanged otherwise)."""
        if self.reduce_fn is not None:
            return self.reduce_fn(t)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        return t

    def detection_losses(self, cls_logits, box_regression, centerness, points, level_sizes, targets) -> dict[str, Tensor]:
        """FCOS losses with mask-aware positives: focal (cls), BCE (centerness), IoU/GIoU (box)."""
        dev = points.device
        strides = torch.cat([torch.full((s,), st, device=dev) for s, st in zip(level_sizes, self.strides)])
        ranges = torch.cat([torch.tensor([r], device=dev, dtype=points.dtype).expand(s, 2)
                            for s, r in zip(level_sizes, self.ranges)])
        pos_l, lab_l, box_l = [], [], []
        for t in targets:
            keep = t["isthing"].bool() & ~t.get("iscrowd", torch.zeros_like(t["isthing"])).bool()
            if keep.any() and int(t["labels"][keep].max()) >= self.num_things:
                raise TargetError("a thing segment has a training id >= num_things; things must come first")
            pos, lab, box = fcos_targets(points, strides, ranges, t["boxes"][keep].to(points.dtype),
                                         t["labels"][keep].long(), t["masks"][keep].bool(), self.center_sampling_radius)
            pos_l.append(pos)
            lab_l.append(lab)
            box_l.append(box)
        pos = torch.stack(pos_l)
        lab = torch.stack(lab_l)
        box_t = torch.stack(box_l)
        # positives per rank, averaged over the ranks: [count, 1] summed gives (total, world size)
        total, ranks = self._sum_over_ranks(torch.stack([pos.sum().float(), torch.ones((), device=dev)])).tolist()
        num_pos = max(1.0, total / ranks)
        gt = torch.zeros_like(cls_logits)
        pi = pos.nonzero(as_tuple=True)
        gt[pi[0], pi[1], lab[pos]] = 1.0
        loss_cls = sigmoid_focal_loss(cls_logits, gt, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                      reduction="sum") / num_pos
        pts = points[None].expand(pos.shape[0], -1, -1)[pos]
        if pts.numel():
            ctr_t = centerness_targets(pts, box_t[pos])
            loss_ctr = F.binary_cross_entropy_with_logits(centerness[pos], ctr_t, reduction="sum") / num_pos
            pred_boxes = decode_boxes(pts, box_regression[pos])
            loss_reg = iou_loss(pred_boxes, box_t[pos], self.iou_loss).sum() / num_pos
        else:
            loss_ctr = centerness.sum() * 0.0
            loss_reg = box_regression.sum() * 0.0
        return {"loss_cls": loss_cls, "loss_ctr": loss_ctr, "loss_reg": loss_reg}

    def embedding_losses(self, embedding_pre: Tensor, memory: Tensor, targets: list[dict],
                         image_sizes=None) -> tuple[Tensor, Tensor, Tensor]:
        """L_CAE (Eq. 10) and L_IAE (Eq. 11, unweighted by alpha) plus the class stats for Eq. 14."""
        n, d, h, w = embedding_pre.shape
        T, S = self.num_things, self.num_stuff
        dev = embedding_pre.device
        mem = memory.detach()
        cae_queries = mem[self.cae_memory_rows(dev)]  # M_c := M_{t-1}
        stuff_queries = mem[T:]                       # stuff part of M_s := M_{t-1}
        stats = embedding_pre.new_zeros(T + S, d + 1)
        cae_terms, iae_terms = [], []
        flat_all = embedding_pre.flatten(2)  # (N, D, HW)
        for i, t in enumerate(targets):
            masks = t["masks"].bool()
            labels = t["labels"].long()
            isthing = t["isthing"].bool()
            crowd = t.get("iscrowd", torch.zeros_like(isthing)).bool()
            seg = torch.full((h, w), -1, dtype=torch.long, device=dev)
            crowd_list = crowd.tolist()  # one host sync per image
            for k in range(masks.shape[0]):
                if not crowd_list[k]:
                    seg[masks[k]] = k
            for k in range(masks.shape[0]):
                if crowd_list[k]:
                    seg[masks[k]] = -1  # crowd pixels are void, also where they overlap other segments
            if image_sizes is not None:
                hi, wi = image_sizes[i]
                seg[int(hi):, :] = -1
                seg[:, int(wi):] = -1
            seg = seg.flatten()
            idx = (seg >= 0).nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            seg_v = seg[idx]
            emb_v = flat_all[i][:, idx].t()  # (P_all, D) pre-normalisation
            lab_v = labels[seg_v]
            thing_v = isthing[seg_v]
            if thing_v.any() and int(lab_v[thing_v].max()) >= T:
                raise TargetError("a thing segment has a training id >= num_things; things must come first")
            if (~thing_v).any() and (int(lab_v[~thing_v].min()) < T or int(lab_v[~thing_v].max()) >= T + S):
                raise TargetError(f"stuff segments need training ids in {T}..{T + S - 1}")
            # CAE category of each pixel (Eq. 3 ids).
            if self.merge_things_in_cae:
                cae_v = torch.where(thing_v, torch.zeros_like(lab_v), lab_v - T + 1)
            else:
                cae_v = lab_v
            cae_sums = segment_sums(emb_v.detach(), cae_v, self.num_cae_classes)
            cae_counts = torch.bincount(cae_v, minlength=self.num_cae_classes).to(stats.dtype)
            rows = self.cae_memory_rows(dev)
            stats[rows, :d] += cae_sums
            stats[rows, d] += cae_counts
            if self.merge_things_in_cae and T > 1:
                stats[1:T] = stats[0]
            # IAE queries: stuff memory rows, then the image's thing instances (Eq. 4 means).
            inst_ids = torch.unique(seg_v[thing_v])
            n_inst = inst_ids.numel()
            local = torch.full((masks.shape[0],), -1, dtype=torch.long, device=dev)
            local[inst_ids] = torch.arange(n_inst, device=dev)
            iae_v = torch.where(thing_v, S + local[seg_v], lab_v - T)
            inst_means = mean_embeddings(emb_v[thing_v], local[seg_v][thing_v], n_inst) if n_inst else emb_v.new_zeros(0, d)
            iae_queries = torch.cat([stuff_queries, inst_means], dim=0)
            # pixel subsampling for Eq. 5–9
            if self.pixel_samples and idx.numel() > self.pixel_samples:
                sel = torch.randperm(idx.numel(), device=dev)[: self.pixel_samples]
            else:
                sel = torch.arange(idx.numel(), device=dev)
            p = l2_normalize(emb_v[sel])  # Eq. 1 on the sampled pixels of P
            xy = torch.stack([idx[sel] % w, idx[sel] // w], dim=1)
            sim_mask = torch.ones(sel.numel(), S + n_inst, dtype=torch.bool, device=dev)
            if n_inst:
                sim_mask[:, S:] = remote_instance_mask(xy, t["boxes"][inst_ids].to(p.dtype), self.box_expand)
            cae_terms.append(pixel_embedding_losses(p, cae_queries, cae_v[sel], margin=self.margin, top_k=self.top_k,
                                                    include_positive_term=self.include_positive_term))
            weights = torch.where(thing_v[sel], self.thing_pixel_weight, 1.0).to(p.dtype)
            iae_terms.append(weights * pixel_embedding_losses(
                p, iae_queries, iae_v[sel], margin=self.margin, top_k=self.top_k, similarity_mask=sim_mask,
                include_positive_term=self.include_positive_term))
        if not cae_terms:
            zero = embedding_pre.sum() * 0.0
            return zero, zero, stats
        cae = torch.cat(cae_terms)
        iae = torch.cat(iae_terms)
        return cae.mean(), iae.mean(), stats
