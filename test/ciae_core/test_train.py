"""Tests of ciae_core.train: config validation, lr schedule, sample stream, checkpoint state,
smoke trainings (synthetic + COCO sample), exact resume, atomic checkpoints, 2-rank DDP."""

from __future__ import annotations

import itertools
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ciae_core import train as T

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "config" / "train"


# ------------------------------------------------------------------ configuration


def test_dataclass_from_dict_fills_defaults_and_converts():
    cfg = T.dataclass_from_dict(T.TrainConfig, {"solver": {"base_lr": "1e-4", "steps": [10, 20], "amp": False},
                                                "data": {"val": {"kind": "synthetic", "seed": 5}}})
    assert cfg.solver.base_lr == pytest.approx(1e-4)
    assert cfg.solver.amp == "off"  # YAML 1.1 reads a bare `off` as False
    assert cfg.data.val.seed == 5 and cfg.data.train.kind == "synthetic"
    assert cfg.solver.momentum == 0.9


def test_unknown_key_names_key_and_allowed_ones():
    with pytest.raises(T.TrainConfigError) as e:
        T.dataclass_from_dict(T.TrainConfig, {"solver": {"max_iters": 10}})
    msg = str(e.value)
    assert "solver.max_iters" in msg and "max_iter" in msg and "base_lr" in msg and "\n" not in msg


@pytest.mark.parametrize("raw,key,typename", [
    ({"solver": {"max_iter": "many"}}, "solver.max_iter", "int"),
    ({"solver": {"max_iter": 1.5}}, "solver.max_iter", "int"),
    ({"solver": {"steps": [1, "x"]}}, "solver.steps[1]", "int"),
    ({"solver": {"channels_last": "yes please"}}, "solver.channels_last", "bool"),
    ({"data": {"train": {"kind": "imagenet"}}}, "data.train.kind", "'coco' | 'synthetic'"),
    ({"output": 3}, "output", "mapping"),
])
def test_wrong_type_names_key_and_type(raw, key, typename):
    with pytest.raises(T.TrainConfigError) as e:
        T.dataclass_from_dict(T.TrainConfig, raw)
    assert f"'{key}'" in str(e.value) and typename in str(e.value)


def test_load_config_overrides_and_cross_checks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"solver": {"max_iter": 10, "steps": [5]}}))
    cfg = T.load_config(path, ["solver.max_iter=20", "solver.steps=[8, 16]", "output.dir=somewhere"])
    assert cfg.solver.max_iter == 20 and cfg.solver.steps == [8, 16] and cfg.output.dir == "somewhere"
    with pytest.raises(T.TrainConfigError, match="solver.steps"):
        T.load_config(path, ["solver.steps=[9, 3]"])
    with pytest.raises(T.TrainConfigError, match="data.train.image_dir"):
        T.load_config(path, ["data.train.kind=coco"])
    with pytest.raises(T.TrainConfigError, match="section.key=value"):
        T.load_config(path, ["solver.max_iter"])
    with pytest.raises(T.TrainConfigError, match="unknown config key 'model.no_such_field'"):
        T.load_config(path, ["model.no_such_field=3"])
    with pytest.raises(T.TrainConfigError, match="does not exist"):
        T.load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_validate(name):
    cfg = T.load_config(CONFIGS / name)
    assert cfg.solver.max_iter > 0


def test_paper_configs_match_the_paper():
    cfg = T.load_config(CONFIGS / "coco_r50_800_90k.yaml")
    s = cfg.solver
    assert (s.optimizer, s.base_lr, s.reference_batch, s.momentum, s.weight_decay) == ("sgd", 0.01, 16, 0.9, 1e-4)
    assert (s.max_iter, s.steps, s.gamma) == (90000, [60000, 80000], 0.1)
    assert cfg.data.input.min_size_train == [800] and cfg.data.input.max_size_train == 1333
    long = T.load_config(CONFIGS / "coco_r50_long_180k.yaml")
    assert long.solver.max_iter == 180000 and long.solver.steps == [120000, 160000]
    assert long.data.input.sampling == "range" and long.data.input.min_size_train == [640, 800]


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  lr: 0.1\n")
    assert T.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ciae-train: error: unknown config key 'solver.lr'") and "\n" not in err


