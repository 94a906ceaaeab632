"""Tests of ciae_core.train: config validation, lr schedule, sample stream, checkpoint state,
smoke trainings (synthetic + COCO sample), exact resume, atomic checkpoints, 2-rank DDP."""

from __future__ import annotations

import itertools
import json
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


# ------------------------------------------------------------------ training runs


def _smoke_cfg(tmp_path, *overrides):
    return T.load_config(CONFIGS / "synthetic_smoke.yaml", [f"output.dir={tmp_path / 'run'}", *overrides])


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_synthetic_smoke_training_writes_everything(tmp_path, capsys):
    from ciae_core.checkpoint import load_model

    out = tmp_path / "run"
    rc = T.main(["--config", str(CONFIGS / "synthetic_smoke.yaml"), "--out", str(out), "--device", "cpu"])
    assert rc == 0
    assert "finished at iteration 4" in capsys.readouterr().out
    model = load_model(out / "model.safetensors")
    assert [c.name for c in model.categories][:4] == ["disc", "box", "triangle", "ring"]
    ckpts = out / "checkpoints"
    assert os.readlink(ckpts / "last") == "iter_0000004"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["iter_0000002", "iter_0000004",
                                                                                   "last"]
    state, _ = T.read_checkpoint_state(ckpts / "last")
    assert state["iteration"] == 4 and set(state["extra"]["metrics"]) >= {"PQ", "PQ_th", "PQ_st"}
    assert (out / "best" / "model.safetensors").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["iteration"] == 4 and 0.0 <= summary["metrics"]["PQ"] <= 100.0
    tb_tags = _tensorboard_tags(out / "tensorboard")
    assert {"train/loss", "train/lr", "train/loss_cls", "train/loss_cae", "train/loss_iae", "val/PQ"} <= tb_tags


