"""Compiled CPU kernels for the coarse-to-fine panoptic fusion (numba, optional).

:func:`ciae_core.fusion_coarse.coarse_to_fine_assignment` decides whole stride-s cells from bounds with
batched tensor ops; on a CPU its cost is dozens of passes over ``(N, K, h, w)`` tensors and the
full-resolution histogram tail, about 10 % of a small model's frame. These kernels run the same
algorithm as loops, one cell at a time, touching each corner value once:

* :func:`assign_cells` — step 3 of :func:`~ciae_core.fusion.fuse_panoptic` (first assignment):
  per cell the bounds of the slots that can matter there (stuff, instances whose box reaches the
  cell, the first one whose box misses it); a cell whose best lower bound beats every other upper
  bound, or whose four corners agree on the winner, is filled at once; the other cells are
  evaluated per pixel over the slots whose upper bound reaches that lower bound. Also the
  per-slot pixel counts and the similarity sums of the stuff slots (stuff scores).
* :func:`reassign_dropped` — step 4: pixels won by a dropped instance, re-evaluated over every
  slot still allowed.
* :func:`segment_extents` — steps 5–6 inputs: per-slot area and tight box (row runs).
* :func:`ids_of_slots` — the id map from the final slot of each pixel.

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


def _inlined(fn):
    """A small helper inlined into its callers at numba's IR level (a real call passes its array
    arguments with reference counting, which per pixel cost more than the work)."""
    if numba is None:
        return fn
    return numba.njit(inline="always", nogil=True, fastmath=False)(fn)


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


@_inlined
def _bilinear(pa, pb, pc, pd, k, wy0, wy1, wx0, wx1):
    """Up-sampled value of slot k from its four corner vectors, in torch's order."""
    return (pa[k] * wx0 + pb[k] * wx1) * wy0 + (pc[k] * wx0 + pd[k] * wx1) * wy1


@_inlined
def _corners(sim, n, r0, r1, c0, c1):
    """The K-vectors of image n at the four source samples (r0|r1, c0|c1) of a pixel or cell."""
    return sim[n, r0, c0], sim[n, r0, c1], sim[n, r1, c0], sim[n, r1, c1]


@_inlined
def _pixel_winner(pa, pb, pc, pd, slots, count, s_num, ok, in_y, in_x, y, x, ov, wy0, wy1, wx0, wx1):
    """Eq. 16 at one output pixel over ``slots[:count]`` (ascending): a disabled instance is -inf,
    an instance whose box misses the pixel ``ov``, else the up-sampled similarity; the first
    maximum wins. in_y / in_x: this image's ``(Q, H)`` / ``(Q, W)`` box masks."""
    won = -1
    top = np.float32(-np.inf)
    for i in range(count):
        k = slots[i]
        j = k - s_num
        if j >= 0 and not ok[j]:
            v = np.float32(-np.inf)
        elif j >= 0 and not (in_y[j, y] and in_x[j, x]):
            v = ov
        else:
            v = _bilinear(pa, pb, pc, pd, k, wy0, wy1, wx0, wx1)
        if won < 0 or v > top:
            top = v
            won = k
    return won


@_inlined
def _cosine_at(pa, pb, pc, pd, na, nb, nc, nd, k, wy0, wy1, wx0, wx1):
    """Up-sampled ``sim / norm`` of slot k (each corner divided first, as the tensor path does)."""
    return ((pa[k] / na) * wx0 + (pb[k] / nb) * wx1) * wy0 + ((pc[k] / nc) * wx0 + (pd[k] / nd) * wx1) * wy1


@_inlined
def _corner_winner(pa, pb, pc, pd, cand, m, s_num, inst_ok, cov_y, cov_x, cr, cc, ov):
    """The candidate that is the first maximum at all four corners of a cell, or -1 (also when
    it is an instance whose box crosses the cell). Instances whose box crosses the cell count
    with their larger possible value (corner or ``ov``), so a convex combination of the corners
    keeps the winner on top at every pixel; the candidates (cand[:m], ascending) are the only
    slots that can win anywhere in the cell."""
    neg = np.float32(-np.inf)
    winner = -1
    for corner in range(4):
        p = pa if corner == 0 else (pb if corner == 1 else (pc if corner == 2 else pd))
        top = neg
        won = -1
        for ci in range(m):
            k = cand[ci]
            v = p[k]
            if k >= s_num:
                j = k - s_num
                if not inst_ok[j]:
                    v = neg
                elif cov_y[j, cr] == 0 or cov_x[j, cc] == 0:
                    v = ov
                elif cov_y[j, cr] == 1 or cov_x[j, cc] == 1:
                    v = max(v, ov)
            if won < 0 or v > top:
                top = v
                won = k
        if corner == 0:
            winner = won
        elif won != winner:
            return -1
    if winner >= s_num:
        j = winner - s_num
        outside = cov_y[j, cr] == 0 or cov_x[j, cc] == 0
        if not outside and (cov_y[j, cr] == 1 or cov_x[j, cc] == 1):
            return -1
    return winner


