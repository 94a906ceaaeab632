"""Pairing the colour frame being processed with the depth frame of the same instant, never waiting.

The node keeps its one-slot "newest colour frame" mailbox: colour frames are never queued or
held back for depth. Depth and ``CameraInfo`` callbacks only *remember* (a short history of depth
frames, the latest ``CameraInfo``); when the worker has a colour frame it asks
:meth:`DepthSynchronizer.match` for the depth frame whose stamp is equal or nearest to the colour
stamp, within ``tolerance`` seconds. No match is not an error: the frame is processed and
published without 3-D, and the reason is counted (:data:`REASONS`).

Call ``match`` *after* inference, right before building the outputs: by then the depth frame
taken together with the colour frame has certainly arrived (drivers publish both within a few
milliseconds; inference takes tens to hundreds).

Why not ``message_filters.ApproximateTimeSynchronizer`` (not installable here anyway)? It emits
colour+depth *pairs* from queues: a colour frame whose depth is late or lost is never emitted, and
the node would wait for pairs instead of taking the newest colour frame at once. Used *only* to
feed depth into this history it would add nothing, so we keep our own. Its ``slop`` is our
``tolerance``; its per-topic ``queue_size`` our ``history``.

Thread safety: ``add_*`` run in subscription callbacks, ``match`` in the worker; one lock.
Pure Python over anything with ``header.stamp`` (rclpy or rosbags messages): testable without DDS.
"""

from __future__ import annotations

import bisect
import collections
import threading
from dataclasses import dataclass

#: Why a colour frame got no depth (keys counted in ``counts``; ``matched`` counts successes).
REASONS = ("no_depth", "stamp_out_of_tolerance", "no_camera_info")


def stamp_ns(stamp) -> int:
    """``builtin_interfaces/Time`` (``sec``, ``nanosec``) -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


@dataclass
class DepthMatch:
    """Result of :meth:`DepthSynchronizer.match`.

    depth / camera_info: the messages (None when unmatched); reason: None when matched, else one
    of :data:`REASONS`; dt: depth stamp minus colour stamp in seconds (None without depth).
    """

    depth: object | None
    camera_info: object | None
    reason: str | None
    dt: float | None

    @property
    def ok(self) -> bool:
        return self.reason is None


class DepthSynchronizer:
    """One camera's depth history and the nearest-stamp lookup.

    Args:
        tolerance: largest ``|depth stamp - colour stamp|`` in seconds accepted as the same
            instant (default 0.02: below the 33 ms period of a 30 Hz camera, so a neighbouring
            frame is never taken for the right one).
        history: depth frames kept (default 16: half a second at 30 Hz; the colour frame being
            processed is never older than the processing time).
        max_backward_jump: a depth stamp this many seconds older than the newest one kept means
            the clock went back (a bag played in a loop, a simulator reset): the history is cleared.
    """

    def __init__(self, tolerance: float = 0.02, history: int = 16, max_backward_jump: float = 1.0):
        if tolerance < 0 or history < 1 or max_backward_jump <= 0:
            raise ValueError("tolerance >= 0, history >= 1 and max_backward_jump > 0 required")
        self.tolerance_ns = int(round(tolerance * 1e9))
        self.max_backward_jump_ns = int(round(max_backward_jump * 1e9))
        self._stamps: list[int] = []  # sorted, parallel to _frames
        self._frames: list = []
        self._history = int(history)
        self._info = None
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()

    def add_depth(self, msg, stamp: int | None = None) -> None:
        """Remember a depth frame (``stamp`` in ns; default ``msg.header.stamp``)."""
        t = stamp_ns(msg.header.stamp) if stamp is None else int(stamp)
        with self._lock:
            if self._stamps and t < self._stamps[-1] - self.max_backward_jump_ns:
                self._stamps.clear()
                self._frames.clear()
                self._counts["history_reset"] += 1
            i = bisect.bisect_right(self._stamps, t)
            self._stamps.insert(i, t)
            self._frames.insert(i, msg)
            if len(self._stamps) > self._history:  # drop the oldest
                del self._stamps[0]
                del self._frames[0]

    def add_camera_info(self, msg) -> None:
        """Remember the latest ``CameraInfo`` (intrinsics of a registered depth image rarely change)."""
        with self._lock:
            self._info = msg

    def match(self, color_stamp: int) -> DepthMatch:
        """Depth frame nearest to ``color_stamp`` (ns) within the tolerance, and the camera info.

        Never blocks. On a tie the newer depth frame wins. Counts the outcome (``matched`` or
        the reason).
        """
        t = int(color_stamp)
        with self._lock:
            if not self._stamps:
                return self._miss("no_depth", None)
            i = bisect.bisect_left(self._stamps, t)
            best = min((j for j in (i - 1, i) if 0 <= j < len(self._stamps)),
                       key=lambda j: (abs(self._stamps[j] - t), -j))
            dt = (self._stamps[best] - t) / 1e9
            if abs(self._stamps[best] - t) > self.tolerance_ns:
                return self._miss("stamp_out_of_tolerance", dt)
            if self._info is None:
                return self._miss("no_camera_info", dt)
            self._counts["matched"] += 1
            return DepthMatch(self._frames[best], self._info, None, dt)

    def _miss(self, reason: str, dt: float | None) -> DepthMatch:
        self._counts[reason] += 1
        return DepthMatch(None, None, reason, dt)

    @property
    def counts(self) -> dict[str, int]:
        """Copy of the counters: ``matched``, the :data:`REASONS`, ``history_reset``."""
        with self._lock:
            return dict(self._counts)

    def __len__(self) -> int:
        with self._lock:
            return len(self._stamps)

    def clear(self) -> None:
        """Forget all depth frames and the camera info (e.g. when the depth topic changes)."""
        with self._lock:
            self._stamps.clear()
            self._frames.clear()
            self._info = None
