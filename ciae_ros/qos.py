"""QoS choices of the panoptic node.

Camera drivers differ: many offer RELIABLE (the ROS default, and what ``image_transport`` uses),
others BEST_EFFORT (``qos_profile_sensor_data``). A RELIABLE subscription never matches a
BEST_EFFORT publisher, and a BEST_EFFORT subscription to a RELIABLE publisher in another process
loses most large (fragmented) samples. So by default (``auto``) the input subscription copies
the reliability that the topic's publishers offer, the way rosbag2 does: RELIABLE when every
publisher offers RELIABLE, else BEST_EFFORT. Durability is always VOLATILE (matches every
publisher), history KEEP_LAST with a small depth (we only want the newest frame).
"""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from ciae_core.user_input import quote

RELIABILITY_CHOICES = ("auto", "reliable", "best_effort")
_POLICIES = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}


def reliability_policy(name: str) -> ReliabilityPolicy:
    """``"reliable"``/``"best_effort"`` -> rclpy policy (``ValueError`` otherwise)."""
    try:
        return _POLICIES[name]
    except KeyError:
        raise ValueError(f"reliability must be one of {', '.join(_POLICIES)}, got {quote(name)}") from None


def policy_name(policy: ReliabilityPolicy) -> str:
    return "reliable" if policy == ReliabilityPolicy.RELIABLE else "best_effort"


def offered_reliability(publisher_infos) -> ReliabilityPolicy | None:
    """Reliability a subscription needs to receive from all of ``publisher_infos``.

    ``publisher_infos`` is ``Node.get_publishers_info_by_topic(...)``. ``None`` when the list is
    empty (nobody publishes yet: decide later).
    """
    infos = list(publisher_infos)
    if not infos:
        return None
    if all(i.qos_profile.reliability == ReliabilityPolicy.RELIABLE for i in infos):
        return ReliabilityPolicy.RELIABLE
    return ReliabilityPolicy.BEST_EFFORT


def input_qos(reliability: ReliabilityPolicy, depth: int = 1) -> QoSProfile:
    """QoS of an image input subscription."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability,
                      durability=DurabilityPolicy.VOLATILE)


def output_qos(reliability: str = "reliable", depth: int = 1) -> QoSProfile:
    """QoS of the per-frame outputs (segments, overlay, confidence, detections)."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability_policy(reliability),
                      durability=DurabilityPolicy.VOLATILE)


def latched_qos() -> QoSProfile:
    """QoS of ``panoptic/categories``: published once, delivered to late subscribers."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)
