"""MCAP recording with our message types, and ``ciae-bag`` over a recorded bag (no DDS): which
topics it reads, how it names and protects its outputs, its progress bar and summary line."""

from __future__ import annotations

import array
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("ciae_ros.msg")
pytest.importorskip("rosbags")

from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from ciae_core.synth import render_scene  # noqa: E402
from ciae_ros.bag import BagError, BagWriter, main, process_bag, read_messages  # noqa: E402
from ciae_ros.image_conversion import image_msg_to_array, numpy_to_image  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ros_testing import REPO, child_env  # noqa: E402


def _image(k: int, h=96, w=128):
    msg = numpy_to_image(render_scene(k, h, w)[0], "rgb8")
    msg.header.stamp.sec, msg.header.stamp.nanosec = 100 + k, 5
    msg.header.frame_id = "cam"
    return msg


@pytest.fixture(scope="module")
def input_bag(tmp_path_factory):
    import cv2

    path = tmp_path_factory.mktemp("bags") / "in"
    with BagWriter(path) as bag:
        for k in range(3):
            bag.write_msg("/camera/image_raw", _image(k), 1_000_000_000 * (k + 1))
        bad = _image(9)
        bad.encoding = "32FC1"
        bag.write_msg("/camera/image_raw", bad, 4_000_000_000)
        ok, jpg = cv2.imencode(".jpg", render_scene(7, 64, 96)[0][:, :, ::-1])
        c = CompressedImage(format="jpeg", data=array.array("B", jpg.tobytes()))
        c.header.frame_id = "cam2"
        bag.write_msg("/cam2/image_raw/compressed", c, 5_000_000_000)
    return path


def test_writer_makes_an_mcap_bag_with_our_types(tmp_path):
    from ciae_core.structures import PanopticResult, segments_from_id_map
    from ciae_ros.conversions import segments_msg

    ids = np.zeros((4, 6), np.int32)
    ids[1:3, 2:5] = 1
    res = PanopticResult(id_map=ids, segments=segments_from_id_map(ids, {1: (3, "box", True, 0.5)}))
    msg = segments_msg(res, _image(0).header, "m", "v", (4, 6), 1.0)
    with BagWriter(tmp_path / "b") as bag:
        bag.write_msg("/panoptic/segments", msg, 7)
    assert "storage_identifier: mcap" in (tmp_path / "b" / "metadata.yaml").read_text()
    [(ts, back)] = list(read_messages(tmp_path / "b", "/panoptic/segments"))
    assert ts == 7 and back.segments[0].label == "box" and back.segments[0].area == 6
    assert back.id_image.encoding == "32SC1"
    with pytest.raises(BagError, match="already exists"):
        BagWriter(tmp_path / "b")


def test_process_bag_segments_every_frame_and_skips_bad_ones(input_bag, node_weights, tmp_path):
    from ciae_core.predictor import Predictor
    from ciae_core.visualize import category_colors

    pred = Predictor(node_weights, input_size=256)
    summary = process_bag(input_bag, tmp_path / "out", pred, model_name="tiny")
    assert (summary.frames_read, summary.segmented) == (5, 4) and summary.skipped == {"unsupported_encoding": 1}
    assert summary.inputs == ["/cam2/image_raw/compressed", "/camera/image_raw"]
    out = tmp_path / "out"
    cams = list(read_messages(out, "/camera/image_raw"))
    assert len(cams) == 4, "input topics are copied"
    segs = list(read_messages(out, "/camera/panoptic/segments"))  # two cameras: per-camera namespaces
    assert [ts for ts, _ in segs] == [1_000_000_000, 2_000_000_000, 3_000_000_000]
    for k, (_, m) in enumerate(segs):
        assert (m.header.stamp.sec, m.header.frame_id) == (100 + k, "cam")
        ids = image_msg_to_array(m.id_image)
        assert ids.shape == (96, 128) and m.segments
        counts = np.bincount(ids.ravel())
        assert all(s.area == counts[s.id] for s in m.segments)
        assert (m.input_height, m.input_width) == (256, 341) and m.model_name == "tiny"
    [(_, c2)] = list(read_messages(out, "/cam2/panoptic/segments"))
    assert (c2.id_image.height, c2.id_image.width, c2.header.frame_id) == (64, 96, "cam2")
    overlays = list(read_messages(out, "/camera/panoptic/overlay"))
    assert len(overlays) == 3 and overlays[0][1].encoding == "bgr8"
    [(_, cats)] = list(read_messages(out, "/panoptic/categories"))
    assert len(cats.categories) == len(pred.categories)
    palette = category_colors(pred.categories)
    assert round(cats.categories[0].color.g * 255) == palette[cats.categories[0].id][1], "the overlay's colours"
    assert summary.outputs == ["/cam2/panoptic/segments", "/cam2/panoptic/overlay", "/camera/panoptic/segments",
                               "/camera/panoptic/overlay", "/panoptic/categories"]


