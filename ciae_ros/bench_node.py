"""Node overhead benchmark: publish -> receive latency minus predictor time (``ciae-bench --node``).

``ciae-bench --node ARGS`` calls :func:`main` with ``ARGS``: the ROS layer registers it as the
entry point ``node`` of the group ``ciae_core.bench_plugins`` (setup.py), since ``ciae_core``
imports nothing of ROS. ``python -m ciae_ros.bench_node ARGS`` runs the same.

Starts the node in its own process (like on a robot), publishes ``--frames`` camera images
(``--size``, rgb8, reliable, Fast DDS defaults like a camera driver) one at a time - the next frame
only after the previous result arrived, so nothing queues - and receives ``PanopticSegments`` with
a default-configured subscriber. For every frame:

    overhead = (receive time - header.stamp) - PanopticSegments.inference_time_ms

``header.stamp`` is set right before publishing and ``inference_time_ms`` is the predictor's own
time (preprocess + network + fusion + map back), so the overhead is everything the ROS layer adds:
DDS transport both ways (0.9 MB in, 1.2 MB out at 640x480), deserialisation, image conversion,
building and serialising the id image and segment table, and the hand-over to the worker thread.
Prints p50/p90/p99 and writes them as JSON with ``--json``. DDS stays on loopback
(``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, per-run ``ROS_DOMAIN_ID``).
"""

from __future__ import annotations

import argparse
import array
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from ciae_core.cli.sizes import size_type

