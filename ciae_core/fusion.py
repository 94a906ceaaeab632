"""Inference of CIAE (paper §IV-C, Eq. 16): proposal selection and panoptic fusion.

Pure functions on tensors (no model; numpy only at the boundary to the optional compiled CPU
kernels), batched over images, device-agnostic:

* :func:`select_proposals` — FCOS post-processing: score threshold, top-k before NMS, class-wise
  NMS, top-N after.
* :func:`fuse_panoptic` — Eq. 16: ``S = P V^T`` between the pixel embeddings P and the query
  embeddings V (stuff memory embeddings + one query per instance proposal), remote-instance
  filtering with the predicted boxes, per-pixel argmax, removal of small stuff regions and of
  mostly hidden instances; returns an id map and a per-segment table. With a stride-4 embedding
  it works coarse-to-fine (:func:`coarse_to_fine_assignment`): whole cells are decided from
  bounds at the embedding resolution and only boundary cells are evaluated per pixel; on a CPU
  the same algorithm runs as compiled loops (:mod:`ciae_core.fusion_kernels`, numba, optional).
* :func:`panoptic_from_raw` — glue used by ``CIAE.postprocess``: raw network outputs → per-image
  results at the network input resolution.

Decision (precision): the public entry points :func:`fuse_panoptic` and :func:`panoptic_from_raw`
promote half-precision (float16/bfloat16) floating inputs to float32 before anything else, so
the fusion always runs in float32 (float64 inputs are left as they are). Half inputs arrive when
``CIAE.inference`` runs under a user's autocast, and the fusion does pixel geometry in the
input dtype: float16 overflows past 65504 (an image area of 256x256 px already is ``inf``,
which turned every stuff region void) and neither type represents pixel centres ``x + 0.5``
exactly from 1024 (float16) or 128 (bfloat16) px on, which moved box edges. The id maps of
half inputs are therefore those of the same values in float32. :func:`select_proposals` already
computes in float32.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from ciae_core import fusion_kernels

# fuse_panoptic's implementations of the same rules ("auto": numba on CPU, else coarse_to_fine, for
# embedding_stride > 1 without a confidence map; dense otherwise)
FUSION_METHODS = ("auto", "dense", "coarse_to_fine", "numba")

# similarity given to queries that must not win a pixel (with normalize_after_upsampling the
# compared values are un-normalised dot products, so no finite floor is safe)
MASKED_SIMILARITY = float("-inf")


def select_proposals(cls_logits: Tensor, box_regression: Tensor, centerness: Tensor, points: Tensor,
                     image_sizes, *, score_threshold: float = 0.05, pre_nms_topk: int = 1000,
                     nms_threshold: float = 0.6, detections_per_img: int = 100) -> list[dict[str, Tensor]]:
    """FCOS proposals per image.

    cls_logits ``(N, A, T)``, box_regression ``(N, A, 4)`` ltrb input pixels, centerness ``(N, A)``
    logits, points ``(A, 2)``, image_sizes: N ``(h, w)``.
    Score = ``sqrt(sigmoid(cls) * sigmoid(centerness))`` (FCOS: centerness down-weights off-centre
    boxes); candidates (location, class) with score > ``score_threshold`` (threshold on the final
    score, as torchvision's FCOS), the ``pre_nms_topk`` best over all levels, boxes clipped to the
    image, class-wise NMS at IoU ``nms_threshold``, then the ``detections_per_img`` best.
    Returns per image ``boxes (n, 4)`` xyxy, ``scores (n,)``, ``labels (n,)`` thing training ids,
    ``locations (n,)`` index into A (where the proposal was generated), sorted by score.
    """
    n_img, a, t = cls_logits.shape
    out = []
    for n in range(n_img):
        h, w = (float(v) for v in image_sizes[n])
        scores = torch.sqrt(torch.sigmoid(cls_logits[n].float()) * torch.sigmoid(centerness[n].float())[:, None])
        flat = scores.flatten()
        cand = (flat > score_threshold).nonzero(as_tuple=True)[0]
        if cand.numel() > pre_nms_topk:
            cand = cand[flat[cand].topk(pre_nms_topk).indices]
        s = flat[cand]
        loc = torch.div(cand, t, rounding_mode="floor")
        lab = cand % t
        ltrb = box_regression[n, loc].float()
        p = points[loc].float()
        boxes = torch.cat([p - ltrb[:, :2], p + ltrb[:, 2:]], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = batched_nms(boxes, s, lab, nms_threshold)[:detections_per_img]
        out.append({"boxes": boxes[keep], "scores": s[keep], "labels": lab[keep], "locations": loc[keep]})
    return out


def _promote_half(t: Tensor) -> Tensor:
    """float16/bfloat16 → float32; any other tensor unchanged (module docstring, precision)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _image_size_tensor(image_sizes, n: int, device) -> Tensor:
    t = torch.as_tensor([[int(h), int(w)] for h, w in image_sizes], dtype=torch.long, device=device)
    if t.shape != (n, 2):
        raise ValueError(f"need {n} image sizes (h, w), got {len(image_sizes)}")
    return t


def panoptic_similarity(embedding: Tensor, queries: Tensor, embedding_stride: int = 1,
                        output_size: tuple[int, int] | None = None) -> Tensor:
    """Eq. 16: ``S = P x V^T`` — cosine similarity of every pixel with every query.

    embedding ``(N, D, h, w)`` unit pixel embeddings P, queries ``(N, K, D)`` unit → ``(N, K, H, W)``.
    With ``embedding_stride > 1`` the similarities are bilinearly up-sampled to
    ``(h*stride, w*stride)`` (or ``output_size``); since up-sampling is linear this equals
    ``up(P) V^T`` up to the order of normalisation.
    """
    sim = torch.einsum("ndhw,nkd->nkhw", embedding, queries.to(embedding.dtype))
    if embedding_stride > 1 or output_size is not None:
        size = output_size or (embedding.shape[-2] * embedding_stride, embedding.shape[-1] * embedding_stride)
        if tuple(sim.shape[-2:]) != tuple(size):
            sim = F.interpolate(sim, size=size, mode="bilinear", align_corners=False)
    return sim


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
    """Steps 2–3 of :func:`fuse_panoptic` for up-sampled similarities, without the full tensor.

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
    """Steps 3–4 of :func:`fuse_panoptic` and the segment extents with :mod:`ciae_core.fusion_kernels`
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


def compile_fusion_kernels() -> bool:
    """Compile (or load from numba's disk cache) the CPU fusion kernels now, on a tiny problem,
    so that the first real frame does not wait for it (a few seconds cold, ~0.1 s cached).
    Returns whether :func:`fuse_panoptic` will use them on CPU (numba installed)."""
    if not fusion_kernels.available():
        return False
    emb = F.normalize(torch.ones(1, 2, 2, 2), dim=1)
    fuse_panoptic(emb, emb[0, :, 0, :1].t(), emb[:, :, 0, :1].transpose(1, 2), torch.tensor([[[0.0, 0.0, 4.0, 4.0]]]),
                  torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool),
                  num_things=1, embedding_stride=4, min_instance_area=64, method="numba")
    return True


