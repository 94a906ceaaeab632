"""Video metrics against hand-computed cases (tiny id maps; every expected value is derived in a comment)."""

import math

import numpy as np
import pytest

from ciae_core.evaluation import EvaluationError
from ciae_core.structures import CategoryInfo, PanopticResult, Segment
from ciae_core.video_metrics import VideoEvaluator, format_video_table

A, B, S = 1, 2, 11
CATS = [CategoryInfo(A, "a", True), CategoryInfo(B, "b", True), CategoryInfo(S, "s", False)]
NAMES = {c.id: c for c in CATS}


def _pred(row, table):
    """``row``: predicted ids (one image row); ``table``: id -> (category, track_id)."""
    ids = np.asarray([row], dtype=np.int32)
    segs = []
    for i, (cat, track) in sorted(table.items()):
        area = int((ids == i).sum())
        segs.append(Segment(id=i, category_id=cat, label=NAMES[cat].name, isthing=NAMES[cat].isthing, score=0.9,
                            area=area, bbox=(0, 0, 1, 1), track_id=track))
    return PanopticResult(ids, segs)


def _gt(row, table):
    return np.asarray([row], dtype=np.int32), [{"id": i, "category_id": c, "iscrowd": 0} for i, c in table.items()]


def test_perfect_tracking_scores_one_everywhere():
    ev = VideoEvaluator(CATS, windows=(0, 1, 2))
    for t in range(3):
        row = [1] * t + [5, 5] + [1] * (4 - t)  # thing 5 moves right by one pixel per frame
        gt_ids, gt_segs = _gt(row, {1: S, 5: A})
        ev.add(gt_ids, gt_segs, _pred([3 if v == 1 else 8 for v in row], {3: (S, 0), 8: (A, 42)}))
    s = ev.summary()
    assert s["idf1"] == 1.0 and s["mota"] == 1.0 and s["id_switches"] == 0 and s["num_gt_tracks"] == 1
    assert s["vpq"] == 1.0 and set(s["per_k"]) == {0, 1, 2}
    assert [s["per_k"][k]["windows"] for k in (0, 1, 2)] == [3, 2, 1]
    assert s["stq"] == 1.0 and s["aq"] == 1.0 and s["sq"] == 1.0


def test_one_id_switch():
    # Ground truth: thing 5 (class A) on pixels 0-1 in frames 0..3, stuff elsewhere (perfectly predicted).
    # Prediction: the same masks, track 1 in frames 0-1, track 2 in frames 2-3 (m = 2 px per frame).
    ev = VideoEvaluator(CATS, windows=(0, 1, 3, 5))
    for t in range(4):
        gt_ids, gt_segs = _gt([5, 5, 1, 1], {1: S, 5: A})
        ev.add(gt_ids, gt_segs, _pred([7, 7, 3, 3], {3: (S, 0), 7: (A, 1 if t < 2 else 2)}))
    s = ev.summary()
    # MOT: matched every frame, one switch (frame 2). MOTA = 1 - 1/4. IDF1: gt 5 <-> track 1 gives
    # IDTP 2, IDFN 2, IDFP 2 (track 2) -> 2*2 / (2*2 + 2 + 2) = 0.5.
    assert s["id_switches"] == 1 and s["num_gt_tracks"] == 1 and s["idsw_per_100"] == 100.0
    assert s["mota"] == pytest.approx(0.75) and s["idf1"] == pytest.approx(0.5)
    # VPQ (stuff always 1): k=0 all TP -> 1. k=1: windows (0,1), (2,3) TP IoU 1; window (1,2): the gt
    # tube (4 px) against two 2-px pred tubes, IoU 0.5 each (not > 0.5): FN 1, FP 2 ->
    # PQ_A = 2 / (2 + 1 + 0.5) = 4/7, VPQ^1 = (4/7 + 1)/2. k=3: one window: FN 1, FP 2 -> PQ_A = 0,
    # VPQ^3 = 1/2. k=5 does not fit 4 frames and is left out.
    assert set(s["per_k"]) == {0, 1, 3}
    assert s["per_k"][0]["vpq"] == pytest.approx(1.0)
    assert s["per_k"][1]["vpq"] == pytest.approx((4 / 7 + 1) / 2)
    assert s["per_k"][3]["vpq"] == pytest.approx(0.5)
    assert s["per_k"][3]["vpq_th"] == 0.0 and s["per_k"][3]["vpq_st"] == 1.0
    assert s["vpq"] == pytest.approx((1 + (4 / 7 + 1) / 2 + 0.5) / 3)
    # STQ: |g| = 8; tracks 1 and 2: TPA 4, IoU_id 4/8 each -> AQ = (4*0.5 + 4*0.5)/8 = 0.5; SQ = 1.
    assert s["aq"] == pytest.approx(0.5) and s["sq"] == pytest.approx(1.0)
    assert s["stq"] == pytest.approx(math.sqrt(0.5))
    assert ev.id_switches() == [(0, 2, 5)] and s["detection_f1"] == 1.0


