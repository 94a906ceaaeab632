"""Boxes of segments and their motion, for :mod:`ciae_core.tracking`.

* :func:`xywh_to_cxcywh`, :func:`box_iou_cxcywh`: box conversion and the IoU matrix;
* :func:`trimmed_boxes`: segment boxes without a few stray pixels far from the thing;
* :class:`BoxKalmanFilter`: a constant-velocity Kalman filter on boxes in continuous time (SORT's
  motion model, stepped by the time between stamps).
"""

from __future__ import annotations

import math

import numpy as np

from .user_input import quote



def xywh_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` ``(x, y, w, h)`` tight pixel boxes → ``(N, 4)`` float64 ``(cx, cy, w, h)``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2] + b[:, 2:] / 2, b[:, 2:]], axis=1)


def box_iou_cxcywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``(N, M)`` of ``(N, 4)`` and ``(M, 4)`` ``(cx, cy, w, h)`` boxes (sides floored at 1 px)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    aw, ah = np.maximum(a[:, 2], 1.0), np.maximum(a[:, 3], 1.0)
    bw, bh = np.maximum(b[:, 2], 1.0), np.maximum(b[:, 3], 1.0)
    ax0, ax1, ay0, ay1 = a[:, 0] - aw / 2, a[:, 0] + aw / 2, a[:, 1] - ah / 2, a[:, 1] + ah / 2
    bx0, bx1, by0, by1 = b[:, 0] - bw / 2, b[:, 0] + bw / 2, b[:, 1] - bh / 2, b[:, 1] + bh / 2
    iw = np.clip(np.minimum(ax1[:, None], bx1[None]) - np.maximum(ax0[:, None], bx0[None]), 0, None)
    ih = np.clip(np.minimum(ay1[:, None], by1[None]) - np.maximum(ay0[:, None], by0[None]), 0, None)
    inter = iw * ih
    return inter / ((aw * ah)[:, None] + (bw * bh)[None] - inter)


def trimmed_boxes(id_map: np.ndarray, seg_ids, boxes: np.ndarray, trim: float = 0.02, step: int = 4) -> np.ndarray:
    """Segment boxes without their outlying pixels.

    Args:
        id_map: ``(H, W)`` segment ids.
        seg_ids: ``N`` ids of the segments.
        boxes: ``(N, 4)`` their tight ``(x, y, w, h)`` boxes (``Segment.bbox``).
        trim: fraction of a segment's pixels cut at each end along x and along y.
        step: the pixels are counted on ``id_map[step//2::step, step//2::step]`` (cheap: one
            ``bincount`` per axis over ``H W / step^2`` samples).

    Returns ``(N, 4)`` float64 ``(x, y, w, h)``: the tight box intersected with the box of the
    sampled pixels between the ``trim`` and ``1 - trim`` quantiles along each axis, widened by one
    ``step`` on each side (so a compact segment keeps its tight box exactly). A segment with fewer
    than 8 samples keeps its tight box.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ids = np.asarray(seg_ids, dtype=np.int64)
    if len(ids) == 0:
        return boxes.copy()
    off = step // 2
    sub = np.asarray(id_map)[off::step, off::step]
    lut = np.full(max(int(sub.max(initial=0)), int(ids.max())) + 1, -1, dtype=np.int64)
    lut[ids] = np.arange(len(ids))
    k = lut[sub]
    r, c = np.nonzero(k >= 0)
    kk = k[r, c]
    out = boxes.copy()
    for axis, coord, size in ((1, r, sub.shape[0]), (0, c, sub.shape[1])):
        hist = np.bincount(kk * size + coord, minlength=len(ids) * size).reshape(len(ids), size)
        cum = np.cumsum(hist, axis=1)
        total = cum[:, -1:]
        lo = np.argmax(cum > trim * total, axis=1)
        hi = np.argmax(cum >= (1 - trim) * total, axis=1)
        ok = total[:, 0] >= 8
        lo_px = (lo - 1) * step + off  # one step of margin
        hi_px = (hi + 1) * step + off
        a0 = boxes[:, axis]
        a1 = a0 + boxes[:, axis + 2] - 1
        n0 = np.where(ok, np.maximum(a0, lo_px), a0)
        n1 = np.where(ok, np.minimum(a1, hi_px), a1)
        n1 = np.maximum(n1, n0)
        out[:, axis], out[:, axis + 2] = n0, n1 - n0 + 1
    return out


class BoxKalmanFilter:
    """Constant-velocity Kalman filter over a batch of boxes, in continuous time (SORT's model).

    State per box ``x = (cx, cy, w, h, vcx, vcy, vw, vh)`` in px and px/s; measurement
    ``z = (cx, cy, w, h)``. Noise scales with the box: the x-like components (cx, w and their
    velocities) with the box width, the y-like ones with its height, so one set of parameters
    fits near and far things.

    * Prediction over ``dt`` seconds (Eq. K1): ``x' = F x``, ``P' = F P F^T + Q`` with
      ``F = [[I, dt I], [0, I]]`` and, per coordinate of scale ``s`` (piecewise-constant white
      acceleration of std ``motion_noise * s`` px/s², Eq. K2):
      ``Q = (motion_noise s)^2 [[dt^4/4, dt^3/2], [dt^3/2, dt^2]]``. ``dt`` is the time between
      stamps, so a frame gap is one longer step, not several.
    * Correction (Eq. K3): ``K = P H^T (H P H^T + R)^-1``, ``x += K (z - H x)``, ``P -= K H P`` with
      ``H = [I 0]`` and ``R = diag((measurement_noise s)^2)``.
    * Start: ``x = (z, 0)``, ``P = diag((2 measurement_noise s)^2, (initial_velocity_std s)^2)``.

    F, Q, R and H act on each coordinate separately and the start is diagonal, so ``P`` stays
    block-diagonal: the four (position, velocity) pairs are independent 2x2 filters. The
    covariance is therefore kept as ``cov (N, 4, 3)`` = (var position, cov position-velocity,
    var velocity) per coordinate and every step is element-wise (exactly the 8x8 filter, without
    its matrix products); ``mean`` is ``(N, 8)``, float64.

    Args:
        motion_noise: acceleration std in box sides per s² (default 4: a thing may change its speed
            by several box sides per second within a second).
        measurement_noise: std of a measured box coordinate as a fraction of the box side
            (default 0.05, ByteTrack's 1/20).
        initial_velocity_std: std of a new track's unknown velocity in box sides per s (default 2).
    """

    def __init__(self, motion_noise: float = 4.0, measurement_noise: float = 0.05,
                 initial_velocity_std: float = 2.0):
        for name, v in (("motion_noise", motion_noise), ("measurement_noise", measurement_noise),
                        ("initial_velocity_std", initial_velocity_std)):
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {quote(v)}")
        self.motion_noise = float(motion_noise)
        self.measurement_noise = float(measurement_noise)
        self.initial_velocity_std = float(initial_velocity_std)

    @staticmethod
    def _scale(mean: np.ndarray) -> np.ndarray:
        """``(N, 4)`` scale of (cx, cy, w, h): the box sides (w, h, w, h), at least 1 px."""
        wh = np.maximum(mean[:, 2:4], 1.0)
        return np.concatenate([wh, wh], axis=1)

    def initiate(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """New states from ``(N, 4)`` measurements: ``mean (N, 8)``, ``cov (N, 4, 3)``."""
        z = np.asarray(z, dtype=np.float64).reshape(-1, 4)
        s = self._scale(z)
        mean = np.concatenate([z, np.zeros_like(z)], axis=1)
        cov = np.zeros((len(z), 4, 3))
        cov[:, :, 0] = (2 * self.measurement_noise * s) ** 2
        cov[:, :, 2] = (self.initial_velocity_std * s) ** 2
        return mean, cov

    def predict(self, mean: np.ndarray, cov: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
        """States ``dt`` seconds later (Eq. K1, K2); ``dt <= 0`` returns copies."""
        if dt <= 0 or len(mean) == 0:
            return mean.copy(), cov.copy()
        mean = mean.copy()
        mean[:, :4] += dt * mean[:, 4:]
        q = (self.motion_noise * self._scale(mean)) ** 2
        a, b, c = cov[:, :, 0], cov[:, :, 1], cov[:, :, 2]
        out = np.empty_like(cov)
        out[:, :, 0] = a + 2 * dt * b + dt * dt * c + q * (dt ** 4 / 4)
        out[:, :, 1] = b + dt * c + q * (dt ** 3 / 2)
        out[:, :, 2] = c + q * (dt * dt)
        return mean, out

    def correct(self, mean: np.ndarray, cov: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Corrected states from ``(N, 4)`` measurements of the ``N`` given states (Eq. K3)."""
        z = np.asarray(z, dtype=np.float64).reshape(-1, 4)
        if len(z) == 0:
            return mean.copy(), cov.copy()
        r = (self.measurement_noise * self._scale(mean)) ** 2
        a, b, c = cov[:, :, 0], cov[:, :, 1], cov[:, :, 2]
        s = a + r
        kp, kv = a / s, b / s  # Kalman gain of position and velocity
        y = z - mean[:, :4]
        mean = mean.copy()
        mean[:, :4] += kp * y
        mean[:, 4:] += kv * y
        out = np.empty_like(cov)
        out[:, :, 0] = a - kp * a
        out[:, :, 1] = b - kp * b
        out[:, :, 2] = c - kv * b
        return mean, out