def fuse_panoptic(embedding: Tensor, stuff_queries: Tensor, instance_queries: Tensor, instance_boxes: Tensor,
                  instance_labels: Tensor, instance_scores: Tensor, instance_valid: Tensor, *, num_things: int,
                  image_sizes=None, embedding_stride: int = 1, min_stuff_area: float = 4096,
                  stuff_area_reference: float = 640 * 480, min_visible_fraction: float = 0.2,
                  min_instance_area: float = 16, outside_box_value: float = 0.0,
                  return_confidence: bool = False, method: str = "auto",
                  normalize_after_upsampling: bool = False) -> dict[str, Tensor]:
    """Panoptic fusion (§IV-C): assign every pixel to the most similar query (Eq. 16).

    Inputs (N images, D dims, S stuff classes, Q instance slots, padded with ``instance_valid``):
      embedding ``(N, D, h, w)`` unit pixel embeddings; stuff_queries ``(S, D)`` memory embeddings of
      the stuff classes (training ids T..T+S-1); instance_queries ``(N, Q, D)`` unit (P at the
      proposal's location); instance_boxes ``(N, Q, 4)`` xyxy in output pixels; instance_labels
      ``(N, Q)`` thing training ids; instance_scores ``(N, Q)``; instance_valid ``(N, Q)`` bool;
      image_sizes: N ``(h, w)`` valid region (top-left) of each image; outside it is void.
      ``normalize_after_upsampling=True`` (with ``embedding_stride > 1``): ``embedding`` is the
      un-normalised stride-s map ``P' + P''`` and the pixel embeddings are the paper's
      ``P = L2norm(up(P' + P''))`` (Eq. 1). The argmax needs no normalisation: ``up`` is linear and
      the norm is a positive per-pixel factor, so ``argmax_k <P(x), V_k> = argmax_k up(E V_k^T)(x)``
      (and the sign against ``outside_box_value = 0`` is kept). Without it the stride-s map is
      unit-normalised before up-sampling (cheaper values, a different embedding near edges).

    Steps (all batched tensor ops):
      1. S = P V^T (:func:`panoptic_similarity`), V = [stuff queries, instance queries].
      2. Remote-instance filtering (§IV-B): an instance's similarity outside its predicted box is
         set to ``outside_box_value`` (0 in the paper). A pixel's centre must be in the box.
      3. argmax over queries (ties go to the lower index: stuff first, then instances in the
         given order — pass instances sorted by score).
      4. Instances with little visible area are dropped and the argmax is redone without them
         (their pixels go to the next best query): visible area < ``min_instance_area`` px or
         < ``min_visible_fraction`` of the box's area inside the image. (Our rule: a proposal
         whose pixels are mostly taken by others is a duplicate or an occluded false positive.)
      5. Stuff regions smaller than ``min_stuff_area * (h*w) / stuff_area_reference`` px become
         void (paper: 4096 px; we read that at COCO's evaluated resolution ~640x480 and scale it
         with the image area; ``stuff_area_reference <= 0`` uses ``min_stuff_area`` as is).
      6. Segment ids 1..n in query order (stuff classes first, then instances).

    Cost (this function was up to half of the end-to-end time): the ``(N, K, H, W)`` similarity
    tensor is the only full-size float tensor and is masked in place (invalid/dropped instances by
    plane, boxes by one broadcast mask); the argmax is :func:`first_argmax` (amax + equality
    pass); box areas are row count x column count; the step-4 argmax is redone only for the
    pixels a dropped instance had won (removing a query changes no other pixel's maximum);
    segment areas and boxes come from one (slot, row) and one (slot, column) histogram instead of
    scatter-min/max over all pixels. Same results as the straightforward version.

    Stuff scores with ``normalize_after_upsampling`` (both methods) are the mean over the segment
    of the up-sampled stride-s cosine similarity to the class query (a smooth stand-in for the
    per-pixel cosine, which would need every pixel's norm; they differ by up to ~0.05 near edges).

    ``method``: ``"dense"`` builds the full ``(N, K, H, W)`` similarity tensor as above;
    ``"coarse_to_fine"`` (``embedding_stride > 1`` only) finds the same argmax without it, see
    :func:`coarse_to_fine_assignment` (cost ~ K x low-res cells + H x W + K x boundary pixels
    instead of K x H x W); ``"auto"`` picks coarse-to-fine when ``embedding_stride > 1`` and no
    confidence map is asked for (the top-1 minus top-2 margin needs every plane at every pixel);
    ``"numba"`` (CPU tensors, numba installed) runs the coarse-to-fine algorithm as compiled loops
    (:mod:`ciae_core.fusion_kernels`: each corner value read once, no ``(N, K, h, w)``
    temporaries, areas and boxes in the same pass; about 4x faster than ``"coarse_to_fine"`` on
    a small model's 512 px frame), and ``"auto"`` prefers it on CPU. All methods give the same
    id map and table (tests compare them).

    float16/bfloat16 inputs are computed in float32 (module docstring); the float outputs are then
    float32.

    Returns tensors (K = S + Q segment slots):
      ``id_map (N, H, W)`` int32 (0 = void; H, W = h*stride, w*stride), ``segment_ids (N, K)``
      int32 (0 = slot unused), ``labels (N, K)`` int64 training ids, ``isthing (N, K)`` bool,
      ``scores (N, K)`` (instances: detection score; stuff: mean similarity of its pixels),
      ``areas (N, K)`` int64, ``boxes (N, K, 4)`` tight xyxy of the segment's pixels (max edge
      exclusive: ``x_max + 1``), optional ``confidence (N, H, W)``: top-1 minus top-2 similarity.
    """
    # half-precision inputs run in float32 (module docstring: area and pixel-centre arithmetic)
    embedding, stuff_queries, instance_queries, instance_boxes, instance_scores = (
        _promote_half(t) for t in (embedding, stuff_queries, instance_queries, instance_boxes, instance_scores))
    n, d, he, we = embedding.shape
    dev = embedding.device
    s_num = stuff_queries.shape[0]
    q_num = instance_queries.shape[1]
    k_num = s_num + q_num
    if k_num == 0:
        raise ValueError("fuse_panoptic needs at least one query (stuff class or instance)")
    if method not in FUSION_METHODS:
        raise ValueError(f"fuse_panoptic: unknown method {method!r} ({', '.join(FUSION_METHODS)})")
    if method in ("coarse_to_fine", "numba") and (embedding_stride <= 1 or return_confidence):
        raise ValueError(f"fuse_panoptic: {method} needs embedding_stride > 1 and return_confidence=False")
    if method == "numba" and (dev.type != "cpu" or not fusion_kernels.available()):
        raise ValueError("fuse_panoptic: method 'numba' runs on CPU tensors and needs the numba package "
                         "(pip install numba); use 'auto'")
    if normalize_after_upsampling and embedding_stride <= 1:
        raise ValueError("fuse_panoptic: normalize_after_upsampling needs embedding_stride > 1")
    coarse = method in ("coarse_to_fine", "numba") or (method == "auto" and embedding_stride > 1
                                                       and not return_confidence)
    compiled = method == "numba" or (method == "auto" and coarse and dev.type == "cpu"
                                     and fusion_kernels.available())
    queries = torch.cat([stuff_queries[None].expand(n, -1, -1).to(embedding.dtype),
                         instance_queries.to(embedding.dtype)], dim=1)
    value_low = None
    if compiled:  # the kernels read a cell's K values contiguously: (N, h, w, K); cosines = sim / norm
        sim_low = torch.einsum("ndhw,nkd->nhwk", embedding.float(), queries.float()).contiguous()
        norms = embedding.float().pow(2).sum(1).sqrt().clamp_min(1e-12) if normalize_after_upsampling else \
            torch.ones(n, he, we)
    if coarse and not compiled:
        sim_low = torch.einsum("ndhw,nkd->nkhw", embedding, queries).contiguous()
        if normalize_after_upsampling:  # argmax on E V^T; values (stuff scores) from the unit low-res map
            value_low = _unit_similarities(embedding, queries, sim_low)
    if coarse:
        hh, ww = he * embedding_stride, we * embedding_stride
        dtype = embedding.dtype
    else:
        if normalize_after_upsampling:  # the paper's P at full resolution
            size = (he * embedding_stride, we * embedding_stride)
            low = embedding
            embedding = F.normalize(F.interpolate(embedding, size=size, mode="bilinear", align_corners=False), dim=1)
            sim = panoptic_similarity(embedding, queries).contiguous()
        else:
            sim = panoptic_similarity(embedding, queries, embedding_stride).contiguous()
        _, _, hh, ww = sim.shape
        dtype = sim.dtype
    sizes = _image_size_tensor(image_sizes, n, dev) if image_sizes is not None else \
        torch.tensor([[hh, ww]] * n, dtype=torch.long, device=dev)
    ys = torch.arange(hh, device=dev)
    xs = torch.arange(ww, device=dev)
    row_valid = ys[None, :] < sizes[:, 0, None]  # (N, H)
    col_valid = xs[None, :] < sizes[:, 1, None]  # (N, W)
    pixel_valid = None if compiled else row_valid[:, :, None] & col_valid[:, None, :]
    all_valid = bool((sizes[:, 0] >= hh).all()) and bool((sizes[:, 1] >= ww).all())
    # 2. remote-instance filtering with the predicted boxes (a pixel's centre must be in the box)
    boxes = instance_boxes.to(dtype)
    cx = xs.to(dtype) + 0.5
    cy = ys.to(dtype) + 0.5
    in_x = (cx[None, None, :] >= boxes[..., 0:1]) & (cx[None, None, :] <= boxes[..., 2:3])  # (N, Q, W)
    in_y = (cy[None, None, :] >= boxes[..., 1:2]) & (cy[None, None, :] <= boxes[..., 3:4])  # (N, Q, H)
    valid = instance_valid.bool()
    void = k_num  # extra slot index for void pixels
    void_fill = torch.full((), void, dtype=torch.long, device=dev)
    slot_offset = torch.arange(n, device=dev)[:, None] * (k_num + 1)

    def counts(assign: Tensor) -> Tensor:
        a = (assign if all_valid else torch.where(pixel_valid, assign, void_fill)).flatten(1) + slot_offset
        return torch.bincount(a.flatten(), minlength=n * (k_num + 1)).view(n, k_num + 1)[:, :k_num]

    box_area = (in_y & row_valid[:, None]).sum(-1) * (in_x & col_valid[:, None]).sum(-1)  # (N, Q) in-image box px

    def hidden(area1: Tensor) -> Tensor:
        inst_area = area1[:, s_num:]
        return valid & ((inst_area < min_instance_area) | (inst_area.to(dtype) < min_visible_fraction * box_area))

    extents = None
    if compiled:
        # 3.–4. as below, as compiled loops; also the areas and boxes of steps 5–6
        taps = (bilinear_taps(hh, he, dev), bilinear_taps(ww, we, dev))
        assign, slot_sums, keep_inst, extents = _compiled_assignment(sim_low, norms, taps, s_num, in_y, in_x,
                                                                     valid, sizes, outside_box_value, hidden)
    elif coarse:
        # 3. first assignment, 4. drop mostly hidden instances and re-assign the pixels they had won
        taps = (bilinear_taps(hh, he, dev), bilinear_taps(ww, we, dev))
        # slot_sums: similarity sums of every slot that is never dropped (stuff slots included)
        assign, slot_sums = coarse_to_fine_assignment(sim_low, taps, s_num, in_y, in_x, valid, sizes,
                                                      outside_box_value, value_low)
        drop = hidden(counts(assign))
        keep_inst = valid & ~drop
        if q_num and bool(drop.any()):
            dropped_slot = torch.cat([torch.zeros(n, s_num, dtype=torch.bool, device=dev), drop], dim=1)
            lost = dropped_slot.gather(1, assign.flatten(1)).view(n, hh, ww) & pixel_valid
            idx = lost.nonzero(as_tuple=True)
            t1, assign[idx] = _pixel_argmax(sim_low, taps, idx, s_num, in_y, in_x, keep_inst, outside_box_value)
            if value_low is not None:
                t1 = _values_at(value_low, taps, idx, assign[idx], s_num, in_y, in_x, outside_box_value)
            slot_sums += _sum_by_slot(idx[0], assign[idx], t1, n, k_num)
    else:
        inst_sim = sim[:, s_num:]  # (N, Q, H, W) view
        if q_num:
            inst_sim.masked_fill_(~in_y[..., :, None] | ~in_x[..., None, :], outside_box_value)
            if not bool(valid.all()):
                inst_sim[~valid] = MASKED_SIMILARITY  # whole planes
        # 3. first assignment
        top1, assign = first_argmax(sim, 1)
        # 4. drop mostly hidden instances; re-assign the pixels they had won
        drop = hidden(counts(assign))
        keep_inst = valid & ~drop
        if q_num and bool(drop.any()):
            inst_sim[drop] = MASKED_SIMILARITY  # whole planes
            dropped_slot = torch.cat([torch.zeros(n, s_num, dtype=torch.bool, device=dev), drop], dim=1)
            lost = dropped_slot.gather(1, assign.flatten(1)).view(n, hh, ww)  # (N, H, W)
            t1, a1 = sim.permute(0, 2, 3, 1)[lost].max(dim=-1)  # (M, K) rows: first index of the max
            top1[lost] = t1
            assign[lost] = a1
    confidence = None
    if return_confidence and k_num >= 2:
        # second-best value = max after removing the best entry (what topk(2) returns); sim is done
        sim.scatter_(1, assign[:, None], float("-inf"))
        confidence = (top1 - sim.amax(1)).clamp(0.0, 2.0)
    elif return_confidence:
        confidence = top1.clamp(0.0, 2.0)
    if extents is None:
        # 5–6 from one (slot, row) and one (slot, column) histogram of the final assignment
        a_flat = (assign if all_valid else torch.where(pixel_valid, assign, void_fill)).flatten(1)  # (N, H*W)
        g = (a_flat + slot_offset).view(n, hh, ww)
        row_hist = torch.bincount((g * hh + ys[None, :, None]).flatten(), minlength=n * (k_num + 1) * hh)
        col_hist = torch.bincount((g * ww + xs[None, None, :]).flatten(), minlength=n * (k_num + 1) * ww)
        row_hist = row_hist.view(n, k_num + 1, hh)[:, :k_num]
        col_hist = col_hist.view(n, k_num + 1, ww)[:, :k_num]
        area = row_hist.sum(-1)
    else:  # the compiled path's assignment already has void (= K) outside the valid regions
        area = extents[0]
    # 5. small stuff → void; instances must still satisfy the area rule
    img_area = (sizes[:, 0] * sizes[:, 1]).to(dtype)
    if stuff_area_reference and stuff_area_reference > 0:
        stuff_thr = min_stuff_area * img_area / float(stuff_area_reference)
    else:
        stuff_thr = torch.full_like(img_area, float(min_stuff_area))
    keep = area > 0
    keep[:, :s_num] &= area[:, :s_num].to(dtype) >= stuff_thr[:, None]
    keep[:, s_num:] &= keep_inst & (area[:, s_num:] >= min_instance_area)
    # 6. ids; the final segments are the kept slots, so their statistics are the histograms' rows
    seg_ids = torch.cumsum(keep.long(), dim=1) * keep.long()
    ext = torch.cat([seg_ids, torch.zeros(n, 1, dtype=torch.long, device=dev)], dim=1).to(torch.int32)
    if extents is None:
        id_map = ext.gather(1, a_flat).view(n, hh, ww)
    else:
        id_map = torch.from_numpy(fusion_kernels.ids_of_slots(assign.numpy(), ext.contiguous().numpy()))
    area = area * keep
    if extents is None:  # tight boxes: first / last occupied row and column (max edge exclusive)
        r = (row_hist > 0).to(torch.uint8)
        c = (col_hist > 0).to(torch.uint8)
        y0, x0 = r.argmax(-1), c.argmax(-1)
        y1, x1 = hh - r.flip(-1).argmax(-1), ww - c.flip(-1).argmax(-1)
        seg_boxes = torch.stack([x0, y0, x1, y1], dim=-1).to(dtype)
    else:
        seg_boxes = extents[1].to(dtype)
    seg_boxes = torch.where((area > 0)[..., None], seg_boxes, torch.zeros_like(seg_boxes))
    if not coarse:
        values = top1
        if normalize_after_upsampling:  # stuff scores from the up-sampled stride-s cosines, as coarse-to-fine
            value_low = _unit_similarities(low, queries).contiguous()
            taps = (bilinear_taps(hh, he, dev), bilinear_taps(ww, we, dev))
            grid = torch.meshgrid(torch.arange(n, device=dev), ys, xs, indexing="ij")
            values = _values_at(value_low, taps, tuple(g.reshape(-1) for g in grid), assign.reshape(-1), s_num,
                                in_y, in_x, outside_box_value).view(n, hh, ww)
        slot_sums = _sum_by_slot(torch.arange(n, device=dev)[:, None].expand_as(a_flat), a_flat, values.flatten(1), n,
                                 k_num + 1)[:, :k_num]
    stuff_scores = slot_sums[:, :s_num].to(dtype) / area[:, :s_num].clamp_min(1).to(dtype)
    scores = torch.cat([stuff_scores, instance_scores.to(dtype)], dim=1)
    labels = torch.cat([torch.arange(num_things, num_things + s_num, device=dev)[None].expand(n, -1),
                        instance_labels.long()], dim=1)
    isthing = torch.cat([torch.zeros(n, s_num, dtype=torch.bool, device=dev),
                         torch.ones(n, q_num, dtype=torch.bool, device=dev)], dim=1)
    out = {"id_map": id_map, "segment_ids": seg_ids.to(torch.int32), "labels": labels, "isthing": isthing,
           "scores": torch.where(keep, scores, torch.zeros_like(scores)), "areas": area, "boxes": seg_boxes}
    if confidence is not None:
        out["confidence"] = torch.where(id_map > 0, confidence, torch.zeros_like(confidence))
    return out


