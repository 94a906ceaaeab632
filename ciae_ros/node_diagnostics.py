"""The node's counters and what /diagnostics makes of them.

:class:`CameraStats` counts frames per camera (received, processed, dropped in the mailbox, bad
per reason), :class:`StageTimes` keeps a rolling window of per-stage latencies, and
:class:`DiagnosticsBuilder` turns both, with the processing errors and the loaded model, into one
``diagnostic_msgs/DiagnosticArray`` per period: one status per camera (rates, counters, input
reliability; WARN on no input or bad frames in the last period; with depth, its 3-D counters and
WARN when frames went without 3-D in the period) and one for the model (identity, domain, latency
p50/p99 per stage, error totals; ERROR only while errors happen).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CameraStats:
    received: int = 0
    processed: int = 0
    dropped: int = 0
    bad: collections.Counter = field(default_factory=collections.Counter)
    last_received: float = 0.0


class StageTimes:
    """Rolling window of per-stage latencies (ms) for the p50/p99 in /diagnostics."""

    def __init__(self, window: int = 500):
        self._data: dict[str, collections.deque] = {}
        self._window = window
        self._lock = threading.Lock()

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            self._data.setdefault(stage, collections.deque(maxlen=self._window)).append(float(ms))

    def percentiles(self) -> dict[str, tuple[float, float]]:
        with self._lock:
            return {k: (float(np.percentile(v, 50)), float(np.percentile(v, 99))) for k, v in self._data.items() if v}


class DiagnosticsBuilder:
    """Builds the /diagnostics message of each period from the node's counters.

    Keeps the counters of the previous message: rates are per period, and a status level reflects
    the last period only (one bad frame or error must not leave a status at WARN/ERROR for good);
    the running totals stay in the values.
    """

    def __init__(self):
        self._prev: tuple[float, list[CameraStats]] = (time.monotonic(), [])
        self._prev_errors = 0  # processing errors counted up to the previous diagnostics message

    def restart(self, stats: list[CameraStats], errors_total: int) -> None:
        """A new first period from now (processing starts): rates and levels count from here."""
        self._prev = (time.monotonic(), [CameraStats(s.received, s.processed) for s in stats])
        self._prev_errors = errors_total

    def build(self, name: str, stamp, cameras, stats: list[CameraStats], bads: list[collections.Counter],
              errors: collections.Counter, latencies: dict[str, tuple[float, float]], model, depth=None):
        """The ``DiagnosticArray`` of the period ending now.

        ``name``: the node's fully qualified name; ``stamp``: the header stamp; ``cameras``: objects
        with ``topic`` and ``reliability`` (rclpy policy or ``None``); ``bads``/``errors``: snapshots
        of ``CameraStats.bad`` and the error counter taken under the node's lock (the worker may add
        keys meanwhile); ``latencies``: :meth:`StageTimes.percentiles`; ``model``: the loaded
        ``ModelHandle`` or ``None``; ``depth``: per camera ``None`` or ``(values, warning)`` of its 3-D
        (:meth:`ciae_ros.node_depth.CameraDepth.diagnostics`).
        """
        from diagnostic_msgs.msg import DiagnosticArray

        now = time.monotonic()
        t_prev, prev = self._prev
        dt = max(now - t_prev, 1e-6)
        arr = DiagnosticArray()
        arr.header.stamp = stamp
        for k, (cam, st) in enumerate(zip(cameras, stats)):
            p = prev[k] if k < len(prev) else CameraStats()
            extra = depth[k] if depth and k < len(depth) else None
            arr.status.append(_camera_status(f"{name}: {cam.topic}", cam, st, bads[k], p, now, dt, extra))
        arr.status.append(self._model_status(name, model, latencies, errors))
        self._prev = (now, [CameraStats(s.received, s.processed, s.dropped, b) for s, b in zip(stats, bads)])
        return arr

    def _model_status(self, name: str, model, latencies, errors: collections.Counter):
        from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

        mstat = DiagnosticStatus(name=f"{name}: model", hardware_id=model.device if model else "")
        vals = [("model", model.name if model else ""), ("model_version", model.version if model else ""),
                ("weights", model.weights if model else ""), ("engine", model.engine if model else ""),
                ("device", model.device if model else ""),
                # what images the weights know (ciae_core.model_domain); "unknown" when the file does not say
                ("domain", (model.domain or "unknown") if model else ""),
                ("input_size", str(model.predictor.input_size) if model else "")]
        vals += [(f"latency_{stage}_p50_ms", f"{p50:.2f}") for stage, (p50, _) in sorted(latencies.items())]
        vals += [(f"latency_{stage}_p99_ms", f"{p99:.2f}") for stage, (_, p99) in sorted(latencies.items())]
        vals += [(f"errors_{k}", str(v)) for k, v in sorted(errors.items())]
        mstat.values = [KeyValue(key=a, value=b) for a, b in vals]
        # like bad frames: the level reflects the last period (one error must not leave the model in
        # ERROR for good); the running totals stay in the errors_<type> values
        errors_total = sum(errors.values())
        errors_now = errors_total - self._prev_errors
        if errors_now > 0:
            mstat.level = DiagnosticStatus.ERROR
            mstat.message = f"{errors_now} processing error(s) in the last period ({errors_total} in total)"
        else:
            mstat.level, mstat.message = DiagnosticStatus.OK, "ok"
        self._prev_errors = errors_total
        return mstat


def _camera_status(status_name: str, cam, st: CameraStats, bad: collections.Counter, p: CameraStats,
                   now: float, dt: float, depth: tuple[list, str | None] | None = None):
    """One camera's status: rates over the period ``dt`` since the counters ``p``, totals, level;
    ``depth``: the camera's 3-D values and the warning of the period (or ``None``)."""
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

    from .qos import policy_name

    status = DiagnosticStatus(name=status_name, hardware_id=cam.topic)
    vals = [("input_rate_hz", f"{(st.received - p.received) / dt:.2f}"),
            ("processed_rate_hz", f"{(st.processed - p.processed) / dt:.2f}"),
            ("frames_received", str(st.received)), ("frames_processed", str(st.processed)),
            ("frames_dropped", str(st.dropped)), ("frames_bad", str(sum(bad.values())))]
    vals += [(f"bad_{reason}", str(n)) for reason, n in sorted(bad.items())]
    vals.append(("input_reliability", "none (no publisher yet)" if cam.reliability is None
                 else policy_name(cam.reliability)))
    depth_vals, depth_warn = depth or ([], None)
    vals += depth_vals
    bad_now = sum(bad.values()) - sum(p.bad.values())
    if st.received == 0 or now - st.last_received > 5.0:
        status.level, status.message = DiagnosticStatus.WARN, "no input"
    elif bad_now > 0:
        status.level, status.message = DiagnosticStatus.WARN, f"{bad_now} bad frame(s) in the last period"
    elif depth_warn:
        status.level, status.message = DiagnosticStatus.WARN, depth_warn
    else:
        status.level, status.message = DiagnosticStatus.OK, "ok"
    status.values = [KeyValue(key=a, value=b) for a, b in vals]
    return status
