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
  ``panoptic/confidence`` (32FC1, ``publish_confidence``), ``panoptic/detections``
  (``vision_msgs/Detection2DArray``, only when vision_msgs is importable), ``panoptic/categories``
  (transient local, once), ``/diagnostics``.
* **Bad frames** never stop the node: they are skipped, counted per reason in /diagnostics and
  reported by a throttled warning.
* **Lifecycle**: ``--lifecycle`` runs a managed node (model loaded in ``configure``, released in
  ``cleanup``); ``--autostart`` configures and activates it at once (without ``--lifecycle`` it is a
  usage error rather than silently ignored).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import hashlib
import logging
import pathlib
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .image_conversion import DEFAULT_MAX_PIXELS, ImageConversionError, compressed_to_rgb, image_to_rgb


NODE_NAME = "ciae_panoptic"
DEFAULT_IMAGE_TOPIC = "camera/image_raw"  # relative: /camera/image_raw in the root namespace, /<ns>/camera/image_raw in <ns>


class NodeStartupError(RuntimeError):
    """The node cannot start (weights, engine, device, parameters); the message says why."""


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: object
    description: str
    choices: tuple[str, ...] = ()
    int_range: tuple[int, int, int] | None = None        # from, to, step
    float_range: tuple[float, float] | None = None
    read_only: bool = False
    reloads_model: bool = False     # changing it builds a new Predictor


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("weights", "", "Model file (.safetensors; .onnx for engine onnxruntime). Empty: the shipped "
              "model (models/ in the source tree or share/ciae_ros/models).", reloads_model=True),
    ParamSpec("engine", "torch", "Inference engine.", choices=("torch", "onnxruntime"), reloads_model=True),
    ParamSpec("device", "cpu", "Inference device: cpu, cuda or cuda:<index>.", reloads_model=True),
    ParamSpec("precision", "fp32", "Inference precision (fp16 needs CUDA; bf16: torch engine).",
              choices=("fp32", "fp16", "bf16"), reloads_model=True),
    ParamSpec("max_size", 1333, "Upper bound on the longer side after resizing (px).", int_range=(64, 4096, 1),
              reloads_model=True),
    ParamSpec("input_size", 0, "Network input size: the image's shorter side is resized to this (px). 0: the "
              "model's default (640 for ResNet-50/101, 320 for small backbones); the model's valid range applies "
              "(512..800 for ResNet-50/101, 192..800 for small backbones).", int_range=(0, 800, 32)),
    ParamSpec("score_threshold", -1.0, "Candidate threshold of thing proposals before NMS. -1: the model's default.",
              float_range=(-1.0, 1.0)),
    ParamSpec("nms_threshold", -1.0, "IoU threshold of the class-wise NMS of thing proposals. -1: the model's "
              "default.", float_range=(-1.0, 1.0)),
    ParamSpec("instance_score_threshold", -1.0, "Minimum score of a thing proposal to become a segment. -1: the "
              "model's default.", float_range=(-1.0, 1.0)),
    ParamSpec("stuff_area_min", -1, "Stuff regions smaller than this many pixels (per 640x480 image, scaled with "
              "the image area) become void. -1: the model's default.", int_range=(-1, 10_000_000, 1)),
    ParamSpec("overlay", "auto", "Colour overlay on panoptic/overlay: auto = only while someone subscribes, "
              "on = always, off = never.", choices=("auto", "on", "off")),
    ParamSpec("overlay_alpha", 0.5, "Opacity of the segment colours in the overlay.", float_range=(0.0, 1.0)),
    ParamSpec("publish_confidence", False, "Publish panoptic/confidence (32FC1, top-1 minus top-2 similarity)."),
    ParamSpec("publish_detections", True, "Publish thing instances as vision_msgs/Detection2DArray on "
              "panoptic/detections (only when vision_msgs is installed).", read_only=True),
    ParamSpec("input_transport", "raw", "raw: sensor_msgs/Image on <image>; compressed: sensor_msgs/"
              "CompressedImage on <image>/compressed.", choices=("raw", "compressed"), read_only=True),
    ParamSpec("image_topics", [], "Several cameras: their image topics (one model, batched). Empty: the "
              "single topic 'image'.", read_only=True),
    ParamSpec("input_reliability", "auto", "Input QoS reliability; auto matches the publishers' offer.",
              choices=("auto", "reliable", "best_effort"), read_only=True),
    ParamSpec("input_depth", 1, "Input QoS history depth.", int_range=(1, 100, 1), read_only=True),
    ParamSpec("output_reliability", "reliable", "Output QoS reliability.", choices=("reliable", "best_effort"),
              read_only=True),
    ParamSpec("output_depth", 1, "Output QoS history depth.", int_range=(1, 100, 1), read_only=True),
    ParamSpec("max_rate", 0.0, "Maximum processing rate in Hz (0: as fast as the model runs).",
              float_range=(0.0, 1000.0)),
    ParamSpec("max_image_pixels", DEFAULT_MAX_PIXELS, "Frames with more pixels are rejected (too_large).",
              int_range=(1, 2**31 - 1, 1)),
    ParamSpec("scale16_max", 65535, "16-bit input: this value maps to 255 (4095 for 12-bit cameras).",
              int_range=(1, 65535, 1)),
    ParamSpec("diagnostics_period", 1.0, "Seconds between /diagnostics messages.", float_range=(0.1, 60.0),
              read_only=True),
)
SPECS = {p.name: p for p in PARAMS}
#: Parameters passed to ``Predictor.update`` at run time (-1 = the model config's own value).
THRESHOLD_PARAMS = ("score_threshold", "nms_threshold", "instance_score_threshold", "stuff_area_min")


