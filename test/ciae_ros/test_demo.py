"""``ciae-demo`` (the README's main command) runs camera, node and client as separate processes
and leaves a report, overlay PNGs and a replayable MCAP bag (a short run here)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.ros
pytest.importorskip("rclpy")
pytest.importorskip("ciae_ros.msg")


def test_demo_short_run(node_weights, tmp_path, capsys):
    from ciae_ros.bag import read_messages
    from ciae_ros.demo import main

    out = tmp_path / "demo_out"
    rc = main(["--duration", "3", "--out", str(out), "--size", "320x240", "--rate", "10", "--weights", node_weights,
               "--png-every", "0.5", "--input-size", "224"])
    printed = capsys.readouterr().out
    assert rc == 0, (out / "node.log").read_text()[-3000:] if (out / "node.log").exists() else printed
    report = json.loads((out / "report.json").read_text())
    assert report["frames_out"] >= 3 and report["frames_in"] >= report["frames_out"]
    # node counters (final /diagnostics, after the camera stopped) agree with what the client received
    unaccounted = report["frames_in"] - report["frames_out"] - report["frames_dropped"] - report["frames_bad"]
    assert abs(unaccounted) <= 1, report
    assert report["latency_camera_to_client_ms"]["p50"] > 0
    assert report["exit_codes"] == {"camera": 0, "node": 0}
    assert len(list((out / "overlays").glob("*.png"))) >= 2
    assert str(out.resolve()) in printed and (out / "report.md").read_text().startswith("# ciae-demo report")
    segs = list(read_messages(out / "bag", "/panoptic/segments"))
    assert len(segs) == report["frames_out"]
    assert len(list(read_messages(out / "bag", "/camera/image_raw"))) > 0
    assert len(list(read_messages(out / "bag", "/panoptic/categories"))) == 1
    _, first = segs[0]
    assert (first.id_image.height, first.id_image.width) == (240, 320)
    # tracking (issue 14): the node tracks by default, the synthetic camera wrote its ground truth
    tracking = report["tracking"]
    assert tracking["tracks"] >= 1 and tracking["outputs_with_tracks"] >= 1, tracking
    assert any(s.track_id for _, m in segs for s in m.segments)
    gt = tracking["ground_truth"]
    assert gt["frames_evaluated"] >= report["frames_out"] - 1 and gt["gt_things"] >= 1, gt
    assert 0 <= gt["id_switches"] and -1.0 <= gt["mota"] <= 1.0 and 0.0 <= gt["idf1"] <= 1.0
    assert report["tracking_resets"] == {"frame_id": 0, "time_backwards": 0, "model": 0, "parameters": 0}
    assert "- tracking: " in (out / "report.md").read_text() and (out / "camera_truth.jsonl").is_file()
