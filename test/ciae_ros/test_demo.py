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
    # 3-D (issue 15): the synthetic camera's depth reached the node; markers and points are in the bag
    r3 = report["3d"]
    assert r3["frames_3d"] >= 1 and r3["frames_evaluated"] >= 1, r3
    assert 0 < r3["depth_centroid"]["median_pct"] < 2.0 and r3["depth_centroid"]["n"] >= 3, r3
    assert r3["end_to_end_centroid"]["n"] >= 1 and r3["end_to_end_size"]["n"] >= 1, r3
    assert "3-D error against the rendered truth" in (out / "report.md").read_text()
    with_3d = [m for _, m in segs if m.depth_frame_id]
    assert len(with_3d) == r3["frames_3d"] and with_3d[0].depth_frame_id == "camera_optical_frame"
    markers = list(read_messages(out / "bag", "/panoptic/markers"))
    points = list(read_messages(out / "bag", "/panoptic/points"))
    assert len(markers) == r3["markers"] >= 1 and len(points) == r3["points"] >= 1
    assert points[0][1].width > 100 and points[0][1].header.frame_id == "camera_optical_frame"
    # depth as compressed_depth_image_transport records it: a 12-byte header, then a lossless 16-bit PNG
    import struct

    import cv2
    import numpy as np

    depths = list(read_messages(out / "bag", "/camera/depth/image_raw/compressedDepth"))
    assert depths and not list(read_messages(out / "bag", "/camera/depth/image_raw"))
    d = depths[0][1]
    assert d.format == "16UC1; compressedDepth png" and struct.unpack("<iff", bytes(d.data[:12]))[0] == 1
    png = cv2.imdecode(np.frombuffer(bytes(d.data[12:]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and png.shape == (240, 320) and 100 < np.median(png) < 20000
    assert len(list(read_messages(out / "bag", "/camera/camera_info"))) > 0
    # recorded compressed by default: camera and overlay as JPEG copies with the original headers, no raw
    # copies, the bag's chunks zstd-compressed (the id images cost almost nothing)
    from ciae_ros.image_conversion import compressed_to_rgb

    assert report["record"] == "compressed" and not list(read_messages(out / "bag", "/camera/image_raw"))
    cams = list(read_messages(out / "bag", "/camera/image_raw/compressed"))
    overlays = list(read_messages(out / "bag", "/panoptic/overlay/compressed"))
    assert cams and overlays and not list(read_messages(out / "bag", "/panoptic/overlay"))
    assert cams[0][1].format == "rgb8; jpeg compressed bgr8" and compressed_to_rgb(cams[0][1]).shape == (240, 320, 3)
    assert overlays[0][1].format == "bgr8; jpeg compressed bgr8"
    assert {(m.header.stamp.sec, m.header.stamp.nanosec) for _, m in overlays} <= \
        {(m.header.stamp.sec, m.header.stamp.nanosec) for _, m in segs}
    raw_bytes = (len(cams) * 240 * 320 * 3 + len(segs) * 240 * 320 * 4 + len(overlays) * 240 * 320 * 3
                 + len(depths) * 240 * 320 * 2 + sum(m.row_step * m.height for _, m in points))
    assert report["bag_mb"] * 1e6 < raw_bytes / 3, (report["bag_mb"], raw_bytes)
    # the shipped model is synthetic-only: the report says so (and the console did)
    from ciae_core.model_domain import model_domain_warning

    note = model_domain_warning(node_weights)
    assert report["model_warning"] == note
    assert (f"**Note:** {note}" in (out / "report.md").read_text()) == (note is not None)


def test_demo_records_raw_images_on_request(node_weights, tmp_path):
    from ciae_ros.bag import read_messages
    from ciae_ros.demo import main

    out = tmp_path / "demo_raw"
    assert main(["--duration", "1", "--out", str(out), "--size", "320x240", "--weights", node_weights,
                 "--input-size", "224", "--record", "raw"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["record"] == "raw"
    [(_, cam), *_] = list(read_messages(out / "bag", "/camera/image_raw"))
    assert (cam.height, cam.width, cam.encoding) == (240, 320, "rgb8")
    assert not list(read_messages(out / "bag", "/camera/image_raw/compressed"))


def test_bad_source_is_one_line_with_the_reason_and_the_next_step(node_weights, tmp_path):
    """Through the console entry. A path that does not exist is refused before anything starts; an
    empty folder gets as far as the camera process, whose error line the demo repeats (it used to
    say only "the camera exited with status 1"); the node, stopped while loading, logs one line.
    A ROS_DOMAIN_ID the user set is kept."""
    import subprocess

    from console_scripts import console_command, console_env

    def demo(source, out):
        res = subprocess.run([*console_command("ciae-demo"), str(source), "--out", str(out), "--duration", "2",
                              "--weights", node_weights], env=console_env(ROS_DOMAIN_ID="57"),
                             capture_output=True, text=True, timeout=300)
        return res.returncode, [ln for ln in res.stderr.splitlines() if ln.startswith("[ERROR]")], res.stderr

    rc, errors, log = demo(tmp_path / "nope", tmp_path / "o1")
    assert rc == 1 and errors == [f"[ERROR] [ciae_demo]: camera source '{tmp_path / 'nope'}' does not exist; give "
                                  f"'synth', a folder of images or a video file (e.g. ciae-demo synth)"], log
    assert not (tmp_path / "o1").exists()
    (tmp_path / "empty").mkdir()
    rc, errors, log = demo(tmp_path / "empty", tmp_path / "o2")
    assert rc == 1 and len(errors) == 1, log
    assert errors[0].startswith(f"[ERROR] [ciae_demo]: the camera stopped (exit status 1): camera source "
                                f"'{tmp_path / 'empty'}' holds no image OpenCV can read"), errors
    assert "give 'synth', a folder of images or another video file" in errors[0]
    assert f"(whole log: {tmp_path / 'o2' / 'camera.log'})" in errors[0]
    assert "ROS_DOMAIN_ID=57 (from the environment), loopback only" in log
    node_log = (tmp_path / "o2" / "node.log").read_text()
    assert "Traceback" not in node_log and len(node_log.splitlines()) <= 3, node_log


def test_demo_environment_keeps_a_domain_id_the_user_set():
    from ciae_ros.demo import demo_environment

    env = demo_environment(environ={"ROS_DOMAIN_ID": "42", "ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET"})
    assert (env["ROS_DOMAIN_ID"], env["ROS_AUTOMATIC_DISCOVERY_RANGE"]) == ("42", "LOCALHOST")
    assert demo_environment(7, environ={"ROS_DOMAIN_ID": "42"})["ROS_DOMAIN_ID"] == "7"
    picked = demo_environment(environ={})["ROS_DOMAIN_ID"]
    assert 1 <= int(picked) <= 100
