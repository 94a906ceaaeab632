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


def test_engine_precision_rows_and_their_table(tmp_path, capsys):
    """--engines with OpenVINO and precisions: each spec is a row of ours, labelled with the precision
    the predictor ran, and the engine table gives its speed-up over torch fp32."""
    pytest.importorskip("openvino")
    out = tmp_path / "engines.json"
    assert main(["--device", "cpu", "--sizes", "192", "--backbones", "small", "--models", "ours", "--repeats", "1",
                 "--warmup", "0", "--detections", "5", "--threads", "1", "--engines", "torch,openvino",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["engine"]: r for r in doc["results"]}
    assert set(rows) == {"torch", "openvino"}
    assert rows["openvino"]["precision"] == "fp32" and rows["openvino"]["providers"][0].startswith("OpenVINO")
    assert {"preprocess", "forward", "postprocess"} <= set(rows["openvino"]["predictor_timings_ms"])
    assert doc["meta"]["openvino"] and doc["meta"]["cpu_features"]
    printed = capsys.readouterr().out
    assert "x torch fp32" in printed and "| small | 192 | openvino | fp32 |" in printed


def test_bench_rejects_unknown_engine_specs(tmp_path, capsys):
    assert main(["--engines", "tensorflow", "--json", str(tmp_path / "x.json")]) == 1
    assert "unknown engine 'tensorflow'" in capsys.readouterr().err
    assert main(["--engines", "openvino:fp8", "--json", str(tmp_path / "x.json")]) == 1
    assert "engine openvino has no precision 'fp8'" in capsys.readouterr().err
    assert main(["--engines", "onnxruntime:bf16", "--json", str(tmp_path / "x.json")]) == 1
    assert "has no precision 'bf16'" in capsys.readouterr().err


def test_spatial_mode_rows_with_and_without_the_ros_layer(capsys, tmp_path, monkeypatch):
    """`ciae-bench --spatial`: the 3-D row always (ciae_core), the point cloud row through the
    entry point `spatial` the ROS layer registers (a distribution record in tmp_path, as in the
    --node tests); without it one line says why. Timings are not asserted (a loaded machine)."""
    import sys

    from ciae_core.cli import bench

    out = tmp_path / "s.json"
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    _distribution(tmp_path, "ciae_bench_spatial_probe",
                  "[ciae_core.bench_plugins]\nspatial = ciae_ros.point_cloud:bench_rows\n")
    have_ros = True
    try:
        import rclpy  # noqa: F401
    except ImportError:
        have_ros = False
    assert bench.main(["--spatial", "--repeats", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    names = [r["row"] for r in doc["rows"]]
    assert names[0] == "3-D per segment (SegmentDepth)" and "| 3-D per segment (SegmentDepth) |" in text
    assert "load average" in text and len(doc["load_average"]) == 3
    if have_ros:
        assert names[1] == "point cloud (panoptic/points)" and "19200 points" in doc["rows"][1]["setup"]
    for r in doc["rows"]:
        assert 0 < r["min_ms"] <= r["median_ms"] and r["target_ms"] == 3.0
    monkeypatch.setattr(sys, "path", [str(tmp_path / "empty")])  # no package registers `spatial`
    assert bench.bench_plugin("spatial") is None
    assert bench.main(["--spatial", "--repeats", "2"]) == 0
    assert "no ROS layer registered" in capsys.readouterr().out


def test_cuda_graph_paths_give_one_row_each(tmp_path, capsys):
    """--cuda-graphs forward,full: one ours row per path (on the CPU both run without graphs and
    say so); an unknown path is refused with one line."""
    out = tmp_path / "paths.json"
    assert main(["--device", "cpu", "--sizes", "128", "--backbones", "small", "--repeats", "1", "--warmup", "0",
                 "--detections", "5", "--threads", "1", "--engines", "torch", "--models", "ours",
                 "--cuda-graphs", "forward,full", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["engine"], r["cuda_graphs"]) for r in doc["results"]] == [("torch", "off"), ("torch/full", "off")]
    assert doc["meta"]["ours_graph_modes"] == ["forward", "full"]
    assert "| ours variant |" in capsys.readouterr().out
    assert main(["--cuda-graphs", "always", "--json", str(tmp_path / "x.json")]) == 1
    assert "--cuda-graphs takes" in capsys.readouterr().err
