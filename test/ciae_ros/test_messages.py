"""PanopticSegments crosses a process boundary intact (real Fast DDS on loopback).

Same-process tests hide Fast DDS's large-sample behaviour (shared memory vs fragmented UDP), so the
publisher runs in its own process: a 640x480 32SC1 id image is 1.2 MB.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.ros
rclpy = pytest.importorskip("rclpy")
msg = pytest.importorskip("ciae_ros.msg")

REPO = pathlib.Path(__file__).resolve().parents[2]

# Builds the same deterministic message in both processes.
MAKE_MESSAGE = r'''
import numpy as np
from ciae_ros.msg import PanopticSegments, Segment
from sensor_msgs.msg import RegionOfInterest

def make_message(seq):
    h, w = 480, 640
    rng = np.random.default_rng(seq)
    ids = rng.integers(0, 40, size=(h, w), dtype=np.int32)
    m = PanopticSegments()
    m.header.stamp.sec = 1000 + seq
    m.header.stamp.nanosec = 123456789
    m.header.frame_id = "camera_optical_frame"
    m.id_image.header = m.header
    m.id_image.height, m.id_image.width = h, w
    m.id_image.encoding = "32SC1"
    m.id_image.is_bigendian = 0
    m.id_image.step = w * 4
    m.id_image.data = ids.astype("<i4").tobytes()
    segs = []
    for k in range(1, 40):
        s = Segment()
        s.id = k
        s.category_id = 100 + k
        s.label = "class_%d" % k
        s.isthing = bool(k % 2)
        s.score = float(k) / 40.0
        s.area = int((ids == k).sum())
        s.bbox = RegionOfInterest(x_offset=k, y_offset=2 * k, width=10 + k, height=20 + k, do_rectify=False)
        segs.append(s)
    m.segments = segs
    m.model_name = "ciae_test"
    m.model_version = "0.1.0"
    m.input_height, m.input_width = 320, 427
    m.inference_time_ms = 12.5
    return m
'''

PUBLISHER = MAKE_MESSAGE + r'''
import sys, time, rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy, DurabilityPolicy, HistoryPolicy
from ciae_ros.msg import PanopticSegments
with rclpy.init():
    node = rclpy.create_node("segments_publisher")
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
    pub = node.create_publisher(PanopticSegments, "test/panoptic/segments", qos)
    deadline = time.monotonic() + 30
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    for seq in range(5):
        pub.publish(make_message(seq))
        time.sleep(0.1)
    time.sleep(3.0)
    node.destroy_node()
'''


def assert_messages_equal(got, want, path="msg"):
    if hasattr(want, "get_fields_and_field_types"):
        for name in want.get_fields_and_field_types():
            assert_messages_equal(getattr(got, name), getattr(want, name), f"{path}.{name}")
    elif isinstance(want, (list, tuple)) and want and hasattr(want[0], "get_fields_and_field_types"):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_messages_equal(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert np.float32(got) == np.float32(want), path
    elif isinstance(want, (bytes, bytearray, list)) or hasattr(want, "tobytes"):
        assert bytes(got) == bytes(want), path
    else:
        assert got == want, path


def test_panoptic_segments_640x480_received_intact_in_another_process():
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

    namespace: dict = {}
    exec(MAKE_MESSAGE, namespace)
    make_message = namespace["make_message"]
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    received = []
    with rclpy.init():
        node = rclpy.create_node("segments_subscriber")
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        node.create_subscription(msg.PanopticSegments, "test/panoptic/segments", received.append, qos)
        proc = subprocess.Popen([sys.executable, "-c", PUBLISHER], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while len(received) < 5 and time.monotonic() < deadline and proc.poll() is None:
                rclpy.spin_once(node, timeout_sec=0.1)
            end = time.monotonic() + 2
            while len(received) < 5 and time.monotonic() < end:
                rclpy.spin_once(node, timeout_sec=0.1)
        finally:
            proc.wait(timeout=60)
        node.destroy_node()
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    assert len(received) == 5
    for seq, got in enumerate(received):
        want = make_message(seq)
        assert len(bytes(got.id_image.data)) == 640 * 480 * 4
        # Byte-for-byte equal CDR: every field, floats at their wire precision (float32).
        # Every field equal, floats at their wire precision (float32). (Comparing re-serialised CDR
        # bytes is not reliable: alignment padding is uninitialised memory.)
        assert_messages_equal(got, want)
        assert got.header == want.header and got.segments[3].label == "class_4"
        ids = np.frombuffer(bytes(got.id_image.data), dtype="<i4").reshape(480, 640)
        for s in got.segments:
            assert s.area == int((ids == s.id).sum())
