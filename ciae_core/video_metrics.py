"""Video metrics of tracked panoptic output (issue 14): MOT metrics, VPQ and STQ.

:class:`VideoEvaluator` takes frames of one or more sequences (ground-truth id map + segments,
predicted :class:`~ciae_core.structures.PanopticResult` with ``track_id`` on its segments) and
reports three views of the same output:

* **Things as tracks** (CLEAR MOT and identity metrics, computed by ``motmetrics``): per frame a
  ground-truth thing and a predicted thing with ``track_id > 0`` may match when they have the same
  category and mask ``IoU > 0.5`` (distance ``1 - IoU``, so at most 0.5); IDF1 (Ristani et al.,
  2016), MOTA, ID switches, and ID switches per 100 ground-truth tracks. Thing segments with
  ``track_id == 0`` are not reported tracks and are left out here.
* **VPQ** (Kim et al., CVPR 2020, Eq. V1): for a window of ``k + 1`` consecutive frames each
  segment becomes a spatio-temporal tube (the union of its pixels over the window: for the ground
  truth all pixels with one segment id, for the prediction a thing's ``(category, track_id)`` and a
  stuff category's pixels); tubes match as segments do in PQ (same category, tube ``IoU > 0.5``,
  prediction pixels on void left out of the union, crowd rules) and TP/FP/FN and the IoUs of all
  windows ``t = 0 .. T-k-1`` of all sequences are summed per category;
  ``VPQ^k = mean_c Σ_TP IoU / (TP + FP/2 + FN/2)`` over the categories that occur, and
  ``VPQ = mean_k VPQ^k`` over ``k = 0, 5, 10, 15`` (windows that do not fit a sequence are not
  evaluated; a ``k`` with no window at all is left out of the mean). ``VPQ^0`` is the image PQ.
  An untracked thing (``track_id == 0``) is a one-frame tube. The matching is
  :func:`ciae_core.evaluation.pq_stat_from_pairs` on the window's summed overlap table.
* **STQ** (Weber et al., 2021, "STEP", Eq. S1-S3): ``STQ = sqrt(AQ * SQ)`` with
  ``AQ = 1/|G| Σ_g 1/|g| Σ_{p: |p∩g|>0} TPA(p,g) IoU_id(p,g)`` over the ground-truth thing tracks
  ``g`` of every sequence (class-agnostic association; ``TPA = |p∩g|``, ``IoU_id = TPA / |p ∪ g|``
  over the whole sequence; predicted tracks are ``(category, track_id)``, untracked things and
  crowd ground truth take no part), and ``SQ`` the class mean IoU of the semantic labels over all
  frames (ground-truth void pixels ignored; predicted void counts as a miss; classes with an empty
  union left out), pooled over sequences as deeplab2's reference implementation does.

Ground truth: an id map per frame (0 = void) and its segments (dicts or objects with ``id``,
``category_id``, optional ``iscrowd``); a thing's id must be the same in every frame of a
sequence (that is what tracks are) and keep its category.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .evaluation import EvaluationError, PQStat, pq_stat_from_pairs
from .structures import CategoryInfo, PanopticResult

VPQ_WINDOWS = (0, 5, 10, 15)
MATCH_IOU = 0.5
_SHIFT = 32


def _field(seg, key: str, default=None):
    return seg.get(key, default) if isinstance(seg, dict) else getattr(seg, key, default)


def _merge_pairs(g: np.ndarray, p: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum the counts of equal (g, p) rows."""
    key, inv = np.unique((g << _SHIFT) | p, return_inverse=True)
    return key >> _SHIFT, key & ((1 << _SHIFT) - 1), np.bincount(inv, weights=n).astype(np.int64)


class _Sequence:
    """Per-frame overlap tables and per-sequence accumulators of one sequence."""

    def __init__(self, num_classes: int):
        self.frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (g, p, n) per frame
        self.gt_cat: dict[int, int] = {}
        self.gt_crowd: dict[int, bool] = {}
        self.tubes: dict[tuple, int] = {}  # prediction tube key -> tube id (1..)
        self.tube_cat: dict[int, int] = {}
        self.tube_tracked: dict[int, bool] = {}
        self.confusion = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)  # last = void
        self.mot = None  # motmetrics.MOTAccumulator, created on the first frame

    def tube(self, key: tuple, cat: int, tracked: bool) -> int:
        t = self.tubes.get(key)
        if t is None:
            t = self.tubes[key] = len(self.tubes) + 1
            self.tube_cat[t], self.tube_tracked[t] = cat, tracked
        return t


