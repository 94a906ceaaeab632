"""ciae_core.gpu_check: the prepared GPU run's plan, phase runner, import blocker and summary,
checked on the CPU so that no device minute is spent on a typo."""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys
import time

import pytest

from ciae_core import gpu_check
from ciae_core.gpu_check import (BLOCKED_IMPORTS, CheckOptions, Phase, PhaseResult, child_env, format_summary, plan,
                                 pytest_counts, run_phases, summarize, write_import_blocker)

REPO = pathlib.Path(__file__).resolve().parents[2]


def _module_args(phase: Phase, module: str) -> list[str]:
    assert phase.argv[:2] == ["-m", module], phase.argv
    return phase.argv[2:]


@pytest.mark.parametrize("dry_run", [False, True])
def test_every_phase_command_line_parses(dry_run, tmp_path):
    """Each phase's arguments go through the real parsers of the commands it runs (a misspelt flag
    would cost a device run), in the issue's order: environment and sanity first, then the tests,
    then the benchmarks; each phase has its own time limit."""
    from ciae_core.cli.bench import _checked
    from ciae_core.cli.bench import build_parser as bench_parser
    from ciae_core.cli.gpu_check import build_parser as check_parser

    phases = plan(CheckOptions(dry_run=dry_run, work_dir=tmp_path))
    names = [p.name for p in phases]
    assert names[:3] == ["env", "sanity", "tests"] and "agreement" in names
    assert any(n.startswith("bench") for n in names) and len(set(names)) == len(names)
    for p in phases:
        assert 0 < p.min_s < p.timeout_s <= 150
        if p.name == "tests":
            assert p.argv[:4] == ["-m", "pytest", "-m", "cuda"] and p.argv[-1] == "test/ciae_core"
        elif p.name.startswith("bench"):
            args = bench_parser().parse_args(_module_args(p, "ciae_core.cli.bench"))
            assert pathlib.Path(args.json) == p.json_path and p.json_path.parent == tmp_path
            if dry_run:  # the CPU accepts the options as given (_checked raises BenchError otherwise)
                assert _checked(args)[-1].type == "cpu"
            else:
                assert args.device == "cuda" and set(args.backbones.split(",")) <= {"r50", "small"}
        else:
            args = check_parser().parse_args(_module_args(p, "ciae_core.cli.gpu_check"))
            assert args.command == "probe" and args.what == p.name
            assert args.device == ("cpu" if dry_run else "cuda") and pathlib.Path(args.json) == p.json_path
    if not dry_run:  # the goals' precision first; all three precisions measured
        benches = [n for n in names if n.startswith("bench")]
        assert benches[0] == "bench_bf16" and {"bench_fp16", "bench_fp32"} <= set(benches)


def test_import_blocker_hides_the_packages_absent_on_the_gpu_machine(tmp_path):
    write_import_blocker(tmp_path / "blk")
    env = child_env(REPO, tmp_path / "blk")
    code = ("import importlib, json\n"
            "out = {}\n"
            f"for name in {list(BLOCKED_IMPORTS) + ['rclpy.node', 'json', 'ciae_core.gpu_check']!r}:\n"
            "    try:\n        importlib.import_module(name); out[name] = True\n"
            "    except ModuleNotFoundError:\n        out[name] = False\n"
            "print(json.dumps(out))\n")
    got = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True, cwd=tmp_path).stdout)
    assert got == {**{n: False for n in BLOCKED_IMPORTS}, "rclpy.node": False, "json": True,
                   "ciae_core.gpu_check": True}
    assert env["PYTHONPATH"].split(":")[:2] == [str(tmp_path / "blk"), str(REPO)]


def test_pytest_counts_reads_the_last_summary_line():
    out = "....s\nFAILED test/x.py::t - boom\n2 failed, 9 passed, 3 skipped, 290 deselected in 12.3s\n"
    assert pytest_counts(out) == {"failed": 2, "passed": 9, "skipped": 3, "deselected": 290}
    assert pytest_counts("1 error in 0.5s") == {"errors": 1}
    assert pytest_counts("no summary") == {}


