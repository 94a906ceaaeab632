"""rosbag2 (MCAP) recording and offline processing: ``ciae-bag --in BAG --out BAG``.

* :class:`BagWriter` writes already-serialised (CDR) messages to an MCAP rosbag2 with the full
  message definitions (our ``ciae_ros/msg/*`` types are registered from the ``msg/*.msg`` text),
  so Foxglove Studio, ``ros2 bag play`` and rviz users can replay it. The demo client records
  through it.
* :func:`plan_bag` decides, from the input bag's topic list alone, what an offline run reads and
  writes; :func:`process_bag` runs the model over those camera images and writes a new bag holding
  every input topic plus ``panoptic/segments``, ``panoptic/overlay`` and ``panoptic/categories``,
  with the input messages' record times and headers.

Decisions (issue 16):

* **Inputs are camera images only**: by default every ``sensor_msgs/Image`` / ``CompressedImage``
  topic except our own outputs (any topic with a ``panoptic`` namespace, e.g. a recorded
  ``/panoptic/overlay``) and depth images (a name part containing ``depth``); ``--topics`` names
  them explicitly (an output of ours is refused even then). A camera recorded both raw and
  ``/compressed`` is read once, from the raw topic unless the ``/compressed`` one is named.
* **Outputs are named as the node names them**, under ``--namespace`` (default the root, as the
  node in the root namespace): one camera -> ``<ns>/panoptic/segments``, ``<ns>/panoptic/overlay``;
  several cameras -> per camera namespace, ``/cam1/image_raw`` -> ``<ns>/cam1/panoptic/...`` (the
  node's ``image_topics`` rule); ``<ns>/panoptic/categories`` once.
* **Never mixed into recorded topics**: an output topic that the input bag already has (e.g. the
  live ``/panoptic/segments`` of a ``ciae-demo`` bag) is an error naming it; choose another
  ``--namespace`` (``--namespace /offline``), so live and offline results stay apart.
* **3-D** with ``--depth-topic`` (or ``--depth-topics``): the recorded depth and camera info are
  paired with each camera as the node pairs them, and ``panoptic/markers`` and ``panoptic/points``
  are written too (:mod:`ciae_ros.bag_depth`).
* **Tracked as by the node** (issue 14): thing segments get ``Segment.track_id`` from one tracker
  per camera (:mod:`ciae_ros.node_tracking`, the node's ``tracking_*`` defaults), in the bag's
  order; a camera whose stamps go back (a bag of several recordings) or whose frame_id changes
  starts new tracks (counted in the summary line). ``--no-tracking``: every ``track_id`` is 0.

Needs ``rosbags`` (pure Python) and the rclpy message packages (for serialisation; no DDS).
"""

from __future__ import annotations

import argparse
import collections
import logging
import pathlib
import re
import sys
import time
from dataclasses import dataclass, field

from .bag_depth import BagDepth, BagDepthError, DepthOptions, depth_pairs, output_topics
from .depth_sync import stamp_ns
from ciae_core.user_input import quote

from .image_conversion import ImageConversionError, compressed_to_rgb, image_to_rgb

_LOG = logging.getLogger(__name__)

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
OUR_TYPES = ("Segment", "PanopticSegments", "Category", "CategoryArray")


class BagError(RuntimeError):
    """A bag cannot be read or written (one line)."""


