"""Collector pauses and heap kept after a large frame (ciae_ros.process_memory)."""

from __future__ import annotations

import gc
import pathlib

import pytest

from ciae_ros.process_memory import HeapTrimmer, freeze_long_lived_objects, thaw


def _rss_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_frozen_objects_leave_the_collectors_scans_until_thawed():
    keep = [[i] for i in range(100_000)]  # long-lived container objects, as a loaded model has
    try:
        frozen = freeze_long_lived_objects()
        assert frozen >= len(keep)
        assert len(gc.get_objects(generation=2)) < len(keep) // 10  # a full pass no longer walks them
    finally:
        thaw()
    assert gc.get_freeze_count() == 0
    assert len(gc.get_objects(generation=2)) >= len(keep)


def test_trimmer_trims_after_a_frame_larger_than_the_usual_ones():
    t = HeapTrimmer()
    if t._trim is None:
        pytest.skip("no glibc malloc_trim here")
    assert not t.after_frame(640 * 480)  # no history yet
    for _ in range(5):
        assert not t.after_frame(640 * 480)
    assert t.after_frame(4096 * 3072) and t.trims == 1
    assert not t.after_frame(640 * 480)
    assert not t.after_frame(1000)  # small frames never trim


def test_trimming_returns_freed_heap_to_the_system():
    """Small blocks freed between survivors stay resident until malloc_trim returns their pages."""
    t = HeapTrimmer()
    if t._trim is None:
        pytest.skip("no glibc malloc_trim here")
    blocks = [bytearray(4000) for _ in range(60_000)]  # ~240 MB of heap (below the mmap threshold)
    survivors = blocks[::64]  # pin pages all over the heap so it cannot shrink from the top
    del blocks
    before = _rss_mib()
    for _ in range(5):
        t.after_frame(640 * 480)
    assert t.after_frame(4096 * 3072)
    after = _rss_mib()
    assert before - after > 100, f"RSS {before:.0f} -> {after:.0f} MiB: the freed heap was not returned"
    del survivors