def _py_phase(name: str, code: str, timeout_s: float, json_path=None, min_s: float = 1.0) -> Phase:
    return Phase(name, ["-c", code], timeout_s, json_path, min_s)


def test_phases_run_with_their_own_limits_and_the_budget(tmp_path):
    """A phase that writes its JSON is ok, one that exits 3 failed, one that hangs is killed at its
    own limit (child processes included) and the next still runs; a phase the budget cannot fit
    any more is skipped and says why."""
    ok_json = tmp_path / "ok.json"
    marker = tmp_path / "grandchild_alive"
    grandchild = f"import time; time.sleep(3); open({str(marker)!r}, 'w')"
    hang = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {grandchild!r}])\ntime.sleep(60)\n"
    phases = [_py_phase("ok", f"import json; open({str(ok_json)!r}, 'w').write(json.dumps({{'x': 1}}))", 60, ok_json),
              _py_phase("bad", "import sys; print('boom'); sys.exit(3)", 60),
              _py_phase("hang", hang, 1.5),
              _py_phase("after", "print('still here')", 60)]
    log = io.StringIO()
    t0 = time.monotonic()
    results = run_phases(phases, sys.executable, child_env(REPO, None), tmp_path, log, budget_s=600)
    assert [r.status for r in results] == ["ok", "failed", "timeout", "ok"]
    assert results[0].data == {"x": 1} and results[1].returncode == 3 and "boom" in results[1].note
    assert 1.5 <= results[2].seconds < 30 and time.monotonic() - t0 < 120
    time.sleep(4)  # the grandchild would have written its marker by now had it survived the kill
    assert not marker.exists()
    text = log.getvalue()
    assert "===== phase bad" in text and "boom" in text and "(time limit)" in text and "still here" in text

    fake_now = [0.0]
    slow = [_py_phase("first", "print(1)", 60, min_s=10), _py_phase("second", "print(2)", 60, min_s=10)]

    def clock():  # each reading 48 s later: the first phase finds 52 s of the 100 s budget left, the second 4 s
        fake_now[0] += 48.0
        return fake_now[0]

    results = run_phases(slow, sys.executable, child_env(REPO, None), tmp_path, io.StringIO(), budget_s=100.0,
                         clock=clock)
    assert [r.status for r in results] == ["ok", "skipped"]
    assert "left" in results[1].note


def _bench_doc(precision: str, ours_800: float, ours_512: float, fcos_800: float, fusion: float) -> dict:
    row = dict(model="ours", engine="torch", backbone="r50", cuda_graphs="full")
    return {"meta": {"precision": precision},
            "results": [{**row, "size": 800, "median_ms": ours_800, "graph_stages_ms": {"fusion": fusion}},
                        {**row, "size": 512, "median_ms": ours_512, "graph_stages_ms": {"fusion": fusion / 2}},
                        {**row, "size": 800, "median_ms": ours_800 + 1, "cuda_graphs": "forward",
                         "stages_ms": {"fusion": 3.0}},
                        {"model": "fcos", "engine": "torch", "backbone": "r50", "size": 800, "median_ms": fcos_800},
                        {"model": "ours", "engine": "torch", "backbone": "r50", "size": 640, "error": "x"}]}


def _result(name: str, data, status: str = "ok") -> PhaseResult:
    return PhaseResult(name, status, 1.0, 0, "cmd", data)


