"""SegmentTracker on scripted scenes (hand-made id maps) and its Kalman filter.

Scripted embeddings follow what the shipped model's mean segment embeddings do on synthetic
sequences (measured on TrackingSequence seeds 2001-2005 with models/ciae_synthetic_small): the same
thing in consecutive frames is at cosine distance d ~ 0.003 (95 % below 0.013), the same thing
30 frames apart at d ~ 0.1 (a slow drift), two different things of one class at d ~ 0.13 (look-alike
pairs ~ 0.06-0.1). Here a thing's embedding is its base vector plus a drift of d ~ 0.1 per 30
frames plus per-frame noise of d ~ 0.003; look-alikes' bases are d ~ 0.08 apart.
"""

import logging
import math

import numpy as np
import pytest

from ciae_core.structures import PanopticResult, segments_from_id_map
from ciae_core.tracking import SegmentTracker

FPS = 30.0
D = 32
H, W = 120, 320
META = {1: (11, "sky", False, 0.9)}


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class Thing:
    """A rectangle ``size`` px wide moving along ``path(t) -> (x, y)`` (top-left corner)."""

    def __init__(self, path, size=24, category=1, score=0.9, look=None):
        self.path, self.size, self.category, self.score, self.look = path, size, category, score, look


def _looks(seed, n, lookalike_d=0.08):
    """Base appearance, drift direction and noise generator of ``n`` look-alikes."""
    rng = np.random.default_rng(seed)
    common = _unit(rng.normal(size=D))
    a = math.sqrt(lookalike_d / (1 - lookalike_d))
    return [(_unit(common + a * _unit(rng.normal(size=D))), _unit(rng.normal(size=D)), rng) for _ in range(n)]


def _embedding(look, t):
    base, drift, rng = look
    v = base + 0.0145 * t * drift  # d ~ (0.0145 t)^2 / 2: ~0.1 after 30 frames
    return _unit(_unit(v) + 0.055 * _unit(rng.normal(size=D)))  # d ~ 0.003 between two frames


def render(things, t, min_visible=0.3, shape=(H, W)):
    """Frame ``t``: later things in front; a thing with less than ``min_visible`` visible is not
    segmented (the detector misses it). Returns the result and ``{segment id: thing index}``."""
    id_map = np.ones(shape, dtype=np.int32)  # stuff everywhere
    full = {}
    for k, th in enumerate(things):
        x, y = (int(round(v)) for v in th.path(t))
        canvas = np.zeros(shape, dtype=bool)
        canvas[max(y, 0):max(y + th.size, 0), max(x, 0):max(x + th.size, 0)] = True
        full[k] = canvas.sum()
        id_map[canvas] = 2 + k
    meta, owner = dict(META), {}
    for k, th in enumerate(things):
        visible = (id_map == 2 + k).sum()
        if visible == 0 or visible < min_visible * th.size ** 2:
            id_map[id_map == 2 + k] = 1
            continue
        meta[2 + k] = (th.category, "thing", True, th.score)
        owner[2 + k] = k
    segs = segments_from_id_map(id_map, meta)
    emb = np.stack([_embedding(things[owner[s.id]].look, t) if s.isthing else np.eye(D)[0] for s in segs])
    return PanopticResult(id_map, segs, embeddings=emb.astype(np.float32)), owner


def run(tracker, things, frames, stamps=None):
    """Track ``frames``; returns ``{thing index: [track ids per frame it was segmented in]}``."""
    ids = {k: [] for k in range(len(things))}
    for i, t in enumerate(frames):
        result, owner = render(things, t)
        tracker.update(result, t / FPS if stamps is None else stamps[i])
        for s in result.segments:
            if s.isthing:
                ids[owner[s.id]].append(s.track_id)
            else:
                assert s.track_id == 0
    return ids


def confirmed(ids):
    return [i for i in ids if i > 0]


# --------------------------------------------------------------------------------------------

