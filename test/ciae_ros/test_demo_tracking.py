"""The demo's tracking report (ciae_ros/demo_tracking.py) on hand-made recordings: outputs in a
bag, the camera's truth file beside it, numbers computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ciae_ros.msg")
pytest.importorskip("rosbags")

from std_msgs.msg import Header  # noqa: E402

from ciae_core.structures import CategoryInfo, PanopticResult, segments_from_id_map  # noqa: E402
from ciae_ros.bag import BagWriter  # noqa: E402
from ciae_ros.conversions import segments_msg  # noqa: E402
from ciae_ros.demo_tracking import TRUTH_FILE, GroundTruth, result_of, tracking_markdown, tracking_report  # noqa: E402

CATS = [CategoryInfo(1, "disc", True), CategoryInfo(11, "sky", False)]
H, W = 40, 60


def _gt(t: int) -> tuple[np.ndarray, list]:
    """Two discs (ground-truth ids 4 and 5) moving 2 px per frame on sky (id 1)."""
    ids = np.ones((H, W), np.int32)
    ids[4:14, 4 + 2 * t:14 + 2 * t] = 4
    ids[24:34, 30 - 2 * t:40 - 2 * t] = 5
    return ids, [{"id": 1, "category_id": 11, "iscrowd": 0}, {"id": 4, "category_id": 1, "iscrowd": 0},
                 {"id": 5, "category_id": 1, "iscrowd": 0}]


def _output(t: int, tracks: dict[int, int], category: int = 1) -> object:
    """The node's output for frame t: the ground truth's segments renumbered 1..3, thing ``g``
    tracked as ``tracks[g]``."""
    gt, _ = _gt(t)
    ids = np.select([gt == 1, gt == 4, gt == 5], [1, 2, 3], 0).astype(np.int32)
    meta = {1: (11, "sky", False, 0.9), 2: (category, "disc", True, 0.9), 3: (category, "disc", True, 0.8)}
    res = PanopticResult(id_map=ids, segments=segments_from_id_map(ids, meta))
    res.segments[1].track_id, res.segments[2].track_id = tracks.get(4, 0), tracks.get(5, 0)
    header = Header(frame_id="cam")
    header.stamp.sec, header.stamp.nanosec = 50, 100_000_000 * t
    return segments_msg(res, header)


class _Discs:
    """The scene of :func:`_gt` as a sequence (what the camera's synth_sequence is for the demo)."""

    def frame(self, t):
        return (None, *_gt(t))


def _recording(tmp_path, outputs, written_stamps) -> GroundTruth:
    """Outputs in ``tmp_path/bag``; the camera's truth file (frame t at stamp 50 s + t/10) beside it."""
    import json

    lines = [{"source": "synth", "seed": 0, "width": W, "height": H, "clip": 4}]
    lines += [{"stamp": [50, 100_000_000 * t], "frame": t} for t in written_stamps]
    (tmp_path / TRUTH_FILE).write_text("".join(json.dumps(d) + "\n" for d in lines) + '{"stamp": [50, 9')
    with BagWriter(tmp_path / "bag") as bag:
        for k, msg in enumerate(outputs):
            bag.write_msg("/panoptic/segments", msg, k + 1)
    return GroundTruth(tmp_path / TRUTH_FILE, sequence=_Discs())


def test_id_switches_idf1_and_mota_against_the_ground_truth(tmp_path):
    # thing 4 is track 1 for three frames, then track 3 (one ID switch); thing 5 is track 2 throughout
    outputs = [_output(t, {4: 1, 5: 2}) for t in range(3)] + [_output(3, {4: 3, 5: 2})]
    outputs.append(_output(3, {4: 3, 5: 2}))  # an output whose stamp the camera never wrote: not scored
    outputs[-1].header.stamp.sec = 99
    truth = _recording(tmp_path, outputs, range(4))  # (its last line is cut short, as by the camera's stop)
    r = tracking_report(tmp_path / "bag", tmp_path, CATS, truth=truth)
    assert (r["tracks"], r["outputs_with_tracks"]) == (3, 5)
    gt = r["ground_truth"]
    assert (gt["frames_evaluated"], gt["gt_things"], gt["id_switches"]) == (4, 2, 1)
    # IDF1 = 2 IDTP / (2 IDTP + IDFP + IDFN) = 14 / 16 (thing 4 <-> track 1 for 3 of its 4 frames);
    # MOTA = 1 - (misses + false positives + switches) / 8 ground-truth things = 7 / 8
    assert gt["idf1"] == pytest.approx(0.875) and gt["mota"] == pytest.approx(0.875)
    assert gt["idsw_per_100"] == 50.0 and gt["stride"] == 2
    line = tracking_markdown({"tracking": r, "tracking_resets": {"frame_id": 0, "time_backwards": 2}})
    assert line == ("- tracking: 3 track id(s) in 5 output(s) (tracks reset: time_backwards 2); against the synthetic "
                    "ground truth (4 outputs, 2 things): 1 ID switch(es) (50.0 per 100 things), IDF1 0.875, "
                    "MOTA 0.875")


def test_without_ground_truth_or_with_another_models_categories(tmp_path):
    outputs = [_output(t, {4: 1}) for t in range(2)]
    with BagWriter(tmp_path / "bag") as bag:
        for k, msg in enumerate(outputs):
            bag.write_msg("/panoptic/segments", msg, k + 1)
    r = tracking_report(tmp_path / "bag", tmp_path, CATS)  # a folder or video camera writes no ground truth
    assert r == {"tracks": 1, "outputs_with_tracks": 2, "ground_truth": None}
    assert tracking_markdown({"tracking": r}) == "- tracking: 1 track id(s) in 2 output(s)"
    other = tmp_path / "other"
    other.mkdir()
    truth = _recording(other, [_output(t, {4: 1}, category=7) for t in range(2)], range(2))
    # a model of other categories (no 'disc'): its outputs cannot be scored against the synthetic truth
    r = tracking_report(other / "bag", other, [CategoryInfo(7, "cat", True), CategoryInfo(11, "sky", False)],
                        truth=truth)
    assert "cannot score against the synthetic ground truth" in r["ground_truth"]["error"]


def test_result_of_a_message_keeps_track_ids_and_subsamples():
    msg = _output(0, {4: 7, 5: 9})
    full, half = result_of(msg), result_of(msg, 2)
    assert [(s.id, s.track_id) for s in full.segments] == [(1, 0), (2, 7), (3, 9)]
    assert half.id_map.shape == (H // 2, W // 2) and [s.track_id for s in half.segments] == [0, 7, 9]
    np.testing.assert_array_equal(half.id_map, full.id_map[::2, ::2])


def test_the_synthetic_cameras_truth_file_is_rendered_again(tmp_path):
    """The real path: the camera's truth file names the frames of its synthetic scene; outputs that
    are that scene's ground truth with one thing's track id changed once: one ID switch, and IDF1 =
    MOTA = 1 - 1/N over the N ground-truth things scored (hand-derived: the new id's one frame is
    the only identity false positive and that thing's frame the only identity miss)."""
    import json

    from ciae_ros.camera import synth_sequence

    seq = synth_sequence(8, 48, 64)
    lines = [{"source": "synth", "seed": 8, "width": 64, "height": 48, "clip": 3}]
    outputs, n_things = [], 0
    for k, t in enumerate([0, 1, 2, 1]):  # ping-pong
        _, gt, infos = seq.frame(t)
        meta = {s["id"]: (s["category_id"], "x", bool(s["isthing"]), 0.9) for s in infos}
        res = PanopticResult(id_map=gt.astype(np.int32), segments=segments_from_id_map(gt, meta))
        things = [s for s in res.segments if s.isthing]
        for s in things:
            s.track_id = s.id + (100 if k == 3 and s is things[0] else 0)
        n_things += len({s.id for s in things} & set(np.unique(gt[::2, ::2]).tolist()))
        header = Header()
        header.stamp.sec, header.stamp.nanosec = 7, k
        outputs.append(segments_msg(res, header))
        lines.append({"stamp": [7, k], "frame": t})
    (tmp_path / TRUTH_FILE).write_text("".join(json.dumps(d) + "\n" for d in lines))
    with BagWriter(tmp_path / "bag") as bag:
        for k, msg in enumerate(outputs):
            bag.write_msg("/panoptic/segments", msg, k + 1)
    from ciae_core.synth import SYNTH_CATEGORIES

    gt = tracking_report(tmp_path / "bag", tmp_path, SYNTH_CATEGORIES)["ground_truth"]
    assert gt["frames_evaluated"] == 4 and gt["id_switches"] == 1
    assert gt["idf1"] == pytest.approx(1 - 1 / n_things, abs=1e-3) and gt["mota"] == pytest.approx(1 - 1 / n_things,
                                                                                                   abs=1e-3)
