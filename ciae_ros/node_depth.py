"""The node's 3-D (issue 15): depth + ``CameraInfo`` in; Segment 3-D fields, markers, points and
3-D detections out, per camera.

:class:`NodeDepth` is what the node holds (one per node, all cameras); the node calls it at a few
points of its life: ``create`` (with the cameras' publishers), ``update_subscriptions`` (the
node's one-second QoS timer), ``fill`` (after inference, before ``panoptic/segments`` goes out),
``publish`` (right after), ``apply`` (a parameter change), ``diagnostics`` (each /diagnostics
period), ``stop`` and ``destroy``. Each camera with depth gets a :class:`CameraDepth`.

Topics (resolved like the image topic; :func:`depth_topic_pairs`):

* single camera: ``depth_topic`` in the node's namespace; ``camera_info_topic``, by default the
  image topic's sibling ``camera_info`` (``/camera/image_raw`` -> ``/camera/camera_info``);
* several cameras (``image_topics``): ``depth_topics`` / ``camera_info_topics`` list one per
  camera, in the same order; else ``depth_topic`` / ``camera_info_topic`` are names relative to
  each camera's namespace (``/cam1/image_raw`` + ``depth/image_raw`` -> ``/cam1/depth/image_raw``),
  and the camera info defaults to each image topic's sibling ``camera_info``.

Depth and camera info subscriptions follow ``input_reliability`` like the image (``auto`` copies
the publishers' offer), history 10 for depth (a busy executor must not drop the depth frame of
the colour frame being processed) and 5 for camera info; the callbacks only store: :class:`~ciae_ros.depth_sync.DepthSynchronizer` keeps the last
:data:`DEPTH_HISTORY` depth frames (about a second at 30 Hz, longer than a frame's processing) and
the latest camera info.

Per processed colour frame: the depth frame of the nearest stamp within ``sync_tolerance`` is
looked up (never waited for); a frame without usable depth is published without 3-D and counted
by reason (``no_3d_<reason>`` in the camera's /diagnostics status, WARN for that period, a
throttled warning in the log). Reasons: those of :mod:`ciae_ros.depth_sync` (``no_depth``,
``stamp_out_of_tolerance``, ``no_camera_info``), of :mod:`ciae_ros.depth_input` and
:mod:`ciae_core.depth` (``depth_size_mismatch``, ``depth_encoding``, ``depth_format``,
``depth_data``, ``camera_info_size_mismatch``, ``bad_intrinsics``, ``bad_id_map``) and
``depth_all_invalid`` (not one pixel within ``[min_depth, max_depth]``).

Outputs of a camera (under its prefix; header stamp = the colour image's, frame_id = the depth
image's, which ``PanopticSegments.depth_frame_id`` names too):

* ``panoptic/markers`` (``MarkerArray``): every frame that adds or deletes a marker
  (:class:`~ciae_ros.spatial_outputs.SegmentMarkers`: vanished segments' markers are deleted,
  stuff only with ``markers_include_stuff``); all deleted on ``stop`` (deactivate, shutdown);
* ``panoptic/points`` (``PointCloud2``): computed *only* while someone subscribes (counted in
  ``point_clouds``), every ``points_stride``-th pixel, coloured by segment (the overlay's colours)
  or by the image (``points_color``);
* ``panoptic/detections_3d`` (``vision_msgs/Detection3DArray``, things with 3-D): every frame, only
  where vision_msgs imports and ``publish_detections`` is on.

Run-time parameters: ``depth_scale``, ``min_depth``, ``max_depth``, ``sync_tolerance``,
``points_stride``, ``points_color``, ``markers_include_stuff`` apply from the next frame; the
topics are read-only (they decide which subscriptions and publishers exist).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

import numpy as np

from ciae_core.depth import DepthError, SegmentDepth

from .depth_input import FrameDepth, frame_geometry
from .depth_sync import DepthSynchronizer, stamp_ns
from .spatial_outputs import SegmentMarkers, detections_3d_msg, fill_segments_3d, segment_colour_table

#: Depth frames the synchroniser keeps per camera (messages of 0.6-1.2 MB at 640x480).
DEPTH_HISTORY = 32

#: Parameters of this module that change at run time (the topics are read-only).
RUNTIME_PARAMS = ("depth_scale", "min_depth", "max_depth", "sync_tolerance", "points_stride", "points_color",
                  "markers_include_stuff")


@dataclass(frozen=True)
class DepthSettings:
    """The run-time 3-D parameters (one frozen object: the worker reads one consistent set)."""

    depth_scale: float = 0.001
    min_depth: float = 0.1
    max_depth: float = 10.0
    sync_tolerance: float = 0.02
    points_stride: int = 4
    points_color: str = "segment"
    markers_include_stuff: bool = False

    @classmethod
    def from_values(cls, values: dict) -> "DepthSettings":
        return cls(float(values["depth_scale"]), float(values["min_depth"]), float(values["max_depth"]),
                   float(values["sync_tolerance"]), int(values["points_stride"]), str(values["points_color"]),
                   bool(values["markers_include_stuff"]))

    def estimator(self) -> SegmentDepth:
        return SegmentDepth(min_depth=self.min_depth, max_depth=self.max_depth, depth_scale=self.depth_scale)


def sibling_camera_info(image_topic: str) -> str:
    """``/camera/image_raw`` -> ``/camera/camera_info`` (the ``image_transport`` convention)."""
    parent = image_topic.rstrip("/").rsplit("/", 1)[0] if "/" in image_topic.strip("/") else ""
    return parent + "/camera_info" if image_topic.startswith("/") or parent else "camera_info"


def _absolute(name: str) -> bool:
    return name.startswith(("/", "~"))


def depth_topic_pairs(values: dict, cameras: list[tuple[str, str]], resolve) -> list[tuple[str, str] | None]:
    """``(depth topic, camera info topic)`` per camera, resolved (module docstring), ``None`` for a
    camera without depth. ``cameras``: ``(resolved image topic, output prefix)`` per camera, as the
    node has them (prefix ``''`` for the single camera); ``resolve``: the node's ``resolve_topic_name``."""
    several = bool(values["image_topics"])
    out: list[tuple[str, str] | None] = []
    for k, (image_topic, prefix) in enumerate(cameras):
        def under_camera(name: str) -> str:
            return resolve(name if not several or _absolute(name) else prefix + name)

        if values["depth_topics"]:
            depth = resolve(values["depth_topics"][k])
        elif values["depth_topic"]:
            depth = under_camera(values["depth_topic"])
        else:
            out.append(None)
            continue
        if values["camera_info_topics"]:
            info = resolve(values["camera_info_topics"][k])
        elif values["camera_info_topic"]:
            info = under_camera(values["camera_info_topic"])
        else:
            info = sibling_camera_info(image_topic)
        out.append((depth, info))
    return out


