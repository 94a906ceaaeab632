"""package.xml declares every ROS package that ciae_ros's modules and launch file import."""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import xml.etree.ElementTree as ET

REPO = pathlib.Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "ciae_ros").glob("*.py")) + [REPO / "launch" / "panoptic.launch.py"]
# Only importable on a real ROS install (so not recognisable from the venv's distributions here).
ROS_ONLY = {"launch", "launch_ros"}
# Used only when importable; documented in package.xml's comment instead of as dependencies.
OPTIONAL = {"vision_msgs", "cv_bridge"}


def _imported_top_level(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            names.add(n.module.split(".")[0])
    return names


def _ros_packages(modules: set[str]) -> set[str]:
    """The modules that come from ROS 2 packages (``ros-*`` wheels here), plus launch/launch_ros."""
    dists = importlib.metadata.packages_distributions()
    return {m for m in modules if m in ROS_ONLY or any(d.startswith("ros-") for d in dists.get(m, ()))}


def test_every_imported_ros_package_is_a_dependency():
    root = ET.parse(REPO / "package.xml").getroot()
    declared = {e.text.strip() for e in root if e.tag in ("depend", "exec_depend", "build_depend")}
    imported = set().union(*(_imported_top_level(p) for p in SOURCES)) - {"ciae_ros", "ciae_core"}
    needed = _ros_packages(imported) - OPTIONAL
    assert {"rclpy", "ament_index_python"} <= needed, needed  # the scan itself works
    assert not needed - declared, f"imported but not in package.xml: {sorted(needed - declared)}"
    comment = (REPO / "package.xml").read_text()
    assert all(name in comment for name in OPTIONAL), "optional packages must be named in package.xml"
