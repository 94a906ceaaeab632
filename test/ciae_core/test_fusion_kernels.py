"""ciae_core.fusion_kernels: the compiled helpers against plain numpy / torch references.

The assignment kernels themselves are compared with the dense and tensor fusion paths in
test_fusion.py (same id maps and tables); here are the building blocks.
"""

import numpy as np
import pytest
import torch

from ciae_core import fusion_kernels
from ciae_core.fusion_coarse import bilinear_taps

pytestmark = pytest.mark.skipif(not fusion_kernels.available(), reason="numba is not installed")


@pytest.mark.parametrize("out_size,in_size", [(64, 16), (61, 16), (29, 7), (8, 8)])
def test_cells_of_lists_the_output_indices_of_each_cell(out_size, in_size):
    i0 = bilinear_taps(out_size, in_size)[0]
    start, count = fusion_kernels._cells_of(i0.numpy(), in_size)
    np.testing.assert_array_equal(count, torch.bincount(i0, minlength=in_size).numpy())
    for c in range(in_size):
        if count[c]:
            assert (i0[start[c]:start[c] + count[c]] == c).all()


def test_coverage_says_none_some_or_all():
    inside = np.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=bool)
    cov = fusion_kernels._coverage(inside, np.array([0, 2, 4]), np.array([2, 2, 2]))
    np.testing.assert_array_equal(cov, [[0, 2, 1], [2, 2, 2], [0, 0, 0]])


def test_segment_extents_equal_a_per_slot_reference():
    rng = np.random.default_rng(0)
    k = 6
    # blocky assignment (runs along rows) plus noise, two images with different valid regions
    assign = np.repeat(rng.integers(0, k, size=(2, 20, 7)), 5, axis=2).astype(np.int32)
    assign[rng.random(assign.shape) < 0.1] = 3
    sizes = np.array([[20, 35], [13, 22]])
    assign[1, 13:, :] = k  # void outside the valid region (as the fusion leaves it)
    assign[1, :, 22:] = k
    area, boxes = fusion_kernels.segment_extents(assign, sizes, k + 1)
    for n, (h, w) in enumerate(sizes):
        valid = assign[n, :h, :w]
        for slot in range(k + 1):
            ys, xs = np.nonzero(valid == slot)
            assert area[n, slot] == ys.size
            expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if ys.size else [0, 0, 0, 0]
            assert boxes[n, slot].tolist() == expected, (n, slot)


def test_ids_of_slots_is_a_lookup():
    rng = np.random.default_rng(1)
    assign = rng.integers(0, 5, size=(2, 9, 11)).astype(np.int32)
    lut = rng.integers(0, 100, size=(2, 5)).astype(np.int32)
    out = fusion_kernels.ids_of_slots(assign, lut)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, np.take_along_axis(lut, assign.reshape(2, -1), 1).reshape(assign.shape))