def _descriptor(spec: ParamSpec):
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

    kinds = {str: ParameterType.PARAMETER_STRING, bool: ParameterType.PARAMETER_BOOL,
             int: ParameterType.PARAMETER_INTEGER, float: ParameterType.PARAMETER_DOUBLE,
             list: ParameterType.PARAMETER_STRING_ARRAY}
    d = ParameterDescriptor(name=spec.name, type=kinds[type(spec.default)], read_only=spec.read_only)
    d.description = spec.description
    if spec.choices:
        d.additional_constraints = "one of: " + ", ".join(spec.choices)
    if spec.int_range:
        d.integer_range = [IntegerRange(from_value=spec.int_range[0], to_value=spec.int_range[1],
                                        step=spec.int_range[2])]
    if spec.float_range:
        d.floating_point_range = [FloatingPointRange(from_value=spec.float_range[0], to_value=spec.float_range[1],
                                                     step=0.0)]
    return d


def unknown_parameter_warnings(override_names, is_declared, candidates=None) -> list[str]:
    """One warning line per parameter override (params file, ``-p``) that the node never declared.

    ``is_declared(name)`` is the node's ``has_parameter``, so everything rclpy itself declares
    (``use_sim_time``, ``start_type_description_service``, ...) counts as known. ``candidates``
    (default: our parameter names) feed a difflib close-match suggestion.

    Decision: warn, not fail. A mature node keeps running on a typo (the declared default stays
    in effect), and one ``/**`` file is often shared by several nodes, so keys meant for another
    node must not stop this one. ``qos_overrides.*`` keys get their own hint: this node takes its
    QoS from ``input_reliability``/``output_reliability``/``*_depth``, not from QoS overrides.
    """
    import difflib

    names = sorted(candidates if candidates is not None else SPECS)
    out = []
    for name in sorted(override_names):
        if is_declared(name):
            continue
        if name.startswith("qos_overrides."):
            out.append(f"parameter {name!r} ignored: this node does not take QoS overrides; use input_reliability, "
                       "input_depth, output_reliability, output_depth")
            continue
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        out.append(f"unknown parameter {name!r}{hint} \u2014 ignored")
    return out


