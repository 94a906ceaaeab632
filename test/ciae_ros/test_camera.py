"""Camera publisher sources (synthetic sequence, image folder, video file) without DDS."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ciae_ros.camera import CameraSourceError, encode_frame, load_frames


def test_synthetic_frames_move():
    frames = load_frames("synth", (64, 96), clip=3)
    assert len(frames) == 3 and frames[0].shape == (64, 96, 3) and frames[0].dtype == np.uint8
    assert not np.array_equal(frames[0], frames[2]), "the synthetic scene must move"


def test_folder_of_images_sorted_and_resized(tmp_path):
    for k, name in enumerate(["b.png", "a.jpg", "c.txt"]):
        img = np.full((40, 50, 3), 60 * (k + 1), np.uint8)
        cv2.imwrite(str(tmp_path / name), img) if name.endswith(("png", "jpg")) else (tmp_path / name).write_text("x")
    frames = load_frames(str(tmp_path), None, clip=0)
    assert len(frames) == 2 and abs(int(frames[0][0, 0, 0]) - 120) <= 2  # a.jpg first
    frames = load_frames(str(tmp_path), (20, 30), clip=1)
    assert len(frames) == 1 and frames[0].shape == (20, 30, 3)


def test_video_file(tmp_path):
    path = tmp_path / "v.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    if not vw.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    for k in range(5):
        vw.write(np.full((48, 64, 3), (0, 0, 40 * k), np.uint8))  # BGR: red ramp
    vw.release()
    frames = load_frames(str(path), None, clip=3)
    assert len(frames) == 3 and frames[2].shape == (48, 64, 3)
    assert frames[2][..., 0].mean() > frames[0][..., 0].mean() + 40, "frames are RGB and in order"


def test_bad_sources(tmp_path):
    with pytest.raises(CameraSourceError, match="neither"):
        load_frames(str(tmp_path / "missing"), None, clip=1)
    with pytest.raises(CameraSourceError, match="holds no image OpenCV can read"):
        load_frames(str(tmp_path), None, clip=1)


def test_encode_frame_layouts():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 6, 3), np.uint8)
    data, step = encode_frame(rgb, "bgr8")
    assert step == 18 and np.frombuffer(data, np.uint8).reshape(4, 6, 3)[0, 0].tolist() == rgb[0, 0, ::-1].tolist()
    data, step = encode_frame(rgb, "mono8")
    assert step == 6 and len(data) == 24
    with pytest.raises(ValueError):
        encode_frame(rgb, "yuv422")


def test_pingpong_playback_never_jumps():
    from ciae_ros.camera import play_index

    assert [play_index(n, 4, "pingpong") for n in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert [play_index(n, 3, "repeat") for n in range(5)] == [0, 1, 2, 0, 1]
    assert [play_index(n, 1, "pingpong") for n in range(3)] == [0, 0, 0]
    steps = [abs(play_index(n + 1, 30, "pingpong") - play_index(n, 30, "pingpong")) for n in range(200)]
    assert set(steps) == {1}, "consecutive frames are neighbours in the clip"


def test_synth_camera_plays_forwards_and_backwards_and_names_each_frame(tmp_path):
    """The camera process (synth, the demo's source) with --truth: a first line describing the
    scene, then the stamp and clip frame of every published frame, in ping-pong order; the synthetic
    scene's thing ids are stable ground-truth ids, so the demo can score tracks against it."""
    import json
    import subprocess
    import sys

    pytest.importorskip("rclpy")
    from ciae_ros.camera import synth_sequence
    from ros_testing import REPO, child_env

    truth = tmp_path / "truth.jsonl"
    res = subprocess.run([sys.executable, "-m", "ciae_ros.camera", "synth", "--topic", "/pingpong/image_raw",
                          "--size", "64x48", "--clip", "3", "--rate", "50", "--frames", "7", "--seed", "4",
                          "--truth", str(truth)], cwd=REPO, env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    head, *lines = [json.loads(line) for line in truth.read_text().splitlines()]
    assert (head["seed"], head["width"], head["height"], head["clip"], head["loop"]) == (4, 64, 48, 3, "pingpong")
    assert [d["frame"] for d in lines] == [0, 1, 2, 1, 0, 1, 2]
    stamps = [tuple(d["stamp"]) for d in lines]
    assert stamps == sorted(stamps) and len(set(stamps)) == 7
    a, b = synth_sequence(4, 48, 64).frame(0), synth_sequence(4, 48, 64).frame(2)
    np.testing.assert_array_equal(a[0], load_frames("synth", (48, 64), 3, seed=4)[0])
    things = [{s["id"] for s in info if s["isthing"]} for info in (a[2], b[2])]
    assert things[0] & things[1], "thing ids are the same things in every frame"


def test_synth_camera_publishes_registered_depth_and_camera_info(tmp_path):
    """The camera process publishes colour, depth and CameraInfo with one stamp and frame; depth is
    the rendered scene's through the sensor model, K the rendering's; --truth names each frame."""
    import json
    import subprocess
    import sys
    import time

    pytest.importorskip("rclpy")
    from sensor_msgs.msg import CameraInfo, Image

    from ciae_core.depth import metres_to_uint16
    from ciae_ros.camera import synth_depth
    from ciae_ros.image_conversion import image_msg_to_array
    from ros_testing import REPO, Client, child_env

    truth = tmp_path / "truth.jsonl"
    client = Client("ciae_test_camera_client")
    got = {t: client.subscribe(m, t) for t, m in (("/cam/image_raw", Image), ("/cam/depth/image_raw", Image),
                                                   ("/cam/camera_info", CameraInfo))}
    proc = subprocess.Popen([sys.executable, "-m", "ciae_ros.camera", "synth", "--topic", "/cam/image_raw",
                             "--size", "64x48", "--clip", "3", "--rate", "5", "--duration", "120", "--seed", "2",
                             "--frame-id", "cam_optical", "--truth", str(truth)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def stamps(topic):
            return {(m.header.stamp.sec, m.header.stamp.nanosec): m for _, m in got[topic].snapshot()}

        deadline = time.monotonic() + 120
        common = set()
        while len(common) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            common = set(stamps("/cam/image_raw")) & set(stamps("/cam/depth/image_raw")) & \
                set(stamps("/cam/camera_info"))
        assert len(common) >= 4, proc.stdout.read() if proc.poll() is not None else "too few frames"
    finally:
        proc.terminate()
        proc.wait(30)
        client.close()
    lines = [json.loads(line) for line in truth.read_text().splitlines()]
    assert lines[0]["seed"] == 2 and (lines[0]["width"], lines[0]["height"], lines[0]["clip"]) == (64, 48, 3)
    frame_of = {tuple(d["stamp"]): d["frame"] for d in lines[1:]}
    depths, k = synth_depth(2, 48, 64, 3)
    images, infos = stamps("/cam/depth/image_raw"), stamps("/cam/camera_info")
    for stamp in sorted(common):
        depth, info = images[stamp], infos[stamp]
        assert depth.header.frame_id == info.header.frame_id == "cam_optical" and depth.encoding == "16UC1"
        np.testing.assert_array_equal(image_msg_to_array(depth), metres_to_uint16(depths[frame_of[stamp]]))
        assert list(info.k) == k.ravel().tolist() and (info.height, info.width) == (48, 64)
    assert len({frame_of[s] for s in common}) >= 2, "the clip plays in a loop"
