"""ciae_ros.node_diagnostics: the counters and the /diagnostics message built from them, without a
node (the messages from a running node over DDS are tested in test_node.py)."""

from __future__ import annotations

import collections
import time

import pytest

from ciae_ros.node_diagnostics import CameraStats, DiagnosticsBuilder, StageTimes


def test_stage_times_report_p50_and_p99_over_a_rolling_window():
    times = StageTimes(window=100)
    assert times.percentiles() == {}
    for ms in range(1, 101):
        times.add("predictor", ms)
    p50, p99 = times.percentiles()["predictor"]
    assert p50 == pytest.approx(50.5) and p99 == pytest.approx(99.01)
    for _ in range(100):  # the window forgets the old values
        times.add("predictor", 7.0)
    assert times.percentiles()["predictor"] == (7.0, 7.0)


def _status(arr, suffix: str):
    [st] = [s for s in arr.status if s.name.endswith(suffix)]
    return st, {kv.key: kv.value for kv in st.values}


def test_levels_reflect_the_last_period_and_totals_stay_in_the_values():
    pytest.importorskip("diagnostic_msgs")
    rclpy_qos = pytest.importorskip("rclpy.qos")
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticStatus

    from ciae_ros.node import _Camera

    cam = _Camera(index=0, topic="/cam/image_raw", prefix="")
    stats, errors = [CameraStats()], collections.Counter()
    diag = DiagnosticsBuilder()
    diag.restart(stats, 0)

    def period(latencies=None):
        return diag.build("/ns/node", Time(sec=5), [cam], stats, [collections.Counter(stats[0].bad)],
                          collections.Counter(errors), latencies or {}, None)

    arr = period()
    assert arr.header.stamp.sec == 5 and len(arr.status) == 2
    st, v = _status(arr, ": /cam/image_raw")
    assert st.name == "/ns/node: /cam/image_raw" and st.hardware_id == "/cam/image_raw"
    assert (st.level, st.message) == (DiagnosticStatus.WARN, "no input")
    assert v["input_reliability"] == "none (no publisher yet)" and v["frames_received"] == "0"
    model, mv = _status(arr, ": model")
    assert (model.level, model.message) == (DiagnosticStatus.OK, "ok") and mv["model"] == ""

    # frames, one of them bad: WARN for this period only
    cam.reliability = rclpy_qos.ReliabilityPolicy.BEST_EFFORT
    stats[0].received, stats[0].processed, stats[0].dropped = 10, 6, 3
    stats[0].bad["bad_step"] += 1
    stats[0].last_received = time.monotonic()
    st, v = _status(period({"total": (12.5, 40.0)}), ": /cam/image_raw")
    assert (st.level, st.message) == (DiagnosticStatus.WARN, "1 bad frame(s) in the last period")
    assert (v["frames_received"], v["frames_processed"], v["frames_dropped"], v["frames_bad"]) == ("10", "6", "3", "1")
    assert v["bad_bad_step"] == "1" and v["input_reliability"] == "best_effort"
    assert float(v["input_rate_hz"]) > 0 and float(v["processed_rate_hz"]) > 0
    stats[0].last_received = time.monotonic()
    arr = period({"total": (12.5, 40.0)})
    st, v = _status(arr, ": /cam/image_raw")
    assert (st.level, st.message) == (DiagnosticStatus.OK, "ok") and v["bad_bad_step"] == "1"
    assert float(v["input_rate_hz"]) == 0.0, "no frame arrived in this period"
    _, mv = _status(arr, ": model")
    assert (mv["latency_total_p50_ms"], mv["latency_total_p99_ms"]) == ("12.50", "40.00")

    # processing errors: ERROR while they happen, OK again a period later, the total kept
    errors["PredictorError"] += 2
    model, _ = _status(period(), ": model")
    assert model.level == DiagnosticStatus.ERROR
    assert model.message == "2 processing error(s) in the last period (2 in total)"
    model, mv = _status(period(), ": model")
    assert (model.level, model.message) == (DiagnosticStatus.OK, "ok") and mv["errors_PredictorError"] == "2"


def test_restart_starts_a_new_first_period():
    """Processing (re)starts, e.g. a lifecycle activate: processing errors counted before do not
    make the first period's model level ERROR, and rates count from the restart."""
    pytest.importorskip("diagnostic_msgs")
    pytest.importorskip("rclpy")
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticStatus

    from ciae_ros.node import _Camera

    cam = _Camera(index=0, topic="/c", prefix="")
    st = CameraStats(received=5, processed=5, last_received=time.monotonic())
    diag = DiagnosticsBuilder()
    diag.restart([st], errors_total=3)
    arr = diag.build("/n", Time(), [cam], [st], [collections.Counter()], collections.Counter(ValueError=3), {}, None)
    assert [(s.level, s.message) for s in arr.status] == [(DiagnosticStatus.OK, "ok")] * 2
    assert float(_status(arr, ": /c")[1]["input_rate_hz"]) == 0.0


def test_the_model_status_carries_the_domain(node_weights):
    """``domain``: the model file's (``unknown`` when it does not say); empty before a model is loaded."""
    pytest.importorskip("diagnostic_msgs")
    import dataclasses

    from builtin_interfaces.msg import Time

    from ciae_ros.node_model import load_model
    from ciae_ros.node_params import SPECS

    def model_values(model):
        arr = DiagnosticsBuilder().build("/n", Time(), [], [], [], collections.Counter(), {}, model)
        return _status(arr, ": model")[1]

    handle = load_model({**{name: spec.default for name, spec in SPECS.items()}, "weights": node_weights})
    assert model_values(dataclasses.replace(handle, domain="synthetic-shapes"))["domain"] == "synthetic-shapes"
    assert model_values(dataclasses.replace(handle, domain=None))["domain"] == "unknown"
    assert model_values(None)["domain"] == ""