def test_crossing_with_occlusion():
    """Two look-alikes of one class cross; b passes behind a and is hidden for 6 frames.

    While a covers more and more of b, b's visible part (all a detector segments) recedes
    against b's motion, so the filter's velocity for b is wrong when b is hidden: IoU-only
    association does not find b again and gives it a new id; the embedding keeps both ids.
    """
    la, lb = _looks(1, 2)
    a = Thing(lambda t: (40 + 2.0 * t, 44), size=36, look=la)
    b = Thing(lambda t: (250 - 2.5 * t, 50), size=24, look=lb)
    frames = range(80)
    hidden = [t for t in frames if 0 not in render([b, a], t)[1].values()]  # b first = behind
    assert hidden == list(range(43, 49))
    by_emb = run(SegmentTracker("embedding"), [b, a], frames)
    assert len(set(by_emb[0])) == 1 and len(set(by_emb[1])) == 1 and by_emb[0][0] != by_emb[1][0]
    by_iou = run(SegmentTracker("iou"), [b, a], frames)
    assert len(set(by_iou[1])) == 1 and len(set(confirmed(by_iou[0]))) == 2
    assert by_iou[0][0] == 1 and confirmed(by_iou[0])[-1] != 1


def test_turning_back_behind_a_look_alike():
    """b walks behind a, turns round while hidden and comes back out on its own side.

    The motion prediction carries b's track on through a; only the appearance can tell that the
    thing coming back is b. IoU-only association gives it a new id; the embedding keeps it.
    """
    la, lb = _looks(2, 2)
    a = Thing(lambda t: (150, 50), size=30, look=la)  # standing still, in front

    def path_b(t):  # 4 px/frame to the right, turns at t = 20 (behind a), back at 4 px/frame
        return (80 + 4 * min(t, 20) - 4 * max(t - 20, 0), 52)

    b = Thing(path_b, look=lb)
    frames = range(45)
    hidden = [t for t in frames if 0 not in render([b, a], t)[1].values()]
    assert hidden and hidden[0] > 10 and hidden[-1] < 35
    by_iou = run(SegmentTracker("iou"), [b, a], frames)
    by_emb = run(SegmentTracker("embedding"), [b, a], frames)
    assert len(set(confirmed(by_iou[0]))) == 2  # before and after: two ids for b
    assert len(set(by_emb[0])) == 1 and len(set(by_emb[1])) == 1 and by_emb[0][0] != by_emb[1][0]


def test_bounce_off_a_border_keeps_the_id_with_the_embedding():
    # A fast thing (0.45 sides per frame) bounces off the right border: for a frame the prediction
    # overshoots by twice its speed.
    (look,) = _looks(3, 1)
    th = Thing(lambda t: (200 + 11 * t if t <= 8 else 288 - 11 * (t - 8), 40), look=look)
    by_emb = run(SegmentTracker("embedding"), [th], range(20))
    assert len(set(by_emb[0])) == 1


def test_frame_gap_is_bridged_by_the_stamps():
    # 150 px/s; frames 0-9, then 9 frames dropped (the node took the newest), then 19-25.
    th = Thing(lambda t: (20 + 5 * t, 40), look=_looks(4, 1)[0])
    frames = list(range(10)) + list(range(19, 26))
    ids = run(SegmentTracker("iou"), [th], frames)
    assert len(set(ids[0])) == 1
    # The same frames stamped as if they were consecutive: the motion model is 9 frames behind.
    ids = run(SegmentTracker("iou"), [th], frames, stamps=[i / FPS for i in range(len(frames))])
    assert len(set(confirmed(ids[0]))) == 2


