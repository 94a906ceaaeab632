"""The latest-frame mailbox between the subscription callbacks and the node's worker thread."""

from __future__ import annotations

import threading


class LatestFrameMailbox:
    """One slot per camera holding only the newest frame; the worker takes all slots at once.

    ``put`` never blocks and returns whether an older, unprocessed frame was replaced (dropped).
    """

    def __init__(self, num_slots: int):
        self._slots: list = [None] * num_slots
        self._cond = threading.Condition()
        self._closed = False

    def put(self, slot: int, item) -> bool:
        with self._cond:
            dropped = self._slots[slot] is not None
            self._slots[slot] = item
            self._cond.notify()
            return dropped

    def take(self, timeout: float) -> list[tuple[int, object]]:
        """Wait up to ``timeout`` s for at least one frame; return ``[(slot, item), ...]`` and empty the slots."""
        with self._cond:
            if not self._closed and all(s is None for s in self._slots):
                self._cond.wait(timeout)
            items = [(k, s) for k, s in enumerate(self._slots) if s is not None]
            self._slots = [None] * len(self._slots)
            return items

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
