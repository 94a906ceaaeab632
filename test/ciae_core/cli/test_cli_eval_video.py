"""``ciae-eval --video`` (ciae_core/cli/eval_video.py): the shipped model tracked over a written sequence."""

import json
import pathlib

import pytest

from ciae_core.cli.eval import main
from ciae_core.cli.eval_video import find_sequences
from ciae_core.evaluation import EvaluationError
from ciae_core.synth_video import write_tracking_sequence

REPO = pathlib.Path(__file__).resolve().parents[3]
SHIPPED = sorted((REPO / "models").glob("*.safetensors"))


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    for seed in (3, 4):
        write_tracking_sequence(str(root / f"seq{seed}"), 5, 96, 128, seed=seed, crossings=1, exits=0,
                                side_by_side=0, others=2, min_size=16)
    return root


@pytest.mark.skipif(not SHIPPED, reason="no shipped model in models/")
@pytest.mark.parametrize("association", ["embedding", "iou"])
def test_video_evaluation_of_the_shipped_model(sequences, tmp_path, capsys, association):
    out = tmp_path / "video.json"
    argv = ["--weights", str(SHIPPED[0]), "--video", str(sequences), "--association", association,
            "--json-out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for name in ("IDF1", "MOTA", "VPQ", "STQ", "ID switches"):
        assert name in text
    summary = json.loads(out.read_text())
    assert summary["num_sequences"] == 2 and summary["num_frames"] == 10 and summary["num_gt_tracks"] >= 4
    assert 0.0 <= summary["idf1"] <= 1.0 and 0.0 < summary["per_k"]["0"]["vpq"] <= 1.0
    assert summary["tracker_ms"] > 0


def test_video_errors(sequences, tmp_path, capsys):
    assert find_sequences(str(sequences / "seq3")) == [str(sequences / "seq3")]
    assert len(find_sequences(str(sequences))) == 2
    with pytest.raises(EvaluationError, match="no panoptic.json"):
        find_sequences(str(tmp_path))
    assert main(["--video", str(sequences)]) == 2
    assert "--video needs --weights" in capsys.readouterr().err
