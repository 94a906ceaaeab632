"""``ciae_panoptic``: the panoptic segmentation node (``ciae-panoptic-node``).

A thin layer over :class:`ciae_core.predictor.Predictor`:

* **Input**: ``sensor_msgs/Image`` on ``image`` (remappable; ``main`` adds the default remap
  ``image:=camera/image_raw``: ``/camera/image_raw`` in the root namespace, ``/<ns>/camera/image_raw``
  in namespace ``<ns>``), or ``sensor_msgs/CompressedImage`` on ``<image>/compressed`` with
  ``input_transport: compressed``; several cameras with ``image_topics: [...]`` (one model,
  batched forward, outputs under each camera's namespace: ``/cam1/image_raw`` ->
  ``/cam1/panoptic/segments``).
* **QoS**: input reliability ``auto`` copies what the topic's publishers offer (re-checked every
  second, the subscription is re-created when that changes), depth 1; outputs configurable.
  ``main`` loads ``config/fastdds_large_data.xml`` (32 MiB shared memory) through
  ``FASTDDS_DEFAULT_PROFILES_FILE`` before ``rclpy.init`` unless the user set a profile, so our
  1-4 MB outputs reach best-effort subscribers in other processes.
* **Latest frame only**: subscription callbacks put the newest message of each camera into a
  one-slot mailbox; a worker thread takes whatever is newest, converts, runs the model, publishes.
  Frames replaced before the worker got to them are dropped and counted: latency cannot grow with
  the input rate and memory is bounded.
* **Outputs** (header = input header): ``panoptic/segments`` (``ciae_ros/PanopticSegments``),
  ``panoptic/overlay`` (bgr8, computed only while subscribed unless ``overlay: on``),
  ``panoptic/confidence`` (32FC1, advertised only while ``publish_confidence`` is on),
  ``panoptic/detections`` (``vision_msgs/Detection2DArray``, only when vision_msgs is importable),
  ``panoptic/categories`` (transient local, once), ``/diagnostics``; with ``depth_topic``, 3-D per
  segment, ``panoptic/markers``, ``panoptic/points``, ``panoptic/detections_3d`` (:mod:`ciae_ros.node_depth`).
* **Bad frames** never stop the node: they are skipped, counted per reason in /diagnostics and
  reported by a throttled warning.
* **Stopping**: Ctrl-C / SIGTERM stop the node at any moment, also while it is still starting
  (importing torch, loading the model): one log line, exit status 0 (the ROS 2 convention).
* **Lifecycle**: ``--lifecycle`` runs a managed node (model loaded in ``configure``, released in
  ``cleanup``); ``--autostart`` configures and activates it at once (without ``--lifecycle`` it is a
  usage error rather than silently ignored).

The node's pieces live beside it: the parameter table and its checks in :mod:`ciae_ros.node_params`,
building the Predictor in :mod:`ciae_ros.node_model`, the mailbox in :mod:`ciae_ros.mailbox`, the
counters and /diagnostics in :mod:`ciae_ros.node_diagnostics`, the persistent ``Segment.track_id``
(one tracker per camera) in :mod:`ciae_ros.node_tracking`; their names stay importable from here.
"""

from __future__ import annotations

import collections
import gc
import sys
import threading
import time
import numpy as np

from .image_conversion import (ImageConversionError, compressed_to_rgb, decoder_pixel_limit, image_to_rgb,
                               set_decoder_pixel_limit)
from .mailbox import LatestFrameMailbox
from .node_diagnostics import CameraStats, DiagnosticsBuilder, StageTimes
from .node_interfaces import Camera as _Camera
from .node_interfaces import InterfacesMixin
from .node_main import _parse_args  # noqa: F401 - importable from here, as before the move
from .node_model import ModelHandle, load_model, predictor_settings
from .node_params import (PARAMS, SPECS, THRESHOLD_PARAMS, NodeStartupError, ParamSpec, _output_prefix,  # noqa: F401
                          camera_topics_error, declare_parameters, depth_values_error, read_parameters,
                          settings_error, unknown_parameter_warnings, validate_value, warn_unknown_overrides)
from .node_tracking import NodeTracking
from .pacing import RatePacer
from .process_memory import HeapTrimmer, freeze_long_lived_objects, thaw