def test_summary_reports_every_goal_met_missed_or_not_measured():
    results = {"tests": _result("tests", {"counts": {"passed": 9, "skipped": 2}}),
               "bench_bf16": _result("bench_bf16", _bench_doc("bf16", 7.5, 5.5, 7.0, 0.4)),
               "bench_fp16": _result("bench_fp16", _bench_doc("fp16", 9.0, 4.5, 7.0, 0.6)),
               "bench_fp32": _result("bench_fp32", _bench_doc("fp32", 3.0, 2.0, 9.0, 0.1)),  # not a goal precision
               "agreement": _result("agreement", {"entries": [
                   {"model": "m", "images": "coco", "precision": "bf16", "path": "full", "agreement": 0.999},
                   {"model": "m", "images": "coco", "precision": "fp16", "path": "forward", "agreement": 0.98},
                   {"model": "m", "images": "coco", "precision": "fp16", "path": "full", "agreement": None,
                    "error": "boom"}]}),
               "bench_compile": _result("bench_compile", None, status="timeout")}
    s = summarize(results)
    assert s["phases"]["bench_compile"] == "timeout" and s["tests"] == {"passed": 9, "skipped": 2}
    goals = {g["goal"]: g for g in s["goals"]}
    g800 = goals["R50-800 end to end, bf16/fp16 (median)"]
    assert g800["measured"] == 7.5 and g800["met"] is True and "bench_bf16" in g800["where"]  # fp32's 3.0 not taken
    g512 = goals["R50-512 end to end, bf16/fp16 (median)"]
    assert g512["measured"] == 4.5 and g512["met"] is True and "fp16" in g512["where"]
    assert goals["fusion at R50-800 (stage of the fastest row)"]["measured"] == 0.4
    assert goals["ours/FCOS at R50-800, bf16"]["measured"] == pytest.approx(7.5 / 7.0)
    assert goals["ours/FCOS at R50-800, bf16"]["met"] is True
    assert goals["ours/FCOS at R50-800, fp16"]["met"] is False
    assert "ours/FCOS at R50-800, fp32" not in goals
    agree = [g for g in s["goals"] if g["goal"].startswith("id maps")]
    assert [(g["measured"], g["met"]) for g in agree] == [(0.999, True), (0.98, False)]
    paths = {(p["precision"], p["size"]): p for p in s["paths"]}
    assert paths[("bf16", 800)]["median_ms"] == {"full": 7.5, "forward": 8.5}
    assert paths[("bf16", 800)]["full_over_forward"] == pytest.approx(7.5 / 8.5)
    assert paths[("bf16", 512)]["full_over_forward"] is None  # one path measured there
    text = format_summary(s)
    assert "paths r50-800 bf16: full 7.50 ms, forward 8.50 ms (full/forward 0.88)" in text
    assert "bench_compile timeout" in text and "99.90%" in text and "| NO |" in text

    empty = summarize({"bench_bf16": _result("bench_bf16", None, status="failed")})
    assert all(g["met"] is None for g in empty["goals"]) and "not measured" in format_summary(empty)


def test_main_run_writes_few_flat_files_and_rewrites_them_after_each_phase(tmp_path, monkeypatch):
    """The run's files under --out: at most 8, flat names (what the device tool brings back), the
    JSON complete after every phase (a run cut short still reports what it measured)."""
    seen_after_first = {}

    def fake_plan(options):
        return [_py_phase("env", "print('env')", 30), _py_phase("tests", "print('3 passed in 0.1s')", 30)]

    monkeypatch.setattr(gpu_check, "plan", fake_plan)
    out = tmp_path / "out"
    echoed = []

    def echo(line):
        echoed.append(line)
        if not seen_after_first and (out / gpu_check.JSON_NAME).exists():
            seen_after_first.update(json.loads((out / gpu_check.JSON_NAME).read_text()))

    doc = gpu_check.main_run(CheckOptions(dry_run=True, work_dir=tmp_path / "work"), out, REPO, sys.executable, 60,
                             block_imports=True, echo=echo)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([gpu_check.JSON_NAME, gpu_check.LOG_NAME, gpu_check.SUMMARY_NAME])
    assert all((out / f).is_file() for f in files) and len(files) <= 8
    assert [p["name"] for p in seen_after_first["phases"]] == ["env"] and seen_after_first["meta"]["finished"] is False
    assert doc["meta"]["finished"] is True and doc["summary"]["tests"] == {"passed": 3}
    assert doc["meta"]["blocked_imports"] == list(BLOCKED_IMPORTS)
    assert json.loads((out / gpu_check.JSON_NAME).read_text())["summary"] == doc["summary"]
    assert echoed[-1] == (out / gpu_check.SUMMARY_NAME).read_text().rstrip("\n")
