"""The demo's 3-D (issue 15): depth for the node, what the client records of it, and the 3-D error
of the report against the rendered ground truth.

With the ``synth`` source the camera publishes depth and camera info (:mod:`ciae_ros.camera`) and
writes the frame index of every stamp to ``camera_truth.jsonl``; the node gets ``depth_topic``; the
client records ``/camera/depth/image_raw``, ``/camera/camera_info``, ``/panoptic/markers`` and
``/panoptic/points`` into the bag (subscribing to the points makes the node compute them) and keeps
one ``PanopticSegments`` per ``sample_every`` seconds. The report re-renders those frames
(:func:`ciae_ros.camera.synth_sequence`, exact depth by :func:`ciae_core.synth_depth.render_depth`)
and gives two relative errors per segment with 3-D:

* **3-D of the node's segments** (``depth``): the node's centroid and extent against the truth of
  the *same* pixels (its own mask) in the exact depth: what depth noise, registration error, mask
  erosion and sampling cost;
* **end to end** (``end_to_end``): the node's centroid and extent against the true segment it
  overlaps most (IoU >= ``min_iou``): segmentation errors included.

Extents are compared on the axes whose true extent exceeds 5 cm (a plate has no depth extent).
Against its own mask the extent error is large where the model's mask takes in pixels of the
surface behind (the truth of that mask then spans both surfaces, while the estimator erodes and
takes 5-95 % percentiles): read the end-to-end extent as the useful figure.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from .demo_tracking import TRUTH_FILE  # the one truth file both reports read

DEPTH_TOPIC = "/camera/depth/image_raw"
INFO_TOPIC = "/camera/camera_info"


def node_arguments(source: str) -> list[str]:
    """``--ros-args`` parameters that give the node the synthetic camera's depth."""
    return ["-p", f"depth_topic:={DEPTH_TOPIC}"] if source == "synth" else []


def camera_arguments(source: str, out: pathlib.Path) -> list[str]:
    """Camera options: the stamp -> frame index file the report reads."""
    return ["--truth", str(out / TRUTH_FILE)] if source == "synth" else []



def compressed_depth_copy(data: bytes) -> bytes | None:
    """A serialized ``16UC1`` depth ``sensor_msgs/Image`` as a serialized ``sensor_msgs/CompressedImage``
    laid out as ``compressed_depth_image_transport`` writes it: ``format`` ``"16UC1; compressedDepth
    png"``, ``data`` = a 12-byte header (int32 1 = PNG, two float32 quantisation parameters, unused
    for 16UC1) and a lossless 16-bit PNG of the image; ``None`` for other encodings (kept raw)."""
    import array
    import struct

    import cv2
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import CompressedImage, Image

    from .image_conversion import image_msg_to_array

    msg = deserialize_message(data, Image)
    if msg.encoding != "16UC1":
        return None
    ok, png = cv2.imencode(".png", np.ascontiguousarray(image_msg_to_array(msg)), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"PNG encoding of a {msg.width}x{msg.height} depth image failed")
    out = CompressedImage(header=msg.header, format="16UC1; compressedDepth png",
                          data=array.array("B", struct.pack("<iff", 1, 0.0, 0.0) + png.tobytes()))
    return serialize_message(out)

class DepthRecorder:
    """The client's 3-D subscriptions (recorded raw to the bag) and the segments it keeps for the report."""

    def __init__(self, enabled: bool, sample_every: float = 1.0, max_samples: int = 30):
        self.enabled = enabled
        self.sample_every, self.max_samples = float(sample_every), int(max_samples)
        self.samples: list = []  # PanopticSegments with 3-D, one per sample_every seconds
        self.counts = {"frames_3d": 0, "frames_no_3d": 0, "markers": 0, "points": 0}
        self._last = -1e9

    def subscribe(self, client, raw, compressed: bool = False) -> list:
        """Subscriptions of ``client`` whose callbacks are ``raw(topic, msgtype, handler)`` (the
        demo's recorder): depth, camera info, markers, points. ``compressed``: depth is recorded as
        :func:`compressed_depth_copy` on ``<depth topic>/compressedDepth``."""
        if not self.enabled:
            return []
        keep = raw(DEPTH_TOPIC, "sensor_msgs/msg/Image")
        if compressed:
            store = raw(DEPTH_TOPIC + "/compressedDepth", "sensor_msgs/msg/CompressedImage")

            def depth_cb(data: bytes) -> None:
                png = compressed_depth_copy(data)
                store(png) if png is not None else keep(data)
        else:
            depth_cb = keep
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2
        from visualization_msgs.msg import MarkerArray

        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        topics = ((DEPTH_TOPIC, Image, "sensor_msgs/msg/Image", None),
                  (INFO_TOPIC, CameraInfo, "sensor_msgs/msg/CameraInfo", None),
                  ("/panoptic/markers", MarkerArray, "visualization_msgs/msg/MarkerArray", "markers"),
                  ("/panoptic/points", PointCloud2, "sensor_msgs/msg/PointCloud2", "points"))
        return [client.create_subscription(mtype, topic, depth_cb if topic == DEPTH_TOPIC else
                                           raw(topic, name, self._counter(key)), reliable, raw=True)
                for topic, mtype, name, key in topics]

    def _counter(self, key: str | None):
        if key is None:
            return None

        def count(_data) -> None:
            self.counts[key] += 1
        return count

    def on_segments(self, msg) -> None:
        """Every received ``PanopticSegments`` (deserialised)."""
        if not self.enabled:
            return
        self.counts["frames_3d" if msg.depth_frame_id else "frames_no_3d"] += 1
        now = time.monotonic()
        if msg.depth_frame_id and len(self.samples) < self.max_samples and now - self._last >= self.sample_every:
            self._last = now
            self.samples.append(msg)

    def summary(self, out_dir: pathlib.Path) -> dict | None:
        """The report's ``3d`` entry (``None`` when the demo had no depth); the camera's truth file
        is ``out_dir/camera_truth.jsonl``."""
        if not self.enabled:
            return None
        out: dict = dict(self.counts)
        try:
            out.update(errors_against_truth(self.samples, pathlib.Path(out_dir) / TRUTH_FILE))
        except (OSError, ValueError, KeyError) as exc:  # a missing or partial truth file: no error figures
            out["error"] = f"no 3-D error: {exc}"
        return out


