"""Tests of ciae_core.train_config: YAML schema, type/key errors, overrides, cross-field checks, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ciae_core.train_config import TrainConfig, TrainConfigError, dataclass_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "config" / "train"


def test_dataclass_from_dict_fills_defaults_and_converts():
    cfg = dataclass_from_dict(TrainConfig, {"solver": {"base_lr": "1e-4", "steps": [10, 20], "amp": False},
                                            "data": {"val": {"kind": "synthetic", "seed": 5}}})
    assert cfg.solver.base_lr == pytest.approx(1e-4)
    assert cfg.solver.amp == "off"  # YAML 1.1 reads a bare `off` as False
    assert cfg.data.val.seed == 5 and cfg.data.train.kind == "synthetic"
    assert cfg.solver.momentum == 0.9


def test_unknown_key_names_key_and_allowed_ones():
    with pytest.raises(TrainConfigError) as e:
        dataclass_from_dict(TrainConfig, {"solver": {"max_iters": 10}})
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
    with pytest.raises(TrainConfigError) as e:
        dataclass_from_dict(TrainConfig, raw)
    assert f"'{key}'" in str(e.value) and typename in str(e.value)


def test_load_config_overrides_and_cross_checks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"solver": {"max_iter": 10, "steps": [5]}}))
    cfg = load_config(path, ["solver.max_iter=20", "solver.steps=[8, 16]", "output.dir=somewhere"])
    assert cfg.solver.max_iter == 20 and cfg.solver.steps == [8, 16] and cfg.output.dir == "somewhere"
    with pytest.raises(TrainConfigError, match="solver.steps"):
        load_config(path, ["solver.steps=[9, 3]"])
    with pytest.raises(TrainConfigError, match="data.train.image_dir"):
        load_config(path, ["data.train.kind=coco"])
    with pytest.raises(TrainConfigError, match="section.key=value"):
        load_config(path, ["solver.max_iter"])
    with pytest.raises(TrainConfigError, match="unknown config key 'model.no_such_field'"):
        load_config(path, ["model.no_such_field=3"])
    with pytest.raises(TrainConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.solver.max_iter > 0


def test_paper_configs_match_the_paper():
    cfg = load_config(CONFIGS / "coco_r50_800_90k.yaml")
    s = cfg.solver
    assert (s.optimizer, s.base_lr, s.reference_batch, s.momentum, s.weight_decay) == ("sgd", 0.01, 16, 0.9, 1e-4)
    assert (s.max_iter, s.steps, s.gamma) == (90000, [60000, 80000], 0.1)
    assert cfg.data.input.min_size_train == [800] and cfg.data.input.max_size_train == 1333
    long = load_config(CONFIGS / "coco_r50_long_180k.yaml")
    assert long.solver.max_iter == 180000 and long.solver.steps == [120000, 160000]
    assert long.data.input.sampling == "range" and long.data.input.min_size_train == [640, 800]


def test_shipped_model_matches_its_training_config():
    """models/ciae_synthetic_small.safetensors was produced by config/train/synthetic_small.yaml."""
    from ciae_core.checkpoint import config_from_checkpoint
    from ciae_core.model import CIAEConfig
    from ciae_core.synth import SYNTH_CATEGORIES

    cfg = load_config(CONFIGS / "synthetic_small.yaml")
    expected = CIAEConfig(categories=SYNTH_CATEGORIES, **cfg.model).to_dict()
    shipped = config_from_checkpoint(REPO / "models" / "ciae_synthetic_small.safetensors").to_dict()
    assert shipped == expected
    assert (REPO / "models" / "ciae_synthetic_small.safetensors").stat().st_size < 30 * 2 ** 20