def test_outputs_follow_the_nodes_names_under_a_namespace(input_bag, tmp_path):
    from ciae_ros.bag import plan_bag_file

    plan = plan_bag_file(input_bag, namespace="offline/")
    assert plan.cameras == {"/cam2/image_raw": "/offline/cam2/", "/camera/image_raw": "/offline/camera/"}
    assert plan.categories_topic == "/offline/panoptic/categories" and plan.frames == 5
    one = plan_bag_file(input_bag, topics=["/camera/image_raw"], overlay=False)
    assert one.outputs == ["/panoptic/segments", "/panoptic/categories"], "one camera: as the node in the root"
    assert plan_bag_file(input_bag, topics=["/cam2/image_raw"], namespace="/x").outputs == \
        ["/x/panoptic/segments", "/x/panoptic/overlay", "/x/panoptic/categories"]
    with pytest.raises(BagError, match="not a ROS namespace"):
        plan_bag_file(input_bag, namespace="/9lives")


def test_only_camera_images_are_inputs_and_a_camera_is_read_once(tmp_path):
    from ciae_ros.bag import plan_bag_file

    path = tmp_path / "b"
    with BagWriter(path) as bag:
        img = _image(0)
        for topic in ("/front/image_raw", "/panoptic/overlay", "/front/panoptic/overlay", "/panoptic/confidence",
                      "/front/depth/image_raw", "/front/aligned_depth_to_color/image_raw"):
            bag.write_msg(topic, img, 1)
        c = CompressedImage(format="jpeg", data=array.array("B", b"x"))
        bag.write_msg("/front/image_raw/compressed", c, 2)
        bag.write_msg("/rear/image_raw/compressed", c, 2)
    plan = plan_bag_file(path, namespace="/offline")
    assert plan.inputs == [("/front/image_raw", "sensor_msgs/msg/Image"),
                           ("/rear/image_raw/compressed", "sensor_msgs/msg/CompressedImage")]
    named = plan_bag_file(path, topics=["/front/image_raw/compressed"], namespace="/offline")
    assert named.inputs == [("/front/image_raw/compressed", "sensor_msgs/msg/CompressedImage")]
    assert named.outputs[0] == "/offline/panoptic/segments"
    with pytest.raises(BagError, match="output of the panoptic node"):
        plan_bag_file(path, topics=["/front/panoptic/overlay"])
    with pytest.raises(BagError, match="no such image topic.*/front/image_raw"):
        plan_bag_file(path, topics=["/left/image_raw"])
    with pytest.raises(BagError, match="already has /panoptic/overlay"):  # recorded topics are never written into
        plan_bag_file(path, topics=["/front/image_raw"])
    with pytest.raises(BagError, match="already has /front/panoptic/overlay"):
        plan_bag_file(path)
    assert plan_bag_file(path, topics=["/front/image_raw"], namespace="/offline").inputs == \
        [("/front/image_raw", "sensor_msgs/msg/Image")]


# ----------------------------------------------------------------------------------------------
# ciae-bag as a user runs it: `python -m ciae_ros.bag` in its own process
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_bag(tmp_path_factory):
    """A bag as ciae-demo records it: camera frames plus the live node's outputs."""
    from std_msgs.msg import Header

    from ciae_core.structures import PanopticResult, segments_from_id_map
    from ciae_ros.conversions import categories_msg, segments_msg

    path = tmp_path_factory.mktemp("bags") / "demo"
    ids = np.zeros((96, 128), np.int32)
    ids[10:40, 10:40] = 1
    live = PanopticResult(id_map=ids, segments=segments_from_id_map(ids, {1: (1, "disc", True, 0.9)}))
    with BagWriter(path) as bag:
        bag.write_msg("/panoptic/categories", categories_msg([], "live", Header()), 500_000_000)
        for k in range(3):
            ts = 1_000_000_000 * (k + 1)
            cam = _image(k)
            bag.write_msg("/camera/image_raw", cam, ts)
            bag.write_msg("/panoptic/segments", segments_msg(live, cam.header, "live"), ts + 1000)
            bag.write_msg("/panoptic/overlay", _image(k + 10), ts + 1000)
    return path


def _bag_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ciae_ros.bag", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=child_env())


