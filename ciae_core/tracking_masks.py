"""Mask IoU between tracks and segments on a subsampled id map, for :mod:`ciae_core.tracking`.

A box says little about a ring, a rotated triangle or a thing partly hidden behind another of its
class; the masks say more. To keep the cost of a frame near that of boxes, masks are compared at
every ``step``-th pixel (the pixel centres ``(step r + step // 2, step c + step // 2)``, the
embedding's grid at the default ``step = 4``) and all (track, segment) pairs at once:

* a track keeps the cells of its last matched segment (:meth:`FrameCells.segment_cells`) and the
  centre of its filter state at that moment;
* in a new frame (:class:`FrameCells`) the cells are moved by the predicted motion of the centre,
  looked up in the subsampled id map, and one ``bincount`` over (track, segment id) counts every
  intersection (:func:`mask_iou_matrix`): ``IoU = |t ∩ s| / (|t| + |s| - |t ∩ s|)`` in cells.

Segments or tracks with no cell (smaller than the step) have no mask IoU; the caller keeps the
box IoU for them.
"""

from __future__ import annotations

import numpy as np


class FrameCells:
    """The id map of one frame at every ``step``-th pixel centre, with the cell count of every id.

    ``cells``: ``(ceil(H / step), ceil(W / step))`` view of ``id_map``; ``area``: cells per id
    (index = segment id).
    """

    def __init__(self, id_map: np.ndarray, step: int = 4):
        self.step, self.offset = int(step), int(step) // 2
        self.cells = np.asarray(id_map)[self.offset::self.step, self.offset::self.step]
        self.area = np.bincount(self.cells.ravel().astype(np.int64))

    def segment_cells(self, seg_ids) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rows and columns (cell units, ``int64``) of the cells of every segment in ``seg_ids``
        (one pass: the cells of the wanted ids sorted by id, then cut)."""
        seg_ids = np.asarray(seg_ids, dtype=np.int64)
        if len(seg_ids) == 0:
            return []
        flat = self.cells.ravel()
        wanted = np.zeros(max(len(self.area), int(seg_ids.max()) + 1), dtype=bool)
        wanted[seg_ids] = True
        where = np.flatnonzero(wanted[flat])
        ids = flat[where]
        order = np.argsort(ids, kind="stable")
        where, ids = where[order], ids[order]
        rows, cols = np.divmod(where, self.cells.shape[1])
        lo, hi = np.searchsorted(ids, seg_ids), np.searchsorted(ids, seg_ids, side="right")
        return [(rows[i:j], cols[i:j]) for i, j in zip(lo.tolist(), hi.tolist())]


def mask_iou_matrix(track_cells: list[tuple[np.ndarray, np.ndarray]], shifts: np.ndarray, frame: FrameCells,
                    seg_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU in cells of ``T`` track masks moved by ``shifts`` against ``M`` segments of ``frame``.

    Args:
        track_cells: per track, the rows and columns of its mask (:meth:`FrameCells.segment_cells`).
        shifts: ``(T, 2)`` motion ``(dx, dy)`` in pixels since the mask was taken.
        frame: the frame's cells.
        seg_ids: ``(M,)`` ids of the segments.

    Returns ``iou (T, M)`` float64 and ``valid (T, M)`` bool (both masks have cells). Cells moved
    out of the image count in the track's area but meet no segment.
    """
    t_num, m_num = len(track_cells), len(seg_ids)
    seg_ids = np.asarray(seg_ids, dtype=np.int64)
    lens = np.asarray([len(r) for r, _ in track_cells], dtype=np.int64)
    seg_area = np.zeros(m_num, dtype=np.int64)
    known = seg_ids < len(frame.area)
    seg_area[known] = frame.area[seg_ids[known]]
    valid = (lens[:, None] > 0) & (seg_area[None, :] > 0)
    if t_num == 0 or m_num == 0 or not valid.any():
        return np.zeros((t_num, m_num)), valid
    step = frame.step
    move = np.rint(np.asarray(shifts, dtype=np.float64) / step).astype(np.int64)
    rows = np.concatenate([r for r, _ in track_cells]) + np.repeat(move[:, 1], lens)
    cols = np.concatenate([c for _, c in track_cells]) + np.repeat(move[:, 0], lens)
    owner = np.repeat(np.arange(t_num), lens)
    h, w = frame.cells.shape
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    hit = frame.cells[rows[inside], cols[inside]].astype(np.int64)
    k = max(len(frame.area), int(seg_ids.max(initial=0)) + 1)
    inter = np.bincount(owner[inside] * k + hit, minlength=t_num * k).reshape(t_num, k)[:, seg_ids]
    union = lens[:, None] + seg_area[None, :] - inter
    return np.where(valid, inter / np.maximum(union, 1), 0.0), valid
