#!/usr/bin/env bash
# gpu_check.sh — the prepared run on the lent GPU machine (issue 19), in one call.
#
# Usage (from anywhere; it runs in the repository root):
#   bash scripts/gpu_check.sh                 # the device run: <= 7 minutes (--budget 420)
#   bash scripts/gpu_check.sh --dry-run       # the same phases on the CPU, tiny settings (a few minutes)
#   bash scripts/gpu_check.sh --budget 300 --no-compile --repeats 10 --out /tmp/gc
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh --dry-run   # another interpreter
#
# What it does: with the machine's own python3 (no venv, nothing installed; the repository's code
# from the source tree via PYTHONPATH; rclpy, ciae_ros, motmetrics, openvino, nncf and rosbags
# hidden, as they are absent there) it runs, each phase in its own process with its own time limit
# and all within the budget: env, sanity (imports, a tiny forward on the GPU, the static
# postprocess against the eager one), `pytest -m cuda test/ciae_core`, ciae-bench for R50 at
# 512/640/800 and the small model in bf16, the id-map agreement of every precision and CUDA-graph
# path with fp32 eager, ciae-bench in fp16 and fp32, and ciae-bench with torch.compile at R50-800 bf16.
# Output under $OUT (default ./gpu_check_out): gpu_check.json (everything, with the summary),
# gpu_check.log (every phase's output), gpu_check_summary.txt (the goals: measured, met or not).
# Exit status 0 when every phase succeeded, 1 otherwise, 2 for a bad option.
# The device tool call (one `run`): command `bash scripts/gpu_check.sh`, timeout_s 540, no carry.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
exec "$PY" -m ciae_core.cli.gpu_check --python "$PY" "$@"
