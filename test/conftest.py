"""Test-wide setup.

DDS must stay on loopback and runs must not cross-talk: before anything can import rclpy we pin
``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` and pick a per-run ``ROS_DOMAIN_ID`` (derived from the
pid, inside the valid 0..101 range for Fast DDS on Linux). Subprocesses started by tests inherit
both through ``os.environ``.
"""

from __future__ import annotations

import os
import pathlib

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
# One compute thread per process: tests start node/camera subprocesses beside the test process
# on a 2-core machine, and oversubscribed torch threads made CPU tests up to 9x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "test" / "data"
COCO_SAMPLE = TEST_DATA / "coco-panoptic-sample"


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ImportError:
        pass


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="session")
def coco_sample() -> pathlib.Path:
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def shipped_model():
    """The model shipped in models/ (CPU, eval mode); the repository always carries one."""
    from ciae_core.checkpoint import load_model

    (path,) = sorted((REPO / "models").glob("*.safetensors"))
    return load_model(path).eval()
