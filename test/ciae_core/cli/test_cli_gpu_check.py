"""scripts/gpu_check.sh and its command line (ciae_core.cli.gpu_check): the script's syntax and
usage, option errors, a probe, and the whole dry run on the CPU with the GPU machine's imports
(rclpy, ciae_ros, motmetrics, openvino, nncf, rosbags hidden)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from ciae_core.cli.gpu_check import main

REPO = pathlib.Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def test_script_syntax_mode_and_usage():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)
    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    assert "Usage" in header and "--dry-run" in header and "timeout_s" in header and "$OUT" in header
    assert 'exec "$PY" -m ciae_core.cli.gpu_check' in SCRIPT.read_text()


def test_bad_options_exit_2(capsys):
    assert main(["--budget", "0"]) == 2
    assert "--budget" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--no-such-flag"])
    assert e.value.code == 2


def test_probe_writes_its_json(tmp_path):
    path = tmp_path / "sub" / "env.json"
    assert main(["probe", "env", "--device", "cpu", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["torch"] and "hidden_packages_importable" in doc


@pytest.mark.slow
def test_dry_run_on_the_cpu_with_the_gpu_machines_imports(tmp_path):
    """The whole run on the CPU through the script: every phase ok (the `cuda` tests collected and
    skipped without the hidden packages), the JSON, log and summary flat under --out."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--work-dir", str(tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    phases = {p["name"]: p for p in doc["phases"]}
    assert list(phases) == ["env", "sanity", "tests", "bench_fp32", "agreement"]
    assert all(p["status"] == "ok" for p in phases.values())
    assert phases["env"]["data"]["hidden_packages_importable"] == {n: False for n in doc["meta"]["blocked_imports"]}
    assert phases["sanity"]["data"]["ok"] is True
    counts = doc["summary"]["tests"]
    assert counts.get("skipped", 0) > 0 and not counts.get("failed") and not counts.get("errors")
    bench = phases["bench_fp32"]["data"]
    assert {(r["model"], r["engine"]) for r in bench["results"]} == {("ours", "torch"), ("ours", "torch/full"),
                                                                     ("fcos", "torch")}
    assert phases["sanity"]["data"]["static_postprocess"]["ok"] is True  # the Triton fusion in the interpreter
    assert phases["agreement"]["data"]["entries"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check_summary.txt"]
    assert proc.stdout.rstrip().endswith((out / "gpu_check_summary.txt").read_text().rstrip())