@_inlined
def _column_sums(col_start, cols_per, vw, l0x, l1x, sx0, sx1, vx):
    """Per cell column: its valid output columns ``vx`` and their summed weights ``sx0, sx1``
    (the separable sums of a decided cell's similarity)."""
    for cc in range(col_start.shape[0]):
        sx0[cc] = 0.0
        sx1[cc] = 0.0
        vx[cc] = 0
        for x in range(col_start[cc], min(col_start[cc] + cols_per[cc], vw)):
            sx0[cc] += l0x[x]
            sx1[cc] += l1x[x]
            vx[cc] += 1


@_inlined
def _row_instances(ok, cov_y, cr, row_active):
    """The enabled instances whose box reaches cell row ``cr`` (into ``row_active``, ascending)
    and the first enabled one whose box does not (Q if none): ``(n_active, first_out_row)``."""
    q_num = ok.shape[0]
    n_active = 0
    first_out_row = q_num
    for j in range(q_num):
        if ok[j]:
            if cov_y[j, cr] > 0:
                row_active[n_active] = j
                n_active += 1
            elif first_out_row == q_num:
                first_out_row = j
    return n_active, first_out_row


@_inlined
def _cell_slots(s_num, row_active, n_active, first_out_row, cov_x, cc, slot):
    """The slots that can matter in the cell at column ``cc`` of a row (:func:`assign_cells`), into
    ``slot`` ascending: the stuff slots, the row's active instances whose box reaches the column,
    and the first instance whose box misses the cell, at its rank. Returns ``(m, first_out)``:
    how many, and that instance (Q if none)."""
    first_out = first_out_row
    for i in range(n_active):
        j = row_active[i]
        if j >= first_out:
            break
        if cov_x[j, cc] == 0:
            first_out = j
    m = 0
    for k in range(s_num):
        slot[m] = k
        m += 1
    placed = first_out == cov_x.shape[0]  # the first outside instance goes in at its rank
    for i in range(n_active):
        j = row_active[i]
        if not placed and first_out < j:
            slot[m] = s_num + first_out
            m += 1
            placed = True
        if cov_x[j, cc] > 0:
            slot[m] = s_num + j
            m += 1
    if not placed:
        slot[m] = s_num + first_out
        m += 1
    if m == 0:  # no stuff and no enabled instance: every value is -inf, the first slot wins
        slot[0] = 0
        m = 1
    return m, first_out


@_inlined
def _cell_bounds(pa, pb, pc, pd, slot, m, s_num, ok, first_out, cov_y, cov_x, cr, cc, ov, lo, hi):
    """Lower and upper bounds ``lo, hi [:m]`` of the visited slots over the cell (corner values,
    widened to ``ov`` where the box crosses the cell). Returns ``(best_lo, winner)``: the best
    lower bound (first slot on ties) and the slot that wins the whole cell by bounds (its lower
    bound beats every other upper bound), else -1."""
    neg = np.float32(-np.inf)
    best = 0
    best_lo = neg
    top_hi = neg
    top_i = -1
    second_hi = neg
    for i in range(m):
        k = slot[i]
        j = k - s_num
        if j >= 0 and not ok[j]:
            low = neg
            high = neg
        elif j >= 0 and j == first_out:  # outside its box: the constant
            low = ov
            high = ov
        else:
            a = pa[k]
            b = pb[k]
            c = pc[k]
            d = pd[k]
            low = min(min(a, b), min(c, d))
            high = max(max(a, b), max(c, d))
            if j >= 0 and (cov_y[j, cr] == 1 or cov_x[j, cc] == 1):  # the box crosses the cell
                low = min(low, ov)
                high = max(high, ov)
        lo[i] = low
        hi[i] = high
        if i == 0 or low > best_lo:
            best_lo = low
            best = i
        if high > top_hi:
            second_hi = top_hi
            top_hi = high
            top_i = i
        elif high > second_hi:
            second_hi = high
    others = second_hi if top_i == best else top_hi
    return best_lo, (slot[best] if others < best_lo else -1)


