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
    with pytest.raises(CameraSourceError, match="no readable frames"):
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


def test_synthetic_clip_has_stable_ground_truth_and_is_written_for_the_demo(tmp_path):
    import json

    from ciae_ros.camera import GROUND_TRUTH_FILE, GROUND_TRUTH_STAMPS, GroundTruthWriter, synth_clip

    frames, ids, infos = synth_clip(3, (96, 128), 4)
    assert len(frames) == 4 and ids.shape == (4, 96, 128) and ids.dtype == np.int32
    for t in range(4):
        listed = {s["id"] for s in infos[t]}
        assert set(np.unique(ids[t]).tolist()) - {0} == listed, "every id of the map is described"
    things = [{s["id"] for s in info if s["id"] >= 4} for info in infos]
    assert things[0] & things[3], "thing ids are stable over the clip"
    np.testing.assert_array_equal(frames[2], load_frames("synth", (96, 128), 4, seed=3)[2])
    w = GroundTruthWriter(tmp_path / "gt", ids, infos)
    w.frame(12, 500, 3)
    w.frame(12, 600_000_500, 2)
    w.close()
    saved = np.load(tmp_path / "gt" / GROUND_TRUTH_FILE)
    np.testing.assert_array_equal(saved["ids"], ids)
    assert json.loads(str(saved["segments"])) == json.loads(json.dumps(infos))
    assert (tmp_path / "gt" / GROUND_TRUTH_STAMPS).read_text() == "12 500 3\n12 600000500 2\n"
    assert sorted(p.name for p in (tmp_path / "gt").iterdir()) == [GROUND_TRUTH_FILE, GROUND_TRUTH_STAMPS]


def test_ground_truth_needs_the_synthetic_source(tmp_path):
    from ciae_ros.camera import main

    assert main([str(tmp_path), "--ground-truth", str(tmp_path / "gt")]) == 2
    assert not (tmp_path / "gt").exists()