def any_valid_depth(depth: np.ndarray, settings: DepthSettings, stride: int = 2) -> bool:
    """Whether any (sampled) pixel holds a depth within ``[min_depth, max_depth]``."""
    d = np.asarray(depth)[::stride, ::stride]
    z = d.astype(np.float32) * np.float32(settings.depth_scale) if d.dtype == np.uint16 else d
    return bool(np.any((z >= settings.min_depth) & (z <= settings.max_depth)))


class CameraDepth:
    """One camera's depth input, synchroniser, markers, 3-D publishers and counters.

    Args:
        node: the rclpy node (publishers, subscriptions, logger).
        prefix: the camera's output prefix (``''`` or ``/cam1/``).
        depth_topic, info_topic: resolved input topics.
        output_qos: QoS of the outputs; detections_3d: create ``panoptic/detections_3d``.
        warn: the node's throttled warning ``warn(key, text)``; times: its ``StageTimes``.
    """

    def __init__(self, node, prefix: str, depth_topic: str, info_topic: str, output_qos, settings: DepthSettings,
                 detections_3d: bool, warn, times):
        from sensor_msgs.msg import PointCloud2
        from visualization_msgs.msg import MarkerArray

        self.node, self.depth_topic, self.info_topic = node, depth_topic, info_topic
        self.sync = DepthSynchronizer(settings.sync_tolerance, history=DEPTH_HISTORY)
        self.markers = SegmentMarkers(include_stuff=settings.markers_include_stuff)
        self.pub_markers = node.create_publisher(MarkerArray, prefix + "panoptic/markers", output_qos)
        self.pub_points = node.create_publisher(PointCloud2, prefix + "panoptic/points", output_qos)
        self.pub_detections = None
        if detections_3d:
            from vision_msgs.msg import Detection3DArray

            self.pub_detections = node.create_publisher(Detection3DArray, prefix + "panoptic/detections_3d",
                                                        output_qos)
        self._subs: dict[str, list] = {}  # topic -> [subscription, reliability]
        self._warn, self._times = warn, times
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()
        self._prev_no_3d = 0
        self._frame_id = ""  # of the last depth frame: the markers' frame when a frame has none

    # -- input ---------------------------------------------------------------------------------
    def update_subscriptions(self, reliability: str, waiting_log) -> None:
        """(Re)create the depth and camera info subscriptions with the reliability the publishers
        offer (``auto``) or ``reliability``; ``waiting_log(topic)`` once per topic without publisher."""
        from sensor_msgs.msg import CameraInfo, Image

        from .qos import input_qos, offered_reliability, policy_name, reliability_policy

        for topic, msg_type, callback, depth in ((self.depth_topic, Image, self.sync.add_depth, 10),
                                                 (self.info_topic, CameraInfo, self.sync.add_camera_info, 5)):
            sub, current = self._subs.get(topic, (None, None))
            if reliability == "auto":
                wanted = offered_reliability(self.node.get_publishers_info_by_topic(topic))
                if wanted is None:
                    if sub is None:
                        waiting_log(topic)
                    continue
            else:
                wanted = reliability_policy(reliability)
            if sub is not None and current == wanted:
                continue
            if sub is not None:
                self.node.destroy_subscription(sub)
            self._subs[topic] = [self.node.create_subscription(msg_type, topic, callback, input_qos(wanted, depth)),
                                 wanted]
            self.node.get_logger().info(f"subscribed to {topic} ({msg_type.__name__}, {policy_name(wanted)})")

    def destroy_subscriptions(self) -> None:
        for sub, _ in self._subs.values():
            self.node.destroy_subscription(sub)
        self._subs.clear()
        self.sync.clear()

    # -- per frame -----------------------------------------------------------------------------
    def fill(self, estimator: SegmentDepth, settings: DepthSettings, msg, id_map: np.ndarray) -> FrameDepth | None:
        """Match depth to ``msg`` (a ``PanopticSegments``), compute and fill its segments' 3-D;
        the frame's :class:`FrameDepth`, or ``None`` (counted and warned by reason)."""
        t0 = time.monotonic()
        match = self.sync.match(stamp_ns(msg.header.stamp))
        if not match.ok:
            self._no_3d(match.reason, self._match_text(match, settings))
            return None
        try:
            frame = frame_geometry(estimator, id_map, [int(s.id) for s in msg.segments], match.depth,
                                   match.camera_info)
        except DepthError as exc:
            self._no_3d(exc.reason, f"{self.depth_topic}: {exc}")
            return None
        frame_id = str(frame.header.frame_id) or str(msg.header.frame_id)
        if fill_segments_3d(msg, frame.geometry, frame_id) == 0 and not any_valid_depth(frame.depth, settings):
            self._no_3d("depth_all_invalid", f"{self.depth_topic}: no depth pixel within [{settings.min_depth}, "
                                             f"{settings.max_depth}] m (min_depth, max_depth; depth_scale "
                                             f"{settings.depth_scale} for 16UC1)")
            return None
        self._frame_id = frame_id
        with self._lock:
            self._counts["frames_3d"] += 1
        self._times.add("depth_3d", (time.monotonic() - t0) * 1e3)
        return frame

    def _match_text(self, match, settings: DepthSettings) -> str:
        if match.reason == "no_depth":
            return f"no depth image received on {self.depth_topic}"
        if match.reason == "no_camera_info":
            return f"no CameraInfo received on {self.info_topic}"
        return (f"the nearest depth image on {self.depth_topic} is {match.dt * 1e3:+.0f} ms from the colour frame "
                f"(sync_tolerance {settings.sync_tolerance} s)")

    def _no_3d(self, reason: str, text: str) -> None:
        with self._lock:
            self._counts["no_3d_" + reason] += 1
        self._warn(f"3d:{self.depth_topic}:{reason}", f"{text}: frame published without 3-D ({reason})")

    def publish(self, frame: FrameDepth | None, msg, image: np.ndarray, id_map: np.ndarray, categories,
                settings: DepthSettings) -> None:
        """Markers, 3-D detections and (while subscribed) points of a frame ``fill`` handled."""
        from std_msgs.msg import Header

        from .point_cloud import cloud_points, point_cloud_msg, segment_tables

        t0 = time.monotonic()
        frame_id = (str(frame.header.frame_id) if frame is not None else self._frame_id) or str(msg.header.frame_id)
        header = Header(stamp=msg.header.stamp, frame_id=frame_id)
        self.markers.include_stuff = settings.markers_include_stuff
        arr = self.markers.update(msg, header, categories)
        if arr.markers:
            self.pub_markers.publish(arr)
        if self.pub_detections is not None:
            self.pub_detections.publish(detections_3d_msg(msg, header))
        t1 = time.monotonic()
        self._times.add("markers", (t1 - t0) * 1e3)
        if frame is None or self.pub_points.get_subscription_count() == 0:
            return
        cat, track = segment_tables(msg.segments)
        colours = {"image_rgb": image} if settings.points_color == "image" else \
            {"segment_colors": segment_colour_table(msg.segments, categories)}
        pts = cloud_points(id_map, frame.depth, frame.intrinsics, cat, track, stride=settings.points_stride,
                           min_depth=settings.min_depth, max_depth=settings.max_depth,
                           depth_scale=settings.depth_scale, **colours)
        self.pub_points.publish(point_cloud_msg(pts, header))
        with self._lock:
            self._counts["point_clouds"] += 1
        self._times.add("points", (time.monotonic() - t1) * 1e3)

    def clear_markers(self) -> None:
        """Delete every marker shown (deactivation, shutdown)."""
        from std_msgs.msg import Header

        arr = self.markers.clear(Header(stamp=self.node.get_clock().now().to_msg(), frame_id=self._frame_id))
        if arr.markers:
            self.pub_markers.publish(arr)

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        """``frames_3d``, ``point_clouds`` and ``no_3d_<reason>`` so far."""
        with self._lock:
            return dict(self._counts)

    def diagnostics(self) -> tuple[list[tuple[str, str]], str | None]:
        """This camera's /diagnostics values and, when frames went without 3-D since the last call,
        the warning message of that period (else ``None``)."""
        counts = self.counts
        no_3d = {k[6:]: v for k, v in counts.items() if k.startswith("no_3d_")}
        vals = [("depth_topic", self.depth_topic), ("camera_info_topic", self.info_topic),
                ("frames_3d", str(counts.get("frames_3d", 0))), ("frames_no_3d", str(sum(no_3d.values()))),
                ("point_clouds", str(counts.get("point_clouds", 0)))]
        vals += [(f"no_3d_{reason}", str(n)) for reason, n in sorted(no_3d.items())]
        total = sum(no_3d.values())
        new, self._prev_no_3d = total - self._prev_no_3d, total
        warn = None
        if new > 0:
            top = max(no_3d, key=no_3d.get)
            warn = f"{new} frame(s) without 3-D in the last period (most often: {top})"
        return vals, warn

    def destroy(self) -> None:
        self.destroy_subscriptions()
        for pub in (self.pub_markers, self.pub_points, self.pub_detections):
            if pub is not None:
                self.node.destroy_publisher(pub)


