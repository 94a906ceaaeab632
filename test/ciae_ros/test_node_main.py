"""The node's process (ciae_ros/node_main.py) through its console entry: stopping it while it starts."""

from __future__ import annotations

import pathlib

import pytest

pytestmark = pytest.mark.ros
pytest.importorskip("rclpy")
pytest.importorskip("ciae_ros.msg")

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("moment,extra", [
    ("rclpy", []),                               # while rclpy loads (main imports it)
    ("torch._C", []),                            # while torch loads (building the Predictor)
    ("torch._C", ["--lifecycle", "--autostart"]),  # the same inside the lifecycle autostart
], ids=["rclpy", "torch", "lifecycle-autostart"])
def test_ctrl_c_while_starting_is_one_line_and_a_clean_exit(node_weights, moment, extra):
    """Ctrl-C in the first seconds (it used to print a 64-line double traceback, "partially
    initialized module 'torch'", or nothing at all): one line, exit status 0 (a requested
    shutdown, as ROS 2 nodes do). The console entry runs with Python's import-time report on, so
    SIGINT goes out right after a module of that import finished, i.e. in the middle of it."""
    import re
    import signal
    import subprocess

    from console_scripts import Output, console_command, console_env
    from ros_testing import child_env

    env = console_env(child_env(), PYTHONPROFILEIMPORTTIME="1")
    proc = subprocess.Popen([*console_command("ciae-panoptic-node"), *extra, "--ros-args", "-p",
                             f"weights:={node_weights}", "-r", "__ns:=/ctrlc"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Output(proc)
    assert out.wait_for(rf"^import time:.*\|\s+{re.escape(moment)}$", timeout=180), out.finish(30)[-50:]
    proc.send_signal(signal.SIGINT)
    lines = [ln for ln in out.finish(120) if not ln.startswith("import time:")]
    assert proc.returncode == 0, lines
    assert len(lines) == 1 and "interrupted while starting" in lines[0], lines
