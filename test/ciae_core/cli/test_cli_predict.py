"""``ciae-predict`` (ciae_core/cli/predict.py): COCO-panoptic output scorable by the PQ tool, one-line
errors, the shipped model by default, bad files skipped and counted, --vis overlays."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from ciae_core.cli.predict import build_parser, main

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from test_predictor import SAMPLE_IMAGES, tiny_model_path  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[3]


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


def _predict(*args) -> subprocess.CompletedProcess:
    """``ciae-predict`` as a user runs it: a new process through the command's module entry."""
    return subprocess.run([sys.executable, "-m", "ciae_core.cli.predict", *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> pathlib.Path:
    """Two synthetic scenes, a corrupt JPEG, an image too small for the model and a text file."""
    from ciae_core.synth import render_scene

    folder = tmp_path_factory.mktemp("mixed")
    for k in range(2):
        cv2.imwrite(str(folder / f"scene{k}.png"), render_scene(k, 240, 320)[0][:, :, ::-1])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cv2.imwrite(str(folder / "tiny.png"), np.zeros((4, 4, 3), np.uint8))  # below the 8-px minimum
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_bad_files_are_skipped_named_and_counted(mixed_folder, tmp_path):
    """Default --weights (the shipped model); one corrupt image no longer fails the folder."""
    r = _predict("--images", mixed_folder, "--out", tmp_path / "pred", "--input-size", "256")
    assert r.returncode == 0, r.stderr
    assert "broken.jpg" in r.stderr and "tiny.png" in r.stderr and "notes.txt" in r.stderr
    assert "skipped 1 unreadable (broken.jpg), 1 unusable (tiny.png), 1 not an image" in r.stdout
    doc = json.loads((tmp_path / "pred" / "panoptic.json").read_text())
    assert sorted(im["file_name"] for im in doc["images"]) == ["scene0.png", "scene1.png"]
    r = _predict("--images", mixed_folder, "--out", tmp_path / "strict", "--input-size", "256", "--strict")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # (libjpeg says "Premature end of JPEG file" before it)
    assert last.startswith("ciae-predict: error: ") and "broken.jpg" in last and "--strict" in last
    assert not (tmp_path / "strict" / "panoptic.json").exists()


def test_vis_writes_the_shared_overlay_per_image(mixed_folder, tmp_path):
    from ciae_core.structures import CategoryInfo, PanopticResult, Segment
    from ciae_core.visualize import render_overlay

    out, vis = tmp_path / "pred", tmp_path / "vis"
    r = _predict("--images", mixed_folder, "--out", out, "--vis", vis, "--input-size", "256")
    assert r.returncode == 0, r.stderr
    assert f"2 overlay(s) to {vis}" in r.stdout
    assert sorted(p.name for p in vis.iterdir()) == ["scene0.png", "scene1.png"]
    doc = json.loads((out / "panoptic.json").read_text())
    cats = [CategoryInfo.from_dict(c) for c in doc["categories"]]
    names = {c.id: c.name for c in cats}
    for ann in doc["annotations"]:  # the overlay is render_overlay of the written result
        png = cv2.imread(str(out / "panoptic" / ann["file_name"]), cv2.IMREAD_COLOR)[..., ::-1].astype(np.int64)
        ids = (png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]).astype(np.int32)
        segs = [Segment(s["id"], s["category_id"], names[s["category_id"]], bool(s["isthing"]), s["score"],
                        s["area"], tuple(s["bbox"])) for s in ann["segments_info"]]
        image = cv2.imread(str(mixed_folder / ann["file_name"]))[..., ::-1]
        expected = render_overlay(image, PanopticResult(ids, sorted(segs, key=lambda s: s.id)), cats)
        overlay = cv2.imread(str(vis / ann["file_name"]))
        np.testing.assert_array_equal(overlay, expected)
        assert np.abs(overlay.astype(int) - image[..., ::-1]).mean() > 20, "the overlay does not look like the input"


def test_help_explains_every_option():
    r = _predict("--help")
    assert r.returncode == 0
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"


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
