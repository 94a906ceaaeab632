"""Mask IoU on the subsampled id map, against hand-counted cells."""

import numpy as np

from ciae_core.tracking_masks import FrameCells, mask_iou_matrix


def _frame():
    ids = np.zeros((40, 40), np.int32)
    ids[8:24, 8:24] = 5  # 16x16 px: the cell centres 10, 14, 18, 22 -> 4x4 cells (rows/columns 2..5)
    ids[8:24, 24:32] = 6  # 16x8 px: columns 6, 7 -> 4x2 cells
    ids[31:33, 31:33] = 7  # 2x2 px between cell centres (30, 34): no cell
    return FrameCells(ids)


def test_cells_of_segments():
    f = _frame()
    assert f.cells.shape == (10, 10) and f.area[5] == 16 and f.area[6] == 8 and 7 not in f.cells
    (r, c), (r6, c6), (r7, c7) = f.segment_cells([5, 6, 7])
    assert sorted(set(r.tolist())) == [2, 3, 4, 5] and sorted(set(c.tolist())) == [2, 3, 4, 5] and len(r) == 16
    assert sorted(set(c6.tolist())) == [6, 7] and len(r6) == 8 and len(r7) == 0
    assert f.segment_cells([]) == []


def test_mask_iou_of_moved_tracks():
    f = _frame()
    five, six = f.segment_cells([5, 6])
    # track A = segment 5's mask, not moved; track B = segment 5's mask moved 8 px (2 cells) right;
    # track C = segment 6's mask moved 40 px right (out of the image); track D: no cells
    tracks = [five, five, six, (np.zeros(0, np.int64), np.zeros(0, np.int64))]
    shifts = np.array([[0.0, 0.0], [8.0, 0.0], [40.0, 0.0], [0.0, 0.0]])
    iou, valid = mask_iou_matrix(tracks, shifts, f, np.array([5, 6, 7]))
    # B: columns 4-7 -> 8 cells on 5 (union 16+16-8), 8 cells on 6 (union 16+8-8)
    expected = np.array([[1.0, 0.0, 0.0], [8 / 24, 8 / 16, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(iou, expected)
    assert valid.tolist() == [[True, True, False]] * 3 + [[False, False, False]]
    iou, valid = mask_iou_matrix([], np.zeros((0, 2)), f, np.array([5]))
    assert iou.shape == (0, 1)
