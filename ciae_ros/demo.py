"""``ciae-demo`` (``make demo``): camera -> panoptic node -> client, as separate processes.

What it does, on loopback DDS only (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` is set here for
every process it starts; the ``ROS_DOMAIN_ID`` is ``--domain-id``, else the one set in the
environment, else one picked for this run):

1. starts the camera publisher (``python -m ciae_ros.camera``: a moving synthetic scene played
   forwards and backwards, which names the frame of every stamp in ``camera_truth.jsonl``, or the
   folder of images / video file given as ``source``), as a camera driver would run;
2. starts the node (``python -m ciae_ros.node``) with the shipped model (``models/``); without
   one it falls back to a randomly initialised model and says loudly that the segments are
   meaningless;
3. runs the client here: subscribes to the camera image, ``/panoptic/segments``,
   ``/panoptic/overlay``, ``/panoptic/categories`` and ``/diagnostics``, records all of them into
   an MCAP rosbag, saves overlay PNGs, and measures camera-to-client latency (``header.stamp``
   is the camera's publication time; all processes share the machine's clock); with the ``synth``
   source also depth, camera info, ``/panoptic/markers`` and ``/panoptic/points``
   (:mod:`ciae_ros.demo_depth`: the camera publishes depth, the node gets ``depth_topic``);
   ``--record compressed`` (default) stores the camera image and the overlay as JPEG
   ``sensor_msgs/CompressedImage`` on ``<topic>/compressed`` (as ``compressed_image_transport``
   names them) and everything in zstd-compressed MCAP chunks, where the 32SC1 id image shrinks
   ~300x: a 30 s run at 640x480 is tens of MB instead of ~1 GB; ``--record raw`` keeps every
   image as published;
4. after ``--duration`` seconds of output stops everything and writes ``report.md`` /
   ``report.json`` (frames in/out, dropped, latency p50/p99, segments per frame; track ids, and
   ID switches / IDF1 / MOTA against the synthetic ground truth: :mod:`ciae_ros.demo_tracking`;
   the 3-D error against the rendered ground truth: :mod:`ciae_ros.demo_depth`) to ``--out``.

When the camera or the node stops early, the demo says why in one line: the last error line of
that process's log (``camera.log`` / ``node.log`` in ``--out``) and where the whole log is.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from ciae_core.cli.sizes import size_type

from .demo_depth import DepthRecorder, camera_arguments, node_arguments, report_lines
from .demo_tracking import tracking_markdown

_LOG = logging.getLogger("ciae_demo")


def demo_environment(domain_id: int | None = None, environ: dict | None = None) -> dict:
    """Environment for the demo's processes (from ``environ``, default ``os.environ``): loopback-only
    DDS, and the domain id ``domain_id``, else the ``ROS_DOMAIN_ID`` the user set, else one derived
    from the pid (so that two demos on one machine do not cross-talk)."""
    env = dict(os.environ if environ is None else environ)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    elif not env.get("ROS_DOMAIN_ID", "").strip():
        env["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)
    env.setdefault("OMP_NUM_THREADS", str(max(1, min(4, (os.cpu_count() or 2) - 1))))
    env["PYTHONUNBUFFERED"] = "1"
    src_root = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def random_fallback_model(path: pathlib.Path) -> pathlib.Path:
    """Save a small randomly initialised CIAE over the synthetic categories (demo without a shipped model)."""
    from ciae_core.checkpoint import save_model
    from ciae_core.model import CIAE
    from ciae_core.synth import SYNTH_CATEGORIES

    import torch

    torch.manual_seed(0)
    model = CIAE(SYNTH_CATEGORIES, backbone="resnet18", backbone_norm="gn", fpn_channels=64, head_channels=64,
                 tower_depth=2, embed_dim=16, embed_branch_channels=32, embedding_stride=4)
    return pathlib.Path(save_model(path, model.eval()))


def _domain_warning(weights: str) -> str | None:
    """The synthetic-only warning of the model (:mod:`ciae_core.model_domain`), logged here because
    the node's own warning goes to node.log; ``None`` for other models or an unreadable file (the
    node reports that one). Reads the file's metadata only (no torch in the client process)."""
    from ciae_core.model_domain import model_domain_warning

    text = model_domain_warning(weights)
    if text:
        _LOG.warning("%s", text)
    return text