__all__ = [  # the moved names stay importable from here (ciae-bag, tests, users of the node's pieces)
    "NODE_NAME", "DEFAULT_IMAGE_TOPIC", "NodeStartupError", "ParamSpec", "PARAMS", "SPECS", "THRESHOLD_PARAMS",
    "validate_value", "camera_topics_error", "unknown_parameter_warnings", "ModelHandle", "load_model",
    "predictor_settings", "LatestFrameMailbox", "CameraStats", "StageTimes", "main"]

NODE_NAME = "ciae_panoptic"
DEFAULT_IMAGE_TOPIC = "camera/image_raw"  # relative: /camera/image_raw in the root namespace, /<ns>/camera/image_raw in <ns>

# ----------------------------------------------------------------------------------------------
# The node logic (shared by the plain and the lifecycle node)
# ----------------------------------------------------------------------------------------------

class _PanopticLogic(InterfacesMixin):
    """Everything the node does; mixed into an ``rclpy`` Node or LifecycleNode."""

    def _init_logic(self) -> None:
        """Attributes first, then the parameters (which may raise NodeStartupError): destroy_node
        of a node whose construction failed must still work (the context calls it at shutdown)."""
        from .qos import latched_qos

        self._model: ModelHandle | None = None
        self._model_lock = threading.Lock()
        self._cameras: list[_Camera] = []
        self._stats: list[CameraStats] = []
        self._times = StageTimes()
        self._mailbox: LatestFrameMailbox | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._warn_last: dict[str, float] = {}
        self._errors = collections.Counter()
        # the worker adds keys to _errors and CameraStats.bad while the diagnostics timer (executor
        # thread) iterates them: both sides hold this lock (iterating a Counter that grows raises)
        self._counts_lock = threading.Lock()
        # the parameter callback creates/destroys the confidence publishers while the worker publishes
        self._confidence_lock = threading.Lock()
        self._qos_timer = None
        self._diag_timer = None
        self._pub_categories = None
        self._pub_diag = None
        self._diag = DiagnosticsBuilder()
        self._vision_msgs = self._vision_msgs_available()
        self._depth = None  # NodeDepth, once OpenCV's decoder limit is set (node_depth loads OpenCV)
        self._pacer = RatePacer()
        self._trimmer = HeapTrimmer()
        self._latched_qos = latched_qos()
        declare_parameters(self)
        self._values = read_parameters(self)
        self._tracking = NodeTracking(self._values, warn=self._warn, times=self._times)  # per camera, node_tracking
        warn_unknown_overrides(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._set_decoder_limit()
        from .node_depth import NodeDepth

        self._depth = NodeDepth(self, self._warn, self._times)

    def _set_decoder_limit(self) -> None:
        """OpenCV's decoders refuse images above max_image_pixels (image_conversion's guarantee);
        OpenCV reads the limit once, so this runs before anything in the process loads it."""
        wanted = int(self._values["max_image_pixels"])
        got = set_decoder_pixel_limit(wanted)
        if got != wanted:
            self.get_logger().warning(
                f"OpenCV was loaded before the node could set its decoder limit (now {got or 'unknown'}, "
                f"wanted max_image_pixels={wanted}): compressed frames are checked from their headers only")

    @staticmethod
    def _vision_msgs_available() -> bool:
        try:
            import vision_msgs.msg  # noqa: F401
            return True
        except ImportError:
            return False

    # -- model ------------------------------------------------------------------------------
    def _load(self) -> None:
        t0 = time.monotonic()
        self._model = load_model(self._values)
        freeze_long_lived_objects()  # full GC passes over torch + the model stalled the node ~1 s
        self.get_logger().info(
            f"model {self._model.name} ({self._model.version}) loaded from {self._model.weights} on "
            f"{self._model.engine}/{self._model.device} {self._model.predictor.precision} "
            f"({self._model.predictor.engine_reason}), input_size {self._model.predictor.input_size}, "
            f"{len(self._model.predictor.categories)} categories, in {time.monotonic() - t0:.2f} s")
        if self._model.domain_warning:
            self.get_logger().warning(self._model.domain_warning)

    def _release_model(self) -> None:
        with self._model_lock:
            self._model = None
        thaw()
        gc.collect()
        # torch comes with the model: without it imported there is nothing to free (importing it
        # here cost a never-configured lifecycle node seconds at shutdown)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def _start_processing(self) -> None:
        self._mailbox = LatestFrameMailbox(len(self._cameras))
        self._stop.clear()
        self._pacer.restart()
        self._pacer.set_rate(float(self._values["max_rate"]))
        self._worker = threading.Thread(target=self._worker_loop, name="ciae_worker", daemon=True)
        self._worker.start()
        self._update_subscriptions()
        self._qos_timer = self.create_timer(1.0, self._update_subscriptions)
        with self._counts_lock:
            self._diag.restart(self._stats, sum(self._errors.values()))
        self._diag_timer = self.create_timer(float(self._values["diagnostics_period"]), self._publish_diagnostics)

    def _stop_processing(self) -> None:
        for t in (self._qos_timer, self._diag_timer):
            if t is not None:
                self.destroy_timer(t)
        self._qos_timer = self._diag_timer = None
        for cam in self._cameras:
            if cam.sub is not None:
                self.destroy_subscription(cam.sub)
                cam.sub, cam.reliability = None, None
        self._stop.set()
        self._pacer.stop()
        if self._mailbox is not None:
            self._mailbox.close()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
        self._worker = None
        if self._depth is not None:
            self._depth.stop()

    # -- input ---------------------------------------------------------------------------------
    def _on_image(self, cam: int, msg, compressed: bool) -> None:
        now = time.monotonic()
        st = self._stats[cam]
        st.received += 1
        st.last_received = now
        if self._mailbox is not None and self._mailbox.put(cam, (msg, compressed, now)):
            st.dropped += 1

    def _warn(self, key: str, text: str, period: float = 5.0) -> None:
        now = time.monotonic()
        if now - self._warn_last.get(key, -1e9) >= period:
            self._warn_last[key] = now
            self.get_logger().warning(text)

    # -- worker --------------------------------------------------------------------------------
    def _worker_loop(self) -> None:
        # max_rate: the pacer's wait follows a rate change at once (set_rate wakes it)
        while not self._stop.is_set() and self._pacer.wait_turn():
            items = self._mailbox.take(timeout=0.2)
            if not items:
                continue
            self._pacer.started()
            try:
                pixels = self._process(items)
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything a frame causes
                with self._counts_lock:
                    self._errors[type(exc).__name__] += 1
                self._warn("process", f"frame processing failed: {type(exc).__name__}: {exc}")
                continue
            self._trimmer.after_frame(pixels)  # the heap a rare huge frame freed goes back to the OS

    def _process(self, items) -> int:
        """Convert, run the model and publish; the number of pixels of the frames processed."""
        t_start = time.monotonic()
        values = self._values
        max_px, scale16 = int(values["max_image_pixels"]), int(values["scale16_max"])
        from ciae_core.predictor import PredictorError

        with self._model_lock:
            model = self._model
            if model is None:
                return 0
            pred = model.predictor
            images, frames, boxes = [], [], []
            for cam, (msg, compressed, t_recv) in items:
                try:
                    img = (compressed_to_rgb(msg, max_pixels=max_px) if compressed
                           else image_to_rgb(msg, max_pixels=max_px, scale16_max=scale16))
                    lb = pred.letterbox(img.shape[0], img.shape[1])
                except ImageConversionError as exc:
                    self._bad_frame(cam, exc.reason, str(exc))
                    continue
                except PredictorError as exc:
                    self._bad_frame(cam, "bad_size", str(exc))
                    continue
                images.append(img)
                frames.append((cam, msg, t_recv))
                boxes.append(lb)
            if not images:
                return 0
            t_conv = time.monotonic()
            results = pred(images, color="rgb", return_confidence=bool(values["publish_confidence"]),
                           return_embeddings=self._tracking.wants_embeddings)
            t_pred = time.monotonic()
            timings = dict(pred.timings)
        for (cam_idx, msg, t_recv), img, res, lb in zip(frames, images, results, boxes):
            self._tracking.update(cam_idx, res, msg.header)
            self._publish_outputs(self._cameras[cam_idx], msg.header, img, res, model, lb.resized_size,
                                  (t_pred - t_conv) * 1e3 / len(images))
            self._stats[cam_idx].processed += 1
            t_done = time.monotonic()
            self._times.add("total", (t_done - t_recv) * 1e3)
            self._times.add("queue", (t_start - t_recv) * 1e3)
        t_pub = time.monotonic()
        self._times.add("convert", (t_conv - t_start) * 1e3)
        self._times.add("predictor", (t_pred - t_conv) * 1e3)
        for k, v in timings.items():
            if isinstance(v, (int, float)):
                self._times.add("predictor." + str(k), float(v))
        self._times.add("publish", (t_pub - t_pred) * 1e3)  # all outputs of the batch
        return sum(img.shape[0] * img.shape[1] for img in images)

    def _bad_frame(self, cam: int, reason: str, text: str) -> None:
        with self._counts_lock:
            self._stats[cam].bad[reason] += 1
        self._warn("bad:" + reason, f"skipping frame from {self._input_topic(self._cameras[cam])}: {text}")

    def _publish_outputs(self, cam: _Camera, header, image, result, model: ModelHandle, input_hw, infer_ms) -> None:
        from .conversions import detections_msg, render_overlay, segments_msg
        from .image_conversion import numpy_to_image

        t0 = time.monotonic()
        msg = segments_msg(result, header, model.name, model.version, input_hw, infer_ms)
        frame3d = self._depth.fill(cam.index, msg, result.id_map)  # None: no 3-D this frame
        t1 = time.monotonic()
        cam.pub_segments.publish(msg)
        t2 = time.monotonic()
        self._times.add("segments_build", (t1 - t0) * 1e3)
        self._times.add("segments_publish", (t2 - t1) * 1e3)
        mode = self._values["overlay"]
        if mode == "on" or (mode == "auto" and cam.pub_overlay.get_subscription_count() > 0):
            colors = {c.id: c.color for c in model.predictor.categories}
            ov = render_overlay(image, result, colors, float(self._values["overlay_alpha"]))
            cam.pub_overlay.publish(numpy_to_image(ov, "bgr8", header=header))
            self._times.add("overlay", (time.monotonic() - t2) * 1e3)
        if self._values["publish_confidence"] and result.confidence is not None:
            conf = numpy_to_image(np.asarray(result.confidence, np.float32), "32FC1", header=header)
            with self._confidence_lock:
                if cam.pub_confidence is not None:  # switched off since this frame started
                    cam.pub_confidence.publish(conf)
        if cam.pub_detections is not None:
            cam.pub_detections.publish(detections_msg(result, header))
        self._depth.publish(cam.index, frame3d, msg, image, result.id_map, model.predictor.categories)

    # -- parameters ------------------------------------------------------------------------------
    def _on_set_parameters(self, params):
        """Validate run-time changes; apply them for the next frame or reject with a reason.

        Model parameters (weights, engine, device, precision, max_size) build a new Predictor
        here, so a bad file or an absent GPU is reported to the caller and the running model
        stays; input size and thresholds go through ``Predictor.update`` (checked there).
        """
        from ciae_core.predictor import PredictorError
        from rcl_interfaces.msg import SetParametersResult

        new = dict(self._values)
        for p in params:
            if p.name not in SPECS:
                continue
            err = validate_value(p.name, p.value)
            if err:
                return SetParametersResult(successful=False, reason=err)
            new[p.name] = p.value
        if (err := settings_error(new) or depth_values_error(new)) is not None:  # across parameters
            return SetParametersResult(successful=False, reason=err)
        changed = {p.name for p in params if p.name in SPECS and new[p.name] != self._values[p.name]}
        limit = decoder_pixel_limit()
        if "max_image_pixels" in changed and limit is not None and new["max_image_pixels"] > limit:
            return SetParametersResult(successful=False, reason=(
                f"max_image_pixels can be at most {limit} in this process: OpenCV's decoder limit is "
                f"fixed when OpenCV loads (restart the node to raise it)"))
        if self._model is not None and any(SPECS[n].reloads_model for n in changed):
            try:
                model = load_model(new)
            except NodeStartupError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
            with self._model_lock:
                self._model = model
            self._tracking.reset_all("model")
            thaw()  # the old model's reference cycles are collected, the new model's objects frozen
            freeze_long_lived_objects()
            self.get_logger().info(f"model reloaded: {model.name} on {model.engine}/{model.device}, "
                                   f"input_size {model.predictor.input_size}")
            if model.domain_warning:
                self.get_logger().warning(model.domain_warning)
            if self._pub_categories is not None:  # the new model may know other categories
                from std_msgs.msg import Header

                from .conversions import categories_msg

                self._pub_categories.publish(categories_msg(model.predictor.categories, model.name,
                                                            Header(stamp=self.get_clock().now().to_msg())))
        elif self._model is not None and changed & {"input_size", *THRESHOLD_PARAMS}:
            with self._model_lock:
                pred = self._model.predictor
                try:
                    pred.update(**predictor_settings(new, pred.config, pred.default_input_size))
                except PredictorError as exc:
                    from ciae_core.cli.hints import command_line_hint

                    return SetParametersResult(successful=False, reason=command_line_hint(str(exc), SPECS, "ros"))
        if "publish_confidence" in changed:
            self._set_confidence_publishers(bool(new["publish_confidence"]))
        self._tracking.configure(new)
        self._depth.apply(new)
        self._values = new
        if "max_rate" in changed:
            self._pacer.set_rate(float(new["max_rate"]))  # wakes a worker waiting on the old rate
        return SetParametersResult(successful=True)

    # -- diagnostics -----------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        pct = self._times.percentiles()
        with self._counts_lock:  # snapshots: the worker may add keys meanwhile
            bads = [collections.Counter(st.bad) for st in self._stats]
            errors = collections.Counter(self._errors)
        arr = self._diag.build(self.get_fully_qualified_name(), self.get_clock().now().to_msg(), self._cameras,
                               self._stats, bads, errors, pct, self._model, self._depth.diagnostics())
        self._tracking.annotate(arr.status, range(len(self._cameras)))
        self._pub_diag.publish(arr)


# ----------------------------------------------------------------------------------------------
# Node classes
# ----------------------------------------------------------------------------------------------

def _make_node_classes():
    from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
    from rclpy.node import Node

    class PanopticNode(_PanopticLogic, Node):
        """Plain node: loads the model in the constructor (raises ``NodeStartupError``)."""

        def __init__(self, **kwargs):
            Node.__init__(self, NODE_NAME, **kwargs)
            self._init_logic()
            self._load()
            self._create_interfaces()
            self._start_processing()

        def destroy_node(self):
            self._stop_processing()
            self._release_model()
            return Node.destroy_node(self)

    class PanopticLifecycleNode(_PanopticLogic, LifecycleNode):
        """Managed node: configure loads the model, activate subscribes, cleanup frees the GPU."""

        def __init__(self, autostart: bool = False, **kwargs):
            self._autostart = autostart  # main reports a failed configure itself, in one line
            self.configure_error: str | None = None
            LifecycleNode.__init__(self, NODE_NAME, **kwargs)
            self._init_logic()

        def on_configure(self, state):
            try:
                self._load()
            except NodeStartupError as exc:
                self.configure_error = str(exc)
                if not self._autostart:
                    self.get_logger().error(f"configure failed: {exc}")
                return TransitionCallbackReturn.FAILURE
            self._create_interfaces()
            return TransitionCallbackReturn.SUCCESS

        def on_activate(self, state):
            self._start_processing()
            return super().on_activate(state)

        def on_deactivate(self, state):
            self._stop_processing()
            return super().on_deactivate(state)

        def on_cleanup(self, state):
            self._destroy_interfaces()
            self._release_model()
            return TransitionCallbackReturn.SUCCESS

        def on_shutdown(self, state):
            self._stop_processing()
            self._destroy_interfaces()
            self._release_model()
            return TransitionCallbackReturn.SUCCESS

        def destroy_node(self):
            self._stop_processing()
            self._release_model()
            return LifecycleNode.destroy_node(self)

    return PanopticNode, PanopticLifecycleNode


def __getattr__(name):  # PanopticNode / PanopticLifecycleNode without importing rclpy at module import
    if name in ("PanopticNode", "PanopticLifecycleNode"):
        plain, managed = _make_node_classes()
        globals().update(PanopticNode=plain, PanopticLifecycleNode=managed)
        return globals()[name]
    raise AttributeError(name)


# ----------------------------------------------------------------------------------------------
# Entry point (the process around the node: ciae_ros.node_main)
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run the node until Ctrl-C / SIGTERM; returns the exit status (1 on a startup error; 0 after
    Ctrl-C / SIGTERM, also during start-up). See :func:`ciae_ros.node_main.run`."""
    from .node_main import run

    return run(argv, _make_node_classes, NODE_NAME, DEFAULT_IMAGE_TOPIC)


if __name__ == "__main__":
    sys.exit(main())