def make_typestore():
    """rosbags typestore of ROS 2 Kilted plus ``ciae_ros/msg/*`` read from our ``msg/`` folder."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    from .resources import find_data_file

    store = get_typestore(Stores.ROS2_KILTED)
    msg_dir = find_data_file("msg")
    if msg_dir is None:
        raise BagError("cannot find the ciae_ros msg/ folder (source tree or share/ciae_ros/msg)")
    types = {}
    for name in OUR_TYPES:
        path = msg_dir / f"{name}.msg"
        if not path.is_file():
            raise BagError(f"message definition {path} is missing")
        types.update(get_types_from_msg(path.read_text(), f"ciae_ros/msg/{name}"))
    store.register(types)
    return store


def ros_type_name(msg_or_class) -> str:
    """``ciae_ros.msg.PanopticSegments`` -> ``ciae_ros/msg/PanopticSegments``."""
    cls = msg_or_class if isinstance(msg_or_class, type) else type(msg_or_class)
    return f"{cls.__module__.split('.')[0]}/msg/{cls.__name__}"


class BagWriter:
    """Append serialised messages to a new MCAP rosbag2 (``path`` must not exist yet).

    ``compress``: zstd-compressed MCAP chunks (rosbag2's ``zstd`` storage presets; every MCAP reader
    decompresses them): the 32SC1 id images shrink ~300x, camera frames barely.
    """

    def __init__(self, path, typestore=None, storage: str = "mcap", compress: bool = False):
        from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer

        self.path = pathlib.Path(path)
        if self.path.exists():
            raise BagError(f"output bag {self.path} already exists; choose a new path")
        self.typestore = typestore if typestore is not None else make_typestore()
        plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
        self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        if compress:
            self._writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
        self._writer.open()
        self._connections: dict[str, object] = {}
        self.count = 0

    def write(self, topic: str, msgtype: str, data: bytes, timestamp_ns: int) -> None:
        conn = self._connections.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msgtype, typestore=self.typestore)
            self._connections[topic] = conn
        self._writer.write(conn, int(timestamp_ns), data)
        self.count += 1

    def write_msg(self, topic: str, msg, timestamp_ns: int) -> None:
        """Serialise an rclpy message and write it."""
        from rclpy.serialization import serialize_message

        self.write(topic, ros_type_name(msg), serialize_message(msg), timestamp_ns)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

# ----------------------------------------------------------------------------------------------
# What an offline run reads and writes
# ----------------------------------------------------------------------------------------------

_NAME_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_our_output(topic: str) -> bool:
    """A topic under a ``panoptic`` namespace (``/panoptic/overlay``, ``/cam1/panoptic/confidence``,
    ``/offline/panoptic/segments``): something the node or ``ciae-bag`` published, not a camera."""
    return "panoptic" in topic.strip("/").split("/")[:-1]


def _is_depth(topic: str) -> bool:
    return any("depth" in part.lower() for part in topic.strip("/").split("/"))


def normalize_namespace(namespace: str) -> str:
    """``"offline"`` / ``"/offline/"`` -> ``"/offline"``; ``""`` / ``"/"`` -> ``""`` (the root).
    ``BagError`` for a name ROS would not accept."""
    parts = [p for p in (namespace or "").strip().split("/") if p]
    for p in parts:
        if not _NAME_PART.fullmatch(p):
            raise BagError(f"--namespace {quote(namespace)} is not a ROS namespace (parts are letters, digits and _, "
                           "not starting with a digit), e.g. /offline")
    return "".join("/" + p for p in parts)


def _camera_prefix(topic: str) -> str:
    """``/cam1/image_raw`` -> ``/cam1/`` (the node's rule for ``image_topics``)."""
    from .node_params import _output_prefix

    prefix = _output_prefix(topic)
    return prefix if prefix.startswith("/") else "/" + prefix


@dataclass
class BagPlan:
    """What :func:`process_bag` reads and writes (built by :func:`plan_bag`).

    ``inputs``: ``(topic, msgtype)`` of the image connections to segment; ``cameras``: image topic
    (``/compressed`` removed) -> output prefix (``<ns>/`` or ``<ns>/<camera ns>/``); ``outputs``:
    every topic that will be written, in order.
    """

    inputs: list[tuple[str, str]]
    cameras: dict[str, str]
    categories_topic: str
    outputs: list[str]
    frames: int = 0  # image messages to segment (from the bag's index)
    depth_pairs: dict = field(default_factory=dict)  # image topic -> (depth, camera info topic); {}: no 3-D


def _base_topic(topic: str, msgtype: str) -> str:
    return topic.removesuffix("/compressed") if msgtype.endswith("CompressedImage") else topic


def _chosen_inputs(connections, topics: list[str] | None) -> list[tuple[str, str]]:
    """The ``(topic, msgtype)`` image streams to segment (rules in the module docstring)."""
    images = sorted({(c.topic, c.msgtype) for c in connections if c.msgtype in IMAGE_TYPES})
    if topics:
        for t in topics:
            if is_our_output(t):
                raise BagError(f"--topics {t} is an output of the panoptic node, not a camera image topic")
            if not any(t in (topic, _base_topic(topic, mt)) for topic, mt in images):
                have = ", ".join(topic for topic, _ in images) or "none"
                raise BagError(f"--topics {t}: no such image topic in the bag (image topics: {have})")
        picked = [(topic, mt) for topic, mt in images if topic in topics or _base_topic(topic, mt) in topics]
    else:
        picked = [(topic, mt) for topic, mt in images if not is_our_output(topic) and not _is_depth(topic)]
    by_camera: dict[str, list[tuple[str, str]]] = {}
    for topic, mt in picked:
        by_camera.setdefault(_base_topic(topic, mt), []).append((topic, mt))
    chosen = []
    for base, streams in by_camera.items():  # one stream per camera
        named = [s for s in streams if topics and s[0] != base and s[0] in topics]  # an explicit /compressed
        raw = [s for s in streams if s[1] == "sensor_msgs/msg/Image"]
        chosen.append((named or raw or streams)[0])
    return sorted(chosen)


def plan_bag(connections, topics: list[str] | None = None, namespace: str = "", overlay: bool = True,
             source: str = "the input bag", depth: DepthOptions | None = None) -> BagPlan:
    """Inputs and output topics of an offline run over a bag with ``connections`` (rosbags
    ``Connection``s); ``BagError`` (one line) when there is no camera image topic, when two cameras
    would write the same outputs, when an output topic already exists in the input bag, or when
    ``depth`` names topics the bag lacks (:func:`ciae_ros.bag_depth.depth_pairs`)."""
    inputs = _chosen_inputs(connections, topics)
    if not inputs:
        raise BagError(f"{source} has no camera image topics (sensor_msgs/Image or CompressedImage, other than "
                       "panoptic outputs and depth images); name them with --topics")
    ns = normalize_namespace(namespace)
    bases = [_base_topic(t, mt) for t, mt in inputs]
    cameras = {b: ns + (_camera_prefix(b) if len(bases) > 1 else "/") for b in bases}
    seen: dict[str, str] = {}
    for base, prefix in cameras.items():
        if prefix in seen:
            raise BagError(f"cameras {seen[prefix]} and {base} would both write under {prefix}panoptic/ (outputs go "
                           "to each camera's namespace); process them in separate runs with --topics")
        seen[prefix] = base
    outputs = []
    for prefix in cameras.values():
        outputs += [prefix + "panoptic/segments"] + ([prefix + "panoptic/overlay"] if overlay else [])
    pairs = {}
    if depth is not None and depth.enabled:
        try:
            pairs = depth_pairs(depth, cameras, len(bases) > 1, connections)
        except BagDepthError as exc:
            raise BagError(f"{source}: {exc}") from None
        both = sorted({t for pair in pairs.values() for t in pair} & set(bases))
        if both:
            raise BagError(f"{both[0]} is a camera input and a depth or camera info topic: name the cameras with --topics")
        outputs += output_topics(cameras, depth)
    categories_topic = ns + "/panoptic/categories"
    outputs.append(categories_topic)
    recorded = {c.topic for c in connections}
    clash = [t for t in outputs if t in recorded]
    if clash:
        raise BagError(f"{source} already has {', '.join(clash)}: ciae-bag does not write into recorded topics; "
                       "choose another --namespace, e.g. --namespace /offline")
    frames = sum(c.msgcount for c in connections if (c.topic, c.msgtype) in inputs)
    return BagPlan(inputs=inputs, cameras=cameras, categories_topic=categories_topic, outputs=outputs, frames=frames,
                   depth_pairs=pairs)


def _open_reader(in_path: pathlib.Path):
    from rosbags.rosbag2 import Reader

    if not in_path.exists():
        raise BagError(f"input bag {in_path} does not exist")
    try:
        reader = Reader(in_path)
        reader.open()
    except Exception as exc:  # noqa: BLE001 - rosbags raises several types for unreadable bags
        raise BagError(f"cannot read bag {in_path}: {exc}") from None
    return reader


def plan_bag_file(in_path, topics: list[str] | None = None, namespace: str = "", overlay: bool = True,
                  depth: DepthOptions | None = None) -> BagPlan:
    """:func:`plan_bag` for the bag at ``in_path`` (reads only its index)."""
    in_path = pathlib.Path(in_path)
    reader = _open_reader(in_path)
    try:
        return plan_bag(reader.connections, topics, namespace, overlay, source=f"input bag {in_path}", depth=depth)
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------
# The offline run
# ----------------------------------------------------------------------------------------------

def _rclpy_header(header):
    """rosbags ``std_msgs/Header`` -> rclpy ``std_msgs.msg.Header``."""
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    return Header(stamp=Time(sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec)),
                  frame_id=str(header.frame_id))