def validate_value(name: str, value) -> str | None:
    """Checks beyond what the descriptor enforces: choices and value formats. ``None`` if valid."""
    spec = SPECS.get(name)
    if spec is None:
        return None
    if spec.choices and value not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}, got {value!r}"
    if name == "device":
        v = str(value)
        if not (v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit())):
            return f"device must be cpu, cuda or cuda:<index>, got {value!r}"
    if name in THRESHOLD_PARAMS and value != -1 and not (name == "stuff_area_min" or 0.0 <= value <= 1.0):
        return f"{name} must be -1 (the model's default) or in [0, 1], got {value}"
    if name == "weights" and value and not pathlib.Path(str(value)).expanduser().is_file():
        return f"weights file {value!r} does not exist"
    if name == "image_topics":
        if len(set(value)) != len(value) or any(not t for t in value):
            return f"image_topics must be distinct non-empty topic names, got {list(value)}"
        return camera_topics_error([(t, t, _output_prefix(t)) for t in value])
    return None


def camera_topics_error(cameras) -> str | None:
    """Reason why several cameras cannot share one node, or ``None``.

    ``cameras``: ``(given, input_topic, output_prefix)`` per entry of ``image_topics``. Each camera's
    outputs go under its topic's parent namespace (``/cam1/image_raw`` -> ``/cam1/panoptic/...``), so
    two cameras in one namespace (``/cam/image_raw`` and ``/cam/image_rect``) would publish into the
    same topics; that is refused, as are two names for the same input topic. The node calls this
    with fully resolved names (``cam1/image_raw`` and ``/<ns>/cam1/image_raw`` are the same topic);
    :func:`validate_value` with the names as given.
    """
    seen_topic: dict[str, str] = {}
    seen_prefix: dict[str, str] = {}
    for given, topic, prefix in cameras:
        if topic in seen_topic:
            return f"image_topics {seen_topic[topic]} and {given} are the same topic {topic}"
        if prefix in seen_prefix:
            return (f"image_topics {seen_prefix[prefix]} and {given} would both publish under {prefix}panoptic/: "
                    "each camera needs its own namespace")
        seen_topic[topic], seen_prefix[prefix] = given, given
    return None


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelHandle:
    """A loaded Predictor plus what the messages report about it."""

    predictor: object
    name: str
    version: str
    weights: str
    engine: str
    device: str


