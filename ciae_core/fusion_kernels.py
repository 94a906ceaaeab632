"""Compiled CPU kernels for the coarse-to-fine panoptic fusion (numba, optional).

:func:`ciae_core.fusion.coarse_to_fine_assignment` decides whole stride-s cells from bounds with
batched tensor ops; on a CPU its cost is dozens of passes over ``(N, K, h, w)`` tensors and the
full-resolution histogram tail, about 10 % of a small model's frame. These kernels run the same
algorithm as loops, one cell at a time, touching each corner value once:

* :func:`assign_cells` — step 3 of :func:`~ciae_core.fusion.fuse_panoptic` (first assignment):
  per cell the bounds of every slot, a cell whose best lower bound beats every other upper bound
  is filled at once; the other cells are evaluated per pixel over the slots whose upper bound
  reaches that lower bound. Also the per-slot pixel counts and the similarity sums of the stuff
  slots (stuff scores).
* :func:`reassign_dropped` — step 4: pixels won by a dropped instance, re-evaluated over every
  slot still allowed.
* :func:`segment_extents` — steps 5–6 inputs: per-slot area and tight box.

Same arithmetic as the tensor paths (float32, the bilinear sum in torch's order
``(a*lx0 + b*lx1)*ly0 + (c*lx0 + d*lx1)*ly1``, no fast-math, first index wins ties), so the id
map is the dense path's bit for bit; tests compare all three. Stuff similarity sums are float64.

numba is an optional dependency: :func:`available` says whether it imported; ``fuse_panoptic``
falls back to the tensor path without it. Kernels are compiled on first use (a few seconds) and
cached on disk by numba (``cache=True``; ``NUMBA_CACHE_DIR`` moves the cache).
"""

from __future__ import annotations

import numpy as np

try:  # optional: the tensor implementation is used without it
    import numba
except ImportError:  # pragma: no cover - depends on the installation
    numba = None


def available() -> bool:
    """Whether the compiled kernels can run (numba imported)."""
    return numba is not None


def _jit(fn):
    if numba is None:
        return fn
    return numba.njit(cache=True, nogil=True, fastmath=False)(fn)


@_jit
def _cells_of(i0, n_cells):
    """Output rows (or columns) per cell: ``start (n_cells,)``, ``count (n_cells,)`` from the
    first bilinear tap of each output index (non-decreasing)."""
    start = np.zeros(n_cells, np.int64)
    count = np.zeros(n_cells, np.int64)
    for i in range(i0.shape[0] - 1, -1, -1):
        start[i0[i]] = i
        count[i0[i]] += 1
    return start, count


@_jit
def _coverage(inside, start, count):
    """Box coverage of each (slot, cell) along one axis: 0 none, 1 some, 2 all of its indices."""
    q = inside.shape[0]
    n_cells = start.shape[0]
    cov = np.zeros((q, n_cells), np.int8)
    for j in range(q):
        for c in range(n_cells):
            m = 0
            for i in range(start[c], start[c] + count[c]):
                if inside[j, i]:
                    m += 1
            cov[j, c] = 0 if m == 0 else (2 if m == count[c] else 1)
    return cov


@_jit
def _bilinear(t, n, k, r0, r1, c0, c1, wy0, wy1, wx0, wx1):
    return (t[n, k, r0, c0] * wx0 + t[n, k, r0, c1] * wx1) * wy0 + (t[n, k, r1, c0] * wx0 + t[n, k, r1, c1] * wx1) * wy1


