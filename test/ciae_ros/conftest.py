"""Fixtures of the ciae_ros tests: the model the node runs."""

from __future__ import annotations

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def node_weights(tmp_path_factory) -> str:
    """The shipped model (models/*.safetensors) when there is one, else a small random CIAE.

    The ROS tests check plumbing (shapes, headers, areas, rates, QoS), not accuracy, so a random
    model is a faithful stand-in until models/ ships one.
    """
    shipped = sorted((REPO / "models").glob("*.safetensors"))
    if shipped:
        return str(shipped[0])
    import torch

    from ciae_core.checkpoint import save_model
    from ciae_core.model import CIAE
    from ciae_core.synth import SYNTH_CATEGORIES

    torch.manual_seed(0)
    model = CIAE(SYNTH_CATEGORIES, backbone="resnet18", backbone_norm="gn", fpn_channels=64, head_channels=64,
                 tower_depth=2, embed_dim=16, embed_branch_channels=32, embedding_stride=4).eval()
    return str(save_model(tmp_path_factory.mktemp("model") / "tiny_random.safetensors", model))