def test_time_going_backwards_resets_and_ids_are_never_reused(caplog):
    la, lb = _looks(5, 2)
    things = [Thing(lambda t: (40, 40), look=la), Thing(lambda t: (200, 40), look=lb, category=2)]
    tracker = SegmentTracker("embedding")
    first = run(tracker, things, range(5))
    assert sorted({first[0][-1], first[1][-1]}) == [1, 2]
    with caplog.at_level(logging.WARNING, logger="ciae_core.tracking"):
        result, owner = render(things, 0)
        tracker.update(result, 0.01)  # older than the last frame (4/30 s)
    assert "older than the previous frame" in caplog.text
    assert sorted(s.track_id for s in result.segments if s.isthing) == [3, 4]  # a new run, new ids
    assert len(tracker) == 2
    tracker.update(render(things, 0)[0], 0.01)  # the same stamp again: no elapsed time, no reset
    tracker.reset()
    assert len(tracker) == 0
    result = tracker.update(render(things, 1)[0], 0.0)
    assert sorted(s.track_id for s in result.segments if s.isthing) == [5, 6]


def test_empty_and_stuff_only_frames_and_max_age():
    (look,) = _looks(6, 1)
    th = Thing(lambda t: (60, 40), look=look)
    tracker = SegmentTracker("embedding", max_age=0.5, min_hits=2)
    t = 0
    for t in range(3):
        tracker.update(render([th], t)[0], t / FPS)
    empty = PanopticResult(np.zeros((H, W), np.int32), [], embeddings=None)
    stuff_only = PanopticResult(np.ones((H, W), np.int32), segments_from_id_map(np.ones((H, W), np.int32), META),
                                embeddings=np.eye(D, dtype=np.float32)[:1])
    assert tracker.update(empty, 3 / FPS) is empty and tracker.update(stuff_only, 4 / FPS) is stuff_only
    assert [x.state for x in tracker.tracks()] == ["lost"]
    tid = tracker.update(render([th], 5)[0], 5 / FPS)
    assert [s.track_id for s in tid.segments if s.isthing] == [1]  # back within max_age: same id
    for k in range(6, 30):  # 0.8 s without it: deleted
        tracker.update(empty, k / FPS)
    assert len(tracker) == 0
    back = tracker.update(render([th], 30)[0], 30 / FPS)
    assert [s.track_id for s in back.segments if s.isthing] == [0]  # a new, tentative track
    back = tracker.update(render([th], 31)[0], 31 / FPS)
    assert [s.track_id for s in back.segments if s.isthing] == [2]


def test_tentative_tracks_take_no_id():
    la, lb = _looks(7, 2)
    steady = Thing(lambda t: (40, 40), look=la)
    flash = Thing(lambda t: (200, 40), look=lb)
    tracker = SegmentTracker("embedding", min_hits=2)
    run(tracker, [steady], range(3))
    blink = run(tracker, [steady, flash], [3])  # one frame only
    assert blink[1] == [0] and blink[0] == [1]
    later = run(tracker, [steady], range(4, 6))
    twice = run(tracker, [steady, Thing(lambda t: (120, 40), look=lb)], [6, 7])
    assert later[0] == [1, 1] and twice[1] == [0, 2]  # ids count confirmed tracks only: no gap


def test_association_never_crosses_categories():
    la, lb = _looks(8, 2)
    th = Thing(lambda t: (60, 40), look=la)
    tracker = SegmentTracker("embedding", min_hits=2)
    run(tracker, [th], range(3))
    th.category = 2  # the class flips: it is another thing for the tracker
    ids = run(tracker, [th], range(3, 6))
    assert ids[0] == [0, 2, 2]


def test_low_score_segments_keep_tracks_but_start_none():
    la, lb = _looks(9, 2)
    th = Thing(lambda t: (40 + 2 * t, 40), look=la)
    dim = Thing(lambda t: (220, 40), look=lb, score=0.3)
    tracker = SegmentTracker("embedding", high_score=0.5, low_score=0.1, new_track_score=0.6)
    ids = run(tracker, [th, dim], range(4))
    th.score = 0.3  # partly occluded, say: round 2 keeps it on its track by IoU
    ids2 = run(tracker, [th, dim], range(4, 8))
    assert set(ids[0] + ids2[0]) == {1} and set(ids[1] + ids2[1]) == {0}


