"""ciae_ros.depth_sync: nearest-stamp colour/depth pairing, never blocking, counted by reason."""

import threading
import time

import pytest
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo, Image

from ciae_ros.depth_sync import REASONS, DepthSynchronizer, stamp_ns

MS = 1_000_000


def _depth(t_ns: int, tag: str = "") -> Image:
    m = Image()
    m.header.stamp = Time(sec=t_ns // 1_000_000_000, nanosec=t_ns % 1_000_000_000)
    m.header.frame_id = tag
    return m


def _sync(**kw) -> DepthSynchronizer:
    s = DepthSynchronizer(**kw)
    s.add_camera_info(CameraInfo())
    return s


def test_stamp_ns():
    assert stamp_ns(Time(sec=3, nanosec=5)) == 3_000_000_005


def test_equal_and_nearest_stamps_within_tolerance():
    s = _sync(tolerance=0.02)
    for t in (1000, 1033, 1066, 1100):
        s.add_depth(_depth(t * MS, str(t)))
    m = s.match(1033 * MS)
    assert m.ok and m.depth.header.frame_id == "1033" and m.dt == 0.0 and m.camera_info is not None
    m = s.match(1080 * MS)  # 14 ms after 1066, 20 ms before 1100
    assert m.ok and m.depth.header.frame_id == "1066" and m.dt == pytest.approx(-0.014)
    m = s.match(1120 * MS)  # 20 ms after the newest: still within
    assert m.ok and m.depth.header.frame_id == "1100"
    m = s.match(990 * MS)
    assert m.ok and m.depth.header.frame_id == "1000" and m.dt == pytest.approx(0.010)
    assert s.counts == {"matched": 4}


def test_tie_takes_the_newer_depth_frame():
    s = _sync()
    s.add_depth(_depth(100 * MS, "old"))
    s.add_depth(_depth(110 * MS, "new"))
    assert s.match(105 * MS).depth.header.frame_id == "new"


def test_unmatched_reasons_are_counted():
    s = DepthSynchronizer(tolerance=0.01)
    m = s.match(5 * MS)
    assert not m.ok and m.reason == "no_depth" and m.depth is None and m.dt is None
    s.add_depth(_depth(100 * MS))
    m = s.match(150 * MS)
    assert m.reason == "stamp_out_of_tolerance" and m.dt == pytest.approx(-0.05) and m.depth is None
    m = s.match(105 * MS)
    assert m.reason == "no_camera_info" and m.depth is None
    s.add_camera_info(CameraInfo())
    assert s.match(105 * MS).ok
    assert s.counts == {"no_depth": 1, "stamp_out_of_tolerance": 1, "no_camera_info": 1, "matched": 1}
    assert set(REASONS) == {"no_depth", "stamp_out_of_tolerance", "no_camera_info"}


def test_history_keeps_the_newest_frames_in_stamp_order():
    s = _sync(history=3, tolerance=0.001)
    for t in (10, 40, 20, 30, 50):  # out of order arrival
        s.add_depth(_depth(t * MS, str(t)))
    assert len(s) == 3
    assert s.match(10 * MS).reason == "stamp_out_of_tolerance"  # dropped: the two oldest
    assert s.match(20 * MS).reason == "stamp_out_of_tolerance"
    assert [s.match(t * MS).depth.header.frame_id for t in (30, 40, 50)] == ["30", "40", "50"]


def test_clock_going_back_clears_the_history():
    s = _sync(max_backward_jump=1.0)
    s.add_depth(_depth(100_000 * MS, "late"))
    s.add_depth(_depth(99_500 * MS, "slightly_older"))  # 0.5 s back: kept
    assert len(s) == 2
    s.add_depth(_depth(10 * MS, "restart"))  # bag loop: 100 s back
    assert len(s) == 1 and s.counts["history_reset"] == 1
    assert s.match(10 * MS).depth.header.frame_id == "restart"
    assert s.match(100_000 * MS).reason == "stamp_out_of_tolerance"


def test_clear_forgets_depth_and_camera_info():
    s = _sync()
    s.add_depth(_depth(0))
    s.clear()
    assert len(s) == 0 and s.match(0).reason == "no_depth"
    s.add_depth(_depth(0))
    assert s.match(0).reason == "no_camera_info"


def test_constructor_checks():
    for kw in ({"tolerance": -1.0}, {"history": 0}, {"max_backward_jump": 0.0}):
        with pytest.raises(ValueError):
            DepthSynchronizer(**kw)


def test_concurrent_callbacks_and_worker():
    """Subscription threads add frames while a worker matches: no exception, nothing lost in the
    counters, the history never exceeds its size, and match never waits for a frame."""
    s = _sync(history=8, tolerance=0.002)
    stop = threading.Event()
    errors = []

    def producer(offset):
        t = offset
        try:
            while not stop.is_set():
                s.add_depth(_depth(t * MS))
                t += 2
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(k,)) for k in (0, 1)]
    for th in threads:
        th.start()
    n = 0
    deadline = time.monotonic() + 60.0
    try:
        while n < 2000 and time.monotonic() < deadline:
            s.match(n * MS)
            assert len(s) <= 8
            n += 1
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors and n == 2000
    assert sum(v for k, v in s.counts.items() if k != "history_reset") == 2000
