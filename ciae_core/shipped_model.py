"""Where the shipped model is: ``models/*.safetensors`` of the source tree or of an install.

The node, ``ciae-demo``, ``ciae-bag`` and ``ciae-predict`` default to this model. Looked up, first
found wins: the source tree (``<repo>/models`` beside the ``ciae_core`` package, so a checkout's
edits take effect without reinstalling), ``share/ciae_ros/models`` under every prefix of
``AMENT_PREFIX_PATH`` (a colcon / ament install), and ``share/ciae_ros/models`` under the running
interpreter's prefix (``make setup`` installs there). Plain file-system lookups: no ROS import.
"""

from __future__ import annotations

import os
import pathlib
import sys

SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARE_NAME = "ciae_ros"  # the ROS package that installs models/ into share/


def model_dirs() -> list[pathlib.Path]:
    """Existing candidate ``models/`` folders, most specific first."""
    candidates = [SOURCE_ROOT / "models"]
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            candidates.append(pathlib.Path(prefix) / "share" / SHARE_NAME / "models")
    candidates.append(pathlib.Path(sys.prefix) / "share" / SHARE_NAME / "models")
    seen, out = set(), []
    for d in candidates:
        key = d.resolve() if d.exists() else d
        if d.is_dir() and key not in seen:
            seen.add(key)
            out.append(d)
    return out


def default_weights() -> pathlib.Path | None:
    """The shipped model: the newest ``*.safetensors`` of the first :func:`model_dirs` folder that
    has one, else ``None``."""
    for folder in model_dirs():
        models = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        if models:
            return models[0]
    return None
