"""``ciae-topic``: look at ROS 2 topics without a ROS install (the venv has rclpy, not ``ros2``).

``ciae-topic list [--window S]``
    every topic with its type(s), publisher count, the messages received and the rate measured
    over a ``--window``-second window (default 2 s) -- a small ``ros2 topic list -t`` plus
    ``ros2 topic hz``.
``ciae-topic echo [TOPIC] [-n N] [--timeout S]``
    the next ``N`` ``ciae_ros/PanopticSegments`` of ``TOPIC`` (default ``/panoptic/segments``) as a
    readable table: id, track, label, thing/stuff, score, area, box, and the 3-D fields (centroid,
    size, nearest distance, depth points) when a segment has them.

Subscriptions take the reliability and durability the publishers offer (a reliable subscriber
would get nothing from a best-effort camera; a latched topic such as ``panoptic/categories``
delivers its last message), so ``list`` and ``echo`` see what a matching client sees.

DDS environment: like ``ros2``, this tool uses ``ROS_DOMAIN_ID``, ``ROS_AUTOMATIC_DISCOVERY_RANGE``
and ``RMW_IMPLEMENTATION`` exactly as set, and never forces loopback (only the tests and
``ciae-demo`` do, for their own processes). To look at a running ``ciae-demo``, use the domain id
it logged and loopback discovery: ``ROS_DOMAIN_ID=<id> ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
ciae-topic list``. Like the node, it loads our large-data Fast DDS profile unless you set one.
Exit codes: 0 done, 1 a one-line error (nothing received in time, wrong type), 2 bad arguments,
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

_LOG = logging.getLogger("ciae-topic")
SEGMENTS_TYPE = "ciae_ros/msg/PanopticSegments"


class TopicToolError(RuntimeError):
    """A one-line failure of ``ciae-topic``."""


def message_class(type_name: str):
    """``"sensor_msgs/msg/Image"`` -> the rclpy message class, or ``None`` when not installed."""
    try:
        package, kind, name = type_name.split("/")
        return getattr(importlib.import_module(f"{package}.{kind}"), name)
    except (ValueError, ImportError, AttributeError):
        return None


def matching_qos(node, topic: str, depth: int = 10):
    """A subscription QoS the topic's current publishers can all serve: reliable only when every
    publisher is reliable, transient-local only when every publisher is."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    infos = node.get_publishers_info_by_topic(topic)
    reliable = bool(infos) and all(i.qos_profile.reliability == ReliabilityPolicy.RELIABLE for i in infos)
    latched = bool(infos) and all(i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for i in infos)
    return QoSProfile(depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def domain_line() -> str:
    """Which DDS world this process looks at (printed so that an empty list is understandable)."""
    return (f"ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID', '0 (unset)')}, "
            f"ROS_AUTOMATIC_DISCOVERY_RANGE={os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE', 'SUBNET (unset)')}")


# ----------------------------------------------------------------------------------------------
# list
# ----------------------------------------------------------------------------------------------

class _RateMeter:
    """Arrival times of one topic's messages (raw: nothing is deserialised)."""

    def __init__(self):
        self.count, self.first, self.last = 0, 0.0, 0.0

    def __call__(self, _data) -> None:
        now = time.monotonic()
        if self.count == 0:
            self.first = now
        self.count, self.last = self.count + 1, now

    @property
    def rate(self) -> float | None:
        """Messages per second between the first and the last arrival (``None`` below 2 messages)."""
        if self.count < 2 or self.last <= self.first:
            return None
        return (self.count - 1) / (self.last - self.first)


def list_topics(node, spin_once, window: float) -> list[dict]:
    """Discover topics for ``window`` seconds, subscribing to each as it appears; one row per topic
    (``topic``, ``types``, ``publishers``, ``messages``, ``rate`` in Hz or ``None``, ``note``)."""
    meters: dict[str, _RateMeter] = {}
    notes: dict[str, str] = {}
    subs = []
    end = time.monotonic() + window
    next_scan = 0.0
    while time.monotonic() < end:
        if time.monotonic() >= next_scan:  # topics can appear during the window
            next_scan = time.monotonic() + 0.25
            for topic, types in node.get_topic_names_and_types():
                if topic in meters or topic in notes:
                    continue
                cls = message_class(types[0])
                if cls is None:
                    notes[topic] = "type not installed here"
                    continue
                meters[topic] = _RateMeter()
                subs.append(node.create_subscription(cls, topic, meters[topic], matching_qos(node, topic), raw=True))
        spin_once(0.05)
    rows = []
    for topic, types in sorted(node.get_topic_names_and_types()):
        meter = meters.get(topic)
        rows.append({"topic": topic, "types": list(types), "publishers": node.count_publishers(topic),
                     "messages": meter.count if meter else None, "rate": meter.rate if meter else None,
                     "note": notes.get(topic, "")})
    for s in subs:
        node.destroy_subscription(s)
    return rows


def format_list(rows: list[dict], window: float) -> str:
    table = [("TOPIC", "TYPE", "PUBS", "MSGS", "RATE (Hz)")]
    for r in rows:
        rate = f"{r['rate']:.1f}" if r["rate"] is not None else (r["note"] or "-")
        table.append((r["topic"], ", ".join(r["types"]), str(r["publishers"]),
                      "-" if r["messages"] is None else str(r["messages"]), rate))
    return _table(table, right=(2, 3)) + f"\n({len(rows)} topic(s); rates over {window:g} s; {domain_line()})"


# ----------------------------------------------------------------------------------------------
# echo
# ----------------------------------------------------------------------------------------------

def _table(rows: list[tuple], right: tuple[int, ...] = ()) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _xyz(v) -> str:
    return f"{v.x:.2f},{v.y:.2f},{v.z:.2f}"


def format_segments(msg, topic: str) -> str:
    """One ``PanopticSegments`` as a header line and a table (3-D columns when a segment has them)."""
    stamp = f"{msg.header.stamp.sec}.{msg.header.stamp.nanosec:09d}"
    has_3d = any(getattr(s, "has_3d", False) for s in msg.segments)
    head = (f"{topic}  stamp {stamp}  frame '{msg.header.frame_id}'  image {msg.id_image.width}x{msg.id_image.height}"
            f"  input {msg.input_width}x{msg.input_height}  model {msg.model_name or '?'}"
            f"{f' ({msg.model_version})' if msg.model_version else ''}  inference {msg.inference_time_ms:.1f} ms"
            f"  {len(msg.segments)} segment(s)")
    if has_3d:
        head += f"  3-D in '{getattr(msg, 'depth_frame_id', '')}'"
    cols = ["ID", "TRACK", "LABEL", "KIND", "SCORE", "AREA", "BOX x,y,w,h"]
    if has_3d:
        cols += ["CENTROID x,y,z (m)", "SIZE x,y,z (m)", "NEAREST (m)", "DEPTH PX"]
    rows = [tuple(cols)]
    for s in msg.segments:
        track = getattr(s, "track_id", 0)
        row = [s.id, track if track else "-", s.label, "thing" if s.isthing else "stuff", f"{s.score:.2f}", s.area,
               f"{s.bbox.x_offset},{s.bbox.y_offset},{s.bbox.width},{s.bbox.height}"]
        if has_3d:
            row += ([_xyz(s.centroid), _xyz(s.size), f"{s.min_distance:.2f}", s.depth_points]
                    if s.has_3d else ["-", "-", "-", "-"])
        rows.append(tuple(row))
    return head + "\n" + _table(rows, right=(0, 1, 4, 5))


def echo_segments(node, spin_once, topic: str, count: int, timeout: float) -> list:
    """The next ``count`` messages of ``topic`` (``TopicToolError`` when the topic has another type,
    or when none arrives within ``timeout`` seconds)."""
    from ciae_ros.msg import PanopticSegments

    received: list = []
    sub = None
    deadline = time.monotonic() + timeout
    while len(received) < count:
        if time.monotonic() > deadline:
            pubs = node.count_publishers(topic)
            raise TopicToolError(f"no message on {topic} within {timeout:g} s ({pubs} publisher(s); {domain_line()}); "
                                 "is the node running in this domain? `ciae-topic list` shows what is there")
        if sub is None:
            types = dict(node.get_topic_names_and_types()).get(topic)
            if types and SEGMENTS_TYPE not in types:
                raise TopicToolError(f"{topic} is {', '.join(types)}; ciae-topic echo shows {SEGMENTS_TYPE}")
            if types:  # subscribe once a publisher is known, with the QoS it offers
                sub = node.create_subscription(PanopticSegments, topic, received.append,
                                               matching_qos(node, topic, depth=max(10, count)))
        spin_once(0.1)
    node.destroy_subscription(sub)
    return received[:count]


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ciae-topic", description="Look at ROS 2 topics without the ros2 command.",
                                 epilog="Uses ROS_DOMAIN_ID and ROS_AUTOMATIC_DISCOVERY_RANGE as set (never forces "
                                        "loopback). For a ciae-demo run: ROS_DOMAIN_ID=<the id it logged> "
                                        "ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ciae-topic list")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{list,echo}", help="what to do")
    lst = sub.add_parser("list", help="topics with types, publishers and measured rates")
    lst.add_argument("--window", type=float, default=2.0, help="seconds to discover and measure (default 2)")
    echo = sub.add_parser("echo", help="PanopticSegments messages as a table")
    echo.add_argument("topic", nargs="?", default="/panoptic/segments",
                      help="a ciae_ros/PanopticSegments topic (default /panoptic/segments)")
    echo.add_argument("-n", "--count", type=int, default=1, help="messages to print (default 1)")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for them (default 10)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``ciae-topic list|echo``; exit status."""
    logging.basicConfig(level=logging.INFO, format="ciae-topic: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "list" and args.window <= 0 or args.command == "echo" and (args.count < 1 or args.timeout <= 0):
        print("ciae-topic: error: --window and --timeout must be > 0 and --count >= 1", file=sys.stderr)
        return 2
    try:
        import rclpy
        from rclpy.signals import SignalHandlerOptions

        import ciae_ros.msg  # noqa: F401 - generated by rosidl, not by pip
    except ImportError as exc:
        print(f"ciae-topic: error: needs rclpy and the built ciae_ros messages ({exc}); run `make setup`",
              file=sys.stderr)
        return 1
    from .resources import use_large_data_dds_profile

    use_large_data_dds_profile()
    try:
        with rclpy.init(args=["ciae-topic"], signal_handler_options=SignalHandlerOptions.NO):
            node = rclpy.create_node(f"ciae_topic_{os.getpid()}")

            def spin_once(timeout: float) -> None:
                rclpy.spin_once(node, timeout_sec=timeout)

            try:
                if args.command == "list":
                    print(format_list(list_topics(node, spin_once, args.window), args.window))
                else:
                    for msg in echo_segments(node, spin_once, args.topic, args.count, args.timeout):
                        print(format_segments(msg, args.topic), flush=True)
            finally:
                node.destroy_node()
    except TopicToolError as exc:
        print(f"ciae-topic: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
