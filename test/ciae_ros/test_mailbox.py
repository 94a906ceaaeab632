"""ciae_ros.mailbox: the one-slot-per-camera latest-frame mailbox (no ROS needed)."""

from __future__ import annotations

import time


def test_mailbox_keeps_only_the_newest_frame_per_camera():
    import threading

    from ciae_ros.mailbox import LatestFrameMailbox

    box = LatestFrameMailbox(2)
    assert box.put(0, "a0") is False
    assert box.put(0, "a1") is True, "replacing an unprocessed frame is a drop"
    assert box.put(1, "b0") is False
    assert box.take(timeout=0.0) == [(0, "a1"), (1, "b0")], "all cameras' newest frames go into one batch"
    assert box.take(timeout=0.05) == []
    got = []
    t = threading.Thread(target=lambda: got.append(box.take(timeout=5.0)))
    t.start()
    time.sleep(0.05)
    box.put(1, "b1")
    t.join(2)
    assert got == [[(1, "b1")]], "take wakes up when a frame arrives"
