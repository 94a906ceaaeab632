"""The prepared GPU run of issue 19: phases with their own time limits, one JSON and one log, a
summary against the goals.

A lent GPU machine gives a few minutes in all, so the run is planned here and must work the first
time there. :func:`plan` lists the phases (:class:`Phase`: a command line, its own time limit and
the JSON file it writes); :func:`run_phases` runs them one after the other as child processes,
each killed at its limit (one hang cannot eat the budget) and each given at most what is left of
the run's total ``budget_s`` (a phase that would get less than its ``min_s`` is skipped and says
so). Every child's output goes to one log; each phase's JSON is read back and merged into one
document (:func:`report`), whose ``summary`` holds every goal of the issue with what was measured
(:func:`summarize`, printed by :func:`format_summary`).

Order (the issue's): the environment, a quick sanity check (imports, one tiny forward on the
device, the static postprocess against the eager one on one frame), the ``cuda``-marked tests,
then the benchmarks (bf16 first: the goals' precision), the id-map agreement of every precision
and path with fp32 eager, the fp16 and fp32 benchmarks, and ``torch.compile`` last (slowest,
least certain).

Environment of the children (the GPU machine's: no ROS, no motmetrics/openvino/nncf/rosbags):
``PYTHONPATH`` puts the source tree first, and with ``block_imports`` a ``sitecustomize`` module
hides :data:`BLOCKED_IMPORTS` (:func:`write_import_blocker`), so a module that imports one of them
unconditionally fails here as it would there.

``dry_run``: the same phases on the CPU with tiny settings (minutes), to check the run's logic
where no GPU is; the Triton kernels run in Triton's interpreter there (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import time
from typing import Any, Callable

BLOCKED_IMPORTS = ("rclpy", "ciae_ros", "motmetrics", "openvino", "nncf", "rosbags")
# the goals (R50 at 800/512 end to end in bf16 or fp16, fusion, ours/FCOS at 800, agreement)
GOALS = {"r50_800_ms": 8.0, "r50_512_ms": 5.0, "fusion_ms": 0.5, "ours_over_fcos_800": 1.10,
         "agreement": 0.995}
HALF_PRECISIONS = ("bf16", "fp16")
# what comes back from $OUT: at most 8 files, flat names
JSON_NAME = "gpu_check.json"
LOG_NAME = "gpu_check.log"
SUMMARY_NAME = "gpu_check_summary.txt"


@dataclasses.dataclass
class Phase:
    """One child process of the run: ``argv`` (the interpreter is prepended), its time limit,
    the JSON file it writes (None: its output is the result), skipped when less than ``min_s``
    of the budget is left."""

    name: str
    argv: list[str]
    timeout_s: float
    json_path: pathlib.Path | None = None
    min_s: float = 15.0
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PhaseResult:
    name: str
    status: str  # "ok", "failed" (exit status != 0), "timeout", "skipped"
    seconds: float
    returncode: int | None
    command: str
    data: Any = None  # the phase's JSON (or parsed output)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_import_blocker(directory: pathlib.Path, names=BLOCKED_IMPORTS) -> pathlib.Path:
    """A ``sitecustomize.py`` in ``directory`` that makes ``import X`` (and ``X.y``) fail with
    ModuleNotFoundError for every top-level name in ``names``, as on a machine without them.
    Put ``directory`` first on the children's PYTHONPATH. Returns the file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sitecustomize.py"
    path.write_text(
        '"""Written by ciae_core.gpu_check: hides packages absent on the GPU machine."""\n'
        "import importlib.abc\nimport sys\n\n"
        f"_HIDDEN = {tuple(sorted(names))!r}\n\n\n"
        "class _Hidden(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in _HIDDEN:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (hidden by gpu_check)', name=name)\n"
        "        return None\n\n\n"
        "sys.meta_path.insert(0, _Hidden())\n")
    return path


