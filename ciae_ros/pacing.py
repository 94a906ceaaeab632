"""Pacing the node's worker to ``max_rate`` frames per second, with rate changes that apply at once.

The worker asks :meth:`RatePacer.wait_turn` before it takes a frame and calls
:meth:`RatePacer.started` when it took one. The wait is computed from the rate in force *now*, and
:meth:`RatePacer.set_rate` (the parameter callback's thread) wakes a waiting worker to compute it
again: a rate of 0.01 Hz (a 100 s wait) followed by 0 (no limit) resumes processing at once, not
when the old 100 s have passed.
"""

from __future__ import annotations

import threading
import time


class RatePacer:
    """At most ``rate`` frame starts per second (``rate <= 0``: no limit). Thread-safe."""

    def __init__(self, rate: float = 0.0, clock=time.monotonic):
        self._cond = threading.Condition()
        self._rate = float(rate)
        self._clock = clock
        self._last: float | None = None  # when the last frame started
        self._stopped = False

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        """Change the rate; a worker waiting in :meth:`wait_turn` re-computes its wait from it."""
        with self._cond:
            self._rate = float(rate)
            self._cond.notify_all()

    def stop(self) -> None:
        """Wake the worker for good: :meth:`wait_turn` returns ``False`` from now on."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def restart(self) -> None:
        """Undo :meth:`stop` (processing starts again; the next frame may start at once)."""
        with self._cond:
            self._stopped = False
            self._last = None

    def started(self) -> None:
        """A frame starts now: the next may start ``1 / rate`` seconds later."""
        with self._cond:
            self._last = self._clock()

    def delay(self) -> float:
        """Seconds until the next frame may start under the current rate (0: now)."""
        with self._cond:
            return self._delay_locked()

    def _delay_locked(self) -> float:
        if self._rate <= 0.0 or self._last is None:
            return 0.0
        return max(0.0, self._last + 1.0 / self._rate - self._clock())

    def wait_turn(self) -> bool:
        """Block until the next frame may start (``True``) or the pacer is stopped (``False``)."""
        with self._cond:
            while not self._stopped:
                delay = self._delay_locked()
                if delay <= 0.0:
                    return True
                self._cond.wait(delay)  # woken early by set_rate / stop
            return False
