"""``ciae-eval`` (ciae_core/cli/eval.py): file evaluation, the writer round trip, --weights in memory."""

import json
import os
import pathlib
import sys

import numpy as np
import pytest
import torch

from ciae_core.cli.eval import main
from ciae_core.data import CocoPanopticDataset, read_panoptic_png
from ciae_core.evaluation import pq_compute, write_coco_panoptic
from ciae_core.structures import PanopticResult, segments_from_id_map

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from test_evaluation import GT_DIR, GT_JSON, SAMPLE  # noqa: E402


def test_writer_roundtrip_and_cli(tmp_path, capsys):
    doc = json.load(open(GT_JSON))
    cats = CocoPanopticDataset(os.path.join(SAMPLE, "images"), GT_DIR, GT_JSON).categories
    by_id = {c.id: c for c in cats}
    results = []
    for img, ann in zip(doc["images"], doc["annotations"]):
        ids = read_panoptic_png(os.path.join(GT_DIR, ann["file_name"]))
        meta = {s["id"]: (s["category_id"], by_id[s["category_id"]].name, by_id[s["category_id"]].isthing, 0.9)
                for s in ann["segments_info"] if not s["iscrowd"]}
        for s in ann["segments_info"]:
            if s["iscrowd"]:
                ids[ids == s["id"]] = 0
        results.append((img["file_name"], img["id"], PanopticResult(ids, segments_from_id_map(ids, meta))))
    out = tmp_path / "pred"
    json_path = write_coco_panoptic(str(out), results, cats)
    written = json.load(open(json_path))
    assert written["annotations"][0]["file_name"] == "000000142238.png"
    assert np.array_equal(read_panoptic_png(str(out / "panoptic" / "000000142238.png")), results[0][2].id_map)
    s = pq_compute(GT_JSON, json_path, GT_DIR, str(out / "panoptic"))
    assert s["All"]["pq"] == 1.0

    rc = main(["--gt-json", GT_JSON, "--gt-dir", GT_DIR, "--pred-json", json_path, "--pred-dir",
               str(out / "panoptic"), "--json-out", str(tmp_path / "r.json"), "--per-class"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "All" in text and "100.0" in text and "horse" in text
    assert json.load(open(tmp_path / "r.json"))["All"]["pq"] == 1.0

    # Missing prediction for an image -> one-line error, exit code 2.
    written["annotations"].pop()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(written))
    assert main(["--gt-json", GT_JSON, "--gt-dir", GT_DIR, "--pred-json", str(bad), "--pred-dir",
                 str(out / "panoptic")]) == 2
    assert "no prediction for the image with id 439180" in capsys.readouterr().err


def _tiny_model_and_data(tmp_path, num_scenes: int) -> list[str]:
    """A tiny random-weight model (m.safetensors) and ``num_scenes`` synthetic scenes (val/): the
    ``ciae-eval`` arguments that evaluate one on the other at input size 192."""
    from ciae_core.checkpoint import save_model
    from ciae_core.model import CIAE
    from ciae_core.synth import SYNTH_CATEGORIES, write_dataset

    torch.manual_seed(0)
    model = CIAE(categories=SYNTH_CATEGORIES, backbone="resnet18", backbone_norm="gn", fpn_channels=16,
                 head_channels=16, tower_depth=1, embed_dim=8, embed_branch_channels=16, embedding_stride=4)
    save_model(str(tmp_path / "m.safetensors"), model)
    write_dataset(str(tmp_path / "val"), num_scenes, 192, 192, seed=9)
    return ["--weights", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "val"), "--input-size", "192"]


def test_cli_weights_path_agrees_with_file_evaluation(tmp_path, capsys):
    """ciae-eval --weights runs the Predictor in memory; its written predictions evaluated from
    files must give the same per-class numbers."""
    args = _tiny_model_and_data(tmp_path, 1)
    assert main(args + ["--pred-out", str(tmp_path / "pred"), "--json-out", str(tmp_path / "mem.json")]) == 0
    val, pred = tmp_path / "val", tmp_path / "pred"
    assert main(["--gt-json", str(val / "panoptic.json"), "--gt-dir", str(val / "panoptic"),
                 "--pred-json", str(pred / "panoptic.json"), "--pred-dir", str(pred / "panoptic"),
                 "--json-out", str(tmp_path / "files.json")]) == 0
    mem, files = json.load(open(tmp_path / "mem.json")), json.load(open(tmp_path / "files.json"))
    assert mem["per_class"] == files["per_class"] and mem["All"] == files["All"]
    # Ground-truth segments are all counted (TP + FN = number of GT segments).
    gt = json.load(open(tmp_path / "val" / "panoptic.json"))
    assert sum(r["tp"] + r["fn"] for r in mem["per_class"].values()) == sum(
        len(a["segments_info"]) for a in gt["annotations"])
    assert main(args[:2] + ["--data", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_weights_with_the_openvino_engine(tmp_path, capsys):
    """ciae-eval --engine openvino scores the same model as the torch engine (fp32: the same PQ
    up to a pixel flip) and refuses a precision this CPU or engine cannot run in one line."""
    pytest.importorskip("openvino")
    args = _tiny_model_and_data(tmp_path, 2)
    assert main(args + ["--json-out", str(tmp_path / "torch.json")]) == 0
    assert main(args + ["--engine", "openvino", "--threads", "1", "--json-out", str(tmp_path / "ov.json")]) == 0
    a, b = json.load(open(tmp_path / "torch.json")), json.load(open(tmp_path / "ov.json"))
    assert abs(a["All"]["pq"] - b["All"]["pq"]) < 0.01
    capsys.readouterr()
    assert main(args + ["--engine", "openvino", "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "needs an int8 model" in err and err.count("\n") == 1


def test_ciae_eval_of_a_synthetic_only_model_warns_once(tmp_path):
    """Through the console entry, on one ciae-synth scene: the PQ table as ever, and one warning."""
    import subprocess

    from ciae_core.synth import write_dataset
    from console_scripts import console_command, console_env

    data = tmp_path / "synval"
    write_dataset(str(data), 1, 192, 224, seed=1000)
    shipped = pathlib.Path(__file__).resolve().parents[3] / "models" / "ciae_synthetic_small.safetensors"
    res = subprocess.run([*console_command("ciae-eval"), "--weights", str(shipped), "--data", str(data),
                          "--input-size", "192"], env=console_env(OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    warned = [ln for ln in res.stderr.splitlines() if "synthetic-only model: it knows disc, box" in ln]
    assert len(warned) == 1 and warned[0].startswith("WARNING"), res.stderr[-2000:]
    assert "PQ" in res.stdout
