"""ciae_ros.node_depth in this process: a real rclpy node holding NodeDepth, fed depth, camera info
and segment messages directly (the depth subscriptions' callbacks are the synchroniser's add_*
methods), its outputs received by a subscriber in another context. The node process over DDS is
tested in test_node.py (test_node_3d_*).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("ciae_ros.msg")

from builtin_interfaces.msg import Time  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from ciae_core.depth import SegmentDepth, metres_to_uint16  # noqa: E402
from ciae_core.structures import PanopticResult, Segment as CoreSegment  # noqa: E402
from ciae_core.synth import SYNTH_CATEGORIES  # noqa: E402
from ciae_core.synth_depth import geometry_errors  # noqa: E402
from ciae_ros.conversions import segments_msg  # noqa: E402
from ciae_ros.node_depth import NodeDepth, depth_topic_pairs, sibling_camera_info  # noqa: E402
from ciae_ros.node_diagnostics import StageTimes  # noqa: E402
from ciae_ros.node_params import SPECS  # noqa: E402
from ciae_ros.point_cloud import cloud_points, points_from_msg, segment_tables  # noqa: E402
from ciae_ros.qos import output_qos  # noqa: E402
from ciae_ros.spatial_outputs import segment_colour_table  # noqa: E402
from rgbd_testing import rgbd_messages, rgbd_scene  # noqa: E402
from ros_testing import Client  # noqa: E402

H, W = 240, 320
SEED = 5


def _values(**kw) -> dict:
    return {**{name: spec.default for name, spec in SPECS.items()}, "depth_topic": "camera/depth/image_raw", **kw}


def test_topic_rules():
    def resolve(name):
        return name if name.startswith("/") else "/robot/" + name

    one = [("/robot/camera/image_raw", "")]
    assert depth_topic_pairs(_values(depth_topic=""), one, resolve) == [None]
    assert depth_topic_pairs(_values(), one, resolve) == [("/robot/camera/depth/image_raw", "/robot/camera/camera_info")]
    assert depth_topic_pairs(_values(camera_info_topic="camera/aligned_depth_to_color/camera_info"), one, resolve) \
        == [("/robot/camera/depth/image_raw", "/robot/camera/aligned_depth_to_color/camera_info")]
    two = [("/robot/cam1/color/image_raw", "cam1/color/"), ("/cam2/image_raw", "/cam2/")]
    several = _values(image_topics=["cam1/color/image_raw", "/cam2/image_raw"], depth_topic="depth/image_raw")
    assert depth_topic_pairs(several, two, resolve) == [
        ("/robot/cam1/color/depth/image_raw", "/robot/cam1/color/camera_info"),
        ("/cam2/depth/image_raw", "/cam2/camera_info")]
    listed = {**several, "depth_topics": ["/d1", "d2"], "camera_info_topics": ["/i1", "/i2"]}
    assert depth_topic_pairs(listed, two, resolve) == [("/d1", "/i1"), ("/robot/d2", "/i2")]
    assert sibling_camera_info("/image_raw") == "/camera_info"


class _Warnings:
    """The node's throttled warn(key, text), recorded."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def __call__(self, key: str, text: str) -> None:
        self.lines.append((key, text))


@pytest.fixture(scope="module")
def scene():
    return rgbd_scene(SEED, H, W)


@pytest.fixture()
def harness():
    """A node of our own holding NodeDepth (one camera with depth), and a client in another context."""
    from rclpy.context import Context

    ctx = Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("ciae_test_node_depth", context=ctx)
    warn = _Warnings()
    nd = NodeDepth(node, warn, StageTimes())
    nd.create(_values(), [(node.resolve_topic_name("camera/image_raw"), "")], output_qos(), vision_msgs=False)
    client = Client("ciae_test_node_depth_client")
    yield nd, warn, client
    client.close()
    nd.destroy()
    node.destroy_node()
    ctx.try_shutdown()


