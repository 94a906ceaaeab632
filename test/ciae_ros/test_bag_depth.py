"""``ciae-bag`` with 3-D (ciae_ros/bag_depth.py): recorded depth and camera info paired with the
colour images as the node pairs them, also when depth is recorded after its colour image; markers
and points written; bad depth costs only the 3-D (no DDS)."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("ciae_ros.msg")
pytest.importorskip("rosbags")

from ciae_core.depth import SegmentDepth, metres_to_uint16  # noqa: E402
from ciae_ros.bag import BagError, BagWriter, main, plan_bag_file, process_bag, read_messages  # noqa: E402
from ciae_ros.bag_depth import DepthOptions  # noqa: E402
from ciae_ros.image_conversion import image_msg_to_array  # noqa: E402
from ciae_ros.node_depth import DepthSettings  # noqa: E402
from ciae_ros.point_cloud import points_from_msg  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from rgbd_testing import rgbd_messages, rgbd_scene  # noqa: E402

H, W = 120, 160
S = 1_000_000_000
# frame k: stamp 100 + k s; its depth is recorded before (k even) or after (k odd) the colour image
FRAMES = [dict(), dict(), dict(depth_hw=(H // 2, W // 2)), dict(no_depth=True), dict()]


@pytest.fixture(scope="module")
def rgbd_bag(tmp_path_factory):
    path = tmp_path_factory.mktemp("bags") / "rgbd"
    cache: dict = {}
    with BagWriter(path) as bag:
        for k, opts in enumerate(FRAMES):
            image, depth, info = rgbd_messages({"seed": k, "h": H, "w": W, "stamp": [100 + k, 0], **opts}, cache)
            t = (k + 1) * S
            bag.write_msg("/camera/camera_info", info, t)
            if depth is not None and k % 2 == 0:
                bag.write_msg("/camera/depth/image_raw", depth, t + 1)
            bag.write_msg("/camera/image_raw", image, t + 2)
            if depth is not None and k % 2 == 1:
                bag.write_msg("/camera/depth/image_raw", depth, t + 3)
    return path


def test_depth_from_a_recorded_bag(rgbd_bag, node_weights, tmp_path):
    from ciae_core.predictor import Predictor

    pred = Predictor(node_weights, input_size=256)
    opts = DepthOptions(depth_topic="/camera/depth/image_raw", settings=DepthSettings(points_stride=2))
    summary = process_bag(rgbd_bag, tmp_path / "out", pred, depth=opts)
    assert summary.segmented == 5
    # frame 3 has no depth of its own: the nearest (frames 2 and 4) are a second away
    assert summary.depth == "3-D in 3 frame(s), 2 without (depth_size_mismatch 1, stamp_out_of_tolerance 1)", \
        summary.line()
    assert "/panoptic/markers" in summary.outputs and "/panoptic/points" in summary.outputs
    assert summary.depth in summary.line()
    out = tmp_path / "out"
    segs = dict(read_messages(out, "/panoptic/segments"))
    assert len(segs) == 5
    for k in (0, 1, 4):  # depth recorded before (0, 4) and after (1) its colour image
        msg = segs[(k + 1) * S + 2]
        assert msg.depth_frame_id == "camera_depth_optical_frame" and msg.header.stamp.sec == 100 + k
        sc = rgbd_scene(k, H, W)
        ids = image_msg_to_array(msg.id_image)
        ref = SegmentDepth()(ids, metres_to_uint16(sc.measured), sc.render.K, ids=[s.id for s in msg.segments])
        for s in msg.segments:
            r = ref.row(s.id)
            assert s.has_3d == bool(ref.has_3d[r])
            if s.has_3d:
                assert [s.centroid.x, s.centroid.y, s.centroid.z] == pytest.approx(ref.centroid[r].tolist(), abs=1e-6)
    for k in (2, 3):
        msg = segs[(k + 1) * S + 2]
        assert msg.depth_frame_id == "" and not any(s.has_3d for s in msg.segments) and msg.segments
    points = dict(read_messages(out, "/panoptic/points"))
    assert sorted(points) == [(k + 1) * S + 2 for k in (0, 1, 4)]
    cloud = points_from_msg(points[S + 2])
    assert cloud.size > 500 and cloud.dtype.names[:3] == ("x", "y", "z") and np.all(cloud["z"] > 0.1)
    markers = dict(read_messages(out, "/panoptic/markers"))
    assert sorted(markers) == [(k + 1) * S + 2 for k in (0, 1, 2, 4)], "frame 3 had nothing to add or delete"
    shown: dict = {}
    for t in sorted(markers):
        for m in markers[t].markers:
            if m.action == 0:
                shown[(m.ns, m.id)] = m
            else:
                del shown[(m.ns, m.id)]
        if t == 3 * S + 2:  # frame 2 (no 3-D) deleted everything frame 1 showed
            assert shown == {} and all(m.action == 2 for m in markers[t].markers)
    things = {s.id for s in segs[5 * S + 2].segments if s.isthing and s.has_3d}
    assert {k[1] for k in shown if k[0] == "segments"} == things and things
    assert markers[S + 2].markers[0].header.frame_id == "camera_depth_optical_frame"
    assert len(list(read_messages(out, "/camera/depth/image_raw"))) == 4, "inputs are copied"


def test_depth_options_are_checked_against_the_bag(rgbd_bag, tmp_path):
    with pytest.raises(BagError, match="/camera/depth/missing .*the bag has no such topic"):
        plan_bag_file(rgbd_bag, depth=DepthOptions(depth_topic="/camera/depth/missing"))
    with pytest.raises(BagError, match="/camera/image_raw .*holds sensor_msgs/msg/Image"):
        plan_bag_file(rgbd_bag, depth=DepthOptions(depth_topic="/camera/depth/image_raw",
                                                   camera_info_topic="/camera/image_raw"))
    with pytest.raises(BagError, match="a single camera uses --depth-topic"):
        plan_bag_file(rgbd_bag, depth=DepthOptions(depth_topics=["/camera/depth/image_raw"]))
    plan = plan_bag_file(rgbd_bag, depth=DepthOptions(depth_topic="camera/depth/image_raw"))
    assert plan.depth_pairs == {"/camera/image_raw": ("/camera/depth/image_raw", "/camera/camera_info")}
    assert plan.inputs == [("/camera/image_raw", "sensor_msgs/msg/Image")]
    # the command line checks all of it before loading a model
    assert main(["--in", str(rgbd_bag), "--out", str(tmp_path / "o"), "--depth-topic", "/nope"]) == 1
    assert main(["--in", str(rgbd_bag), "--out", str(tmp_path / "o"), "--depth-topic", "/camera/depth/image_raw",
                 "--min-depth", "5", "--max-depth", "1"]) == 1
    assert not (tmp_path / "o").exists()


def test_two_cameras_pair_by_the_nodes_rules(tmp_path):
    from sensor_msgs.msg import CameraInfo

    path = tmp_path / "two"
    with BagWriter(path) as bag:
        image, depth, _ = rgbd_messages({"seed": 0, "h": 32, "w": 32, "stamp": [1, 0]})
        for cam in ("/cam1", "/cam2"):
            bag.write_msg(f"{cam}/color/image_raw", image, 1)
            bag.write_msg(f"{cam}/color/depth/image_raw", depth, 2)  # under the camera's namespace /camN/color/
            bag.write_msg(f"{cam}/aligned_depth/image_raw", depth, 2)
            bag.write_msg(f"{cam}/color/camera_info", CameraInfo(), 3)
            bag.write_msg(f"{cam}/info", CameraInfo(), 4)
    derived = plan_bag_file(path, depth=DepthOptions(depth_topic="depth/image_raw"))
    assert derived.depth_pairs == {"/cam1/color/image_raw": ("/cam1/color/depth/image_raw", "/cam1/color/camera_info"),
                                   "/cam2/color/image_raw": ("/cam2/color/depth/image_raw", "/cam2/color/camera_info")}
    listed = plan_bag_file(path, depth=DepthOptions(depth_topics=["/cam1/aligned_depth/image_raw",
                                                                  "/cam2/aligned_depth/image_raw"],
                                                    camera_info_topics=["/cam1/info", "/cam2/info"]))
    assert listed.depth_pairs == {"/cam1/color/image_raw": ("/cam1/aligned_depth/image_raw", "/cam1/info"),
                                  "/cam2/color/image_raw": ("/cam2/aligned_depth/image_raw", "/cam2/info")}
    assert "/cam1/color/panoptic/markers" in listed.outputs and "/cam2/color/panoptic/points" in listed.outputs
    with pytest.raises(BagError, match="--depth-topic '/x' is absolute"):
        plan_bag_file(path, depth=DepthOptions(depth_topic="/x"))