class VideoEvaluator:
    """Accumulate frames of tracked panoptic output and compute MOT metrics, VPQ and STQ.

    Args:
        categories: the evaluated categories (dataset ids; ``isthing`` decides things/stuff).
        windows: the VPQ window sizes ``k`` (frames ``t .. t+k``), default ``(0, 5, 10, 15)``.

    Usage: ``begin_sequence()``, then ``add(gt_ids, gt_segments, result)`` per frame in time
    order, again for the next sequence; ``summary()`` at any time.
    """

    def __init__(self, categories: Sequence[CategoryInfo], windows: Sequence[int] = VPQ_WINDOWS):
        self.categories = list(categories)
        if not self.categories:
            raise ValueError("categories must not be empty")
        if not windows or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in windows):
            raise ValueError(f"windows must be integers >= 0, got {windows!r}")
        self.windows = tuple(windows)
        self._cats = {c.id: c for c in self.categories}
        self._class_index = {c.id: i for i, c in enumerate(self.categories)}
        self._sequences: list[_Sequence] = []

    def begin_sequence(self) -> None:
        """Start a new sequence (windows and tracks never span two sequences)."""
        self._sequences.append(_Sequence(len(self.categories)))

    def add(self, gt_ids: np.ndarray, gt_segments: Sequence, result: PanopticResult, frame: Any = None) -> None:
        """Add the next frame of the current sequence (``frame`` names it in error messages)."""
        if not self._sequences:
            self.begin_sequence()
        seq = self._sequences[-1]
        where = f"frame {len(seq.frames) if frame is None else frame}"
        gt = np.asarray(gt_ids)
        pred = np.asarray(result.id_map)
        if gt.shape != pred.shape or gt.ndim != 2:
            raise EvaluationError(f"{where}: prediction id map is {pred.shape[::-1]} (w, h) but the ground truth is "
                                  f"{gt.shape[::-1]}")
        gt_cat = self._register_gt(seq, gt_segments, where)
        pred_cat = {}
        lut = np.zeros(max([s.id for s in result.segments], default=0) + 1, dtype=np.int64)
        for s in result.segments:
            if s.category_id not in self._cats:
                raise EvaluationError(f"{where}: predicted category id {s.category_id} is not in the categories list")
            pred_cat[s.id] = s.category_id
            if not s.isthing:
                key, tracked = ("stuff", s.category_id), False
            elif s.track_id > 0:
                key, tracked = ("track", s.category_id, int(s.track_id)), True
            else:
                key, tracked = ("frame", len(seq.frames), int(s.id)), False
            lut[s.id] = seq.tube(key, s.category_id, tracked)
        if pred.size and (pred.min() < 0 or pred.max() >= len(lut)):
            raise EvaluationError(f"{where}: the predicted id map has ids that are not in result.segments")
        gt64 = gt.astype(np.int64)
        if gt64.size and (gt64.min() < 0 or gt64.max() >= 2 ** 31):
            raise EvaluationError(f"{where}: ground-truth ids must be in [0, 2^31)")
        pairs, inter = np.unique((gt64 << _SHIFT) | lut[pred], return_counts=True)
        g, p = pairs >> _SHIFT, pairs & ((1 << _SHIFT) - 1)
        unlisted = [i for i in g.tolist() if i != 0 and i not in gt_cat]
        if unlisted:
            raise EvaluationError(f"{where}: ground-truth ids {unlisted[:5]} are in the id map but not in its segments")
        seq.frames.append((g, p, inter.astype(np.int64)))
        self._add_semantic(seq, gt64, pred, gt_cat, pred_cat)
        self._add_mot(seq, g, p, inter, gt_cat, result, where)

    # -- frame accumulation ---------------------------------------------------------------------
    def _register_gt(self, seq: _Sequence, gt_segments: Sequence, where: str) -> dict[int, int]:
        gt_cat = {}
        for s in gt_segments:
            i, c, crowd = int(_field(s, "id")), int(_field(s, "category_id")), bool(_field(s, "iscrowd", 0))
            if c not in self._cats:
                raise EvaluationError(f"{where}: ground-truth category id {c} is not in the categories list")
            if seq.gt_cat.setdefault(i, c) != c:
                raise EvaluationError(f"{where}: ground-truth segment {i} changed its category from {seq.gt_cat[i]} "
                                      f"to {c} within the sequence")
            seq.gt_crowd[i] = crowd
            gt_cat[i] = c
        return gt_cat

    def _add_semantic(self, seq: _Sequence, gt: np.ndarray, pred: np.ndarray, gt_cat: dict, pred_cat: dict) -> None:
        """Confusion of semantic classes (STQ's SQ); class index ``C`` is void."""
        void = len(self.categories)

        def class_lut(table: dict[int, int], ids: np.ndarray) -> np.ndarray:
            lut = np.full(max(int(ids.max(initial=0)), max(table, default=0)) + 1, void, dtype=np.int64)
            for i, c in table.items():
                lut[i] = self._class_index[c]
            lut[0] = void
            return lut[ids]

        g_cls, p_cls = class_lut(gt_cat, gt).ravel(), class_lut(pred_cat, pred).ravel()
        k = void + 1
        seq.confusion += np.bincount(g_cls * k + p_cls, minlength=k * k).reshape(k, k)

    def _add_mot(self, seq: _Sequence, g, p, inter, gt_cat: dict, result: PanopticResult, where: str) -> None:
        import motmetrics  # lazy: pulls in pandas

        if seq.mot is None:
            seq.mot = motmetrics.MOTAccumulator(auto_id=True)
        g_area = dict(zip(*_sums(g, inter)))
        p_area = dict(zip(*_sums(p, inter)))
        p_void = {int(pp): int(n) for gg, pp, n in zip(g, p, inter) if gg == 0}
        gt_things = sorted(i for i, c in gt_cat.items() if self._cats[c].isthing and not seq.gt_crowd[i]
                           and i in g_area)
        tracks = [s for s in result.segments if s.isthing and s.track_id > 0]
        hyp_tubes = [seq.tubes[("track", s.category_id, int(s.track_id))] for s in tracks]
        if len(set(hyp_tubes)) != len(hyp_tubes):
            raise EvaluationError(f"{where}: two predicted segments carry the same track_id and category")
        dist = np.full((len(gt_things), len(tracks)), np.nan)
        row = {gid: r for r, gid in enumerate(gt_things)}
        col = {t: c for c, t in enumerate(hyp_tubes)}
        for gg, pp, n in zip(g.tolist(), p.tolist(), inter.tolist()):
            r, c = row.get(gg), col.get(pp)
            if r is None or c is None or gt_cat[gg] != seq.tube_cat[pp]:
                continue
            iou = n / (g_area[gg] + p_area[pp] - n - p_void.get(pp, 0))
            if iou > MATCH_IOU:
                dist[r, c] = 1.0 - iou
        seq.mot.update(gt_things, [int(s.track_id) for s in tracks], dist)

    # -- metrics --------------------------------------------------------------------------------
    def vpq(self) -> dict[str, Any]:
        """``{"vpq", "vpq_th", "vpq_st", "per_k": {k: {"vpq", "vpq_th", "vpq_st", "windows"}}}`` (fractions)."""
        per_k = {}
        for k in self.windows:
            stat, windows = PQStat(), 0
            for seq in self._sequences:
                for t in range(len(seq.frames) - k):
                    stat += self._window_stat(seq, t, k)
                    windows += 1
            if windows == 0:
                continue
            summary = stat.summarize(self.categories)
            per_k[k] = {"vpq": summary["All"]["pq"], "vpq_th": summary["Things"]["pq"],
                        "vpq_st": summary["Stuff"]["pq"], "windows": windows}
        out: dict[str, Any] = {"per_k": per_k}
        for key in ("vpq", "vpq_th", "vpq_st"):
            out[key] = float(np.mean([v[key] for v in per_k.values()])) if per_k else 0.0
        return out

    def _window_stat(self, seq: _Sequence, t: int, k: int) -> PQStat:
        parts = seq.frames[t:t + k + 1]
        g, p, n = (np.concatenate([f[i] for f in parts]) for i in range(3))
        if k > 0:
            g, p, n = _merge_pairs(g, p, n)
        gt_segs = [{"id": i, "category_id": seq.gt_cat[i], "iscrowd": seq.gt_crowd[i]} for i in np.unique(g).tolist()
                   if i != 0]
        pred_segs = [{"id": i, "category_id": seq.tube_cat[i]} for i in np.unique(p).tolist() if i != 0]
        return pq_stat_from_pairs(g, p, n, gt_segs, pred_segs, self._cats, image=f"window {t}..{t + k}")

    def stq(self) -> dict[str, float]:
        """``{"stq", "aq", "sq"}`` (fractions) pooled over all sequences (Eq. S1-S3)."""
        aq_sum, num_tracks = 0.0, 0
        confusion = np.zeros((len(self.categories) + 1,) * 2, dtype=np.int64)
        for seq in self._sequences:
            confusion += seq.confusion
            if not seq.frames:
                continue
            g, p, n = _merge_pairs(*(np.concatenate([f[i] for f in seq.frames]) for i in range(3)))
            thing_gt = np.asarray([i != 0 and self._cats[seq.gt_cat[i]].isthing and not seq.gt_crowd[i]
                                   for i in g.tolist()], dtype=bool)
            thing_pred = np.asarray([i != 0 and seq.tube_tracked[i] for i in p.tolist()], dtype=bool)
            gt_size = dict(zip(*_sums(g[thing_gt], n[thing_gt])))
            pred_size = dict(zip(*_sums(p[thing_pred], n[thing_pred])))
            inner = {gid: 0.0 for gid in gt_size}
            both = thing_gt & thing_pred
            for gg, pp, tpa in zip(g[both].tolist(), p[both].tolist(), n[both].tolist()):
                inner[gg] += tpa * tpa / (gt_size[gg] + pred_size[pp] - tpa)
            aq_sum += sum(v / gt_size[gid] for gid, v in inner.items())
            num_tracks += len(gt_size)
        aq = aq_sum / num_tracks if num_tracks else 0.0
        c = confusion[:-1].astype(np.float64)  # ground-truth void rows ignored
        tp = np.diag(c[:, :-1])
        union = c.sum(axis=1) + c[:, :-1].sum(axis=0) - tp
        valid = union > 0
        sq = float(np.mean(tp[valid] / union[valid])) if valid.any() else 0.0
        return {"stq": float(np.sqrt(aq * sq)), "aq": float(aq), "sq": sq}

    def mot(self) -> dict[str, float]:
        """``{"idf1", "mota", "id_switches", "num_gt_tracks", "idsw_per_100", ...}`` over all sequences."""
        import motmetrics

        accs = [s.mot for s in self._sequences if s.mot is not None]
        keys = ["idf1", "idp", "idr", "mota", "motp", "num_switches", "num_unique_objects", "num_false_positives",
                "num_misses", "num_objects", "mostly_tracked", "num_frames"]
        if not accs:
            return {"idf1": 0.0, "mota": 0.0, "id_switches": 0, "num_gt_tracks": 0, "idsw_per_100": 0.0}
        names = [str(i) for i in range(len(accs))]
        table = motmetrics.metrics.create().compute_many(accs, names=names, metrics=keys, generate_overall=True)
        row = table.loc["OVERALL"]
        out = {k: float(row[k]) for k in keys}
        out["id_switches"] = int(row["num_switches"])
        out["num_gt_tracks"] = int(row["num_unique_objects"])
        out["idsw_per_100"] = 100.0 * out["id_switches"] / max(1, out["num_gt_tracks"])
        # detection F1 (matches regardless of identity): the most IDF1 can be with these segments
        tp = out["num_objects"] - out["num_misses"]
        out["detection_f1"] = 2 * tp / max(1.0, 2 * tp + out["num_false_positives"] + out["num_misses"])
        for k in ("idf1", "idp", "idr", "mota", "motp"):
            out[k] = 0.0 if np.isnan(out[k]) else out[k]
        return out

    def id_switches(self) -> list[tuple[int, int, int]]:
        """Every ID switch as ``(sequence index, frame index, ground-truth id)`` (``motmetrics``'
        SWITCH events), e.g. to count those near scripted events."""
        out = []
        for i, seq in enumerate(self._sequences):
            if seq.mot is None:
                continue
            ev = seq.mot.mot_events
            for (frame, _), row in ev[ev.Type == "SWITCH"].iterrows():
                out.append((i, int(frame), int(row.OId)))
        return out

    def summary(self) -> dict[str, Any]:
        """MOT metrics, VPQ and STQ in one flat-ish dict (fractions; counts as ints)."""
        out = self.mot()
        out.update(self.vpq())
        out.update(self.stq())
        out["num_sequences"] = sum(1 for s in self._sequences if s.frames)
        out["num_frames"] = sum(len(s.frames) for s in self._sequences)
        return out


