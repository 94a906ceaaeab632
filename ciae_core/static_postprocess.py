"""The postprocess of the predictor in fixed shapes, without a host synchronisation (paper §IV-C,
Eq. 16), for the whole-call CUDA graph.

:func:`postprocess_static` is :func:`ciae_core.fusion.panoptic_from_raw` with every shape fixed
by the input shape and the settings: proposals from
:func:`ciae_core.static_proposals.select_proposals_static` (Q = ``detections_per_img`` instance
slots with a ``valid`` mask instead of a per-batch count), their queries gathered at the
proposal locations as :func:`ciae_core.fusion.instance_queries_at` does, then the fusion —
``fusion="triton"``: :func:`ciae_core.fusion_triton.fuse_panoptic_static` (Triton kernels,
nothing data-dependent on the host); ``fusion="eager"``: :func:`ciae_core.fusion.fuse_panoptic`
(the reference; it synchronises). The result is ``fuse_panoptic``'s batched dict with K = S + Q
slots (invalid instance slots never become segments) plus ``converged (N,)``; it equals the eager
path's (:func:`ciae_core.fusion.split_panoptic` of it gives the same per-image results) whenever
``converged`` holds.

Everything the function needs from the host must already be on the device: image sizes come
as a tensor ``image_hw (N, 2)``; the bilinear taps (:func:`ciae_core.fusion_coarse.bilinear_taps`)
are cached per size, so a first (uncaptured) call creates them before a capture.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ciae_core.fusion import _promote_half, fuse_panoptic, instance_queries_at
from ciae_core.static_proposals import StaticProposals, select_proposals_static

FUSIONS = ("triton", "eager")


def instance_inputs(embedding: Tensor, points: Tensor, proposals: StaticProposals, embedding_stride: int,
                    interpolate: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fusion's instance inputs from Q proposal slots: queries ``(N, Q, D)`` (P at each
    proposal's location, :func:`~ciae_core.fusion.instance_queries_at`), boxes ``(N, Q, 4)`` and
    scores ``(N, Q)`` in the embedding's dtype, labels ``(N, Q)`` long, valid ``(N, Q)``."""
    n, q = proposals.valid.shape
    queries = torch.stack([instance_queries_at(embedding[i], points[proposals.locations[i]], embedding_stride,
                                               interpolate=interpolate) for i in range(n)]) if q else \
        embedding.new_zeros(n, 0, embedding.shape[1])
    return (queries, proposals.boxes.to(embedding.dtype), proposals.labels, proposals.scores.to(embedding.dtype),
            proposals.valid)


# the settings of the first step (proposals and queries); the rest go to the fusion
SELECTION_SETTINGS = ("score_threshold", "pre_nms_topk", "nms_threshold", "detections_per_img",
                      "instance_score_threshold", "nms_iterations")


def static_instances(raw: dict[str, Tensor], image_hw: Tensor, *, embedding_stride: int = 1,
                     normalize_after_upsampling: bool = False, score_threshold: float = 0.05,
                     pre_nms_topk: int = 1000, nms_threshold: float = 0.6, detections_per_img: int = 100,
                     instance_score_threshold: float = 0.3, nms_iterations: int = 16) -> tuple[tuple, Tensor]:
    """Step 1 of :func:`postprocess_static`: the fusion's instance inputs (:func:`instance_inputs`)
    from :func:`~ciae_core.static_proposals.select_proposals_static`, and its ``converged (N,)``."""
    raw = {k: _promote_half(v) if isinstance(v, Tensor) else v for k, v in raw.items()}
    props = select_proposals_static(raw["cls_logits"], raw["box_regression"], raw["centerness"], raw["points"],
                                    image_hw.float(), score_threshold=score_threshold, pre_nms_topk=pre_nms_topk,
                                    nms_threshold=nms_threshold, detections_per_img=detections_per_img,
                                    instance_score_threshold=instance_score_threshold, nms_iterations=nms_iterations)
    return instance_inputs(raw["embedding"], raw["points"], props, embedding_stride,
                           normalize_after_upsampling), props.converged


def static_fusion(raw: dict[str, Tensor], instances: tuple, image_hw: Tensor, *, num_things: int,
                  embedding_stride: int = 1, min_stuff_area: float = 4096, stuff_area_reference: float = 640 * 480,
                  min_visible_fraction: float = 0.2, min_instance_area: float = 16, outside_box_value: float = 0.0,
                  normalize_after_upsampling: bool = False, fusion: str = "triton") -> dict[str, Tensor]:
    """Step 2 of :func:`postprocess_static`: Eq. 16 with the stuff queries ``memory[T:]`` and the
    instance inputs of :func:`static_instances` (``fuse_panoptic``'s batched result)."""
    if fusion not in FUSIONS:
        raise ValueError(f"postprocess_static: unknown fusion {fusion!r} ({', '.join(FUSIONS)})")
    emb = _promote_half(raw["embedding"])
    settings = dict(num_things=num_things, embedding_stride=embedding_stride, min_stuff_area=min_stuff_area,
                    stuff_area_reference=stuff_area_reference, min_visible_fraction=min_visible_fraction,
                    min_instance_area=min_instance_area, outside_box_value=outside_box_value,
                    normalize_after_upsampling=normalize_after_upsampling)
    stuff = _promote_half(raw["memory"])[num_things:]
    if fusion == "eager":
        sizes = [tuple(int(v) for v in hw) for hw in image_hw.tolist()]
        return fuse_panoptic(emb, stuff, *instances, image_sizes=sizes, **settings)
    from ciae_core.fusion_triton import fuse_panoptic_static

    return fuse_panoptic_static(emb, stuff, *instances, image_hw=image_hw, **settings)


def postprocess_static(raw: dict[str, Tensor], image_hw: Tensor, *, num_things: int, embedding_stride: int = 1,
                       normalize_after_upsampling: bool = False, fusion: str = "triton", **settings) -> dict[str, Tensor]:
    """``CIAE.forward_raw`` outputs → ``fuse_panoptic``'s batched result at the network input
    resolution (module docstring), plus ``converged (N,)`` bool: :func:`static_instances` then
    :func:`static_fusion`.

    image_hw ``(N, 2)`` long: valid (h, w) of each image (top-left; the resized size). ``settings``:
    those of :func:`ciae_core.fusion.panoptic_from_raw` (``score_threshold``, ``pre_nms_topk``,
    ``nms_threshold``, ``detections_per_img``, ``instance_score_threshold``, ``min_stuff_area``,
    ``stuff_area_reference``, ``min_visible_fraction``, ``min_instance_area``,
    ``outside_box_value``; ``return_confidence`` is not supported: the margin map needs every
    plane at every pixel) and ``nms_iterations`` (:func:`~ciae_core.static_proposals.greedy_nms_fixed_point`)."""
    if fusion not in FUSIONS:
        raise ValueError(f"postprocess_static: unknown fusion {fusion!r} ({', '.join(FUSIONS)})")
    geometry = dict(embedding_stride=embedding_stride, normalize_after_upsampling=normalize_after_upsampling)
    selection = {k: v for k, v in settings.items() if k in SELECTION_SETTINGS}
    rest = {k: v for k, v in settings.items() if k not in SELECTION_SETTINGS}
    instances, converged = static_instances(raw, image_hw, **geometry, **selection)
    out = static_fusion(raw, instances, image_hw, num_things=num_things, fusion=fusion, **geometry, **rest)
    out["converged"] = converged
    return out
