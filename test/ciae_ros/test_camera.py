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
