"""Panoptic Quality (Eq. 17) with the semantics of the COCO panoptic API, in memory and on files.

Per image (Kirillov et al., and ``pq_compute`` of cocodataset/panopticapi):

* a predicted segment and a non-crowd ground-truth segment of the *same category* match when
  ``IoU > 0.5``, with ``IoU = |p ∩ g| / (|p| + |g| − |p ∩ g| − |p ∩ void|)`` (the prediction's
  pixels on void ground truth are left out of the union);
* unmatched non-crowd ground-truth segments are false negatives; crowd segments never are;
* an unmatched prediction is a false positive unless more than half of its pixels lie on void or
  on crowd regions of its own category;
* ``PQ_c = Σ_TP IoU / (TP + FP/2 + FN/2)``, ``SQ_c = Σ_TP IoU / TP``, ``RQ_c = TP / (TP + FP/2 + FN/2)``
  per category, averaged over the categories that occur (``TP + FP + FN > 0``) for All / Things /
  Stuff.

The per-image work is one ``np.unique`` over the combined ``gt * 2^32 + pred`` ids; everything
else loops over segment pairs, never pixels. :func:`pq_compute` spreads images over processes.

Decisions where the reference implementation is silent or inconsistent (documented here):
``|g|`` is counted from the ground-truth pixels (the reference reads it from the JSON ``area``,
which is the same on consistent data and wrong on resized ground truth); several crowd segments
of one category are all honoured (the reference keeps only the last one; COCO has at most one);
ground-truth ids missing from ``segments_info`` raise :class:`EvaluationError` instead of being
silently ignored; an empty average (no category occurs) is 0 instead of a division by zero.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from ciae_core.user_input import quote

from .structures import CategoryInfo, PanopticResult

logger = logging.getLogger(__name__)

_PAIR_SHIFT = 32  # combined id = gt << 32 | pred (ids < 2^31)
_MATCH_IOU = 0.5
_IGNORE_FRACTION = 0.5


class EvaluationError(ValueError):
    """A user-facing evaluation problem (missing file, id mismatch, unknown category); one line."""


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

class PQStat:
    """Per-category accumulators ``[Σ IoU of TPs, TP, FP, FN]``, keyed by dataset category id.

    Adding two ``PQStat`` sums them (multi-process or multi-rank evaluation).
    """

    def __init__(self, data: dict[int, np.ndarray] | None = None):
        self.data: dict[int, np.ndarray] = {} if data is None else {int(k): np.asarray(v, dtype=np.float64)
                                                                    for k, v in data.items()}

    def _row(self, cat: int) -> np.ndarray:
        row = self.data.get(cat)
        if row is None:
            row = self.data[cat] = np.zeros(4, dtype=np.float64)
        return row

    def add(self, cat: int, iou: float = 0.0, tp: int = 0, fp: int = 0, fn: int = 0) -> None:
        self._row(int(cat))[:] += (iou, tp, fp, fn)

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for cat, row in other.data.items():
            self._row(cat)[:] += row
        return self

    def to_dict(self) -> dict[str, list[float]]:
        return {str(k): v.tolist() for k, v in sorted(self.data.items())}

    def pq_average(self, categories: Sequence[CategoryInfo], isthing: bool | None = None
                   ) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """Eq. 17 averaged over the categories (filtered by ``isthing``) with ``TP+FP+FN > 0``.

        Returns ``({"pq", "sq", "rq", "n"}, {category id: {"pq", "sq", "rq", "tp", "fp", "fn"}})``
        with fractions in ``[0, 1]``.
        """
        pq = sq = rq = 0.0
        n = 0
        per_class = {}
        for c in categories:
            if isthing is not None and c.isthing != isthing:
                continue
            iou, tp, fp, fn = (float(v) for v in self.data.get(c.id, np.zeros(4)))
            if tp + fp + fn == 0:
                per_class[c.id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0}
                continue
            n += 1
            denom = tp + 0.5 * fp + 0.5 * fn
            pq_c, sq_c, rq_c = iou / denom, (iou / tp if tp else 0.0), tp / denom
            per_class[c.id] = {"pq": pq_c, "sq": sq_c, "rq": rq_c,
                               "tp": int(tp), "fp": int(fp), "fn": int(fn)}
            pq, sq, rq = pq + pq_c, sq + sq_c, rq + rq_c
        if n == 0:
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class

    def summarize(self, categories: Sequence[CategoryInfo]) -> dict[str, Any]:
        """``{"All", "Things", "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {id: {..., "name", "isthing"}}}``
        (fractions, the layout of the reference ``pq_compute`` result plus per-class counts)."""
        out: dict[str, Any] = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            out[name], per_class = self.pq_average(categories, isthing)
            if isthing is None:
                for c in categories:
                    per_class[c.id].update(name=c.name, isthing=c.isthing)
                out["per_class"] = per_class
        return out


def _field(seg, key: str, default=None):
    if isinstance(seg, dict):
        return seg.get(key, default)
    return getattr(seg, key, default)


def pq_stat_single(gt_ids: np.ndarray, gt_segments: Sequence, pred_ids: np.ndarray, pred_segments: Sequence,
                   categories: dict[int, CategoryInfo] | Sequence[CategoryInfo], image: Any = "") -> PQStat:
    """PQ statistics of one image.

    Args:
        gt_ids, pred_ids: ``(H, W)`` integer id maps of the same shape, 0 = void.
        gt_segments: dicts or objects with ``id``, ``category_id`` and optional ``iscrowd``.
        pred_segments: dicts or :class:`~ciae_core.structures.Segment` with ``id``, ``category_id``.
        categories: the evaluated categories (list or id → CategoryInfo).
        image: name or id used in error messages.

    Raises :class:`EvaluationError` for shape mismatches, ids in a map but not in its segment list,
    predicted segments without pixels, and unknown categories.
    """
    cats = categories if isinstance(categories, dict) else {c.id: c for c in categories}
    gt = np.asarray(gt_ids)
    pred = np.asarray(pred_ids)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise EvaluationError(f"image {image}: prediction id map is {pred.shape[::-1]} (w, h) but the ground "
                              f"truth is {gt.shape[::-1]}; resize the prediction to the ground-truth resolution")
    gt = gt.astype(np.int64, copy=False)
    pred = pred.astype(np.int64, copy=False)
    if gt.size and (min(gt.min(), pred.min()) < 0 or max(gt.max(), pred.max()) >= 2 ** 31):
        raise EvaluationError(f"image {image}: segment ids must be in [0, 2^31)")

    # One pass over the pixels: every (gt id, pred id) pair with its intersection.
    pairs, inter = np.unique((gt << _PAIR_SHIFT) | pred, return_counts=True)
    g_of, p_of = pairs >> _PAIR_SHIFT, pairs & ((1 << _PAIR_SHIFT) - 1)
    return pq_stat_from_pairs(g_of, p_of, inter, gt_segments, pred_segments, cats, image)


def pq_stat_from_pairs(g_of: np.ndarray, p_of: np.ndarray, inter: np.ndarray, gt_segments: Sequence,
                       pred_segments: Sequence, categories: dict[int, CategoryInfo] | Sequence[CategoryInfo],
                       image: Any = "") -> PQStat:
    """PQ statistics from the overlap table of a ground-truth and a predicted id map.

    ``g_of``, ``p_of``, ``inter``: ``(K,)`` arrays, one row per distinct (ground-truth id,
    predicted id) pair of co-located pixels (0 = void) with its pixel count; every pixel is in
    exactly one row. :func:`pq_stat_single` builds the table from two maps; the video metrics
    (:mod:`ciae_core.video_metrics`) sum the tables of several frames (VPQ tubes). Segments and
    errors as in :func:`pq_stat_single`.
    """
    cats = categories if isinstance(categories, dict) else {c.id: c for c in categories}
    g_of, p_of = np.asarray(g_of, dtype=np.int64), np.asarray(p_of, dtype=np.int64)
    inter = np.asarray(inter, dtype=np.int64)
    g_ids, g_inv = np.unique(g_of, return_inverse=True)
    g_area = dict(zip(g_ids.tolist(), np.bincount(g_inv, weights=inter).astype(np.int64).tolist()))
    p_ids, p_inv = np.unique(p_of, return_inverse=True)
    p_area = dict(zip(p_ids.tolist(), np.bincount(p_inv, weights=inter).astype(np.int64).tolist()))

    gt_segs = {int(_field(s, "id")): s for s in gt_segments}
    pred_segs = {int(_field(s, "id")): s for s in pred_segments}
    gt_cat = {k: int(_field(s, "category_id")) for k, s in gt_segs.items()}
    gt_crowd = {k: bool(_field(s, "iscrowd", 0)) for k, s in gt_segs.items()}
    pred_cat = {k: int(_field(s, "category_id")) for k, s in pred_segs.items()}
    for where, ids, segs in (("ground truth", g_area, gt_segs), ("prediction", p_area, pred_segs)):
        unlisted = [i for i in ids if i != 0 and i not in segs]
        if unlisted:
            raise EvaluationError(f"image {image}: {where} segment ids {unlisted[:5]} are in the id map but not in "
                                  f"its segments_info")
    empty = [k for k in pred_segs if k not in p_area]
    if empty:
        raise EvaluationError(f"image {image}: predicted segment ids {empty[:5]} are in segments_info but have no "
                              f"pixels in the id map")
    for where, table in (("ground truth", gt_cat), ("prediction", pred_cat)):
        unknown = sorted({c for c in table.values() if c not in cats})
        if unknown:
            raise EvaluationError(f"image {image}: {where} uses category ids {unknown[:5]} that are not in the "
                                  f"categories list")

    pred_void = {int(p): int(n) for g, p, n in zip(g_of.tolist(), p_of.tolist(), inter.tolist()) if g == 0}
    stat = PQStat()
    gt_matched, pred_matched = set(), set()
    for g, p, n in zip(g_of.tolist(), p_of.tolist(), inter.tolist()):
        if g == 0 or p == 0 or gt_crowd[g] or gt_cat[g] != pred_cat[p]:
            continue
        union = p_area[p] + g_area[g] - n - pred_void.get(p, 0)
        iou = n / union
        if iou > _MATCH_IOU:  # IoU > 0.5 matches are unique (segments do not overlap)
            stat.add(gt_cat[g], iou=iou, tp=1)
            gt_matched.add(g)
            pred_matched.add(p)

    crowd_by_cat: dict[int, set[int]] = {}
    for g in gt_segs:
        if g in gt_matched:
            continue
        if gt_crowd[g]:
            crowd_by_cat.setdefault(gt_cat[g], set()).add(g)
        else:
            stat.add(gt_cat[g], fn=1)

    if len(pred_matched) < len(pred_segs):
        crowd_pixels: dict[int, int] = {}
        for g, p, n in zip(g_of.tolist(), p_of.tolist(), inter.tolist()):
            if p in pred_segs and g in crowd_by_cat.get(pred_cat[p], ()):
                crowd_pixels[p] = crowd_pixels.get(p, 0) + n
        for p in pred_segs:
            if p in pred_matched:
                continue
            ignored = pred_void.get(p, 0) + crowd_pixels.get(p, 0)
            if ignored / p_area[p] > _IGNORE_FRACTION:
                continue
            stat.add(pred_cat[p], fp=1)
    return stat


# --------------------------------------------------------------------------------------------
# In-memory evaluator (trainer)
# --------------------------------------------------------------------------------------------

def _as_id_map_and_segments(item, categories: Sequence[CategoryInfo], image_size=None):
    """Normalise one GT or prediction to ``(id map (H, W) ndarray, list of segments)``.

    Accepted: a :class:`PanopticResult`; a tuple ``(id_map, segments_info)``; a training target
    dict (``masks`` (K, Hp, Wp), ``labels`` training ids, ``iscrowd``), cropped to ``image_size``;
    a model output dict (``id_map``, ``ids``, ``labels`` training ids).
    """
    if isinstance(item, PanopticResult):
        return np.asarray(item.id_map), item.segments
    if isinstance(item, tuple) and len(item) == 2:
        ids, segs = item
        return _to_numpy(ids), list(segs)
    if isinstance(item, dict) and "masks" in item:
        masks = _to_numpy(item["masks"]).astype(bool)
        if image_size is not None:
            masks = masks[:, : image_size[0], : image_size[1]]
        labels = _to_numpy(item["labels"]).tolist()
        crowd = _to_numpy(item.get("iscrowd", np.zeros(len(labels), dtype=bool))).tolist()
        k = masks.shape[0]
        # masks are disjoint: id k+1 where mask k is set (argmax of [void, masks...]).
        id_map = (np.concatenate([np.zeros((1, *masks.shape[1:]), bool), masks]).argmax(0)).astype(np.int32)
        segs = [{"id": j + 1, "category_id": categories[int(labels[j])].id, "iscrowd": int(bool(crowd[j]))}
                for j in range(k)]
        return id_map, segs
    if isinstance(item, dict) and "id_map" in item:
        id_map = _to_numpy(item["id_map"])
        if image_size is not None:
            id_map = id_map[: image_size[0], : image_size[1]]
        ids = _to_numpy(item["ids"]).tolist()
        labels = _to_numpy(item["labels"]).tolist()
        segs = [{"id": int(i), "category_id": categories[int(lbl)].id} for i, lbl in zip(ids, labels)]
        present = set(np.unique(id_map).tolist())
        return id_map, [s for s in segs if s["id"] in present]  # fused-away proposals have no pixels
    raise EvaluationError(f"cannot evaluate an object of type {type(item).__name__}; expected PanopticResult, "
                          f"(id_map, segments_info), a training target dict or a model output dict")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class PanopticEvaluator:
    """PQ / SQ / RQ over a stream of images (detectron2-style ``reset / process / evaluate``).

    ``categories``: the evaluated categories (dataset ids; training order matters only for
    ``labels`` given as training ids in target/model-output dicts).

    ``process(gt, pred)`` accepts, for one image, ``gt`` as ``(pan_ids, segments_info)`` or a
    training target dict and ``pred`` as a :class:`PanopticResult`, ``(id_map, segments_info)`` or
    a model output dict (``id_map``, ``ids``, ``labels``); or a whole batch: ``gt`` a
    :class:`ciae_core.data.PanopticBatch` (targets cropped to ``image_sizes``) or a list, and
    ``pred`` a list. Id maps of gt and pred must have the same size.

    ``evaluate()`` returns flat percentages ``PQ, SQ, RQ, PQ_th, SQ_th, RQ_th, PQ_st, SQ_st, RQ_st``
    (for logs and model selection); the full result with per-class rows is then in ``.summary``.

    Several ranks (``torchrun``): each rank processes its own share of the images and
    ``evaluate()`` sums the accumulators of all ranks first, so every rank
    returns the same metrics for the whole data set. Decision (as detectron2's evaluators, but
    all-reduce rather than gather-to-rank-0): every rank can then take the same decisions, e.g.
    which checkpoint is best, without another broadcast. ``sync_ranks``: ``"auto"`` (default)
    synchronises when a ``torch.distributed`` process group with more than one rank is
    initialised (:meth:`all_ranks_stat`); ``False`` keeps each rank's own numbers. Every rank
    must call ``evaluate()`` (a collective), also a rank whose share is empty.
    """

    def __init__(self, categories: Sequence[CategoryInfo], sync_ranks: bool | str = "auto"):
        if sync_ranks not in ("auto", True, False):
            raise EvaluationError(f"sync_ranks must be 'auto', True or False, got {quote(sync_ranks)}")
        self.categories = list(categories)
        self._cats = {c.id: c for c in self.categories}
        self.sync_ranks = sync_ranks
        self.reset()

    def reset(self) -> None:
        self.stat = PQStat()
        self.num_images = 0
        self.summary: dict[str, Any] | None = None

    def process(self, gt, pred, image_id: Any = None) -> None:
        if hasattr(gt, "targets") and hasattr(gt, "image_sizes"):  # a collated batch
            gts, sizes = list(gt.targets), list(gt.image_sizes)
        elif isinstance(gt, list):
            gts, sizes = gt, [None] * len(gt)
        else:
            gts, sizes, pred = [gt], [None], [pred]
        preds = list(pred)
        if len(preds) != len(gts):
            raise EvaluationError(f"got {len(gts)} ground truths but {len(preds)} predictions")
        for k, (g, p, size) in enumerate(zip(gts, preds, sizes)):
            name = image_id if image_id is not None else (g.get("image_id", k) if isinstance(g, dict) else k)
            gt_ids, gt_segs = _as_id_map_and_segments(g, self.categories, size)
            pred_ids, pred_segs = _as_id_map_and_segments(p, self.categories, size)
            self.stat += pq_stat_single(gt_ids, gt_segs, pred_ids, pred_segs, self._cats, image=name)
            self.num_images += 1

    def all_ranks_stat(self) -> tuple[PQStat, int]:
        """The accumulators and image count summed over all ranks (an all-reduce), or this rank's own.

        Sums only with ``sync_ranks`` not False and an initialised process group of more than one
        rank; this evaluator's own accumulators are left as they are, so calling it (or
        ``evaluate()``) again gives the same numbers. ``torch.distributed`` is looked up in
        ``sys.modules`` rather than imported: a process that never imported it has no process
        group, and the file-based evaluation stays free of torch. Only the evaluated categories
        travel (rows of ``[Σ IoU, TP, FP, FN]`` in float64, plus the image count), on the device
        the backend needs (the current CUDA device for NCCL).
        """
        if self.sync_ranks is False:
            return self.stat, self.num_images
        dist = sys.modules.get("torch.distributed")
        if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
            if self.sync_ranks is True:
                raise EvaluationError("sync_ranks=True but no torch.distributed process group of 2+ ranks "
                                      "is initialised")
            return self.stat, self.num_images
        import torch

        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        rows = [self.stat.data.get(c.id, np.zeros(4)) for c in self.categories]
        flat = np.concatenate([np.asarray(rows, dtype=np.float64).reshape(-1), [float(self.num_images)]])
        total = torch.from_numpy(flat).to(device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total = total.cpu().numpy()
        stat = PQStat({c.id: total[4 * k: 4 * k + 4] for k, c in enumerate(self.categories)
                       if total[4 * k: 4 * k + 4].any()})
        return stat, int(round(total[-1]))

    def evaluate(self) -> dict[str, float]:
        stat, num_images = self.all_ranks_stat()
        self.summary = stat.summarize(self.categories)
        self.summary["num_images"] = num_images
        return flat_metrics(self.summary)


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Nested fractions of :meth:`PQStat.summarize` → flat percentages (``PQ``, ``PQ_th``, ``PQ_st``, ...)."""
    out = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            out[key.upper() + suffix] = 100.0 * summary[group][key]
    return out


