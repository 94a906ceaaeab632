"""Tests of ciae_core.train: lr schedule, the loop reducing the loss, the in-training evaluation
(sharded over 2 ranks) and the shipped model's quality through it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from ciae_core import train as T
from ciae_core.distributed import DistContext
from ciae_core.train_config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "config" / "train"


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


# ------------------------------------------------------------------ training runs


def _smoke_cfg(tmp_path, *overrides):
    return load_config(CONFIGS / "synthetic_smoke.yaml", [f"output.dir={tmp_path / 'run'}", *overrides])


def test_training_reduces_the_loss_on_a_fixed_batch(tmp_path):
    """Overfitting two images: the total loss after 12 steps is clearly below the first one."""
    cfg = _smoke_cfg(tmp_path, "data.train.num_images=2", "solver.max_iter=12", "solver.steps=[100]",
                     "solver.warmup_iters=0", "data.input.hflip=false", "solver.optimizer=adamw",
                     "solver.base_lr=0.003", "eval.period=-1", "output.checkpoint_period=100", "output.tensorboard=false")
    ctx = DistContext()
    losses = []
    handler = _LossCollector(losses)
    T.logger.addHandler(handler)
    T.logger.setLevel("INFO")
    try:
        T.train(cfg, ctx=ctx)
    finally:
        T.logger.removeHandler(handler)
    assert len(losses) == 12
    assert losses[-1] < 0.7 * losses[0], losses


class _LossCollector(__import__("logging").Handler):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("iter ") and "  loss " in msg:
            self.sink.append(float(msg.split("  loss ")[1].split()[0]))


# ------------------------------------------------------------------ evaluation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    """One gloo rank running the in-training evaluation of the shipped model on 5 held-out scenes."""
    import torch.distributed as dist

    from ciae_core.checkpoint import load_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cfg = load_config(CONFIGS / "synthetic_small.yaml", ["data.val.max_images=5"])
        val, _ = T.build_dataset(cfg.data.val, cfg.data.input, train=False)
        model = load_model(REPO / "models" / "ciae_synthetic_small.safetensors")
        (Path(tmp) / f"eval{rank}.json").write_text(json.dumps(T.evaluate(model, val, torch.device("cpu"))))
    finally:
        dist.destroy_process_group()


def test_evaluation_is_sharded_over_ranks_and_gives_the_whole_sets_metrics(tmp_path):
    """Two gloo ranks split 5 images 3 + 2 and both return what one process computes on all 5."""
    import torch.multiprocessing as mp

    from ciae_core.checkpoint import load_model

    cfg = load_config(CONFIGS / "synthetic_small.yaml", ["data.val.max_images=5"])
    val, _ = T.build_dataset(cfg.data.val, cfg.data.input, train=False)
    single = T.evaluate(load_model(REPO / "models" / "ciae_synthetic_small.safetensors"), val, torch.device("cpu"))
    assert single["num_images"] == 5
    mp.start_processes(_eval_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"eval{rank}.json").read_text())
        assert got["num_images"] == 5  # each image once: not 10 (everyone on everything), not 3 or 2
        assert got == pytest.approx(single, abs=1e-9)


# ------------------------------------------------------------------ the shipped model


@pytest.mark.slow
def test_shipped_model_quality_on_held_out_synthetic_scenes():
    """PQ >= 55 on 10 held-out scenes (seed 1000, never seen in training) through the in-training evaluator."""
    from ciae_core.checkpoint import load_model

    cfg = load_config(CONFIGS / "synthetic_small.yaml", ["data.val.max_images=10"])
    val, _ = T.build_dataset(cfg.data.val, cfg.data.input, train=False)
    model = load_model(REPO / "models" / "ciae_synthetic_small.safetensors")
    metrics = T.evaluate(model, val, torch.device("cpu"))
    assert metrics["PQ"] >= 55.0, metrics
    assert metrics["PQ_th"] >= 40.0 and metrics["PQ_st"] >= 80.0, metrics