@_inlined
def _candidates(slot, hi, m, best_lo, cand):
    """The visited slots whose upper bound reaches ``best_lo`` into ``cand`` (ascending); how many."""
    c_num = 0
    for i in range(m):
        if hi[i] >= best_lo:
            cand[c_num] = slot[i]
            c_num += 1
    return c_num


@_jit
def assign_cells(sim, norm, i0y, i1y, l0y, l1y, i0x, i1x, l0x, l1x, in_y, in_x, inst_ok, sizes, s_num, outside,
                 assign, counts, sums):
    """First assignment (step 3) of every valid output pixel, cell by cell.

    sim ``(N, h, w, K)`` float32 similarities at the embedding resolution, queries innermost (the
    argmax), norm ``(N, h, w)`` float32 (the values summed for stuff scores are ``sim / norm``:
    the cosines when sim is the un-normalised map's dot products, ``sim`` itself for ones), the bilinear
    taps of the ``(H, W)`` output rows and columns, in_y ``(N, Q, H)`` / in_x ``(N, Q, W)`` box
    rows / columns, inst_ok ``(N, Q)``, sizes ``(N, 2)`` valid (h, w). Writes assign
    ``(N, H, W)`` int32 (the slot; pixels outside the valid region are left as they are), adds
    each slot's valid pixel count to counts ``(N, K)`` int64 and each stuff slot's summed
    up-sampled value to sums ``(N, K)`` float64 (instance entries are not used by the fusion and
    stay as they are).

    Per cell only the slots that can matter are visited (:func:`_cell_slots`): the stuff slots,
    the instances whose box reaches into the cell, and of the instances whose box misses the cell
    only the first (they all have the constant ``outside`` there, so a later one can never win;
    disabled instances, at -inf, never win while a stuff slot exists). A cell is decided by bounds
    (:func:`_cell_bounds`), else by :func:`_corner_winner`, else pixel by pixel over the
    candidates (upper bound reaching the best lower bound).
    """
    n_img, h, w, k_num = sim.shape
    q_num = k_num - s_num
    ov = np.float32(outside)
    row_start, rows_per = _cells_of(i0y, h)
    col_start, cols_per = _cells_of(i0x, w)
    slot = np.empty(k_num + 1, np.int64)  # the slots visited in a cell, ascending
    lo = np.empty(k_num + 1, np.float32)
    hi = np.empty(k_num + 1, np.float32)
    cand = np.empty(k_num + 1, np.int64)
    row_active = np.empty(q_num, np.int64)
    sx0 = np.zeros(w, np.float64)
    sx1 = np.zeros(w, np.float64)
    vx = np.zeros(w, np.int64)
    for n in range(n_img):
        vh, vw = sizes[n, 0], sizes[n, 1]
        ok = inst_ok[n]
        box_y = in_y[n]
        box_x = in_x[n]
        cov_y = _coverage(box_y, row_start, rows_per)
        cov_x = _coverage(box_x, col_start, cols_per)
        _column_sums(col_start, cols_per, vw, l0x, l1x, sx0, sx1, vx)
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
            n_active, first_out_row = _row_instances(ok, cov_y, cr, row_active)
            for cc in range(w):
                if vx[cc] == 0:
                    continue
                x_begin = col_start[cc]
                x_end = x_begin + vx[cc]
                c1 = i1x[x_begin]
                m, first_out = _cell_slots(s_num, row_active, n_active, first_out_row, cov_x, cc, slot)
                pa, pb, pc, pd = _corners(sim, n, cr, r1, cc, c1)
                best_lo, winner = _cell_bounds(pa, pb, pc, pd, slot, m, s_num, ok, first_out, cov_y, cov_x, cr, cc,
                                               ov, lo, hi)
                c_num = 0
                if winner < 0:
                    c_num = _candidates(slot, hi, m, best_lo, cand)
                    winner = _corner_winner(pa, pb, pc, pd, cand, c_num, s_num, ok, cov_y, cov_x, cr, cc, ov)
                if winner >= 0:
                    for y in range(y_begin, y_end):
                        for x in range(x_begin, x_end):
                            assign[n, y, x] = winner
                    counts[n, winner] += (y_end - y_begin) * vx[cc]
                    if winner < s_num:
                        sums[n, winner] += (pa[winner] / norm[n, cr, cc] * sx0[cc] * sy0
                                            + pb[winner] / norm[n, cr, c1] * sx1[cc] * sy0
                                            + pc[winner] / norm[n, r1, cc] * sx0[cc] * sy1
                                            + pd[winner] / norm[n, r1, c1] * sx1[cc] * sy1)
                    continue
                for y in range(y_begin, y_end):
                    wy0 = l0y[y]
                    wy1 = l1y[y]
                    for x in range(x_begin, x_end):
                        wx0 = l0x[x]
                        wx1 = l1x[x]
                        won = _pixel_winner(pa, pb, pc, pd, cand, c_num, s_num, ok, box_y, box_x, y, x, ov,
                                            wy0, wy1, wx0, wx1)
                        assign[n, y, x] = won
                        counts[n, won] += 1
                        if won < s_num:
                            sums[n, won] += _cosine_at(pa, pb, pc, pd, norm[n, cr, cc], norm[n, cr, c1],
                                                       norm[n, r1, cc], norm[n, r1, c1], won, wy0, wy1, wx0, wx1)


