"""An RGB-D camera for the tests: a rendered synthetic scene's colour image, its metric depth as a
camera would measure it, and its CameraInfo, as messages (``rgbd_messages``), with every bad input
the node must survive on request. Used in the test process and in ros_testing's publisher process
(op ``rgbd``), which both render the same scene from the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RGBDScene:
    image: np.ndarray       # (H, W, 3) uint8 RGB
    pan: np.ndarray         # (H, W) int32 true panoptic ids
    info: list              # COCO segments_info
    render: object          # ciae_core.synth_depth.DepthRender (exact depth, K, truth)
    measured: np.ndarray    # (H, W) float32 metres through simulate_sensor (NaN = no return)


def rgbd_scene(seed: int, h: int, w: int, cache: dict | None = None) -> RGBDScene:
    """The scene ``render_scene(seed, h, w)`` with depth (``simulate_sensor`` seeded with ``seed``)."""
    key = ("rgbd", seed, h, w)
    if cache is not None and key in cache:
        return cache[key]
    from ciae_core.synth import render_scene
    from ciae_core.synth_depth import render_depth, simulate_sensor

    image, pan, info = render_scene(seed, h, w)
    r = render_depth(pan, info)
    scene = RGBDScene(image, pan, info, r, simulate_sensor(r.depth, seed))
    if cache is not None:
        cache[key] = scene
    return scene


def rgbd_messages(cmd: dict, cache: dict | None = None):
    """``(image, depth or None, camera_info or None)`` messages of ``rgbd_scene(cmd['seed'], cmd['h'],
    cmd['w'])``, stamped ``cmd['stamp']`` (``[sec, nanosec]``).

    Options of ``cmd`` (for the bad inputs): ``encoding`` (``16UC1`` default, ``32FC1`` or any other
    string, sent as 16-bit data), ``depth_hw`` (depth of another size: nearest-neighbour resized),
    ``invalid`` (no valid pixel: zeros / NaN), ``k_zero`` (an uncalibrated camera's K = 0),
    ``depth_dt`` (seconds added to the depth stamp), ``truncate`` (depth data a row short),
    ``info_hw`` (CameraInfo for another size), ``no_depth`` / ``no_info`` (not sent), ``frame_id`` /
    ``depth_frame_id``.
    """
    import cv2
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    from ciae_core.depth import metres_to_uint16
    from ciae_ros.depth_input import camera_info_msg
    from ciae_ros.image_conversion import numpy_to_image

    h, w = int(cmd["h"]), int(cmd["w"])
    scene = rgbd_scene(int(cmd.get("seed", 0)), h, w, cache)
    sec, nsec = (int(v) for v in cmd["stamp"])
    header = Header(stamp=Time(sec=sec, nanosec=nsec), frame_id=cmd.get("frame_id", "camera_color_optical_frame"))
    image = numpy_to_image(scene.image, "rgb8", header=header)
    depth = info = None
    if not cmd.get("no_depth"):
        enc = cmd.get("encoding", "16UC1")
        metres = np.full((h, w), np.nan, np.float32) if cmd.get("invalid") else scene.measured
        if cmd.get("depth_hw"):
            dh, dw = cmd["depth_hw"]
            metres = cv2.resize(metres, (int(dw), int(dh)), interpolation=cv2.INTER_NEAREST)
        arr = metres.astype(np.float32) if enc == "32FC1" else metres_to_uint16(metres)
        depth = numpy_to_image(arr, "32FC1" if enc == "32FC1" else "16UC1")
        depth.encoding = enc
        if cmd.get("truncate"):
            depth.data = bytes(depth.data)[:-int(depth.step)]
        t = sec * 1_000_000_000 + nsec + int(round(float(cmd.get("depth_dt", 0.0)) * 1e9))
        depth.header = Header(stamp=Time(sec=t // 1_000_000_000, nanosec=t % 1_000_000_000),
                              frame_id=cmd.get("depth_frame_id", "camera_depth_optical_frame"))
    if not cmd.get("no_info"):
        k = np.zeros((3, 3)) if cmd.get("k_zero") else scene.render.K
        ih, iw = cmd.get("info_hw") or (h, w)
        info = camera_info_msg(k, int(ih), int(iw), Header(stamp=header.stamp, frame_id=header.frame_id))
    return image, depth, info
