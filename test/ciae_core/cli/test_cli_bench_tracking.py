"""``ciae-bench --tracking`` (ciae_core/cli/bench_tracking.py): a tiny run end to end and its errors."""

import json
import pathlib

import pytest

from ciae_core.cli.bench import main

REPO = pathlib.Path(__file__).resolve().parents[3]


@pytest.mark.skipif(not sorted((REPO / "models").glob("*.safetensors")), reason="no shipped model in models/")
def test_tiny_tracking_benchmark(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["--tracking", "--seeds", "5", "--frames", "4", "--size", "96x128", "--variants", "iou,emb+iou",
                 "--timing-frames", "8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| association | IDF1 |" in text and "| iou |" in text and "| emb+iou |" in text
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {"iou", "emb+iou"} and report["seeds"] == [5]
    assert report["timing_30"]["segments_per_frame"] >= 25 and report["timing_30"]["emb+iou"] > 0
    assert report["rows"]["iou"]["num_frames"] == 4


def test_tracking_benchmark_bad_options(capsys):
    assert main(["--tracking", "--variants", "color"]) == 1
    assert "--variants" in capsys.readouterr().err
    assert main(["--tracking", "--size", "big"]) == 1