# ------------------------------------------------------------------ learning rate


def test_linear_scaling_rule():
    assert T.scaled_learning_rate(0.01, 16, 16) == pytest.approx(0.01)
    assert T.scaled_learning_rate(0.01, 16, 64) == pytest.approx(0.04)
    assert T.scaled_learning_rate(0.01, 16, 2) == pytest.approx(0.00125)


def test_multistep_schedule_with_warmup():
    f = lambda it: T.learning_rate_at(it, 0.01, 90000, "multistep", [60000, 80000], 0.1, 1000, 0.001)  # noqa: E731
    assert f(0) == pytest.approx(1e-5)
    assert f(500) == pytest.approx(0.01 * (0.001 * 0.5 + 0.5))
    assert f(1000) == pytest.approx(0.01)
    assert f(59999) == pytest.approx(0.01)
    assert f(60000) == pytest.approx(0.001)
    assert f(80000) == pytest.approx(0.0001)
    vals = [f(i) for i in range(0, 1000, 50)]
    assert all(a < b for a, b in zip(vals, vals[1:]))


def test_cosine_schedule():
    f = lambda it: T.learning_rate_at(it, 0.1, 100, "cosine")  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(50) == pytest.approx(0.05) and f(100) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------ sample stream


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_is_deterministic_covers_epochs_and_resumes():
    a = _take(T.TrainingSampler(10, seed=3), 25)
    assert a == _take(T.TrainingSampler(10, seed=3), 25)
    assert a != _take(T.TrainingSampler(10, seed=4), 25)
    assert sorted(i for i, _ in a[:10]) == list(range(10)) and sorted(i for i, _ in a[10:20]) == list(range(10))
    assert len({s for _, s in a}) == 25  # every position has its own augmentation seed
    assert _take(T.TrainingSampler(10, seed=3, start=7), 18) == a[7:]


def test_sampler_shards_the_global_stream_across_ranks():
    full = _take(T.TrainingSampler(7, seed=1), 24)
    for start in (0, 6, 12):
        r0 = _take(T.TrainingSampler(7, seed=1, rank=0, world_size=2, start=start), 6)
        r1 = _take(T.TrainingSampler(7, seed=1, rank=1, world_size=2, start=start), 6)
        assert r0 == full[start::2][:6] and r1 == full[start + 1::2][:6]


def test_seeded_dataset_makes_augmentation_a_function_of_the_seed():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return (i, random.random(), float(np.random.rand()), float(torch.rand(())))

    ds = T.SeededDataset(Noisy())
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    a, b, c = ds[(1, 42)], ds[(1, 42)], ds[(1, 43)]
    assert a == b and a != c
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0] and (before[1] == after[1]).all() and torch.equal(before[2], after[2])


# ------------------------------------------------------------------ training state


def test_rng_state_round_trip_through_json_and_tensors():
    import json

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.randn(), torch.rand(1)
    tensors = {}
    doc = json.loads(json.dumps(T._split_tensors(T.capture_rng_state(), "rng", tensors)))
    expect = (random.random(), float(np.random.randn()), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    T.restore_rng_state(T._join_tensors(doc, tensors))
    assert (random.random(), float(np.random.randn()), float(torch.rand(()))) == expect


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_state_round_trip_is_exact(kind):
    import json

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 2, 1))
    solver = T.SolverConfig(optimizer=kind)
    opt = T.build_optimizer(net, solver, lr=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [solver.weight_decay, solver.weight_decay_norm]
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    tensors = {}
    doc = json.loads(json.dumps(T.optimizer_state_to_json(opt, "optimizer", tensors)))
    opt2 = T.build_optimizer(net, solver, lr=0.5)
    opt2.load_state_dict(T.optimizer_state_from_json(doc, tensors))
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    for k in sd1["state"]:
        for name, v in sd1["state"][k].items():
            assert torch.equal(v, sd2["state"][k][name]), (k, name)
