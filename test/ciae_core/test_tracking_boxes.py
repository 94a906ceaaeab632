"""Box helpers and the Kalman filter of the tracker."""

import numpy as np
import pytest

from ciae_core.tracking_boxes import BoxKalmanFilter, box_iou_cxcywh, trimmed_boxes, xywh_to_cxcywh

FPS = 30.0


def test_kalman_filter_uses_the_time_between_stamps():
    kf = BoxKalmanFilter()
    mean, cov = kf.initiate(np.array([[50.0, 60.0, 20.0, 20.0]]))
    for k in range(1, 11):  # 150 px/s in x at 30 Hz
        mean, cov = kf.predict(mean, cov, 1 / FPS)
        mean, cov = kf.correct(mean, cov, np.array([[50.0 + 5.0 * k, 60.0, 20.0, 20.0]]))
    assert mean[0, 4] == pytest.approx(150.0, rel=0.1) and abs(mean[0, 5]) < 5
    ahead, cov_ahead = kf.predict(mean, cov, 0.5)
    assert ahead[0, 0] == pytest.approx(mean[0, 0] + 0.5 * mean[0, 4]) and ahead[0, 1] == pytest.approx(mean[0, 1])
    assert (cov_ahead[0, :, 0] > cov[0, :, 0]).all()  # the longer the gap, the less certain
    same, same_cov = kf.predict(mean, cov, 0.0)
    assert np.array_equal(same, mean) and np.array_equal(same_cov, cov)
    # The element-wise covariance equals the 8x8 filter's on a random case.
    rng = np.random.default_rng(0)
    m0, c0 = kf.initiate(rng.uniform(10, 50, size=(1, 4)))
    z = m0[:, :4] + rng.normal(size=(1, 4))
    m1, c1 = kf.correct(*kf.predict(m0, c0, 0.1), z)
    f = np.eye(8)
    f[range(4), range(4, 8)] = 0.1
    p = np.zeros((8, 8))
    for i in range(4):
        p[[i, i, i + 4, i + 4], [i, i + 4, i, i + 4]] = c0[0, i, [0, 1, 1, 2]]
    s = np.maximum(m0[0, 2:4], 1)
    q = (kf.motion_noise * np.concatenate([s, s])) ** 2
    qm = np.zeros((8, 8))
    for i in range(4):
        qm[[i, i, i + 4, i + 4], [i, i + 4, i, i + 4]] = q[i] * np.array([0.1 ** 4 / 4, 0.1 ** 3 / 2, 0.1 ** 3 / 2,
                                                                            0.1 ** 2])
    p = f @ p @ f.T + qm
    x = f @ m0[0]
    hm = np.eye(4, 8)
    sp = np.maximum(x[2:4], 1)
    r = np.diag((kf.measurement_noise * np.concatenate([sp, sp])) ** 2)
    k = p @ hm.T @ np.linalg.inv(hm @ p @ hm.T + r)
    x = x + k @ (z[0] - hm @ x)
    p = p - k @ hm @ p
    assert np.allclose(m1[0], x)
    assert np.allclose(c1[0, :, 0], np.diag(p)[:4]) and np.allclose(c1[0, :, 1], np.diag(p[:4, 4:]))


def test_trimmed_boxes_ignore_stray_pixels():
    ids = np.zeros((100, 100), np.int32)
    ids[20:40, 30:60] = 1
    ids[90, 95] = 1  # one stray pixel of segment 1
    ids[60:80, 10:30] = 2
    tight = np.array([[30, 20, 66, 71], [10, 60, 20, 20]], np.float64)
    out = trimmed_boxes(ids, [1, 2], tight, trim=0.02)
    assert np.array_equal(out[1], tight[1])  # compact: the tight box exactly
    x, y, w, h = out[0]
    assert 28 <= x <= 30 and 18 <= y <= 20 and 60 <= x + w <= 64 and 40 <= y + h <= 44


def test_box_conversion_and_iou():
    b = xywh_to_cxcywh([[10, 20, 4, 6], [0, 0, 2, 2]])
    assert b.tolist() == [[12.0, 23.0, 4.0, 6.0], [1.0, 1.0, 2.0, 2.0]]
    iou = box_iou_cxcywh(np.array([[5.0, 5.0, 10.0, 10.0]]), np.array([[10.0, 5.0, 10.0, 10.0], [50.0, 50, 2, 2]]))
    assert iou[0, 0] == pytest.approx(50 / 150) and iou[0, 1] == 0.0
    assert box_iou_cxcywh(np.zeros((0, 4)), np.zeros((3, 4))).shape == (0, 3)


def test_kalman_filter_arguments():
    for name in ("motion_noise", "measurement_noise", "initial_velocity_std"):
        with pytest.raises(ValueError, match=name):
            BoxKalmanFilter(**{name: 0.0})
        with pytest.raises(ValueError, match=name):
            BoxKalmanFilter(**{name: True})
