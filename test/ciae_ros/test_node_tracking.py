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


def test_a_frame_the_tracker_refuses_is_published_untracked_and_counted():
    said = []
    tr = NodeTracking(defaults(), warn=lambda key, text: said.append(text))
    run(tr, 0, 0, 2)
    bad = frame(2)
    bad.embeddings = bad.embeddings[:1]  # fewer rows than segments
    assert track_ids(tr.update(0, bad, header(100.2))) == [0, 0]
    v = values_of(tr, 0)
    assert v["tracking_errors"] == "1" and "published without track ids" in said[-1]
    assert all(v[f"tracking_resets_{r}"] == "0" for r in RESET_REASONS)
    assert run(tr, 0, 3, 1) == [[1, 2]], "the tracks go on with the next frame"


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


# ----------------------------------------------------------------------------------------------
# the node across processes (namespace /trk): camera publisher process -> node process -> this client
# Frames go in lock-step (the next one only after the output of the last), so every frame is
# processed whatever the load, and the node's results do not depend on which frames it dropped.

NS = "/trk"
TOPIC = f"{NS}/camera/image_raw"
SEQ_SEED, SEQ_FRAMES = 5, 30
BASE = 5000.0  # stamps of the sequence: BASE + 0.1 t (10 Hz)


def _stamp(t: float) -> tuple[int, int]:
    sec = int(t)
    return sec, int(round((t - sec) * 1e9))


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
    """Frames 0..29 of a 640x480 TrackingSequence (look-alikes crossing, things leaving and coming
    back, speed changes) as .npy files for the publisher, with their ground truth."""
    from ciae_core.synth_video import TrackingSequence

    d = tmp_path_factory.mktemp("trk_frames")
    seq = TrackingSequence(SEQ_SEED, 480, 640, SEQ_FRAMES)
    frames = []
    for t in range(SEQ_FRAMES):
        image, gt, infos = seq.frame(t)
        np.save(d / f"{t}.npy", image)
        frames.append(SimpleNamespace(path=d / f"{t}.npy", image=image, gt=gt, infos=infos))
    np.save(d / "uniform.npy", np.full((480, 640, 3), 128, np.uint8))
    return SimpleNamespace(frames=frames, uniform=d / "uniform.npy")


@pytest.fixture(scope="module")
def trk(node_weights, tmp_path_factory):
    pytest.importorskip("rclpy")
    pytest.importorskip("ciae_ros.msg")
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from ciae_ros.msg import CategoryArray, PanopticSegments
    from ros_testing import Client, NodeProcess, Publisher

    client = Client("ciae_test_tracking_client")
    cats = client.subscribe(CategoryArray, f"{NS}/panoptic/categories",
                            QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                       durability=DurabilityPolicy.TRANSIENT_LOCAL))
    out = SimpleNamespace(client=client, cats=cats, segments=client.subscribe(PanopticSegments,
                                                                              f"{NS}/panoptic/segments"),
                          overlay=client.subscribe(Image, f"{NS}/panoptic/overlay"),
                          diag=client.subscribe(DiagnosticArray, "/diagnostics"), cam=None)
    node = NodeProcess(tmp_path_factory.mktemp("trk") / "node.log", node_weights,
                       params={"input_size": 320, "diagnostics_period": 0.5, "overlay": "'on'"},  # YAML: on = true
                       ros_args=["-r", f"__ns:={NS}"])
    out.node = node
    try:
        node.wait_ready(cats)
        out.cam = Publisher(TOPIC, reliability="reliable")
        assert out.cam.wait_subscribers(1, timeout=60) >= 1, node.log()[-3000:]
        yield out
    finally:
        if out.cam is not None:
            out.cam.close()
        rc = node.stop()
        client.close()
    assert rc == 0, node.log()[-3000:]


def _send(trk, path, t: float, frame_id: str = "trk_cam", timeout: float = 90.0):
    stamp = _stamp(t)
    trk.cam.rgb_file(path, stamp, frame_id=frame_id)
    msg = trk.segments.wait_for(lambda m: (m.header.stamp.sec, m.header.stamp.nanosec) == stamp, timeout=timeout)
    assert msg is not None, f"no output for the frame at {t} s\n{trk.node.log()[-3000:]}"
    return msg


def _diag_values(trk, predicate, timeout: float = 30.0) -> dict:
    from ros_testing import diagnostics_values

    def ok(m):
        v = diagnostics_values(m, TOPIC)
        return v is not None and predicate(v)
    msg = trk.diag.wait_for(ok, timeout=timeout, since=len(trk.diag))
    assert msg is not None, f"no /diagnostics for {TOPIC} as expected\n{trk.node.log()[-2000:]}"
    return diagnostics_values(msg, TOPIC)


def _things(msg) -> dict[int, tuple[int, int]]:
    """Segment id -> (track_id, category_id) of the message's things."""
    return {s.id: (s.track_id, s.category_id) for s in msg.segments if s.isthing}


