"""OpenVINO IR files with ciae metadata: round trip, atomic pair, checked read."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("openvino")

from ciae_core.export import ExportError  # noqa: E402
from ciae_core.openvino_ir import IR_FORMAT, config_from_metadata, read_ir, write_ir  # noqa: E402


def tiny_model(seed: int = 0):
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 3, 8, 8], np.float32, name="images")
    w = ops.constant(np.random.default_rng(seed).standard_normal((4, 3, 3, 3)).astype(np.float32))
    return ov.Model([ops.relu(ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1]))], [x])


def test_round_trip_keeps_metadata_and_fp32_weights(tmp_path):
    import openvino as ov

    model = tiny_model()
    out = write_ir(model, tmp_path / "m.xml", {"ciae_precision": "int8", "ciae_note": 'quotes " and <tags>'})
    assert out == str(tmp_path / "m.xml") and (tmp_path / "m.bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]  # no temporary file left
    back, meta = read_ir(out)
    assert meta["ciae_format"] == IR_FORMAT and meta["ciae_precision"] == "int8"
    assert meta["ciae_note"] == 'quotes " and <tags>' and len(meta["ciae_bin_sha256"]) == 64
    x = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    core = ov.Core()
    a = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: x})[0]
    b = core.compile_model(back, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: x})[0]
    assert np.array_equal(a, b)  # compress_to_fp16=False: the weights are bit-exact


def test_missing_empty_and_foreign_files(tmp_path):
    import openvino as ov

    with pytest.raises(ExportError, match="IR file not found"):
        read_ir(tmp_path / "none.xml")
    write_ir(tiny_model(), tmp_path / "m.xml", {})
    os.remove(tmp_path / "m.bin")
    with pytest.raises(ExportError, match=r"weights file .*not found.*m\.bin"):
        read_ir(tmp_path / "m.xml")
    (tmp_path / "e.xml").write_text("")
    (tmp_path / "e.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match="e.xml is empty"):
        read_ir(tmp_path / "e.xml")
    (tmp_path / "g.xml").write_text("<net>not really</net>")
    (tmp_path / "g.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ExportError, match="g.xml is corrupt, truncated or not an OpenVINO IR") as e:
        read_ir(tmp_path / "g.xml")
    assert "\n" not in str(e.value)
    ov.save_model(tiny_model(), str(tmp_path / "plain.xml"))
    with pytest.raises(ExportError, match="not a ciae OpenVINO IR"):
        read_ir(tmp_path / "plain.xml")


def test_a_bin_that_does_not_belong_to_the_xml_is_refused(tmp_path):
    """Same layout, other weights (another model, or a reader between the two renames), and a
    flipped byte: the recorded hash catches both where OpenVINO would load silently."""
    write_ir(tiny_model(0), tmp_path / "a.xml", {})
    write_ir(tiny_model(1), tmp_path / "b.xml", {})
    os.replace(tmp_path / "b.bin", tmp_path / "a.bin")
    with pytest.raises(ExportError, match=r"a\.bin does not belong to a\.xml"):
        read_ir(tmp_path / "a.xml")
    write_ir(tiny_model(0), tmp_path / "c.xml", {})
    data = bytearray((tmp_path / "c.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "c.bin").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="does not belong"):
        read_ir(tmp_path / "c.xml")


def test_unwritable_destination_is_one_line_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match=r"cannot write .*file exists and is not a directory"):
        write_ir(tiny_model(), blocker / "m.xml", {})
    with pytest.raises(ExportError, match="must end in .xml"):
        write_ir(tiny_model(), tmp_path / "m.onnx", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_overwrite_replaces_both_files(tmp_path):
    write_ir(tiny_model(0), tmp_path / "m.xml", {"ciae_note": "first"})
    write_ir(tiny_model(1), tmp_path / "m.xml", {"ciae_note": "second"})
    _, meta = read_ir(tmp_path / "m.xml")
    assert meta["ciae_note"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]


def test_config_from_metadata_errors(tmp_path):
    with pytest.raises(ExportError, match="no 'ciae_config'"):
        config_from_metadata({}, tmp_path / "m.xml")
    with pytest.raises(ExportError, match="invalid 'ciae_config'"):
        config_from_metadata({"ciae_config": "{not json"}, tmp_path / "m.xml")
