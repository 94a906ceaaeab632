"""``ciae-export`` (ciae_core/cli/export.py): a fixed-size export with its metadata, one-line errors, --help."""

from __future__ import annotations

import os
import pathlib
import sys

import onnx
import pytest

from ciae_core.checkpoint import load_model
from ciae_core.cli.export import main
from ciae_core.export import OUTPUT_NAMES, ExportError, read_onnx_config, read_onnx_metadata

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from test_export import _write  # noqa: E402
from test_predictor import tiny_model_path  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> pathlib.Path:
    return tiny_model_path(tmp_path_factory.mktemp("model"))


def test_export_fixed_size_checker_and_metadata(weights, tmp_path):
    out = tmp_path / "fixed.onnx"
    assert main(["--weights", str(weights), "--out", str(out), "--size", "320x256", "--opset", "17"]) == 0
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 256, 320]
    meta = read_onnx_metadata(out)
    assert meta["ciae_input_size"] == "320x256" and meta["ciae_format"] == "ciae-onnx/2"
    cfg = read_onnx_config(out)
    model = load_model(weights)
    assert cfg.to_dict() == model.config.to_dict()
    assert len(cfg.categories) == len(model.categories)


def test_export_cli_errors(weights, tmp_path, capsys):
    assert main(["--weights", str(weights), "--out", str(tmp_path / "a.onnx"), "--size", "320x250"]) == 1
    assert "multiples of 32" in capsys.readouterr().err
    assert main(["--weights", str(weights), "--out", str(tmp_path / "a.onnx"), "--opset", "7"]) == 1
    assert "opset 7" in capsys.readouterr().err
    assert main(["--weights", str(weights), "--out", str(tmp_path / "a.txt")]) == 1
    assert ".onnx" in capsys.readouterr().err
    bad = _write(tmp_path / "bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert main(["--weights", str(bad), "--out", str(tmp_path / "b.onnx")]) == 1
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "a.onnx") and not os.path.exists(tmp_path / "b.onnx")
    with pytest.raises(ExportError, match="not found"):
        read_onnx_metadata(tmp_path / "none.onnx")


def test_export_below_a_regular_file_is_a_one_line_error(weights, tmp_path, capsys):
    """--out /x/afile/m.onnx where afile is a regular file: one line naming it, no traceback."""
    afile = _write(tmp_path / "afile", b"not a directory")
    assert main(["--weights", str(weights), "--out", str(afile / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ciae-export: error: ") and err.count("\n") == 1, err
    assert f"{afile} exists and is not a directory" in err and "Traceback" not in err
    assert main(["--weights", str(weights), "--out", str(afile / "sub" / "m.onnx")]) == 1
    assert f"{afile} exists and is not a directory" in capsys.readouterr().err


def test_export_help_states_the_opset_range(capsys):
    from ciae_core.export import DEFAULT_OPSET, OPSET_RANGE

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "WIDTHxHEIGHT" in out
    assert f"{OPSET_RANGE[0]}..{OPSET_RANGE[1]} (default {DEFAULT_OPSET})" in out
