"""``ciae-predict`` (ciae_core/cli/predict.py): COCO-panoptic output scorable by the PQ tool, one-line errors."""

from __future__ import annotations

import json
import pathlib
import sys

import cv2
import numpy as np
import pytest

from ciae_core.cli.predict import main

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from test_predictor import SAMPLE_IMAGES, tiny_model_path  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> pathlib.Path:
    return tiny_model_path(tmp_path_factory.mktemp("model"))


def test_ciae_predict_writes_scorable_coco_panoptic(weights, tmp_path, capsys):
    from ciae_core.evaluation import pq_compute

    out = tmp_path / "pred"
    rc = main(["--weights", str(weights), "--images", str(SAMPLE_IMAGES), "--out", str(out), "--input-size", "256",
               "--batch-size", "2", "--score-threshold", "0.0"])
    assert rc == 0
    doc = json.loads((out / "panoptic.json").read_text())
    assert len(doc["annotations"]) == len(list(SAMPLE_IMAGES.glob("*.jpg")))
    for ann in doc["annotations"]:
        png = cv2.imread(str(out / "panoptic" / ann["file_name"]), cv2.IMREAD_COLOR)[..., ::-1].astype(np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        assert sorted(s["id"] for s in ann["segments_info"]) == sorted(int(v) for v in np.unique(ids) if v)
        for s in ann["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum())
    # scoring the predictions against themselves with the PQ tool gives PQ = 1
    summary = pq_compute(str(out / "panoptic.json"), str(out / "panoptic.json"), str(out / "panoptic"),
                         str(out / "panoptic"))
    assert summary["All"]["pq"] == pytest.approx(1.0)
    assert "ms/image" in capsys.readouterr().out


def test_ciae_predict_errors_are_one_line(tmp_path, capsys):
    rc = main(["--weights", str(tmp_path / "missing.safetensors"), "--images", str(SAMPLE_IMAGES),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "not found" in err
