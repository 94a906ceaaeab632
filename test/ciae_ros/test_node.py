"""The panoptic node end to end over real DDS, node / camera / subscriber in separate processes.

One node process serves most tests of this module (module-scoped fixture): images from a camera
publisher process (Fast DDS defaults, reliable, like a camera driver; later best-effort with the
large-data profile), received by default-configured subscriptions of the pytest process.
"""

from __future__ import annotations

import contextlib
import itertools
import pathlib
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.ros
rclpy = pytest.importorskip("rclpy")
pytest.importorskip("ciae_ros.msg")

from ros_testing import (Client, NodeProcess, Publisher, diagnostics_values, peak_rss_mb, rss_mb,  # noqa: E402
                         stamp_of)

from ciae_ros.image_conversion import image_msg_to_array  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
NODE = "/ciae_panoptic"
TOPIC = "/camera/image_raw"
INPUT_SIZE = 320
_stamps = itertools.count(1)


def next_stamp() -> tuple[int, int]:
    k = next(_stamps)
    return 1000 + k, 1000 * k + 7


@pytest.fixture(scope="module")
def client():
    c = Client("ciae_test_node_client")
    yield c
    c.close()


@pytest.fixture(scope="module")
def outputs(client):
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

    from ciae_ros.msg import CategoryArray, PanopticSegments

    return SimpleNamespace(
        segments=client.subscribe(PanopticSegments, "/panoptic/segments"),  # default QoS: reliable, depth 10
        segments_best_effort=client.subscribe(PanopticSegments, "/panoptic/segments", qos_profile_sensor_data),
        categories=client.subscribe(CategoryArray, "/panoptic/categories",
                                    QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                               durability=DurabilityPolicy.TRANSIENT_LOCAL)),
        diagnostics=client.subscribe(DiagnosticArray, "/diagnostics"),
    )


@pytest.fixture(scope="module")
def node(node_weights, outputs, tmp_path_factory):
    # the console script with the shipped parameter file (later -p overrides win)
    script = pathlib.Path(sys.executable).parent / "ciae-panoptic-node"
    n = NodeProcess(tmp_path_factory.mktemp("node") / "node.log", node_weights,
                    params={"input_size": INPUT_SIZE, "diagnostics_period": 0.5},
                    params_file=REPO / "config" / "panoptic.yaml", console_script=script.exists())
    n.wait_ready(outputs.categories)
    yield n
    rc = n.stop()
    assert rc == 0, f"node exit status {rc}:\n{n.log()[-3000:]}"


class Cameras:
    """Camera publisher processes by kind, started on first use."""

    def __init__(self, outputs=None):
        self.pubs: dict[str, Publisher] = {}
        self.outputs = outputs

    def get(self, kind: str) -> Publisher:
        if kind not in self.pubs:
            for other in list(self.pubs):  # one camera on the topic at a time
                self.stop(other)
            pub = Publisher(TOPIC, reliability="reliable") if kind == "reliable" else \
                Publisher(TOPIC, reliability="best_effort", large_data_profile=True)
            assert pub.wait_subscribers(1, timeout=30) >= 1, "the node did not subscribe to the camera"
            self.pubs[kind] = pub
            if self.outputs is not None:
                # input_reliability auto: the node re-subscribes once the graph shows only this camera's
                # offer; a stopped camera's endpoint may linger in discovery for a while (longer when its
                # process had to be killed), and until then large frames to a best-effort reader are lost
                diag = wait_diag(self.outputs, lambda v: v.get("input_reliability") == kind, timeout=300)
                assert diag is not None, f"the node did not re-subscribe {kind} within 300 s"
        return self.pubs[kind]

    def stop(self, kind: str) -> None:
        pub = self.pubs.pop(kind, None)
        if pub is not None:
            pub.close()

    def close(self) -> None:
        for k in list(self.pubs):
            self.stop(k)


@pytest.fixture(scope="module")
def cameras(node, outputs):
    c = Cameras(outputs)
    yield c
    c.close()


def roundtrip(cam: Publisher, outputs, node, h: int, w: int, timeout: float = 60.0, **fields):
    stamp = next_stamp()
    cam.image(h, w, stamp, frame_id=f"cam_{stamp[0]}", **fields)
    msg = outputs.segments.wait_for(lambda m: stamp_of(m) == stamp, timeout=timeout)
    assert msg is not None, f"no output for the {w}x{h} frame\n{node.log()[-3000:]}"
    return stamp, msg