_LOG = logging.getLogger("ciae_bench_node")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ciae-bench --node", description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="", help="model file (default: the shipped model, else a small random one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engine", default="torch", choices=("torch", "onnxruntime"))
    ap.add_argument("--input-size", type=int, default=0, help="network input size (0: the model's default)")
    ap.add_argument("--size", type=size_type("--size", minimum=32), default=(640, 480), metavar="WIDTHxHEIGHT",
                    help="camera frame size WIDTHxHEIGHT (default 640x480)")
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the node to start")
    ap.add_argument("--camera-large-data-profile", action="store_true",
                    help="give the publishing (camera) side our large-data Fast DDS profile too")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the node benchmark with the command line ``argv`` (without ``--node``); exit status."""
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] [%(name)s]: %(message)s")
    args = build_parser().parse_args(argv)
    w, h = args.size

    from .demo import demo_environment, random_fallback_model
    from .resources import default_weights

    env = demo_environment()
    os.environ.update({k: env[k] for k in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID")})
    if args.camera_large_data_profile:
        from .resources import use_large_data_dds_profile

        use_large_data_dds_profile()
    tmp = tempfile.TemporaryDirectory(prefix="ciae_bench_node_")
    weights = args.weights or (str(default_weights()) if default_weights() else "")
    if not weights:
        _LOG.warning("no shipped model: timing a small randomly initialised model (overhead does not depend on it)")
        weights = str(random_fallback_model(pathlib.Path(tmp.name) / "random.safetensors"))
    cmd = [sys.executable, "-m", "ciae_ros.node", "--ros-args", "-p", f"weights:={weights}",
           "-p", f"device:={args.device}", "-p", f"engine:={args.engine}", "-r", "image:=/bench/image_raw",
           "-r", "__ns:=/bench"]
    if args.input_size:
        cmd += ["-p", f"input_size:={args.input_size}"]
    log = open(pathlib.Path(tmp.name) / "node.log", "w")
    node_proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        result = _measure(args, h, w, node_proc)
    finally:
        if node_proc.poll() is None:
            node_proc.send_signal(signal.SIGINT)
            try:
                node_proc.wait(20)
            except subprocess.TimeoutExpired:
                node_proc.kill()
                node_proc.wait()
        log.close()
    if result is None:
        print((pathlib.Path(tmp.name) / "node.log").read_text()[-3000:], file=sys.stderr)
        tmp.cleanup()
        return 1
    tmp.cleanup()
    result.update(size=f"{w}x{h}", weights=weights, device=args.device, engine=args.engine)
    o, lat, inf = result["overhead_ms"], result["latency_ms"], result["inference_ms"]
    print(f"ciae-bench --node: {result['frames']} frames {w}x{h} ({args.engine}/{args.device})\n"
          f"  publish->receive latency  p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms\n"
          f"  predictor time            p50 {inf['p50']:.2f} ms  p99 {inf['p99']:.2f} ms\n"
          f"  node overhead             p50 {o['p50']:.2f} ms  p90 {o['p90']:.2f} ms  p99 {o['p99']:.2f} ms "
          f"(goal <= 3 ms)\n"
          f"  inside the node (p50/p99 over the node's window): "
          + ", ".join(f"{k[8:]}={v:.2f}" for k, v in result["node_stages_ms"].items()))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _stats(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def _measure(args, h: int, w: int, node_proc) -> dict | None:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image

    from ciae_ros.msg import CategoryArray, PanopticSegments

    from ciae_core.synth import render_scene

    rgb = render_scene(0, h, w)[0]
    data = array.array("B", np.ascontiguousarray(rgb).tobytes())
    got: dict = {}
    cond = threading.Condition()

    def on_segments(msg):
        t = time.time()
        with cond:
            got[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = (t, msg.inference_time_ms)
            cond.notify_all()

    ready = threading.Event()
    node_stages: dict = {}

    def on_diag(msg):
        for st in msg.status:
            if st.name.endswith(": model"):
                node_stages.update({kv.key: kv.value for kv in st.values if kv.key.startswith("latency_")})
    with rclpy.init(args=["ciae_bench_node"]):
        node = rclpy.create_node("ciae_bench_client")
        pub = node.create_publisher(Image, "/bench/image_raw", QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        node.create_subscription(PanopticSegments, "/bench/panoptic/segments", on_segments, 10)
        node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
        node.create_subscription(CategoryArray, "/bench/panoptic/categories", lambda m: ready.set(),
                                 QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                            durability=DurabilityPolicy.TRANSIENT_LOCAL))
        ex = SingleThreadedExecutor()
        ex.add_node(node)
        spin = threading.Thread(target=ex.spin, daemon=True)
        spin.start()
        try:
            deadline = time.monotonic() + args.timeout
            while not ready.is_set() or pub.get_subscription_count() < 1:
                if node_proc.poll() is not None or time.monotonic() > deadline:
                    _LOG.error("the node did not start (exit status %s)", node_proc.poll())
                    return None
                time.sleep(0.1)
            lat, inf = [], []
            for k in range(args.warmup + args.frames):
                msg = Image(height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3, data=data)
                msg.header.frame_id = "bench"
                stamp = node.get_clock().now().to_msg()
                msg.header.stamp = stamp
                key = (stamp.sec, stamp.nanosec)
                pub.publish(msg)
                with cond:
                    if not cond.wait_for(lambda: key in got, timeout=60):
                        _LOG.error("no result for frame %d within 60 s", k)
                        return None
                    t_recv, inf_ms = got[key]
                if k >= args.warmup:
                    lat.append((t_recv - (stamp.sec + stamp.nanosec * 1e-9)) * 1e3)
                    inf.append(inf_ms)
                time.sleep(0.05)  # let the node go idle: no queueing, no overlap with the next frame
            time.sleep(1.2)  # one more diagnostics period
        finally:
            ex.shutdown(timeout_sec=2)
            node.destroy_node()
    overhead = [a - b for a, b in zip(lat, inf)]
    return {"frames": len(lat), "latency_ms": _stats(lat), "inference_ms": _stats(inf), "overhead_ms": _stats(overhead),
            "node_stages_ms": {k: float(v) for k, v in sorted(node_stages.items()) if "predictor." not in k}}


if __name__ == "__main__":
    sys.exit(main())