def _file_version(path: pathlib.Path) -> str:
    """Short content hash of the weights file: identifies the exact model in every message."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()[:12]


def predictor_settings(values: dict, model_config=None, model_input_size: int | None = None) -> dict:
    """``Predictor.update`` keywords from node parameter values.

    ``input_size`` 0 and thresholds -1 mean "the model's own default"; with ``model_config`` given
    they are resolved to its values (so switching back to -1 at run time restores them), without
    it they are left out (the Predictor then uses its defaults). ``model_input_size``: the loaded
    predictor's own input size (``Predictor.default_input_size``: a fixed-shape ONNX export's
    canvas), else the backbone's default.
    """
    out = {}
    size = int(values["input_size"])
    if size:
        out["input_size"] = size
    elif model_config is not None:
        from ciae_core.predictor import default_input_size

        out["input_size"] = model_input_size or default_input_size(model_config.backbone)
    for name in THRESHOLD_PARAMS:
        v = values[name]
        if v != -1:
            out[name] = v
        elif model_config is not None:
            out[name] = getattr(model_config, "min_stuff_area" if name == "stuff_area_min" else name)
    return out


def load_model(values: dict) -> ModelHandle:
    """Build the Predictor from node parameter values; ``NodeStartupError`` with one line on failure."""
    from ciae_core.predictor import Predictor, PredictorError

    from .resources import default_weights

    weights = str(values["weights"] or "")
    if not weights:
        found = default_weights()
        if found is None:
            raise NodeStartupError("no weights given and no shipped model found (models/*.safetensors); "
                                   "set the 'weights' parameter")
        weights = str(found)
    path = pathlib.Path(weights).expanduser()
    if not path.is_file():
        raise NodeStartupError(f"weights file {weights!r} does not exist")
    try:
        predictor = Predictor(str(path), engine=str(values["engine"]), device=str(values["device"]),
                              max_size=int(values["max_size"]), precision=str(values["precision"]),
                              **predictor_settings(values))
    except PredictorError as exc:
        raise NodeStartupError(str(exc)) from None
    except (OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NodeStartupError(f"cannot load model {weights!r}: {first}") from None
    return ModelHandle(predictor=predictor, name=path.stem, version=_file_version(path), weights=str(path),
                       engine=str(values["engine"]), device=str(values["device"]))


# ----------------------------------------------------------------------------------------------
# Latest-frame mailbox and statistics
# ----------------------------------------------------------------------------------------------

class LatestFrameMailbox:
    """One slot per camera holding only the newest frame; the worker takes all slots at once.

    ``put`` never blocks and returns whether an older, unprocessed frame was replaced (dropped).
    """

    def __init__(self, num_slots: int):
        self._slots: list = [None] * num_slots
        self._cond = threading.Condition()
        self._closed = False

    def put(self, slot: int, item) -> bool:
        with self._cond:
            dropped = self._slots[slot] is not None
            self._slots[slot] = item
            self._cond.notify()
            return dropped

    def take(self, timeout: float) -> list[tuple[int, object]]:
        """Wait up to ``timeout`` s for at least one frame; return ``[(slot, item), ...]`` and empty the slots."""
        with self._cond:
            if not self._closed and all(s is None for s in self._slots):
                self._cond.wait(timeout)
            items = [(k, s) for k, s in enumerate(self._slots) if s is not None]
            self._slots = [None] * len(self._slots)
            return items

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class CameraStats:
    received: int = 0
    processed: int = 0
    dropped: int = 0
    bad: collections.Counter = field(default_factory=collections.Counter)
    last_received: float = 0.0


class StageTimes:
    """Rolling window of per-stage latencies (ms) for the p50/p99 in /diagnostics."""

    def __init__(self, window: int = 500):
        self._data: dict[str, collections.deque] = {}
        self._window = window
        self._lock = threading.Lock()

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            self._data.setdefault(stage, collections.deque(maxlen=self._window)).append(float(ms))

    def percentiles(self) -> dict[str, tuple[float, float]]:
        with self._lock:
            return {k: (float(np.percentile(v, 50)), float(np.percentile(v, 99))) for k, v in self._data.items() if v}


# ----------------------------------------------------------------------------------------------
# The node logic (shared by the plain and the lifecycle node)
# ----------------------------------------------------------------------------------------------

@dataclass
class _Camera:
    index: int
    topic: str                  # fully resolved input topic
    prefix: str                 # output namespace prefix ('' for the single camera)
    sub: object = None
    reliability: object = None  # rclpy ReliabilityPolicy of the current subscription
    pub_segments: object = None
    pub_overlay: object = None
    pub_confidence: object = None
    pub_detections: object = None
    waiting_logged: bool = False


def _output_prefix(topic: str) -> str:
    """Camera namespace of an image topic: ``/cam1/image_raw`` -> ``/cam1/``, ``cam1`` -> ``cam1/``."""
    parent = topic.rstrip("/").rsplit("/", 1)[0] if "/" in topic.strip("/") else topic.rstrip("/")
    return (parent or topic) + "/"


class _PanopticLogic:
    """Everything the node does; mixed into an ``rclpy`` Node or LifecycleNode."""

    def _init_logic(self) -> None:
        from .qos import latched_qos

        self._latched_qos = latched_qos()
        for spec in PARAMS:
            if isinstance(spec.default, list):
                self._declare_string_array(spec)
            else:
                self.declare_parameter(spec.name, spec.default, _descriptor(spec))
        self._values = {}
        for spec in PARAMS:
            value = self.get_parameter(spec.name).value
            err = validate_value(spec.name, value)
            if err:
                raise NodeStartupError(f"invalid parameter: {err}")
            self._values[spec.name] = value
        # the same checks on resolved names ('x' makes the prefix a valid topic name to resolve)
        resolve = self.resolve_topic_name
        err = camera_topics_error([(t, resolve(t), resolve(_output_prefix(t) + "x")[:-1])
                                   for t in self._values["image_topics"]])
        if err:
            raise NodeStartupError(f"invalid parameter: {err}")
        self._warn_unknown_overrides()
        self.add_on_set_parameters_callback(self._on_set_parameters)
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
        self._qos_timer = None
        self._diag_timer = None
        self._pub_categories = None
        self._pub_diag = None
        self._diag_prev = (time.monotonic(), [])
        self._diag_prev_errors = 0  # processing errors counted up to the previous diagnostics message
        self._vision_msgs = self._vision_msgs_available()

    def _declare_string_array(self, spec: ParamSpec) -> None:
        """Declare a string-array parameter whose value is always initialised (``[]`` by default).

        rclpy types a ``[]`` default as BYTE_ARRAY, so such a parameter can only be declared by
        type, which leaves it *unset*; rclpy's GetParameters service then answers an empty list for
        any request naming it (``ros2 param dump`` came back empty). With public API only: declare
        it writable by type, set ``[]`` unless an override gave a value, then apply the real
        descriptor (read-only for ``image_topics``) with ``set_descriptor``.
        """
        from rclpy.exceptions import ParameterUninitializedException
        from rclpy.parameter import Parameter

        final = _descriptor(spec)
        writable = _descriptor(spec)
        writable.read_only = False
        self.declare_parameter(spec.name, Parameter.Type.STRING_ARRAY, writable)
        try:
            self.get_parameter(spec.name)
        except ParameterUninitializedException:
            self.set_parameters([Parameter(spec.name, Parameter.Type.STRING_ARRAY, list(spec.default))])
        self.set_descriptor(spec.name, final)

    def _warn_unknown_overrides(self) -> None:
        """Warn about misspelled or foreign keys in the params file / ``-p`` (see
        :func:`unknown_parameter_warnings`). rclpy keeps the overrides given to this node in the
        private ``Node._parameter_overrides`` (a dict name -> Parameter on Kilted and Jazzy; there
        is no public accessor); if a later rclpy drops or changes it, the check is skipped with a
        debug message rather than breaking the node."""
        overrides = getattr(self, "_parameter_overrides", None)
        if not isinstance(overrides, dict):
            self.get_logger().debug("rclpy exposes no parameter overrides: unknown parameter keys not checked")
            return
        for line in unknown_parameter_warnings(overrides, self.has_parameter):
            self.get_logger().warning(line)

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
        self.get_logger().info(
            f"model {self._model.name} ({self._model.version}) loaded from {self._model.weights} on "
            f"{self._model.engine}/{self._model.device}, input_size {self._model.predictor.input_size}, "
            f"{len(self._model.predictor.categories)} categories, in {time.monotonic() - t0:.2f} s")

    def _release_model(self) -> None:
        with self._model_lock:
            self._model = None
        gc.collect()
        with contextlib.suppress(ImportError):  # torch comes with the model; nothing to free without it
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()

    # -- interfaces --------------------------------------------------------------------------
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
            cam = _Camera(index=k, topic=topic, prefix=prefix)
            cam.pub_segments = self.create_publisher(PanopticSegments, prefix + "panoptic/segments", oq)
            cam.pub_overlay = self.create_publisher(Image, prefix + "panoptic/overlay", oq)
            cam.pub_confidence = self.create_publisher(Image, prefix + "panoptic/confidence", oq)
            if self._vision_msgs and self._values["publish_detections"]:
                from vision_msgs.msg import Detection2DArray

                cam.pub_detections = self.create_publisher(Detection2DArray, prefix + "panoptic/detections", oq)
            self._cameras.append(cam)
        self._stats = [CameraStats() for _ in self._cameras]
        self._pub_categories = self.create_publisher(CategoryArray, "panoptic/categories", self._latched_qos)
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id="")
        self._pub_categories.publish(categories_msg(self._model.predictor.categories, self._model.name, header))
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

    def _start_processing(self) -> None:
        self._mailbox = LatestFrameMailbox(len(self._cameras))
        self._stop.clear()
        self._worker = threading.Thread(target=self._worker_loop, name="ciae_worker", daemon=True)
        self._worker.start()
        self._update_subscriptions()
        self._qos_timer = self.create_timer(1.0, self._update_subscriptions)
        self._diag_prev = (time.monotonic(), [CameraStats(s.received, s.processed) for s in self._stats])
        with self._counts_lock:
            self._diag_prev_errors = sum(self._errors.values())
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
        if self._mailbox is not None:
            self._mailbox.close()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
        self._worker = None

    def _destroy_interfaces(self) -> None:
        for cam in self._cameras:
            for pub in (cam.pub_segments, cam.pub_overlay, cam.pub_confidence, cam.pub_detections):
                if pub is not None:
                    self.destroy_publisher(pub)
        self._cameras = []
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
        next_time = 0.0
        while not self._stop.is_set():
            rate = float(self._values["max_rate"])
            if rate > 0.0:
                delay = next_time - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
            items = self._mailbox.take(timeout=0.2)
            if not items:
                continue
            if rate > 0.0:
                next_time = time.monotonic() + 1.0 / rate
            try:
                self._process(items)
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything a frame causes
                with self._counts_lock:
                    self._errors[type(exc).__name__] += 1
                self._warn("process", f"frame processing failed: {type(exc).__name__}: {exc}")

    def _process(self, items) -> None:
        t_start = time.monotonic()
        values = self._values
        max_px, scale16 = int(values["max_image_pixels"]), int(values["scale16_max"])
        from ciae_core.predictor import PredictorError

        with self._model_lock:
            model = self._model
            if model is None:
                return
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
                return
            t_conv = time.monotonic()
            results = pred(images, color="rgb", return_confidence=bool(values["publish_confidence"]))
            t_pred = time.monotonic()
            timings = dict(pred.timings)
        for (cam_idx, msg, t_recv), img, res, lb in zip(frames, images, results, boxes):
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

    def _input_topic(self, cam: _Camera) -> str:
        """The topic actually subscribed for a camera (``<image>/compressed`` for compressed input);
        ``cam.topic`` stays the camera's base name (diagnostics, output prefix)."""
        return cam.topic + "/compressed" if self._values["input_transport"] == "compressed" else cam.topic

    def _bad_frame(self, cam: int, reason: str, text: str) -> None:
        with self._counts_lock:
            self._stats[cam].bad[reason] += 1
        self._warn("bad:" + reason, f"skipping frame from {self._input_topic(self._cameras[cam])}: {text}")

    def _publish_outputs(self, cam: _Camera, header, image, result, model: ModelHandle, input_hw, infer_ms) -> None:
        from .conversions import detections_msg, render_overlay, segments_msg
        from .image_conversion import numpy_to_image

        t0 = time.monotonic()
        msg = segments_msg(result, header, model.name, model.version, input_hw, infer_ms)
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
            cam.pub_confidence.publish(numpy_to_image(np.asarray(result.confidence, np.float32), "32FC1",
                                                      header=header))
        if cam.pub_detections is not None:
            cam.pub_detections.publish(detections_msg(result, header))

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
        changed = {p.name for p in params if p.name in SPECS and new[p.name] != self._values[p.name]}
        if self._model is not None and any(SPECS[n].reloads_model for n in changed):
            try:
                model = load_model(new)
            except NodeStartupError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
            with self._model_lock:
                self._model = model
            self.get_logger().info(f"model reloaded: {model.name} on {model.engine}/{model.device}, "
                                   f"input_size {model.predictor.input_size}")
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
                    return SetParametersResult(successful=False, reason=str(exc))
        self._values = new
        return SetParametersResult(successful=True)

    # -- diagnostics -----------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

        from .qos import policy_name

        now = time.monotonic()
        t_prev, prev = self._diag_prev
        dt = max(now - t_prev, 1e-6)
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        pct = self._times.percentiles()
        model = self._model
        name = self.get_fully_qualified_name()
        with self._counts_lock:  # snapshots: the worker may add keys meanwhile
            bads = [collections.Counter(st.bad) for st in self._stats]
            errors = collections.Counter(self._errors)
        for k, (cam, st) in enumerate(zip(self._cameras, self._stats)):
            p = prev[k] if k < len(prev) else CameraStats()
            bad = bads[k]
            status = DiagnosticStatus(name=f"{name}: {cam.topic}", hardware_id=cam.topic)
            vals = [("input_rate_hz", f"{(st.received - p.received) / dt:.2f}"),
                    ("processed_rate_hz", f"{(st.processed - p.processed) / dt:.2f}"),
                    ("frames_received", str(st.received)), ("frames_processed", str(st.processed)),
                    ("frames_dropped", str(st.dropped)), ("frames_bad", str(sum(bad.values())))]
            vals += [(f"bad_{reason}", str(n)) for reason, n in sorted(bad.items())]
            vals.append(("input_reliability", "none (no publisher yet)" if cam.reliability is None
                         else policy_name(cam.reliability)))
            bad_now = sum(bad.values()) - sum(p.bad.values())
            if st.received == 0 or now - st.last_received > 5.0:
                status.level, status.message = DiagnosticStatus.WARN, "no input"
            elif bad_now > 0:
                status.level, status.message = DiagnosticStatus.WARN, f"{bad_now} bad frame(s) in the last period"
            else:
                status.level, status.message = DiagnosticStatus.OK, "ok"
            status.values = [KeyValue(key=a, value=b) for a, b in vals]
            arr.status.append(status)
        mstat = DiagnosticStatus(name=f"{name}: model", hardware_id=model.device if model else "")
        vals = [("model", model.name if model else ""), ("model_version", model.version if model else ""),
                ("weights", model.weights if model else ""), ("engine", model.engine if model else ""),
                ("device", model.device if model else ""),
                ("input_size", str(model.predictor.input_size) if model else "")]
        vals += [(f"latency_{stage}_p50_ms", f"{p50:.2f}") for stage, (p50, _) in sorted(pct.items())]
        vals += [(f"latency_{stage}_p99_ms", f"{p99:.2f}") for stage, (_, p99) in sorted(pct.items())]
        vals += [(f"errors_{k}", str(v)) for k, v in sorted(errors.items())]
        mstat.values = [KeyValue(key=a, value=b) for a, b in vals]
        # like bad frames: the level reflects the last period (one error must not leave the model in
        # ERROR for good); the running totals stay in the errors_<type> values
        errors_total = sum(errors.values())
        errors_now = errors_total - self._diag_prev_errors
        if errors_now > 0:
            mstat.level = DiagnosticStatus.ERROR
            mstat.message = f"{errors_now} processing error(s) in the last period ({errors_total} in total)"
        else:
            mstat.level, mstat.message = DiagnosticStatus.OK, "ok"
        arr.status.append(mstat)
        self._pub_diag.publish(arr)
        self._diag_prev_errors = errors_total
        self._diag_prev = (now, [CameraStats(s.received, s.processed, s.dropped, b)
                                 for s, b in zip(self._stats, bads)])


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

        def __init__(self, **kwargs):
            LifecycleNode.__init__(self, NODE_NAME, **kwargs)
            self._init_logic()

        def on_configure(self, state):
            try:
                self._load()
            except NodeStartupError as exc:
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
# Entry point
# ----------------------------------------------------------------------------------------------