@_jit
def assign_cells(sim, val, i0y, i1y, l0y, l1y, i0x, i1x, l0x, l1x, in_y, in_x, inst_ok, sizes, s_num, outside,
                 assign, counts, sums):
    """First assignment (step 3) of every valid output pixel, cell by cell.

    sim ``(N, K, h, w)`` float32 similarities at the embedding resolution (argmax), val same shape
    (the values summed for stuff scores; may be ``sim``), the bilinear taps of the ``(H, W)``
    output rows and columns, in_y ``(N, Q, H)`` / in_x ``(N, Q, W)`` box rows / columns,
    inst_ok ``(N, Q)``, sizes ``(N, 2)`` valid (h, w). Writes assign ``(N, H, W)`` int32 (the
    slot; pixels outside the valid region are left as they are), adds each slot's valid pixel
    count to counts ``(N, K)`` int64 and each stuff slot's summed up-sampled value to sums
    ``(N, K)`` float64 (instance entries are not used by the fusion and stay as they are).
    """
    n_img, k_num, h, w = sim.shape
    neg = np.float32(-np.inf)
    ov = np.float32(outside)
    row_start, rows_per = _cells_of(i0y, h)
    col_start, cols_per = _cells_of(i0x, w)
    lo = np.empty(k_num, np.float32)
    hi = np.empty(k_num, np.float32)
    cand = np.empty(k_num, np.int64)
    sx0 = np.zeros(w, np.float64)
    sx1 = np.zeros(w, np.float64)
    vx = np.zeros(w, np.int64)
    for n in range(n_img):
        vh, vw = sizes[n, 0], sizes[n, 1]
        cov_y = _coverage(in_y[n], row_start, rows_per)
        cov_x = _coverage(in_x[n], col_start, cols_per)
        for cc in range(w):  # valid columns per cell and their summed weights (separable sums)
            sx0[cc] = 0.0
            sx1[cc] = 0.0
            vx[cc] = 0
            for x in range(col_start[cc], min(col_start[cc] + cols_per[cc], vw)):
                sx0[cc] += l0x[x]
                sx1[cc] += l1x[x]
                vx[cc] += 1
        for cr in range(h):
            y_begin = row_start[cr]
            y_end = min(y_begin + rows_per[cr], vh)
            if y_end <= y_begin:
                continue
            r1 = i1y[y_begin]
            sy0 = 0.0
            sy1 = 0.0
            for y in range(y_begin, y_end):
                sy0 += l0y[y]
                sy1 += l1y[y]
            for cc in range(w):
                if vx[cc] == 0:
                    continue
                x_begin = col_start[cc]
                x_end = x_begin + vx[cc]
                c1 = i1x[x_begin]
                best = 0
                best_lo = neg
                for k in range(k_num):
                    a = sim[n, k, cr, cc]
                    b = sim[n, k, cr, c1]
                    c = sim[n, k, r1, cc]
                    d = sim[n, k, r1, c1]
                    low = min(min(a, b), min(c, d))
                    high = max(max(a, b), max(c, d))
                    if k >= s_num:
                        j = k - s_num
                        if not inst_ok[n, j]:
                            low = neg
                            high = neg
                        else:
                            cy = cov_y[j, cr]
                            cx = cov_x[j, cc]
                            if cy == 0 or cx == 0:
                                low = ov
                                high = ov
                            elif cy == 1 or cx == 1:
                                low = min(low, ov)
                                high = max(high, ov)
                    lo[k] = low
                    hi[k] = high
                    if k == 0 or low > best_lo:
                        best_lo = low
                        best = k
                others = neg
                for k in range(k_num):
                    if k != best and hi[k] > others:
                        others = hi[k]
                if others < best_lo:  # the whole cell is the best slot's
                    for y in range(y_begin, y_end):
                        for x in range(x_begin, x_end):
                            assign[n, y, x] = best
                    counts[n, best] += (y_end - y_begin) * vx[cc]
                    if best < s_num:
                        sums[n, best] += (val[n, best, cr, cc] * sx0[cc] * sy0 + val[n, best, cr, c1] * sx1[cc] * sy0
                                          + val[n, best, r1, cc] * sx0[cc] * sy1
                                          + val[n, best, r1, c1] * sx1[cc] * sy1)
                    continue
                m = 0  # candidates: an upper bound that reaches the best lower bound (ascending)
                for k in range(k_num):
                    if hi[k] >= best_lo:
                        cand[m] = k
                        m += 1
                for y in range(y_begin, y_end):
                    wy0 = l0y[y]
                    wy1 = l1y[y]
                    for x in range(x_begin, x_end):
                        wx0 = l0x[x]
                        wx1 = l1x[x]
                        won = -1
                        top = neg
                        for ci in range(m):
                            k = cand[ci]
                            if k >= s_num and not inst_ok[n, k - s_num]:
                                v = neg
                            elif k >= s_num and not (in_y[n, k - s_num, y] and in_x[n, k - s_num, x]):
                                v = ov
                            else:
                                v = _bilinear(sim, n, k, cr, r1, cc, c1, wy0, wy1, wx0, wx1)
                            if won < 0 or v > top:
                                top = v
                                won = k
                        assign[n, y, x] = won
                        counts[n, won] += 1
                        if won < s_num:
                            sums[n, won] += _bilinear(val, n, won, cr, r1, cc, c1, wy0, wy1, wx0, wx1)