def _frame(nd, scene, k: int, **opts):
    """Feed camera 0 the depth and camera info of frame ``k`` (``opts``: rgbd_messages' bad inputs)
    and return the 2-D segments message of its colour image (the true masks as the model's result)."""
    image, depth, info = rgbd_messages({"seed": SEED, "h": H, "w": W, "stamp": [100 + k, 5000], **opts},
                                       {("rgbd", SEED, H, W): scene})
    if depth is not None:
        nd.cameras[0].sync.add_depth(depth)
    if info is not None:
        nd.cameras[0].sync.add_camera_info(info)
    segs = [CoreSegment(s["id"], s["category_id"], str(s["category_id"]), bool(s["isthing"]), 1.0, s["area"],
                        tuple(s["bbox"])) for s in scene.info]
    return segments_msg(PanopticResult(scene.pan, segs), image.header)


def _two_d(msg) -> tuple:
    """Everything of a segments message but its 3-D fields (what bad depth must never change);
    compared by value (CDR padding bytes of a serialised message are not defined)."""
    segs = [(s.id, s.category_id, s.label, s.isthing, s.score, s.area, s.track_id, s.bbox.x_offset, s.bbox.y_offset,
             s.bbox.width, s.bbox.height) for s in msg.segments]
    img = msg.id_image
    return (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id, img.height, img.width, img.encoding,
            img.step, bytes(img.data), segs, msg.model_name, msg.model_version, msg.input_height, msg.input_width,
            msg.inference_time_ms)


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_good_depth_fills_3d_as_the_library_computes_it(harness, scene, encoding):
    nd, warn, _ = harness
    msg = _frame(nd, scene, 1, encoding=encoding)
    frame = nd.fill(0, msg, scene.pan)
    assert frame is not None and msg.depth_frame_id == "camera_depth_optical_frame" and warn.lines == []
    fed = metres_to_uint16(scene.measured) if encoding == "16UC1" else scene.measured
    np.testing.assert_array_equal(frame.depth, fed)
    ref = SegmentDepth()(scene.pan, fed, scene.render.K, ids=[s.id for s in msg.segments])
    assert sum(s.has_3d for s in msg.segments) == int(ref.has_3d.sum()) > 0
    for s in msg.segments:
        r = ref.row(s.id)
        assert s.has_3d == bool(ref.has_3d[r])
        if s.has_3d:
            assert [s.centroid.x, s.centroid.y, s.centroid.z] == pytest.approx(ref.centroid[r].tolist(), abs=1e-6)
            assert [s.size.x, s.size.y, s.size.z] == pytest.approx(ref.size[r].tolist(), abs=1e-6)
            assert s.depth_points == ref.points[r] and s.min_distance == pytest.approx(ref.min_distance[r], abs=1e-6)
    # against the rendered truth: the accuracy of ciae_core.depth's tests
    e = geometry_errors(frame.geometry, scene.render.truth)
    assert e["lost"].size == 0 and np.median(e["centroid"]) < 0.02 and np.median(e["size"]) < 0.10
    assert nd.cameras[0].counts == {"frames_3d": 1}