@dataclass
class BagSummary:
    """What an offline run did (:func:`process_bag`)."""

    frames_read: int = 0
    segmented: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    segments: int = 0
    tracking: bool = True
    tracks: int = 0  # track ids given, over all cameras
    tracking_resets: dict[str, int] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    out: str = ""
    storage_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    depth: str = ""  # BagDepth.summary() of a run with 3-D

    def skip(self, reason: str, topic: str, timestamp: int, text) -> None:
        n = self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if n <= 3:
            _LOG.warning("skipping frame on %s at %d: %s%s", topic, timestamp, text,
                         f" (further {reason} frames are only counted)" if n == 3 else "")

    def line(self) -> str:
        """The one summary line ``ciae-bag`` prints."""
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        files = ", ".join(self.storage_files) or "no storage file"
        resets = ", ".join(f"{k} {v}" for k, v in sorted(self.tracking_resets.items()))
        tracks = (f"{self.tracks} track(s){f' (tracks reset: {resets})' if resets else ''}" if self.tracking
                  else "tracking off")
        return (f"ciae-bag: {self.frames_read} frame(s) read from {', '.join(self.inputs)}, "
                f"{self.segmented} segmented, "
                f"{skipped} skipped{f' ({reasons})' if reasons else ''}; {self.segments} segment(s), {tracks}; "
                f"{self.depth + '; ' if self.depth else ''}wrote "
                f"{', '.join(self.outputs)} to {self.out} ({files}) in {self.seconds:.1f} s")


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", desc="ciae-bag", file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def process_bag(in_path, out_path, predictor, topics: list[str] | None = None, overlay: bool = True,
                overlay_alpha: float = 0.5, model_name: str = "", model_version: str = "",
                storage: str = "mcap", namespace: str = "", progress: bool = False, tracking: bool = True,
                tracking_params: dict | None = None, depth: DepthOptions | None = None) -> BagSummary:
    """Run ``predictor`` over the camera images of ``in_path``; write inputs + outputs to ``out_path``.

    Inputs and output names: :func:`plan_bag` (``topics``, ``namespace``, ``overlay``, ``depth``).
    Frames that cannot be decoded or used are skipped and counted by reason. ``progress``: a tqdm
    bar on stderr (only when stderr is a terminal). ``tracking``: thing segments get ``track_id`` as
    in the node (:class:`ciae_ros.node_tracking.NodeTracking`: one tracker per camera, in the bag's
    order, reset when a camera's frame_id changes or its stamps go back), with the node's
    ``tracking_*`` parameter defaults updated by ``tracking_params`` (``BagError`` if they are
    invalid). With ``depth``, a colour frame waits for its depth image
    (:class:`ciae_ros.bag_depth.BagDepth`); outputs keep the colour image's record time.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ciae_core.predictor import PredictorError

    from .conversions import categories_msg, render_overlay, segments_msg
    from .image_conversion import numpy_to_image

    in_path, out_path = pathlib.Path(in_path), pathlib.Path(out_path)
    tracker = _bag_tracking(tracking, tracking_params)
    store = make_typestore()
    t0 = time.monotonic()
    reader = _open_reader(in_path)
    try:
        plan = plan_bag(reader.connections, topics, namespace, overlay, source=f"input bag {in_path}", depth=depth)
        summary = BagSummary(inputs=[t for t, _ in plan.inputs], outputs=plan.outputs, out=str(out_path),
                             tracking=tracker.enabled)
        inputs = set(plan.inputs)
        bag_depth = BagDepth(plan.depth_pairs, plan.cameras, depth) if plan.depth_pairs else None
        with BagWriter(out_path, store, storage=storage) as out, _progress(plan.frames, progress) as bar, \
                logging_redirect_tqdm(loggers=[_LOG]):
            from std_msgs.msg import Header

            def segment(conn, timestamp: int, msg) -> None:
                compressed = conn.msgtype.endswith("CompressedImage")
                try:
                    rgb = compressed_to_rgb(msg) if compressed else image_to_rgb(msg)
                    hw = predictor.letterbox(rgb.shape[0], rgb.shape[1]).resized_size
                except PredictorError as exc:
                    summary.skip("bad_size", conn.topic, timestamp, exc)
                    return
                except ImageConversionError as exc:
                    summary.skip(exc.reason, conn.topic, timestamp, exc)
                    return
                result = predictor(rgb, color="rgb", return_embeddings=tracker.wants_embeddings)
                base = _base_topic(conn.topic, conn.msgtype)
                tracker.update(base, result, msg.header)
                header = _rclpy_header(msg.header)
                prefix = plan.cameras[base]
                ms = float(sum(predictor.timings.values()))
                seg_msg = segments_msg(result, header, model_name, model_version, hw, ms)
                extra = [] if bag_depth is None else bag_depth.outputs(base, seg_msg, result.id_map,
                                                                        predictor.categories)
                out.write_msg(prefix + "panoptic/segments", seg_msg, timestamp)
                for topic, m in extra:
                    out.write_msg(topic, m, timestamp)
                if overlay:
                    ov = render_overlay(rgb, result, predictor.categories, overlay_alpha)
                    out.write_msg(prefix + "panoptic/overlay", numpy_to_image(ov, "bgr8", header=header), timestamp)
                summary.segmented += 1
                summary.segments += len(result.segments)

            pending: collections.deque = collections.deque()  # colour frames waiting for their depth
            first = True
            for conn, timestamp, raw in reader.messages():
                out.write(conn.topic, conn.msgtype, raw, timestamp)
                if first:
                    first = False
                    out.write_msg(plan.categories_topic,
                                  categories_msg(predictor.categories, model_name, Header()), timestamp)
                if bag_depth is not None and conn.topic in bag_depth.topics:
                    bag_depth.feed(conn.topic, store.deserialize_cdr(raw, conn.msgtype))
                elif (conn.topic, conn.msgtype) in inputs:
                    summary.frames_read += 1
                    bar.update(1)
                    pending.append((conn, timestamp, store.deserialize_cdr(raw, conn.msgtype)))
                while pending and (bag_depth is None or bag_depth.ready(
                        _base_topic(pending[0][0].topic, pending[0][0].msgtype),
                        stamp_ns(pending[0][2].header.stamp), pending[0][1], timestamp)):
                    segment(*pending.popleft())
            while pending:  # the bag ended: pair with what there is
                segment(*pending.popleft())
    finally:
        reader.close()
    totals = tracker.totals()
    summary.tracks, summary.tracking_resets = totals["tracks"], totals["resets"]
    summary.storage_files = sorted(p.name for p in out_path.iterdir() if p.suffix in (".mcap", ".db3"))
    summary.seconds = time.monotonic() - t0
    summary.depth = bag_depth.summary() if bag_depth is not None else ""
    return summary


def _bag_tracking(tracking: bool, params: dict | None):
    """The trackers of an offline run: the node's tracking defaults, ``params`` over them."""
    from .node_params import SPECS, settings_error, validate_value
    from .node_tracking import NodeTracking

    values = {name: spec.default for name, spec in SPECS.items()}
    for name, value in (params or {}).items():
        err = f"unknown tracking parameter {name}" if not name.startswith("tracking_") or name not in SPECS \
            else validate_value(name, value)
        if err:
            raise BagError(err)
        values[name] = value
    values["tracking"] = bool(tracking)
    err = settings_error(values)
    if err:
        raise BagError(err)
    return NodeTracking(values)


