"""The prepared GPU run (issue 19) as a command line; ``scripts/gpu_check.sh`` calls it.

``python -m ciae_core.cli.gpu_check [--dry-run] [--out DIR] [--budget S] ...`` runs the phases of
:mod:`ciae_core.gpu_check` (environment, sanity, the ``cuda`` tests, the benchmarks, the id-map
agreement, ``torch.compile``), each as a child process with its own time limit, and writes
``gpu_check.json``, ``gpu_check.log`` and ``gpu_check_summary.txt`` under ``--out`` (default:
``$OUT``, else ``./gpu_check_out``); the summary against the goals is printed last.
Exit status 0 when every phase succeeded, 1 otherwise (the files are written either way); 2 for
a bad command line.

``python -m ciae_core.cli.gpu_check probe {env,sanity,agreement} --device D --json PATH``: one
measurement of :mod:`ciae_core.gpu_check_probes` (what the run's phases call); exit 1 when the
sanity check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description="The prepared GPU run of issue 19 (phases with their "
                                "own time limits; JSON, log and summary under --out).")
    p.add_argument("--dry-run", action="store_true", help="the same phases on the CPU with tiny settings")
    p.add_argument("--out", default=None, help="output directory (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--work-dir", default=None, help="per-phase JSON files (default: a new temporary directory)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all phases together (default 420)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the phases (default: this one)")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per model in the benchmarks")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile benchmark")
    p.add_argument("--no-block-imports", action="store_true",
                   help="do not hide rclpy, ciae_ros, motmetrics, openvino, nncf and rosbags from the phases")
    sub = p.add_subparsers(dest="command")
    probe = sub.add_parser("probe", help="one measurement (what a phase runs)")
    probe.add_argument("what", choices=("env", "sanity", "agreement"))
    probe.add_argument("--device", default="cuda")
    probe.add_argument("--json", required=True)
    probe.add_argument("--quick", action="store_true", help="agreement: one small scene (the dry run)")
    return p


def _probe(args: argparse.Namespace) -> int:
    from ciae_core import gpu_check_probes as probes

    if args.what == "env":
        doc = probes.environment(args.device)
    elif args.what == "sanity":
        doc = probes.sanity(args.device)
    else:
        doc = probes.agreement(args.device, quick=args.quick)
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(json.dumps(doc, default=str)[:4000])
    return 0 if doc.get("ok", True) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "probe":
        return _probe(args)
    if args.budget <= 0 or args.repeats < 1:
        print("gpu_check: error: need --budget > 0 and --repeats >= 1", file=sys.stderr)
        return 2
    from ciae_core.gpu_check import CheckOptions, main_run

    out = pathlib.Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    work = pathlib.Path(args.work_dir) if args.work_dir else pathlib.Path(tempfile.mkdtemp(prefix="ciae-gpu-check-"))
    options = CheckOptions(dry_run=args.dry_run, work_dir=work, repeats=args.repeats, compile=not args.no_compile)
    doc = main_run(options, out, REPO, args.python, args.budget, block_imports=not args.no_block_imports)
    return 0 if all(p["status"] == "ok" for p in doc["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
