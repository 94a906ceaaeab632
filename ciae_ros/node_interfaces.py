"""The node's ROS interfaces: per-camera publishers and input subscriptions, created and removed.

:class:`InterfacesMixin` is mixed into the node logic (``ciae_ros.node``): it owns the
:class:`Camera` records (input topic, output prefix, publishers, the subscription and its
reliability), creates the outputs of every camera, re-creates an input subscription when the
publishers' reliability changes (``input_reliability: auto``), and advertises
``panoptic/confidence`` only while ``publish_confidence`` is on. It uses the node's
``_values``, ``_model``, ``_stats``, ``_latched_qos``, ``_vision_msgs``, ``_confidence_lock``,
``_on_image`` and ``_depth`` (:class:`ciae_ros.node_depth.NodeDepth`: each camera's depth and
camera info subscriptions and 3-D outputs are created, updated and removed with the camera's).
"""

from __future__ import annotations

from dataclasses import dataclass

from .node_diagnostics import CameraStats
from .node_params import _output_prefix


@dataclass
class Camera:
    index: int
    topic: str                  # fully resolved input topic
    prefix: str                 # output namespace prefix ('' for the single camera)
    sub: object = None
    reliability: object = None  # rclpy ReliabilityPolicy of the current subscription
    pub_segments: object = None
    pub_overlay: object = None
    pub_confidence: object = None   # only while publish_confidence is on
    pub_detections: object = None
    waiting_logged: bool = False


class InterfacesMixin:
    """Publishers and subscriptions of the node's cameras (see the module docstring)."""

    def _camera_topics(self) -> list[tuple[str, str]]:
        topics = list(self._values["image_topics"])
        if not topics:
            return [(self.resolve_topic_name("image"), "")]
        return [(self.resolve_topic_name(t), _output_prefix(t)) for t in topics]

    def _create_interfaces(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image
        from std_msgs.msg import Header

        from ciae_ros.msg import CategoryArray, PanopticSegments

        from .conversions import categories_msg
        from .qos import output_qos

        oq = output_qos(self._values["output_reliability"], self._values["output_depth"])
        self._cameras = []
        for k, (topic, prefix) in enumerate(self._camera_topics()):
            cam = Camera(index=k, topic=topic, prefix=prefix)
            cam.pub_segments = self.create_publisher(PanopticSegments, prefix + "panoptic/segments", oq)
            cam.pub_overlay = self.create_publisher(Image, prefix + "panoptic/overlay", oq)
            if self._vision_msgs and self._values["publish_detections"]:
                from vision_msgs.msg import Detection2DArray

                cam.pub_detections = self.create_publisher(Detection2DArray, prefix + "panoptic/detections", oq)
            self._cameras.append(cam)
        self._set_confidence_publishers(bool(self._values["publish_confidence"]))
        self._depth.create(self._values, [(c.topic, c.prefix) for c in self._cameras], oq, self._vision_msgs)
        self._stats = [CameraStats() for _ in self._cameras]
        self._pub_categories = self.create_publisher(CategoryArray, "panoptic/categories", self._latched_qos)
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id="")
        self._pub_categories.publish(categories_msg(self._model.predictor.categories, self._model.name, header))
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

    def _destroy_interfaces(self) -> None:
        for cam in self._cameras:
            for pub in (cam.pub_segments, cam.pub_overlay, cam.pub_confidence, cam.pub_detections):
                if pub is not None:
                    self.destroy_publisher(pub)
        self._cameras = []
        if self._depth is not None:  # None when the node's construction stopped before it
            self._depth.destroy()
        for pub in (self._pub_categories, self._pub_diag):
            if pub is not None:
                self.destroy_publisher(pub)
        self._pub_categories = self._pub_diag = None

    def _update_subscriptions(self) -> None:
        """(Re)create input subscriptions so that their reliability matches the publishers'."""
        from sensor_msgs.msg import CompressedImage, Image

        from .qos import input_qos, offered_reliability, policy_name, reliability_policy

        compressed = self._values["input_transport"] == "compressed"
        for cam in self._cameras:
            topic = self._input_topic(cam)
            wanted_name = self._values["input_reliability"]
            if wanted_name == "auto":
                wanted = offered_reliability(self.get_publishers_info_by_topic(topic))
                if wanted is None:
                    if cam.sub is None and not cam.waiting_logged:
                        self.get_logger().info(f"waiting for a publisher on {topic} (input reliability auto)")
                        cam.waiting_logged = True
                    continue
            else:
                wanted = reliability_policy(wanted_name)
            if cam.sub is not None and cam.reliability == wanted:
                continue
            if cam.sub is not None:
                self.destroy_subscription(cam.sub)
            cam.sub = self.create_subscription(
                CompressedImage if compressed else Image, topic,
                lambda msg, k=cam.index, c=compressed: self._on_image(k, msg, c),
                input_qos(wanted, int(self._values["input_depth"])))
            cam.reliability = wanted
            self.get_logger().info(f"subscribed to {topic} ({'CompressedImage' if compressed else 'Image'}, "
                                   f"{policy_name(wanted)})")
        self._depth.update_subscriptions()  # the cameras' depth and camera info (node_depth)

    def _input_topic(self, cam: Camera) -> str:
        """The topic actually subscribed for a camera (``<image>/compressed`` for compressed input);
        ``cam.topic`` stays the camera's base name (diagnostics, output prefix)."""
        return cam.topic + "/compressed" if self._values["input_transport"] == "compressed" else cam.topic

    def _set_confidence_publishers(self, on: bool) -> None:
        """``panoptic/confidence`` of every camera exists while ``publish_confidence`` is on, and only
        then (an advertised topic that never carries data misleads). No cameras: nothing to do."""
        from sensor_msgs.msg import Image

        from .qos import output_qos

        oq = output_qos(self._values["output_reliability"], self._values["output_depth"])
        with self._confidence_lock:
            for cam in self._cameras:
                if on and cam.pub_confidence is None:
                    cam.pub_confidence = self.create_publisher(Image, cam.prefix + "panoptic/confidence", oq)
                elif not on and cam.pub_confidence is not None:
                    self.destroy_publisher(cam.pub_confidence)
                    cam.pub_confidence = None