def read_messages(path, topic: str):
    """Yield ``(timestamp_ns, message)`` of ``topic`` from a bag, deserialised by rosbags."""
    from rosbags.rosbag2 import Reader

    store = make_typestore()
    with Reader(path) as reader:
        conns = [c for c in reader.connections if c.topic == topic]
        if not conns:  # rosbags reads every connection when given none
            return
        for conn, ts, raw in reader.messages(connections=conns):
            yield ts, store.deserialize_cdr(raw, conn.msgtype)



def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ciae-bag", description="Run the panoptic model over the camera images of a recorded rosbag2 and write "
        "a new bag with every input topic plus the node's outputs.",
        epilog="Outputs are named as the node's: <namespace>/panoptic/segments, /panoptic/overlay (per camera "
        "namespace with several cameras: <namespace>/cam1/panoptic/...) and <namespace>/panoptic/categories. "
        "An output topic the input bag already has is an error: use --namespace /offline.")
    ap.add_argument("--in", dest="inp", required=True, help="input bag (folder)")
    ap.add_argument("--out", required=True, help="output bag folder (must not exist)")
    ap.add_argument("--weights", default="", help="model file (default: the shipped model)")
    ap.add_argument("--engine", default="torch", choices=("auto", "torch", "onnxruntime", "openvino"),
                    help="inference engine (default torch; auto: the node's CPU default for this CPU)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index> (default cpu)")
    ap.add_argument("--input-size", type=int, default=0, help="network input size (0: the model's default)")
    ap.add_argument("--instance-score-threshold", type=float, default=-1.0,
                    help="minimum score of a thing instance (-1: the model's default)")
    ap.add_argument("--topics", nargs="+", default=None, metavar="TOPIC",
                    help="image topics to segment (default: every camera image topic: sensor_msgs/Image and "
                         "CompressedImage, except panoptic outputs and depth images)")
    ap.add_argument("--namespace", default="", metavar="NS",
                    help="namespace of the outputs, e.g. /offline -> /offline/panoptic/segments (default: the root, "
                         "as the node)")
    ap.add_argument("--no-overlay", action="store_true", help="do not write panoptic/overlay images")
    ap.add_argument("--no-tracking", action="store_true", help="no track ids (Segment.track_id 0); by default thing "
                    "segments are tracked as by the node, one tracker per camera with its default tracking_* "
                    "parameters")
    ap.add_argument("--storage", default="mcap", choices=("mcap", "sqlite3"), help="output bag storage (default mcap)")
    d = ap.add_argument_group("3-D from recorded depth (as the node: ciae_ros/bag_depth.py)")
    d.add_argument("--depth-topic", default="", metavar="TOPIC", help="registered depth image topic (16UC1/32FC1); "
                   "several cameras: a name under each camera's namespace (default: no 3-D)")
    d.add_argument("--camera-info-topic", default="", metavar="TOPIC",
                   help="CameraInfo topic (default: the image topic's sibling camera_info)")
    d.add_argument("--depth-topics", nargs="+", default=[], metavar="TOPIC",
                   help="several cameras: one depth topic per camera, in the order of their image topics")
    d.add_argument("--camera-info-topics", nargs="+", default=[], metavar="TOPIC",
                   help="several cameras: one CameraInfo topic per camera, in the order of their image topics")
    d.add_argument("--depth-scale", type=float, default=0.001, help="metres per 16UC1 unit (default 0.001)")
    d.add_argument("--min-depth", type=float, default=0.1, help="metres (default 0.1)")
    d.add_argument("--max-depth", type=float, default=10.0, help="metres (default 10)")
    d.add_argument("--sync-tolerance", type=float, default=0.02, help="seconds between colour and depth stamps")
    d.add_argument("--points-stride", type=int, default=4, help="panoptic/points every n-th pixel (0: no points)")
    d.add_argument("--markers-include-stuff", action="store_true", help="markers for stuff segments too")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar (there is none when stderr is not a "
                    "terminal)")
    return ap