def format_pq_table(summary: dict[str, Any], per_class: bool = False) -> str:
    """The reference tool's text table (percentages), optionally followed by per-class rows."""
    lines = [f"{'':10s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}", "-" * 38]
    for name in ("All", "Things", "Stuff"):
        r = summary[name]
        lines.append(f"{name:10s}| {100 * r['pq']:6.1f} {100 * r['sq']:6.1f} {100 * r['rq']:6.1f} {r['n']:5d}")
    if per_class:
        head = " ".join(f"{k:>6s}" for k in ("PQ", "SQ", "RQ")) + " " + " ".join(f"{k:>5s}" for k in ("TP", "FP", "FN"))
        lines += ["", f"{'category':24s} {'kind':5s} | {head}",
                  "-" * 70]
        for cid, r in summary["per_class"].items():
            if r["tp"] + r["fp"] + r["fn"] == 0:
                continue
            lines.append(f"{str(r['name'])[:24]:24s} {'thing' if r['isthing'] else 'stuff':5s} | {100 * r['pq']:6.1f} "
                         f"{100 * r['sq']:6.1f} {100 * r['rq']:6.1f} {r['tp']:5d} {r['fp']:5d} {r['fn']:5d}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Files: pq_compute and the prediction writer
# --------------------------------------------------------------------------------------------

def _load_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise EvaluationError(f"{what} JSON not found: {path}")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluationError(f"{what} JSON {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise EvaluationError(f"{what} JSON {path} has no 'annotations' list (not COCO panoptic)")
    return doc


def _read_png_ids(path: str) -> np.ndarray:
    from .data import DatasetError, read_panoptic_png
    try:
        return read_panoptic_png(path)
    except DatasetError as e:
        raise EvaluationError(str(e)) from None


def _pq_stat_files(job) -> PQStat:
    pairs, gt_dir, pred_dir, categories = job
    cats = {c.id: c for c in categories}
    stat = PQStat()
    for gt_ann, pred_ann in pairs:
        gt_ids = _read_png_ids(os.path.join(gt_dir, gt_ann["file_name"]))
        pred_ids = _read_png_ids(os.path.join(pred_dir, pred_ann["file_name"]))
        stat += pq_stat_single(gt_ids, gt_ann["segments_info"], pred_ids, pred_ann["segments_info"], cats,
                               image=gt_ann["image_id"])
    return stat


def pq_compute(gt_json: str, pred_json: str, gt_dir: str | None = None, pred_dir: str | None = None,
               categories: Sequence[CategoryInfo] | None = None, num_workers: int = 0) -> dict[str, Any]:
    """PQ of the predictions in ``pred_json``/``pred_dir`` against ``gt_json``/``gt_dir`` (COCO panoptic).

    ``gt_dir``/``pred_dir`` default to the JSON path without ``.json`` (the reference convention).
    ``categories`` default to the ground-truth JSON's. Every ground-truth image needs a prediction
    (:class:`EvaluationError` otherwise); predictions for other images are ignored. ``num_workers``
    > 1 splits the images over that many processes. Returns :meth:`PQStat.summarize` plus
    ``num_images``.
    """
    from .data import DatasetError, categories_from_json
    gt_doc, pred_doc = _load_json(gt_json, "ground-truth"), _load_json(pred_json, "prediction")
    gt_dir = gt_dir or os.path.splitext(gt_json)[0]
    pred_dir = pred_dir or os.path.splitext(pred_json)[0]
    for d, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not os.path.isdir(d):
            raise EvaluationError(f"{what} PNG directory not found: {d}")
    if categories is None:
        try:
            categories = categories_from_json(gt_doc.get("categories", []))
        except DatasetError as e:
            raise EvaluationError(f"{gt_json}: {e}") from None
        if not categories:
            raise EvaluationError(f"{gt_json} has no 'categories'; pass categories explicitly")
    preds = {ann.get("image_id"): ann for ann in pred_doc["annotations"]}
    pairs = []
    for gt_ann in gt_doc["annotations"]:
        pred_ann = preds.get(gt_ann["image_id"])
        if pred_ann is None:
            raise EvaluationError(f"{pred_json} has no prediction for the image with id {gt_ann['image_id']}")
        pairs.append((gt_ann, pred_ann))
    if not pairs:
        raise EvaluationError(f"{gt_json} has no annotations")
    categories = list(categories)
    workers = max(1, min(int(num_workers), len(pairs)))
    stat = PQStat()
    if workers == 1:
        stat += _pq_stat_files((pairs, gt_dir, pred_dir, categories))
    else:
        chunks = [pairs[i::workers] for i in range(workers)]
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(workers) as pool:
            for part in pool.imap_unordered(_pq_stat_files, [(c, gt_dir, pred_dir, categories) for c in chunks]):
                stat += part
    summary = stat.summarize(categories)
    summary["num_images"] = len(pairs)
    return summary


class CocoPanopticWriter:
    """Write panoptic results in the COCO panoptic format, one image at a time.

    ``out_dir/panoptic/<stem>.png`` (``id = R + 256 G + 256^2 B``) per image and, on
    :meth:`close`, ``out_dir/panoptic.json`` with ``images``, ``annotations`` (``segments_info``
    with ``id, category_id, iscrowd=0, area, bbox, isthing, score``) and ``categories``.
    """

    def __init__(self, out_dir: str, categories: Sequence[CategoryInfo], json_name: str = "panoptic.json"):
        self.out_dir = out_dir
        self.png_dir = os.path.join(out_dir, "panoptic")
        self.json_path = os.path.join(out_dir, json_name)
        self.categories = list(categories)
        self._names = {c.id for c in self.categories}
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        try:
            os.makedirs(self.png_dir, exist_ok=True)
        except OSError as e:
            raise EvaluationError(f"cannot create output directory {self.png_dir}: {e.strerror}") from None

    def add(self, file_name: str, image_id: Any, result: PanopticResult) -> None:
        from .data import id_to_rgb
        png_name = os.path.splitext(os.path.basename(file_name))[0] + ".png"
        ids = np.asarray(result.id_map)
        segs = []
        for s in result.segments:
            if s.category_id not in self._names:
                raise EvaluationError(f"{file_name}: segment {s.id} has category_id {s.category_id}, which is not "
                                      f"in the categories list")
            segs.append({"id": int(s.id), "category_id": int(s.category_id), "iscrowd": 0, "area": int(s.area),
                         "bbox": [int(v) for v in s.bbox], "isthing": int(bool(s.isthing)), "score": float(s.score)})
        path = os.path.join(self.png_dir, png_name)
        if not cv2.imwrite(path, id_to_rgb(ids)[..., ::-1]):
            raise EvaluationError(f"cannot write {path}")
        self.images.append({"id": image_id, "file_name": os.path.basename(file_name), "height": int(ids.shape[0]),
                            "width": int(ids.shape[1])})
        self.annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": segs})

    def close(self) -> str:
        """Write the JSON (atomically) and return its path."""
        from .synth import categories_json
        doc = {"images": self.images, "annotations": self.annotations, "categories": categories_json(self.categories)}
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.json_path)
        return self.json_path


def write_coco_panoptic(out_dir: str, results: Iterable[tuple[str, Any, PanopticResult]],
                        categories: Sequence[CategoryInfo], json_name: str = "panoptic.json") -> str:
    """Write ``(file_name, image_id, PanopticResult)`` triples as COCO panoptic (see
    :class:`CocoPanopticWriter`); returns the JSON path (PNGs are in ``out_dir/panoptic``)."""
    writer = CocoPanopticWriter(out_dir, categories, json_name)
    for file_name, image_id, result in results:
        writer.add(file_name, image_id, result)
    return writer.close()