def split_panoptic(fused: dict[str, Tensor], image_sizes) -> list[dict[str, Tensor]]:
    """Batched :func:`fuse_panoptic` output → one dict per image, cropped to its size.

    Each dict: ``id_map (h, w)`` int32, ``ids (n,)`` int32 in id order, ``labels (n,)`` training
    ids, ``isthing (n,)``, ``scores (n,)``, ``areas (n,)``, ``boxes (n, 4)``; ``confidence (h, w)``
    when present.
    """
    results = []
    for i, (h, w) in enumerate(image_sizes):
        h, w = int(h), int(w)
        used = fused["segment_ids"][i] > 0
        r = {"id_map": fused["id_map"][i, :h, :w].contiguous(), "ids": fused["segment_ids"][i][used],
             "labels": fused["labels"][i][used], "isthing": fused["isthing"][i][used],
             "scores": fused["scores"][i][used], "areas": fused["areas"][i][used],
             "boxes": fused["boxes"][i][used]}
        if "confidence" in fused:
            r["confidence"] = fused["confidence"][i, :h, :w].contiguous()
        results.append(r)
    return results


def instance_queries_at(embedding: Tensor, locations_xy: Tensor, embedding_stride: int = 1,
                        interpolate: bool = False) -> Tensor:
    """Query embedding of a proposal = P at the location that produced it (§IV-C).

    embedding ``(D, h, w)``, locations_xy ``(Q, 2)`` input pixels → ``(Q, D)`` unit (clamped to
    the map). ``interpolate=False``: the stride-s sample containing the pixel;
    ``interpolate=True``: the bilinear up-sampling of the map at that pixel (the paper's
    ``P = L2norm(up(P' + P''))`` at the location, for ``normalize_after_upsampling``).
    """
    _, h, w = embedding.shape
    px = locations_xy[:, 0].long()
    py = locations_xy[:, 1].long()
    if interpolate and embedding_stride > 1:
        hh, ww = h * embedding_stride, w * embedding_stride
        taps = (bilinear_taps(hh, h, embedding.device), bilinear_taps(ww, w, embedding.device))
        py, px = py.clamp(0, hh - 1), px.clamp(0, ww - 1)
        e = embedding.float()
        p = _bilinear_at(lambda r, c: e[:, r, c], taps, py, px)  # (D, Q)
        return F.normalize(p.t(), dim=1).to(embedding.dtype)
    x = torch.div(px, embedding_stride, rounding_mode="floor").clamp(0, w - 1)
    y = torch.div(py, embedding_stride, rounding_mode="floor").clamp(0, h - 1)
    return F.normalize(embedding[:, y, x].t(), dim=1)