def child_env(repo: pathlib.Path, blocker_dir: pathlib.Path | None, extra: dict[str, str] | None = None,
              base: dict[str, str] | None = None) -> dict[str, str]:
    """The children's environment: the source tree first on PYTHONPATH (after the blocker's
    directory), unbuffered output, plus ``extra``."""
    env = dict(os.environ if base is None else base)
    paths = ([str(blocker_dir)] if blocker_dir else []) + [str(repo)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclasses.dataclass(frozen=True)
class CheckOptions:
    """What :func:`plan` needs: device run or CPU dry run, where the per-phase JSON goes, the
    benchmark's repeats, whether ``torch.compile`` is benchmarked."""

    dry_run: bool = False
    work_dir: pathlib.Path = pathlib.Path("gpu_check_work")
    repeats: int = 15
    compile: bool = True


def _bench(name: str, work: pathlib.Path, args: list[str], timeout_s: float, min_s: float = 20.0) -> Phase:
    path = work / f"{name}.json"
    return Phase(name, ["-m", "ciae_core.cli.bench", *args, "--json", str(path)], timeout_s, path, min_s)


def _probe(name: str, work: pathlib.Path, args: list[str], timeout_s: float, min_s: float = 15.0,
           env: dict[str, str] | None = None) -> Phase:
    path = work / f"{name}.json"
    return Phase(name, ["-m", "ciae_core.cli.gpu_check", "probe", *args, "--json", str(path)], timeout_s, path, min_s,
                 env or {})


def plan(options: CheckOptions) -> list[Phase]:
    """The phases of the run in order (module docstring). The device run: R50 at 512/640/800 and
    the small model, ours (every CUDA-graph path) against FCOS, per precision; the dry run: the
    same phases on the CPU with one small size and one repeat."""
    work = options.work_dir
    if options.dry_run:  # CPU: fp32 (bf16 is emulated there, minutes per call), one tiny size
        interp = {"TRITON_INTERPRET": "1"}
        tiny = ["--device", "cpu", "--backbones", "small", "--sizes", "128", "--models", "ours,fcos", "--engines",
                "torch", "--repeats", "1", "--warmup", "1", "--detections", "5", "--threads", "1", "--cuda-graphs",
                "forward,full"]
        return [
            _probe("env", work, ["env", "--device", "cpu"], 60),
            _probe("sanity", work, ["sanity", "--device", "cpu"], 120, env=interp),
            Phase("tests", ["-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "test/ciae_core"], 150),
            _bench("bench_fp32", work, [*tiny, "--precision", "fp32"], 150),
            _probe("agreement", work, ["agreement", "--device", "cpu", "--quick"], 150, env=interp),
        ]
    dev = ["--device", "cuda", "--models", "ours,fcos", "--engines", "torch", "--repeats", str(options.repeats),
           "--cuda-graphs", "forward,full"]
    groups = ["--backbones", "r50,small", "--sizes", "512,640,800"]
    phases = [  # expected on an H200: ~10, 30, 70, 80, 60, 70, 70 s; the budget trims the tail
        _probe("env", work, ["env", "--device", "cuda"], 30),
        _probe("sanity", work, ["sanity", "--device", "cuda"], 75),
        Phase("tests", ["-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "test/ciae_core"], 120),
        _bench("bench_bf16", work, [*dev, *groups, "--precision", "bf16"], 90),
        _probe("agreement", work, ["agreement", "--device", "cuda"], 90),
        _bench("bench_fp16", work, [*dev, *groups, "--precision", "fp16"], 75),
        _bench("bench_fp32", work, [*dev, *groups, "--precision", "fp32"], 75),
    ]
    if options.compile:  # ours' forward compiled, inside the whole-call graph (FCOS: the bf16 phase's row)
        compiled = [a if a != "ours,fcos" else "ours" for a in dev]
        compiled[compiled.index("forward,full")] = "full"
        phases.append(_bench("bench_compile", work, [*compiled, "--backbones", "r50", "--sizes", "800",
                                                     "--precision", "bf16", "--compile"], 150, min_s=45.0))
    return phases


_PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line (``3 passed, 2 skipped in 1.2s``) of ``output``."""
    for line in reversed(output.strip().splitlines()):
        found = _PYTEST_COUNTS.findall(line)
        if found:
            return {("errors" if k.startswith("error") else k): int(n) for n, k in found}
    return {}


def run_phase(phase: Phase, python: str, env: dict[str, str], cwd: pathlib.Path, log, timeout_s: float) -> PhaseResult:
    """Run one phase as a child process (its own process group, killed with it at ``timeout_s``);
    its output goes to ``log`` (a text file) with a header line; its JSON is read back."""
    cmd = [python, *phase.argv]
    command = " ".join(cmd)
    log.write(f"\n===== phase {phase.name}: {command} (limit {timeout_s:.0f} s)\n")
    log.flush()
    if phase.json_path is not None and phase.json_path.exists():
        phase.json_path.unlink()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, **phase.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        timed_out = True
    seconds = time.monotonic() - t0
    log.write(output or "")
    log.write(f"===== phase {phase.name}: exit {proc.returncode} after {seconds:.1f} s"
              f"{' (time limit)' if timed_out else ''}\n")
    log.flush()
    data: Any = None
    if phase.json_path is not None and phase.json_path.is_file():
        try:
            data = json.loads(phase.json_path.read_text())
        except ValueError as e:
            data = {"error": f"unreadable JSON: {e}"}
    elif phase.name == "tests":
        data = {"counts": pytest_counts(output or "")}
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    tail = "" if status == "ok" else "\n".join((output or "").strip().splitlines()[-5:])
    return PhaseResult(phase.name, status, round(seconds, 2), proc.returncode, command, data, tail)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it was started in its own session)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_phases(phases: list[Phase], python: str, env: dict[str, str], cwd: pathlib.Path, log, budget_s: float,
               on_result: Callable[[PhaseResult], None] | None = None,
               clock: Callable[[], float] = time.monotonic) -> list[PhaseResult]:
    """Every phase in order, each limited to ``min(timeout_s, what is left of budget_s)``; one with
    less than its ``min_s`` left is skipped (status "skipped")."""
    deadline = clock() + budget_s
    results = []
    for phase in phases:
        left = deadline - clock()
        if left < phase.min_s:
            r = PhaseResult(phase.name, "skipped", 0.0, None, " ".join([python, *phase.argv]),
                            note=f"{left:.0f} s of the {budget_s:.0f} s budget left, needs {phase.min_s:.0f}")
        else:
            r = run_phase(phase, python, env, cwd, log, min(phase.timeout_s, left))
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results


# ----------------------------------------------------------------------------------------------
# the summary against the goals


def _bench_rows(results: dict[str, PhaseResult]) -> list[tuple[str, dict[str, Any]]]:
    """(phase, row) for every measured row of every benchmark phase."""
    rows = []
    for name, r in results.items():
        if name.startswith("bench") and isinstance(r.data, dict):
            rows += [(name, row) for row in r.data.get("results", []) if "error" not in row]
    return rows


def _precision(phase: str, results: dict[str, PhaseResult]) -> str | None:
    data = results[phase].data
    return data.get("meta", {}).get("precision") if isinstance(data, dict) else None


def _label(phase: str, row: dict[str, Any], precision: str | None) -> str:
    path = row.get("cuda_graphs", "")
    compiled = " compiled" if row.get("compile") else ""
    return f"{phase}: {row['backbone']}-{row['size']} {precision} {row['model']}/{row['engine']} {path}{compiled}".strip()


def _best_ours(results: dict[str, PhaseResult], size: int, precisions=HALF_PRECISIONS):
    """The fastest ours row of R50 at ``size`` in one of ``precisions`` → (phase, row) or None."""
    cands = [(p, r) for p, r in _bench_rows(results) if r["model"] == "ours" and r["backbone"] == "r50"
             and r["size"] == size and _precision(p, results) in precisions]
    return min(cands, key=lambda pr: pr[1]["median_ms"]) if cands else None


def _goal(name: str, target: str, measured: float | None, met: bool | None, where: str = "") -> dict[str, Any]:
    return {"goal": name, "target": target, "measured": measured, "met": met, "where": where}


def _speed_goals(results: dict[str, PhaseResult]) -> list[dict[str, Any]]:
    goals = []
    for size, key in ((800, "r50_800_ms"), (512, "r50_512_ms")):
        best = _best_ours(results, size)
        ms = best[1]["median_ms"] if best else None
        goals.append(_goal(f"R50-{size} end to end, bf16/fp16 (median)", f"<= {GOALS[key]} ms", ms,
                           None if ms is None else ms <= GOALS[key],
                           _label(best[0], best[1], _precision(best[0], results)) if best else "not measured"))
    best = _best_ours(results, 800)
    fusion = None
    if best:
        stages = best[1].get("graph_stages_ms") or best[1].get("stages_ms") or {}
        fusion = stages.get("fusion")
    goals.append(_goal("fusion at R50-800 (stage of the fastest row)", f"<= {GOALS['fusion_ms']} ms", fusion,
                       None if fusion is None else fusion <= GOALS["fusion_ms"],
                       _label(best[0], best[1], _precision(best[0], results)) if best else "not measured"))
    for phase, data in ((p, results[p].data) for p in results if p.startswith("bench")):
        if not isinstance(data, dict) or data.get("meta", {}).get("precision") not in HALF_PRECISIONS:
            continue
        rows = [r for r in data.get("results", []) if "error" not in r and r["backbone"] == "r50" and r["size"] == 800]
        ours = [r for r in rows if r["model"] == "ours"]
        fcos = [r for r in rows if r["model"] == "fcos"]
        if ours and fcos:
            o = min(ours, key=lambda r: r["median_ms"])
            ratio = o["median_ms"] / fcos[0]["median_ms"]
            goals.append(_goal(f"ours/FCOS at R50-800, {data['meta']['precision']}", f"<= {GOALS['ours_over_fcos_800']}",
                               ratio, ratio <= GOALS["ours_over_fcos_800"], _label(phase, o, data["meta"]["precision"])))
    return goals


def _agreement_goals(results: dict[str, PhaseResult]) -> list[dict[str, Any]]:
    r = results.get("agreement")
    entries = r.data.get("entries", []) if r is not None and isinstance(r.data, dict) else []
    if not entries:
        return [_goal("id maps vs fp32 eager", f">= {GOALS['agreement']:.1%} of pixels", None, None, "not measured")]
    goals = []
    for e in entries:
        if e.get("agreement") is None:
            continue
        where = f"{e['model']} on {e['images']}, {e['precision']} {e['path']}"
        goals.append(_goal(f"id maps vs fp32 eager: {where}", f">= {GOALS['agreement']:.1%} of pixels",
                           e["agreement"], e["agreement"] >= GOALS["agreement"], where))
    return goals


def summarize(results: dict[str, PhaseResult]) -> dict[str, Any]:
    """Every goal with what was measured (``met`` None: not measured), the status of each phase,
    and the test counts."""
    tests = results.get("tests")
    return {"phases": {n: r.status for n, r in results.items()},
            "tests": tests.data.get("counts") if tests is not None and isinstance(tests.data, dict) else None,
            "goals": _speed_goals(results) + _agreement_goals(results), "paths": _paths(results)}


def _paths(results: dict[str, PhaseResult]) -> list[dict[str, Any]]:
    """Ours' CUDA-graph paths side by side per (phase, backbone, size): median ms of each path
    (the path its timed calls really took) and full / forward."""
    groups: dict[tuple, dict[str, float]] = {}
    for phase, row in _bench_rows(results):
        if row["model"] == "ours" and row["engine"].startswith("torch"):
            key = (phase, _precision(phase, results), row["backbone"], row["size"])
            label = row.get("cuda_graphs", "?") + (" compiled" if row.get("compile") else "")
            groups.setdefault(key, {})[label] = row["median_ms"]
    out = []
    for (phase, precision, backbone, size), ms in groups.items():
        ratio = ms["full"] / ms["forward"] if "full" in ms and "forward" in ms else None
        out.append({"phase": phase, "precision": precision, "backbone": backbone, "size": size, "median_ms": ms,
                    "full_over_forward": ratio})
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a short text table (the last thing the run prints)."""
    lines = ["phases: " + ", ".join(f"{n} {s}" for n, s in summary["phases"].items())]
    if summary.get("tests") is not None:
        lines.append("cuda tests: " + ", ".join(f"{v} {k}" for k, v in summary["tests"].items()))
    for p in summary.get("paths", []):
        ms = ", ".join(f"{k} {v:.2f} ms" for k, v in p["median_ms"].items())
        ratio = f" (full/forward {p['full_over_forward']:.2f})" if p["full_over_forward"] is not None else ""
        lines.append(f"paths {p['backbone']}-{p['size']} {p['precision']}: {ms}{ratio}")
    lines.append("goal | target | measured | met | where")
    for g in summary["goals"]:
        m = g["measured"]
        shown = "-" if m is None else (f"{m:.2%}" if "pixels" in g["target"] else f"{m:.3f}")
        met = {True: "yes", False: "NO", None: "not measured"}[g["met"]]
        lines.append(f"{g['goal']} | {g['target']} | {shown} | {met} | {g['where']}")
    return "\n".join(lines)


def report(results: list[PhaseResult], meta: dict[str, Any]) -> dict[str, Any]:
    """The run's JSON document: ``meta`` (how it was run), ``phases`` (each phase's result and
    data) and ``summary``."""
    by_name = {r.name: r for r in results}
    return {"meta": meta, "phases": [r.as_dict() for r in results], "summary": summarize(by_name)}


def main_run(options: CheckOptions, out_dir: pathlib.Path, repo: pathlib.Path, python: str, budget_s: float,
             block_imports: bool, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Plan, run and report (the command line's body): writes :data:`JSON_NAME`, :data:`LOG_NAME`
    and :data:`SUMMARY_NAME` under ``out_dir`` (rewritten after every phase, so a run cut short
    still leaves what it measured) and returns the document."""
    out_dir.mkdir(parents=True, exist_ok=True)
    options.work_dir.mkdir(parents=True, exist_ok=True)
    blocker = None
    if block_imports:
        blocker = options.work_dir / "import_blocker"
        write_import_blocker(blocker)
    env = child_env(repo, blocker)
    meta = {"dry_run": options.dry_run, "budget_s": budget_s, "python": python, "repo": str(repo),
            "blocked_imports": list(BLOCKED_IMPORTS) if block_imports else [], "repeats": options.repeats,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    done: list[PhaseResult] = []

    def write(final: bool = False) -> dict[str, Any]:
        doc = report(done, {**meta, "finished": final})
        (out_dir / JSON_NAME).write_text(json.dumps(doc, indent=1, default=str))
        (out_dir / SUMMARY_NAME).write_text(format_summary(doc["summary"]) + "\n")
        return doc

    def on_result(r: PhaseResult) -> None:
        done.append(r)
        echo(f"gpu_check: {r.name} {r.status} in {r.seconds:.1f} s" + (f" ({r.note.splitlines()[-1]})"
                                                                          if r.note else ""))
        write()

    with open(out_dir / LOG_NAME, "w") as log:
        run_phases(plan(options), python, env, repo, log, budget_s, on_result)
    doc = write(final=True)
    echo(format_summary(doc["summary"]))
    return doc