def _matches(msg, gt: np.ndarray) -> dict[int, int]:
    """Ground-truth thing id -> the track id of the tracked segment covering it (mask IoU > 0.5)."""
    from ciae_ros.image_conversion import image_msg_to_array

    ids = image_msg_to_array(msg.id_image)
    out = {}
    for seg_id, (track, _) in _things(msg).items():
        if track == 0:
            continue
        mask = ids == seg_id
        g, n = np.unique(gt[mask], return_counts=True)
        k = int(np.argmax(n))
        if g[k] != 0 and n[k] / (mask.sum() + (gt == g[k]).sum() - n[k]) > 0.5:
            out[int(g[k])] = track
    return out


def _result_of(msg):
    from ciae_core.structures import Segment
    from ciae_ros.image_conversion import image_msg_to_array

    segs = [Segment(s.id, s.category_id, s.label, s.isthing, s.score, s.area,
                    (s.bbox.x_offset, s.bbox.y_offset, s.bbox.width, s.bbox.height), s.track_id) for s in msg.segments]
    return PanopticResult(id_map=image_msg_to_array(msg.id_image), segments=segs)


@pytest.mark.ros
def test_node_keeps_track_ids_over_a_moving_sequence_across_processes(trk, sequence):
    """640x480 frames of a moving synthetic sequence from a camera process: a thing keeps its
    track id over consecutive outputs (judged against the sequence's ground-truth ids), ids are
    given in order and never to a second thing category, a frame with no segment at all and an
    empty (0x0) frame in the middle do not stop the node nor the tracks, and the overlay is drawn
    from the tracked result (labels 'label #track_id', colours by track)."""
    from ciae_ros.conversions import render_overlay
    from ciae_ros.image_conversion import image_msg_to_array

    msgs = []
    for t, f in enumerate(sequence.frames):
        if t == 15:  # a frame without any segment: uniform grey, stuff regions removed
            [res] = trk.client.set_parameters(f"{NS}/ciae_panoptic", stuff_area_min=10_000_000)
            assert res.successful, res.reason
            empty = _send(trk, sequence.uniform, BASE + 0.1 * t - 0.05)
            assert list(empty.segments) == [], [(s.label, s.area) for s in empty.segments]
            [res] = trk.client.set_parameters(f"{NS}/ciae_panoptic", stuff_area_min=-1)
            assert res.successful, res.reason
            bad = _diag_values(trk, lambda v: True)
            trk.cam.image(0, 0, _stamp(BASE + 0.1 * t - 0.03), frame_id="trk_cam", data_len=0)
            _diag_values(trk, lambda v: int(v.get("bad_empty", 0)) > int(bad.get("bad_empty", 0)))
        msgs.append(_send(trk, f.path, BASE + 0.1 * t))
    assert trk.node.alive()

    for m in msgs:
        tracks = [tid for tid, _ in _things(m).values() if tid]
        assert len(tracks) == len(set(tracks)), "two things of one frame share a track id"
        assert all(s.track_id == 0 for s in m.segments if not s.isthing), "stuff has no track"
    matched = [_matches(m, f.gt) for m, f in zip(msgs, sequence.frames)]
    pairs = [(a[g], b[g]) for a, b in zip(matched, matched[1:]) for g in a if g in b]
    kept = sum(x == y for x, y in pairs)
    assert len(pairs) >= 150 and kept >= 0.9 * len(pairs), f"{kept} of {len(pairs)} consecutive matches kept the id"
    longest = {}
    for g in {g for m in matched for g in m}:
        run = best = 0
        for a, b in zip(matched, matched[1:]):
            run = run + 1 if g in a and g in b and a[g] == b[g] else 0
            best = max(best, run)
        longest[g] = best
    assert max(longest.values()) >= 25, f"no thing kept its id over 25 consecutive outputs: {longest}"
    # ids are given 1, 2, 3, ... in order of confirmation and each belongs to one category
    first_seen, category = [], {}
    for m in msgs:
        for tid, cat in sorted(_things(m).values()):
            if tid and tid not in category:
                first_seen.append(tid)
            assert category.setdefault(tid, cat) == cat or tid == 0, f"track {tid} changed its category"
    assert first_seen == sorted(first_seen) and first_seen[0] == 1, first_seen

    # the overlay of a frame is the shared renderer's picture of the tracked result
    k = 10
    stamp = (msgs[k].header.stamp.sec, msgs[k].header.stamp.nanosec)
    ov = trk.overlay.wait_for(lambda m: (m.header.stamp.sec, m.header.stamp.nanosec) == stamp, timeout=30)
    assert ov is not None, "no overlay (overlay: on)"
    cat_ids = [c.id for c in trk.cats.wait_for(lambda m: True, timeout=5).categories]
    tracked = _result_of(msgs[k])
    expected = render_overlay(sequence.frames[k].image, tracked, cat_ids, 0.5)
    np.testing.assert_array_equal(image_msg_to_array(ov), expected)
    for s in tracked.segments:
        s.track_id = 0
    assert not np.array_equal(expected, render_overlay(sequence.frames[k].image, tracked, cat_ids, 0.5)), \
        "the frame's overlay does not depend on its track ids"