def test_ciae_bag_refuses_to_write_into_recorded_topics(demo_bag, tmp_path):
    """The reported case: --topics /camera/image_raw wrote offline results into the recorded
    /panoptic/segments (every stamp twice). Now: one line, exit 1, before the model is loaded."""
    for extra in ([], ["--topics", "/camera/image_raw"]):
        r = _bag_cli("--in", demo_bag, "--out", tmp_path / "o", "--weights", tmp_path / "never_loaded.safetensors",
                     *extra)
        assert r.returncode == 1, r.stderr
        [line] = r.stderr.strip().splitlines()
        assert "/panoptic/segments" in line and "--namespace /offline" in line, line
        assert not (tmp_path / "o").exists()
    r = _bag_cli("--in", demo_bag, "--out", tmp_path / "o", "--topics", "/panoptic/overlay")
    assert r.returncode == 1 and "output of the panoptic node" in r.stderr


def test_ciae_bag_writes_beside_the_live_results_under_a_namespace(demo_bag, node_weights, tmp_path):
    out = tmp_path / "offline"
    r = _bag_cli("--in", demo_bag, "--out", out, "--weights", node_weights, "--input-size", "256",
                 "--namespace", "/offline")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "frame/s" not in r.stderr, "no progress bar when stderr is not a terminal"
    [line] = r.stdout.strip().splitlines()
    assert line.startswith("ciae-bag: 3 frame(s) read from /camera/image_raw, 3 segmented, 0 skipped; ")
    assert ("wrote /offline/panoptic/segments, /offline/panoptic/overlay, /offline/panoptic/categories to "
            f"{out} (offline.mcap)") in line
    topics = {c for c in _topics(out)}
    assert topics == {"/camera/image_raw", "/panoptic/segments", "/panoptic/overlay", "/panoptic/categories",
                      "/offline/panoptic/segments", "/offline/panoptic/overlay", "/offline/panoptic/categories"}
    live = [ts for ts, _ in read_messages(out, "/panoptic/segments")]
    offline = list(read_messages(out, "/offline/panoptic/segments"))
    assert len(live) == 3 and [ts for ts, _ in offline] == [1_000_000_000, 2_000_000_000, 3_000_000_000]
    assert {m.model_name for _, m in offline} == {pathlib.Path(node_weights).stem}


