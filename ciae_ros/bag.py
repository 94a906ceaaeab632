"""rosbag2 (MCAP) recording and offline processing: ``ciae-bag --in BAG --out BAG``.

* :class:`BagWriter` writes already-serialised (CDR) messages to an MCAP rosbag2 with the full
  message definitions (our ``ciae_ros/msg/*`` types are registered from the ``msg/*.msg`` text),
  so Foxglove Studio, ``ros2 bag play`` and rviz users can replay it. The demo client records
  through it.
* :func:`process_bag` runs the model over every camera image of a recorded bag and writes a new
  bag holding the input topics plus ``panoptic/segments``, ``panoptic/overlay`` and
  ``panoptic/categories``, with the input messages' record times and headers (outputs of camera
  ``/cam1/image_raw`` go to ``/cam1/panoptic/...`` when the bag has several cameras, else to
  ``/panoptic/...``, as the node does).

Needs ``rosbags`` (pure Python) and the rclpy message packages (for serialisation; no DDS).
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time

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


def _rclpy_header(header):
    """rosbags ``std_msgs/Header`` -> rclpy ``std_msgs.msg.Header``."""
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    return Header(stamp=Time(sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec)),
                  frame_id=str(header.frame_id))


def _output_prefix(topic: str, several: bool) -> str:
    if not several:
        return "/"
    from .node import _output_prefix as prefix

    return prefix(topic)


def process_bag(in_path, out_path, predictor, topics: list[str] | None = None, overlay: bool = True,
                overlay_alpha: float = 0.5, model_name: str = "", model_version: str = "",
                storage: str = "mcap") -> dict:
    """Run ``predictor`` over the camera images of ``in_path``; write inputs + outputs to ``out_path``.

    ``topics`` selects image topics (default: every ``sensor_msgs/Image`` and ``CompressedImage``
    topic). Undecodable frames are skipped and counted. Returns a summary dict
    (``frames``, ``bad``, ``segments``, ``seconds``).
    """
    from rosbags.rosbag2 import Reader

    from ciae_core.predictor import PredictorError

    from .conversions import categories_msg, render_overlay, segments_msg
    from .image_conversion import numpy_to_image

    in_path = pathlib.Path(in_path)
    if not in_path.exists():
        raise BagError(f"input bag {in_path} does not exist")
    store = make_typestore()
    summary = {"frames": 0, "bad": {}, "segments": 0, "seconds": 0.0}
    t0 = time.monotonic()
    try:
        reader = Reader(in_path)
        reader.open()
    except Exception as exc:  # noqa: BLE001 - rosbags raises several types for unreadable bags
        raise BagError(f"cannot read bag {in_path}: {exc}") from None
    try:
        image_conns = [c for c in reader.connections if c.msgtype in IMAGE_TYPES
                       and (topics is None or c.topic in topics or c.topic.removesuffix("/compressed") in topics)]
        if not image_conns:
            raise BagError(f"bag {in_path} has no image topics"
                           + (f" among {topics}" if topics else "") + " (sensor_msgs/Image or CompressedImage)")
        image_topics = sorted({c.topic.removesuffix("/compressed") if c.msgtype.endswith("CompressedImage")
                               else c.topic for c in image_conns})
        several = len(image_topics) > 1
        colors = {c.id: c.color for c in predictor.categories}
        with BagWriter(out_path, store, storage=storage) as out:
            from std_msgs.msg import Header

            first_ts = None
            for conn, timestamp, raw in reader.messages():
                out.write(conn.topic, conn.msgtype, raw, timestamp)
                if first_ts is None:
                    first_ts = timestamp
                    out.write_msg("/panoptic/categories",
                                  categories_msg(predictor.categories, model_name, Header()), timestamp)
                if conn not in image_conns:
                    continue
                msg = store.deserialize_cdr(raw, conn.msgtype)
                compressed = conn.msgtype.endswith("CompressedImage")
                try:
                    rgb = compressed_to_rgb(msg) if compressed else image_to_rgb(msg)
                    hw = predictor.letterbox(rgb.shape[0], rgb.shape[1]).resized_size
                except PredictorError as exc:
                    summary["bad"]["bad_size"] = summary["bad"].get("bad_size", 0) + 1
                    _LOG.warning("skipping frame on %s at %d: %s", conn.topic, timestamp, exc)
                    continue
                except ImageConversionError as exc:
                    summary["bad"][exc.reason] = summary["bad"].get(exc.reason, 0) + 1
                    _LOG.warning("skipping frame on %s at %d: %s", conn.topic, timestamp, exc)
                    continue
                result = predictor(rgb, color="rgb")
                header = _rclpy_header(msg.header)
                base = conn.topic.removesuffix("/compressed") if compressed else conn.topic
                prefix = _output_prefix(base, several)
                ms = float(sum(predictor.timings.values()))
                out.write_msg(prefix + "panoptic/segments",
                              segments_msg(result, header, model_name, model_version, hw, ms), timestamp)
                if overlay:
                    ov = render_overlay(rgb, result, colors, overlay_alpha)
                    out.write_msg(prefix + "panoptic/overlay", numpy_to_image(ov, "bgr8", header=header), timestamp)
                summary["frames"] += 1
                summary["segments"] += len(result.segments)
    finally:
        reader.close()
    summary["seconds"] = time.monotonic() - t0
    return summary


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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] [%(name)s]: %(message)s")
    ap = argparse.ArgumentParser(prog="ciae-bag", description="Run the panoptic model over a recorded rosbag2.")
    ap.add_argument("--in", dest="inp", required=True, help="input bag (folder)")
    ap.add_argument("--out", required=True, help="output bag folder (must not exist)")
    ap.add_argument("--weights", default="", help="model file; default: the shipped model")
    ap.add_argument("--engine", default="torch", choices=("torch", "onnxruntime"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--input-size", type=int, default=0, help="0: the model's default")
    ap.add_argument("--instance-score-threshold", type=float, default=-1.0, help="-1: the model's default")
    ap.add_argument("--topics", nargs="*", default=None, help="image topics to process (default: all)")
    ap.add_argument("--no-overlay", action="store_true")
    ap.add_argument("--storage", default="mcap", choices=("mcap", "sqlite3"))
    args = ap.parse_args(argv)
    if pathlib.Path(args.out).exists():  # checked before the (slow) model load
        _LOG.error("output bag %s already exists; choose a new path", args.out)
        return 1
    if not pathlib.Path(args.inp).exists():
        _LOG.error("input bag %s does not exist", args.inp)
        return 1
    from .node import SPECS, NodeStartupError, load_model

    values = {name: spec.default for name, spec in SPECS.items()}
    values.update(weights=args.weights, engine=args.engine, device=args.device, input_size=args.input_size,
                  instance_score_threshold=args.instance_score_threshold)
    try:
        from ciae_core.cli.hints import parser_options

        model = load_model(values, hint_style="option", options=parser_options(ap))
        if model.domain_warning:
            _LOG.warning("%s", model.domain_warning)
        summary = process_bag(args.inp, args.out, model.predictor, topics=args.topics, overlay=not args.no_overlay,
                              model_name=model.name, model_version=model.version, storage=args.storage)
    except (NodeStartupError, BagError) as exc:
        _LOG.error("%s", exc)
        return 1
    bad = sum(summary["bad"].values())
    print(f"ciae-bag: {summary['frames']} frame(s) processed, {bad} skipped {summary['bad'] or ''}, "
          f"{summary['segments']} segment(s), {summary['seconds']:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
