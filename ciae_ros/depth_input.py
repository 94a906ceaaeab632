"""Depth ``sensor_msgs/Image`` and ``CameraInfo`` -> arrays and intrinsics, and one frame's 3-D.

* Depth encodings: ``16UC1`` / ``mono16`` (uint16 in units of ``depth_scale`` metres, 0 = no
  measurement; RealSense, Orbbec, OAK-D) and ``32FC1`` (float32 metres, NaN/inf = no
  measurement; ZED, simulators). Byte order (``is_bigendian``) and row padding are honoured.
* Intrinsics: ``CameraInfo.k`` of the *colour* camera (a registered depth image shares it); a
  zero ``K`` (uncalibrated driver) is an error. Distortion ``d`` is ignored (rectified images).

Every failure is a :class:`ciae_core.depth.DepthError` whose ``reason`` the node counts: the
reasons of ``ciae_core.depth`` plus :data:`REASONS` here. The frame then has no 3-D; its 2-D
output is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ciae_core.depth import DepthError, Intrinsics, SegmentDepth, SegmentGeometry

from .image_conversion import ImageConversionError, image_msg_to_array

DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")
#: Reasons raised here in addition to ``ciae_core.depth.REASONS``.
REASONS = ("depth_encoding", "depth_data", "camera_info_size_mismatch")


def depth_from_msg(msg, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """``(H, W)`` uint16 (16UC1/mono16) or float32 (32FC1) view of a depth image.

    ``expect_hw``: the colour image's ``(H, W)``; a depth image of another size raises
    ``depth_size_mismatch`` before any pixel is read.
    """
    enc = str(msg.encoding)
    if enc not in DEPTH_ENCODINGS:
        raise DepthError("depth_encoding", f"depth encoding {enc!r} is not one of {', '.join(DEPTH_ENCODINGS)}")
    h, w = int(msg.height), int(msg.width)
    if expect_hw is not None and (h, w) != tuple(expect_hw):
        raise DepthError("depth_size_mismatch", f"depth image {w}x{h} differs from the colour image "
                                                f"{expect_hw[1]}x{expect_hw[0]} (not registered to it?)")
    try:
        return image_msg_to_array(msg)
    except ImageConversionError as exc:
        raise DepthError("depth_data", f"depth image: {exc}") from None


def intrinsics_from_camera_info(info, expect_hw: tuple[int, int] | None = None) -> Intrinsics:
    """Pinhole intrinsics from ``CameraInfo.k``; ``expect_hw`` checks the info's image size
    (when the driver fills it in: 0x0 is accepted)."""
    h, w = int(info.height), int(info.width)
    if expect_hw is not None and (h or w) and (h, w) != tuple(expect_hw):
        raise DepthError("camera_info_size_mismatch", f"camera_info is for {w}x{h}, the image is "
                                                      f"{expect_hw[1]}x{expect_hw[0]}")
    return Intrinsics.from_matrix(np.asarray(info.k, np.float64))


def camera_info_msg(k, height: int, width: int, header=None, msg_type=None):
    """``sensor_msgs/CameraInfo`` of a rectified pinhole camera: ``K``, ``D`` = 0 (plumb_bob),
    ``R`` = I, ``P`` = ``[K | 0]`` (for the synthetic camera and tests)."""
    if msg_type is None:
        from sensor_msgs.msg import CameraInfo as msg_type  # noqa: N813
    m = np.asarray(k, np.float64).reshape(3, 3)
    info = msg_type()
    if header is not None:
        info.header = header
    info.height, info.width = int(height), int(width)
    info.distortion_model = "plumb_bob"
    info.d = [0.0] * 5
    info.k = m.ravel().tolist()
    info.r = np.eye(3).ravel().tolist()
    info.p = np.hstack([m, np.zeros((3, 1))]).ravel().tolist()
    return info


@dataclass
class FrameDepth:
    """One frame's 3-D: geometry per segment, the depth array it came from (uint16 or float32),
    the intrinsics and the depth image's header (its ``frame_id`` names the 3-D frame)."""

    geometry: SegmentGeometry
    depth: np.ndarray
    intrinsics: Intrinsics
    header: object


def frame_geometry(estimator: SegmentDepth, id_map: np.ndarray, segment_ids, depth_msg, info_msg) -> FrameDepth:
    """All steps for one frame: decode and check depth and camera info against the id map's size,
    then :class:`SegmentDepth` for ``segment_ids``. Raises ``DepthError`` (count ``.reason``)."""
    hw = tuple(np.shape(id_map))
    depth = depth_from_msg(depth_msg, hw)
    intr = intrinsics_from_camera_info(info_msg, hw)
    geometry = estimator(id_map, depth, intr, ids=segment_ids)
    return FrameDepth(geometry, depth, intr, depth_msg.header)
