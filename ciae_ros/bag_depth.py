"""3-D for ``ciae-bag`` (issue 15): the recorded depth and camera info paired with each camera's
images as the node pairs them, and the 3-D outputs written beside the segments.

Topics follow the node's rules (:func:`ciae_ros.node_depth.depth_topic_pairs`, names made
absolute): one camera: ``--depth-topic`` and ``--camera-info-topic`` (default: the image topic's
sibling ``camera_info``); several cameras: ``--depth-topics`` / ``--camera-info-topics`` in the
order of the cameras' image topics, or ``--depth-topic`` / ``--camera-info-topic`` as names under
each camera's namespace. Each named topic must be in the bag with the right type.

Pairing: a bag is read in record order and a depth image is often recorded after its colour image,
so a camera's colour frame waits until a depth image stamped at or after it has been read, or the
record time has moved ``wait`` seconds past it, or the bag ends; then the depth image of the
nearest stamp within ``sync_tolerance`` is taken (:class:`~ciae_ros.depth_sync.DepthSynchronizer`,
as in the node). A frame without usable depth is written without 3-D and counted by reason.

Outputs per camera prefix, with the colour image's header stamp and record time and the depth
image's frame: the Segment 3-D fields, ``panoptic/markers`` (vanished markers deleted) and
``panoptic/points`` (every ``points_stride``-th pixel, segment colours; ``points_stride`` 0: none).
``panoptic/detections_3d`` is not written (vision_msgs is not in the bag type store).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from ciae_core.depth import DepthError

from .depth_input import frame_geometry
from .depth_sync import DepthSynchronizer, stamp_ns
from .node_depth import DepthSettings, any_valid_depth, depth_topic_pairs
from .spatial_outputs import SegmentMarkers, fill_segments_3d, segment_colour_table

IMAGE, CAMERA_INFO = "sensor_msgs/msg/Image", "sensor_msgs/msg/CameraInfo"


class BagDepthError(ValueError):
    """The depth options do not fit the bag (one line)."""


@dataclass
class DepthOptions:
    """The ``ciae-bag`` depth options (see the module docstring)."""

    depth_topic: str = ""
    camera_info_topic: str = ""
    depth_topics: list[str] = field(default_factory=list)
    camera_info_topics: list[str] = field(default_factory=list)
    settings: DepthSettings = field(default_factory=DepthSettings)
    wait: float = 1.0

    @property
    def enabled(self) -> bool:
        return bool(self.depth_topic or self.depth_topics)


def depth_pairs(options: DepthOptions, cameras: dict[str, str], several: bool, connections) -> dict[str, tuple]:
    """Image topic -> ``(depth topic, camera info topic)`` of every camera (``cameras``: image topic ->
    output prefix of :func:`ciae_ros.bag.plan_bag`); ``BagDepthError`` when the options break the
    node's rules or name a topic the bag lacks (or holds with another type)."""
    from .node_params import SPECS, depth_values_error

    bases = list(cameras)
    values = {name: spec.default for name, spec in SPECS.items()}
    values.update(image_topics=bases if several else [], depth_topic=options.depth_topic,
                  camera_info_topic=options.camera_info_topic, depth_topics=list(options.depth_topics),
                  camera_info_topics=list(options.camera_info_topics),
                  min_depth=options.settings.min_depth, max_depth=options.settings.max_depth)
    err = depth_values_error(values)
    if err:
        raise BagDepthError(err.replace("image_topics", "--topics").replace("depth_topic", "--depth-topic")
                            .replace("camera_info_topic", "--camera-info-topic").replace("_", "-"))
    pairs = depth_topic_pairs(values, [(b, _camera_ns(b) if several else "") for b in bases],
                              lambda name: name if name.startswith("/") else "/" + name)
    types = {c.topic: c.msgtype for c in connections}
    out = {}
    for base, pair in zip(bases, pairs):
        for topic, want in zip(pair, (IMAGE, CAMERA_INFO)):
            if types.get(topic) != want:
                have = f"holds {types[topic]}" if topic in types else "has no such topic"
                raise BagDepthError(f"{topic} ({want.rsplit('/', 1)[-1]} for camera {base}): the bag {have}")
        out[base] = pair
    return out


def _camera_ns(image_topic: str) -> str:
    """``/cam1/image_raw`` -> ``/cam1/`` (where a relative name of a camera goes)."""
    from .node_params import _output_prefix

    prefix = _output_prefix(image_topic)
    return prefix if prefix.startswith("/") else "/" + prefix