BAD_DEPTH = {  # reason -> options of rgbd_messages
    "no_depth": {"no_depth": True},
    "no_camera_info": {"no_info": True},
    "stamp_out_of_tolerance": {"depth_dt": 0.05},
    "depth_size_mismatch": {"depth_hw": (H // 2, W // 2)},
    "depth_encoding": {"encoding": "mono16le"},
    "depth_data": {"truncate": True},
    "depth_all_invalid": {"invalid": True},
    "bad_intrinsics": {"k_zero": True},
    "camera_info_size_mismatch": {"info_hw": (H * 2, W * 2)},
}


@pytest.mark.parametrize("reason", list(BAD_DEPTH))
def test_bad_depth_costs_only_the_3d_and_is_counted_and_warned(harness, scene, reason):
    nd, warn, _ = harness
    msg = _frame(nd, scene, 2, **BAD_DEPTH[reason])
    before = _two_d(msg)
    assert nd.fill(0, msg, scene.pan) is None
    assert not any(s.has_3d for s in msg.segments) and msg.depth_frame_id == ""
    assert _two_d(msg) == before, "the 2-D content must not change"
    assert nd.cameras[0].counts == {f"no_3d_{reason}": 1}
    assert len(warn.lines) == 1 and warn.lines[0][0].endswith(":" + reason) and reason in warn.lines[0][1]
    values, warning = nd.diagnostics()[0]
    values = dict(values)
    assert values[f"no_3d_{reason}"] == "1" and values["frames_no_3d"] == "1" and values["frames_3d"] == "0"
    assert warning == f"1 frame(s) without 3-D in the last period (most often: {reason})"
    assert nd.diagnostics()[0][1] is None, "the warning belongs to its period only"


def _shown_after(arrays) -> dict:
    """What rviz shows after the received MarkerArrays, in order: (ns, id) -> marker."""
    from visualization_msgs.msg import Marker

    shown = {}
    for arr in arrays:
        for m in arr.markers:
            if m.action == Marker.ADD:
                shown[(m.ns, m.id)] = m
            elif m.action == Marker.DELETE:
                shown.pop((m.ns, m.id), None)
    return shown


def test_markers_of_a_frame_without_3d_are_deleted(harness, scene):
    from visualization_msgs.msg import MarkerArray

    nd, _, client = harness
    got = client.subscribe(MarkerArray, "/panoptic/markers")
    assert _wait(lambda: nd.cameras[0].pub_markers.get_subscription_count() >= 1)
    cats = SYNTH_CATEGORIES
    msg = _frame(nd, scene, 3)
    nd.publish(0, nd.fill(0, msg, scene.pan), msg, scene.image, scene.pan, cats)
    things = {s.id for s in msg.segments if s.isthing and s.has_3d}
    assert _wait(lambda: len(got) == 1)
    shown = _shown_after(m for _, m in got.snapshot())
    assert {k for k in shown if k[0] == "segments"} == {("segments", i) for i in things} and things
    box = shown[("segments", min(things))]
    assert box.header.frame_id == "camera_depth_optical_frame" and box.header.stamp.sec == 103
    msg = _frame(nd, scene, 4, depth_dt=1.0)  # no depth within the tolerance: every marker goes
    nd.publish(0, nd.fill(0, msg, scene.pan), msg, scene.image, scene.pan, cats)
    assert _wait(lambda: len(got) == 2)
    assert _shown_after(m for _, m in got.snapshot()) == {}
    nd.stop()  # nothing left to delete: nothing sent
    time.sleep(0.5)
    assert len(got) == 2


def test_points_only_while_subscribed_and_read_back(harness, scene):
    from sensor_msgs.msg import PointCloud2

    nd, _, client = harness
    cam = nd.cameras[0]
    msg = _frame(nd, scene, 5)
    nd.publish(0, nd.fill(0, msg, scene.pan), msg, scene.image, scene.pan, SYNTH_CATEGORIES)
    assert "point_clouds" not in cam.counts, "no subscriber: no cloud computed"
    got = client.subscribe(PointCloud2, "/panoptic/points")
    assert _wait(lambda: cam.pub_points.get_subscription_count() >= 1)
    msg = _frame(nd, scene, 6)
    frame = nd.fill(0, msg, scene.pan)
    nd.publish(0, frame, msg, scene.image, scene.pan, SYNTH_CATEGORIES)
    assert cam.counts["point_clouds"] == 1
    assert _wait(lambda: len(got) == 1)
    cloud = got.snapshot()[0][1]
    assert cloud.header.frame_id == "camera_depth_optical_frame" and cloud.header.stamp.sec == 106
    cat, track = segment_tables(msg.segments)
    want = cloud_points(scene.pan, frame.depth, frame.intrinsics, cat, track, stride=4,
                        segment_colors=segment_colour_table(msg.segments, SYNTH_CATEGORIES))
    back = points_from_msg(cloud)
    assert back.size == want.size > 1000
    for name in want.dtype.names:
        np.testing.assert_array_equal(back[name], want[name], err_msg=name)


def test_run_time_settings_apply_from_the_next_frame(harness, scene):
    from sensor_msgs.msg import PointCloud2

    nd, warn, client = harness
    cam = nd.cameras[0]
    got = client.subscribe(PointCloud2, "/panoptic/points")
    assert _wait(lambda: cam.pub_points.get_subscription_count() >= 1)
    msg = _frame(nd, scene, 7, depth_dt=0.03)
    assert nd.fill(0, msg, scene.pan) is None  # 30 ms > sync_tolerance 0.02
    nd.apply(_values(sync_tolerance=0.05, points_stride=8, points_color="image", max_depth=0.5))
    msg = _frame(nd, scene, 8, depth_dt=0.03)
    assert nd.fill(0, msg, scene.pan) is None, "every depth beyond max_depth 0.5 m"
    assert cam.counts == {"no_3d_stamp_out_of_tolerance": 1, "no_3d_depth_all_invalid": 1}
    nd.apply(_values(sync_tolerance=0.05, points_stride=8, points_color="image"))
    msg = _frame(nd, scene, 9, depth_dt=0.03)
    frame = nd.fill(0, msg, scene.pan)
    assert frame is not None
    nd.publish(0, frame, msg, scene.image, scene.pan, SYNTH_CATEGORIES)
    assert _wait(lambda: len(got) == 1)
    back = points_from_msg(got.snapshot()[0][1])
    cat, track = segment_tables(msg.segments)
    want = cloud_points(scene.pan, frame.depth, frame.intrinsics, cat, track, stride=8, image_rgb=scene.image)
    np.testing.assert_array_equal(back["rgb"], want["rgb"])
    assert back.size == want.size


# --------------------------------------------------------------------------------------------
# Across processes: the node (its own process) fed colour + depth + camera_info by a camera process
# --------------------------------------------------------------------------------------------

HC, WC = 480, 640  # images between processes at 640x480 (see ros_testing)
DEPTH_TOPIC, INFO_TOPIC = "/camera/depth/image_raw", "/camera/camera_info"


@pytest.fixture(scope="module")
def depth_node(node_weights, tmp_path_factory):
    """Node (depth_topic set, camera info by the sibling rule), RGB-D camera, client subscriptions."""
    from types import SimpleNamespace

    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from visualization_msgs.msg import MarkerArray

    from ciae_ros.msg import CategoryArray, PanopticSegments
    from ros_testing import NodeProcess, Publisher

    client = Client("ciae_test_depth_node_client")
    out = SimpleNamespace(
        client=client, segments=client.subscribe(PanopticSegments, "/panoptic/segments"),
        markers=client.subscribe(MarkerArray, "/panoptic/markers"),
        diagnostics=client.subscribe(DiagnosticArray, "/diagnostics"),
        categories=client.subscribe(CategoryArray, "/panoptic/categories", QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)))
    node = NodeProcess(tmp_path_factory.mktemp("depth_node") / "node.log", node_weights,
                       params={"input_size": 320, "diagnostics_period": 0.5, "depth_topic": "camera/depth/image_raw"})
    cam = None
    try:
        node.wait_ready(out.categories)
        cam = Publisher("/camera/image_raw")
        cam.rgbd_advertise(DEPTH_TOPIC, INFO_TOPIC)
        for which in ("image", "depth", "info"):  # the node subscribes once it sees each publisher (<= 1 s)
            assert cam.wait_subscribers(1, timeout=60, which=which) >= 1, f"the node did not subscribe ({which})"
        out.node, out.cam = node, cam
        # a sample published right after the publisher saw the subscription can wait for a reliable
        # re-send (heartbeat period): until one frame has 3-D, later frames may lack their camera info
        deadline = time.monotonic() + 180
        while not _send(out).depth_frame_id:
            assert time.monotonic() < deadline, f"no frame with 3-D\n{node.log()[-3000:]}"
        yield out
    finally:
        if cam is not None:
            cam.close()
        rc = node.stop()
        client.close()
        assert rc == 0, f"node exit status {rc}:\n{node.log()[-3000:]}"


_stamps = iter(range(1, 10_000))


def _send(env, seed: int = 7, timeout: float = 120.0, **opts):
    """Publish one RGB-D frame; the node's segments message for it."""
    stamp = (2000 + next(_stamps), 777)
    env.cam.rgbd(HC, WC, stamp, seed=seed, **opts)
    msg = env.segments.wait_for(lambda m: (m.header.stamp.sec, m.header.stamp.nanosec) == stamp, timeout=timeout)
    assert msg is not None, f"no segments for the frame {stamp}\n{env.node.log()[-3000:]}"
    return msg


def _send_until(env, predicate, timeout: float = 180.0, **opts):
    """Publish frames until the node's output for one satisfies ``predicate``: a depth message
    (0.6 MB, fragmented) can arrive after its colour frame was processed when a lost fragment
    waits for a reliable re-send; that frame then (rightly) has no 3-D, for another reason."""
    deadline = time.monotonic() + timeout
    while True:
        msg = _send(env, **opts)
        if predicate(msg):
            return msg
        assert time.monotonic() < deadline, f"no output as expected within {timeout} s\n{env.node.log()[-3000:]}"


def _camera_diag(env, predicate, timeout: float = 30.0):
    from ros_testing import diagnostics_values

    since = len(env.diagnostics)  # a message published after the frames in question
    msg = env.diagnostics.wait_for(lambda m: predicate(diagnostics_values(m, ": /camera/image_raw") or {}),
                                   timeout=timeout, since=since)
    assert msg is not None, f"diagnostics never matched\n{env.node.log()[-3000:]}"
    return msg, diagnostics_values(msg, ": /camera/image_raw")


def test_node_3d_across_processes_is_the_librarys_and_near_the_rendered_truth(depth_node):
    from ciae_core.synth_depth import segment_truth
    from ciae_ros.image_conversion import image_msg_to_array

    env = depth_node
    msg = _send_until(env, lambda m: m.depth_frame_id)
    ids = image_msg_to_array(msg.id_image)
    with_3d = [s for s in msg.segments if s.has_3d]
    assert msg.depth_frame_id == "camera_depth_optical_frame" and len(with_3d) >= 3, env.node.log()[-2000:]
    sc = rgbd_scene(7, HC, WC)
    sent = metres_to_uint16(sc.measured)  # what the camera sent (16UC1, mm)
    ref = SegmentDepth()(ids, sent, sc.render.K, ids=[s.id for s in msg.segments])
    for s in msg.segments:  # exactly what the library computes from the node's masks and our depth
        r = ref.row(s.id)
        assert s.has_3d == bool(ref.has_3d[r]), s.id
        if s.has_3d:
            assert [s.centroid.x, s.centroid.y, s.centroid.z] == pytest.approx(ref.centroid[r].tolist(), abs=1e-6)
    # against the rendered truth of the node's own segments (exact depth, whole masks)
    e = geometry_errors(ref, segment_truth(sc.render.depth, ids, sc.render.K, ids=ref.ids))
    assert np.median(e["centroid"]) < 0.02 and np.median(e["size"]) < 0.10, e
    _, values = _camera_diag(env, lambda v: int(v.get("frames_3d", 0)) >= 1)
    assert values["depth_topic"] == DEPTH_TOPIC and values["camera_info_topic"] == INFO_TOPIC


def test_node_bad_depth_across_processes_keeps_2d_deletes_markers_counts(depth_node):
    env = depth_node
    good = _send_until(env, lambda m: m.depth_frame_id)
    things = {s.id for s in good.segments if s.isthing and s.has_3d}
    assert things
    stamp = (good.header.stamp.sec, good.header.stamp.nanosec)
    got = env.markers.wait_for(lambda m: any(k.header.stamp.sec == stamp[0] for k in m.markers), timeout=30)
    assert got is not None
    since = len(env.markers)
    bad = _send(env, depth_hw=(HC // 2, WC // 2))  # depth of another size than the colour image
    assert bad.segments and not any(s.has_3d for s in bad.segments) and bad.depth_frame_id == ""
    assert [s.id for s in bad.segments] == [s.id for s in good.segments] and bad.id_image.data == good.id_image.data
    deleted = env.markers.wait_for(lambda m: any(k.header.stamp.sec == bad.header.stamp.sec for k in m.markers),
                                   timeout=30, since=since)
    assert deleted is not None, "the markers of the good frame were never deleted"
    assert _shown_after(m for _, m in env.markers.snapshot()) == {}
    # counted by its own reason (more frames if that depth image came late: stamp_out_of_tolerance)
    _send_until(env, lambda m: "differs from the colour image" in env.node.log(), depth_hw=(HC // 2, WC // 2))
    _camera_diag(env, lambda v: int(v.get("no_3d_depth_size_mismatch", 0)) >= 1)


def test_node_points_only_while_subscribed_across_processes(depth_node):
    from sensor_msgs.msg import PointCloud2

    from ciae_ros.image_conversion import image_msg_to_array

    env = depth_node
    _send(env)
    _, values = _camera_diag(env, lambda v: int(v.get("frames_3d", 0)) >= 1)
    assert values["point_clouds"] == "0", "no subscriber: no point cloud may be computed"
    clouds = env.client.subscribe(PointCloud2, "/panoptic/points")
    deadline = time.monotonic() + 120
    cloud = None
    while cloud is None and time.monotonic() < deadline:  # until the node has seen the subscription
        msg = _send(env, seed=8)
        cloud = clouds.wait_for(lambda m: m.header.stamp == msg.header.stamp, timeout=5)
    assert cloud is not None, env.node.log()[-3000:]
    sc = rgbd_scene(8, HC, WC)
    ids = image_msg_to_array(msg.id_image)
    cat, track = segment_tables(msg.segments)
    want = cloud_points(ids, metres_to_uint16(sc.measured), depth_input_intrinsics(sc), cat, track, stride=4,
                        segment_colors=segment_colour_table(msg.segments, SYNTH_CATEGORIES))
    back = points_from_msg(cloud)
    assert cloud.header.frame_id == "camera_depth_optical_frame" and back.size == want.size > 1000
    for name in want.dtype.names:
        np.testing.assert_array_equal(back[name], want[name], err_msg=name)
    _camera_diag(env, lambda v: int(v.get("point_clouds", 0)) >= 1)


def depth_input_intrinsics(sc):
    from ciae_core.depth import Intrinsics

    return Intrinsics.from_matrix(sc.render.K)


def test_node_depth_parameters_at_run_time(depth_node):
    env = depth_node
    node = "/ciae_panoptic"
    [res] = env.client.set_parameters(node, min_depth=20.0)  # above max_depth 10
    assert not res.successful and "0 < min_depth < max_depth" in res.reason
    [res] = env.client.set_parameters(node, depth_topic="/other/depth")
    assert not res.successful and "read-only" in res.reason
    [res] = env.client.set_parameters(node, points_stride=0)  # outside the declared range
    assert not res.successful
    [res] = env.client.set_parameters(node, max_depth=0.5)  # every depth of the scene is farther
    assert res.successful
    try:
        bad = _send(env)
        assert not any(s.has_3d for s in bad.segments)
        _send_until(env, lambda m: "no depth pixel within [0.1, 0.5] m" in env.node.log())
        _camera_diag(env, lambda v: int(v.get("no_3d_depth_all_invalid", 0)) >= 1)
    finally:
        [res] = env.client.set_parameters(node, max_depth=10.0)
        assert res.successful
    assert env.client.get_parameters(node, "min_depth", "max_depth", "depth_topic") == [0.1, 10.0,
                                                                                          "camera/depth/image_raw"]
    assert _send_until(env, lambda m: m.depth_frame_id).depth_frame_id == "camera_depth_optical_frame"
