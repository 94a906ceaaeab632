"""The process's one OpenVINO ``Core``, and a signal stack that OpenVINO cannot leave dangling.

Why (measured with OpenVINO 2026.4.1): the first ``compile_model`` of a ``Core`` on the CPU
plugin installs a new alternate signal stack (``sigaltstack``, ~11 KB it allocates) on the
calling thread, and destroying that ``Core`` puts back the stack that was current when it
installed its own. Two Cores whose lifetimes interleave (A compiles, B compiles, A is destroyed,
then B) therefore end with the thread's alternate stack pointing at A's freed memory. Python
installs every signal handler with ``SA_ONSTACK``, so the next signal that reaches that thread
(SIGCHLD when a child process exits, SIGINT, SIGTERM) cannot be delivered: the kernel kills the
process with SIGSEGV, and faulthandler (also on that stack) prints nothing. That is how a test
run died silently while it waited for a child process, and how a node with the openvino engine
could die on Ctrl-C after reloading its model.

Decisions:

* :func:`shared_core` is the one ``Core`` our code uses (engine, IR reading, CPU capabilities,
  quantisation input). It is never destroyed, so its stack stays valid for the process's life;
  compiled models come and go without touching the signal stack.
* :func:`ensure_signal_stack` checks the calling thread's alternate stack and, when it points at
  memory that is no longer mapped (a Core created elsewhere, e.g. inside NNCF, was destroyed out
  of order), installs one this module owns (64 KiB, never freed). Called after quantisation and
  whenever an engine is built; cheap (one ``sigaltstack`` call and, on Linux, one read of
  ``/proc/self/maps``).
"""

from __future__ import annotations

import ctypes
import sys
import threading

_LOCK = threading.Lock()
_CORE = None
_OWN_STACKS: list = []  # buffers handed to sigaltstack: kept alive for the process's life
OWN_STACK_BYTES = 64 * 1024
_SS_DISABLE = 2


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def shared_core():
    """The process-wide ``openvino.Core`` (created on first use, telemetry off; never destroyed)."""
    global _CORE
    with _LOCK:
        if _CORE is None:
            from ciae_core.no_telemetry import import_openvino

            _CORE = import_openvino().Core()
        return _CORE


def current_signal_stack() -> tuple[int, int, int] | None:
    """``(address, size, flags)`` of the calling thread's alternate signal stack; ``None`` where
    ``sigaltstack`` is not available (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    st = _StackT()
    if libc.sigaltstack(None, ctypes.byref(st)) != 0:
        return None
    return int(st.ss_sp or 0), int(st.ss_size), int(st.ss_flags)


def _mapped(address: int, size: int) -> bool:
    """Whether ``[address, address + size)`` lies in one mapping of this process."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                lo, hi = (int(v, 16) for v in line.split(None, 1)[0].split("-"))
                if lo <= address and address + size <= hi:
                    return True
    except OSError:
        return True  # cannot tell: leave the stack as it is
    return False


def ensure_signal_stack() -> bool:
    """Give the calling thread a usable alternate signal stack if its current one points at
    unmapped memory; ``True`` if one was installed. No alternate stack at all is fine (signals
    then run on the thread's own stack) and is left alone."""
    state = current_signal_stack()
    if state is None:
        return False
    address, size, flags = state
    if flags & _SS_DISABLE or _mapped(address, size):
        return False
    buf = ctypes.create_string_buffer(OWN_STACK_BYTES)
    st = _StackT(ctypes.cast(buf, ctypes.c_void_p), 0, OWN_STACK_BYTES)
    if ctypes.CDLL(None, use_errno=True).sigaltstack(ctypes.byref(st), None) != 0:
        return False
    _OWN_STACKS.append(buf)
    return True
