#!/usr/bin/env bash
# Runs the test suite from the repository root (so the source tree is imported) and treats
# pytest's exit code 5 ("no tests were collected") as a failure that says so.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
"${CIAE_VENV:-.venv}/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests (exit 5); treating this as a failure" >&2
  exit 1
fi
exit "$rc"
