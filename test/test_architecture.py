"""The house rules that keep the tree readable, checked on the source with ``ast`` (no imports run).

* ``ciae_core`` never imports ROS: not ``ciae_ros``, not ``rclpy``, not a ROS message package,
  not even inside a function.
* No import circle among our modules (imports inside functions count: they are dependencies too).
* Command lines live in ``ciae_core/cli/``: library modules hold no ``argparse`` and no ``main``.
* A module holds one idea: about 600 lines at most, functions about 120 (a little slack for "about").
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ciae_core", "ciae_ros")
ROS_TOP_LEVEL = {"ciae_ros", "rclpy", "rosidl_runtime_py", "rosidl_parser", "rosbags", "launch", "launch_ros",
                 "sensor_msgs", "std_msgs", "geometry_msgs", "visualization_msgs", "diagnostic_msgs",
                 "lifecycle_msgs", "rcl_interfaces", "builtin_interfaces", "vision_msgs", "message_filters",
                 "cv_bridge", "ament_index_python"}
MAX_MODULE_LINES = 625
MAX_FUNCTION_LINES = 125


def _modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of our two packages (subpackages included)."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imported_names(module: str, path: pathlib.Path) -> list[tuple[str, int]]:
    """Every module name an import statement of ``path`` refers to (relative imports resolved),
    with its line; ``from a import b`` yields ``a.b`` too, since ``b`` may be a submodule."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.append((target, node.lineno))
            names += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return names


def _project_edges() -> dict[str, set[str]]:
    """module -> the project modules it imports (a name resolves to the longest module prefix).

    Package ``__init__`` modules are left out as targets: every submodule import passes through
    them, and ours only re-export lazily (``ciae_core.__getattr__``), so an edge into one would
    report a circle that never executes.
    """
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, _line in _imported_names(module, path):
            parts = name.split(".")
            while parts and ".".join(parts) not in MODULES:
                parts.pop()
            target = ".".join(parts)
            if target and target != module and MODULES[target].name != "__init__.py":
                edges[module].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_walk_finds_both_packages_and_the_cli_layer():
    assert "ciae_core.predictor" in MODULES and "ciae_ros.node" in MODULES
    assert "ciae_core.cli" in MODULES


def test_ciae_core_never_imports_ros():
    offenders = []
    for module, path in MODULES.items():
        if not module.startswith("ciae_core"):
            continue
        for name, line in _imported_names(module, path):
            if name.split(".")[0] in ROS_TOP_LEVEL:
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not offenders, "ciae_core must stay ROS-free:\n" + "\n".join(offenders)


def test_no_import_circle():
    cycles = _cycles(_project_edges())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_circle():
    """The checker itself: a made-up circle of three and a self-contained chain."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("ciae_core")
                                          and not m.startswith("ciae_core.cli")))
def test_library_modules_hold_no_command_line(module):
    tree = ast.parse(MODULES[module].read_text())
    imports = {n for n, _ in _imported_names(module, MODULES[module])}
    assert "argparse" not in imports, f"{module} imports argparse: command lines belong in ciae_core/cli/"
    top_level = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert "main" not in top_level, f"{module} defines main(): command lines belong in ciae_core/cli/"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_and_function_sizes(module):
    path = MODULES[module]
    text = path.read_text()
    lines = text.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {lines} lines: split it along its seams"
    long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                long.append(f"{node.name} ({n} lines, line {node.lineno})")
    assert not long, f"{path.relative_to(REPO)}: functions too long: {', '.join(long)}"
