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


def test_ciae_predict_says_once_that_a_model_is_synthetic_only(tmp_path):
    """Through the console entry: the shipped model (domain synthetic-shapes) gets one warning line
    naming what it knows and where to go for real scenes; the same weights saved without a domain
    (unknown) get none."""
    import subprocess

    from ciae_core.checkpoint import load_model, save_model
    from console_scripts import console_command, console_env

    shipped = pathlib.Path(__file__).resolve().parents[3] / "models" / "ciae_synthetic_small.safetensors"
    net = load_model(shipped)
    net.domain = None
    unknown = save_model(tmp_path / "no_domain.safetensors", net)
    runs = {}
    for name, model in (("shipped", shipped), ("unknown", unknown)):
        res = subprocess.run([*console_command("ciae-predict"), "--weights", str(model), "--images",
                              str(sorted(SAMPLE_IMAGES.glob("*.jpg"))[0]), "--out", str(tmp_path / name),
                              "--input-size", "256"], env=console_env(OMP_NUM_THREADS="1"), capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        runs[name] = [ln for ln in res.stderr.splitlines() if "synthetic-only model" in ln]
    assert len(runs["shipped"]) == 1 and runs["shipped"][0].startswith("WARNING"), runs
    assert ("ciae_synthetic_small.safetensors: synthetic-only model: it knows disc, box, triangle, ring, sky, wall, "
            "ground in rendered scenes; on real images its segments are meaningless; train on COCO for real scenes: "
            "see README 'Train a real-scene model'") in runs["shipped"][0]
    assert runs["unknown"] == []
