"""Tests of ciae_core.train_state: RNG and optimizer state round trips, atomic checkpoints and their recovery."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ciae_core.train import build_model, build_optimizer
from ciae_core.train_config import SolverConfig, load_config
from ciae_core.train_state import (_join_tensors, _split_tensors, capture_rng_state, optimizer_state_from_json,
                                   optimizer_state_to_json, read_checkpoint_state, recover_checkpoint_dir,
                                   restore_rng_state, save_checkpoint)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "config" / "train"


def _tiny_model_and_optimizer():
    cfg = load_config(CONFIGS / "synthetic_smoke.yaml")
    from ciae_core.synth import SYNTH_CATEGORIES

    model = build_model(cfg.model, SYNTH_CATEGORIES, seed=0)
    return model, build_optimizer(model, cfg.solver, 0.01)


def test_rng_state_round_trip_through_json_and_tensors():
    import json

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.randn(), torch.rand(1)
    tensors = {}
    doc = json.loads(json.dumps(_split_tensors(capture_rng_state(), "rng", tensors)))
    expect = (random.random(), float(np.random.randn()), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(_join_tensors(doc, tensors))
    assert (random.random(), float(np.random.randn()), float(torch.rand(()))) == expect


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_state_round_trip_is_exact(kind):
    import json

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 2, 1))
    solver = SolverConfig(optimizer=kind)
    opt = build_optimizer(net, solver, lr=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [solver.weight_decay, solver.weight_decay_norm]
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    tensors = {}
    doc = json.loads(json.dumps(optimizer_state_to_json(opt, "optimizer", tensors)))
    opt2 = build_optimizer(net, solver, lr=0.5)
    opt2.load_state_dict(optimizer_state_from_json(doc, tensors))
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    for k in sd1["state"]:
        for name, v in sd1["state"][k].items():
            assert torch.equal(v, sd2["state"][k][name]), (k, name)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_checkpoint_write_leaves_the_old_checkpoint_untouched(tmp_path):
    model, opt = _tiny_model_and_optimizer()
    target = tmp_path / "ckpt"
    save_checkpoint(target, model, opt, 1, extra={"note": "old"})
    before = _snapshot(target)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(TypeError):  # fails after model.safetensors of the new one was written
        save_checkpoint(target, model, opt, 2, extra={"unserialisable": object()})
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    save_checkpoint(target, model, opt, 2)
    assert _snapshot(target) != before and read_checkpoint_state(target)[0]["iteration"] == 2


def test_interrupted_replacement_is_recovered(tmp_path):
    """A crash between 'move the old one aside' and 'rename the new one in' is repaired on load."""
    model, opt = _tiny_model_and_optimizer()
    target = tmp_path / "best"
    save_checkpoint(target, model, opt, 5)
    before = _snapshot(target)
    os.rename(target, tmp_path / ".old-best-12345")  # the state such a crash leaves
    (tmp_path / ".tmp-best-12345").mkdir()
    recover_checkpoint_dir(target)
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