def test_ciae_bag_shows_a_progress_bar_on_a_terminal(demo_bag, node_weights, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    def run(out, *extra) -> tuple[int, str]:
        """ciae-bag with its stderr on a pseudo-terminal, read while it runs; (exit status, stderr)."""
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
        proc = subprocess.Popen([sys.executable, "-m", "ciae_ros.bag", "--in", str(demo_bag), "--out", str(out),
                                 "--weights", node_weights, "--input-size", "256", "--namespace", "/offline",
                                 "--no-overlay", *extra], stdout=subprocess.DEVNULL, stderr=follower, cwd=REPO,
                                env=child_env())
        os.close(follower)
        chunks = []
        try:
            while True:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: the process has exited and everything was read
                    break
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(leader)
        return proc.wait(timeout=600), b"".join(chunks).decode(errors="replace")

    rc, err = run(tmp_path / "a")
    assert rc == 0 and "3/3" in err and "frame/s" in err, err
    rc, err = run(tmp_path / "b", "--quiet")
    assert rc == 0 and "3/3" not in err, err


def test_ciae_bag_help_explains_every_option():
    from ciae_ros.bag import build_parser

    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"


def _topics(path) -> set[str]:
    from rosbags.rosbag2 import Reader

    with Reader(path) as reader:
        return {c.topic for c in reader.connections}


def test_ciae_bag_cli(input_bag, node_weights, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--in", str(input_bag), "--out", str(out), "--weights", node_weights, "--input-size", "256",
                 "--topics", "/camera/image_raw", "--no-overlay"]) == 0
    assert "4 frame(s) read from /camera/image_raw, 3 segmented, 1 skipped (unsupported_encoding 1)" in \
        capsys.readouterr().out
    assert len(list(read_messages(out, "/panoptic/segments"))) == 3
    assert not list(read_messages(out, "/panoptic/overlay"))
    assert main(["--in", str(input_bag), "--out", str(out), "--weights", node_weights]) == 1  # exists
    assert main(["--in", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--weights", node_weights]) == 1


# ----------------------------------------------------------------------------------------------
# tracking (issue 14): track ids as the node gives them, per camera, reset when stamps go back


@pytest.fixture(scope="module")
def moving_bag(tmp_path_factory):
    """Frames 0..5 of a moving 240x320 sequence at 10 Hz, then frames 0..2 again with their old
    stamps (a bag of two recordings: time goes back); ground truth per written frame."""
    from ciae_core.synth_video import TrackingSequence

    seq = TrackingSequence(11, 240, 320, 6, crossings=1, exits=0, side_by_side=0, others=3)
    path = tmp_path_factory.mktemp("bags") / "moving"
    gts = []
    with BagWriter(path) as bag:
        for k, t in enumerate([0, 1, 2, 3, 4, 5, 0, 1, 2]):
            image, gt, _ = seq.frame(t)
            msg = numpy_to_image(image, "rgb8")
            msg.header.stamp.sec, msg.header.stamp.nanosec = 200, 100_000_000 * t
            msg.header.frame_id = "cam"
            bag.write_msg("/camera/image_raw", msg, 1_000_000_000 * (k + 1))
            gts.append(gt)
    return path, gts


def _thing_tracks(m) -> list[int]:
    return [s.track_id for s in m.segments if s.isthing]


def test_ciae_bag_tracks_things_and_starts_new_tracks_when_time_goes_back(moving_bag, node_weights, tmp_path):
    from ciae_core.predictor import Predictor

    path, gts = moving_bag
    pred = Predictor(node_weights, input_size=256)
    summary = process_bag(path, tmp_path / "out", pred, overlay=False)
    segs = [m for _, m in read_messages(tmp_path / "out", "/panoptic/segments")]
    assert len(segs) == 9
    first_run, second_run = segs[:6], segs[6:]
    # a thing keeps its id: the same ground-truth thing under the same track id in consecutive frames
    kept = total = 0
    for (a, ga), (b, gb) in zip(zip(first_run, gts), zip(first_run[1:], gts[1:])):
        owner_a, owner_b = _owners(a, ga), _owners(b, gb)
        for g in owner_a.keys() & owner_b.keys():
            total += 1
            kept += owner_a[g] == owner_b[g]
    assert total >= 10 and kept >= 0.9 * total, (kept, total)
    issued = max(max(_thing_tracks(m), default=0) for m in first_run)
    assert issued >= 3 and all(s.track_id == 0 for m in segs for s in m.segments if not s.isthing)
    # the second recording starts new tracks: confirmed at once (first frame of a run), new ids
    new = [t for t in _thing_tracks(second_run[0]) if t]
    assert new and min(new) > issued, (new, issued)
    assert summary.tracking_resets == {"time_backwards": 1}
    assert summary.tracks == max(max(_thing_tracks(m), default=0) for m in segs)
    assert f"{summary.segments} segment(s), {summary.tracks} track(s) (tracks reset: time_backwards 1); " in \
        summary.line()


def _owners(m, gt) -> dict[int, int]:
    """Ground-truth thing id -> track id of the tracked segment covering most of it (IoU > 0.5)."""
    ids = image_msg_to_array(m.id_image)
    out = {}
    for s in m.segments:
        if s.isthing and s.track_id:
            mask = ids == s.id
            g, n = np.unique(gt[mask], return_counts=True)
            k = int(np.argmax(n))
            if g[k] and n[k] / (mask.sum() + (gt == g[k]).sum() - n[k]) > 0.5:
                out[int(g[k])] = s.track_id
    return out


def test_ciae_bag_without_tracking_and_with_bad_tracking_parameters(moving_bag, node_weights, tmp_path, capsys):
    from ciae_core.predictor import Predictor

    path, _ = moving_bag
    assert main(["--in", str(path), "--out", str(tmp_path / "off"), "--weights", node_weights, "--input-size", "256",
                 "--no-overlay", "--no-tracking", "--quiet"]) == 0
    assert "segment(s), tracking off; wrote" in capsys.readouterr().out
    segs = [m for _, m in read_messages(tmp_path / "off", "/panoptic/segments")]
    assert len(segs) == 9 and all(s.track_id == 0 for m in segs for s in m.segments)
    pred = Predictor(node_weights, input_size=256)
    with pytest.raises(BagError, match="need tracking_low_score <= tracking_high_score"):
        process_bag(path, tmp_path / "bad", pred, tracking_params={"tracking_high_score": 0.9})
    with pytest.raises(BagError, match="unknown tracking parameter input_size"):
        process_bag(path, tmp_path / "bad", pred, tracking_params={"input_size": 256})
    assert not (tmp_path / "bad").exists()


def test_ciae_bag_says_once_that_the_model_is_synthetic_only(input_bag, tmp_path):
    """Through the console entry with its default model (the shipped one, domain synthetic-shapes)."""
    import pathlib
    import subprocess

    from console_scripts import console_command, console_env

    shipped = pathlib.Path(__file__).resolve().parents[2] / "models" / "ciae_synthetic_small.safetensors"
    res = subprocess.run([*console_command("ciae-bag"), "--in", str(input_bag), "--out", str(tmp_path / "out"),
                          "--input-size", "256", "--topics", "/camera/image_raw", "--no-overlay"],
                         env=console_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    warned = [ln for ln in (res.stdout + res.stderr).splitlines() if "synthetic-only model" in ln]
    if shipped.is_file():
        assert len(warned) == 1 and "[WARNING]" in warned[0] and "it knows disc, box, triangle" in warned[0], warned
    else:
        assert not warned
