"""``ciae-synth`` (ciae_core/cli/synth.py): byte-identical COCO-panoptic output, sequences, errors,
WIDTHxHEIGHT sizes, and no overwriting without --overwrite (through the console entry)."""

import hashlib
import json
import os
import pathlib
import subprocess
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
        assert main(["--out", str(out), "--num", "3", "--size", "96x64", "--seed", "7", *extra]) == 0
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


def _synth(*args) -> subprocess.CompletedProcess:
    """``ciae-synth`` as a user runs it: a new process through the command's module entry."""
    return subprocess.run([sys.executable, "-m", "ciae_core.cli.synth", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=pathlib.Path(__file__).resolve().parents[3])


def test_help_says_width_x_height():
    r = _synth("--help")
    assert r.returncode == 0 and "WIDTHxHEIGHT" in r.stdout


def test_size_is_width_by_height_and_bad_sizes_are_one_line(tmp_path):
    r = _synth("--out", tmp_path / "d", "--num", "1", "--size", "96x64")
    assert r.returncode == 0, r.stderr
    assert "(96x64)" in r.stdout
    doc = json.loads((tmp_path / "d" / "panoptic.json").read_text())
    assert (doc["images"][0]["width"], doc["images"][0]["height"]) == (96, 64)
    assert cv2.imread(str(tmp_path / "d" / "images" / "000000.png")).shape[:2] == (64, 96)
    r = _synth("--out", tmp_path / "e", "--size", "96x16")
    assert r.returncode == 2 and "at least 32" in r.stderr and not (tmp_path / "e").exists()


def test_a_non_empty_folder_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "set"
    assert _synth("--out", out, "--num", "3", "--size", "64x64").returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = _synth("--out", out, "--num", "2", "--size", "64x64", "--seed", "5")
    assert r.returncode == 2 and "--overwrite" in r.stderr and r.stderr.count("\n") == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "nothing was touched"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert _synth("--out", tmp_path / "other", "--num", "1", "--size", "64x64").returncode == 2


def test_overwrite_replaces_the_old_data_set_without_stale_files(tmp_path):
    out = tmp_path / "set"
    assert _synth("--out", out, "--num", "3", "--size", "64x64", "--image-format", "jpg").returncode == 0
    (out / "notes.txt").write_text("mine")
    r = _synth("--out", out, "--num", "2", "--size", "64x64", "--seed", "5", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == ["000000.png", "000001.png"]
    doc = json.loads((out / "panoptic.json").read_text())
    assert len(doc["images"]) == 2 and doc["info"]["seed"] == 5
    assert (out / "notes.txt").read_text() == "mine", "files ciae-synth did not write stay"
    img = cv2.imread(str(out / "images" / "000001.png"))[..., ::-1]
    assert np.array_equal(img, render_scene((5, 1), 64, 64)[0])
