"""Tests of ciae_core.model_domain: the model file says what images it knows, and tools warn for
synthetic-only models (the text), through save/load, ONNX export and the shipped model."""

from __future__ import annotations

import json
import pathlib
import struct

import pytest
import torch

from ciae_core.checkpoint import load_model, load_tensors, read_metadata, save_model
from ciae_core.model import CIAE
from ciae_core.model_domain import (SYNTHETIC_SHAPES, domain_warning, model_domain_warning, read_model_domain,
                                    training_domain)
from ciae_core.structures import CategoryInfo
from ciae_core.synth import SYNTH_CATEGORIES

REPO = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "ciae_synthetic_small.safetensors"
COCO_LIKE = [CategoryInfo(1, "person", True), CategoryInfo(3, "car", True), CategoryInfo(100, "road", False)]
SMALL = dict(backbone="resnet18", fpn_channels=32, head_channels=32, tower_depth=1, embed_branch_channels=16,
             embed_dim=8)


def _small(categories, domain=None):
    torch.manual_seed(0)
    m = CIAE(categories, **SMALL).eval()
    if domain is not None:
        m.domain = domain
    return m


def test_the_shipped_model_says_it_is_synthetic_only():
    assert read_metadata(SHIPPED)["domain"] == SYNTHETIC_SHAPES
    assert load_model(SHIPPED).domain == SYNTHETIC_SHAPES
    side = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert side["domain"] == SYNTHETIC_SHAPES
    text = model_domain_warning(SHIPPED)
    assert text == ("ciae_synthetic_small.safetensors: synthetic-only model: it knows disc, box, triangle, ring, sky, "
                    "wall, ground in rendered scenes; on real images its segments are meaningless; train on COCO for "
                    "real scenes: see README 'Train a real-scene model'")


def test_the_shipped_model_header_is_aligned_and_its_tensors_are_all_there():
    """The file was re-written with the metadata only: the header stays 8-byte aligned and every
    tensor's byte range lies inside the data section, back to back (no gap, nothing trailing)."""
    raw = SHIPPED.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    tensors, _ = load_tensors(SHIPPED)
    assert len(tensors) == len(spans) == 245


def test_domain_round_trips_through_save_and_load(tmp_path):
    path = save_model(tmp_path / "syn.safetensors", _small(SYNTH_CATEGORIES, SYNTHETIC_SHAPES))
    assert read_metadata(path)["domain"] == SYNTHETIC_SHAPES
    assert json.loads((tmp_path / "syn.json").read_text())["domain"] == SYNTHETIC_SHAPES
    loaded = load_model(path)
    assert loaded.domain == SYNTHETIC_SHAPES
    again = save_model(tmp_path / "again.safetensors", loaded)  # load -> save keeps it
    assert read_model_domain(again) == (SYNTHETIC_SHAPES, [c.name for c in SYNTH_CATEGORIES])


def test_a_model_without_the_key_has_an_unknown_domain_and_no_warning(tmp_path):
    path = save_model(tmp_path / "coco.safetensors", _small(COCO_LIKE))
    assert "domain" not in read_metadata(path)
    assert "domain" not in json.loads((tmp_path / "coco.json").read_text())
    assert load_model(path).domain is None
    assert read_model_domain(path) == (None, ["person", "car", "road"])
    assert model_domain_warning(path) is None


def test_ciae_export_carries_the_domain_into_the_onnx_metadata(tmp_path):
    pytest.importorskip("onnx")
    from ciae_core.export import export_checkpoint, read_onnx_metadata

    syn = save_model(tmp_path / "syn.safetensors", _small(SYNTH_CATEGORIES, SYNTHETIC_SHAPES))
    onnx_path = export_checkpoint(syn, tmp_path / "syn.onnx", size=(64, 64))
    assert read_onnx_metadata(onnx_path)["ciae_domain"] == SYNTHETIC_SHAPES
    assert read_model_domain(onnx_path)[0] == SYNTHETIC_SHAPES
    assert model_domain_warning(onnx_path).startswith("syn.onnx: synthetic-only model: it knows disc, box,")
    unknown = export_checkpoint(save_model(tmp_path / "coco.safetensors", _small(COCO_LIKE)), tmp_path / "coco.onnx",
                                size=(64, 64))
    assert "ciae_domain" not in read_onnx_metadata(unknown)
    assert model_domain_warning(unknown) is None


def test_training_domain_from_the_data():
    assert training_domain("synthetic", SYNTH_CATEGORIES) == SYNTHETIC_SHAPES
    # a COCO-panoptic folder written by ciae-synth: the category table gives it away
    assert training_domain("coco", list(SYNTH_CATEGORIES)) == SYNTHETIC_SHAPES
    assert training_domain("coco", COCO_LIKE) is None
    assert training_domain("coco", SYNTH_CATEGORIES[:4]) is None


def test_warning_text_only_for_synthetic_models():
    assert domain_warning(None, ["a"]) is None
    assert domain_warning("coco-panoptic", ["a"]) is None
    assert domain_warning(SYNTHETIC_SHAPES, []).startswith("synthetic-only model: it knows rendered scenes only;")


def test_reading_the_domain_needs_no_torch_and_an_unreadable_file_is_unknown(tmp_path):
    """The demo's client asks without torch loaded; a bad file is the loaders' error to report."""
    import subprocess
    import sys

    from ciae_core.checkpoint import CONFIG_KEY

    from ciae_core import model_domain

    assert model_domain.CONFIG_KEY == CONFIG_KEY
    code = ("import sys, ciae_core.model_domain as m; w = m.model_domain_warning(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(w)")
    res = subprocess.run([sys.executable, "-c", code, str(SHIPPED)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ciae_synthetic_small.safetensors: synthetic-only model:")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert read_model_domain(bad) == (None, []) and model_domain_warning(bad) is None
    assert read_model_domain(tmp_path / "missing.onnx") == (None, [])