def _parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="ciae-panoptic-node",
        description="CIAE panoptic segmentation ROS 2 node. ROS arguments go after --ros-args, e.g. "
                    "--ros-args --params-file config/panoptic.yaml -r image:=/my_camera/image_raw")
    ap.add_argument("--lifecycle", action="store_true", help="run as a managed (lifecycle) node")
    ap.add_argument("--autostart", action="store_true", help="with --lifecycle: configure and activate at start")
    opts = ap.parse_args(argv)
    if opts.autostart and not opts.lifecycle:
        # an error, not a silent no-op: the user asked for something this combination cannot mean
        ap.error("--autostart needs --lifecycle (a plain node is active from the start anyway)")
    return opts


def main(argv: list[str] | None = None) -> int:
    """Run the node until Ctrl-C / SIGTERM; returns the exit status (1 on a startup error)."""
    import signal

    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions
    from rclpy.utilities import remove_ros_args

    from .resources import use_large_data_dds_profile

    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] [%(name)s]: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    opts = _parse_args(remove_ros_args(["ciae-panoptic-node", *args])[1:])
    use_large_data_dds_profile()
    # Default remap, used only when the user has no rule for 'image' (the first matching rule wins).
    ros_args = [*args, "--ros-args", "-r", f"image:={DEFAULT_IMAGE_TOPIC}"]

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    # We handle SIGINT/SIGTERM ourselves so that the worker thread is stopped before the context
    # goes away (rclpy's handler would invalidate publishers under the worker's feet). SIGINT is set
    # explicitly too: a process started in the background by a non-interactive shell (`node &` in a
    # script) inherits SIGINT as ignored, Python then installs no KeyboardInterrupt handler, and
    # the node would not stop on Ctrl-C or on ros2 launch's first shutdown signal.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    PanopticNode, PanopticLifecycleNode = _make_node_classes()
    log = logging.getLogger(NODE_NAME)
    try:
        import ciae_ros.msg  # noqa: F401 - generated by rosidl, not by pip
    except ImportError:
        log.error("cannot start: the ciae_ros messages are not built (no module ciae_ros.msg); run `make setup` "
                  "(or `colcon build` and source install/setup.bash on a ROS 2 install)")
        return 1
    try:
        with rclpy.init(args=["ciae-panoptic-node", *ros_args], signal_handler_options=SignalHandlerOptions.NO):
            try:
                node = PanopticLifecycleNode() if opts.lifecycle else PanopticNode()
            except NodeStartupError as exc:
                log.error("cannot start: %s", exc)
                return 1
            except Exception as exc:  # noqa: BLE001 - e.g. a parameter file value outside its range
                text = (str(exc).strip().splitlines() or [""])[0]
                log.error("cannot start: %s: %s", type(exc).__name__, text)
                return 1
            try:
                if opts.lifecycle and opts.autostart:
                    if node.trigger_configure() != _success() or node.trigger_activate() != _success():
                        log.error("cannot start: lifecycle autostart failed (see the message above)")
                        return 1
                executor = SingleThreadedExecutor()
                executor.add_node(node)
                while True:  # wakes up regularly so that Python's SIGINT/SIGTERM handlers can run
                    executor.spin_once(timeout_sec=0.25)
            except (KeyboardInterrupt, ExternalShutdownException):
                pass
            finally:
                node.destroy_node()
    except KeyboardInterrupt:
        pass
    return 0


def _success():
    from rclpy.lifecycle import TransitionCallbackReturn

    return TransitionCallbackReturn.SUCCESS


if __name__ == "__main__":
    sys.exit(main())
