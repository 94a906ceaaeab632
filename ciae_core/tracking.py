"""Persistent ids for thing segments across the frames of one camera (issue 14).

:class:`SegmentTracker` gives every thing segment of a :class:`~ciae_core.structures.PanopticResult`
a ``track_id`` that stays the same while the thing stays in view (and, with the embedding cue,
when it comes back). The design follows SORT (Bewley et al., 2016) for motion, ByteTrack (Zhang
et al., 2022) for the two association rounds, and JDE/BoT-SORT for the appearance cue; the
appearance cue here is CIAE's own instance-aware pixel embedding (paper Eq. 9), averaged over each
segment's mask by the fusion (``PanopticResult.embeddings``), so it costs no extra network.

Per frame (``update(result, stamp)``):

1. Every track's box is predicted to ``stamp`` by a constant-velocity Kalman filter
   (:class:`~ciae_core.tracking_boxes.BoxKalmanFilter`) that uses the real time since the
   previous frame, so dropped frames only widen the prediction. Tracks not matched for more than
   ``max_age`` seconds are deleted. A segment's box is its tight box, cut to the bulk of its
   pixels when a few stray pixels stretch it (``box_trim``).
2. Round 1: segments with ``score >= high_score`` against the confirmed tracks seen in the
   previous frame, then the segments left against the lost tracks (a cascade as in DeepSORT:
   a track seen a moment ago has the better claim on a segment). Cost (Eq. T1)
   ``c = w (1 - IoU) + (1 - w) min(d / d_max, 1)`` with ``IoU`` between the segment's box and
   the track's predicted box, ``d = 1 - cos`` between the segment's embedding
   and the track's appearance (an exponential moving average of its matched embeddings,
   re-normalised), ``d_max = max_embedding_distance`` (both terms in [0, 1]) and
   ``w = iou_weight``; a pair may match when ``IoU >= min_iou`` and ``d <= max_embedding_distance``,
   or when ``d <= reid_distance`` and the segment is within reach of the track's last sighting,
   whatever the IoU (Eq. T2, :meth:`SegmentTracker._within_reach`). The second rule
   re-identifies a lost thing (occluded, or out of the image for a while) and keeps a thing whose
   motion the filter did not foresee (it bounced, turned or stopped), where the predicted box no
   longer overlaps it; appearance alone decides it, so ``reid_distance`` is strict.
   With ``association="iou"`` the cost is ``1 - IoU`` and only the IoU gate applies.
3. Round 2: segments with ``low_score <= score < high_score`` against the confirmed tracks still
   unmatched, by ``1 - IoU`` with ``IoU >= low_min_iou`` (ByteTrack: low-score segments are
   mostly occluded things; their appearance is not trusted, so they neither need nor update it).
4. Round 3: the round-1 segments left against the tentative tracks (cost of round 1 without re-id).
5. Matched tracks are corrected by the segment's box; unmatched confirmed tracks become lost,
   unmatched tentative tracks are deleted; round-1 segments left with ``score >= new_track_score``
   start tentative tracks. A track is confirmed after ``min_hits`` matched frames (at once on
   the first frame of a run) and only then gets its public id (so tentative tracks that die use
   no id: ids are 1, 2, 3, ... in order of confirmation and never reused by one tracker, not
   even after :meth:`SegmentTracker.reset`).

Every round matches by ``scipy.optimize.linear_sum_assignment`` on one matrix over all
categories in which pairs of different categories (and pairs outside the gates) are forbidden:
the result is that of one assignment per category (most matched pairs, then least total cost).

Decision (box vs mask IoU): the default IoU is the box IoU of the segment's box with the
track's predicted box (vectorised, microseconds). ``mask_iou=True`` replaces it by the IoU of the
segment's mask with the track's last mask moved by the predicted motion, on the id map
subsampled by 4 (:mod:`ciae_core.tracking_masks`). On the tuning sequences (seeds 2001-2005, the
shipped model's segments) the masks cut the ID switches from 65 to 40 with the embedding (IDF1
84.7 -> 85.5) and from 67 to 57 with IoU only, but about double the tracker's time per frame
(one pass over the subsampled id map and the cells of every segment); the default stays within
the 1 ms budget of issue 14, ``ciae-bench --tracking`` reports both.

Stamps: ``update`` takes the frame's time in seconds. An equal stamp is a frame without elapsed
time; an older stamp (a bag replayed from the start, ``use_sim_time`` jumping back) starts a new
run: the tracks are dropped (:meth:`SegmentTracker.reset`, logged as a warning) and the frame is
the first of the run. A camera whose frame changes should call ``reset()``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .structures import PanopticResult
from .tracking_boxes import BoxKalmanFilter, box_iou_cxcywh, trimmed_boxes, xywh_to_cxcywh
from .tracking_masks import FrameCells, mask_iou_matrix
from .user_input import quote

logger = logging.getLogger(__name__)

ASSOCIATIONS = ("embedding", "iou")

TENTATIVE, CONFIRMED, LOST = 0, 1, 2
STATE_NAMES = {TENTATIVE: "tentative", CONFIRMED: "confirmed", LOST: "lost"}

_SPARSE_FILL = 0.35  # segments filling less of their tight box get trimmed boxes (a ring fills ~0.45)
_FORBIDDEN = 1e6  # cost of a pair that must not match (far above any allowed cost, which is <= 3)


# --------------------------------------------------------------------------------------------
# Tracker
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrackInfo:
    """A snapshot of one track (for overlays and diagnostics).

    ``track_id``: the public id (0 while tentative); ``box``: ``(cx, cy, w, h)`` of the filter's
    state at the last update; ``last_seen``: stamp of the last matched frame.
    """

    track_id: int
    category_id: int
    state: str
    box: tuple[float, float, float, float]
    hits: int
    last_seen: float


@dataclass
class _Frame:
    """Per-frame arrays of :meth:`SegmentTracker.update` (``n`` thing segments, ``N`` tracks)."""

    index: np.ndarray  # (n,) index into result.segments
    boxes: np.ndarray  # (n, 4) cx, cy, w, h
    cats: np.ndarray  # (n,) category ids
    scores: np.ndarray  # (n,)
    emb: np.ndarray | None  # (n, D) unit rows
    stamp: float
    cells: FrameCells | None  # the subsampled id map, with mask_iou
    seg_ids: np.ndarray  # (n,) segment ids
    seg_cells: list  # with mask_iou: (rows, cols) of each segment's cells
    det_track: np.ndarray  # (n,) matched track index or -1
    matched: np.ndarray  # (N,) track matched this frame


def _positive(name: str, v, integer: bool = False, allow_zero: bool = False):
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {quote(v)}")
    return v


def _fraction(name: str, v, lo: float = 0.0, hi: float = 1.0):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {quote(v)}")
    return float(v)


def _assign(cost: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the allowed pairs of an optimal assignment (most pairs, then least cost)."""
    if cost.size == 0 or not allowed.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    r, c = linear_sum_assignment(np.where(allowed, cost, _FORBIDDEN))
    ok = allowed[r, c]
    return r[ok], c[ok]


