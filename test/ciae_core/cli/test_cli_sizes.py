"""Image sizes on the command lines (ciae_core/cli/sizes.py): WIDTHxHEIGHT everywhere."""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

import pytest

from ciae_core.cli.sizes import parse_size, size_type

REPO = pathlib.Path(__file__).resolve().parents[3]


def test_width_comes_first():
    assert parse_size("640x480") == (640, 480)
    assert parse_size("320X240") == (320, 240)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("640")
    with pytest.raises(ValueError, match="at least 32"):
        parse_size("640x16", minimum=32)
    with pytest.raises(ValueError, match="multiples of 32"):
        parse_size("640x470", multiple_of=32)
    assert size_type(as_text=True)("640X480") == "640x480"
    with pytest.raises(argparse.ArgumentTypeError, match="--size"):
        size_type()("big")


@pytest.mark.parametrize("module", ["ciae_ros.demo", "ciae_ros.bench_node"])
def test_ros_tools_refuse_a_size_that_is_not_width_x_height(module):
    """ciae-demo and ciae-bench --node check --size before starting anything (usage error, 2)."""
    r = subprocess.run([sys.executable, "-m", module, "--size", "640"], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 2 and "WIDTHxHEIGHT" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0 and "WIDTHxHEIGHT" in r.stdout
