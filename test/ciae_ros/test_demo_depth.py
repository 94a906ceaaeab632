"""ciae_ros.demo_depth: the demo report's 3-D error against the re-rendered ground truth, without DDS."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("ciae_ros.msg")

from builtin_interfaces.msg import Time  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from ciae_core.depth import SegmentDepth  # noqa: E402
from ciae_core.structures import PanopticResult, Segment as CoreSegment  # noqa: E402
from ciae_core.synth_depth import render_depth, simulate_sensor  # noqa: E402
from ciae_ros.camera import synth_sequence  # noqa: E402
from ciae_ros.conversions import segments_msg  # noqa: E402
from ciae_ros.demo_depth import DepthRecorder, _best_true_segment, errors_against_truth, report_lines  # noqa: E402
from ciae_ros.spatial_outputs import fill_segments_3d  # noqa: E402

H, W, SEED = 120, 160, 4


def _segments_for(t: int, stamp: Time, shift_ids: bool = False, bias: float = 0.0):
    """The message a node would publish for frame ``t``: the true masks (ids renumbered with
    ``shift_ids``), 3-D from the sensor-model depth, centroids moved by ``bias`` metres in x."""
    _, pan, info = synth_sequence(SEED, H, W).frame(t)
    ids = np.where(pan > 0, pan + 100, 0).astype(np.int32) if shift_ids else pan
    r = render_depth(pan, info)
    segs = [CoreSegment(s["id"] + (100 if shift_ids else 0), s["category_id"], "x", s["isthing"], 1.0, s["area"],
                        tuple(s["bbox"])) for s in info]
    msg = segments_msg(PanopticResult(ids, segs), Header(stamp=stamp))
    fill_segments_3d(msg, SegmentDepth()(ids, simulate_sensor(r.depth, t), r.K, ids=[s.id for s in msg.segments]),
                     "cam")
    for s in msg.segments:
        s.centroid.x += bias
    return msg


def _truth_file(tmp_path, frames: dict) -> object:
    path = tmp_path / "camera_truth.jsonl"
    lines = [{"source": "synth", "seed": SEED, "width": W, "height": H, "clip": 5}]
    lines += [{"stamp": list(stamp), "frame": k} for stamp, k in frames.items()]
    path.write_text("\n".join(json.dumps(d) for d in lines) + "\n")
    return path


def test_errors_of_true_masks_are_the_depth_pipelines(tmp_path):
    truth = _truth_file(tmp_path, {(10, 0): 1, (11, 0): 3})
    samples = [_segments_for(1, Time(sec=10), shift_ids=True), _segments_for(3, Time(sec=11)),
               _segments_for(2, Time(sec=99))]  # a stamp the camera never published: skipped
    e = errors_against_truth(samples, truth)
    assert e["frames_evaluated"] == 2
    assert e["depth_centroid"]["n"] >= 10 and e["depth_centroid"]["median_pct"] < 2.0
    assert e["depth_size"]["median_pct"] < 10.0
    assert e["end_to_end_centroid"]["n"] == e["depth_centroid"]["n"], "true masks: every segment matches"
    assert e["end_to_end_centroid"]["median_pct"] == pytest.approx(e["depth_centroid"]["median_pct"], abs=0.01)
    assert e["end_to_end_size"]["median_pct"] == pytest.approx(e["depth_size"]["median_pct"], abs=0.01)
    biased = errors_against_truth([_segments_for(1, Time(sec=10), bias=0.5)], truth)
    assert biased["depth_centroid"]["median_pct"] > 5 and biased["end_to_end_centroid"]["median_pct"] > 5
    line = report_lines({"frames_3d": 2, "frames_no_3d": 0, "markers": 2, "points": 2, **e})[1]
    assert line.startswith("- 3-D error against the rendered truth (2 frames), relative: end to end")


def test_best_true_segment_by_iou():
    pan = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3]])
    ids = np.array([[5, 5, 5, 6], [5, 5, 6, 6], [0, 0, 6, 6]])
    best = _best_true_segment(ids, pan)
    # 6 covers 3 of the 4 pixels of true 2 (IoU 3/6) and both of true 3 (IoU 2/5)
    assert best[5] == (1, pytest.approx(4 / 5)) and best[6] == (2, pytest.approx(0.5))


def test_recorder_samples_frames_with_3d_and_reports_a_missing_truth_file(tmp_path):
    rec = DepthRecorder(True, sample_every=0.0, max_samples=2)
    for k in range(3):
        rec.on_segments(_segments_for(k, Time(sec=20 + k)))
    rec.on_segments(segments_msg(PanopticResult(np.zeros((4, 4), np.int32), []), Header()))  # no 3-D
    assert len(rec.samples) == 2 and (rec.counts["frames_3d"], rec.counts["frames_no_3d"]) == (3, 1)
    summary = rec.summary(tmp_path)  # no camera_truth.jsonl there
    assert summary["error"].startswith("no 3-D error:") and summary["frames_3d"] == 3
    assert report_lines(summary)[1].startswith("- no 3-D error:")
    assert DepthRecorder(False).summary(tmp_path) is None and report_lines(None) == ["- 3-D: off (the source has no depth)"]