def test_void_false_positive_and_partial_overlap():
    # gt:   S S S S A A A A . .    (S = id 1 stuff, A = id 5 class A, . = void)
    # pred: S S S A A A A A A B    (A = track 7 on pixels 3-8, B = track 9 (class B) on void)
    ev = VideoEvaluator(CATS, windows=(0,))
    gt_ids, gt_segs = _gt([1, 1, 1, 1, 5, 5, 5, 5, 0, 0], {1: S, 5: A})
    ev.add(gt_ids, gt_segs, _pred([1, 1, 1, 2, 2, 2, 2, 2, 2, 3], {1: (S, 0), 2: (A, 7), 3: (B, 9)}))
    s = ev.summary()
    # PQ: S IoU 3/(4+3-3) = 0.75; A IoU 4/(4+6-4-1 void) = 0.8; B lies on void: not a FP; B absent.
    assert s["per_k"][0]["vpq"] == pytest.approx((0.75 + 0.8) / 2)
    # MOT has no void rule: track 9 is a false positive. MOTA = 1 - 1/1 = 0; IDF1 = 2*1/(2*1+1+0).
    assert s["mota"] == pytest.approx(0.0) and s["idf1"] == pytest.approx(2 / 3)
    assert s["detection_f1"] == pytest.approx(2 / 3)  # 1 TP, 1 FP, 0 FN
    # AQ: |g| = 4, track 7 has 6 px (void and stuff pixels count), TPA 4: IoU_id = 4/6 -> AQ = 4*(4/6)/4.
    assert s["aq"] == pytest.approx(2 / 3)
    # SQ: IoU_S = 3/(4+3-3), IoU_A = 4/(4+5-4) (the prediction's void pixel 8 is ignored, pixel 3
    # counts); B has an empty union among non-void pixels and is left out.
    assert s["sq"] == pytest.approx((0.75 + 0.8) / 2)
    assert s["stq"] == pytest.approx(math.sqrt(2 / 3 * 0.775))


def test_untracked_things_are_one_frame_tubes_and_not_reported_tracks():
    # Two frames, thing 5 perfectly segmented but never confirmed (track_id 0).
    ev = VideoEvaluator(CATS, windows=(0, 1))
    for _ in range(2):
        gt_ids, gt_segs = _gt([5, 5, 1, 1], {1: S, 5: A})
        ev.add(gt_ids, gt_segs, _pred([2, 2, 1, 1], {1: (S, 0), 2: (A, 0)}))
    s = ev.summary()
    # k=0: image PQ counts the segment (1). k=1: the gt tube (4 px) against two 2-px one-frame tubes:
    # FN 1, FP 2 -> PQ_A 0, VPQ^1 = 1/2. MOT: the thing is missed twice. AQ: no predicted track -> 0.
    assert s["per_k"][0]["vpq"] == 1.0 and s["per_k"][1]["vpq"] == pytest.approx(0.5)
    assert s["mota"] == 0.0 and s["idf1"] == 0.0 and s["num_misses"] == 2
    assert s["aq"] == 0.0 and s["sq"] == 1.0 and s["stq"] == 0.0


