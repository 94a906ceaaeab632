"""ciae_ros.node_tracking: the node's per-camera trackers, reset rules and counters, without DDS
(the node over DDS, across processes, is tested in test_node.py).

Frames are hand-made: squares of one thing category moving across an id map, each with its own
unit embedding (a fixed random direction, as the shipped model's segment embeddings are nearly
constant for one thing over a few frames).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ciae_core.structures import PanopticResult, segments_from_id_map
from ciae_ros.node_params import SPECS
from ciae_ros.node_tracking import RESET_REASONS, NodeTracking

H, W, D = 120, 200, 16
LOOKS = np.linalg.qr(np.random.default_rng(0).normal(size=(D, D)))[0]  # orthonormal rows: distinct things


def defaults(**over) -> dict:
    values = {name: spec.default for name, spec in SPECS.items()}
    values.update(over)
    return values


def frame(t: int, n: int = 2, embeddings: bool = True) -> PanopticResult:
    """``n`` 20x20 squares moving 3 px per frame to the right, 40 px apart, on stuff (id 1)."""
    id_map = np.ones((H, W), np.int32)
    meta = {1: (11, "sky", False, 0.9)}
    for k in range(n):
        x, y = 10 + 3 * t, 10 + 40 * k
        id_map[y:y + 20, x:x + 20] = 2 + k
        meta[2 + k] = (1, "disc", True, 0.9)
    segs = segments_from_id_map(id_map, meta)
    emb = np.stack([LOOKS[0] if not s.isthing else LOOKS[s.id] for s in segs]).astype(np.float32)
    return PanopticResult(id_map=id_map, segments=segs, embeddings=emb if embeddings else None)


def header(t: float, frame_id: str = "cam") -> SimpleNamespace:
    sec = int(t)
    return SimpleNamespace(stamp=SimpleNamespace(sec=sec, nanosec=int(round((t - sec) * 1e9))), frame_id=frame_id)


def track_ids(result: PanopticResult) -> list[int]:
    return [s.track_id for s in result.segments if s.isthing]


def values_of(tracking: NodeTracking, key) -> dict:
    return dict(tracking.camera_values(key))


def run(tracking, key, t0: int, frames: int, frame_id: str = "cam", start: float = 100.0, **kw):
    """Frames ``t0 .. t0+frames-1`` at 10 Hz; the thing track ids of each."""
    return [track_ids(tracking.update(key, frame(t, **kw), header(start + 0.1 * t, frame_id)))
            for t in range(t0, t0 + frames)]


def test_things_keep_their_track_id_and_stuff_has_none():
    tr = NodeTracking(defaults())
    out = run(tr, 0, 0, 8)
    assert out[0] == [1, 2], "the first frame of a run confirms its tracks at once"
    assert all(ids == [1, 2] for ids in out), out
    res = tr.update(0, frame(8), header(100.8))
    assert [s.track_id for s in res.segments if not s.isthing] == [0]
    v = values_of(tr, 0)
    assert (v["tracking"], v["tracks_confirmed"], v["track_ids_issued"]) == ("on", "2", "2")
    assert all(v[f"tracking_resets_{r}"] == "0" for r in RESET_REASONS)


def test_frame_id_change_and_time_backwards_reset_counted_ids_never_reused():
    tr = NodeTracking(defaults())
    assert run(tr, 0, 0, 3)[-1] == [1, 2]
    # another camera behind the same topic: new tracks, new ids
    assert run(tr, 0, 3, 3, frame_id="other_cam")[0] == [3, 4]
    # a bag replayed from its start: the stamps jump back
    assert run(tr, 0, 0, 3, frame_id="other_cam")[0] == [5, 6]
    # an equal stamp is no reset; a gap forwards only ages tracks (here within max_age: same ids)
    res = tr.update(0, frame(2), header(100.2, "other_cam"))
    assert track_ids(res) == [5, 6]
    assert track_ids(tr.update(0, frame(12), header(101.2, "other_cam"))) == [5, 6]
    v = values_of(tr, 0)
    assert (v["tracking_resets_frame_id"], v["tracking_resets_time_backwards"]) == ("1", "1")
    assert v["track_ids_issued"] == "6"


def test_reset_warnings_are_given_with_a_reason():
    said = []
    tr = NodeTracking(defaults(), warn=lambda key, text: said.append((key, text)))
    run(tr, "cam_a", 0, 2)
    run(tr, "cam_a", 0, 1)
    run(tr, "cam_a", 1, 1, frame_id="x")
    assert [k for k, _ in said] == ["tracking:time_backwards:cam_a", "tracking:frame_id:cam_a"]
    assert "older than the previous" in said[0][1] and "frame_id changed from 'cam' to 'x'" in said[1][1]


def test_cameras_have_their_own_trackers():
    tr = NodeTracking(defaults())
    a = run(tr, 0, 0, 3)
    b = run(tr, 1, 0, 3, n=1, frame_id="cam2")
    assert a[-1] == [1, 2] and b[-1] == [1]
    # camera 1's frame_id differs from camera 0's: that is no reset of either
    assert values_of(tr, 0)["tracking_resets_frame_id"] == values_of(tr, 1)["tracking_resets_frame_id"] == "0"
    tr.reset_all("model")
    assert values_of(tr, 0)["tracking_resets_model"] == values_of(tr, 1)["tracking_resets_model"] == "1"
    assert values_of(tr, 7)["tracking_resets_model"] == "0", "a camera never seen has nothing to reset"
    assert tr.totals() == {"tracks": 3, "resets": {"model": 2}}
    assert run(tr, 0, 3, 1)[0] == [3, 4]


def test_tracking_off_publishes_no_ids_and_on_again_starts_new_tracks():
    tr = NodeTracking(defaults())
    run(tr, 0, 0, 3)
    tr.configure(defaults(tracking=False))
    assert not tr.enabled and not tr.wants_embeddings
    assert run(tr, 0, 3, 3, embeddings=False) == [[0, 0]] * 3
    assert values_of(tr, 0)["tracking"] == "off" and values_of(tr, 0)["tracks_confirmed"] == "0"
    tr.configure(defaults())
    assert run(tr, 0, 6, 2) == [[3, 4]] * 2, "ids after switching back on are new ones"
    assert tr.totals()["resets"] == {}, "switching off is not counted as a reset"
    # off from the start
    off = NodeTracking(defaults(tracking=False))
    assert run(off, 0, 0, 2) == [[0, 0]] * 2 and off.totals() == {"tracks": 0, "resets": {}}


def test_threshold_changes_retune_live_tracks_structural_changes_reset_them():
    tr = NodeTracking(defaults())
    run(tr, 0, 0, 3)
    tr.configure(defaults(tracking_max_age=0.5, tracking_high_score=0.3, tracking_new_track_score=0.6))
    tracker = tr._cameras[0].tracker
    assert (tracker.max_age, tracker.high_score, tracker.new_track_score) == (0.5, 0.3, 0.6)
    assert run(tr, 0, 3, 2) == [[1, 2]] * 2, "a threshold change keeps the live tracks"
    # max_age now 0.5 s: a gap of 1 s deletes the tracks (not a reset: they aged out, and the new
    # ones are tentative for tracking_min_hits frames)
    assert run(tr, 0, 15, 3) == [[0, 0], [0, 0], [3, 4]]
    assert values_of(tr, 0)["tracking_resets_parameters"] == "0"
    tr.configure(defaults(tracking_association="iou"))
    assert not tr.wants_embeddings and tracker.association == "iou"
    assert values_of(tr, 0)["tracking_resets_parameters"] == "1"
    assert run(tr, 0, 16, 2, embeddings=False) == [[5, 6]] * 2
    tr.configure(defaults(tracking_association="iou", tracking_mask_iou=True))
    assert run(tr, 0, 18, 2, embeddings=False) == [[7, 8]] * 2
    assert values_of(tr, 0)["tracking_resets_parameters"] == "2"


def test_a_frame_computed_without_embeddings_before_the_switch_is_left_untracked():
    tr = NodeTracking(defaults(tracking_association="iou"))
    run(tr, 0, 0, 2, embeddings=False)
    tr.configure(defaults())  # embedding association from now on
    assert tr.wants_embeddings
    assert run(tr, 0, 2, 1, embeddings=False) == [[0, 0]], "the frame in flight is skipped, not an error"
    assert run(tr, 0, 3, 2) == [[3, 4]] * 2


def test_empty_frames_and_frames_without_things():
    tr = NodeTracking(defaults())
    empty = PanopticResult(id_map=np.zeros((H, W), np.int32), segments=[], embeddings=np.zeros((0, D), np.float32))
    assert tr.update(0, empty, header(1.0)).segments == []
    stuff_only = frame(0, n=0)
    assert tr.update(0, stuff_only, header(1.1)).segments[0].track_id == 0
    no_emb = PanopticResult(id_map=np.zeros((H, W), np.int32), segments=[], embeddings=None)
    tr.update(0, no_emb, header(1.2))
    assert run(tr, 0, 0, 1, start=1.3)[0] == [0, 0], "tracks after frames without things start tentative"
    assert run(tr, 0, 1, 2, start=1.3)[-1] == [1, 2]


def test_invalid_settings_are_refused_at_construction_and_by_settings_error():
    from ciae_ros.node_params import settings_error

    bad = defaults(tracking_low_score=0.6)
    err = settings_error(bad)
    assert err and "tracking_low_score" in err and "tracking_new_track_score" in err and "low_score," not in err
    with pytest.raises(ValueError):
        NodeTracking(bad)
    tr = NodeTracking(defaults())
    with pytest.raises(ValueError):
        tr.configure(defaults(tracking_max_age=0.0))
    assert tr._cameras == {} and tr.enabled


def test_diagnostic_status_values_are_appended():
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

    tr = NodeTracking(defaults())
    run(tr, 0, 0, 2)
    statuses = [DiagnosticStatus(name="cam0", values=[KeyValue(key="frames_received", value="2")]),
                DiagnosticStatus(name="cam1")]
    tr.annotate(statuses, [0, 1])
    got = [{kv.key: kv.value for kv in st.values} for st in statuses]
    assert got[0]["frames_received"] == "2" and got[0]["track_ids_issued"] == "2"
    assert got[1]["track_ids_issued"] == "0" and got[1]["tracking"] == "on"


def test_tracking_time_is_recorded_per_frame():
    from ciae_ros.node_diagnostics import StageTimes

    times = StageTimes()
    tr = NodeTracking(defaults(), times=times)
    run(tr, 0, 0, 3)
    assert "tracking" in times.percentiles()
