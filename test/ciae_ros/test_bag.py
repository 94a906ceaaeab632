"""MCAP recording with our message types, and ``ciae-bag`` over a recorded bag (no DDS)."""

from __future__ import annotations

import array

import numpy as np
import pytest

pytest.importorskip("ciae_ros.msg")
pytest.importorskip("rosbags")

from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from ciae_core.synth import render_scene  # noqa: E402
from ciae_ros.bag import BagError, BagWriter, main, process_bag, read_messages  # noqa: E402
from ciae_ros.image_conversion import image_msg_to_array, numpy_to_image  # noqa: E402


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

    pred = Predictor(node_weights, input_size=256)
    summary = process_bag(input_bag, tmp_path / "out", pred, model_name="tiny")
    assert summary["frames"] == 4 and summary["bad"] == {"unsupported_encoding": 1}
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


def test_ciae_bag_cli(input_bag, node_weights, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--in", str(input_bag), "--out", str(out), "--weights", node_weights, "--input-size", "256",
                 "--topics", "/camera/image_raw", "--no-overlay"]) == 0
    assert "3 frame(s) processed" in capsys.readouterr().out
    assert len(list(read_messages(out, "/panoptic/segments"))) == 3
    assert not list(read_messages(out, "/panoptic/overlay"))
    assert main(["--in", str(input_bag), "--out", str(out), "--weights", node_weights]) == 1  # exists
    assert main(["--in", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--weights", node_weights]) == 1


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
