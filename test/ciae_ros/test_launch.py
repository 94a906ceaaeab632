"""launch/panoptic.launch.py, config/panoptic.yaml and config/panoptic.rviz agree with the node
and with the install rules (``launch``/``launch_ros`` are not installable here, so the launch file
is checked by parsing it; the node itself runs with config/panoptic.yaml in test_node.py)."""

from __future__ import annotations

import ast
import pathlib
import re

import yaml

from ciae_ros.node import PARAMS, SPECS

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch" / "panoptic.launch.py"


def _constants(tree: ast.Module) -> dict:
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node.value.value
    return out


def _launch_tree():
    return ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))


def test_launch_file_parses_and_defines_generate_launch_description():
    tree = _launch_tree()
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in names
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {"Node", "LifecycleNode", "DeclareLaunchArgument", "FindPackageShare"} <= imported


def test_launch_file_points_at_installed_executable_and_params():
    c = _constants(_launch_tree())
    assert c["PACKAGE"] == "ciae_ros"
    assert c["NODE_NAME"] == "ciae_panoptic"
    from ciae_ros.node import NODE_NAME

    assert c["NODE_NAME"] == NODE_NAME
    # CMakeLists installs scripts/<executable> to lib/ciae_ros and config/ to share/ciae_ros
    script = REPO / "scripts" / c["EXECUTABLE"]
    assert script.is_file() and "ciae_ros.node import main" in script.read_text()
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"install\(PROGRAMS[^)]*scripts/" + re.escape(c["EXECUTABLE"]), cmake)
    assert re.search(r"install\(DIRECTORY[^)]*\blaunch\b[^)]*\bconfig\b[^)]*DESTINATION share/\$\{PROJECT_NAME\}",
                     cmake)
    assert (REPO / c["PARAMS_FILE"]).is_file()
    assert re.search(r'project\(ciae_ros\)', cmake)


def _launch_argument_defaults(tree) -> dict:
    """``{name: default}`` of the DeclareLaunchArgument calls (an ast node where not a constant)."""
    out = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "DeclareLaunchArgument":
            kw = {k.arg: k.value for k in n.keywords}
            d = kw.get("default_value")
            out[n.args[0].value] = d.value if isinstance(d, ast.Constant) else d
    return out