def _tensorboard_tags(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_training_reduces_the_loss_on_a_fixed_batch(tmp_path):
    """Overfitting two images: the total loss after 12 steps is clearly below the first one."""
    cfg = _smoke_cfg(tmp_path, "data.train.num_images=2", "solver.max_iter=12", "solver.steps=[100]",
                     "solver.warmup_iters=0", "data.input.hflip=false", "solver.optimizer=adamw",
                     "solver.base_lr=0.003", "eval.period=-1", "output.checkpoint_period=100", "output.tensorboard=false")
    ctx = T.DistContext()
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


def test_coco_sample_smoke_training(tmp_path):
    sample = REPO / "test" / "data" / "coco-panoptic-sample"
    coco = {"kind": "coco", "image_dir": str(sample / "images"), "panoptic_dir": str(sample / "panoptic"),
            "panoptic_json": str(sample / "panoptic_examples.json")}
    raw = yaml.safe_load((CONFIGS / "synthetic_smoke.yaml").read_text())
    raw["data"]["train"] = dict(coco)
    raw["data"]["val"] = dict(coco)
    raw["data"]["input"].update(min_size_train=[96, 128], sampling="range", max_size_train=192, min_size_test=128,
                                max_size_test=192)
    raw["solver"].update(max_iter=2, steps=[], warmup_iters=1)
    path = tmp_path / "coco_smoke.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert T.main(["--config", str(path), "--out", str(out)]) == 0
    from ciae_core.checkpoint import load_model

    model = load_model(out / "model.safetensors")
    assert model.config.num_things == 80 and model.config.num_stuff == 53
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["iteration"] == 2 and "PQ" in summary["metrics"]


def test_missing_coco_data_is_a_one_line_error(tmp_path, capsys):
    raw = yaml.safe_load((CONFIGS / "synthetic_smoke.yaml").read_text())
    raw["data"]["train"] = {"kind": "coco", "image_dir": str(tmp_path / "nope"), "panoptic_dir": str(tmp_path),
                            "panoptic_json": str(tmp_path / "x.json")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert T.main(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ciae-train: error:") and "nope" in err and "\n" not in err


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    assert T.main(["--config", str(CONFIGS / "synthetic_smoke.yaml"), "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    common = ["--config", str(CONFIGS / "synthetic_smoke.yaml"), "--set", "solver.max_iter=4", "--set",
              "solver.steps=[3]", "--set", "eval.period=-1", "--set", "data.num_workers=1",
              "--set", "output.checkpoint_period=100", "--set", "output.tensorboard=false"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert T.main([*common, "--out", str(straight)]) == 0
    assert T.main([*common, "--out", str(split), "--stop-at", "2"]) == 0
    assert not (split / "model.safetensors").exists()
    assert os.readlink(split / "checkpoints" / "last") == "iter_0000002"
    assert T.main([*common, "--out", str(split), "--resume"]) == 0
    a, b = _weights(straight / "model.safetensors"), _weights(split / "model.safetensors")
    _assert_same_tensors(a, b)
    (sa, ta), (sb, tb) = (T.read_checkpoint_state(d / "checkpoints" / "last") for d in (straight, split))
    assert sa["iteration"] == sb["iteration"] == 4
    _assert_same_tensors({k: v for k, v in ta.items() if k.startswith("optimizer")},
                         {k: v for k, v in tb.items() if k.startswith("optimizer")})
    # and the run is not trivially constant: weights moved away from the initialisation
    from ciae_core.synth import SYNTH_CATEGORIES

    init = T.build_model(T.load_config(CONFIGS / "synthetic_smoke.yaml").model, SYNTH_CATEGORIES, seed=0).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a if k in init)


# ------------------------------------------------------------------ atomic checkpoints


def _tiny_model_and_optimizer():
    cfg = T.load_config(CONFIGS / "synthetic_smoke.yaml")
    from ciae_core.synth import SYNTH_CATEGORIES

    model = T.build_model(cfg.model, SYNTH_CATEGORIES, seed=0)
    return model, T.build_optimizer(model, cfg.solver, 0.01)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_checkpoint_write_leaves_the_old_checkpoint_untouched(tmp_path):
    model, opt = _tiny_model_and_optimizer()
    target = tmp_path / "ckpt"
    T.save_checkpoint(target, model, opt, 1, extra={"note": "old"})
    before = _snapshot(target)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(TypeError):  # fails after model.safetensors of the new one was written
        T.save_checkpoint(target, model, opt, 2, extra={"unserialisable": object()})
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    T.save_checkpoint(target, model, opt, 2)
    assert _snapshot(target) != before and T.read_checkpoint_state(target)[0]["iteration"] == 2


def test_interrupted_replacement_is_recovered(tmp_path):
    """A crash between 'move the old one aside' and 'rename the new one in' is repaired on load."""
    model, opt = _tiny_model_and_optimizer()
    target = tmp_path / "best"
    T.save_checkpoint(target, model, opt, 5)
    before = _snapshot(target)
    os.rename(target, tmp_path / ".old-best-12345")  # the state such a crash leaves
    (tmp_path / ".tmp-best-12345").mkdir()
    T.recover_checkpoint_dir(target)
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


@pytest.mark.slow
def test_killed_training_always_leaves_a_complete_checkpoint(tmp_path):
    """SIGKILL a training that checkpoints every iteration at several moments: whatever `last`
    points to (and every visible checkpoint) is complete and loadable, and --resume works."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ciae_core.train", "--config", str(CONFIGS / "synthetic_smoke.yaml"), "--out",
           str(out), "--set", "solver.max_iter=400", "--set", "output.checkpoint_period=1",
           "--set", "output.keep_last=3", "--set", "eval.period=-1", "--set", "output.tensorboard=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    model, _ = _tiny_model_and_optimizer()
    for kill_after in (0.35, 0.8):
        proc = subprocess.Popen([*cmd, *(["--resume"] if (out / "checkpoints" / "last").exists() else [])],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while not (out / "checkpoints" / "last").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        last = T.find_last_checkpoint(out)
        assert last is not None
        visible = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("iter_")]
        assert visible
        for d in visible:
            state = T.load_checkpoint(d, model, restore_rng=False)
            assert state["iteration"] == int(d.name.split("_")[1])
    rc = subprocess.run([*cmd, "--resume", "--set", "solver.max_iter=" + str(state["iteration"] + 2)], cwd=REPO,
                        env=env, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr[-2000:]


# ------------------------------------------------------------------ distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file

    cfg = T.load_config(CONFIGS / "synthetic_smoke.yaml", ["solver.ims_per_batch=4", "solver.max_iter=3",
                                                            "eval.period=-1", "output.tensorboard=false"])
    try:
        result = T.train(cfg, out_dir=Path(tmp) / f"out{rank}")
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
                  str(Path(tmp) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_ranks_end_with_identical_weights(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = _weights(tmp_path / "rank0.safetensors"), _weights(tmp_path / "rank1.safetensors")
    _assert_same_tensors(r0, r1)
    assert (tmp_path / "out0" / "model.safetensors").is_file()
    assert not (tmp_path / "out1").exists()  # only rank 0 writes
    # the memory embeddings moved (batch means were all-reduced, not left at the initialisation)
    model, _ = _tiny_model_and_optimizer()
    assert not torch.equal(model.state_dict()["memory"], r0["memory"])


def _eval_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    """One gloo rank running the in-training evaluation of the shipped model on 5 held-out scenes."""
    import torch.distributed as dist

    from ciae_core.checkpoint import load_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cfg = T.load_config(CONFIGS / "synthetic_small.yaml", ["data.val.max_images=5"])
        val, _ = T.build_dataset(cfg.data.val, cfg.data.input, train=False)
        model = load_model(REPO / "models" / "ciae_synthetic_small.safetensors")
        (Path(tmp) / f"eval{rank}.json").write_text(json.dumps(T.evaluate(model, val, torch.device("cpu"))))
    finally:
        dist.destroy_process_group()


def test_evaluation_is_sharded_over_ranks_and_gives_the_whole_sets_metrics(tmp_path):
    """Two gloo ranks split 5 images 3 + 2 and both return what one process computes on all 5."""
    import torch.multiprocessing as mp

    from ciae_core.checkpoint import load_model

    cfg = T.load_config(CONFIGS / "synthetic_small.yaml", ["data.val.max_images=5"])
    val, _ = T.build_dataset(cfg.data.val, cfg.data.input, train=False)
    single = T.evaluate(load_model(REPO / "models" / "ciae_synthetic_small.safetensors"), val, torch.device("cpu"))
    assert single["num_images"] == 5
    mp.start_processes(_eval_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"eval{rank}.json").read_text())
        assert got["num_images"] == 5  # each image once: not 10 (everyone on everything), not 3 or 2
        assert got == pytest.approx(single, abs=1e-9)


# ------------------------------------------------------------------ the shipped model


def test_shipped_model_matches_its_training_config():
    """models/ciae_synthetic_small.safetensors was produced by config/train/synthetic_small.yaml."""
    from ciae_core.checkpoint import config_from_checkpoint
    from ciae_core.model import CIAEConfig
    from ciae_core.synth import SYNTH_CATEGORIES

    cfg = T.load_config(CONFIGS / "synthetic_small.yaml")
    expected = CIAEConfig(categories=SYNTH_CATEGORIES, **cfg.model).to_dict()
    shipped = config_from_checkpoint(REPO / "models" / "ciae_synthetic_small.safetensors").to_dict()
    assert shipped == expected
    assert (REPO / "models" / "ciae_synthetic_small.safetensors").stat().st_size < 30 * 2 ** 20


@pytest.mark.slow
def test_shipped_model_quality_on_held_out_synthetic_scenes():
    """PQ >= 55 on 10 held-out scenes (seed 1000, never seen in training) through the in-training evaluator."""
    from ciae_core.checkpoint import load_model

    cfg = T.load_config(CONFIGS / "synthetic_small.yaml", ["data.val.max_images=10"])
    val, _ = T.build_dataset(cfg.data.val, cfg.data.input, train=False)
    model = load_model(REPO / "models" / "ciae_synthetic_small.safetensors")
    metrics = T.evaluate(model, val, torch.device("cpu"))
    assert metrics["PQ"] >= 55.0, metrics
    assert metrics["PQ_th"] >= 40.0 and metrics["PQ_st"] >= 80.0, metrics


@pytest.mark.cuda
@pytest.mark.parametrize("amp,channels_last", [("bf16", True), ("fp16", False), ("off", False)])
def test_cuda_training_with_amp(tmp_path, amp, channels_last):
    from ciae_core.checkpoint import load_model

    out = tmp_path / "run"
    assert T.main(["--config", str(CONFIGS / "synthetic_smoke.yaml"), "--out", str(out), "--device", "cuda",
                   "--set", f"solver.amp={amp}", "--set", f"solver.channels_last={str(channels_last).lower()}"]) == 0
    state, tensors = T.read_checkpoint_state(out / "checkpoints" / "last")
    assert state["iteration"] == 4 and (state["scaler"] is not None) == (amp == "fp16")
    model = load_model(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


@pytest.mark.slow
def test_torchrun_cli_two_ranks(tmp_path):
    """The documented command line: torchrun + `-m ciae_core.train`, 2 gloo ranks on CPU. The run
    ends with the replica check (bit-identical weights on all ranks) and writes from rank 0 only."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "ciae_core.train", "--config", str(CONFIGS / "synthetic_smoke.yaml"), "--out", str(out),
           "--set", "solver.ims_per_batch=4", "--set", "solver.max_iter=2", "--set", "output.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 4 (2 per process)" in proc.stderr
    # both ranks evaluated one of the 2 validation scenes; rank 0 logs the whole set's result
    assert (proc.stdout + proc.stderr).count("eval at iter 2 (") == 1
    assert "s, 2 images): PQ" in proc.stdout + proc.stderr
    assert proc.stdout.count("finished at iteration 2") == 1  # rank 0 prints, rank 1 does not
    assert (out / "model.safetensors").is_file()