@_jit
def reassign_dropped(sim, val, i0y, i1y, l0y, l1y, i0x, i1x, l0x, l1x, in_y, in_x, inst_ok, dropped, sizes, s_num,
                     outside, assign, sums):
    """Step 4: every valid pixel whose slot is ``dropped`` ``(N, K)`` gets the first maximum over
    all slots still allowed (inst_ok ``(N, Q)`` without the dropped ones); a pixel won by a stuff
    slot adds its value to sums. Other pixels keep their slot (removing a query changes no other
    pixel's maximum). Arguments as :func:`assign_cells`."""
    n_img, k_num, h, w = sim.shape
    neg = np.float32(-np.inf)
    ov = np.float32(outside)
    for n in range(n_img):
        for y in range(sizes[n, 0]):
            r0 = i0y[y]
            r1 = i1y[y]
            wy0 = l0y[y]
            wy1 = l1y[y]
            for x in range(sizes[n, 1]):
                if not dropped[n, assign[n, y, x]]:
                    continue
                c0 = i0x[x]
                c1 = i1x[x]
                won = 0
                top = neg
                for k in range(k_num):
                    if k >= s_num and not inst_ok[n, k - s_num]:
                        v = neg
                    elif k >= s_num and not (in_y[n, k - s_num, y] and in_x[n, k - s_num, x]):
                        v = ov
                    else:
                        v = _bilinear(sim, n, k, r0, r1, c0, c1, wy0, wy1, l0x[x], l1x[x])
                    if k == 0 or v > top:
                        top = v
                        won = k
                assign[n, y, x] = won
                if won < s_num:
                    sums[n, won] += _bilinear(val, n, won, r0, r1, c0, c1, wy0, wy1, l0x[x], l1x[x])


@_jit
def segment_extents(assign, sizes, k_num):
    """Per slot of the valid region of each ``(N, H, W)`` assignment: ``area (N, K)`` int64 and
    ``boxes (N, K, 4)`` int64 ``x0, y0, x1, y1`` (max edges exclusive; zeros for an empty slot)."""
    n_img = assign.shape[0]
    area = np.zeros((n_img, k_num), np.int64)
    boxes = np.zeros((n_img, k_num, 4), np.int64)
    for n in range(n_img):
        for k in range(k_num):
            boxes[n, k, 0] = assign.shape[2]
            boxes[n, k, 1] = assign.shape[1]
        for y in range(sizes[n, 0]):
            for x in range(sizes[n, 1]):
                k = assign[n, y, x]
                area[n, k] += 1
                if x < boxes[n, k, 0]:
                    boxes[n, k, 0] = x
                if x + 1 > boxes[n, k, 2]:
                    boxes[n, k, 2] = x + 1
                if y < boxes[n, k, 1]:
                    boxes[n, k, 1] = y
                if y + 1 > boxes[n, k, 3]:
                    boxes[n, k, 3] = y + 1
        for k in range(k_num):
            if area[n, k] == 0:
                boxes[n, k, 0] = 0
                boxes[n, k, 1] = 0
    return area, boxes