def test_launch_arguments_and_overrides_are_node_parameters():
    from ciae_ros.launch_support import PARAMETER_ARGUMENTS

    tree = _launch_tree()
    defaults = _launch_argument_defaults(tree)
    assert {"image_topic", "params_file", "namespace", "weights", "engine", "device", "input_transport",
            "lifecycle"} <= set(defaults)
    # the parameter arguments are node parameters, default to "" (= not given), and the node's
    # parameters come from ciae_ros.launch_support.parameter_overrides, evaluated at launch time
    assert set(PARAMETER_ARGUMENTS) <= set(SPECS) and set(PARAMETER_ARGUMENTS) <= set(defaults)
    assert all(defaults[name] == "" for name in PARAMETER_ARGUMENTS), {n: defaults[n] for n in PARAMETER_ARGUMENTS}
    imported = {a.name for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module == "ciae_ros.launch_support" for a in n.names}
    assert {"PARAMETER_ARGUMENTS", "parameter_overrides", "DEFAULT_IMAGE_TOPIC"} <= imported
    calls = {getattr(n.func, "id", "") for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert {"parameter_overrides", "OpaqueFunction"} <= calls
    literal_keys = {k.value for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys
                    if isinstance(k, ast.Constant)}
    assert not literal_keys & set(SPECS), "parameters written into the launch file override params_file"
    remaps = [n for n in ast.walk(tree) if isinstance(n, ast.Tuple) and n.elts
              and isinstance(n.elts[0], ast.Constant) and n.elts[0].value == "image"]
    assert remaps, "the launch file must remap the node's 'image' topic"


def test_launch_passes_only_the_parameter_arguments_the_user_gave():
    from ciae_ros.launch_support import parameter_overrides

    unset = {"weights": "", "engine": "", "device": "", "input_transport": ""}
    assert parameter_overrides(unset) == {}, "defaults must leave params_file in charge"
    assert parameter_overrides({**unset, "device": "cuda:1"}) == {"device": "cuda:1"}
    assert parameter_overrides({**unset, "weights": " /m/model.onnx ", "engine": "onnxruntime",
                                "input_transport": "compressed", "image_topic": "/x", "namespace": "front"}) == \
        {"weights": "/m/model.onnx", "engine": "onnxruntime", "input_transport": "compressed"}
    assert parameter_overrides({"weights": "123"}) == {"weights": "123"}  # stays a string (a file name)
    assert parameter_overrides({}) == {}


def test_launch_default_input_topic_is_relative_like_the_node():
    from ciae_ros.launch_support import DEFAULT_IMAGE_TOPIC
    from ciae_ros.node import DEFAULT_IMAGE_TOPIC as NODE_DEFAULT

    defaults = _launch_argument_defaults(_launch_tree())
    assert isinstance(defaults["image_topic"], ast.Name) and defaults["image_topic"].id == "DEFAULT_IMAGE_TOPIC"
    assert DEFAULT_IMAGE_TOPIC == NODE_DEFAULT == "camera/image_raw"  # namespace:=front -> /front/camera/image_raw


def test_params_file_matches_declared_parameters():
    data = yaml.safe_load((REPO / "config" / "panoptic.yaml").read_text())
    params = data["/**"]["ros__parameters"]
    unknown = set(params) - set(SPECS)
    assert not unknown, f"parameters not declared by the node: {unknown}"
    for name, value in params.items():
        default = SPECS[name].default
        assert type(value) is type(default), f"{name}: {type(value).__name__} vs declared {type(default).__name__}"
        spec = SPECS[name]
        if spec.choices:
            assert value in spec.choices
        if spec.int_range:
            lo, hi, step = spec.int_range
            assert lo <= value <= hi and (value - lo) % step == 0
        if spec.float_range:
            assert spec.float_range[0] <= value <= spec.float_range[1]
    missing = {p.name for p in PARAMS} - set(params) - {"image_topics"}  # an empty list has no YAML type
    assert not missing, f"parameters missing from config/panoptic.yaml: {missing}"


def test_dds_profile_has_large_shm_segment_and_udp():
    import xml.etree.ElementTree as ET

    root = ET.parse(REPO / "config" / "fastdds_large_data.xml").getroot()
    ns = {"d": "http://www.eprosima.com"}
    descs = root.findall(".//d:transport_descriptor", ns)
    kinds = {d.find("d:type", ns).text: d for d in descs}
    assert set(kinds) == {"SHM", "UDPv4"}
    assert int(kinds["SHM"].find("d:segment_size", ns).text) >= 32 * 1024 * 1024
    part = root.find(".//d:participant", ns)
    assert part.get("is_default_profile") == "true"
    assert part.find(".//d:useBuiltinTransports", ns).text == "false"
    used = {t.text for t in part.findall(".//d:userTransports/d:transport_id", ns)}
    assert used == {d.find("d:transport_id", ns).text for d in descs}


def test_dds_profile_is_applied_unless_the_user_has_one():
    from ciae_ros.resources import use_large_data_dds_profile

    env = {}
    path = use_large_data_dds_profile(env)
    assert path and env["FASTDDS_DEFAULT_PROFILES_FILE"].endswith("fastdds_large_data.xml")
    env = {"FASTDDS_DEFAULT_PROFILES_FILE": "/mine.xml"}
    assert use_large_data_dds_profile(env) == "/mine.xml" and env["FASTDDS_DEFAULT_PROFILES_FILE"] == "/mine.xml"
    env = {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}
    assert use_large_data_dds_profile(env) is None and "FASTDDS_DEFAULT_PROFILES_FILE" not in env


def test_rviz_config_shows_overlay_and_camera():
    data = yaml.safe_load((REPO / "config" / "panoptic.rviz").read_text())
    displays = data["Visualization Manager"]["Displays"]
    topics = {d["Topic"]["Value"] for d in displays if d["Class"] == "rviz_default_plugins/Image"}
    assert topics == {"/panoptic/overlay", "/camera/image_raw"}


def test_launch_file_wiring_with_stand_in_launch_modules(monkeypatch):
    """Runs the launch file's own code. MOCKS: ``launch``/``launch_ros`` cannot be installed here (no
    ROS 2 install; the PyPI package named ``launch`` is an unrelated program), so minimal stand-ins
    record what the file builds: argument defaults, and the node actions with their parameters,
    made by the OpaqueFunction from the launch arguments' values."""
    import importlib.util
    import sys
    import types

    class Recorder:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class LaunchConfiguration(Recorder):
        def perform(self, context):
            return context[self.args[0]]

    mods = {
        "launch": dict(LaunchDescription=Recorder),
        "launch.actions": dict(DeclareLaunchArgument=Recorder, OpaqueFunction=Recorder),
        "launch.conditions": dict(IfCondition=Recorder, UnlessCondition=Recorder),
        "launch.substitutions": dict(LaunchConfiguration=LaunchConfiguration, PathJoinSubstitution=Recorder),
        "launch_ros": {},
        "launch_ros.actions": dict(LifecycleNode=Recorder, Node=Recorder),
        "launch_ros.substitutions": dict(FindPackageShare=Recorder),
    }
    for name, attrs in mods.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    spec = importlib.util.spec_from_file_location("panoptic_launch_under_test", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    ld = module.generate_launch_description()
    entities = ld.args[0]
    defaults = {e.args[0]: e.kwargs["default_value"] for e in entities if "default_value" in e.kwargs}
    assert defaults["image_topic"] == "camera/image_raw"
    [opaque] = [e for e in entities if "function" in e.kwargs]
    context = {**{k: v for k, v in defaults.items() if isinstance(v, str)}, "params_file": "/p.yaml"}

    def node_parameters(ctx):
        plain, managed = opaque.kwargs["function"](ctx)
        assert plain.kwargs["parameters"] == managed.kwargs["parameters"]
        assert managed.kwargs["arguments"] == ["--lifecycle"]
        assert plain.kwargs["remappings"][0][0] == "image"
        return plain.kwargs["parameters"]

    params = node_parameters(context)
    assert len(params) == 1 and params[0].args == ("params_file",), "only the params file when nothing is given"
    params = node_parameters({**context, "device": "cuda:0", "engine": "onnxruntime"})
    assert params[0].args == ("params_file",) and params[1] == {"engine": "onnxruntime", "device": "cuda:0"}


def test_readme_and_params_file_document_every_parameter():
    """README's parameter list and config/panoptic.yaml name every declared parameter (image_topics
    as a commented example: an empty list has no YAML type), and README names exactly the
    parameters whose change reloads the model."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**Parameters**"):readme.index("**Never behind the camera.**")]
    missing = [p.name for p in PARAMS if f"`{p.name}`" not in section]
    assert not missing, f"README parameter list lacks {missing}"
    reload_sentence = re.search(r"changing ([^.]*?) loads the new model first", section, re.S).group(1)
    assert set(re.findall(r"`(\w+)`", reload_sentence)) == {p.name for p in PARAMS if p.reloads_model}
    assert "`cuda:<index>`" in section
    yaml_text = (REPO / "config" / "panoptic.yaml").read_text()
    undocumented = [p.name for p in PARAMS if not re.search(rf"^\s*(# )?{p.name}:", yaml_text, re.M)]
    assert not undocumented, f"config/panoptic.yaml lacks {undocumented}"


def test_message_comments_name_topics_relative_to_the_node_namespace():
    """Our outputs are relative names (a namespace moves them); the .msg comments must not call
    them /panoptic/..., which is only where they land in the root namespace."""
    for path in sorted((REPO / "msg").glob("*.msg")):
        comments = [ln for ln in path.read_text().splitlines() if ln.lstrip().startswith("#")]
        wrong = [ln for ln in comments if re.search(r"(?<![\w/])/panoptic/", ln)
                 and "root namespace" not in ln]
        assert not wrong, f"{path.name}: {wrong}"