def test_association_is_class_agnostic_in_stq_but_not_in_mot_or_vpq():
    ev = VideoEvaluator(CATS, windows=(0,))
    gt_ids, gt_segs = _gt([5, 5, 1, 1], {1: S, 5: A})
    ev.add(gt_ids, gt_segs, _pred([2, 2, 1, 1], {1: (S, 0), 2: (B, 3)}))  # right mask, wrong class
    s = ev.summary()
    assert s["aq"] == 1.0  # the pixels are associated perfectly
    assert s["sq"] == pytest.approx(1 / 3)  # IoU_A = 0, IoU_B = 0, IoU_S = 1
    assert s["idf1"] == 0.0 and s["mota"] == pytest.approx(-1.0)  # 1 miss + 1 false positive over 1 object
    assert s["per_k"][0]["vpq_th"] == 0.0 and s["per_k"][0]["vpq_st"] == 1.0


def test_sequences_are_separate():
    # The same track id in two sequences is two tracks; windows never span the sequences.
    ev = VideoEvaluator(CATS, windows=(0, 1))
    for seq in range(2):
        ev.begin_sequence()
        gt_id = 5 if seq == 0 else 6
        gt_ids, gt_segs = _gt([gt_id, 1], {1: S, gt_id: A})
        ev.add(gt_ids, gt_segs, _pred([2, 1], {1: (S, 0), 2: (A, 1)}))
    s = ev.summary()
    assert s["num_sequences"] == 2 and s["num_gt_tracks"] == 2 and s["id_switches"] == 0
    assert 1 not in s["per_k"] and s["vpq"] == 1.0 and s["stq"] == 1.0


def test_bad_inputs_are_one_line_errors():
    ev = VideoEvaluator(CATS)
    gt_ids, gt_segs = _gt([5, 1], {1: S, 5: A})
    with pytest.raises(EvaluationError, match="ground truth is"):
        ev.add(np.zeros((2, 2), np.int32), gt_segs, _pred([2, 1], {1: (S, 0), 2: (A, 1)}))
    with pytest.raises(EvaluationError, match="same track_id"):
        ev.add(np.asarray([[5, 6]], np.int32), gt_segs + [{"id": 6, "category_id": A}],
               _pred([2, 3], {2: (A, 1), 3: (A, 1)}))
    ev = VideoEvaluator(CATS)
    ev.add(gt_ids, gt_segs, _pred([2, 1], {1: (S, 0), 2: (A, 1)}))
    with pytest.raises(EvaluationError, match="changed its category"):
        ev.add(gt_ids, [{"id": 1, "category_id": S}, {"id": 5, "category_id": B}], _pred([2, 1], {1: (S, 0), 2: (A, 1)}))
    with pytest.raises(EvaluationError, match="not in its segments"):
        ev.add(np.asarray([[5, 9]], np.int32), gt_segs, _pred([2, 1], {1: (S, 0), 2: (A, 1)}))
    with pytest.raises(ValueError, match="windows"):
        VideoEvaluator(CATS, windows=(-1,))


def test_table_lists_the_metrics():
    ev = VideoEvaluator(CATS, windows=(0,))
    gt_ids, gt_segs = _gt([5, 1], {1: S, 5: A})
    ev.add(gt_ids, gt_segs, _pred([2, 1], {1: (S, 0), 2: (A, 1)}))
    text = format_video_table(ev.summary())
    for name in ("IDF1", "MOTA", "VPQ", "STQ", "ID switches", "VPQ k=0"):
        assert name in text
