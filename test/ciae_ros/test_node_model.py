"""ciae_ros.node_model: the node's Predictor from parameter values, without a node (no ROS needed;
the node loading and reloading it over DDS is tested in test_node.py)."""

from __future__ import annotations

import hashlib
import pathlib

import pytest

from ciae_ros.node_model import load_model, predictor_settings
from ciae_ros.node_params import SPECS, NodeStartupError


def _values(**overrides) -> dict:
    return {**{name: spec.default for name, spec in SPECS.items()}, **overrides}


def test_load_model_names_the_exact_model_and_resolves_its_defaults(node_weights):
    from ciae_core.cpu_features import auto_engine

    model = load_model(_values(weights=node_weights))
    path = pathlib.Path(node_weights)
    # engine "auto" (the default): the CPU default for this machine's features, reported as chosen
    engine, _, reason = auto_engine("cpu", str(path))
    assert (model.name, model.weights, model.engine, model.device) == (path.stem, str(path), engine, "cpu")
    assert model.predictor.engine_reason == reason
    assert model.version == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    pred = model.predictor
    cfg = pred.config
    # input_size 0 and thresholds -1 are "the model's own": resolved with the model's config ...
    assert predictor_settings(_values(), cfg, pred.default_input_size) == {
        "input_size": pred.default_input_size, "score_threshold": cfg.score_threshold,
        "nms_threshold": cfg.nms_threshold, "instance_score_threshold": cfg.instance_score_threshold,
        "stuff_area_min": cfg.min_stuff_area}
    assert pred.input_size == pred.default_input_size
    # ... left out without it (the Predictor then uses its defaults), and given values pass through
    assert predictor_settings(_values()) == {}
    assert predictor_settings(_values(input_size=256, nms_threshold=0.5), cfg) == {
        "input_size": 256, "nms_threshold": 0.5, "score_threshold": cfg.score_threshold,
        "instance_score_threshold": cfg.instance_score_threshold, "stuff_area_min": cfg.min_stuff_area}


def test_load_model_failures_are_one_line_startup_errors(tmp_path):
    with pytest.raises(NodeStartupError, match="does not exist"):
        load_model(_values(weights=str(tmp_path / "missing.safetensors")))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.raises(NodeStartupError) as exc:
        load_model(_values(weights=str(corrupt)))
    assert "corrupt.safetensors" in str(exc.value) and "\n" not in str(exc.value)


def test_the_model_handle_carries_the_domain_and_its_warning(node_weights, tmp_path):
    """The shipped model says synthetic-shapes (the node logs the warning and reports the domain);
    a model file without the key is unknown and gets no warning."""
    import torch

    from ciae_core.checkpoint import load_model as load_checkpoint, save_model
    from ciae_core.model_domain import read_model_domain

    model = load_model(_values(weights=node_weights))
    domain, _ = read_model_domain(node_weights)
    assert model.domain == domain
    if domain == "synthetic-shapes":
        assert model.domain_warning.startswith(f"{pathlib.Path(node_weights).name}: synthetic-only model: it knows ")
    net = load_checkpoint(node_weights)
    net.domain = None
    plain = save_model(tmp_path / "no_domain.safetensors", net)
    assert torch.equal(load_checkpoint(plain).memory, net.memory)
    handle = load_model(_values(weights=str(plain)))
    assert handle.domain is None and handle.domain_warning is None


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_startup_hints_speak_ros_parameters_or_the_tools_options(node_weights):
    with pytest.raises(NodeStartupError) as exc:
        load_model(_values(weights=node_weights, device="cuda"))
    assert str(exc.value) == "device:=cuda requested but no CUDA GPU is available; use device:=cpu"
    with pytest.raises(NodeStartupError) as exc:  # ciae-bag: its own options
        load_model(_values(weights=node_weights, device="cuda"), hint_style="option", options={"device"})
    assert str(exc.value) == "--device cuda requested but no CUDA GPU is available; use --device cpu"