class NodeDepth:
    """The node's 3-D over all its cameras (module docstring); ``node`` is the rclpy node,
    ``warn``/``times`` its throttled warning and stage times."""

    def __init__(self, node, warn, times):
        self.node, self._warn, self._times = node, warn, times
        self.cameras: list[CameraDepth | None] = []
        self.settings = DepthSettings()
        self.estimator = self.settings.estimator()
        self._reliability = "auto"
        self._waiting_logged: set[str] = set()

    @property
    def enabled(self) -> bool:
        return any(c is not None for c in self.cameras)

    def create(self, values: dict, cameras: list[tuple[str, str]], output_qos, vision_msgs: bool) -> None:
        """Publishers of every camera with depth; ``cameras``: ``(resolved image topic, prefix)``."""
        self.apply(values)
        self._reliability = str(values["input_reliability"])
        pairs = depth_topic_pairs(values, cameras, self.node.resolve_topic_name)
        detections = vision_msgs and bool(values["publish_detections"])
        self.cameras = [None if pair is None else
                        CameraDepth(self.node, prefix, pair[0], pair[1], output_qos, self.settings, detections,
                                    self._warn, self._times)
                        for (_, prefix), pair in zip(cameras, pairs)]
        for cam in self.cameras:
            if cam is not None:
                self.node.get_logger().info(f"3-D from {cam.depth_topic} with {cam.info_topic}")

    def update_subscriptions(self) -> None:
        for cam in self.cameras:
            if cam is not None:
                cam.update_subscriptions(self._reliability, self._log_waiting)

    def _log_waiting(self, topic: str) -> None:
        if topic not in self._waiting_logged:
            self._waiting_logged.add(topic)
            self.node.get_logger().info(f"waiting for a publisher on {topic} (3-D input, reliability auto)")

    def fill(self, k: int, msg, id_map: np.ndarray) -> FrameDepth | None:
        """3-D fields of camera ``k``'s segments message (module docstring); ``None``: none this frame."""
        cam = self.cameras[k] if k < len(self.cameras) else None
        return None if cam is None else cam.fill(self.estimator, self.settings, msg, id_map)

    def publish(self, k: int, frame: FrameDepth | None, msg, image: np.ndarray, id_map: np.ndarray,
                categories) -> None:
        cam = self.cameras[k] if k < len(self.cameras) else None
        if cam is not None:
            cam.publish(frame, msg, image, id_map, categories, self.settings)

    def apply(self, values: dict) -> None:
        """Take the run-time parameters of ``values`` (already validated) from the next frame on."""
        settings = DepthSettings.from_values(values)
        if settings != self.settings:
            self.estimator = settings.estimator()
            self.settings = settings
            for cam in self.cameras:
                if cam is not None:
                    cam.sync.set_tolerance(settings.sync_tolerance)

    def diagnostics(self) -> list[tuple[list[tuple[str, str]], str | None] | None]:
        """Per camera: ``CameraDepth.diagnostics()`` or ``None`` without depth."""
        return [None if cam is None else cam.diagnostics() for cam in self.cameras]

    def stop(self) -> None:
        """Processing stops: drop the depth subscriptions and history, delete every marker."""
        for cam in self.cameras:
            if cam is not None:
                cam.destroy_subscriptions()
                cam.clear_markers()

    def destroy(self) -> None:
        for cam in self.cameras:
            if cam is not None:
                cam.destroy()
        self.cameras = []
