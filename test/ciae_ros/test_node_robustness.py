"""The node under attack and misuse, across processes (issue 17): compressed-image bombs, run-time
rate changes, memory after one huge frame, and start-up failures.

A node process fed by a camera process (``image_bombs.py`` as a script: ``sensor_msgs/CompressedImage``,
reliable, Fast DDS defaults) and observed from the pytest process (segments, /diagnostics, the
node's /proc status for its peak resident memory, reset before each bomb through clear_refs).
Waits poll for a condition with generous deadlines (the machine may be loaded).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.ros
rclpy = pytest.importorskip("rclpy")
pytest.importorskip("ciae_ros.msg")

import image_bombs  # noqa: E402
from image_bombs import BombCamera, reset_peak_rss, rss_bound_mb, rss_mib  # noqa: E402
from ros_testing import REPO, Client, NodeProcess, child_env, diagnostics_values, stamp_of  # noqa: E402

_stamps = itertools.count(1)


def next_stamp() -> tuple[int, int]:
    k = next(_stamps)
    return 2000 + k, 1000 * k + 17


@pytest.fixture(scope="module")
def client():
    c = Client("ciae_test_robustness_client")
    yield c
    c.close()


def _node_with_camera(client, tmp_path_factory, ns: str, params: dict):
    """A node in namespace ``ns`` with compressed input and a bomb camera on its input topic."""
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    from ciae_ros.msg import CategoryArray, PanopticSegments

    cats = client.subscribe(CategoryArray, f"{ns}/panoptic/categories",
                            QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                       durability=DurabilityPolicy.TRANSIENT_LOCAL))
    segs = client.subscribe(PanopticSegments, f"{ns}/panoptic/segments")
    diag = client.subscribe(DiagnosticArray, "/diagnostics")
    node = NodeProcess(tmp_path_factory.mktemp(ns.strip("/")) / "node.log", params.pop("weights"),
                       params={"input_transport": "compressed", "input_size": 320, "diagnostics_period": 0.5,
                               **params}, ros_args=["-r", f"__ns:={ns}"])
    node.wait_ready(cats)
    cam = BombCamera(f"{ns}/camera/image_raw/compressed")
    assert cam.wait_subscribers(120) >= 1, node.log()[-2000:]
    return SimpleNamespace(node=node, cam=cam, segs=segs, diag=diag, topic=f"{ns}/camera/image_raw", ns=ns)


def _roundtrip(n, h: int = 480, w: int = 640, timeout: float = 120.0):
    """Publish a real JPEG and wait for its segments (several tries: the first frames of a new
    subscription may be missed while the node re-creates it for the publisher's reliability)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stamp = next_stamp()
        n.cam.jpeg(h, w, stamp)
        msg = n.segs.wait_for(lambda m, s=stamp: stamp_of(m) == s, timeout=min(20.0, deadline - time.monotonic()))
        if msg is not None:
            return msg
    raise AssertionError(f"no output for a {w}x{h} frame within {timeout} s\n{n.node.log()[-3000:]}")


def _stop(n) -> None:
    n.cam.close()
    rc = n.node.stop()
    assert rc == 0, f"node exit status {rc}:\n{n.node.log()[-3000:]}"


def _bad_counts(n, since: int = 0, timeout: float = 30.0) -> dict:
    """The camera's ``bad_*`` counters from the next /diagnostics message after index ``since``."""
    msg = n.diag.wait_for(lambda m: diagnostics_values(m, n.topic) is not None, timeout=timeout, since=since)
    assert msg is not None, f"no /diagnostics for {n.topic}\n{n.node.log()[-2000:]}"
    return {k[4:]: int(v) for k, v in diagnostics_values(msg, n.topic).items() if k.startswith("bad_")}


# ----------------------------------------------------------------------------------------------
# compressed-image bombs (max_image_pixels = image_bombs.LIMIT, decoder limit set from it)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bombed(node_weights, client, tmp_path_factory):
    n = _node_with_camera(client, tmp_path_factory, "/bombs",
                          {"weights": node_weights, "max_image_pixels": image_bombs.LIMIT})
    for _ in range(3):
        _roundtrip(n)
    # what processing one normal frame costs at its peak (a decoded small bomb is processed too)
    n.frame_mb = 0.0
    for _ in range(3):
        reset_peak_rss(n.node.pid)
        before = rss_mib(n.node.pid)
        _roundtrip(n)
        n.frame_mb = max(n.frame_mb, rss_mib(n.node.pid, "VmHWM") - before)
    yield n
    _stop(n)


@pytest.mark.parametrize("bomb", image_bombs.bombs(), ids=lambda b: b.name)
def test_bomb_through_the_node_costs_bounded_memory_and_counts_one_reason(bombed, bomb):
    """The frame is refused under one reason (or, if its true image is small, processed or
    refused as bad_size), the node's peak RSS stays within the bound for max_image_pixels, and
    the node goes on publishing normal frames."""
    n = bombed
    counts = _bad_counts(n, since=len(n.diag))
    seen = len(n.diag)
    reset_peak_rss(n.node.pid)
    before = rss_mib(n.node.pid)
    stamp = next_stamp()
    n.cam.bomb(bomb.name, stamp)
    deadline = time.monotonic() + 120
    outcome = None
    while outcome is None and time.monotonic() < deadline:
        if n.segs.wait_for(lambda m: stamp_of(m) == stamp, timeout=0.5) is not None:
            outcome = "processed"
            break
        now = _bad_counts(n, since=seen, timeout=5)
        seen = len(n.diag)
        if sum(now.values()) != sum(counts.values()):
            grew = {k: now.get(k, 0) - counts.get(k, 0) for k in now if now.get(k, 0) != counts.get(k, 0)}
            assert list(grew.values()) == [1], f"{bomb.name}: counters changed by {grew}"
            [outcome] = grew
    peak = rss_mib(n.node.pid, "VmHWM") - before
    assert outcome is not None, f"{bomb.name}: neither refused nor processed\n{n.node.log()[-2000:]}"
    if bomb.expect == "ok":
        assert outcome in ("processed", "bad_size"), (bomb.name, outcome)
        bound = rss_bound_mb(image_bombs.LIMIT) + n.frame_mb
    else:
        assert outcome == bomb.expect, (bomb.name, outcome)
        bound = rss_bound_mb(image_bombs.LIMIT)
    assert peak <= bound, f"{bomb.name}: the node's peak RSS grew by {peak:.0f} MiB (bound {bound:.0f} MiB)"
    _roundtrip(n)
    assert n.node.alive()


def test_max_image_pixels_can_be_lowered_at_run_time_but_not_raised_above_the_decoder_limit(bombed, client):
    n = bombed
    [res] = client.set_parameters(f"{n.ns}/ciae_panoptic", max_image_pixels=2 * image_bombs.LIMIT)
    assert not res.successful and f"at most {image_bombs.LIMIT}" in res.reason and "restart" in res.reason
    [res] = client.set_parameters(f"{n.ns}/ciae_panoptic", max_image_pixels=200_000)
    assert res.successful, res.reason
    try:
        counts = _bad_counts(n, since=len(n.diag))
        n.cam.jpeg(480, 640, next_stamp())  # 307 200 pixels: now too large
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = _bad_counts(n, since=len(n.diag))
            if now.get("too_large", 0) > counts.get("too_large", 0):
                break
        else:
            raise AssertionError(f"a 640x480 frame was not refused under max_image_pixels=200000\n{n.node.log()[-2000:]}")
    finally:
        [res] = client.set_parameters(f"{n.ns}/ciae_panoptic", max_image_pixels=image_bombs.LIMIT)
        assert res.successful, res.reason
    _roundtrip(n)


# ----------------------------------------------------------------------------------------------
# run-time rate change, one huge frame (default max_image_pixels)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def harden(node_weights, client, tmp_path_factory):
    n = _node_with_camera(client, tmp_path_factory, "/harden", {"weights": node_weights})
    for _ in range(3):
        _roundtrip(n)
    yield n
    _stop(n)


def test_max_rate_change_applies_at_once(harden, client):
    """max_rate 0.01 (one frame per 100 s) and then 0: the waiting frame is processed within about
    one frame period (camera period + model time on a loaded machine), not when 100 s are over."""
    n = harden
    node = f"{n.ns}/ciae_panoptic"
    [res] = client.set_parameters(node, max_rate=0.01)
    assert res.successful, res.reason
    try:
        _roundtrip(n)  # the first frame may still pass (it starts the 100 s period)
        waiting = next_stamp()
        n.cam.jpeg(480, 640, waiting)
        assert n.segs.wait_for(lambda m: stamp_of(m) == waiting, timeout=3) is None, \
            "max_rate=0.01 let a second frame through at once"
    finally:
        [res] = client.set_parameters(node, max_rate=0.0)
        changed = time.monotonic()
        assert res.successful, res.reason
    msg = n.segs.wait_for(lambda m: stamp_of(m) == waiting, timeout=20)
    assert msg is not None, f"the waiting frame was not processed within 20 s of max_rate=0\n{n.node.log()[-2000:]}"
    assert time.monotonic() - changed < 20


def test_one_huge_frame_does_not_raise_the_nodes_memory_for_good(harden):
    """One 4096x3072 frame between 640x480 ones: afterwards the node's resident memory is back
    within 16 MiB of where it was (it stayed ~67 MiB higher: Fast DDS kept the 50 MB id-image
    payload buffer, glibc kept the freed heap)."""
    n = harden
    for _ in range(20):
        _roundtrip(n)
    before = rss_mib(n.node.pid)
    msg = _roundtrip(n, 3072, 4096, timeout=300)
    assert (msg.id_image.height, msg.id_image.width) == (3072, 4096)
    for _ in range(20):
        _roundtrip(n)
    after = rss_mib(n.node.pid)
    assert after - before <= 16, f"RSS {before:.0f} MiB before the 4096x3072 frame, {after:.0f} MiB after"


# ----------------------------------------------------------------------------------------------
# start-up failures through the real entry point: one line on stderr, exit status 1 (2: usage)
# ----------------------------------------------------------------------------------------------

def test_every_startup_failure_is_one_line_with_the_right_exit_status(node_weights, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("/**:\n  ros__parameters: [\n")
    not_params = tmp_path / "list.yaml"
    not_params.write_text("- 1\n- 2\n")
    w = ["-p", f"weights:={node_weights}"]
    cases = {  # name: (our arguments, ROS arguments, exit status, text of the one line)
        "params_missing": ([], ["--params-file", str(tmp_path / "none.yaml")], 1, "none.yaml does not exist"),
        "params_invalid_yaml": ([], ["--params-file", str(bad_yaml)], 1, "bad.yaml is not valid YAML"),
        "params_directory": ([], ["--params-file", str(tmp_path)], 1, "is a directory"),
        "params_not_parameters": ([], ["--params-file", str(not_params)], 1, "list.yaml"),
        "malformed_rule": ([], ["-p", "input_size"], 2, "invalid ROS arguments"),
        "unknown_flag": (["--bogus"], [], 2, "unrecognized arguments: --bogus"),
        "autostart_alone": (["--autostart"], [], 2, "--autostart needs --lifecycle"),
        "lifecycle_bad_param": (["--lifecycle"], [*w, "-p", "engine:=tensorflow"], 1, "engine must be one of"),
        "autostart_corrupt": (["--lifecycle", "--autostart"], ["-p", f"weights:={corrupt}"], 1,
                              "corrupt.safetensors"),
        "weights_directory": ([], ["-p", f"weights:={tmp_path}"], 1, f"weights file '{tmp_path}' is a directory"),
        "weights_dev_zero": ([], ["-p", "weights:=/dev/zero"], 1, "'/dev/zero' is a character device"),
        "plain_bad_param": ([], [*w, "-p", "input_size:=333"], 1, "input_size"),
    }
    procs = {}
    for name, (ours, ros, _, _) in cases.items():
        cmd = [sys.executable, "-m", "ciae_ros.node", *ours, "--ros-args", "-r", f"__ns:=/start_{name}", *ros]
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    failures = []
    for name, (_, _, status, text) in cases.items():
        try:
            out, err = procs[name].communicate(timeout=300)
        except subprocess.TimeoutExpired:
            procs[name].kill()
            out, err = procs[name].communicate()
        lines = err.splitlines()
        if procs[name].returncode != status or len(lines) != 1 or text not in err or "Traceback" in err + out:
            failures.append(f"{name}: exit {procs[name].returncode} (want {status}), stderr {err!r}, stdout {out[-300:]!r}")
    assert not failures, "\n".join(failures)
