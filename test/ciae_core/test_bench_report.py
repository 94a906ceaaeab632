"""ciae_core.bench_report: summary statistics, ratios and the latency table."""

from __future__ import annotations

import pytest

from ciae_core.bench import summarize
from ciae_core.bench_report import markdown_tables, ratios


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
