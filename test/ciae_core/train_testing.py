"""Helpers shared by the training tests (test_distributed.py, cli/test_cli_train.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "config" / "train"


def weights_of(path) -> dict:
    """The tensors of a safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def tiny_model_and_optimizer():
    """The smoke config's model (seed 0) and its optimizer at learning rate 0.01."""
    from ciae_core.synth import SYNTH_CATEGORIES
    from ciae_core.train import build_model, build_optimizer
    from ciae_core.train_config import load_config

    cfg = load_config(CONFIGS / "synthetic_smoke.yaml")
    model = build_model(cfg.model, SYNTH_CATEGORIES, seed=0)
    return model, build_optimizer(model, cfg.solver, 0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
