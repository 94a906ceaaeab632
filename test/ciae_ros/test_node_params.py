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


def test_tracking_parameters_mirror_the_tracker_constructor():
    """Every tracking_<x> parameter is SegmentTracker's keyword <x> with the same default, so the
    node tracks as the library does unless told otherwise."""
    import inspect

    from ciae_core.tracking import SegmentTracker
    from ciae_ros.node_params import SPECS, TRACKER_PARAMS, tracker_kwargs

    signature = inspect.signature(SegmentTracker.__init__).parameters
    assert SPECS["tracking"].default is True
    assert set(TRACKER_PARAMS) == {n for n in SPECS if n.startswith("tracking_")}
    for name, kw in TRACKER_PARAMS.items():
        assert kw in signature, f"{name}: SegmentTracker has no keyword {kw}"
        assert SPECS[name].default == signature[kw].default and type(SPECS[name].default) is type(
            signature[kw].default), f"{name}: default {SPECS[name].default!r} != {signature[kw].default!r}"
    kwargs = tracker_kwargs({n: s.default for n, s in SPECS.items()})
    assert SegmentTracker(**kwargs).__dict__.keys() >= kwargs.keys()


def test_tracking_values_are_checked_alone_and_together():
    from ciae_ros.node_params import SPECS, settings_error, validate_value

    assert "tracking_association must be one of embedding, iou" in validate_value("tracking_association", "sort")
    assert validate_value("tracking_high_score", 1.5) == "tracking_high_score must be in [0.0, 1.0], got 1.5"
    assert "tracking_min_hits must be in [1, 1000]" in validate_value("tracking_min_hits", 0)
    assert validate_value("tracking_reid_distance", 2.0) is None
    good = {n: s.default for n, s in SPECS.items()}
    assert settings_error(good) is None
    err = settings_error({**good, "tracking_high_score": 0.7})
    assert err.startswith("need tracking_low_score <= tracking_high_score <= tracking_new_track_score"), err
    assert settings_error({**good, "tracking_max_age": 0.0}) == "tracking_max_age must be a number > 0, got 0.0"
    assert settings_error({**good, "tracking_high_score": 0.7, "tracking_new_track_score": 0.8}) is None