def depth_options(args) -> DepthOptions:
    """The depth options of the command line (``BagError`` for a value out of range)."""
    from .node_depth import DepthSettings

    if args.depth_scale <= 0 or args.sync_tolerance < 0 or args.points_stride < 0:
        raise BagError("--depth-scale must be > 0, --sync-tolerance >= 0 and --points-stride >= 0")
    return DepthOptions(args.depth_topic, args.camera_info_topic, list(args.depth_topics), list(args.camera_info_topics),
                        DepthSettings(args.depth_scale, args.min_depth, args.max_depth, args.sync_tolerance,
                                      args.points_stride, "segment", args.markers_include_stuff))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] [%(name)s]: %(message)s")
    ap = build_parser()
    args = ap.parse_args(argv)
    if pathlib.Path(args.out).exists():  # everything that needs no model is checked before the (slow) load
        _LOG.error("output bag %s already exists; choose a new path", args.out)
        return 1
    try:
        depth = depth_options(args)
        plan_bag_file(args.inp, args.topics, args.namespace, not args.no_overlay, depth)
    except BagError as exc:
        _LOG.error("%s", exc)
        return 1
    from .node_model import load_model
    from .node_params import SPECS, NodeStartupError

    values = {name: spec.default for name, spec in SPECS.items()}
    values.update(weights=args.weights, engine=args.engine, device=args.device, input_size=args.input_size,
                  instance_score_threshold=args.instance_score_threshold)
    try:
        from ciae_core.cli.hints import parser_options

        model = load_model(values, hint_style="option", options=parser_options(ap))
        if model.domain_warning:
            _LOG.warning("%s", model.domain_warning)
        summary = process_bag(args.inp, args.out, model.predictor, topics=args.topics, overlay=not args.no_overlay,
                              model_name=model.name, model_version=model.version, storage=args.storage,
                              namespace=args.namespace, progress=not args.quiet, tracking=not args.no_tracking,
                              depth=depth)
    except (NodeStartupError, BagError) as exc:
        _LOG.error("%s", exc)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