def panoptic_from_raw(raw: dict[str, Tensor], image_sizes, *, num_things: int, embedding_stride: int = 1,
                      score_threshold: float = 0.05, pre_nms_topk: int = 1000, nms_threshold: float = 0.6,
                      detections_per_img: int = 100, instance_score_threshold: float = 0.3,
                      min_stuff_area: float = 4096, stuff_area_reference: float = 640 * 480,
                      min_visible_fraction: float = 0.2, min_instance_area: float = 16,
                      outside_box_value: float = 0.0, return_confidence: bool = False,
                      fusion_method: str = "auto", normalize_after_upsampling: bool = False) -> list[dict[str, Tensor]]:
    """``CIAE.forward_raw`` outputs → per-image panoptic results (see :func:`split_panoptic`).

    Proposals from :func:`select_proposals`; only those with score >= ``instance_score_threshold``
    become instance queries (our decision: low-score proposals of the 0.05 detection threshold
    would otherwise claim pixels as spurious segments; 0.3 is a panoptic-quality operating
    point, lower it for recall). Stuff queries are ``memory[T:]``. Half-precision outputs (autocast)
    are promoted to float32 first (module docstring).
    """
    raw = {k: _promote_half(v) if isinstance(v, Tensor) else v for k, v in raw.items()}
    emb = raw["embedding"]
    n = emb.shape[0]
    props = select_proposals(raw["cls_logits"], raw["box_regression"], raw["centerness"], raw["points"], image_sizes,
                             score_threshold=score_threshold, pre_nms_topk=pre_nms_topk, nms_threshold=nms_threshold,
                             detections_per_img=detections_per_img)
    props = [{k: v[p["scores"] >= instance_score_threshold] for k, v in p.items()} for p in props]
    q = max([p["scores"].numel() for p in props] + [0])
    d = emb.shape[1]
    dev = emb.device
    queries = emb.new_zeros(n, q, d)
    boxes = emb.new_zeros(n, q, 4)
    labels = torch.zeros(n, q, dtype=torch.long, device=dev)
    scores = emb.new_zeros(n, q)
    valid = torch.zeros(n, q, dtype=torch.bool, device=dev)
    for i, p in enumerate(props):
        m = p["scores"].numel()
        if m == 0:
            continue
        queries[i, :m] = instance_queries_at(emb[i], raw["points"][p["locations"]], embedding_stride,
                                             interpolate=normalize_after_upsampling)
        boxes[i, :m] = p["boxes"].to(emb.dtype)
        labels[i, :m] = p["labels"]
        scores[i, :m] = p["scores"].to(emb.dtype)
        valid[i, :m] = True
    fused = fuse_panoptic(emb, raw["memory"][num_things:], queries, boxes, labels, scores, valid,
                          num_things=num_things, image_sizes=image_sizes, embedding_stride=embedding_stride,
                          min_stuff_area=min_stuff_area, stuff_area_reference=stuff_area_reference,
                          min_visible_fraction=min_visible_fraction, min_instance_area=min_instance_area,
                          outside_box_value=outside_box_value, return_confidence=return_confidence,
                          method=fusion_method, normalize_after_upsampling=normalize_after_upsampling)
    return split_panoptic(fused, image_sizes)
