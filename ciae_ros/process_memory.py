"""Keeping a long-running node process flat: no collector pauses, no memory kept by one big frame.

* :func:`freeze_long_lived_objects`: after the model is loaded, the ~430 000 objects of torch,
  numba and the model are alive for good, and every full (generation 2) pass of Python's cyclic
  garbage collector walked all of them: ~1 s with the GIL held (measured on this 2-core machine),
  which stopped the worker and the executor alike -- the 1.5 s stall seen once in a 10-minute
  30 Hz soak. ``gc.freeze()`` moves them to the permanent generation, which the collector skips
  (a full pass then took ~11 ms). :func:`thaw` undoes it before a model is released, so that
  the old model's reference cycles are collected.
* :class:`HeapTrimmer`: a frame much larger than the usual ones leaves glibc's heaps holding
  freed memory (measured: one 4096x3072 frame among 640x480 ones kept ~20-35 MB of free heap
  resident for the rest of the run). After such a frame, ``malloc_trim(0)`` returns it to the
  system. (The other part of that growth, Fast DDS keeping a writer's largest payload buffer, is
  the DDS profile's business: ``config/fastdds_large_data.xml``.)
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import statistics


def freeze_long_lived_objects() -> int:
    """Collect, then move every object alive now out of the collector's scans; the number moved."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw() -> None:
    """Put the frozen objects back under the collector (before releasing what they belong to)."""
    gc.unfreeze()


def _malloc_trim():
    """glibc's ``malloc_trim`` or ``None`` (musl, macOS: nothing to call)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` after a frame of more than ``factor`` times the median pixel count
    of the last ``window`` frames (at least ``min_pixels``): rare, and cheap next to such a frame."""

    def __init__(self, factor: float = 2.0, window: int = 32, min_pixels: int = 1 << 20):
        self._recent: collections.deque = collections.deque(maxlen=window)
        self._factor = factor
        self._min_pixels = min_pixels
        self._trim = _malloc_trim()
        self.trims = 0

    def after_frame(self, pixels: int) -> bool:
        """Note a processed frame of ``pixels`` pixels; trims (and returns ``True``) after a large one."""
        large = (len(self._recent) >= 4 and pixels >= self._min_pixels
                 and pixels > self._factor * statistics.median(self._recent))
        self._recent.append(int(pixels))
        if large and self._trim is not None:
            self._trim(0)
            self.trims += 1
            return True
        return False
