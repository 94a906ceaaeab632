"""ciae_ros.depth_input: depth images and camera info to arrays, and one frame's 3-D."""

import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo, Image

from ciae_core.depth import DepthError, SegmentDepth, metres_to_uint16
from ciae_core.synth import render_scene
from ciae_core.synth_depth import geometry_errors, render_depth, simulate_sensor
from ciae_ros.depth_input import camera_info_msg, depth_from_msg, frame_geometry, intrinsics_from_camera_info
from ciae_ros.image_conversion import numpy_to_image

K = np.array([[500.0, 0.0, 320.0], [0.0, 400.0, 240.0], [0.0, 0.0, 1.0]])


def _raw(a: np.ndarray, encoding: str, big_endian: bool = False, pad: int = 0) -> Image:
    """An Image built byte by byte (not through our own encoder)."""
    a = a.astype(a.dtype.newbyteorder(">" if big_endian else "<"))
    rows = a.view(np.uint8).reshape(a.shape[0], -1)
    rows = np.hstack([rows, np.zeros((a.shape[0], pad), np.uint8)])
    m = Image(height=a.shape[0], width=a.shape[1], encoding=encoding, is_bigendian=int(big_endian),
              step=rows.shape[1])
    m.data = rows.tobytes()
    return m


@pytest.mark.parametrize("encoding,dtype", [("16UC1", np.uint16), ("mono16", np.uint16), ("32FC1", np.float32)])
@pytest.mark.parametrize("big_endian,pad", [(False, 0), (True, 6)])
def test_depth_encodings(encoding, dtype, big_endian, pad):
    rng = np.random.default_rng(0)
    a = (rng.integers(0, 5000, (6, 7)) if dtype == np.uint16 else rng.uniform(0, 5, (6, 7))).astype(dtype)
    got = depth_from_msg(_raw(a, encoding, big_endian, pad), expect_hw=(6, 7))
    assert got.dtype == dtype and got.shape == (6, 7)
    np.testing.assert_array_equal(got, a)


def test_bad_depth_messages():
    a = np.ones((6, 7), np.float32)
    with pytest.raises(DepthError) as exc:
        depth_from_msg(_raw(a.astype(np.uint8), "mono8"))
    assert exc.value.reason == "depth_encoding"
    with pytest.raises(DepthError) as exc:
        depth_from_msg(_raw(a, "32FC1"), expect_hw=(7, 6))
    assert exc.value.reason == "depth_size_mismatch" and "7x6" in str(exc.value)
    short = _raw(a, "32FC1")
    short.data = bytes(short.data)[:-4]
    with pytest.raises(DepthError) as exc:
        depth_from_msg(short)
    assert exc.value.reason == "depth_data"


def test_camera_info_round_trip_and_checks():
    info = camera_info_msg(K, 480, 640)
    assert info.distortion_model == "plumb_bob" and list(info.d) == [0.0] * 5
    assert list(info.p) == [500.0, 0.0, 320.0, 0.0, 0.0, 400.0, 240.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    intr = intrinsics_from_camera_info(info, (480, 640))
    assert (intr.fx, intr.fy, intr.cx, intr.cy) == (500.0, 400.0, 320.0, 240.0)
    with pytest.raises(DepthError) as exc:
        intrinsics_from_camera_info(info, (240, 320))
    assert exc.value.reason == "camera_info_size_mismatch"
    with pytest.raises(DepthError) as exc:
        intrinsics_from_camera_info(CameraInfo(), (480, 640))  # a driver without calibration: K = 0
    assert exc.value.reason == "bad_intrinsics"
    zero_size = camera_info_msg(K, 0, 0)  # size not filled in: accepted
    assert intrinsics_from_camera_info(zero_size, (480, 640)).fx == 500.0


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_frame_geometry_from_messages_of_a_rendered_scene(encoding):
    _, pan, info = render_scene((0, 77), 480, 640)
    r = render_depth(pan, info)
    measured = simulate_sensor(r.depth, 0)
    arr = metres_to_uint16(measured) if encoding == "16UC1" else measured
    depth_msg = numpy_to_image(arr, encoding)
    depth_msg.header.frame_id = "camera_color_optical_frame"
    fd = frame_geometry(SegmentDepth(), pan, r.truth.ids, depth_msg, camera_info_msg(r.K, 480, 640))
    assert fd.header.frame_id == "camera_color_optical_frame" and fd.depth.shape == (480, 640)
    e = geometry_errors(fd.geometry, r.truth)
    assert e["lost"].size == 0 and np.median(e["centroid"]) < 0.02
    with pytest.raises(DepthError) as exc:
        frame_geometry(SegmentDepth(), pan[:240], r.truth.ids, depth_msg, camera_info_msg(r.K, 480, 640))
    assert exc.value.reason == "depth_size_mismatch"