def _percentiles(values) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ciae-demo", description=__doc__.splitlines()[0])
    ap.add_argument("source", nargs="?", default="synth", help="'synth' (default), a folder of images or a video")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of output to record")
    ap.add_argument("--out", default="demo_out", help="output folder (overwritten)")
    ap.add_argument("--size", type=size_type("--size", minimum=32, as_text=True), default="640x480",
                    metavar="WIDTHxHEIGHT", help="camera frame size WIDTHxHEIGHT (default 640x480)")
    ap.add_argument("--rate", type=float, default=10.0, help="camera frame rate (Hz)")
    ap.add_argument("--weights", default="", help="model file (default: the shipped model in models/)")
    ap.add_argument("--device", default="cpu", help="node device: cpu, cuda or cuda:<index> (default cpu)")
    ap.add_argument("--engine", default="auto", choices=("auto", "torch", "onnxruntime", "openvino"),
                    help="node inference engine; auto (default): the node's CPU default for this CPU (logged in node.log)")
    ap.add_argument("--input-size", type=int, default=0, help="network input size (default: the node's default)")
    ap.add_argument("--png-every", type=float, default=1.0, help="save one overlay PNG per this many seconds")
    ap.add_argument("--domain-id", type=int, default=None,
                    help="ROS_DOMAIN_ID (default: the one set in the environment, else derived from the pid)")
    ap.add_argument("--record", default="compressed", choices=("compressed", "raw"),
                    help="bag contents: 'compressed' (default) stores camera and overlay images as JPEG on "
                         "<topic>/compressed and compresses the bag (30 s at 640x480: tens of MB); 'raw' stores every "
                         "image as published (~1 GB)")
    ap.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for the first output")
    return ap


