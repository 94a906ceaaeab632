"""ciae_core.depth_kernels: the compiled per-point pass of SegmentDepth, on a hand-made frame (its
statistics against the per-segment reference are tested in test_depth.py, both paths)."""

import numpy as np
import pytest

from ciae_core import depth_kernels


def test_point_keys_by_hand():
    ids = np.array([[1, 1, 2, 0], [1, 3, 2, 2], [7, 1, 1, 2]], np.int32)
    depth = np.array([[1000, 0, 2000, 500], [3000, 1500, 2500, 999], [4000, 1200, 99000 % 65536, 2200]], np.uint16)
    rx = np.array([-0.3, -0.1, 0.1, 0.3], np.float32)
    ry = np.array([-0.2, 0.0, 0.2], np.float32)
    scale, offset = np.array([10.0, 100.0, 100.0, 10.0]), np.array([0.0, 500.0, 500.0, 0.0])
    keys = np.zeros((4, 12), np.uint32)
    counts, rmax = np.zeros(2, np.int64), np.zeros(2, np.float32)
    # groups: ids 1, 2 (first = 1, n = 2); id 3 and 7 not asked for; depth 0 and 33.464 m invalid
    used = depth_kernels.point_keys(ids, depth, np.ones((1, 1), bool), False, 1, 1, np.zeros(1, np.int64),
                                    np.float32(0.001), 0.1, 10.0, rx, ry, 20, scale, offset, keys, counts, rmax)
    pts = [(0, 0, 1.0, 0), (0, 2, 2.0, 1), (1, 0, 3.0, 0), (1, 2, 2.5, 1), (1, 3, 0.999, 1), (2, 1, 1.2, 0),
           (2, 3, 2.2, 1)]  # (row, col, z, group) in scan order
    assert used == len(pts) and counts.tolist() == [3, 4]
    for k, (i, j, z, g) in enumerate(pts):
        x, y = z * rx[j], z * ry[i]
        n = z * np.sqrt(1 + rx[j] ** 2 + ry[i] ** 2)
        assert keys[:, k] >> 20 == pytest.approx([g] * 4)
        q = keys[:, k] & ((1 << 20) - 1)
        assert q.tolist() == pytest.approx([z * 10, x * 100 + 500, y * 100 + 500, n * 10], abs=1.0)
    norms = np.sqrt(1 + rx[None, :] ** 2 + ry[:, None] ** 2)
    for g, where in enumerate(([(0, 0), (1, 0), (2, 1)], [(0, 2), (1, 2), (1, 3), (2, 3)])):
        assert rmax[g] == pytest.approx(max(norms[i, j] for i, j in where), rel=1e-6)
    # a lookup table and an interior mask
    inner = np.ones((3, 4), bool)
    inner[0, 0] = False
    lut = np.array([2, 0, 2, 2, 2, 2, 2, 1])  # id 1 -> 0, id 7 -> 1, others not asked for
    used = depth_kernels.point_keys(ids, depth, inner, True, 1, 0, lut, np.float32(0.001), 0.1, 10.0, rx, ry, 20,
                                    scale, offset, keys, counts, rmax)
    # id 1: (0,0) not interior, (0,1) no depth, (2,2) at 33.464 m beyond max: (1,0) and (2,1); id 7: (2,0)
    assert used == 3 and counts.tolist() == [2, 1]
    assert (keys[0, :3] >> 20).tolist() == [0, 1, 0]


def test_near_candidates_keep_order_and_count_per_group():
    shift = 20
    keys = np.array([(0 << 20) | 5, (1 << 20) | 9, (0 << 20) | 50, (1 << 20) | 3, (2 << 20) | 7], np.uint32)
    out, counts = np.zeros(5, np.uint32), np.zeros(3, np.int64)
    c = depth_kernels.near_candidates(keys, shift, np.array([10, 9, 6], np.uint32), out, counts)
    assert c == 3 and out[:3].tolist() == [5, (1 << 20) | 9, (1 << 20) | 3] and counts.tolist() == [1, 2, 0]