class SegmentTracker:
    """Persistent ids for the thing segments of one camera (see the module docstring).

    One tracker per camera (per image stream): it keeps the tracks of that stream.

    Defaults: the ByteTrack/SORT values where those fit, otherwise tuned (by IDF1, then ID
    switches) on the predictions of the shipped model (``models/ciae_synthetic_small``) for five
    :class:`~ciae_core.synth_video.TrackingSequence` sequences with seeds 2001-2005 (used by no
    test and not by the benchmark). Score thresholds follow that model's scores (its things score
    0.4-0.9; rings often 0.4-0.5); other models may want others.

    Args:
        association: ``"embedding"`` (Eq. T1 and T2: embedding cosine distance + IoU,
            re-identification) or ``"iou"`` (IoU only, as SORT/ByteTrack; results need no
            embeddings).
        high_score: segments at or above it take part in round 1 and may start tracks (0.4;
            ByteTrack's 0.5 left this model's rings out of round 1).
        low_score: segments in ``[low_score, high_score)`` take part in round 2 only; lower ones
            are never tracked (0.1, ByteTrack).
        new_track_score: least score of a segment that starts a track (0.5; ByteTrack: high + 0.1).
        min_hits: matched frames before a track is confirmed and gets its id (3, SORT: a
            fragment that lives two frames never gets an id).
        max_age: seconds a track may go unmatched before it is deleted (2.0 s; in seconds so that
            the memory does not depend on the frame rate; ByteTrack keeps 1 s, longer lets the
            embedding re-identify things that come back).
        min_iou: least IoU with the predicted box for a round-1/3 match (0.02: segments of a thing
            change shape under occlusion and the motion model lags a bounce; on the tuning
            sequences IDF1 85.9 and 45 ID switches against 84.7 and 65 with 0.1, and the demo's
            scene keeps its 3 switches; 0.2 and 0.3 lost more tracks in both modes, and 0 (no IoU
            gate) let look-alikes swap).
        low_min_iou: least IoU for a round-2 match of a low-score segment (0.5, ByteTrack).
        iou_weight: ``w`` of Eq. T1 (0.5).
        max_embedding_distance: largest ``d = 1 - cos`` of a round-1/3 match, and the scale
            ``d_max`` of Eq. T1 (0.4; the same thing in consecutive frames is at ~0.003, two
            things of one class at ~0.13, the same thing one second later at ~0.1; 0.6 scored
            higher on the tuning sequences, IDF1 88.7, but tripled the switches in the demo's
            scene, where look-alikes bounce off each other: 11 against 3).
        reid_distance: largest ``d`` of a match by appearance alone (Eq. T2; 0.15).
        reid_speed: the reach of Eq. T2 grows by this many box sides per second since the last
            sighting (4: a thing may move fast, but not across the image in a few frames).
        box_trim: the box of a segment that fills less than 35 % of its tight box (the mark of a
            few stray pixels far from the thing, which the fusion sometimes leaves) is cut to the
            central ``1 - 2 box_trim`` of its pixels along x and y (:func:`trimmed_boxes`), so
            that they do not stretch it (0.02; 0 = always the tight ``Segment.bbox``). Compact
            segments keep their tight box and cost nothing.
        embedding_momentum: weight of the old appearance in the moving average (0.9, JDE).
        mask_iou: IoU of masks (the track's last mask moved by the prediction) instead of boxes
            for pairs whose boxes overlap (False; see the module docstring).
        motion_noise, measurement_noise, initial_velocity_std: :class:`BoxKalmanFilter`.

    Raises ``ValueError`` (one line) for a bad argument.
    """

    def __init__(self, association: str = "embedding", *, high_score: float = 0.4, low_score: float = 0.1,
                 new_track_score: float = 0.5, min_hits: int = 3, max_age: float = 2.0, min_iou: float = 0.02,
                 low_min_iou: float = 0.5, iou_weight: float = 0.5, max_embedding_distance: float = 0.4,
                 reid_distance: float = 0.15, reid_speed: float = 4.0, box_trim: float = 0.02,
                 embedding_momentum: float = 0.9, mask_iou: bool = False,
                 motion_noise: float = 4.0, measurement_noise: float = 0.05, initial_velocity_std: float = 2.0):
        if association not in ASSOCIATIONS:
            raise ValueError(f"association must be one of {', '.join(ASSOCIATIONS)}, got {quote(association)}")
        self.association = association
        self.low_score = _fraction("low_score", low_score)
        self.high_score = _fraction("high_score", high_score)
        self.new_track_score = _fraction("new_track_score", new_track_score)
        if not self.low_score <= self.high_score <= self.new_track_score:
            raise ValueError(f"need low_score <= high_score <= new_track_score, got {low_score}, {high_score}, "
                             f"{new_track_score}")
        self.min_hits = int(_positive("min_hits", min_hits, integer=True))
        self.max_age = float(_positive("max_age", max_age))
        self.min_iou = _fraction("min_iou", min_iou)
        self.low_min_iou = _fraction("low_min_iou", low_min_iou)
        self.iou_weight = _fraction("iou_weight", iou_weight)
        self.max_embedding_distance = _fraction("max_embedding_distance", max_embedding_distance, 0.0, 2.0)
        self.reid_distance = _fraction("reid_distance", reid_distance, 0.0, 2.0)
        self.reid_speed = float(_positive("reid_speed", reid_speed, allow_zero=True))
        self.box_trim = _fraction("box_trim", box_trim, 0.0, 0.25)
        self.embedding_momentum = _fraction("embedding_momentum", embedding_momentum)
        if not isinstance(mask_iou, bool):
            raise ValueError(f"mask_iou must be True or False, got {quote(mask_iou)}")
        self.mask_iou = mask_iou
        self.kf = BoxKalmanFilter(motion_noise, measurement_noise, initial_velocity_std)
        self._next_id = 1
        self.reset()

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all tracks (a new run: the camera's frame changed or time went backwards).

        Public ids keep counting, so an id is never given to two tracks by one tracker.
        """
        self._mean = np.zeros((0, 8))
        self._cov = np.zeros((0, 4, 3))
        self._last_box = np.zeros((0, 4))  # (cx, cy, w, h) of the last matched segment
        self._cat = np.zeros(0, dtype=np.int64)
        self._state = np.zeros(0, dtype=np.int8)
        self._hits = np.zeros(0, dtype=np.int64)
        self._last_seen = np.zeros(0)
        self._tid = np.zeros(0, dtype=np.int64)
        self._feat: np.ndarray | None = None  # (N, D) float32 once the first embedding arrives
        self._cells: list[tuple[np.ndarray, np.ndarray]] = []  # mask_iou: the last matched segment's cells
        self._cell_centre = np.zeros((0, 2))  # the filter's centre when those cells were taken
        self._last_stamp: float | None = None

    def __len__(self) -> int:
        return len(self._tid)

    def tracks(self) -> list[TrackInfo]:
        """Snapshot of all live tracks (tentative, confirmed and lost)."""
        return [TrackInfo(int(self._tid[i]), int(self._cat[i]), STATE_NAMES[int(self._state[i])],
                          tuple(float(v) for v in self._mean[i, :4]), int(self._hits[i]), float(self._last_seen[i]))
                for i in range(len(self))]

    def _keep(self, keep: np.ndarray) -> np.ndarray:
        """Keep the tracks where ``keep`` (bool ``(N,)``); returns the new index of every old track (-1: gone)."""
        index = np.full(len(keep), -1, dtype=np.int64)
        index[keep] = np.arange(int(np.count_nonzero(keep)))
        self._mean, self._cov, self._cat = self._mean[keep], self._cov[keep], self._cat[keep]
        self._last_box = self._last_box[keep]
        self._state, self._hits, self._last_seen, self._tid = (self._state[keep], self._hits[keep],
                                                               self._last_seen[keep], self._tid[keep])
        if self._feat is not None:
            self._feat = self._feat[keep]
        if self.mask_iou:
            self._cells = [self._cells[i] for i in np.flatnonzero(keep)]
            self._cell_centre = self._cell_centre[keep]
        return index

    # -- update ---------------------------------------------------------------------------------
    def update(self, result: PanopticResult, stamp: float) -> PanopticResult:
        """Track the thing segments of one frame; sets ``track_id`` on ``result.segments`` in place
        and returns ``result``.

        Args:
            result: the frame's panoptic result. With ``association="embedding"``,
                ``result.embeddings`` must hold one row per segment (``predictor(image,
                return_embeddings=True)``); with ``mask_iou=True`` ``result.id_map`` is read.
            stamp: the frame's time in seconds (e.g. the image header stamp). A stamp older than
                the previous one starts a new run (:meth:`reset`, logged) and the frame is its
                first; an equal stamp is a frame with no elapsed time.

        Raises ``ValueError`` for a non-finite stamp or embeddings that do not fit the segments.
        """
        stamp = self._check_stamp(stamp)
        f = self._frame(result, stamp)  # checks the inputs before any state changes
        first = self._last_stamp is None
        self._mean, self._cov = self.kf.predict(self._mean, self._cov, 0.0 if first else stamp - self._last_stamp)
        self._last_stamp = stamp
        if len(self):
            self._keep(stamp - self._last_seen <= self.max_age)
        f.matched = np.zeros(len(self), dtype=bool)
        high = np.flatnonzero(f.scores >= self.high_score)
        low = np.flatnonzero((f.scores >= self.low_score) & (f.scores < self.high_score))

        active = np.flatnonzero(self._state == CONFIRMED)
        left = self._match(f, active, high, reid=True)
        left = self._match(f, np.flatnonzero(self._state == LOST), left, reid=True)
        self._match(f, active[~f.matched[active]], low, reid=False, min_iou=self.low_min_iou, iou_only=True)
        left = self._match(f, np.flatnonzero(self._state == TENTATIVE), left, reid=False)

        self._correct(f, stamp)
        unmatched = ~f.matched
        self._state[unmatched & (self._state == CONFIRMED)] = LOST
        index = self._keep(~(unmatched & (self._state == TENTATIVE)))
        has = f.det_track >= 0
        f.det_track[has] = index[f.det_track[has]]  # matched tracks are never deleted here
        new = left[f.scores[left] >= self.new_track_score]
        f.det_track[new] = np.arange(len(self), len(self) + len(new))
        self._start_tracks(f, new, stamp, confirmed=first)
        self._confirm()

        segs = result.segments
        for s in segs:
            s.track_id = 0
        for k, i in enumerate(f.index.tolist()):
            t = f.det_track[k]
            if t >= 0 and self._state[t] == CONFIRMED:
                segs[i].track_id = int(self._tid[t])
        return result

    def _frame(self, result: PanopticResult, stamp: float) -> "_Frame":
        segs = result.segments
        index = np.asarray([i for i, s in enumerate(segs) if s.isthing], dtype=np.int64)
        n = len(index)
        boxes = np.asarray([segs[i].bbox for i in index], dtype=np.float64).reshape(n, 4)
        if n and self.box_trim > 0:
            area = np.asarray([segs[i].area for i in index], dtype=np.float64)
            sparse = np.flatnonzero(area < _SPARSE_FILL * boxes[:, 2] * boxes[:, 3])
            if len(sparse):
                boxes[sparse] = trimmed_boxes(result.id_map, [segs[index[j]].id for j in sparse], boxes[sparse],
                                              self.box_trim)
        seg_ids = np.asarray([segs[i].id for i in index], dtype=np.int64)
        cells = FrameCells(result.id_map) if (self.mask_iou and n) else None
        return _Frame(index=index, boxes=xywh_to_cxcywh(boxes),
                      cats=np.asarray([segs[i].category_id for i in index], dtype=np.int64),
                      scores=np.asarray([segs[i].score for i in index], dtype=np.float64),
                      emb=self._segment_embeddings(result, index), stamp=stamp,
                      cells=cells, seg_ids=seg_ids, seg_cells=cells.segment_cells(seg_ids) if cells else [],
                      det_track=np.full(n, -1, dtype=np.int64), matched=np.zeros(0, dtype=bool))

    def _check_stamp(self, stamp) -> float:
        try:
            stamp = float(stamp)
        except (TypeError, ValueError):
            raise ValueError(f"stamp must be a time in seconds, got {quote(stamp)}") from None
        if not math.isfinite(stamp):
            raise ValueError(f"stamp must be finite, got {quote(stamp)}")
        if self._last_stamp is not None and stamp < self._last_stamp:
            logger.warning("stamp %.6f is older than the previous frame's %.6f: tracks reset (new run)",
                           stamp, self._last_stamp)
            self.reset()
        return stamp

    def _segment_embeddings(self, result: PanopticResult, thing_idx: np.ndarray) -> np.ndarray | None:
        if self.association != "embedding":
            return None
        e = result.embeddings
        if e is None:
            if len(thing_idx) == 0:
                return None
            raise ValueError("association='embedding' needs result.embeddings (call the predictor with "
                             "return_embeddings=True); or use association='iou'")
        e = np.asarray(e)
        if e.ndim != 2 or e.shape[0] != len(result.segments):
            raise ValueError(f"result.embeddings must be (len(segments), D) = ({len(result.segments)}, D), "
                             f"got {e.shape}")
        if self._feat is not None and len(self._feat) and self._feat.shape[1] != e.shape[1]:
            raise ValueError(f"embedding dimension changed from {self._feat.shape[1]} to {e.shape[1]}; "
                             f"reset() the tracker when the model changes")
        e = e[thing_idx].astype(np.float32)
        norm = np.linalg.norm(e, axis=1, keepdims=True)
        return e / np.maximum(norm, 1e-12)

    def _pair_costs(self, f: "_Frame", tracks: np.ndarray, dets: np.ndarray, reid: bool, min_iou: float,
                    iou_only: bool) -> tuple[np.ndarray, np.ndarray]:
        """Cost (Eq. T1) and allowed-pair (Eq. T2) matrices ``(len(tracks), len(dets))``."""
        iou = box_iou_cxcywh(self._mean[tracks, :4], f.boxes[dets])
        same = self._cat[tracks][:, None] == f.cats[dets][None, :]
        if f.cells is not None:
            miou, valid = mask_iou_matrix([self._cells[t] for t in tracks.tolist()],
                                          self._mean[tracks, :2] - self._cell_centre[tracks], f.cells, f.seg_ids[dets])
            iou = np.where(valid, miou, iou)
        if iou_only or f.emb is None or self._feat is None:
            return 1.0 - iou, same & (iou >= min_iou)
        dist = 1.0 - self._feat[tracks] @ f.emb[dets].T
        cost = self.iou_weight * (1.0 - iou) + (1.0 - self.iou_weight) * np.minimum(
            dist / max(self.max_embedding_distance, 1e-6), 1.0)
        allowed = (iou >= min_iou) & (dist <= self.max_embedding_distance)
        if reid:  # Eq. T2: the same appearance within reach of the last sighting, whatever the IoU
            allowed |= (dist <= self.reid_distance) & self._within_reach(tracks, f.boxes[dets], f.stamp)
        return cost, same & allowed

    def _within_reach(self, tracks: np.ndarray, boxes: np.ndarray, stamp: float) -> np.ndarray:
        """Eq. T2: ``|c - c_last| <= s_last (1 + reid_speed (stamp - last_seen))`` for every
        (track, box) pair: the centre ``c`` of the box is no farther from the track's last matched
        centre than the thing could have moved at ``reid_speed`` box sides per second
        (``s_last``: the larger side of the last matched box). ``(len(tracks), len(boxes))`` bool."""
        last = self._last_box[tracks]
        reach = np.maximum(last[:, 2], last[:, 3]) * (1.0 + self.reid_speed * (stamp - self._last_seen[tracks]))
        d2 = ((boxes[None, :, :2] - last[:, None, :2]) ** 2).sum(axis=2)
        return d2 <= (reach ** 2)[:, None]

    def _match(self, f: "_Frame", tracks: np.ndarray, dets: np.ndarray, reid: bool, min_iou: float | None = None,
               iou_only: bool = False) -> np.ndarray:
        """One association round; records the matches in ``f``; returns the segments left."""
        if len(tracks) == 0 or len(dets) == 0:
            return dets
        cost, allowed = self._pair_costs(f, tracks, dets, reid, self.min_iou if min_iou is None else min_iou,
                                         iou_only)
        r, c = _assign(cost, allowed)
        f.det_track[dets[c]] = tracks[r]
        f.matched[tracks[r]] = True
        left = np.ones(len(dets), dtype=bool)
        left[c] = False
        return dets[left]

    def _correct(self, f: "_Frame", stamp: float) -> None:
        dets = np.flatnonzero(f.det_track >= 0)
        if len(dets) == 0:
            return
        t = f.det_track[dets]
        self._mean[t], self._cov[t] = self.kf.correct(self._mean[t], self._cov[t], f.boxes[dets])
        self._last_box[t] = f.boxes[dets]
        self._hits[t] += 1
        self._last_seen[t] = stamp
        self._state[t[self._state[t] == LOST]] = CONFIRMED
        if f.emb is not None and self._feat is not None:
            confident = f.scores[dets] >= self.high_score  # round-2 matches keep their appearance
            tc, dc = t[confident], dets[confident]
            v = self.embedding_momentum * self._feat[tc] + (1 - self.embedding_momentum) * f.emb[dc]
            self._feat[tc] = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        if f.cells is not None:
            for ti, di in zip(t.tolist(), dets.tolist()):
                self._cells[ti] = f.seg_cells[di]
            self._cell_centre[t] = self._mean[t, :2]

    def _start_tracks(self, f: "_Frame", new: np.ndarray, stamp: float, confirmed: bool) -> None:
        if len(new) == 0:
            return
        mean, cov = self.kf.initiate(f.boxes[new])
        self._mean = np.concatenate([self._mean, mean])
        self._cov = np.concatenate([self._cov, cov])
        self._last_box = np.concatenate([self._last_box, f.boxes[new]])
        self._cat = np.concatenate([self._cat, f.cats[new]])
        self._state = np.concatenate([self._state, np.full(len(new), CONFIRMED if confirmed else TENTATIVE,
                                                           dtype=np.int8)])
        self._hits = np.concatenate([self._hits, np.ones(len(new), dtype=np.int64)])
        self._last_seen = np.concatenate([self._last_seen, np.full(len(new), stamp)])
        self._tid = np.concatenate([self._tid, np.zeros(len(new), dtype=np.int64)])
        if f.emb is not None:
            self._feat = f.emb[new].copy() if self._feat is None or len(self._feat) == 0 \
                else np.concatenate([self._feat, f.emb[new]])
        if self.mask_iou:
            self._cells.extend(f.seg_cells[i] for i in new.tolist())
            self._cell_centre = np.concatenate([self._cell_centre, f.boxes[new, :2]])

    def _confirm(self) -> None:
        """Tentative tracks with ``min_hits`` hits (and tracks started confirmed) get their public id."""
        self._state[(self._state == TENTATIVE) & (self._hits >= self.min_hits)] = CONFIRMED
        need = np.flatnonzero((self._state != TENTATIVE) & (self._tid == 0))
        self._tid[need] = np.arange(self._next_id, self._next_id + len(need))
        self._next_id += len(need)