def _stop(proc: subprocess.Popen, name: str, timeout: float = 15.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _LOG.warning("%s did not stop on SIGINT; terminating it", name)
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return proc.returncode


def _source_error(source: str) -> str | None:
    """One line when the camera source cannot work at all (checked before anything starts)."""
    if source == "synth" or pathlib.Path(source).expanduser().exists():
        return None
    return (f"camera source {source!r} does not exist; give 'synth', a folder of images or a video file "
            f"(e.g. ciae-demo synth)")


def _last_error(log: pathlib.Path) -> str:
    """The message of the last ``[ERROR]``/``[FATAL]`` line of a process's log ('' if none)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith(("[ERROR]", "[FATAL]")):
            return line.rsplit("]: ", 1)[-1].strip()
    return ""


def _stopped_early(name: str, proc: subprocess.Popen, log: pathlib.Path) -> str:
    """One line for a demo process that exited while the demo ran: its reason and where its log is."""
    reason = _last_error(log) or "no error line in its log"
    return f"the {name} stopped (exit status {proc.returncode}): {reason} (whole log: {log})"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] [%(name)s]: %(message)s")
    args = build_parser().parse_args(argv)
    problem = _source_error(args.source)
    if problem:
        _LOG.error("%s", problem)
        return 1
    out = pathlib.Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "overlays").mkdir(parents=True)
    env = demo_environment(args.domain_id)
    origin = ("--domain-id" if args.domain_id is not None else
              "from the environment" if os.environ.get("ROS_DOMAIN_ID", "").strip() else "picked for this run")
    os.environ.update({k: env[k] for k in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID")})

    from .resources import default_weights

    weights = args.weights or (str(default_weights()) if default_weights() else "")
    random_model = False
    if not weights:
        _LOG.warning("no shipped model in models/ (and no --weights): falling back to a RANDOMLY INITIALISED "
                     "model; the pipeline runs but the segments are meaningless. Train one with ciae-train or "
                     "pass --weights.")
        weights = str(random_fallback_model(out / "random_model.safetensors"))
        random_model = True
    elif not pathlib.Path(weights).is_file():
        _LOG.error("weights file %s does not exist", weights)
        return 1
    domain_note = _domain_warning(weights)

    logs = {name: open(out / f"{name}.log", "w") for name in ("node", "camera")}
    node_cmd = [sys.executable, "-m", "ciae_ros.node", "--ros-args", "-p", f"weights:={weights}",
                "-p", f"device:={args.device}", "-p", f"engine:={args.engine}",
                *node_arguments(args.source), "-r", "image:=/camera/image_raw", "--log-level", "info"]
    if args.input_size:
        node_cmd[-4:-4] = ["-p", f"input_size:={args.input_size}"]
    cam_cmd = [sys.executable, "-m", "ciae_ros.camera", args.source, "--topic", "/camera/image_raw",
               "--rate", str(args.rate), "--size", args.size, *camera_arguments(args.source, out)]
    _LOG.info("ROS_DOMAIN_ID=%s (%s), loopback only; model %s", env["ROS_DOMAIN_ID"], origin, weights)
    node = subprocess.Popen(node_cmd, env=env, stdout=logs["node"], stderr=subprocess.STDOUT)
    camera = subprocess.Popen(cam_cmd, env=env, stdout=logs["camera"], stderr=subprocess.STDOUT)
    failure = None
    try:
        report, failure = _run_client(args, out, node, camera, weights, random_model)
    except KeyboardInterrupt:  # before recording started (e.g. while rclpy loaded): nothing to report
        report, failure = None, "interrupted before recording started; nothing recorded"
    finally:
        cam_rc = _stop(camera, "camera")
        node_rc = _stop(node, "node")
        for f in logs.values():
            f.close()
    if report is None:
        _LOG.error("%s", failure or f"demo failed; see {out}/node.log and {out}/camera.log")
        return 1
    report["exit_codes"] = {"camera": cam_rc, "node": node_rc}
    report["model_warning"] = domain_note
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_report_markdown(report))
    print(_report_markdown(report))
    print(f"demo outputs in {out.resolve()}: report.md, report.json, bag/ (MCAP), overlays/*.png, node.log, "
          f"camera.log")
    return 0


JPEG_QUALITY = 90


def jpeg_copy(data: bytes) -> bytes:
    """A serialized ``sensor_msgs/Image`` (rgb8/bgr8/mono8, ...) as a serialized JPEG
    ``sensor_msgs/CompressedImage`` with the same header, ``format`` as compressed_image_transport
    writes it (``"<encoding>; jpeg compressed bgr8"``)."""
    import array

    import cv2
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import CompressedImage, Image

    from .image_conversion import image_msg_to_array

    msg = deserialize_message(data, Image)
    pixels = image_msg_to_array(msg)
    if msg.encoding == "rgb8":
        pixels = pixels[:, :, ::-1]
    ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(pixels), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"JPEG encoding of a {msg.width}x{msg.height} {msg.encoding} image failed")
    out = CompressedImage(header=msg.header, format=f"{msg.encoding}; jpeg compressed bgr8",
                          data=array.array("B", jpg.tobytes()))
    return serialize_message(out)


class _Recorder:
    """The demo client's subscription callbacks: every message goes to the bag as it arrives
    (serialized, ``raw=True``; with ``record="compressed"`` images as a JPEG copy on
    ``<topic>/compressed`` and the bag's chunks zstd-compressed), and the counters the report needs
    are kept on the way."""

    def __init__(self, out: pathlib.Path, png_every: float, duration: float, record: str = "compressed",
                 depth: bool = False):
        from .bag import BagWriter

        self.out, self.png_every, self.duration, self.record = out, png_every, duration, record
        self.stats = {"segments": 0, "latency_ms": [], "segments_per_frame": [], "overlays": 0,
                      "camera_frames": 0, "inference_ms": [], "diagnostics": None, "pngs": 0, "diag_count": 0}
        self.bag = BagWriter(out / "bag", compress=record == "compressed")
        self.last_png = 0.0
        self.first_output: float | None = None
        self.depth = DepthRecorder(depth)

    def raw(self, topic: str, msgtype: str, handler=None):
        def cb(data: bytes):
            self.bag.write(topic, msgtype, data, time.time_ns())
            if handler is not None:
                handler(data)
        return cb

    def image(self, topic: str, handler=None):
        """An image topic's callback: recorded as published, or as a JPEG copy (``record``)."""
        if self.record == "raw":
            return self.raw(topic, "sensor_msgs/msg/Image", handler)

        def cb(data: bytes):
            self.bag.write(topic + "/compressed", "sensor_msgs/msg/CompressedImage", jpeg_copy(data), time.time_ns())
            if handler is not None:
                handler(data)
        return cb

    def on_segments(self, data) -> None:
        from rclpy.serialization import deserialize_message

        from ciae_ros.msg import PanopticSegments

        t = time.time()
        msg = deserialize_message(data, PanopticSegments)
        stats = self.stats
        stats["segments"] += 1
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        stats["latency_ms"].append((t - stamp) * 1e3)
        stats["segments_per_frame"].append(len(msg.segments))
        stats["inference_ms"].append(msg.inference_time_ms)
        self.depth.on_segments(msg)
        if self.first_output is None:
            self.first_output = time.monotonic()
            _LOG.info("first segmentation received; recording for %.0f s", self.duration)

    def on_overlay(self, data) -> None:
        import cv2
        from rclpy.serialization import deserialize_message
        from sensor_msgs.msg import Image

        from .image_conversion import image_msg_to_array

        self.stats["overlays"] += 1
        if time.monotonic() - self.last_png >= self.png_every:
            self.last_png = time.monotonic()
            img = image_msg_to_array(deserialize_message(data, Image))
            cv2.imwrite(str(self.out / "overlays" / f"overlay_{self.stats['pngs']:04d}.png"), img)
            self.stats["pngs"] += 1

    def on_camera(self, data) -> None:
        self.stats["camera_frames"] += 1

    def on_diag(self, data) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.serialization import deserialize_message

        self.stats["diag_count"] += 1
        msg = deserialize_message(data, DiagnosticArray)
        if any(s.name.endswith("/camera/image_raw") for s in msg.status):
            self.stats["diagnostics"] = {s.name: {kv.key: kv.value for kv in s.values} for s in msg.status}

    def subscribe(self, client) -> list:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        from ciae_ros.msg import CategoryArray, PanopticSegments

        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        raw = self.raw
        return [
            client.create_subscription(Image, "/camera/image_raw", self.image("/camera/image_raw", self.on_camera),
                                       reliable, raw=True),
            client.create_subscription(PanopticSegments, "/panoptic/segments",
                                       raw("/panoptic/segments", "ciae_ros/msg/PanopticSegments", self.on_segments),
                                       reliable, raw=True),
            client.create_subscription(Image, "/panoptic/overlay", self.image("/panoptic/overlay", self.on_overlay),
                                       reliable, raw=True),
            client.create_subscription(CategoryArray, "/panoptic/categories",
                                       raw("/panoptic/categories", "ciae_ros/msg/CategoryArray"), latched, raw=True),
            client.create_subscription(DiagnosticArray, "/diagnostics",
                                       raw("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray", self.on_diag),
                                       10, raw=True),
        ] + self.depth.subscribe(client, raw, compressed=self.record == "compressed")


def _record_until_done(rclpy, client, rec: _Recorder, args, out: pathlib.Path, node, camera) -> str | None:
    """Spin until ``args.duration`` seconds after the first segmentation (or Ctrl-C); ``None``, or
    one line saying why the demo cannot go on (the node or the camera stopped, nothing came within
    ``args.startup_timeout``)."""
    t_start = time.monotonic()
    try:
        while rclpy.ok():
            rclpy.spin_once(client, timeout_sec=0.1)
            if node.poll() is not None:
                return _stopped_early("node", node, out / "node.log")
            if camera.poll() is not None:
                return _stopped_early("camera", camera, out / "camera.log")
            if rec.first_output is None:
                if time.monotonic() - t_start > args.startup_timeout:
                    return (f"no segmentation received within {args.startup_timeout:.0f} s; the node may still be "
                            f"loading on a busy machine: retry with --startup-timeout "
                            f"{2 * args.startup_timeout:.0f} (node log: {out / 'node.log'})")
            elif time.monotonic() - rec.first_output >= args.duration:
                return None
    except KeyboardInterrupt:
        _LOG.info("interrupted; writing what was recorded")
    return None


def _run_client(args, out: pathlib.Path, node, camera, weights: str,
                random_model: bool) -> tuple[dict | None, str | None]:
    """Record, then stop the camera; ``(report, None)`` or ``(None, why not)``."""
    import rclpy

    rec = _Recorder(out, args.png_every, args.duration, args.record, depth=args.source == "synth")
    with rclpy.init(args=["ciae_demo_client"]):
        client = rclpy.create_node("ciae_demo_client")
        subs = rec.subscribe(client)
        failure = _record_until_done(rclpy, client, rec, args, out, node, camera)
        t_stop = time.monotonic()
        # stop the camera, let the node finish its last frame and publish its final counters
        cam_rc = _stop(camera, "camera")
        if failure is None and cam_rc not in (0, None):
            _LOG.warning("camera exited with status %s", cam_rc)
        n_diag = rec.stats["diag_count"]
        t_end = time.monotonic() + 5.0
        while (failure is None and time.monotonic() < t_end and node.poll() is None
               and rec.stats["diag_count"] < n_diag + 2):
            rclpy.spin_once(client, timeout_sec=0.1)
        for s in subs:
            client.destroy_subscription(s)
        client.destroy_node()
    rec.bag.close()
    if failure is None and rec.stats["segments"] == 0:
        failure = "interrupted before the first segmentation arrived; nothing to report"
    if failure is not None:
        return None, failure
    return _summary(rec, args, out, t_stop - rec.first_output, weights, random_model), None


def _summary(rec: _Recorder, args, out: pathlib.Path, recorded: float, weights: str, random_model: bool) -> dict:
    stats = rec.stats
    p50, p99 = _percentiles(stats["latency_ms"])
    i50, i99 = _percentiles(stats["inference_ms"])
    diag = stats["diagnostics"] or {}
    cam_diag = next((v for k, v in diag.items() if k.endswith("/camera/image_raw")), {})
    model_diag = next((v for k, v in diag.items() if k.endswith(": model")), {})
    return {
        "model": weights, "random_model": random_model, "source": args.source, "size": args.size,
        "camera_rate_hz": args.rate, "seconds_recorded": round(recorded, 1),
        "frames_in": int(cam_diag.get("frames_received", stats["camera_frames"])),
        "frames_out": stats["segments"],
        "frames_dropped": int(cam_diag.get("frames_dropped", 0)),
        "frames_bad": int(cam_diag.get("frames_bad", 0)),
        "output_rate_hz": round(stats["segments"] / max(recorded, 1e-6), 2),
        "latency_camera_to_client_ms": {"p50": round(p50, 1), "p99": round(p99, 1)},
        "inference_ms": {"p50": round(i50, 1), "p99": round(i99, 1)},
        "segments_per_frame": {"mean": round(float(np.mean(stats["segments_per_frame"])), 2),
                               "min": int(np.min(stats["segments_per_frame"])),
                               "max": int(np.max(stats["segments_per_frame"]))},
        "overlays_received": stats["overlays"], "overlay_pngs": stats["pngs"],
        "bag": str((out / "bag").resolve()), "bag_messages": rec.bag.count, "record": rec.record,
        "bag_mb": round(sum(f.stat().st_size for f in (out / "bag").rglob("*") if f.is_file()) / 1e6, 1),
        "engine": model_diag.get("engine", ""), "device": model_diag.get("device", ""),
        "tracking": _tracking(out), "tracking_resets": {k[len("tracking_resets_"):]: int(v) for k, v in
                                                         cam_diag.items() if k.startswith("tracking_resets_")},
        "3d": rec.depth.summary(out),
    }


def _tracking(out: pathlib.Path) -> dict:
    """Tracks in the recorded outputs, scored against the synthetic camera's ground truth."""
    from ciae_core.structures import CategoryInfo

    from .bag import read_messages
    from .demo_tracking import tracking_report

    cats = next((m for _, m in read_messages(out / "bag", "/panoptic/categories")), None)
    categories = [CategoryInfo(int(c.id), str(c.name), bool(c.isthing)) for c in (cats.categories if cats else [])]
    return tracking_report(out / "bag", out, categories) if categories else {"tracks": 0, "ground_truth": None}


def _report_markdown(r: dict) -> str:
    lines = ["# ciae-demo report", ""]
    if r.get("random_model"):
        lines += ["**No shipped model was found: this run used a randomly initialised model; segments are "
                  "meaningless.**", ""]
    if r.get("model_warning"):
        lines += [f"**Note:** {r['model_warning']}", ""]
    lines += [
        f"- model: `{r['model']}` ({r.get('engine', '')} on {r.get('device', '')})",
        f"- camera: {r['source']} {r['size']} at {r['camera_rate_hz']} Hz; recorded {r['seconds_recorded']} s",
        f"- frames in (node): {r['frames_in']}, out (client): {r['frames_out']} "
        f"({r['output_rate_hz']} Hz), dropped (superseded by newer frames): {r['frames_dropped']}, "
        f"bad: {r['frames_bad']}",
        f"- latency camera -> client: p50 {r['latency_camera_to_client_ms']['p50']} ms, "
        f"p99 {r['latency_camera_to_client_ms']['p99']} ms (inference p50 {r['inference_ms']['p50']} ms)",
        f"- segments per frame: mean {r['segments_per_frame']['mean']} "
        f"(min {r['segments_per_frame']['min']}, max {r['segments_per_frame']['max']})",
        f"- overlay PNGs: {r['overlay_pngs']}; MCAP bag: `{r['bag']}` ({r['bag_messages']} messages, "
        f"{r.get('bag_mb', 0)} MB, images {r.get('record', 'raw')})",
        tracking_markdown(r),
        *report_lines(r.get("3d")),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
