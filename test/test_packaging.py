"""Packaging: package.xml, CMakeLists.txt, setup.py entry points, ROS-free ciae_core."""

from __future__ import annotations

import ast
import importlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
VENV = pathlib.Path(sys.prefix)


def test_package_xml_is_valid_for_catkin_pkg():
    catkin_pkg = pytest.importorskip("catkin_pkg.package")
    pkg = catkin_pkg.parse_package(str(REPO / "package.xml"))
    pkg.validate()
    assert pkg.name == "ciae_ros"
    assert pkg.package_format == 3
    assert pkg.get_build_type() == "ament_cmake"
    deps = {d.name for d in pkg.build_depends + pkg.exec_depends + pkg.buildtool_depends}
    for needed in ("rclpy", "sensor_msgs", "std_msgs", "diagnostic_msgs", "lifecycle_msgs",
                   "rosidl_default_generators", "rosidl_default_runtime", "ament_cmake_python"):
        assert needed in deps, needed
    assert "rosidl_interface_packages" in [g.name for g in pkg.member_of_groups]


def test_package_version_agrees_with_setup_py_and_ciae_core():
    import ciae_core

    tree = ast.parse((REPO / "setup.py").read_text())
    setup_call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in setup_call.keywords}
    catkin_pkg = pytest.importorskip("catkin_pkg.package")
    pkg = catkin_pkg.parse_package(str(REPO / "package.xml"))
    assert ast.literal_eval(kw["version"]) == pkg.version == ciae_core.__version__


def _entry_points() -> dict[str, str]:
    from console_scripts import entry_points

    return entry_points()


EXPECTED_SCRIPTS = {"ciae-train", "ciae-eval", "ciae-predict", "ciae-export", "ciae-bench", "ciae-synth",
                    "ciae-panoptic-node", "ciae-demo", "ciae-bag", "ciae-topic"}


def test_setup_py_declares_every_console_script():
    assert EXPECTED_SCRIPTS <= set(_entry_points())


def test_the_ros_layer_registers_its_bench_rows_with_ciae_bench():
    """`ciae-bench --node` and `--spatial` find the ROS layer's rows through the installed entry
    points (ciae_core never imports ciae_ros): both declared in setup.py and present in the venv's
    metadata (make setup reinstalls when setup.py changes)."""
    import importlib.metadata

    from console_scripts import setup_entry_points

    wanted = {"node": "ciae_ros.bench_node:main", "spatial": "ciae_ros.point_cloud:bench_rows"}
    assert setup_entry_points("ciae_core.bench_plugins") == wanted
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="ciae_core.bench_plugins")}
    assert installed == wanted, "the venv's metadata is stale: run make setup"


@pytest.mark.parametrize("name", sorted(EXPECTED_SCRIPTS))
def test_entry_point_resolves_to_a_callable(name):
    target = _entry_points()[name]
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    func = getattr(module, func_name)
    assert callable(func)


@pytest.mark.parametrize("name", sorted(EXPECTED_SCRIPTS))
def test_installed_console_script_prints_help(name):
    exe = VENV / "bin" / name
    if not exe.exists():
        pytest.skip(f"{exe} not installed (run make setup)")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower()


def test_ciae_core_imports_without_any_ros_package(tmp_path):
    """ciae_core must not import ROS: hide rclpy, ciae_ros's messages and every ROS wheel."""
    code = r"""
import importlib.abc, sys
class HideRos(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split('.')[0]
        if top in {'rclpy', 'ciae_ros', 'rosidl_runtime_py', 'sensor_msgs', 'std_msgs', 'rosbags', 'builtin_interfaces'}:
            raise ImportError('hidden ROS package: ' + name)
        return None
sys.meta_path.insert(0, HideRos())
import pkgutil, ciae_core
for m in pkgutil.iter_modules(ciae_core.__path__):
    importlib = __import__('importlib')
    importlib.import_module('ciae_core.' + m.name)
assert not [k for k in sys.modules if k.split('.')[0] in {'rclpy', 'ciae_ros'}]
print('ok')
"""
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.ros
def test_cmakelists_configures_with_rosidl(tmp_path):
    """The ament_cmake package configures (rosidl + our Python install rules) against the venv."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    if not (VENV / "share" / "rosidl_default_generators").exists():
        pytest.skip("ROS build wheels not in this environment (run make setup)")
    env = dict(os.environ, AMENT_PREFIX_PATH=str(VENV))
    out = subprocess.run(
        ["cmake", str(REPO), f"-DCMAKE_PREFIX_PATH={VENV}", f"-DCMAKE_INSTALL_PREFIX={VENV}",
         f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    # Configure only (nothing is installed): the install rules must name our Python packages,
    # the node executable and the share/ folders the launch file relies on.
    cmake_install = (tmp_path / "cmake_install.cmake").read_text()
    for needed in ("scripts/panoptic_node", "/ciae_ros", "/ciae_core", "launch", "config", "models"):
        assert needed in cmake_install, needed


def test_generated_messages_match_the_design():
    msg = pytest.importorskip("ciae_ros.msg")
    seg = msg.Segment()
    for field in ("id", "category_id", "label", "isthing", "score", "area", "bbox"):
        assert hasattr(seg, field)
    ps = msg.PanopticSegments()
    for field in ("header", "id_image", "segments", "model_name", "model_version", "input_height", "input_width"):
        assert hasattr(ps, field)
    cat = msg.Category()
    for field in ("id", "name", "isthing", "color"):
        assert hasattr(cat, field)
    assert hasattr(msg.CategoryArray(), "categories")


@pytest.mark.ros
def test_installed_node_and_generated_messages_import_from_one_interpreter(tmp_path):
    """Outside the checkout (as after `colcon build` or `make setup`), the installed ciae_ros holds
    both our node modules and rosidl's generated msg/ package."""
    code = (
        "import ciae_ros, ciae_ros.node, ciae_ros.msg as m, ciae_core.predictor, pathlib\n"
        "assert m.PanopticSegments and m.CategoryArray\n"
        "print(pathlib.Path(ciae_ros.node.__file__).parent == pathlib.Path(m.__file__).parent.parent)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    if out.returncode != 0 and "No module named 'ciae_ros.msg'" in out.stderr:
        pytest.skip("messages not built into this environment (run make setup)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "True"