@_jit
def reassign_dropped(sim, norm, i0y, i1y, l0y, l1y, i0x, i1x, l0x, l1x, in_y, in_x, inst_ok, dropped, sizes, s_num,
                     outside, assign, sums):
    """Step 4: every valid pixel whose slot is ``dropped`` ``(N, K)`` gets the first maximum over
    all slots still allowed (inst_ok ``(N, Q)`` without the dropped ones); a pixel won by a stuff
    slot adds its value to sums. Other pixels keep their slot (removing a query changes no other
    pixel's maximum). Arguments as :func:`assign_cells`."""
    n_img, h, w, k_num = sim.shape
    ov = np.float32(outside)
    allowed = np.empty(k_num, np.int64)
    for n in range(n_img):
        ok = inst_ok[n]
        box_y = in_y[n]
        box_x = in_x[n]
        m = 0  # the slots that can win: stuff and the instances still enabled (the others are -inf)
        for k in range(k_num):
            if k < s_num or ok[k - s_num]:
                allowed[m] = k
                m += 1
        if m == 0:  # nothing enabled: every value is -inf, the first slot wins
            allowed[0] = 0
            m = 1
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
                pa, pb, pc, pd = _corners(sim, n, r0, r1, c0, c1)
                won = _pixel_winner(pa, pb, pc, pd, allowed, m, s_num, ok, box_y, box_x, y, x, ov,
                                    wy0, wy1, l0x[x], l1x[x])
                assign[n, y, x] = won
                if won < s_num:
                    sums[n, won] += _cosine_at(pa, pb, pc, pd, norm[n, r0, c0], norm[n, r0, c1], norm[n, r1, c0],
                                               norm[n, r1, c1], won, wy0, wy1, l0x[x], l1x[x])


@_jit
def segment_extents(assign, sizes, k_num):
    """Per slot of the valid region of each ``(N, H, W)`` assignment: ``area (N, K)`` int64 and
    ``boxes (N, K, 4)`` int64 ``x0, y0, x1, y1`` (max edges exclusive; zeros for an empty slot).
    Walks each row as runs of one slot (segments are wide), one update per run."""
    n_img = assign.shape[0]
    area = np.zeros((n_img, k_num), np.int64)
    boxes = np.zeros((n_img, k_num, 4), np.int64)
    for n in range(n_img):
        for k in range(k_num):
            boxes[n, k, 0] = assign.shape[2]
            boxes[n, k, 1] = assign.shape[1]
        vw = sizes[n, 1]
        for y in range(sizes[n, 0]):
            x = 0
            while x < vw:
                k = assign[n, y, x]
                end = x + 1
                while end < vw and assign[n, y, end] == k:
                    end += 1
                area[n, k] += end - x
                if x < boxes[n, k, 0]:
                    boxes[n, k, 0] = x
                if end > boxes[n, k, 2]:
                    boxes[n, k, 2] = end
                if y < boxes[n, k, 1]:
                    boxes[n, k, 1] = y
                boxes[n, k, 3] = y + 1
                x = end
        for k in range(k_num):
            if area[n, k] == 0:
                boxes[n, k, 0] = 0
                boxes[n, k, 1] = 0
    return area, boxes


@_jit
def ids_of_slots(assign, slot_ids):
    """``id_map (N, H, W)`` int32: ``slot_ids[n, assign[n, y, x]]`` (slot_ids ``(N, K + 1)`` int32)."""
    n_img, hh, ww = assign.shape
    out = np.empty((n_img, hh, ww), np.int32)
    for n in range(n_img):
        for y in range(hh):
            for x in range(ww):
                out[n, y, x] = slot_ids[n, assign[n, y, x]]
    return out
