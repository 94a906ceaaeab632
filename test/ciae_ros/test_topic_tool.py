"""``ciae-topic`` (ciae_ros/topic_tool.py) across processes: a publisher process offers what the node
offers (reliable PanopticSegments with a tracked, 3-D segment; latched categories; a best-effort
camera), and ``python -m ciae_ros.topic_tool`` lists and echoes them from a third process."""

from __future__ import annotations

import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.ros
pytest.importorskip("rclpy")
pytest.importorskip("ciae_ros.msg")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ros_testing import REPO, child_env  # noqa: E402

NS = "/tt"
RATE_HZ = 20.0


def _publish(ns: str) -> int:
    """The publisher process (this file run as a script)."""
    import rclpy
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from ciae_ros.msg import Category, CategoryArray, PanopticSegments, Segment

    with rclpy.init(args=["topic_tool_test_publisher"]):
        node = rclpy.create_node("topic_tool_test_publisher")
        segs = node.create_publisher(PanopticSegments, ns + "/panoptic/segments",
                                     QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
        cats = node.create_publisher(CategoryArray, ns + "/panoptic/categories",
                                     QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                                durability=DurabilityPolicy.TRANSIENT_LOCAL))
        cam = node.create_publisher(Image, ns + "/camera/image_raw",
                                    QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
        cats.publish(CategoryArray(model_name="m", categories=[Category(id=1, name="disc", isthing=True)]))
        msg = PanopticSegments(model_name="ciae_test", model_version="sha256:abc", input_height=320, input_width=427,
                               inference_time_ms=12.5, depth_frame_id="depth_optical")
        msg.header.frame_id = "cam"
        msg.id_image.width, msg.id_image.height = 640, 480
        sky = Segment(id=1, category_id=11, label="sky", isthing=False, score=0.97, area=5000)
        sky.bbox.width, sky.bbox.height = 100, 50
        disc = Segment(id=2, category_id=1, label="disc", isthing=True, score=0.91, area=321, track_id=7,
                       has_3d=True, min_distance=1.85, depth_points=300)
        disc.bbox.x_offset, disc.bbox.y_offset, disc.bbox.width, disc.bbox.height = 10, 20, 30, 40
        disc.centroid.x, disc.centroid.y, disc.centroid.z = 0.5, -0.25, 2.0
        disc.size.x, disc.size.y, disc.size.z = 0.3, 0.3, 0.1
        msg.segments = [sky, disc]
        image = Image(width=8, height=8, encoding="mono8", step=8, data=bytes(64))

        def tick():
            msg.header.stamp = node.get_clock().now().to_msg()
            segs.publish(msg)
            cam.publish(image)

        node.create_timer(1.0 / RATE_HZ, tick)
        print("ready", flush=True)
        try:
            rclpy.spin(node)
        except KeyboardInterrupt:
            pass
    return 0


@pytest.fixture(scope="module")
def publisher():
    proc = subprocess.Popen([sys.executable, __file__, NS], env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _topic(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ciae_ros.topic_tool", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=child_env())


def test_echo_prints_segments_as_a_table_with_tracks_and_3d(publisher):
    r = _topic("echo", f"{NS}/panoptic/segments", "--timeout", "120")
    assert r.returncode == 0, r.stderr
    head, columns, sky, disc = r.stdout.strip().splitlines()
    assert head.startswith(f"{NS}/panoptic/segments  stamp ")
    for part in ("frame 'cam'", "image 640x480", "input 427x320", "model ciae_test (sha256:abc)", "12.5 ms",
                 "2 segment(s)", "3-D in 'depth_optical'"):
        assert part in head, head
    assert columns.split()[:7] == ["ID", "TRACK", "LABEL", "KIND", "SCORE", "AREA", "BOX"]
    assert "CENTROID" in columns and "NEAREST" in columns
    assert sky.split() == ["1", "-", "sky", "stuff", "0.97", "5000", "0,0,100,50", "-", "-", "-", "-"]
    assert disc.split() == ["2", "7", "disc", "thing", "0.91", "321", "10,20,30,40", "0.50,-0.25,2.00",
                            "0.30,0.30,0.10", "1.85", "300"]


def test_list_shows_types_and_measured_rates(publisher):
    _topic("echo", f"{NS}/panoptic/segments", "--timeout", "120")  # the publisher is discoverable by now
    r = _topic("list", "--window", "4")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:] if line.startswith("/")}
    seg = rows[f"{NS}/panoptic/segments"]
    cam = rows[f"{NS}/camera/image_raw"]
    cats = rows[f"{NS}/panoptic/categories"]
    assert seg[1:3] == ["ciae_ros/msg/PanopticSegments", "1"] and cam[1] == "sensor_msgs/msg/Image"
    for row in (seg, cam):  # the best-effort camera is received too (matching QoS)
        assert 2.0 < float(row[-1]) < 5 * RATE_HZ, row
    assert cats[1] == "ciae_ros/msg/CategoryArray" and cats[3] == "1", "the latched message is received"
    assert re.search(r"ROS_DOMAIN_ID=\d+, ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST", r.stdout)


def test_echo_errors_are_one_line(publisher):
    _topic("echo", f"{NS}/panoptic/segments", "--timeout", "120")
    r = _topic("echo", f"{NS}/camera/image_raw", "--timeout", "120")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "is sensor_msgs/msg/Image" in r.stderr and "PanopticSegments" in r.stderr
    t0 = time.monotonic()
    r = _topic("echo", "/no_such_topic", "--timeout", "1")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no message on /no_such_topic within 1 s" in r.stderr
    assert time.monotonic() - t0 < 120


def test_help_explains_every_option():
    from ciae_ros.topic_tool import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for p in (parser, *subparsers.values()):
        for action in p._actions:
            assert action.help, f"{p.prog} {action.option_strings or action.dest} has no help text"
    r = _topic("--help")
    assert r.returncode == 0 and "never forces loopback" in " ".join(r.stdout.split())


if __name__ == "__main__":
    sys.exit(_publish(sys.argv[1]))
