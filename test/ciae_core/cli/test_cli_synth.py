"""``ciae-synth`` (ciae_core/cli/synth.py): byte-identical COCO-panoptic output, sequences, errors."""

import hashlib
import json
import os
import pathlib
import sys

import cv2
import numpy as np
import pytest

from ciae_core.cli.synth import main
from ciae_core.synth import SYNTH_CATEGORIES, SynthError, render_scene

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from test_synth import _decode_png_ids  # noqa: E402


def test_cli_writes_byte_identical_coco_panoptic(tmp_path):
    def run(out, *extra):
        assert main(["--out", str(out), "--num", "3", "--size", "64x96", "--seed", "7", *extra]) == 0
        paths = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
        return {os.path.relpath(p, out): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}

    h1, h2 = run(tmp_path / "a"), run(tmp_path / "b", "--workers", "2")  # same bytes with 2 processes
    assert h1 == h2 and len(h1) == 7
    doc = json.loads((tmp_path / "a" / "panoptic.json").read_text())
    assert [c["id"] for c in doc["categories"]] == [c.id for c in SYNTH_CATEGORIES]
    assert {c["isthing"] for c in doc["categories"]} == {0, 1}
    ann = doc["annotations"][1]
    ids = _decode_png_ids(str(tmp_path / "a" / "panoptic" / ann["file_name"]))
    assert ids.shape == (64, 96)
    _, pan, infos = render_scene((7, 1), 64, 96)
    assert np.array_equal(ids, pan)
    assert [s["id"] for s in ann["segments_info"]] == [s["id"] for s in infos]
    img = cv2.imread(str(tmp_path / "a" / "images" / doc["images"][1]["file_name"]))[..., ::-1]
    assert np.array_equal(img, render_scene((7, 1), 64, 96)[0])


def test_cli_sequence_and_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "s"), "--num", "2", "--size", "64x64", "--sequence"]) == 0
    assert len(os.listdir(tmp_path / "s" / "images")) == 2
    assert main(["--out", str(tmp_path / "x"), "--num", "0"]) == 2
    assert "--num" in capsys.readouterr().err
    with pytest.raises(SynthError):
        render_scene(0, 10, 10)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--size", "big"])


def test_cli_sequence_styles(tmp_path):
    import json

    assert main(["--out", str(tmp_path / "t"), "--num", "3", "--size", "64x80", "--sequence", "--fps", "15"]) == 0
    doc = json.loads((tmp_path / "t" / "panoptic.json").read_text())
    assert doc["info"]["fps"] == 15.0 and "events" in doc["info"] and len(doc["images"]) == 3
    assert main(["--out", str(tmp_path / "s"), "--num", "2", "--size", "64x64", "--sequence",
                 "--sequence-style", "smooth"]) == 0
    assert "events" not in json.loads((tmp_path / "s" / "panoptic.json").read_text())["info"]
