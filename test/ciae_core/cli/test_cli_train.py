"""Tests of ciae-train (ciae_core.cli.train): one-line errors, smoke trainings (synthetic + COCO sample),
exact resume, killed runs, AMP on CUDA, torchrun with 2 ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ciae_core.cli.train import main
from ciae_core.train import build_model, build_optimizer
from ciae_core.train_config import load_config
from ciae_core.train_state import find_last_checkpoint, load_checkpoint, read_checkpoint_state

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "config" / "train"


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _tiny_model_and_optimizer():
    cfg = load_config(CONFIGS / "synthetic_smoke.yaml")
    from ciae_core.synth import SYNTH_CATEGORIES

    model = build_model(cfg.model, SYNTH_CATEGORIES, seed=0)
    return model, build_optimizer(model, cfg.solver, 0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  lr: 0.1\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ciae-train: error: unknown config key 'solver.lr'") and "\n" not in err


def test_synthetic_smoke_training_writes_everything(tmp_path, capsys):
    from ciae_core.checkpoint import load_model

    out = tmp_path / "run"
    rc = main(["--config", str(CONFIGS / "synthetic_smoke.yaml"), "--out", str(out), "--device", "cpu"])
    assert rc == 0
    assert "finished at iteration 4" in capsys.readouterr().out
    model = load_model(out / "model.safetensors")
    assert [c.name for c in model.categories][:4] == ["disc", "box", "triangle", "ring"]
    ckpts = out / "checkpoints"
    assert os.readlink(ckpts / "last") == "iter_0000004"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["iter_0000002", "iter_0000004",
                                                                                   "last"]
    state, _ = read_checkpoint_state(ckpts / "last")
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
    assert main(["--config", str(path), "--out", str(out)]) == 0
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
    assert main(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ciae-train: error:") and "nope" in err and "\n" not in err


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    assert main(["--config", str(CONFIGS / "synthetic_smoke.yaml"), "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    common = ["--config", str(CONFIGS / "synthetic_smoke.yaml"), "--set", "solver.max_iter=4", "--set",
              "solver.steps=[3]", "--set", "eval.period=-1", "--set", "data.num_workers=1",
              "--set", "output.checkpoint_period=100", "--set", "output.tensorboard=false"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--out", str(straight)]) == 0
    assert main([*common, "--out", str(split), "--stop-at", "2"]) == 0
    assert not (split / "model.safetensors").exists()
    assert os.readlink(split / "checkpoints" / "last") == "iter_0000002"
    assert main([*common, "--out", str(split), "--resume"]) == 0
    a, b = _weights(straight / "model.safetensors"), _weights(split / "model.safetensors")
    _assert_same_tensors(a, b)
    (sa, ta), (sb, tb) = (read_checkpoint_state(d / "checkpoints" / "last") for d in (straight, split))
    assert sa["iteration"] == sb["iteration"] == 4
    _assert_same_tensors({k: v for k, v in ta.items() if k.startswith("optimizer")},
                         {k: v for k, v in tb.items() if k.startswith("optimizer")})
    # and the run is not trivially constant: weights moved away from the initialisation
    from ciae_core.synth import SYNTH_CATEGORIES

    init = build_model(load_config(CONFIGS / "synthetic_smoke.yaml").model, SYNTH_CATEGORIES, seed=0).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a if k in init)


@pytest.mark.slow
def test_killed_training_always_leaves_a_complete_checkpoint(tmp_path):
    """SIGKILL a training that checkpoints every iteration at several moments: whatever `last`
    points to (and every visible checkpoint) is complete and loadable, and --resume works."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ciae_core.cli.train", "--config", str(CONFIGS / "synthetic_smoke.yaml"), "--out",
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
        last = find_last_checkpoint(out)
        assert last is not None
        visible = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("iter_")]
        assert visible
        for d in visible:
            state = load_checkpoint(d, model, restore_rng=False)
            assert state["iteration"] == int(d.name.split("_")[1])
    rc = subprocess.run([*cmd, "--resume", "--set", "solver.max_iter=" + str(state["iteration"] + 2)], cwd=REPO,
                        env=env, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr[-2000:]


@pytest.mark.cuda
@pytest.mark.parametrize("amp,channels_last", [("bf16", True), ("fp16", False), ("off", False)])
def test_cuda_training_with_amp(tmp_path, amp, channels_last):
    from ciae_core.checkpoint import load_model

    out = tmp_path / "run"
    assert main(["--config", str(CONFIGS / "synthetic_smoke.yaml"), "--out", str(out), "--device", "cuda",
                 "--set", f"solver.amp={amp}", "--set", f"solver.channels_last={str(channels_last).lower()}"]) == 0
    state, tensors = read_checkpoint_state(out / "checkpoints" / "last")
    assert state["iteration"] == 4 and (state["scaler"] is not None) == (amp == "fp16")
    model = load_model(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


@pytest.mark.slow
def test_torchrun_cli_two_ranks(tmp_path):
    """The documented command line: torchrun + `-m ciae_core.cli.train`, 2 gloo ranks on CPU. The run
    ends with the replica check (bit-identical weights on all ranks) and writes from rank 0 only."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "ciae_core.cli.train", "--config", str(CONFIGS / "synthetic_smoke.yaml"), "--out", str(out),
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
