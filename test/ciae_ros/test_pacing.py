"""RatePacer: at most max_rate frame starts per second, and a rate change applies at once."""

from __future__ import annotations

import threading
import time

from ciae_ros.pacing import RatePacer


def _waiter(pacer: RatePacer) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        out["turn"] = pacer.wait_turn()
        out["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_no_limit_and_first_frame_go_at_once():
    p = RatePacer()
    assert p.wait_turn() and p.delay() == 0.0
    p.set_rate(0.01)
    assert p.wait_turn()  # nothing started yet
    p.started()
    assert 99.0 < p.delay() <= 100.0


def test_a_rate_change_wakes_a_waiting_worker():
    """0.01 Hz (a 100 s wait), then 0: the worker goes on at once, not 100 s later."""
    p = RatePacer(0.01)
    p.started()
    t, out = _waiter(p)
    time.sleep(0.2)
    assert t.is_alive(), "the worker must wait under 0.01 Hz"
    changed = time.monotonic()
    p.set_rate(0.0)
    t.join(30)  # generous on a loaded machine; the old behaviour waited the whole 100 s
    assert not t.is_alive() and out["turn"] is True
    assert out["at"] - changed < 30


def test_a_faster_rate_shortens_the_wait_and_stop_ends_it():
    clock = [0.0]
    p = RatePacer(0.5, clock=lambda: clock[0])
    p.started()
    assert p.delay() == 2.0
    p.set_rate(10.0)
    assert abs(p.delay() - 0.1) < 1e-9
    clock[0] = 0.1
    assert p.delay() == 0.0
    p.set_rate(0.01)
    t, out = _waiter(p)
    p.stop()
    t.join(30)
    assert not t.is_alive() and out["turn"] is False
    p.restart()
    assert p.wait_turn()