def check_segments(msg, stamp, h: int, w: int) -> None:
    assert stamp_of(msg) == stamp
    assert msg.header.frame_id == f"cam_{stamp[0]}"
    assert stamp_of(msg.id_image) == stamp and msg.id_image.header.frame_id == msg.header.frame_id
    assert (msg.id_image.height, msg.id_image.width, msg.id_image.encoding) == (h, w, "32SC1")
    assert msg.id_image.step == w * 4
    ids = image_msg_to_array(msg.id_image)
    present = np.unique(ids[ids > 0]).tolist()
    assert [s.id for s in msg.segments] == present, "one Segment per non-zero id, in id order"
    assert len(present) > 0, "the model produced no segment at all"
    counts = np.bincount(ids.ravel())
    for s in msg.segments:
        assert s.area == counts[s.id]
        ys, xs = np.nonzero(ids == s.id)
        assert (s.bbox.x_offset, s.bbox.y_offset) == (xs.min(), ys.min())
        assert (s.bbox.width, s.bbox.height) == (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert 0.0 <= s.score <= 1.0 and s.label
    scale = INPUT_SIZE / min(h, w)
    assert (msg.input_height, msg.input_width) == (round(h * scale), round(w * scale))
    assert msg.inference_time_ms > 0 and msg.model_name and msg.model_version.startswith("sha256:")


def wait_diag(outputs, predicate, timeout: float = 15.0):
    """First /diagnostics message from now on whose camera status satisfies ``predicate(values)``."""
    def ok(m):
        v = diagnostics_values(m, TOPIC)
        return v is not None and predicate(v)
    return outputs.diagnostics.wait_for(ok, timeout=timeout, since=len(outputs.diagnostics))


@pytest.mark.parametrize("h,w", [(480, 640), (720, 1280)])
def test_reliable_camera_frames_reach_default_subscribers(cameras, outputs, node, h, w):
    cam = cameras.get("reliable")
    stamp, msg = roundtrip(cam, outputs, node, h, w)
    check_segments(msg, stamp, h, w)
    # the same frame also reached a best-effort subscriber of a default-configured participant:
    # the node's participant carries large samples (config/fastdds_large_data.xml).
    be = outputs.segments_best_effort.wait_for(lambda m: stamp_of(m) == stamp, timeout=10)
    assert be is not None, "best-effort subscriber missed the id image (large-data profile not in effect?)"
    time.sleep(0.5)
    assert sum(stamp_of(m) == stamp for _, m in outputs.segments.snapshot()) == 1, "exactly one output per frame"


def test_parameter_file_values_are_in_effect(client, node):
    import yaml

    shipped = yaml.safe_load((REPO / "config" / "panoptic.yaml").read_text())["/**"]["ros__parameters"]
    names = [k for k in shipped if k not in ("weights", "input_size", "diagnostics_period")]
    assert client.get_parameters(NODE, *names) == [shipped[k] for k in names]


def test_get_parameters_answers_every_declared_parameter(client, node):
    """What ``ros2 param dump`` does: ListParameters, then GetParameters of all names, from another
    node over DDS. image_topics used to be declared by type only (unset), which made rclpy answer
    an empty list for any request naming it."""
    from rcl_interfaces.srv import ListParameters

    from ciae_ros.node import PARAMS

    names = list(client.call(ListParameters, f"{NODE}/list_parameters", ListParameters.Request()).result.names)
    assert {p.name for p in PARAMS} <= set(names)
    values = client.get_parameters(NODE, *names)
    assert len(values) == len(names), "GetParameters gave an empty answer"
    got = dict(zip(names, values))
    assert got["image_topics"] == [] and got["engine"] == "auto" and got["input_size"] == INPUT_SIZE
    [res] = client.set_parameters(NODE, image_topics=["/a/image_raw"])
    assert not res.successful and "read-only" in res.reason


def test_categories_are_latched(outputs, node):
    cats = outputs.categories.wait_for(lambda m: True, timeout=1)
    assert len(cats.categories) > 0 and cats.model_name
    assert any(c.isthing for c in cats.categories) and any(not c.isthing for c in cats.categories)


def test_overlay_only_while_subscribed(client, cameras, outputs, node):
    from sensor_msgs.msg import Image

    cam = cameras.get("reliable")
    overlay = client.subscribe(Image, "/panoptic/overlay")
    deadline = time.monotonic() + 10
    while client.node.count_publishers("/panoptic/overlay") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # discovery of our subscription on the node's side
    stamp, _ = roundtrip(cam, outputs, node, 480, 640)
    ov = overlay.wait_for(lambda m: stamp_of(m) == stamp, timeout=10)
    assert ov is not None, "no overlay for a subscribed overlay topic"
    assert (ov.height, ov.width, ov.encoding) == (480, 640, "bgr8")
    img = image_msg_to_array(ov)
    assert img.shape == (480, 640, 3) and img.std() > 0


BAD_FRAMES = {
    "unsupported_encoding": dict(h=48, w=64, encoding="32FC1"),
    "bad_step": dict(h=48, w=64, step=64 * 3 - 5),
    "short_data": dict(h=48, w=64, data_len=48 * 64 * 3 - 100),
    "empty": dict(h=0, w=0, data_len=0),
    "too_large": dict(h=48, w=64, height=100_000, width=100_000),
    "bad_size": dict(h=4, w=4),  # below the predictor's minimum image side
}


@pytest.mark.parametrize("reason", list(BAD_FRAMES))
def test_bad_frames_are_skipped_counted_and_reported(cameras, outputs, node, reason):
    cam = cameras.get("reliable")
    before = wait_diag(outputs, lambda v: True)
    n_before = int(diagnostics_values(before, TOPIC).get(f"bad_{reason}", 0))
    spec = dict(BAD_FRAMES[reason])
    bad_stamp = next_stamp()
    cam.image(spec.pop("h"), spec.pop("w"), bad_stamp, frame_id="bad", **spec)
    # (wait before the next frame: a newer frame would supersede the bad one in the mailbox)
    diag = wait_diag(outputs, lambda v: int(v.get(f"bad_{reason}", 0)) > n_before)
    assert diag is not None, f"bad_{reason} not counted in /diagnostics"
    stamp, msg = roundtrip(cam, outputs, node, 480, 640)  # a later good frame is still processed
    check_segments(msg, stamp, 480, 640)
    assert node.alive()
    assert outputs.segments.wait_for(lambda m: stamp_of(m) == bad_stamp, timeout=0.1) is None
    assert "[WARN]" in node.log() and "skipping frame" in node.log()


def test_runtime_parameters_apply_and_invalid_values_are_rejected(client, cameras, outputs, node):
    cam = cameras.get("reliable")
    [res] = client.set_parameters(NODE, input_size=256)
    assert res.successful, res.reason
    _, msg = roundtrip(cam, outputs, node, 480, 640)
    assert (msg.input_height, msg.input_width) == (256, 341), "input_size change not applied on the next frame"

    rejected = {"input_size": 160, "engine": "tensorflow", "weights": "/nonexistent/model.safetensors",
                "overlay": "sometimes", "score_threshold": 0.5 - 1.0}
    import torch

    if not torch.cuda.is_available():
        rejected["device"] = "cuda"
    for name, value in rejected.items():
        [res] = client.set_parameters(NODE, **{name: value})
        assert not res.successful, f"{name}={value!r} was accepted"
        assert len(res.reason) > 10, f"no reason given for rejecting {name}={value!r}"
    [res] = client.set_parameters(NODE, input_size=333)  # not on the descriptor's step
    assert not res.successful
    [res] = client.set_parameters(NODE, image_topics=["/a", "/b"])  # read-only
    assert not res.successful

    assert client.get_parameters(NODE, "input_size", "engine", "device") == [256, "auto", "cpu"]
    _, msg = roundtrip(cam, outputs, node, 480, 640)
    assert (msg.input_height, msg.input_width) == (256, 341), "a rejected change altered the node"

    # thresholds: no stuff region can be that large -> only things remain; -1 restores the model's value
    [res] = client.set_parameters(NODE, stuff_area_min=10_000_000)
    assert res.successful, res.reason
    _, msg = roundtrip(cam, outputs, node, 480, 640)
    assert all(s.isthing for s in msg.segments)
    results = client.set_parameters(NODE, stuff_area_min=-1, input_size=INPUT_SIZE)
    assert all(r.successful for r in results), [r.reason for r in results]
    _, msg = roundtrip(cam, outputs, node, 480, 640)
    assert any(not s.isthing for s in msg.segments)


def test_flood_processes_newest_frames_with_bounded_queue_and_memory(cameras, outputs, node):
    # A camera whose participant carries large samples (shared memory): DDS then really delivers
    # 100 Hz of 640x480 to the node. (From a default-configured Fast DDS camera, reliable 0.9 MB
    # samples go as fragmented UDP and only a fraction arrive at this rate; the node is not the limit.)
    cameras.get("reliable")
    flood_cam = Publisher(TOPIC, reliability="reliable", large_data_profile=True)
    try:
        assert flood_cam.wait_subscribers(1, timeout=30) >= 1
        roundtrip(flood_cam, outputs, node, 480, 640)  # warm
        v0 = diagnostics_values(wait_diag(outputs, lambda v: True), TOPIC)
        rss_before = rss_mb(node.pid)
        n_before = len(outputs.segments)
        published, got = 0, []
        # 6 s bursts (ids continue across bursts) until 3 flood frames came out: on a loaded machine
        # the node may finish only one or two inferences in a burst
        for _ in range(5):
            published += flood_cam.flood(480, 640, rate=100.0, seconds=6.0, first=published)["published"]
            time.sleep(2.0)
            got = [(t, m) for t, m in outputs.segments.snapshot()[n_before:] if m.header.frame_id.startswith("flood")]
            if len(got) >= 3:
                break
        rss_after = rss_mb(node.pid)
    finally:
        flood_cam.close()
    report = {"published": published}
    assert report["published"] >= 300, report["published"]
    assert len(got) >= 3, f"only {len(got)} flood frames processed\n{node.log()[-2000:]}"
    seqs = [int(m.header.frame_id[5:]) for _, m in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # newest frame: each processed frame was at most one frame period old when processing started,
    # so its latency is about the predictor time; a FIFO queue would add seconds and keep growing.
    extra = [(t - (m.header.stamp.sec + m.header.stamp.nanosec * 1e-9)) * 1e3 - m.inference_time_ms
             for t, m in got]
    assert np.median(extra) < 400, f"latency beyond inference grows: {np.round(extra, 1)}"
    assert np.median(extra[-3:]) < np.median(extra[:3]) + 400, f"latency grows over the flood: {np.round(extra, 1)}"
    # every received frame is processed, dropped (superseded in the 1-slot mailbox) or bad
    diag = wait_diag(outputs, lambda v: int(v["frames_received"]) == int(v["frames_processed"])
                     + int(v["frames_dropped"]) + int(v["frames_bad"]))
    assert diag is not None, f"counters inconsistent: {diagnostics_values(outputs.diagnostics.snapshot()[-1][1], TOPIC)}"
    v1 = diagnostics_values(diag, TOPIC)
    received = int(v1["frames_received"]) - int(v0["frames_received"])
    dropped = int(v1["frames_dropped"]) - int(v0["frames_dropped"])
    # how many of the published frames reach the node depends on the machine's load (DDS keeps the
    # newest in the reader's history); what matters is that they are counted and mostly dropped
    assert received >= 3 * len(got), f"the node received {received} of {report['published']}, processed {len(got)}"
    assert dropped >= received - len(got) - 1, f"superseded frames not counted as dropped: {v0} -> {v1}"
    # a queue would have kept ~0.9 MB per received frame
    assert rss_after - rss_before < min(150, max(30, received * 0.9 / 2)), \
        f"node memory grew by {rss_after - rss_before:.0f} MiB while {received} frames arrived"
    model = diagnostics_values(diag, ": model")
    assert float(model["latency_total_p99_ms"]) >= float(model["latency_total_p50_ms"]) > 0


@pytest.mark.parametrize("h,w", [(480, 640), (720, 1280)])
def test_best_effort_camera_with_large_data_profile(cameras, outputs, node, h, w):
    cam = cameras.get("best_effort")  # stops the reliable camera; the node re-matches its QoS
    stamp, msg = roundtrip(cam, outputs, node, h, w)
    check_segments(msg, stamp, h, w)
    diag = wait_diag(outputs, lambda v: v.get("input_reliability") == "best_effort")
    assert diag is not None


# ----------------------------------------------------------------------------------------------
# two cameras, compressed input, one model (a second node, namespace /multi)


@pytest.fixture(scope="module")
def multicam(node_weights, client, tmp_path_factory):
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    from ciae_ros.msg import CategoryArray, PanopticSegments

    segs = {c: client.subscribe(PanopticSegments, f"/multi/{c}/panoptic/segments") for c in ("cam1", "cam2")}
    cats = client.subscribe(CategoryArray, "/multi/panoptic/categories",
                            QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                       durability=DurabilityPolicy.TRANSIENT_LOCAL))
    diag = client.subscribe(DiagnosticArray, "/diagnostics")
    n = NodeProcess(tmp_path_factory.mktemp("multicam") / "node.log", node_weights,
                    params={"input_size": INPUT_SIZE, "input_transport": "compressed", "diagnostics_period": 0.5,
                            "image_topics": ["cam1/image_raw", "cam2/image_raw"]},
                    extra_args=["--lifecycle", "--autostart"],  # the managed variant, activated at start
                    ros_args=["-r", "__ns:=/multi"])
    n.wait_ready(cats)
    pubs = {c: Publisher(f"/multi/{c}/image_raw", compressed=True) for c in ("cam1", "cam2")}
    for c, p in pubs.items():
        assert p.wait_subscribers(1, timeout=30) >= 1, f"node did not subscribe to {c}\n{n.log()}"
    yield SimpleNamespace(node=n, segs=segs, pubs=pubs, diag=diag)
    for p in pubs.values():
        p.close()
    rc = n.stop()
    assert rc == 0, n.log()[-3000:]


def test_two_compressed_cameras_through_one_model(multicam):
    sizes = {"cam1": (480, 640), "cam2": (720, 1280)}
    stamps = {}
    for c, (h, w) in sizes.items():
        stamps[c] = next_stamp()
        multicam.pubs[c].compressed(h, w, stamps[c], frame_id=f"{c}_optical")
    for c, (h, w) in sizes.items():
        msg = multicam.segs[c].wait_for(lambda m, s=stamps[c]: stamp_of(m) == s, timeout=60)
        assert msg is not None, f"no output for {c}\n{multicam.node.log()[-3000:]}"
        assert msg.header.frame_id == f"{c}_optical"
        assert (msg.id_image.height, msg.id_image.width) == (h, w)
        ids = image_msg_to_array(msg.id_image)
        counts = np.bincount(ids.ravel())
        assert msg.segments and all(s.area == counts[s.id] for s in msg.segments)
    # each camera's output went only to its own namespace
    for c in sizes:
        other = "cam2" if c == "cam1" else "cam1"
        assert all(stamp_of(m) != stamps[other] for _, m in multicam.segs[c].snapshot())


def test_undecodable_compressed_frame_is_counted(multicam):
    """The undecodable frame is counted before the next frame goes out: the node keeps only the
    newest frame per camera, so a good frame sent right behind it (as this test once did) replaces
    it in the mailbox whenever the worker has not taken it yet (a loaded machine), and a frame that
    is never decoded is counted as dropped, not as bad_decode_failed."""
    topic = "/multi/cam1/image_raw"

    def decode_failed(m):
        v = diagnostics_values(m, topic)
        return None if v is None else int(v.get("bad_decode_failed", 0))
    last = multicam.diag.wait_for(lambda m: decode_failed(m) is not None, timeout=15, since=len(multicam.diag))
    n_before = decode_failed(last)
    since = len(multicam.diag)
    multicam.pubs["cam1"].compressed(480, 640, next_stamp(), garbage=True)
    diag = multicam.diag.wait_for(lambda m: (decode_failed(m) or 0) > n_before, timeout=60, since=since)
    assert diag is not None, f"undecodable frame not counted\n{multicam.node.log()[-2000:]}"
    good = next_stamp()
    multicam.pubs["cam1"].compressed(480, 640, good)
    assert multicam.segs["cam1"].wait_for(lambda m: stamp_of(m) == good, timeout=60) is not None
    assert multicam.node.alive()
    # the warning names the topic the frame came from, not the camera's base name
    warned = [ln for ln in multicam.node.log().splitlines() if "skipping frame from /multi/cam1/" in ln]
    assert warned and all("skipping frame from /multi/cam1/image_raw/compressed: " in ln for ln in warned), warned


@pytest.mark.parametrize("crafted", ["huge_png", "huge_jpeg"])
def test_tiny_but_huge_compressed_frame_is_rejected_without_decoding(multicam, crafted):
    """48 KB / 631 bytes that decode to 20000x20000 (1.2 GB): counted as too_large from the stream
    header; the node's peak resident memory does not move (decoding them took it from ~1 GB to 3.2 GB)."""
    topic = "/multi/cam2/image_raw"

    def too_large(m):
        v = diagnostics_values(m, topic)
        return None if v is None else int(v.get("bad_too_large", 0))
    last = multicam.diag.wait_for(lambda m: too_large(m) is not None, timeout=15, since=len(multicam.diag))
    n_before = too_large(last)
    peak_before = peak_rss_mb(multicam.node.pid)
    multicam.pubs["cam2"].compressed(0, 0, next_stamp(), crafted=crafted)
    diag = multicam.diag.wait_for(lambda m: (too_large(m) or 0) > n_before, timeout=15, since=len(multicam.diag))
    assert diag is not None, f"{crafted} not counted as too_large\n{multicam.node.log()[-2000:]}"
    grown = peak_rss_mb(multicam.node.pid) - peak_before
    assert grown < 300, f"peak memory grew by {grown:.0f} MiB: the huge frame was decoded"
    good = next_stamp()
    multicam.pubs["cam2"].compressed(480, 640, good)
    assert multicam.segs["cam2"].wait_for(lambda m: stamp_of(m) == good, timeout=60) is not None
    assert multicam.node.alive() and "header, not decoded" in multicam.node.log()


def test_each_camera_has_its_own_tracker(multicam):
    """One tracker per camera (issue 14): the same scene on both cameras, each under a new frame_id
    (its tracks restart, confirmed at once): each camera numbers its tracks on from its own last
    id, as its /diagnostics status counts them, not from the other camera's."""
    def issued(cam: str) -> int:
        topic = f"/multi/{cam}/image_raw"
        m = multicam.diag.wait_for(lambda m: diagnostics_values(m, topic) is not None, timeout=15,
                                   since=len(multicam.diag))
        assert m is not None, "no /diagnostics for " + topic
        return int(diagnostics_values(m, topic)["track_ids_issued"])

    for c in ("cam1", "cam2"):
        before = issued(c)
        stamp = next_stamp()
        multicam.pubs[c].compressed(480, 640, stamp, frame_id=f"{c}_tracked")
        msg = multicam.segs[c].wait_for(lambda m, s=stamp: stamp_of(m) == s, timeout=60)
        assert msg is not None, multicam.node.log()[-3000:]
        ids = sorted(s.track_id for s in msg.segments if s.isthing and s.track_id)
        assert ids and ids == list(range(before + 1, before + 1 + len(ids))), (c, before, ids)
        assert issued(c) == ids[-1]


# ----------------------------------------------------------------------------------------------
# lifecycle node (namespace /lc) and startup errors


def _lifecycle(client, op: str | None = None):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    if op is None:
        return client.call(GetState, "/lc/ciae_panoptic/get_state", GetState.Request()).current_state.label
    tid = {"configure": Transition.TRANSITION_CONFIGURE, "activate": Transition.TRANSITION_ACTIVATE,
           "deactivate": Transition.TRANSITION_DEACTIVATE, "cleanup": Transition.TRANSITION_CLEANUP}[op]
    return client.call(ChangeState, "/lc/ciae_panoptic/change_state",
                       ChangeState.Request(transition=Transition(id=tid)), timeout=120).success


def test_lifecycle_loads_on_configure_and_releases_on_cleanup(node_weights, client, tmp_path):
    from ciae_ros.msg import PanopticSegments

    segs = client.subscribe(PanopticSegments, "/lc/panoptic/segments")
    n = NodeProcess(tmp_path / "lc.log", node_weights, params={"input_size": INPUT_SIZE}, extra_args=["--lifecycle"],
                    ros_args=["-r", "__ns:=/lc"])
    cam = None
    try:
        deadline = time.monotonic() + 120
        state = None
        while time.monotonic() < deadline and state is None:
            try:
                state = _lifecycle(client)
            except TimeoutError:
                pass
        assert state == "unconfigured", n.log()
        assert "loaded from" not in n.log(), "the model must load in configure, not before"
        assert _lifecycle(client, "configure") and _lifecycle(client) == "inactive"
        assert "loaded from" in n.log()
        assert _lifecycle(client, "activate") and _lifecycle(client) == "active"
        cam = Publisher("/lc/camera/image_raw")  # the default remap is relative to the namespace
        assert cam.wait_subscribers(1, timeout=30) >= 1, n.log()
        stamp = next_stamp()
        cam.image(480, 640, stamp)
        assert segs.wait_for(lambda m: stamp_of(m) == stamp, timeout=60) is not None, n.log()
        assert _lifecycle(client, "deactivate") and _lifecycle(client) == "inactive"
        stamp = next_stamp()
        cam.image(480, 640, stamp)
        assert segs.wait_for(lambda m: stamp_of(m) == stamp, timeout=3) is None, "inactive node processed a frame"
        assert _lifecycle(client, "cleanup") and _lifecycle(client) == "unconfigured"
        assert client.node.count_publishers("/lc/panoptic/segments") == 0
        # a corrupt model file: configure fails with a reason, the node stays unconfigured and alive
        bad = tmp_path / "corrupt.safetensors"
        bad.write_bytes(b"this is not a safetensors file" * 10)
        [res] = client.set_parameters("/lc/ciae_panoptic", weights=str(bad))
        assert res.successful, res.reason
        assert not _lifecycle(client, "configure")
        assert _lifecycle(client) == "unconfigured" and n.alive()
        assert "configure failed:" in n.log() and "corrupt.safetensors" in n.log()
    finally:
        if cam is not None:
            cam.close()
        rc = n.stop()
    assert rc == 0, n.log()[-3000:]


def test_startup_errors_exit_non_zero_with_one_clear_line(node_weights, tmp_path):
    import torch

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    cases = {
        "missing": ({"weights": "/nonexistent/model.safetensors"}, "does not exist"),
        "corrupt": ({"weights": str(corrupt)}, "corrupt.safetensors"),
        "engine": ({"engine": "tensorflow"}, "engine must be one of"),
        "range": ({"input_size": 333}, "input_size"),
        "autostart": ({"weights": str(corrupt)}, "corrupt.safetensors"),  # the configure error itself
        "prefix": ({"image_topics": ["/cam/image_raw", "/cam/image_rect"]}, "would both publish under /cam/panoptic/"),
        # in namespace /err_resolved the relative and the absolute name are one topic
        "resolved": ({"image_topics": ["cam/image_raw", "/err_resolved/cam/image_raw"]},
                     "are the same topic /err_resolved/cam/image_raw"),
    }
    if not torch.cuda.is_available():
        cases["cuda"] = ({"device": "cuda"}, "no CUDA GPU is available; use device:=cpu")  # ROS words, not Python
    procs = {}
    for name, (params, _) in cases.items():
        p = dict(params)
        weights = p.pop("weights", node_weights)
        extra = ["--lifecycle", "--autostart"] if name == "autostart" else []
        procs[name] = NodeProcess(tmp_path / f"{name}.log", weights, params=p, extra_args=extra,
                                  ros_args=["-r", f"__ns:=/err_{name}"])
    for name, (_, expected) in cases.items():
        n = procs[name]
        try:
            rc = n.proc.wait(120)
        finally:
            n.stop()
        log = n.log_path.read_text()
        assert rc == 1, f"{name}: exit status {rc}\n{log}"
        lines = [ln for ln in log.splitlines() if "cannot start:" in ln]
        assert len(lines) == 1 and expected in lines[0], f"{name}: {log}"
        assert "Traceback" not in log, f"{name}: {log}"


@contextlib.contextmanager
def namespaced_node(client, log: pathlib.Path, ns: str, weights: str, params: dict):
    """A node process of its own in namespace ``ns`` with a reliable camera on ``ns/camera/image_raw``
    and a subscription to its segments; stopped (exit status 0 checked) afterwards."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    from ciae_ros.msg import CategoryArray, PanopticSegments

    cats = client.subscribe(CategoryArray, f"{ns}/panoptic/categories",
                            QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                       durability=DurabilityPolicy.TRANSIENT_LOCAL))
    segs = client.subscribe(PanopticSegments, f"{ns}/panoptic/segments")
    n = NodeProcess(log, weights, params=params, ros_args=["-r", f"__ns:={ns}"])
    cam = None
    try:
        n.wait_ready(cats)
        cam = Publisher(f"{ns}/camera/image_raw", reliability="reliable")
        assert cam.wait_subscribers(1, timeout=30) >= 1, n.log()[-3000:]
        yield SimpleNamespace(node=n, cam=cam, segments=segs)
    finally:
        if cam is not None:
            cam.close()
        rc = n.stop()
    assert rc == 0, n.log()[-3000:]


def test_fixed_shape_onnx_export_on_the_onnxruntime_engine(client, node_weights, tmp_path):
    """The node on engine onnxruntime with a `ciae-export --size 384x288` file, across processes:
    a 480x640 frame is fitted into the canvas (the message's input size says so), thresholds
    change at run time, and input_size is refused with a reason (the canvas is fixed)."""
    from ciae_core.export import export_checkpoint

    onnx_path = export_checkpoint(node_weights, tmp_path / "fixed.onnx", size=(288, 384), dynamic=False)
    with namespaced_node(client, tmp_path / "fixed.log", "/fixed", str(onnx_path), {"engine": "onnxruntime"}) as run:
        def frame():
            stamp = next_stamp()
            run.cam.image(480, 640, stamp, frame_id="fixed_cam")
            msg = run.segments.wait_for(lambda m: stamp_of(m) == stamp, timeout=60)
            assert msg is not None, run.node.log()[-3000:]
            return msg

        msg = frame()
        assert (msg.id_image.height, msg.id_image.width) == (480, 640)
        assert (msg.input_height, msg.input_width) == (288, 384)
        [res] = client.set_parameters("/fixed/ciae_panoptic", score_threshold=0.3)
        assert res.successful, res.reason
        [res] = client.set_parameters("/fixed/ciae_panoptic", input_size=320)
        assert not res.successful and "fixed 384x288 export" in res.reason, res.reason
        assert frame().input_height == 288


def test_node_stops_on_sigint_even_when_started_with_sigint_ignored(node_weights, tmp_path):
    """A node started in the background by a script inherits SIGINT as ignored; it must still stop
    cleanly (exit 0) on SIGINT, which is what Ctrl-C and ros2 launch's shutdown send first."""
    n = NodeProcess(tmp_path / "bg.log", node_weights, params={"input_size": INPUT_SIZE},
                    ros_args=["-r", "__ns:=/bg"], sigint_ignored=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and n.alive() and "waiting for a publisher" not in n.log():
            time.sleep(0.2)
        assert n.alive() and "waiting for a publisher" in n.log(), n.log()
    finally:
        rc = n.stop(timeout=30.0)
    assert rc == 0, n.log()[-3000:]


def test_the_synthetic_only_model_is_said_at_start_and_in_diagnostics(node, outputs, node_weights):
    """The shipped model's file says domain synthetic-shapes: one WARN at start naming what it
    knows and where to go for real scenes; /diagnostics carries the domain."""
    from ciae_core.model_domain import read_model_domain

    expected, _ = read_model_domain(node_weights)
    warned = [ln for ln in node.log().splitlines() if "synthetic-only model" in ln]
    if expected == "synthetic-shapes":
        assert len(warned) == 1 and warned[0].startswith("[WARN]"), warned
        assert "it knows disc, box, triangle, ring, sky, wall, ground in rendered scenes" in warned[0]
        assert "README 'Train a real-scene model'" in warned[0]
    else:  # no shipped model: the stand-in random model has no domain, so nothing is said
        assert not warned
    def model_status(m):  # this node's, by its full name (other nodes' names end alike)
        return next(({kv.key: kv.value for kv in st.values} for st in m.status if st.name == f"{NODE}: model"), None)
    diag = outputs.diagnostics.wait_for(lambda m: model_status(m) is not None, timeout=30)
    assert diag is not None
    assert model_status(diag)["domain"] == (expected or "unknown")


def _wait_for_log(n: NodeProcess, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and n.alive() and text not in n.log():
        time.sleep(0.2)
    assert n.alive() and text in n.log(), n.log()[-3000:]


def test_misspelled_parameter_keys_are_reported_and_ignored(node_weights, tmp_path):
    """A params file with a typo: one warning per unknown key with a close-match suggestion, the
    node keeps running on its defaults; ROS-standard keys (use_sim_time) are not reported."""
    params = tmp_path / "typo.yaml"
    params.write_text("/**:\n  ros__parameters:\n    input_sise: 256\n    use_sim_time: false\n"
                      "    overlay_alpha: 0.3\n    totally_unrelated_key: 1\n")
    n = NodeProcess(tmp_path / "typo.log", node_weights, params_file=params, ros_args=["-r", "__ns:=/typo"])
    try:
        _wait_for_log(n, "waiting for a publisher")
        log = n.log()
    finally:
        rc = n.stop()
    assert rc == 0, log[-3000:]
    warnings = [ln for ln in log.splitlines() if "[WARN]" in ln and "parameter" in ln]
    assert any("unknown parameter 'input_sise' (did you mean 'input_size'?)" in ln and "ignored" in ln
               for ln in warnings), log
    assert any("unknown parameter 'totally_unrelated_key' \u2014 ignored" in ln for ln in warnings), log
    assert len(warnings) == 2, warnings  # not use_sim_time, not overlay_alpha, nothing rclpy declares
    assert "input_size 320" in log, "the default input_size must stay in effect"


def _onnx_with_mismatched_metadata(weights: str, directory: pathlib.Path) -> tuple[str, str]:
    """A good dynamic export of ``weights`` and a copy whose ciae_config claims the stride-8 branch:
    it loads, and every frame then fails in the Predictor (the embedding output does not fit)."""
    import json

    import onnx

    from ciae_core.export import export_checkpoint

    good = str(export_checkpoint(weights, directory / "good.onnx", dynamic=True))
    proto = onnx.load(good)
    for prop in proto.metadata_props:
        if prop.key == "ciae_config":
            prop.value = json.dumps({**json.loads(prop.value), "embedding_from_level": 3})
    onnx.save(proto, str(directory / "mismatched.onnx"))
    return good, str(directory / "mismatched.onnx")


def test_processing_errors_set_the_model_diagnostics_to_error_only_while_they_happen(client, node_weights,
                                                                                     tmp_path):
    """Real failures, another process, real DDS: on a file whose every frame fails, the model status
    is ERROR; after switching to a good file at run time it is OK again (it used the running
    total, so one error left it at ERROR for good), and the totals stay in errors_<type>."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    good, mismatched = _onnx_with_mismatched_metadata(node_weights, tmp_path)

    def model_status(m):
        return next((st for st in m.status if st.name == "/diagerr/ciae_panoptic: model"), None)

    diag = client.subscribe(DiagnosticArray, "/diagnostics")
    params = {"engine": "onnxruntime", "diagnostics_period": 0.3}
    with namespaced_node(client, tmp_path / "diagerr.log", "/diagerr", mismatched, params) as run:
        since = len(diag)
        run.cam.image(240, 320, next_stamp())
        err = diag.wait_for(lambda m: (st := model_status(m)) is not None and st.level == DiagnosticStatus.ERROR,
                            timeout=30, since=since)
        assert err is not None, f"the processing error was not reported\n{run.node.log()[-3000:]}"
        assert "1 processing error(s) in the last period" in model_status(err).message
        assert run.node.alive(), "a processing error must not stop the node"
        [res] = client.set_parameters("/diagerr/ciae_panoptic", weights=good)
        assert res.successful, res.reason
        stamp = next_stamp()
        run.cam.image(240, 320, stamp)
        assert run.segments.wait_for(lambda m: stamp_of(m) == stamp, timeout=60) is not None, run.node.log()[-3000:]
        since = len(diag)
        ok = diag.wait_for(lambda m: (st := model_status(m)) is not None and st.level == DiagnosticStatus.OK,
                           timeout=10, since=since)
        assert ok is not None, f"still {model_status(diag.snapshot()[-1][1]).message!r} a period after the error"
        assert {kv.key: kv.value for kv in model_status(ok).values}["errors_PredictorError"] == "1"


# ----------------------------------------------------------------------------------------------
# pieces of the node without DDS


def test_autostart_without_lifecycle_is_a_usage_error(capsys):
    import subprocess

    from ciae_ros.node import _parse_args

    assert _parse_args(["--lifecycle", "--autostart"]).autostart
    with pytest.raises(SystemExit) as e:
        _parse_args(["--autostart"])
    assert e.value.code == 2 and "--autostart needs --lifecycle" in capsys.readouterr().err
    # the real entry point stops before starting ROS (ROS arguments are stripped first)
    res = subprocess.run([sys.executable, "-m", "ciae_ros.node", "--autostart", "--ros-args", "-r", "__ns:=/as"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == ("ciae-panoptic-node: error: --autostart needs --lifecycle "
                                                   "(a plain node is active from the start anyway)")


def _node_publishes(client, topic: str, expected: bool, timeout: float = 60.0) -> bool:
    """Poll the ROS graph (the node's own publishers, seen from another process) until ``topic`` is
    among them (``expected`` True) or not; the final state either way."""
    deadline = time.monotonic() + timeout
    while True:
        topics = {t for t, _ in client.node.get_publisher_names_and_types_by_node("ciae_panoptic", "/")}
        if (topic in topics) == expected or time.monotonic() > deadline:
            return topic in topics
        time.sleep(0.2)


def test_confidence_topic_is_advertised_only_while_publish_confidence_is_on(client, node):
    """With publish_confidence false (config/panoptic.yaml) the node has no panoptic/confidence
    publisher at all; setting it true through the parameter service creates one, false removes it."""
    assert client.get_parameters(NODE, "publish_confidence") == [False]
    # the node's other publishers (categories and diagnostics are created after the confidence one
    # used to be): once this process knows them, it would know a confidence publisher too
    for other in ("/panoptic/segments", "/panoptic/overlay", "/panoptic/categories", "/diagnostics"):
        assert _node_publishes(client, other, True), f"{other} not in the graph\n{node.log()[-2000:]}"
    assert not _node_publishes(client, "/panoptic/confidence", False), "advertised with publish_confidence false"
    [res] = client.set_parameters(NODE, publish_confidence=True)
    assert res.successful, res.reason
    assert _node_publishes(client, "/panoptic/confidence", True), "not advertised after publish_confidence true"
    [res] = client.set_parameters(NODE, publish_confidence=False)
    assert res.successful, res.reason
    assert not _node_publishes(client, "/panoptic/confidence", False), "still advertised after false again"


def test_confidence_output_and_max_rate_at_run_time(client, cameras, outputs, node):
    from sensor_msgs.msg import Image

    cam = cameras.get("reliable")
    conf = client.subscribe(Image, "/panoptic/confidence")
    [res] = client.set_parameters(NODE, publish_confidence=True)
    assert res.successful, res.reason
    # the confidence publisher is created now: frames may go out before it has matched our
    # subscription, so send frames until one's confidence arrives (or the deadline passes)
    deadline = time.monotonic() + 60
    while True:
        stamp, _ = roundtrip(cam, outputs, node, 480, 640)
        msg = conf.wait_for(lambda m, s=stamp: stamp_of(m) == s, timeout=10)
        if msg is not None or time.monotonic() > deadline:
            break
    assert msg is not None and (msg.height, msg.width, msg.encoding) == (480, 640, "32FC1")
    c = image_msg_to_array(msg)
    assert np.isfinite(c).all() and c.min() >= -1e-6
    results = client.set_parameters(NODE, publish_confidence=False, max_rate=2.0)
    assert all(r.successful for r in results), [r.reason for r in results]
    n0 = len(outputs.segments)
    cam.flood(480, 640, rate=30.0, seconds=3.0)
    time.sleep(1.0)
    n = sum(1 for _, m in outputs.segments.snapshot()[n0:] if m.header.frame_id.startswith("flood"))
    assert 1 <= n <= 2.0 * 4 + 1, f"{n} frames processed in 3 s at max_rate 2 Hz"
    [res] = client.set_parameters(NODE, max_rate=0.0)
    assert res.successful


def test_weights_change_reloads_the_model_and_republishes_categories(client, cameras, outputs, node, node_weights,
                                                                      tmp_path):
    import shutil

    other = tmp_path / "other_model.safetensors"
    shutil.copy(node_weights, other)
    n_cats = len(outputs.categories)
    [res] = client.set_parameters(NODE, weights=str(other))
    assert res.successful, res.reason
    _, msg = roundtrip(cam := cameras.get("reliable"), outputs, node, 480, 640)
    assert msg.model_name == "other_model"
    cats = outputs.categories.wait_for(lambda m: m.model_name == "other_model", timeout=10, since=n_cats)
    assert cats is not None and len(cats.categories) > 0
    [res] = client.set_parameters(NODE, weights=node_weights)
    assert res.successful, res.reason
    _, msg = roundtrip(cam, outputs, node, 480, 640)
    assert msg.model_name == pathlib.Path(node_weights).stem
