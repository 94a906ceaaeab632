"""The node's parameters: the declared table, descriptors, and every check on their values.

:data:`PARAMS` is the single source of the node's parameters (name, default, description, range,
read-only, whether a change reloads the model); ``config/panoptic.yaml``, the launch file and the
README are tested against it. :func:`validate_value` holds the checks a ``ParameterDescriptor``
cannot express (choices, device and weights formats, camera topics), used at start and on every
run-time change; :func:`unknown_parameter_warnings` reports misspelled override keys. The
``declare_parameters`` / ``read_parameters`` / ``warn_unknown_overrides`` helpers do this on a
running rclpy node (the only functions here that touch rclpy, imported when called).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from ciae_core.user_input import file_problem, quote

from .image_conversion import DEFAULT_MAX_PIXELS


class NodeStartupError(RuntimeError):
    """The node cannot start (weights, engine, device, parameters); the message says why."""


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
    ParamSpec("weights", "", "Model file (.safetensors; .onnx for onnxruntime/openvino; .xml int8 for openvino). "
              "Empty: the shipped "
              "model (models/ in the source tree or share/ciae_ros/models).", reloads_model=True),
    ParamSpec("engine", "auto", "Inference engine. auto: on device cpu the fastest engine within the accuracy bound "
              "for this CPU, decided at start from its features and logged (ciae_core.cpu_features.auto_engine); "
              "torch on cuda.", choices=("auto", "torch", "onnxruntime", "openvino"), reloads_model=True),
    ParamSpec("device", "cpu", "Inference device: cpu, cuda or cuda:<index>.", reloads_model=True),
    ParamSpec("precision", "auto", "Inference precision: auto (the engine's best native one), fp32, fp16 (CUDA), "
              "bf16 (torch autocast; openvino on AMX/AVX512_BF16 CPUs), int8 (openvino with an int8 .xml from "
              "ciae-export --int8).", choices=("auto", "fp32", "fp16", "bf16", "int8"), reloads_model=True),
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
    ParamSpec("max_image_pixels", DEFAULT_MAX_PIXELS, "Frames with more pixels are rejected (too_large); "
              "OpenCV's decoder enforces the start-up value: at run time it can go below it, not above.",
              int_range=(1, 2**31 - 1, 1)),
    ParamSpec("scale16_max", 65535, "16-bit input: this value maps to 255 (4095 for 12-bit cameras).",
              int_range=(1, 65535, 1)),
    # 3-D from a registered depth image (issue 15; ciae_ros.node_depth)
    ParamSpec("depth_topic", "", "Depth image registered to the colour image (16UC1 in depth_scale units or "
              "32FC1 metres), e.g. camera/aligned_depth_to_color/image_raw, resolved like the image topic. Empty: "
              "no 3-D. With image_topics: a relative name under each camera's namespace, unless depth_topics.",
              read_only=True),
    ParamSpec("camera_info_topic", "", "CameraInfo giving K of the depth image. Empty: the image topic's sibling "
              "camera_info (camera/image_raw -> camera/camera_info). With image_topics: a relative name under each "
              "camera's namespace, unless camera_info_topics.", read_only=True),
    ParamSpec("depth_topics", [], "Several cameras: one depth topic per entry of image_topics, same order (empty: "
              "depth_topic under each camera's namespace).", read_only=True),
    ParamSpec("camera_info_topics", [], "Several cameras: one CameraInfo topic per entry of image_topics, same "
              "order (empty: camera_info_topic under each camera's namespace, or each image topic's sibling "
              "camera_info).", read_only=True),
    ParamSpec("depth_scale", 0.001, "Metres per unit of 16UC1 depth (0.001: millimetres).", float_range=(1e-6, 1.0)),
    ParamSpec("min_depth", 0.1, "Depth below this (metres) is no measurement (must be > 0 and < max_depth).",
              float_range=(0.0, 1000.0)),
    ParamSpec("max_depth", 10.0, "Depth beyond this (metres) is no measurement.", float_range=(0.0, 1000.0)),
    ParamSpec("sync_tolerance", 0.02, "Largest |depth stamp - colour stamp| in seconds taken as the same instant; "
              "a colour frame without depth that close is published without 3-D.", float_range=(0.0, 1.0)),
    ParamSpec("points_stride", 4, "panoptic/points: every n-th pixel in both axes.", int_range=(1, 64, 1)),
    ParamSpec("points_color", "segment", "Colour of panoptic/points: segment (the overlay's segment colours) or "
              "image (the camera's).", choices=("segment", "image")),
    ParamSpec("markers_include_stuff", False, "panoptic/markers: also boxes of stuff segments (ground, wall, ...)."),
    ParamSpec("diagnostics_period", 1.0, "Seconds between /diagnostics messages.", float_range=(0.1, 60.0),
              read_only=True),
    # tracking (ciae_ros.node_tracking); defaults = ciae_core.tracking.SegmentTracker's
    ParamSpec("tracking", True, "Persistent ids of thing segments across frames (Segment.track_id), one tracker "
              "per camera. Off: every track_id is 0."),
    ParamSpec("tracking_association", "embedding", "embedding: the segments' CIAE embedding and box IoU, with "
              "re-identification; iou: box IoU only (SORT/ByteTrack).", choices=("embedding", "iou")),
    ParamSpec("tracking_high_score", 0.4, "Segments scoring at least this take part in the first association "
              "round.", float_range=(0.0, 1.0)),
    ParamSpec("tracking_low_score", 0.1, "Segments scoring in [low, high) only extend confirmed tracks (by IoU); "
              "lower ones are never tracked.", float_range=(0.0, 1.0)),
    ParamSpec("tracking_new_track_score", 0.5, "Least score of a segment that starts a track (low <= high <= "
              "new).", float_range=(0.0, 1.0)),
    ParamSpec("tracking_min_hits", 3, "Matched frames before a track is confirmed and gets its id.",
              int_range=(1, 1000, 1)),
    ParamSpec("tracking_max_age", 2.0, "Seconds a track may go unseen before it is deleted (> 0).",
              float_range=(0.0, 3600.0)),
    ParamSpec("tracking_min_iou", 0.02, "Least box IoU with a track's predicted box for a match.",
              float_range=(0.0, 1.0)),
    ParamSpec("tracking_low_min_iou", 0.5, "Least box IoU for a match of a low-score segment.",
              float_range=(0.0, 1.0)),
    ParamSpec("tracking_iou_weight", 0.5, "Weight of 1 - IoU against the embedding distance in the matching "
              "cost.", float_range=(0.0, 1.0)),
    ParamSpec("tracking_max_embedding_distance", 0.4, "Largest embedding distance (1 - cos) of a match.",
              float_range=(0.0, 2.0)),
    ParamSpec("tracking_reid_distance", 0.15, "Largest embedding distance of a match by appearance alone "
              "(re-identification of a lost or unforeseen thing).", float_range=(0.0, 2.0)),
    ParamSpec("tracking_reid_speed", 4.0, "Re-identification reach: box sides per second since the last "
              "sighting.", float_range=(0.0, 1000.0)),
    ParamSpec("tracking_mask_iou", False, "Mask IoU instead of box IoU where boxes overlap."),
)
SPECS = {p.name: p for p in PARAMS}
#: Tracking parameter -> ``SegmentTracker`` keyword (``tracking`` itself switches it on/off).
TRACKER_PARAMS = {p.name: p.name[len("tracking_"):] for p in PARAMS if p.name.startswith("tracking_")}
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
            out.append(f"parameter {quote(name)} ignored: this node does not take QoS overrides; use "
                       "input_reliability, input_depth, output_reliability, output_depth")
            continue
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        hint = f" (did you mean {quote(close[0])}?)" if close else ""
        out.append(f"unknown parameter {quote(name)}{hint} \u2014 ignored")
    return out


def validate_value(name: str, value) -> str | None:
    """Checks beyond what the descriptor enforces: choices and value formats. ``None`` if valid."""
    spec = SPECS.get(name)
    if spec is None:
        return None
    if spec.choices and value not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}, got {quote(value)}"
    if name == "device":
        v = str(value)
        if not (v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit())):
            return f"device must be cpu, cuda or cuda:<index>, got {quote(value)}"
    if name in THRESHOLD_PARAMS and value != -1 and not (name == "stuff_area_min" or 0.0 <= value <= 1.0):
        return f"{name} must be -1 (the model's default) or in [0, 1], got {value}"
    if name == "weights" and value:
        problem = file_problem(pathlib.Path(str(value)).expanduser())
        if problem is not None:  # a directory or /dev/zero is not "missing"
            return f"weights file {quote(value)} {problem}"
    if name == "image_topics":
        if len(set(value)) != len(value) or any(not t for t in value):
            return f"image_topics must be distinct non-empty topic names, got {list(value)}"
        return camera_topics_error([(t, t, _output_prefix(t)) for t in value])
    bounds = spec.float_range or (spec.int_range[:2] if spec.int_range else None)
    if name in TRACKER_PARAMS and bounds and not bounds[0] <= value <= bounds[1]:
        return f"{name} must be in [{bounds[0]}, {bounds[1]}], got {value}"
    return None


def settings_error(values: dict) -> str | None:
    """Checks across parameters (after :func:`validate_value` of each): the tracker's settings
    together, by the ``SegmentTracker`` constructor itself (e.g. ``low <= high <= new_track_score``,
    ``max_age > 0``), its message in parameter names. ``None`` if valid."""
    import re

    from ciae_core.tracking import SegmentTracker

    try:
        SegmentTracker(**tracker_kwargs(values))
    except ValueError as exc:
        names = sorted(TRACKER_PARAMS.items(), key=lambda kv: -len(kv[1]))
        pattern = re.compile(r"\b(" + "|".join(kw for _, kw in names) + r")\b")
        return pattern.sub(lambda m: "tracking_" + m.group(1), str(exc))
    return None


def tracker_kwargs(values: dict) -> dict:
    """``SegmentTracker`` keywords from node parameter values (the ``tracking_*`` parameters)."""
    return {kw: values[name] for name, kw in TRACKER_PARAMS.items()}


def depth_values_error(values: dict) -> str | None:
    """Checks across the 3-D parameters (``values``: name -> value), or ``None``: min_depth > 0
    and below max_depth; depth_topics / camera_info_topics empty or one per entry of image_topics,
    distinct; with several cameras a derived depth_topic / camera_info_topic must be relative (one
    absolute name would be every camera's); camera_info_topics only with depth."""
    if not 0.0 < values["min_depth"] < values["max_depth"]:
        return f"need 0 < min_depth < max_depth, got min_depth {values['min_depth']}, max_depth {values['max_depth']}"
    cams = list(values["image_topics"])
    for name in ("depth_topics", "camera_info_topics"):
        given = list(values[name])
        if given and len(given) != len(cams):
            return (f"{name} needs one topic per entry of image_topics ({len(cams)}), got {len(given)}"
                    + ("" if cams else f": a single camera uses {name[:-1]}"))
        if len(set(given)) != len(given) or any(not t for t in given):
            return f"{name} must be distinct non-empty topic names, got {given}"
    has_depth = bool(values["depth_topic"] or values["depth_topics"])
    if values["camera_info_topics"] and not has_depth:
        return "camera_info_topics is set but there is no depth (set depth_topic or depth_topics)"
    if len(cams) > 1:
        for name, listed in (("depth_topic", "depth_topics"), ("camera_info_topic", "camera_info_topics")):
            if values[name].startswith(("/", "~")) and not values[listed]:
                return (f"{name} {values[name]!r} is absolute, so every camera would read the same topic: give a "
                        f"name relative to each camera's namespace or list {listed}")
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


def _output_prefix(topic: str) -> str:
    """Camera namespace of an image topic: ``/cam1/image_raw`` -> ``/cam1/``, ``cam1`` -> ``cam1/``."""
    parent = topic.rstrip("/").rsplit("/", 1)[0] if "/" in topic.strip("/") else topic.rstrip("/")
    return (parent or topic) + "/"



# ----------------------------------------------------------------------------------------------
# On a running rclpy node (Node or LifecycleNode)
# ----------------------------------------------------------------------------------------------

def declare_parameters(node) -> None:
    """Declare every parameter of :data:`PARAMS` on ``node`` with its descriptor."""
    for spec in PARAMS:
        if isinstance(spec.default, list):
            _declare_string_array(node, spec)
        else:
            node.declare_parameter(spec.name, spec.default, _descriptor(spec))


def read_parameters(node) -> dict:
    """The declared parameters' values, validated; ``NodeStartupError`` names the first bad one.

    ``image_topics`` is checked again on fully resolved names (:func:`camera_topics_error`).
    """
    values = {}
    for spec in PARAMS:
        value = node.get_parameter(spec.name).value
        err = validate_value(spec.name, value)
        if err:
            raise NodeStartupError(f"invalid parameter: {err}")
        values[spec.name] = value
    err = settings_error(values)
    if err:
        raise NodeStartupError(f"invalid parameters: {err}")
    err = depth_values_error(values)
    if err:
        raise NodeStartupError(f"invalid parameter: {err}")
    # the same checks on resolved names ('x' makes the prefix a valid topic name to resolve)
    resolve = node.resolve_topic_name
    err = camera_topics_error([(t, resolve(t), resolve(_output_prefix(t) + "x")[:-1])
                               for t in values["image_topics"]])
    if err:
        raise NodeStartupError(f"invalid parameter: {err}")
    return values


def _declare_string_array(node, spec: ParamSpec) -> None:
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
    node.declare_parameter(spec.name, Parameter.Type.STRING_ARRAY, writable)
    try:
        node.get_parameter(spec.name)
    except ParameterUninitializedException:
        node.set_parameters([Parameter(spec.name, Parameter.Type.STRING_ARRAY, list(spec.default))])
    node.set_descriptor(spec.name, final)


def warn_unknown_overrides(node) -> None:
    """Warn about misspelled or foreign keys in the params file / ``-p`` (see
    :func:`unknown_parameter_warnings`). rclpy keeps the overrides given to this node in the
    private ``Node._parameter_overrides`` (a dict name -> Parameter on Kilted and Jazzy; there
    is no public accessor); if a later rclpy drops or changes it, the check is skipped with a
    debug message rather than breaking the node."""
    overrides = getattr(node, "_parameter_overrides", None)
    if not isinstance(overrides, dict):
        node.get_logger().debug("rclpy exposes no parameter overrides: unknown parameter keys not checked")
        return
    for line in unknown_parameter_warnings(overrides, node.has_parameter):
        node.get_logger().warning(line)
