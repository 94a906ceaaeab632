"""The node's command line before ROS starts (ciae_ros.node_startup): one line per problem."""

from __future__ import annotations

import pytest

from ciae_ros.node_startup import params_file_problem, params_files, parse_args, ros_args_problem


def test_usage_errors_are_one_line_with_status_2(capsys):
    assert parse_args(["--lifecycle", "--autostart"]).autostart
    for argv, text in [(["--autostart"], "--autostart needs --lifecycle"),
                       (["--bogus"], "unrecognized arguments: --bogus")]:
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("ciae-panoptic-node: error: ")
        assert text in err


def test_params_files_are_found_among_ros_arguments():
    args = ["--lifecycle", "--params-file", "not_ros.yaml", "--ros-args", "-p", "a:=1", "--params-file", "x.yaml",
            "--", "--params-file", "after.yaml", "--ros-args", "--params-file", "y.yaml"]
    assert params_files(args) == ["x.yaml", "y.yaml"]


def test_params_file_problems_name_the_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("/**:\n  ros__parameters:\n    input_size: 320\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("/**:\n  ros__parameters: [\n")
    assert params_file_problem(["--ros-args", "--params-file", str(good)]) is None
    assert params_file_problem(["--ros-args", "--params-file", str(tmp_path / "no.yaml")]) == \
        f"params file {tmp_path / 'no.yaml'} does not exist"
    assert params_file_problem(["--ros-args", "--params-file", str(tmp_path)]) == f"params file {tmp_path} is a directory"
    text = params_file_problem(["--ros-args", "--params-file", str(good), "--params-file", str(bad)])
    assert text.startswith(f"params file {bad} is not valid YAML: ") and "(line 3, column 1)" in text
    assert "\n" not in text


def test_what_rcl_still_rejects_is_one_line_without_source_locations(tmp_path):
    from rclpy.impl.implementation_singleton import rclpy_implementation
    from rclpy.utilities import remove_ros_args

    def error(args):
        with pytest.raises(rclpy_implementation.RCLInvalidROSArgsError) as e:
            remove_ros_args(["x", *args])
        return ros_args_problem(e.value)

    status, text = error(["--ros-args", "-p", "foo"])
    assert status == 2 and text.startswith("ciae-panoptic-node: error: invalid ROS arguments: ")
    assert "'-p foo'" in text and "/project/" not in text and "\n" not in text
    status, text = error(["--ros-args", "--params-file"])  # no path: a usage error
    assert status == 2 and "trailing --params-file" in text and "/project/" not in text
    odd = tmp_path / "list.yaml"
    odd.write_text("- 1\n- 2\n")  # valid YAML, not a parameter file: a start-up failure naming it
    assert params_file_problem(["--ros-args", "--params-file", str(odd)]) is None
    status, text = error(["--ros-args", "--params-file", str(odd)])
    assert status == 1 and str(odd) in text and "/project/" not in text and "\n" not in text