def _frame_index(truth_file: pathlib.Path) -> tuple[dict, dict]:
    lines = [json.loads(line) for line in pathlib.Path(truth_file).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{truth_file} is empty")
    return lines[0], {tuple(d["stamp"]): int(d["frame"]) for d in lines[1:]}


def _best_true_segment(ids: np.ndarray, pan: np.ndarray) -> dict[int, tuple[int, float]]:
    """Node segment id -> (true segment id, IoU) of the true segment it overlaps most."""
    n, t = int(ids.max(initial=0)) + 1, int(pan.max(initial=0)) + 1
    inter = np.bincount(ids.ravel().astype(np.int64) * t + pan.ravel(), minlength=n * t).reshape(n, t)
    area_n, area_t = inter.sum(1), inter.sum(0)
    iou = inter / np.maximum(area_n[:, None] + area_t[None, :] - inter, 1)
    iou[:, 0] = 0  # void
    best = iou.argmax(1)
    return {i: (int(best[i]), float(iou[i, best[i]])) for i in range(1, n) if area_n[i]}


def errors_against_truth(samples: list, truth_file: pathlib.Path, min_iou: float = 0.5) -> dict:
    """Relative 3-D errors of the sampled ``PanopticSegments`` against the re-rendered truth
    (module docstring): medians and 90th percentiles, segments and frames used."""
    from ciae_core.synth_depth import geometry_errors, render_depth, segment_truth

    from .camera import synth_sequence
    from .image_conversion import image_msg_to_array
    from .spatial_outputs import geometry_from_segments

    head, frame_of = _frame_index(truth_file)
    seq = synth_sequence(int(head["seed"]), int(head["height"]), int(head["width"]))
    cen, size, e2e, e2e_size, frames = [], [], [], [], 0
    for msg in samples:
        k = frame_of.get((msg.header.stamp.sec, msg.header.stamp.nanosec))
        if k is None:
            continue
        _, pan, info = seq.frame(k)
        r = render_depth(pan, info)
        ids = image_msg_to_array(msg.id_image)
        est = geometry_from_segments(msg.segments)
        e = geometry_errors(est, segment_truth(r.depth, ids, r.K, ids=est.ids))
        cen += e["centroid"].tolist()
        size += e["size"].tolist()
        rows = {int(i): j for j, i in enumerate(r.truth.ids.tolist())}
        best = _best_true_segment(ids, pan)
        for row, (sid, has) in enumerate(zip(est.ids.tolist(), est.has_3d.tolist())):
            tid, iou = best.get(sid, (0, 0.0)) if has else (0, 0.0)
            j = rows.get(tid)
            if iou >= min_iou and j is not None and r.truth.has_3d[j]:
                c, t_size = r.truth.centroid[j], r.truth.size[j]
                e2e.append(float(np.linalg.norm(est.centroid[row] - c) / np.linalg.norm(c)))
                axes = t_size > 0.05
                e2e_size += (np.abs(est.size[row][axes] - t_size[axes]) / t_size[axes]).tolist()
        frames += 1

    def stats(v):
        if not v:
            return {"n": 0}
        return {"median_pct": round(100 * float(np.median(v)), 2), "p90_pct": round(100 * float(np.percentile(v, 90)), 2),
                "n": len(v)}

    return {"frames_evaluated": frames, "depth_centroid": stats(cen), "depth_size": stats(size),
            "end_to_end_centroid": stats(e2e), "end_to_end_size": stats(e2e_size), "min_iou": min_iou}


def report_lines(r: dict | None) -> list[str]:
    """The report's markdown lines for its ``3d`` entry."""
    if r is None:
        return ["- 3-D: off (the source has no depth)"]
    lines = [f"- 3-D: {r['frames_3d']} frame(s) with 3-D, {r['frames_no_3d']} without; markers "
             f"{r['markers']}, point clouds {r['points']} recorded"]
    if "error" in r:
        return lines + [f"- {r['error']}"]

    def fmt(s):
        return f"median {s['median_pct']} %, p90 {s['p90_pct']} % ({s['n']})" if s["n"] else "none"

    lines += [f"- 3-D error against the rendered truth ({r['frames_evaluated']} frames), relative: end to end "
              f"(the true segment of IoU >= {r['min_iou']}) centroid {fmt(r['end_to_end_centroid'])}, extent "
              f"{fmt(r['end_to_end_size'])}; over the node's own masks centroid {fmt(r['depth_centroid'])}, extent "
              f"{fmt(r['depth_size'])}"]
    return lines
