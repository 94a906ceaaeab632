"""ciae_ros.node_params: the parameter table's checks, without a node (no ROS needed).

The parameters on a running node (declared, validated, read-only, set at run time, typos in a
params file) are tested across processes in test_node.py.
"""

from __future__ import annotations


def test_parameter_validation_messages():
    from ciae_ros.node_params import validate_value

    assert validate_value("engine", "torch") is None
    assert "one of" in validate_value("engine", "tf")
    assert "cuda:<index>" in validate_value("device", "gpu0")
    assert validate_value("device", "cuda:1") is None
    assert "does not exist" in validate_value("weights", "/nonexistent.safetensors")
    assert "-1" in validate_value("nms_threshold", -0.5)
    assert validate_value("stuff_area_min", 5000) is None
    assert "distinct" in validate_value("image_topics", ["/a", "/a"])
    assert "both publish under /cam/panoptic/" in validate_value("image_topics", ["/cam/image_raw", "/cam/image_rect"])
    assert validate_value("image_topics", ["/cam1/image_raw", "/cam2/image_raw"]) is None


def test_unknown_parameter_warnings_skip_declared_and_explain_qos_overrides():
    from ciae_ros.node_params import unknown_parameter_warnings

    declared = {"input_size", "use_sim_time", "start_type_description_service"}
    given = ["input_size", "use_sim_time", "scor_threshold", "qos_overrides./x.publisher.depth"]
    lines = unknown_parameter_warnings(given, declared.__contains__)
    assert lines[0].startswith("parameter 'qos_overrides./x.publisher.depth' ignored") and "output_depth" in lines[0]
    assert lines[1] == "unknown parameter 'scor_threshold' (did you mean 'score_threshold'?) \u2014 ignored"
    assert len(lines) == 2


def test_output_prefix_is_the_camera_namespace():
    from ciae_ros.node_params import _output_prefix

    assert _output_prefix("/cam1/image_raw") == "/cam1/"
    assert _output_prefix("cam1/image_raw") == "cam1/"
    assert _output_prefix("/robot/front/image_raw") == "/robot/front/"
    assert _output_prefix("left") == "left/"


def test_the_moved_names_stay_importable_from_ciae_ros_node():
    """ciae-bag, the tests and users import the parameter table and helpers from ciae_ros.node."""
    import ciae_ros.node as node
    import ciae_ros.node_model as model
    import ciae_ros.node_params as params

    for name in ("PARAMS", "SPECS", "THRESHOLD_PARAMS", "ParamSpec", "NodeStartupError", "validate_value",
                 "camera_topics_error", "unknown_parameter_warnings", "_output_prefix"):
        assert getattr(node, name) is getattr(params, name), name
    for name in ("ModelHandle", "load_model", "predictor_settings"):
        assert getattr(node, name) is getattr(model, name), name
    assert model.NodeStartupError is params.NodeStartupError
