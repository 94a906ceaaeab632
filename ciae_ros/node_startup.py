"""The node's command line before ROS starts: every problem is one line and an exit status.

* Our own flags (``--lifecycle``, ``--autostart``): a usage error prints one line,
  ``ciae-panoptic-node: error: ...``, and exits with status 2 (argparse prints its usage line
  too; a start-up failure here is one line).
* ROS arguments: rcl rejects a missing, unreadable or malformed ``--params-file`` and a malformed
  rule (``-p name`` without ``:=``) with ``RCLInvalidROSArgsError``, a multi-line traceback when
  nothing catches it. :func:`params_file_problem` checks each params file first (it exists, is a
  readable file, is YAML) so the line names the file and what is wrong with it (status 1);
  :func:`ros_args_problem` turns what rcl still rejects into one line without rcl's source
  locations: status 1 when it is about a params file, 2 (usage) otherwise.
"""

from __future__ import annotations

import argparse
import re

from ciae_core.user_input import clip, clip_path, file_problem

PROG = "ciae-panoptic-node"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints a usage line first; one line is enough
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Our flags (ROS arguments already removed); usage errors exit with status 2 and one line."""
    ap = _OneLineParser(
        prog=PROG,
        description="CIAE panoptic segmentation ROS 2 node. ROS arguments go after --ros-args, e.g. "
                    "--ros-args --params-file config/panoptic.yaml -r image:=/my_camera/image_raw")
    ap.add_argument("--lifecycle", action="store_true", help="run as a managed (lifecycle) node")
    ap.add_argument("--autostart", action="store_true", help="with --lifecycle: configure and activate at start")
    opts = ap.parse_args(argv)
    if opts.autostart and not opts.lifecycle:
        # an error, not a silent no-op: the user asked for something this combination cannot mean
        ap.error("--autostart needs --lifecycle (a plain node is active from the start anyway)")
    return opts


def params_files(args: list[str]) -> list[str]:
    """The ``--params-file`` paths among the ROS arguments of ``args`` (after ``--ros-args``, up
    to a closing ``--``)."""
    found, in_ros, i = [], False, 0
    while i < len(args):
        a = args[i]
        if a == "--ros-args":
            in_ros = True
        elif a == "--" and in_ros:
            in_ros = False
        elif in_ros and a == "--params-file" and i + 1 < len(args):
            found.append(args[i + 1])
            i += 1
        i += 1
    return found


def params_file_problem(args: list[str]) -> str | None:
    """One line about the first ``--params-file`` that cannot be a parameter file, or ``None``."""
    import yaml

    for path in params_files(args):
        problem = file_problem(path, allow_empty=True)
        if problem is not None:
            return f"params file {clip_path(path)} {problem}"
        try:
            with open(path, encoding="utf-8") as f:
                yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            return f"params file {clip_path(path)} is not valid YAML: {clip(what)}{where}"
    return None


_RCL_LOCATION = re.compile(r",? at /\S+:\d+")


def ros_args_problem(exc: Exception) -> tuple[int, str]:
    """``(exit status, one line)`` for an ``RCLInvalidROSArgsError`` (rcl's source locations cut)."""
    text = _RCL_LOCATION.sub("", " ".join(str(exc).split()))
    text = text.replace("Failed to parse ROS arguments: ", "")
    if "params file" in text:
        return 1, clip(text, 240)
    return 2, f"{PROG}: error: invalid ROS arguments: {clip(text, 240)}"
