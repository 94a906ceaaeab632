"""ciae-bench (ciae_core.cli.bench): a tiny real run (one size, one repeat, small model), option
checks, and `--node` through the entry point the ROS layer registers."""

from __future__ import annotations

import json

import pytest
import torch

from ciae_core.cli.bench import main


def test_tiny_bench_run_writes_expected_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--device", "cpu", "--sizes", "192", "--backbones", "small", "--repeats", "1", "--warmup", "0",
               "--detections", "5", "--threads", "1", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"meta", "results", "ratios"}
    assert {"device", "threads", "precision", "repeats", "warmup", "detections", "torch"} <= set(doc["meta"])
    got = {(r["model"], r["engine"]) for r in doc["results"]}
    assert got == {("ours", "torch"), ("ours", "onnxruntime"), ("fcos", "torch"), ("maskrcnn", "torch")}
    # the CPU default memory format (the Predictor's: channels_last), for ours and the peers alike
    assert doc["meta"]["channels_last"] is True
    assert all(r["channels_last"] is True for r in doc["results"] if r["engine"] == "torch")
    for r in doc["results"]:
        assert r["backbone"] == "small" and r["size"] == 192
        assert r["repeats"] == 1 and r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"]
        assert r["peak_mem_mb"] > 0 and r["mem_kind"] == "rss"
    ours = next(r for r in doc["results"] if r["model"] == "ours" and r["engine"] == "torch")
    assert set(ours["stages_ms"]) == {"resize_copy", "backbone_fpn", "heads", "proposal_selection", "fusion",
                                      "map_back_copy"}
    assert all(v >= 0 for v in ours["stages_ms"].values())
    (ratio,) = doc["ratios"]
    for k in ("ours_over_fcos", "fusion_share", "ort_over_torch", "ours_over_maskrcnn"):
        assert ratio[k] is not None and ratio[k] > 0, k
    assert 0 < ratio["fusion_share"] < 1.5  # eager fusion stage over the end-to-end median
    printed = capsys.readouterr().out
    assert "| small | 192 |" in printed and "ours/FCOS" in printed


def test_channels_last_option_applies_to_ours_and_the_peers(tmp_path):
    from ciae_core.bench_contenders import channels_last_for

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert channels_last_for("auto", cpu) and not channels_last_for("auto", cuda)
    assert channels_last_for("on", cuda) and not channels_last_for("off", cpu)
    out = tmp_path / "nchw.json"
    assert main(["--device", "cpu", "--sizes", "192", "--backbones", "small", "--repeats", "1", "--warmup", "0",
                 "--detections", "5", "--threads", "1", "--engines", "torch", "--models", "ours,fcos",
                 "--channels-last", "off", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["channels_last"] is False
    assert [r["channels_last"] for r in doc["results"]] == [False, False]


def test_bench_rejects_bad_options(tmp_path, capsys):
    assert main(["--backbones", "vgg", "--json", str(tmp_path / "x.json")]) == 1
    assert "unknown backbone" in capsys.readouterr().err
    assert main(["--models", "yolo", "--json", str(tmp_path / "x.json")]) == 1
    assert "unknown model" in capsys.readouterr().err
    assert main(["--device", "cpu", "--precision", "fp16", "--json", str(tmp_path / "x.json")]) == 1
    assert "fp16 needs CUDA" in capsys.readouterr().err


def _distribution(root, name, entry_points_txt):
    """A real installed-package record (``<name>-0.0.dist-info``) under ``root``: what pip writes,
    with the given entry_points.txt, found by importlib.metadata once ``root`` is on sys.path."""
    info = root / f"{name}-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(entry_points_txt)


def test_node_mode_dispatches_to_the_ros_node_benchmark(capsys, tmp_path, monkeypatch):
    """`ciae-bench --node` runs ciae_ros.bench_node through the entry point the ROS layer registers
    (group ciae_core.bench_plugins, as setup.py declares it; here a distribution in tmp_path, so the
    test does not depend on how fresh the installed metadata is). ciae_core never imports it."""
    pytest.importorskip("rclpy")
    from ciae_core.cli import bench

    _distribution(tmp_path, "ciae_bench_plugin_probe", "[ciae_core.bench_plugins]\nnode = ciae_ros.bench_node:main\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert bench.bench_plugin("node").value == "ciae_ros.bench_node:main"
    with pytest.raises(SystemExit) as exc:
        bench.main(["--node", "--help"])
    assert exc.value.code == 0
    assert "ciae-bench --node" in capsys.readouterr().out


def test_unavailable_onnxruntime_provider_fails_only_its_row(tmp_path):
    """--ort-providers naming a provider this onnxruntime build cannot run (ROCm is not in it) used to
    abort the whole benchmark with the PredictorError; now it is the onnxruntime row's error and the
    other rows are measured."""
    import onnxruntime

    assert "ROCMExecutionProvider" not in onnxruntime.get_available_providers()
    out = tmp_path / "bench.json"
    rc = main(["--device", "cpu", "--sizes", "192", "--backbones", "small", "--models", "ours,fcos", "--repeats", "1",
               "--warmup", "0", "--detections", "5", "--threads", "1", "--ort-providers", "rocm", "--json", str(out)])
    assert rc == 0
    rows = {(r["model"], r["engine"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {("ours", "torch"), ("ours", "onnxruntime"), ("fcos", "torch")}
    assert "PredictorError" in rows["ours", "onnxruntime"]["error"] and "'rocm'" in rows["ours", "onnxruntime"]["error"]
    for key in (("ours", "torch"), ("fcos", "torch")):
        assert "error" not in rows[key] and rows[key]["median_ms"] > 0
        assert rows[key]["mem_kind"] == "rss" and "mem_note" not in rows[key]  # no CUDA graphs on the CPU


def test_node_mode_without_the_ros_layer_fails_with_one_line(capsys, tmp_path, monkeypatch):
    """With no package registering the `node` plugin (ciae_core installed alone) --node says so in
    one line and exits 2; a registered plugin that cannot be imported (no rclpy, messages not built)
    also exits 2 with one line. Only the metadata search path is narrowed (to tmp_path)."""
    import sys

    from ciae_core.cli import bench

    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert bench.bench_plugin("node") is None
    assert main(["--node", "--frames", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no ROS layer registered" in err and "ciae_ros" in err
    _distribution(tmp_path, "ciae_bench_plugin_broken", "[ciae_core.bench_plugins]\nnode = ciae_no_such_module:main\n")
    assert main(["--node"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs rclpy and the built ciae_ros messages" in err
