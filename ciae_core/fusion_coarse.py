"""Eq. 16 at full resolution from stride-s similarities, without the full ``(N, K, H, W)`` tensor.

The machinery behind :func:`ciae_core.fusion.fuse_panoptic`'s ``"coarse_to_fine"`` and
``"numba"`` methods (paper §IV-C; our decision on cost, same id maps as the dense path):

* :func:`bilinear_taps` / :func:`_bilinear_at` — ``F.interpolate(mode="bilinear")``'s taps and
  weights, so up-sampled similarities can be evaluated at any set of output pixels in torch's
  own arithmetic (bit for bit);
* :func:`coarse_to_fine_assignment` — the first assignment (argmax over queries, with the
  remote-instance box filter) decided per stride x stride cell from bounds of its four corner
  values, and evaluated per pixel (:func:`_candidate_argmax`) only in the undecided cells;
  :func:`_pixel_argmax` re-evaluates single pixels (pixels of dropped instances);
* :func:`cell_similarity_sums`, :func:`_values_at`, :func:`_sum_by_slot` — the per-slot
  similarity sums behind the stuff scores, from the same corner values;
* :func:`_compiled_assignment` — the same algorithm as compiled CPU loops
  (:mod:`ciae_core.fusion_kernels`, numba, optional);
* :func:`first_argmax` and :data:`MASKED_SIMILARITY` — the argmax rule every path shares (first
  index wins ties; masked queries never win).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from ciae_core import fusion_kernels

# similarity given to queries that must not win a pixel (with normalize_after_upsampling the
# compared values are un-normalised dot products, so no finite floor is safe)
MASKED_SIMILARITY = float("-inf")


def first_argmax(sim: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """``sim.max(dim)`` — values and the *first* index of the maximum, exactly — computed as
    ``amax`` plus an equality pass: ``torch.max``/``argmax`` over a non-innermost dimension is
    up to 10x slower on CPU than ``amax`` (at 83 x 800 x 1216 about 300 ms vs 30 ms), and
    transposing the queries innermost costs more than it saves. Finite inputs.
    """
    top = sim.amax(dim, keepdim=True)
    k = sim.shape[dim]
    shape = [1] * sim.dim()
    shape[dim] = k
    is_top = sim == top
    if k <= 255:  # reinterpret the bool mask as 0/1 bytes (no copy)
        key_dtype, key = torch.uint8, is_top.view(torch.uint8)
    else:
        key_dtype = torch.int16 if k < 2 ** 15 else torch.int32
        key = is_top.to(key_dtype)
    rev = torch.arange(k, 0, -1, dtype=key_dtype, device=sim.device).view(shape)  # first index → largest key
    key.mul_(rev)
    return top.squeeze(dim), k - key.amax(dim).long()


@functools.lru_cache(maxsize=64)
def bilinear_taps(out_size: int, in_size: int, device=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The two source taps and weights of ``F.interpolate(mode="bilinear", align_corners=False)``
    along one axis, computed the way torch computes them: source coordinate
    ``max(0, (i + 0.5) * in/out - 0.5)``, ``i0 = floor``, ``i1 = min(i0 + 1, in - 1)``,
    ``l1 = frac``, ``l0 = 1 - l1`` (float32). Returns ``i0, i1 (out,)`` long and ``l0, l1 (out,)``.
    Cached per (sizes, device): a camera stream asks for the same few every frame (read-only).
    """
    scale = torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(float(out_size), dtype=torch.float32)
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.long().clamp_max(in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    l1 = (src - i0.float()).clamp(0.0, 1.0)
    l0 = 1.0 - l1
    return tuple(t.to(device) for t in (i0, i1, l0, l1))  # type: ignore[return-value]


# pixels evaluated at once by the sparse (pixel, query) path: bounds its (M, K) temporaries
_PIXEL_CHUNK = 1 << 16


def _bilinear_at(sample, taps, y: Tensor, x: Tensor, weight_view=lambda t: t) -> Tensor:
    """Bilinear up-sampled values at output rows ``y`` and columns ``x`` (same length).

    ``sample(rows, cols)`` returns the low-res values at those source positions (float32);
    ``weight_view`` shapes the per-pixel weights to broadcast against them. The sum is ordered as
    in torch's CPU kernel, ``(a*lx0 + b*lx1)*ly0 + (c*lx0 + d*lx1)*ly1``.
    """
    (i0y, i1y, l0y, l1y), (i0x, i1x, l0x, l1x) = taps
    r0, r1, c0, c1 = i0y[y], i1y[y], i0x[x], i1x[x]
    wx0, wx1 = weight_view(l0x[x]), weight_view(l1x[x])
    top = sample(r0, c0) * wx0 + sample(r0, c1) * wx1
    bottom = sample(r1, c0) * wx0 + sample(r1, c1) * wx1
    return top * weight_view(l0y[y]) + bottom * weight_view(l1y[y])


def _pixel_argmax(sim_low: Tensor, taps, idx: tuple[Tensor, Tensor, Tensor], s_num: int, in_y: Tensor, in_x: Tensor,
                  instance_ok: Tensor, outside_box_value: float) -> tuple[Tensor, Tensor]:
    """Eq. 16 at a sparse set of output pixels: all K up-sampled similarities, box filtering,
    first argmax. idx: ``(n, y, x)`` index tensors of M pixels → values ``(M,)``, slots ``(M,)``."""
    n, k, h, w = sim_low.shape
    pixels_major = sim_low.permute(0, 2, 3, 1).reshape(n * h * w, k)
    n_idx, y, x = idx
    values, slots = [], []
    for start in range(0, n_idx.numel(), _PIXEL_CHUNK):
        nc, yc, xc = (t[start:start + _PIXEL_CHUNK] for t in idx)
        base = nc * (h * w)
        v = _bilinear_at(lambda r, c: pixels_major[base + r * w + c].float(), taps, yc, xc,
                         lambda t: t[:, None])  # (m, K)
        if k > s_num:
            in_box = in_y[nc, :, yc] & in_x[nc, :, xc]  # (m, Q)
            inst = torch.where(in_box, v[:, s_num:], torch.full((), outside_box_value, dtype=v.dtype, device=v.device))
            inst = inst.masked_fill(~instance_ok[nc], MASKED_SIMILARITY)
            v = torch.cat([v[:, :s_num], inst], dim=1)
        t1, a1 = v.max(dim=1)  # first index of the maximum
        values.append(t1)
        slots.append(a1)
    if not values:
        return sim_low.new_zeros(0), torch.zeros(0, dtype=torch.long, device=sim_low.device)
    return torch.cat(values).to(sim_low.dtype), torch.cat(slots)


def coarse_to_fine_assignment(sim_low: Tensor, taps, s_num: int, in_y: Tensor, in_x: Tensor, instance_ok: Tensor,
                              sizes: Tensor, outside_box_value: float,
                              value_low: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Steps 2–3 of :func:`~ciae_core.fusion.fuse_panoptic` for up-sampled similarities, without the full tensor.

    sim_low ``(N, K, h, w)`` similarities at the embedding resolution (K = S stuff + Q instance
    queries), taps: :func:`bilinear_taps` for rows and columns of the ``(H, W)`` output,
    in_y ``(N, Q, H)`` / in_x ``(N, Q, W)`` box rows/columns, instance_ok ``(N, Q)``,
    sizes ``(N, 2)`` valid (h, w) of each output image (top-left) → slot per output pixel
    ``(N, H, W)`` long (pixels outside the valid region: any) and ``(N, K)`` sums of each slot's
    up-sampled similarity over its valid pixels (exact for stuff slots, which the stuff scores
    use; of ``value_low``, same shape as sim_low, when given: the argmax runs on sim_low and the
    sums on value_low).

    Why it is exact: every output pixel whose row taps are (r, r') and column taps (c, c') — a
    "cell" of about stride x stride pixels — gets a convex combination of the four corner values
    (r|r', c|c'), so each slot's value inside the cell lies between its smallest and largest
    corner value (floating-point rounding is monotone). An instance's box filter is, inside a
    cell, everywhere on, everywhere off (the constant ``outside_box_value``) or mixed (either
    value), which widens its bounds accordingly. A slot whose lower bound exceeds every other
    slot's upper bound wins every pixel of the cell; so does a slot that is the first maximum at
    all four corners (a convex combination keeps it on top), checked on the remaining cells with
    box edges at their upper value and the winner's own box not crossing the cell. Only the other cells — segment boundaries,
    box edges, exact ties — are evaluated per pixel (:func:`_candidate_argmax`), over the slots
    whose upper bound reaches the best lower bound. Same assignment as the dense path except
    where two up-sampled similarities tie to the last bit. The similarity sums of a decided
    cell are formed at low resolution from its corner values and the summed interpolation
    weights of its valid rows and columns (bilinear weights are separable).
    """
    n, k, h, w = sim_low.shape
    q = k - s_num
    dev = sim_low.device
    (i0y, _, _, _), (i0x, _, _, _) = taps
    next_row = torch.arange(1, h + 1, device=dev).clamp_max(h - 1)
    next_col = torch.arange(1, w + 1, device=dev).clamp_max(w - 1)
    rows_per = torch.bincount(i0y, minlength=h)  # output rows / columns per cell row / column
    cols_per = torch.bincount(i0x, minlength=w)

    def corners_of(t: Tensor) -> list[Tensor]:  # values at (r, c), (r, c'), (r', c), (r', c') per cell
        c = [t, t.index_select(3, next_col)]
        return c + [x.index_select(2, next_row) for x in c]

    corners = corners_of(sim_low)
    upper = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))
    lower = torch.minimum(torch.minimum(corners[0], corners[1]), torch.minimum(corners[2], corners[3]))
    if q:
        # per cell and instance: how many of the cell's output rows / columns are inside the box
        rows_in = torch.zeros(n, q, h, device=dev).index_add_(2, i0y, in_y.float())
        cols_in = torch.zeros(n, q, w, device=dev).index_add_(2, i0x, in_x.float())
        inside = (rows_in == rows_per)[..., :, None] & (cols_in == cols_per)[..., None, :]  # (N, Q, h, w)
        outside = (rows_in == 0)[..., :, None] | (cols_in == 0)[..., None, :]
        ov = torch.full((), outside_box_value, dtype=sim_low.dtype, device=dev)
        off = ~instance_ok[..., None, None]
        iu, il = upper[:, s_num:], lower[:, s_num:]
        iu.copy_(torch.where(outside, ov, torch.where(inside, iu, iu.clamp_min(ov)))).masked_fill_(off, MASKED_SIMILARITY)
        il.copy_(torch.where(outside, ov, torch.where(inside, il, il.clamp_max(ov)))).masked_fill_(off, MASKED_SIMILARITY)
    best_lo, label = first_argmax(lower, 1)
    others = upper.scatter(1, label[:, None], MASKED_SIMILARITY).amax(1)
    sure = others < best_lo  # ties stay undecided (the first index rule is applied per pixel)
    # second test, on the undecided cells only: one slot is the first maximum at all four corners
    # (box edges at their upper value, the winner's own box not crossing the cell)
    cn, cr, cc = (~sure).nonzero(as_tuple=True)
    if cn.numel():
        corner_labels = []
        for c in corners:
            v = c[cn, :, cr, cc]  # (cells, K)
            if q:
                iv = v[:, s_num:]
                iv = torch.where(outside[cn, :, cr, cc], ov, torch.where(inside[cn, :, cr, cc], iv, iv.clamp_min(ov)))
                v = torch.cat([v[:, :s_num], iv.masked_fill(~instance_ok[cn], MASKED_SIMILARITY)], dim=1)
            corner_labels.append(first_argmax(v, 1)[1])
        win = corner_labels[0]
        agree = (win == corner_labels[1]) & (win == corner_labels[2]) & (win == corner_labels[3])
        if q:
            j = (win - s_num).clamp_min(0)
            crossing = ~(inside[cn, j, cr, cc] | outside[cn, j, cr, cc]) & (win >= s_num)
            agree &= ~crossing
        label[cn[agree], cr[agree], cc[agree]] = win[agree]
        sure[cn[agree], cr[agree], cc[agree]] = True
    assign = label.index_select(1, i0y).index_select(2, i0x)  # (N, H, W)
    values = [c.gather(1, label[:, None]).squeeze(1).float() for c in corners_of(value_low if value_low is not None
                                                                                   else sim_low)]
    sums = cell_similarity_sums(values, taps, sizes, (h, w)) * sure  # (N, h, w)
    image_index = torch.arange(n, device=dev)[:, None, None].expand_as(label)
    slot_sums = _sum_by_slot(image_index, label, sums, n, k)
    cells = (~sure).nonzero(as_tuple=True)
    if cells[0].numel():
        # candidates of an undecided cell: a slot whose upper bound over the cell reaches the best
        # lower bound (no slot can fall below its lower bound inside the cell, nor exceed its upper;
        # a slot reaching it only with equality can win only a tie, i.e. if it comes first)
        cn, cr, cc = cells
        up, lo = upper[cn, :, cr, cc], lower[cn, :, cr, cc]  # (cells, K)
        best_lo, best_slot = first_argmax(lo, 1)
        slot_range = torch.arange(k, device=dev)
        cand = (up > best_lo[:, None]) | ((up == best_lo[:, None]) & (slot_range <= best_slot[:, None]))
        count = cand.sum(1)
        # cells of one block shape (interior cells are stride x stride, border cells differ) and few
        # candidates together: a chunk is padded only to its own largest shape and count
        shape_key = rows_per[cells[1]] * (int(cols_per.max()) + 1) + cols_per[cells[2]]
        order = (shape_key * (k + 1) + count).argsort()
        cells = tuple(t[order] for t in cells)
        cand, count = cand[order], count[order]
        slots = torch.where(cand, slot_range, slot_range + k).sort(1).values[:, : int(count.max())]
        (n_idx, y, x), t1, won = _candidate_argmax(sim_low, taps, cells, slots % k, slots < k, count, sizes, s_num,
                                                   in_y, in_x, instance_ok, outside_box_value)
        assign[n_idx, y, x] = won
        if value_low is not None:
            t1 = _values_at(value_low, taps, (n_idx, y, x), won, s_num, in_y, in_x, outside_box_value)
        slot_sums += _sum_by_slot(n_idx, won, t1, n, k)
    return assign, slot_sums


# undecided cells evaluated at once: bounds the (cells, C, rows, columns) temporaries
_CELL_CHUNK = 4096


def _candidate_argmax(sim_low: Tensor, taps, cells: tuple[Tensor, Tensor, Tensor], cell_slots: Tensor,
                      cell_ok: Tensor, cell_count: Tensor, sizes: Tensor, s_num: int, in_y: Tensor, in_x: Tensor,
                      instance_ok: Tensor, outside_box_value: float) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor,
                                                                              Tensor]:
    """Eq. 16 on every valid output pixel of the given cells, over each cell's candidate slots.

    cells ``(n, r, c)`` index tensors; cell_slots ``(cells, C)`` ascending, padding flagged by
    cell_ok False; cell_count ``(cells,)`` (cells sorted by it, so a chunk is padded to its own
    largest count). A cell's pixels share its four corner samples: they are gathered once per
    (cell, candidate) and combined with each row's and column's weights by broadcasting, in
    torch's order ``(a*lx0 + b*lx1)*ly0 + (c*lx0 + d*lx1)*ly1``; then the box filter and the first
    maximum. Returns the pixels ``(n, y, x)``, their values ``(M,)`` float32 and slots ``(M,)``.
    """
    n, k, h, w = sim_low.shape
    dev = sim_low.device
    flat = sim_low.permute(0, 2, 3, 1).reshape(-1)  # (N*h*w*K,) queries innermost
    (i0y, i1y, l0y, l1y), (i0x, i1x, l0x, l1x) = taps
    hh, ww = i0y.numel(), i0x.numel()
    rows_per = torch.bincount(i0y, minlength=h)
    cols_per = torch.bincount(i0x, minlength=w)
    row_start = torch.cumsum(rows_per, 0) - rows_per
    col_start = torch.cumsum(cols_per, 0) - cols_per
    out_n, out_y, out_x, out_v, out_s = [], [], [], [], []
    for start in range(0, cells[0].numel(), _CELL_CHUNK):
        cn, cr, cc = (t[start:start + _CELL_CHUNK] for t in cells)
        width = int(cell_count[start:start + _CELL_CHUNK].max())
        oy = torch.arange(int(rows_per[cr].max()), device=dev)
        ox = torch.arange(int(cols_per[cc].max()), device=dev)
        sc = cell_slots[start:start + _CELL_CHUNK, :width]
        okc = cell_ok[start:start + _CELL_CHUNK, :width]
        y = row_start[cr, None] + oy  # (m, by)
        x = col_start[cc, None] + ox  # (m, bx)
        y_ok = (oy < rows_per[cr, None]) & (y < sizes[cn, 0, None])
        x_ok = (ox < cols_per[cc, None]) & (x < sizes[cn, 1, None])
        y, x = y.clamp_max(hh - 1), x.clamp_max(ww - 1)
        r1, c1 = i1y[y[:, 0]], i1x[x[:, 0]]  # the cell's second row / column sample

        def at(r: Tensor, c: Tensor) -> Tensor:  # (m, C, 1, 1) corner values of the candidates
            return flat[(((cn * h + r) * w + c) * k)[:, None] + sc].float()[:, :, None, None]

        wy0, wy1 = l0y[y][:, None, :, None], l1y[y][:, None, :, None]
        wx0, wx1 = l0x[x][:, None, None, :], l1x[x][:, None, None, :]
        v = (at(cr, cc) * wx0 + at(cr, c1) * wx1) * wy0 + (at(r1, cc) * wx0 + at(r1, c1) * wx1) * wy1  # (m, C, by, bx)
        if k > s_num:
            inst = sc >= s_num
            j = (sc - s_num).clamp_min(0)
            in_box = in_y[cn[:, None, None], j[:, :, None], y[:, None, :]][..., None] & \
                in_x[cn[:, None, None], j[:, :, None], x[:, None, :]][..., None, :]
            v = torch.where(inst[..., None, None] & ~in_box, torch.full_like(v, outside_box_value), v)
            okc = okc & (~inst | instance_ok[cn[:, None], j])
        v = v.masked_fill_(~okc[..., None, None], MASKED_SIMILARITY)
        t1, a1 = v.max(dim=1)  # (m, by, bx); first maximum = lowest slot (candidates ascend)
        won = sc.gather(1, a1.flatten(1)).view_as(a1)
        m, iy, ix = (y_ok[:, :, None] & x_ok[:, None, :]).nonzero(as_tuple=True)
        out_n.append(cn[m])
        out_y.append(y[m, iy])
        out_x.append(x[m, ix])
        out_v.append(t1[m, iy, ix])
        out_s.append(won[m, iy, ix])
    return (torch.cat(out_n), torch.cat(out_y), torch.cat(out_x)), torch.cat(out_v), torch.cat(out_s)


def _values_at(value_low: Tensor, taps, idx: tuple[Tensor, Tensor, Tensor], slots: Tensor, s_num: int, in_y: Tensor,
               in_x: Tensor, outside_box_value: float) -> Tensor:
    """Up-sampled, box-filtered value of each given pixel's own slot → ``(M,)`` float32."""
    n, k, h, w = value_low.shape
    n_idx, y, x = idx
    flat = value_low.reshape(-1)
    plane = (n_idx * k + slots) * (h * w)
    v = _bilinear_at(lambda r, c: flat[plane + r * w + c].float(), taps, y, x)
    inst = (slots >= s_num).nonzero(as_tuple=True)[0]
    if inst.numel():
        j = slots[inst] - s_num
        inside = in_y[n_idx[inst], j, y[inst]] & in_x[n_idx[inst], j, x[inst]]
        v[inst] = torch.where(inside, v[inst], torch.full_like(v[inst], outside_box_value))
    return v


def cell_similarity_sums(corner_values: list[Tensor], taps, sizes: Tensor, low_size: tuple[int, int]) -> Tensor:
    """Sum over each cell's valid output pixels of the bilinear combination of its corner values.

    corner_values: four ``(N, h, w)`` maps (corners (r, c), (r, c'), (r', c), (r', c') of the cell
    at (r, c), as in :func:`coarse_to_fine_assignment`); sizes ``(N, 2)`` valid (h, w) of each
    output image. Since the weight of a pixel is ``wy * wx``, the cell sum is
    ``Wy0 (Wx0 v00 + Wx1 v01) + Wy1 (Wx0 v10 + Wx1 v11)`` with W the summed row/column weights.
    """
    h, w = low_size
    (i0y, _, l0y, l1y), (i0x, _, l0x, l1x) = taps
    dev = i0y.device

    def summed(i0, l0, l1, cells, limit):
        ok = (torch.arange(i0.numel(), device=dev)[None, :] < limit[:, None]).float()  # (N, out)
        w0 = torch.zeros(limit.numel(), cells, device=dev).index_add_(1, i0, ok * l0[None])
        w1 = torch.zeros(limit.numel(), cells, device=dev).index_add_(1, i0, ok * l1[None])
        return w0, w1

    wy0, wy1 = summed(i0y, l0y, l1y, h, sizes[:, 0])
    wx0, wx1 = summed(i0x, l0x, l1x, w, sizes[:, 1])
    v00, v01, v10, v11 = corner_values
    wx0, wx1 = wx0[:, None, :], wx1[:, None, :]
    return wy0[:, :, None] * (wx0 * v00 + wx1 * v01) + wy1[:, :, None] * (wx0 * v10 + wx1 * v11)


def _unit_similarities(embedding: Tensor, queries: Tensor, sim: Tensor | None = None) -> Tensor:
    """Cosine similarities ``(N, K, h, w)`` of the stride-s map ``embedding`` (un-normalised) with
    unit ``queries``: ``E V^T / |E|``, from ``sim = E V^T`` when it is already at hand."""
    if sim is None:
        sim = torch.einsum("ndhw,nkd->nkhw", embedding, queries)
    return sim / embedding.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12)


def _sum_by_slot(image_index: Tensor, slots: Tensor, weights: Tensor, n: int, k: int) -> Tensor:
    """``(N, K)`` float sums of ``weights`` by (image, slot); the three tensors have one shape."""
    keys = (image_index * k + slots).flatten()
    return torch.bincount(keys, weights=weights.flatten().double(), minlength=n * k).view(n, k).float()


def _compiled_assignment(sim_low: Tensor, norms: Tensor, taps, s_num: int, in_y: Tensor, in_x: Tensor,
                         valid: Tensor, sizes: Tensor, outside_box_value: float, hidden):
    """Steps 3–4 of :func:`~ciae_core.fusion.fuse_panoptic` and the segment extents with :mod:`ciae_core.fusion_kernels`
    (CPU). sim_low ``(N, h, w, K)`` (queries innermost), norms ``(N, h, w)``: the stuff scores sum
    ``sim_low / norms``; ``hidden(counts)`` is the step-4 rule. Returns the slot per output pixel
    ``(N, H, W)`` int32 (void = K outside each valid region), stuff similarity sums ``(N, K)``, the
    instances kept ``(N, Q)`` and ``(area (N, K), boxes (N, K, 4))`` of the final assignment."""
    n, _, _, k = sim_low.shape
    hh, ww = taps[0][0].numel(), taps[1][0].numel()
    sim = sim_low.float().contiguous().numpy()
    val = norms.float().contiguous().numpy()
    tap_arrays = [t.numpy() for axis in taps for t in axis]
    in_y_np, in_x_np = in_y.contiguous().numpy(), in_x.contiguous().numpy()
    sizes_np = np.minimum(sizes.numpy(), np.array([hh, ww]))  # the kernels do not check bounds
    assign = np.full((n, hh, ww), k, dtype=np.int32)
    counts = np.zeros((n, k), dtype=np.int64)
    sums = np.zeros((n, k), dtype=np.float64)
    s_num, outside_box_value = int(s_num), float(outside_box_value)  # one compiled signature
    fusion_kernels.assign_cells(sim, val, *tap_arrays, in_y_np, in_x_np, valid.contiguous().numpy(), sizes_np, s_num,
                                outside_box_value, assign, counts, sums)
    drop = hidden(torch.from_numpy(counts))
    keep_inst = valid & ~drop
    if bool(drop.any()):
        dropped_slot = np.concatenate([np.zeros((n, s_num), dtype=bool), drop.numpy(), np.zeros((n, 1), dtype=bool)], 1)
        fusion_kernels.reassign_dropped(sim, val, *tap_arrays, in_y_np, in_x_np, keep_inst.numpy(), dropped_slot,
                                        sizes_np, s_num, outside_box_value, assign, sums)
    area, boxes = fusion_kernels.segment_extents(assign, sizes_np, k + 1)
    return (torch.from_numpy(assign), torch.from_numpy(sums).float(), keep_inst,
            (torch.from_numpy(area[:, :k]), torch.from_numpy(boxes[:, :k])))
