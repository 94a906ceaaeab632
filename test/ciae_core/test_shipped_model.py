"""Where the shipped model is found (ciae_core/shipped_model.py), without ROS."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from ciae_core import shipped_model

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_the_source_tree_model_comes_first():
    assert shipped_model.default_weights() == sorted((REPO / "models").glob("*.safetensors"))[-1]


def test_an_ament_install_is_found_without_ros(tmp_path, monkeypatch):
    prefix = tmp_path / "install"
    models = prefix / "share" / "ciae_ros" / "models"
    models.mkdir(parents=True)
    (models / "m.safetensors").write_bytes(b"x")
    monkeypatch.setattr(shipped_model, "SOURCE_ROOT", tmp_path / "no_checkout")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "no_venv"))
    monkeypatch.setenv("AMENT_PREFIX_PATH", os.pathsep.join([str(tmp_path / "other"), str(prefix)]))
    assert shipped_model.default_weights() == models / "m.safetensors"
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path / "other"))
    assert shipped_model.default_weights() is None


def test_ciae_predict_imports_nothing_of_ros():
    code = ("import sys, ciae_core.cli.predict; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('rclpy', 'ciae_ros', 'ament_index_python')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=300)