@pytest.mark.ros
def test_time_going_backwards_and_a_new_frame_id_reset_the_tracks(trk, sequence):
    """A bag replayed from its start (stamps jump back) and another camera behind the topic
    (frame_id changes): the tracks restart with new ids (never one given before), each reset is
    counted in /diagnostics, and the node keeps running."""
    before = _diag_values(trk, lambda v: True)
    issued = int(before["track_ids_issued"])
    assert issued >= 1 and before["tracking"] == "on"
    msg = _send(trk, sequence.frames[0].path, BASE - 100.0)
    ids = [tid for tid, _ in _things(msg).values() if tid]
    assert ids and min(ids) > issued, f"ids after the reset {ids} reuse ids up to {issued}"
    v = _diag_values(trk, lambda v: int(v["tracking_resets_time_backwards"])
                     > int(before["tracking_resets_time_backwards"]))
    issued = int(v["track_ids_issued"])
    assert issued >= max(ids)
    msg = _send(trk, sequence.frames[1].path, BASE - 99.9, frame_id="another_camera")
    ids = [tid for tid, _ in _things(msg).values() if tid]
    assert ids and min(ids) > issued
    _diag_values(trk, lambda v: int(v["tracking_resets_frame_id"]) > int(before["tracking_resets_frame_id"]))
    assert trk.node.alive() and "tracks reset" in trk.node.log()


@pytest.mark.ros
def test_tracking_parameters_at_run_time(trk, sequence):
    """Invalid tracking values are refused with a reason naming the parameter (the node keeps
    its settings); tracking off gives every segment track_id 0; back on with IoU association
    it tracks again, with new ids."""
    node, client = f"{NS}/ciae_panoptic", trk.client
    refused = {"tracking_high_score": (0.9, "need tracking_low_score <= tracking_high_score <= "
                                            "tracking_new_track_score"),
               "tracking_max_age": (0.0, "tracking_max_age must be a number > 0"),
               "tracking_association": ("sort", "tracking_association must be one of embedding, iou"),
               "tracking_min_hits": (0, "")}  # the descriptor's range: rclpy's own reason
    for name, (value, reason) in refused.items():
        [res] = client.set_parameters(node, **{name: value})
        assert not res.successful, f"{name}={value!r} was accepted"
        assert res.reason and reason in res.reason, res.reason
    assert client.get_parameters(node, "tracking_high_score", "tracking_max_age") == [0.4, 2.0]
    issued = int(_diag_values(trk, lambda v: True)["track_ids_issued"])

    [res] = client.set_parameters(node, tracking=False)
    assert res.successful, res.reason
    for t in (2, 3):
        msg = _send(trk, sequence.frames[t].path, BASE + 100 + 0.1 * t)
        assert _things(msg) and all(tid == 0 for tid, _ in _things(msg).values())
    _diag_values(trk, lambda v: v["tracking"] == "off")

    results = client.set_parameters(node, tracking=True, tracking_association="iou", tracking_min_hits=1)
    assert all(r.successful for r in results), [r.reason for r in results]
    for t in (4, 5):
        msg = _send(trk, sequence.frames[t].path, BASE + 100 + 0.1 * t)
        ids = [tid for tid, _ in _things(msg).values() if tid]
        assert ids and min(ids) > issued, (ids, issued)
    results = client.set_parameters(node, tracking_association="embedding", tracking_min_hits=3)
    assert all(r.successful for r in results), [r.reason for r in results]
    assert trk.node.alive()


@pytest.mark.ros
def test_inconsistent_tracking_parameters_stop_the_start_with_one_line(node_weights, tmp_path):
    """Values each within its range but not together (high_score above new_track_score): the node
    does not start, and says why in one line naming the parameters."""
    pytest.importorskip("rclpy")
    pytest.importorskip("ciae_ros.msg")
    from ros_testing import NodeProcess

    n = NodeProcess(tmp_path / "bad.log", node_weights, params={"tracking_high_score": 0.9},
                    ros_args=["-r", "__ns:=/trk_bad"])
    try:
        rc = n.proc.wait(180)
    finally:
        n.stop()
    log = n.log_path.read_text()
    lines = [ln for ln in log.splitlines() if "cannot start:" in ln]
    assert rc == 1 and len(lines) == 1, log
    assert ("invalid parameters: need tracking_low_score <= tracking_high_score <= tracking_new_track_score, "
            "got 0.1, 0.9, 0.5") in lines[0], lines[0]
    assert "Traceback" not in log
