"""ciae_core.bench: the benchmark's inputs and the labels of its memory measurements."""

from __future__ import annotations

from ciae_core.bench_report import markdown_tables, ratios


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