def output_topics(cameras: dict[str, str], options: DepthOptions) -> list[str]:
    """The 3-D topics written for ``cameras`` (image topic -> output prefix)."""
    names = ["panoptic/markers"] + (["panoptic/points"] if options.settings.points_stride > 0 else [])
    return [prefix + n for prefix in cameras.values() for n in names]


class _Camera:
    def __init__(self, depth_topic: str, info_topic: str, prefix: str, settings: DepthSettings):
        self.depth_topic, self.info_topic, self.prefix = depth_topic, info_topic, prefix
        self.sync = DepthSynchronizer(settings.sync_tolerance, history=64)
        self.markers = SegmentMarkers(include_stuff=settings.markers_include_stuff)
        self.newest_depth = -1  # ns


class BagDepth:
    """Depth state of an offline run over the cameras of a plan (module docstring)."""

    def __init__(self, pairs: dict[str, tuple], cameras: dict[str, str], options: DepthOptions):
        self.options, self.settings = options, options.settings
        self.estimator = self.settings.estimator()
        self.cameras = {base: _Camera(d, i, cameras[base], self.settings) for base, (d, i) in pairs.items()}
        self._by_topic: dict[str, list[tuple[_Camera, str]]] = collections.defaultdict(list)
        for cam in self.cameras.values():
            self._by_topic[cam.depth_topic].append((cam, "depth"))
            self._by_topic[cam.info_topic].append((cam, "info"))
        self.counts: collections.Counter = collections.Counter()
        self.seconds = 0.0

    @property
    def topics(self) -> set[str]:
        """Depth and camera info topics to read."""
        return set(self._by_topic)

    def feed(self, topic: str, msg) -> None:
        """A depth image or camera info (rosbags message) read from the bag."""
        for cam, kind in self._by_topic.get(topic, ()):
            if kind == "depth":
                cam.sync.add_depth(msg)
                cam.newest_depth = max(cam.newest_depth, stamp_ns(msg.header.stamp))
            else:
                cam.sync.add_camera_info(msg)

    def ready(self, base: str, stamp: int, record_ns: int, now_ns: int) -> bool:
        """Whether camera ``base``'s colour frame stamped ``stamp`` (recorded at ``record_ns``) can be
        paired now that the bag has been read up to ``now_ns``."""
        cam = self.cameras[base]
        return cam.newest_depth >= stamp or now_ns - record_ns > self.options.wait * 1e9

    def outputs(self, base: str, msg, id_map, categories) -> list[tuple[str, object]]:
        """Fill ``msg``'s 3-D fields (rclpy ``PanopticSegments``); ``(topic, message)`` of the markers
        and points of the frame."""
        from std_msgs.msg import Header

        from .point_cloud import cloud_points, point_cloud_msg, segment_tables

        t0 = time.monotonic()
        cam, s = self.cameras[base], self.settings
        match = cam.sync.match(stamp_ns(msg.header.stamp))
        frame, reason = None, match.reason
        if match.ok:
            try:
                frame = frame_geometry(self.estimator, id_map, [int(x.id) for x in msg.segments], match.depth,
                                       match.camera_info)
            except DepthError as exc:
                reason = exc.reason
        frame_id = str(frame.header.frame_id) if frame is not None else ""
        if frame is not None and fill_segments_3d(msg, frame.geometry, frame_id or msg.header.frame_id) == 0 \
                and not any_valid_depth(frame.depth, s):
            frame, reason = None, "depth_all_invalid"
        self.counts["frames_3d" if frame is not None else f"no_3d_{reason}"] += 1
        header = Header(stamp=msg.header.stamp, frame_id=frame_id or msg.header.frame_id)
        out = []
        arr = cam.markers.update(msg, header, categories)
        if arr.markers:
            out.append((cam.prefix + "panoptic/markers", arr))
        if frame is not None and s.points_stride > 0:
            cat, track = segment_tables(msg.segments)
            pts = cloud_points(id_map, frame.depth, frame.intrinsics, cat, track, stride=s.points_stride,
                               segment_colors=segment_colour_table(msg.segments, categories),
                               min_depth=s.min_depth, max_depth=s.max_depth, depth_scale=s.depth_scale)
            out.append((cam.prefix + "panoptic/points", point_cloud_msg(pts, header)))
        self.seconds += time.monotonic() - t0
        return out

    def summary(self) -> str:
        """``"3-D in N frame(s), M without (reason k, ...)"``."""
        without = {k[6:]: v for k, v in self.counts.items() if k.startswith("no_3d_")}
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(without.items()))
        return (f"3-D in {self.counts['frames_3d']} frame(s), {sum(without.values())} without"
                + (f" ({reasons})" if reasons else ""))
