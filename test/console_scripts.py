"""Run a console script the way ``setup.py`` declares it, against the source tree under test.

The ``ciae-*`` files in the venv's ``bin/`` run whatever copy of the packages is installed there
(possibly older than the checkout); :func:`console_command` instead calls the entry point that
``setup.py`` names (``module:function``) with this interpreter, and :func:`console_env` puts the
checkout first on ``PYTHONPATH``: the command line a user gets after ``make setup``, of this tree.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def setup_entry_points(group: str = "console_scripts") -> dict[str, str]:
    """``{name: "module:function"}`` of one entry-point group as setup.py declares it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    declared = ast.literal_eval(kw["entry_points"])[group]
    return dict(tuple(part.strip() for part in s.split("=", 1)) for s in declared)


def entry_points() -> dict[str, str]:
    """``{script name: "module:function"}`` from setup.py's ``console_scripts``."""
    return setup_entry_points("console_scripts")


def console_command(name: str) -> list[str]:
    """argv prefix that runs console script ``name`` (arguments follow)."""
    module, func = entry_points()[name].split(":")
    code = f"import sys; from {module} import {func}; sys.argv[0] = {name!r}; sys.exit({func}())"
    return [sys.executable, "-c", code]


def console_env(base: dict | None = None, **extra: str) -> dict:
    """The environment with the checkout first on ``PYTHONPATH`` and unbuffered output."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Output:
    """Lines of a process's (merged) output, read by a thread, with a wait for a line."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> bool:
        """True once a line matches the regex ``pattern``; False at the deadline or at the end of output."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                if any(rx.search(line) for line in self.lines[seen:]):
                    return True
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (not self._thread.is_alive() and seen == len(self.lines)):
                    return False
                self._cond.wait(min(left, 0.5))

    def finish(self, timeout: float) -> list[str]:
        """Wait for the process to end (killed after ``timeout``) and return all lines."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(10)
        return list(self.lines)
