"""Input QoS follows what the camera's publishers offer (as rosbag2 does)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("rclpy")

from rclpy.qos import DurabilityPolicy, ReliabilityPolicy  # noqa: E402

from ciae_ros.qos import input_qos, latched_qos, offered_reliability, output_qos, reliability_policy  # noqa: E402


def _pub(rel):
    return SimpleNamespace(qos_profile=SimpleNamespace(reliability=rel))  # shaped like rclpy TopicEndpointInfo


def test_offered_reliability_matches_every_publisher():
    R, B = ReliabilityPolicy.RELIABLE, ReliabilityPolicy.BEST_EFFORT
    assert offered_reliability([]) is None, "no publisher yet: decide later"
    assert offered_reliability([_pub(R)]) == R
    assert offered_reliability([_pub(R), _pub(R)]) == R
    assert offered_reliability([_pub(B)]) == B
    assert offered_reliability([_pub(R), _pub(B)]) == B, "a reliable reader would miss the best-effort publisher"


def test_profiles():
    q = input_qos(ReliabilityPolicy.RELIABLE, 1)
    assert q.depth == 1 and q.durability == DurabilityPolicy.VOLATILE
    assert output_qos("best_effort", 3).reliability == ReliabilityPolicy.BEST_EFFORT
    assert latched_qos().durability == DurabilityPolicy.TRANSIENT_LOCAL
    with pytest.raises(ValueError, match="reliability must be one of"):
        reliability_policy("sometimes")