def _sums(ids: np.ndarray, counts: np.ndarray) -> tuple[list[int], list[int]]:
    """Distinct ``ids`` and the summed ``counts`` of each."""
    u, inv = np.unique(ids, return_inverse=True)
    return u.tolist(), np.bincount(inv, weights=counts, minlength=len(u)).astype(np.int64).tolist()


def format_video_table(summary: dict[str, Any]) -> str:
    """A short text table of :meth:`VideoEvaluator.summary` (percentages)."""
    lines = [f"{'metric':14s}| value", "-" * 26]
    for key, name in (("idf1", "IDF1"), ("mota", "MOTA"), ("vpq", "VPQ"), ("stq", "STQ"), ("aq", "AQ"),
                      ("sq", "SQ")):
        lines.append(f"{name:14s}| {100 * summary[key]:6.1f}")
    for k, v in summary.get("per_k", {}).items():
        lines.append(f"{'VPQ k=' + str(k):14s}| {100 * v['vpq']:6.1f}")
    lines.append(f"{'ID switches':14s}| {summary['id_switches']:6d}")
    lines.append(f"{'IDsw/100 GT':14s}| {summary['idsw_per_100']:6.1f}")
    lines.append(f"{'GT tracks':14s}| {summary['num_gt_tracks']:6d}")
    return "\n".join(lines)
