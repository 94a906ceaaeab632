"""launch/panoptic.launch.py, config/panoptic.yaml and config/panoptic.rviz agree with the node
and with the install rules; the installed launch file runs under the real upstream
``launch``/``launch_ros`` (from ``../shared/ros2-src``, skipped without it) and starts the
installed node without the venv activated."""

from __future__ import annotations

import ast
import contextlib
import itertools
import pathlib
import re
import sys
import time
from types import SimpleNamespace

import pytest
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


# ----------------------------------------------------------------------------------------------
# the launch file under the real launch/launch_ros (../shared/ros2-src), node and camera over DDS


AMENT_MARKER = "share/ament_index/resource_index/packages/ciae_ros"  # what ament_index looks for in a prefix


@pytest.fixture(scope="module")
def real_launch(tmp_path_factory):
    """What running the installed launch file needs: the upstream launch/launch_ros sources beside
    the checkout (skipped without them, as on a user's machine), composition_interfaces built with
    rosidl (cached in build/ros2-src), rclpy and our messages."""
    from ros_testing import ROS2_SRC

    if not ROS2_SRC.is_dir():
        pytest.skip(f"{ROS2_SRC} is absent: the upstream launch/launch_ros sources are needed to run the launch file")
    pytest.importorskip("rclpy")
    pytest.importorskip("ciae_ros.msg")
    from ros_testing import Client, build_ros2_src_interfaces, real_launch_env

    venv = pathlib.Path(sys.prefix)
    assert (venv / AMENT_MARKER).is_file(), f"ciae_ros is not installed in {venv} (make setup)"
    prefix = build_ros2_src_interfaces("composition_interfaces")
    client = Client("ciae_test_launch_client")
    yield SimpleNamespace(env=real_launch_env(prefix, tmp_path_factory.mktemp("ros_log")), client=client,
                          launch_file=venv / "share" / "ciae_ros" / "launch" / "panoptic.launch.py",
                          installed_params=venv / "share" / "ciae_ros" / "config" / "panoptic.yaml")
    client.close()


@contextlib.contextmanager
def launched(real_launch, log: pathlib.Path, **arguments):
    """The installed launch file running with ``arguments``; afterwards it is stopped with Ctrl-C
    and every node it started must have finished cleanly."""
    from ros_testing import LaunchProcess

    # launch's own argument: how long it waits after Ctrl-C before SIGTERM (5 s by default; a
    # node's DDS and torch teardown alone takes about that long on this loaded 2-core machine)
    run = LaunchProcess(real_launch.launch_file, {**arguments, "sigterm_timeout": "60"}, real_launch.env, log)
    try:
        yield run
    finally:
        rc = run.stop()
    text = run.log()
    assert "No module named" not in text and "Traceback" not in text, text[-3000:]
    assert rc == 0 and "process has finished cleanly" in text, f"launch exit status {rc}\n{text[-3000:]}"


@pytest.mark.ros
def test_installed_scripts_run_with_the_python_that_built_them():
    """colcon's rule for Python executables: the installed script names the interpreter that
    built the package, so it runs with that environment's packages without activating it."""
    pytest.importorskip("ciae_ros.msg")
    import subprocess

    venv = pathlib.Path(sys.prefix)
    assert (venv / AMENT_MARKER).is_file(), f"ciae_ros is not installed in {venv} (make setup)"
    lib = venv / "lib" / "ciae_ros"
    for name in ("panoptic_node", "demo"):
        first = (lib / name).read_text().splitlines()[0]
        interpreter = first[2:].split()
        assert first.startswith("#!/") and pathlib.Path(interpreter[0]).name != "env", \
            f"{lib / name} starts with {first!r} (installed before CMakeLists.txt set the interpreter? run make setup)"
        prefix = subprocess.run([*interpreter, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                                text=True, timeout=60).stdout.strip()
        assert prefix == sys.prefix, f"{lib / name} runs with {first[2:]} (prefix {prefix}), not this venv's Python"


@pytest.mark.ros
def test_launch_file_starts_the_installed_node_without_an_activated_venv(real_launch, node_weights, tmp_path):
    """`ros2 launch ciae_ros panoptic.launch.py namespace:=... weights:=...` with the real
    launch/launch_ros, the venv not activated (its bin not on PATH): the node starts from the
    installed script, takes the installed params file plus the given weights, subscribes to the
    default relative camera topic in its namespace and publishes segments for a camera's frames."""
    from ciae_ros.msg import PanopticSegments
    from ros_testing import Publisher

    ns = "/launch_plain"
    client = real_launch.client
    segs = client.subscribe(PanopticSegments, f"{ns}/panoptic/segments")
    with launched(real_launch, tmp_path / "launch.log", namespace=ns, weights=node_weights) as run:
        cam = Publisher(f"{ns}/camera/image_raw", reliability="reliable")
        try:
            deadline = time.monotonic() + 300
            while run.alive() and time.monotonic() < deadline and cam.wait_subscribers(1, timeout=5) < 1:
                pass
            assert run.alive() and cam.wait_subscribers(1, timeout=1) >= 1, run.log()[-3000:]
            msg, deadline = None, time.monotonic() + 120
            for k in itertools.count(1):  # until a frame's segments arrive (the first may go unmatched)
                if msg is not None or not run.alive() or time.monotonic() > deadline:
                    break
                stamp = (2000 + k, 17)
                cam.image(480, 640, stamp, frame_id="launch_cam")
                msg = segs.wait_for(lambda m, s=stamp: (m.header.stamp.sec, m.header.stamp.nanosec) == s, timeout=10)
        finally:
            cam.close()
        assert msg is not None, f"no segments from the launched node\n{run.log()[-3000:]}"
        assert msg.header.frame_id == "launch_cam" and (msg.id_image.height, msg.id_image.width) == (480, 640)
        assert msg.segments and msg.model_name == pathlib.Path(node_weights).stem
        shipped = yaml.safe_load(real_launch.installed_params.read_text())["/**"]["ros__parameters"]
        names = ["weights", "engine", "device", "overlay_alpha", "input_transport"]
        expected = [node_weights] + [shipped[n] for n in names[1:]]
        assert client.get_parameters(f"{ns}/ciae_panoptic", *names) == expected, \
            "the given weights on top of the installed params file, the rest from the file"


@pytest.mark.ros
def test_launch_file_lifecycle_argument_starts_the_managed_node(real_launch, tmp_path):
    """`lifecycle:=true engine:=onnxruntime`: only the managed node starts (unconfigured, model not
    loaded), with the given engine on top of the installed params file."""
    from lifecycle_msgs.srv import GetState

    ns = "/launch_lc"
    client = real_launch.client
    with launched(real_launch, tmp_path / "launch.log", namespace=ns, lifecycle="true", engine="onnxruntime") as run:
        state, deadline = None, time.monotonic() + 180
        while state is None and run.alive() and time.monotonic() < deadline:
            try:
                state = client.call(GetState, f"{ns}/ciae_panoptic/get_state", GetState.Request(),
                                    timeout=5).current_state.label
            except TimeoutError:
                pass
        assert state == "unconfigured", run.log()[-3000:]
        assert "loaded from" not in run.log(), "the managed node must not load the model before configure"
        assert client.get_parameters(f"{ns}/ciae_panoptic", "engine", "weights") == ["onnxruntime", ""]
        nodes = [n for n, node_ns in client.node.get_node_names_and_namespaces() if node_ns == ns]
        assert nodes == ["ciae_panoptic"], f"exactly one node (the managed one) in {ns}: {nodes}"


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