def test_bad_arguments_and_inputs():
    for kwargs, word in (({"association": "color"}, "association"), ({"min_hits": 0}, "min_hits"),
                         ({"min_hits": 1.5}, "min_hits"), ({"max_age": -1.0}, "max_age"),
                         ({"min_iou": 1.5}, "min_iou"), ({"high_score": 0.9}, "high_score <= new_track_score"),
                         ({"reid_distance": 3.0}, "reid_distance"), ({"motion_noise": 0}, "motion_noise"),
                         ({"box_trim": 0.4}, "box_trim"), ({"mask_iou": 1}, "mask_iou")):
        with pytest.raises(ValueError, match=word) as err:
            SegmentTracker(**kwargs)
        assert "\n" not in str(err.value)
    tracker = SegmentTracker("embedding")
    result, _ = render([Thing(lambda t: (40, 40), look=_looks(10, 1)[0])], 0)
    with pytest.raises(ValueError, match="finite"):
        tracker.update(result, float("nan"))
    with pytest.raises(ValueError, match="seconds"):
        tracker.update(result, "noon")
    tracker.update(result, 0.0)
    before = tracker.tracks()
    bad = PanopticResult(result.id_map, result.segments, embeddings=result.embeddings[:1])
    with pytest.raises(ValueError, match="len\\(segments\\)"):
        tracker.update(bad, 5.0)  # 5 s later: would delete the track if it were taken
    assert tracker.tracks() == before  # a refused frame changes nothing
    with pytest.raises(ValueError, match="return_embeddings"):
        tracker.update(PanopticResult(result.id_map, result.segments), 0.0)
    # IoU-only association needs no embeddings.
    out = SegmentTracker("iou").update(PanopticResult(result.id_map, result.segments), 0.0)
    assert [s.track_id for s in out.segments if s.isthing] == [1]


def test_mask_iou_mode_tracks_the_crossing():
    la, lb = _looks(1, 2)
    a = Thing(lambda t: (40 + 2.0 * t, 44), size=36, look=la)
    b = Thing(lambda t: (250 - 2.5 * t, 50), size=24, look=lb)
    ids = run(SegmentTracker("embedding", mask_iou=True), [b, a], range(80))
    assert len(set(ids[0])) == 1 and len(set(ids[1])) == 1 and ids[0][0] != ids[1][0]


def test_tracks_snapshot():
    tracker = SegmentTracker("iou")
    run(tracker, [Thing(lambda t: (40 + t, 40), look=_looks(12, 1)[0])], range(3))
    (info,) = tracker.tracks()
    assert info.track_id == 1 and info.state == "confirmed" and info.hits == 3 and info.category_id == 1
    assert info.box[0] == pytest.approx(40 + 2 + 12, abs=1.5) and info.last_seen == pytest.approx(2 / FPS)


def test_stray_pixels_do_not_stretch_the_track():
    # In one frame the segment of a thing also owns a pixel far away (as the fusion sometimes
    # leaves): its tight box is 7x taller, the track's box is not.
    (look,) = _looks(13, 1)
    th = Thing(lambda t: (40 + 2 * t, 20), size=30, look=look)
    tracker = SegmentTracker("iou")
    run(tracker, [th], range(5))
    result, owner = render([th], 5)
    (seg,) = [s for s in result.segments if s.isthing]
    result.id_map[115, 45] = seg.id
    result.segments = segments_from_id_map(result.id_map, {1: META[1], seg.id: (1, "thing", True, 0.9)})
    assert result.segments[1].bbox[3] > 90
    tracker.update(result, 5 / FPS)
    assert result.segments[1].track_id == 1
    (info,) = tracker.tracks()
    assert info.box[3] == pytest.approx(30, abs=3) and info.box[1] == pytest.approx(35, abs=3)
    assert SegmentTracker("iou", box_trim=0.0).box_trim == 0.0
