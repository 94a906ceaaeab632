"""ciae-bench: a tiny real run (one size, one repeat, small model) and the report helpers."""

from __future__ import annotations

import json

import pytest
import torch

from ciae_core.bench import main, markdown_tables, ratios, summarize


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
    from ciae_core.bench import channels_last_for

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


def test_summary_and_ratio_arithmetic():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert s["median_ms"] == 5.5 and s["p90_ms"] == 9.0 and s["min_ms"] == 1.0
    rows = [{"backbone": "r50", "size": 512, "model": "ours", "engine": "torch", "median_ms": 30.0, "p90_ms": 31.0,
             "stages_ms": {"a": 20.0, "fusion": 6.0, "b": 5.0}, "peak_mem_mb": 1.0, "mem_delta_mb": 1.0,
             "mem_kind": "rss"},
            {"backbone": "r50", "size": 512, "model": "ours", "engine": "onnxruntime", "median_ms": 15.0,
             "p90_ms": 16.0, "peak_mem_mb": 1.0, "mem_delta_mb": 1.0, "mem_kind": "rss"},
            {"backbone": "r50", "size": 512, "model": "fcos", "engine": "torch", "median_ms": 20.0, "p90_ms": 21.0,
             "peak_mem_mb": 1.0, "mem_delta_mb": 1.0, "mem_kind": "rss"}]
    (r,) = ratios(rows)
    assert r["ours_over_fcos"] == pytest.approx(1.5) and r["ort_over_torch"] == pytest.approx(0.5)
    assert r["fusion_share"] == pytest.approx(6 / 30) and r["ours_over_maskrcnn"] is None
    assert "| r50 | 512 | 30.0 (31.0) | 15.0 (16.0) | 20.0 (21.0) | – |" in markdown_tables(rows, [r])


def test_node_mode_dispatches_to_the_ros_node_benchmark(capsys):
    """`ciae-bench --node` runs ciae_ros.bench_node (imported only in that mode)."""
    pytest.importorskip("rclpy")
    from ciae_core import bench

    with pytest.raises(SystemExit) as exc:
        bench.main(["--node", "--help"])
    assert exc.value.code == 0
    assert "ciae-bench --node" in capsys.readouterr().out


def test_bench_inputs_without_a_checkout(tmp_path, monkeypatch):
    """An installed copy run outside the repository (no test/data reachable) still benchmarks:
    rendered synthetic scenes as inputs and COCO's class counts (80 things, 53 stuff)."""
    import pathlib

    from ciae_core import bench

    assert bench.sample_dir() is not None  # from the source tree
    monkeypatch.setattr(bench, "REPO", pathlib.Path(tmp_path / "site-packages"))
    monkeypatch.chdir(tmp_path)
    assert bench.sample_dir() is None
    images = bench.load_inputs()
    assert len(images) == 2 and images[0].shape == (480, 640, 3) and images[0].dtype.name == "uint8"
    assert images[0].std() > 10  # a rendered scene, not a blank frame
    cats = bench.coco_categories()
    assert sum(c.isthing for c in cats) == 80 and len(cats) == 133
    # a checkout in the working directory is found (an installed ciae-bench run from the repo root)
    repo = pathlib.Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    assert bench.sample_dir() == repo / "test" / "data" / "coco-panoptic-sample"


def test_timed_calls_interleave_models_round_by_round():
    """Every round calls each model once on the same image, the starting model rotating; a model
    that fails is dropped with its error while the others go on."""
    import torch

    from ciae_core.bench import Contender, interleaved_rounds

    log = []

    def model(name, fail_at=None):
        def call(i):
            if i == fail_at:
                raise RuntimeError(f"{name} broke")
            log.append((name, i))
        return Contender(name, "torch", call, {})

    a, b, c = model("a"), model("b"), model("c", fail_at=2)
    failed = interleaved_rounds([a, b, c], torch.device("cpu"), repeats=4)
    assert log[:6] == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1)]
    assert log[6:] == [("a", 2), ("b", 2), ("a", 3), ("b", 3)]  # round 2 starts at c, which fails
    assert [(x.model, str(e)) for x, e in failed] == [("c", "c broke")]
    assert len(a.times) == len(b.times) == 4 and c.times is None and all(t >= 0 for t in a.times)


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


def test_ort_providers_option():
    import torch

    from ciae_core.bench import ort_providers

    assert ort_providers(None, torch.device("cpu")) is None  # the predictor's choice: CPU
    assert ort_providers(None, torch.device("cuda")) == ["cuda"]
    assert ort_providers("tensorrt, cuda", torch.device("cuda")) == ["tensorrt", "cuda"]
    assert ort_providers("cuda", torch.device("cpu")) == ["cuda"]  # passed on: that row fails, visibly


def test_cuda_memory_fields_are_labelled_comparably():
    """No GPU here: the labels of the CUDA memory fields and their table (module docstring). Ours'
    torch row is measured with an eager forward (a CUDA-graph replay's activations are invisible
    to max_memory_allocated) and says so; the onnxruntime row's peak is not measured by torch
    (its arena is invisible) and is null, with torch's share and the device-level delta kept."""
    from ciae_core.bench import EAGER_MEMORY_NOTE, memory_fields

    assert memory_fields("cpu", "onnxruntime", 100.0, 40.0) == {"peak_mem_mb": 100.0, "mem_delta_mb": 40.0,
                                                               "mem_kind": "rss"}
    ours = memory_fields("cuda", "torch", 900.0, 300.0, 350.0, eager_forward=True)
    assert ours["mem_kind"] == "cuda_max_allocated" and ours["mem_note"] == EAGER_MEMORY_NOTE
    assert "eagerly" in ours["mem_note"] and ours["device_used_delta_mb"] == 350.0
    peer = memory_fields("cuda", "torch", 800.0, 250.0, 260.0)
    assert peer["mem_kind"] == "cuda_max_allocated" and "mem_note" not in peer
    ort = memory_fields("cuda", "onnxruntime", 60.0, 20.0, 500.0)
    assert ort["mem_kind"] == "not_measured_by_torch" and ort["peak_mem_mb"] is None and ort["mem_delta_mb"] is None
    assert ort["torch_alloc_peak_mb"] == 60.0 and ort["device_used_delta_mb"] == 500.0
    assert "invisible to torch" in ort["mem_note"]
    base = {"backbone": "r50", "size": 512, "median_ms": 10.0, "p90_ms": 11.0}
    rows = [dict(base, model="ours", engine="torch", **ours), dict(base, model="ours", engine="onnxruntime", **ort),
            dict(base, model="fcos", engine="torch", **peer)]
    table = markdown_tables(rows, ratios(rows))
    assert "| r50 | 512 | ours | torch | 900 | 300 | cuda max allocated (eager forward) | 350 |" in table
    assert "| r50 | 512 | ours | onnxruntime | – | – | not measured by torch | 500 |" in table
    assert "| r50 | 512 | fcos | torch | 800 | 250 | cuda max allocated | 260 |" in table
