"""Tests of ciae-train (ciae_core.cli.train): one-line errors, smoke trainings (synthetic + COCO sample),
exact resume, killed runs, AMP on CUDA, torchrun with 2 ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ciae_core.cli.train import main
from ciae_core.train import build_model
from ciae_core.train_config import load_config
from ciae_core.train_state import find_last_checkpoint, load_checkpoint, read_checkpoint_state

from train_testing import CONFIGS, REPO, assert_same_tensors, free_port, tiny_model_and_optimizer, weights_of


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
    a, b = weights_of(straight / "model.safetensors"), weights_of(split / "model.safetensors")
    assert_same_tensors(a, b)
    (sa, ta), (sb, tb) = (read_checkpoint_state(d / "checkpoints" / "last") for d in (straight, split))
    assert sa["iteration"] == sb["iteration"] == 4
    assert_same_tensors({k: v for k, v in ta.items() if k.startswith("optimizer")},
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
    model, _ = tiny_model_and_optimizer()
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
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


# ---------------------------------------------------------------------------------------------
# a first run: --data, --stop-at, warnings, --device cuda:N, Ctrl-C (issue 16)


@pytest.fixture(scope="module")
def synth_folder(tmp_path_factory):
    """A COCO-panoptic folder as `ciae-synth --out DIR` writes it (8 tiny scenes)."""
    from ciae_core.synth import write_dataset

    out = tmp_path_factory.mktemp("synth") / "synth_train"
    write_dataset(str(out), 8, 64, 64, seed=3)
    return out


def _smoke(*extra):
    return ["--config", str(CONFIGS / "synthetic_smoke.yaml"), "--set", "output.tensorboard=false", *extra]


def test_data_option_trains_on_a_ciae_synth_folder_and_equals_its_set_form(synth_folder, tmp_path, capsys):
    from ciae_core.checkpoint import load_model
    from ciae_core.cli.train import data_overrides

    set_form = ["data.train.kind=coco", f"data.train.image_dir={synth_folder / 'images'}",
                f"data.train.panoptic_dir={synth_folder / 'panoptic'}",
                f"data.train.panoptic_json={synth_folder / 'panoptic.json'}"]
    assert data_overrides("train", str(synth_folder), "--data") == set_form  # what the README documents
    out = tmp_path / "run"
    assert main([*_smoke("--set", "solver.max_iter=2", "--set", "solver.steps=[]", "--set", "solver.warmup_iters=1"),
                 "--data", str(synth_folder), "--out", str(out)]) == 0
    recorded = yaml.safe_load((out / "config.yaml").read_text())["data"]["train"]
    assert recorded["kind"] == "coco" and recorded["image_dir"] == str(synth_folder / "images")
    model = load_model(out / "model.safetensors")
    assert model.domain == "synthetic-shapes"  # ciae-synth's categories: the model is synthetic-only
    assert f"model: {out / 'model.safetensors'}" in capsys.readouterr().out


@pytest.mark.parametrize("layout,expected", [("missing", "no such folder"),
                                             ("empty", "not a COCO-panoptic folder as ciae-synth writes it")])
def test_data_option_errors_are_one_line(tmp_path, capsys, layout, expected):
    folder = tmp_path / "data"
    if layout == "empty":
        folder.mkdir()
    assert main([*_smoke(), "--data", str(folder), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ciae-train: error: --data") and expected in err and "\n" not in err


def test_stop_at_names_a_checkpoint_that_exists(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_smoke("--set", "eval.period=-1"), "--out", str(out), "--stop-at", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("stopped at iteration 2 of 4 (--stop-at); last checkpoint "), last
    named = Path(last.split("last checkpoint ", 1)[1].split(" (iteration", 1)[0])
    assert named.is_dir() and (named / "model.safetensors").is_file() and named == find_last_checkpoint(out)
    assert "--resume" in last and "--stop-at" not in last.split("resume with:", 1)[1]
    assert not (out / "model.safetensors").exists()


def test_warmup_longer_than_the_run_and_amp_on_the_cpu_are_warned(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="ciae_core.train"):
        assert main([*_smoke("--set", "eval.period=-1", "--set", "solver.warmup_iters=4", "--set", "solver.amp=bf16"),
                     "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("solver.warmup_iters (4) >= solver.max_iter (4)") for w in warnings), warnings
    assert any(w.startswith("solver.amp=bf16 is ignored on cpu") for w in warnings), warnings


def test_no_warning_for_a_sound_config(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="ciae_core.train"):
        assert main([*_smoke("--set", "eval.period=-1", "--set", "solver.max_iter=2"), "--device", "cpu",
                     "--set", "solver.warmup_iters=1", "--set", "solver.steps=[]", "--out", str(tmp_path / "r")]) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "ciae_core.train"]


def test_device_takes_cuda_index_and_hints_speak_command_line(tmp_path, capsys):
    from ciae_core.train_config import TrainConfigError

    assert load_config(CONFIGS / "synthetic_smoke.yaml", ["device=cuda:1"]).device == "cuda:1"
    with pytest.raises(TrainConfigError, match="'device' must be auto, cpu, cuda or cuda:N"):
        load_config(CONFIGS / "synthetic_smoke.yaml", ["device=gpu0"])
    with pytest.raises(SystemExit):
        main([*_smoke(), "--device", "cuda:x"])
    assert "must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*_smoke(), "--device", "cuda:0", "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "ciae-train: error: device 'cuda:0' requested but torch sees no CUDA GPU (use --device cpu)"


@pytest.mark.cuda
def test_device_cuda_index_trains_on_that_gpu(tmp_path):
    from ciae_core.train_config import load_config as load

    index = torch.cuda.device_count() - 1
    out = tmp_path / "run"
    assert main([*_smoke("--set", "eval.period=-1", "--set", "solver.max_iter=2"), "--device", f"cuda:{index}",
                 "--out", str(out)]) == 0
    assert load(out / "config.yaml").device == f"cuda:{index}"


def _start_training(out, *extra):
    from console_scripts import Output, console_command, console_env

    proc = subprocess.Popen([*console_command("ciae-train"), *_smoke("--set", "solver.max_iter=400", "--set",
                                                                     "eval.period=-1", *extra), "--out", str(out)],
                            cwd=REPO, env=console_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, Output(proc)


def test_ctrl_c_names_the_checkpoint_to_resume_from_and_resuming_works(tmp_path):
    """Ctrl-C during training (it printed a traceback): exit 130 and one line naming the last
    complete checkpoint and the command that continues; that command resumes from it."""
    import shlex
    import signal
    import time

    out = tmp_path / "run"
    proc, output = _start_training(out)
    deadline = time.monotonic() + 300
    while find_last_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert find_last_checkpoint(out) is not None, output.finish(30)[-20:]
    proc.send_signal(signal.SIGINT)
    lines = output.finish(120)
    assert proc.returncode == 130, lines[-20:]
    assert not any("Traceback" in ln for ln in lines), lines
    last = lines[-1]
    assert last.startswith("ciae-train: interrupted (SIGINT); last checkpoint "), lines[-5:]
    named = Path(last.split("last checkpoint ", 1)[1].split(" (iteration", 1)[0])
    assert named == find_last_checkpoint(out) and (named / "model.safetensors").is_file()
    # the command it names continues from there (cut short with --stop-at one iteration later)
    resume = shlex.split(last.split("resume with: ", 1)[1])
    assert resume[0] == "ciae-train" and resume[-1] == "--resume"
    done = int(named.name.split("_")[1])
    from console_scripts import console_command, console_env

    res = subprocess.run([*console_command("ciae-train"), *resume[1:], "--stop-at", str(done + 1)], cwd=REPO,
                         env=console_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {named} at iteration {done}" in res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith(f"stopped at iteration {done + 1} of 400")


def test_ctrl_c_before_the_first_checkpoint_says_there_is_none(tmp_path):
    import signal

    out = tmp_path / "run"
    proc, output = _start_training(out, "--set", "output.checkpoint_period=1000")
    assert output.wait_for(r"ciae_core\.train: training on cpu", timeout=300), output.finish(30)[-20:]
    proc.send_signal(signal.SIGINT)
    lines = output.finish(120)
    assert proc.returncode == 130, lines[-20:]
    assert not any("Traceback" in ln for ln in lines), lines
    assert lines[-1] == ("ciae-train: interrupted (SIGINT); no checkpoint was written yet, so there is nothing to "
                         "resume: start the same command again")
