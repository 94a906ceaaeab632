"""Panoptic fusion (paper §IV-C, Eq. 16) as Triton kernels in fixed shapes: no host
synchronisation from the embedding to the id map, so it can be captured in a CUDA graph.

:func:`fuse_panoptic_static` gives :func:`ciae_core.fusion.fuse_panoptic`'s result (same rules,
steps 1-6 there) for Q instance slots with a ``valid`` mask and image sizes as a device tensor:

1. ``S = E V^T`` at the embedding resolution ``(N, K, h, w)`` (K = S stuff + Q instance queries),
   as the coarse-to-fine path computes it; with ``normalize_after_upsampling`` also the unit
   similarities (stuff scores), as there.
2.-3. :func:`_assign_kernel`, one program per tile of output pixels: every slot's bilinearly
   up-sampled similarity at each pixel, with ``F.interpolate``'s ``align_corners=False`` taps
   (:func:`ciae_core.fusion_coarse.bilinear_taps`) combined in torch's order
   ``(a*lx0 + b*lx1)*ly0 + (c*lx0 + d*lx1)*ly1`` (no fused multiply-add: the kernels are
   compiled with ``enable_fp_fusion=False``, so a GPU gives the values of the torch paths bit for
   bit), the remote-instance box filter (pixel centre in the box, inclusive; outside: the
   constant ``outside_box_value``), invalid slots -inf, the first index winning ties; out: the
   slot ``(N, H, W)`` int32 (void = K outside each image's valid region) and the winner's value
   (stuff scores).
4. Areas of the first assignment (:func:`_stats_kernel`), mostly hidden instances dropped, and
   the same kernel again (``REASSIGN``) for the pixels won by a dropped instance only (a tile
   without such a pixel returns at once).
5.-6. Areas, value sums and tight boxes of the final assignment (:func:`_stats_kernel`: per tile,
   for each slot present, counts / sums / row and column extremes, then one atomic per slot and
   tile — never ``torch.bincount``, whose output size depends on the data), then the kept
   segments, ids and id map exactly as ``fuse_panoptic`` (its own step functions).

Results equal ``fuse_panoptic``'s (methods ``coarse_to_fine``, ``numba``; ``dense`` up to
similarities that tie to the last bit), stuff scores to float rounding (sums in another order).

On CPU tensors the kernels run in Triton's interpreter, which is how they are tested without a
GPU: ``TRITON_INTERPRET=1`` must be set before triton is first imported (Triton builds its own
library functions in that mode then; the tests of this module set it on a machine without CUDA);
on CUDA they are compiled (the first call per shape compiles, seconds: warm up before a capture).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ciae_core.fusion import _hidden_instances, _id_map, _kept_segments, _promote_half, _segment_table
from ciae_core.fusion_coarse import _unit_similarities, bilinear_taps

BLOCK_Y, BLOCK_X = 8, 64  # output pixels per program (one tile) on a GPU
# in the interpreter a program costs ~10 ms of set-up whatever its size: large tiles there
INTERPRETER_BLOCK_Y, INTERPRETER_BLOCK_X = 64, 128
_BIG = 1 << 30


# sizes are not specialised on (divisibility by 16 or == 1 would compile a variant per image size)
@triton.jit(do_not_specialize=["K", "S", "h", "w", "H", "W"])
def _assign_kernel(sim_ptr, val_ptr, i0y_ptr, i1y_ptr, l0y_ptr, l1y_ptr, i0x_ptr, i1x_ptr, l0x_ptr, l1x_ptr,
                   iny_ptr, inx_ptr, ok_ptr, dropped_ptr, size_ptr, assign_ptr, value_ptr,
                   K, S, h, w, H, W, outside_value,
                   REASSIGN: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    """Steps 2-3 for one tile of image ``program_id(0)`` (module docstring). sim/val ``(N, K, h, w)``
    float32, taps ``(H,)``/``(W,)`` int32 and float32, iny ``(N, Q, H)``/inx ``(N, Q, W)`` uint8,
    ok ``(N, K)`` uint8 (slot may win), dropped ``(N, K + 1)`` uint8 (REASSIGN: re-evaluate the
    pixels of these slots only), size ``(N, 2)`` int32 valid (h, w) → assign ``(N, H, W)`` int32,
    value ``(N, H, W)`` float32."""
    n = tl.program_id(0)
    ys = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xs = tl.program_id(2) * BLOCK_X + tl.arange(0, BLOCK_X)
    in_tile = (ys < H)[:, None] & (xs < W)[None, :]
    pix_ok = (ys < tl.load(size_ptr + 2 * n))[:, None] & (xs < tl.load(size_ptr + 2 * n + 1))[None, :] & in_tile
    out = n.to(tl.int64) * H * W + ys[:, None] * W + xs[None, :]
    if REASSIGN:
        current = tl.load(assign_ptr + out, mask=in_tile, other=0)
        write = tl.load(dropped_ptr + n * (K + 1) + current, mask=in_tile, other=0) != 0
        write = write & pix_ok
    else:
        write = in_tile
    if tl.max(write.to(tl.int32)) > 0:
        yc = tl.minimum(ys, H - 1)
        xc = tl.minimum(xs, W - 1)
        r0 = tl.load(i0y_ptr + yc)
        r1 = tl.load(i1y_ptr + yc)
        ly0 = tl.load(l0y_ptr + yc)[:, None]
        ly1 = tl.load(l1y_ptr + yc)[:, None]
        c0 = tl.load(i0x_ptr + xc)
        c1 = tl.load(i1x_ptr + xc)
        lx0 = tl.load(l0x_ptr + xc)[None, :]
        lx1 = tl.load(l1x_ptr + xc)[None, :]
        o00 = r0[:, None] * w + c0[None, :]
        o01 = r0[:, None] * w + c1[None, :]
        o10 = r1[:, None] * w + c0[None, :]
        o11 = r1[:, None] * w + c1[None, :]
        best = tl.full([BLOCK_Y, BLOCK_X], float("-inf"), tl.float32)
        slot = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.int32)
        for k in range(0, K):
            plane = sim_ptr + (n.to(tl.int64) * K + k) * h * w
            v = (tl.load(plane + o00) * lx0 + tl.load(plane + o01) * lx1) * ly0 + \
                (tl.load(plane + o10) * lx0 + tl.load(plane + o11) * lx1) * ly1
            if k >= S:  # an instance: its box filter (pixel centre inside, precomputed per row / column)
                q_row = (n.to(tl.int64) * (K - S) + (k - S))
                iny = tl.load(iny_ptr + q_row * H + yc) != 0
                inx = tl.load(inx_ptr + q_row * W + xc) != 0
                v = tl.where(iny[:, None] & inx[None, :], v, outside_value)
            v = tl.where(tl.load(ok_ptr + n * K + k) != 0, v, float("-inf"))
            better = v > best  # strict: the first index wins ties
            best = tl.where(better, v, best)
            slot = tl.where(better, k, slot)
        vplane = val_ptr + (n.to(tl.int64) * K + slot) * h * w
        value = (tl.load(vplane + o00, mask=in_tile, other=0.0) * lx0 +
                 tl.load(vplane + o01, mask=in_tile, other=0.0) * lx1) * ly0 + \
                (tl.load(vplane + o10, mask=in_tile, other=0.0) * lx0 +
                 tl.load(vplane + o11, mask=in_tile, other=0.0) * lx1) * ly1
        slot = tl.where(pix_ok, slot, K)  # void outside the valid region
        value = tl.where(pix_ok, value, 0.0)
        tl.store(assign_ptr + out, slot, mask=write)
        tl.store(value_ptr + out, value, mask=write)


@triton.jit(do_not_specialize=["B", "H", "W"])
def _stats_kernel(label_ptr, value_ptr, count_ptr, sum_ptr, ymin_ptr, ymax_ptr, xmin_ptr, xmax_ptr, B, H, W,
                  HAS_VALUES: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    """Per label ``0..B-1`` of ``label (N, H, W)`` int32: pixel count, value sum (float64) and row /
    column extremes (inclusive), accumulated over tiles with one atomic per label present."""
    n = tl.program_id(0)
    ys = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xs = tl.program_id(2) * BLOCK_X + tl.arange(0, BLOCK_X)
    m = (ys < H)[:, None] & (xs < W)[None, :]
    off = n.to(tl.int64) * H * W + ys[:, None] * W + xs[None, :]
    lab = tl.load(label_ptr + off, mask=m, other=0)
    lo = tl.min(tl.where(m, lab, 1 << 30))
    hi = tl.max(tl.where(m, lab, -1))
    yy = ys[:, None] + tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.int32)
    xx = xs[None, :] + tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.int32)
    if HAS_VALUES:
        val = tl.load(value_ptr + off, mask=m, other=0.0)
    for k in range(lo, hi + 1):
        sel = m & (lab == k)
        count = tl.sum(sel.to(tl.int32))
        if count > 0:
            at = n * B + k
            tl.atomic_add(count_ptr + at, count)
            if HAS_VALUES:
                tl.atomic_add(sum_ptr + at, tl.sum(tl.where(sel, val, 0.0)).to(tl.float64))
            tl.atomic_min(ymin_ptr + at, tl.min(tl.where(sel, yy, 1 << 30)))
            tl.atomic_max(ymax_ptr + at, tl.max(tl.where(sel, yy, -1)))
            tl.atomic_min(xmin_ptr + at, tl.min(tl.where(sel, xx, 1 << 30)))
            tl.atomic_max(xmax_ptr + at, tl.max(tl.where(sel, xx, -1)))


# Triton fixes the mode when it is first imported (its own library functions, tl.max and the like,
# are built then): with TRITON_INTERPRET=1 set before that, the kernels run in its interpreter
INTERPRETED = all(type(f).__name__ == "InterpretedFunction" for f in (_assign_kernel, tl.max))


def kernels_for(device: torch.device):
    """The two kernels, after checking that they can run on ``device``'s tensors."""
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("the Triton fusion runs on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is first imported (tests), or use ciae_core.fusion.fuse_panoptic")
    if device.type == "cuda" and type(_assign_kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("TRITON_INTERPRET=1 was set when triton was imported: its kernels would run interpreted "
                           "on the host; unset it to run them on the GPU")
    return _assign_kernel, _stats_kernel


def _launch_options(device: torch.device) -> dict:
    """Tile and compile options: torch's rounding (no fused multiply-add) on a GPU; large tiles
    and no compile options in the interpreter."""
    if device.type == "cpu":
        return {"BLOCK_Y": INTERPRETER_BLOCK_Y, "BLOCK_X": INTERPRETER_BLOCK_X}
    return {"BLOCK_Y": BLOCK_Y, "BLOCK_X": BLOCK_X, "enable_fp_fusion": False}


def _grid(n: int, hh: int, ww: int, options: dict) -> tuple[int, int, int]:
    return n, triton.cdiv(hh, options["BLOCK_Y"]), triton.cdiv(ww, options["BLOCK_X"])


def segment_stats(labels: Tensor, bins: int, values: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per label ``0..bins-1`` of ``labels (N, H, W)`` int32: counts ``(N, bins)`` int64, sums of
    ``values (N, H, W)`` float32 ``(N, bins)`` float64 (zeros without values), boxes
    ``(N, bins, 4)`` int64 ``x0, y0, x1, y1`` inclusive (empty labels: ``2**30, 2**30, -1, -1``)."""
    n, hh, ww = labels.shape
    dev = labels.device
    _, stats = kernels_for(dev)
    count = torch.zeros(n, bins, dtype=torch.int32, device=dev)
    sums = torch.zeros(n, bins, dtype=torch.float64, device=dev)
    lo = torch.full((4, n, bins), _BIG, dtype=torch.int32, device=dev)
    lo[1::2] = -1  # ymin, ymax, xmin, xmax
    options = _launch_options(dev)
    stats[_grid(n, hh, ww, options)](labels, values if values is not None else labels, count, sums, lo[0], lo[1],
                                     lo[2], lo[3], bins, hh, ww, HAS_VALUES=values is not None, **options)
    boxes = torch.stack([lo[2], lo[0], lo[3], lo[1]], dim=-1).long()
    return count.long(), sums, boxes


def _box_masks(boxes: Tensor, hh: int, ww: int, sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Step 2's masks as ``fuse_panoptic`` forms them: in_y ``(N, Q, H)``, in_x ``(N, Q, W)`` (pixel
    centre in the box, inclusive) and the box area inside the valid region ``(N, Q)``."""
    dev = boxes.device
    ys = torch.arange(hh, device=dev)
    xs = torch.arange(ww, device=dev)
    cx = xs.to(boxes.dtype) + 0.5
    cy = ys.to(boxes.dtype) + 0.5
    in_x = (cx[None, None, :] >= boxes[..., 0:1]) & (cx[None, None, :] <= boxes[..., 2:3])
    in_y = (cy[None, None, :] >= boxes[..., 1:2]) & (cy[None, None, :] <= boxes[..., 3:4])
    row_valid = ys[None, :] < sizes[:, 0, None]
    col_valid = xs[None, :] < sizes[:, 1, None]
    box_area = (in_y & row_valid[:, None]).sum(-1) * (in_x & col_valid[:, None]).sum(-1)
    return in_y, in_x, box_area


def fuse_panoptic_static(embedding: Tensor, stuff_queries: Tensor, instance_queries: Tensor, instance_boxes: Tensor,
                         instance_labels: Tensor, instance_scores: Tensor, instance_valid: Tensor, *, num_things: int,
                         image_hw: Tensor, embedding_stride: int, min_stuff_area: float = 4096,
                         stuff_area_reference: float = 640 * 480, min_visible_fraction: float = 0.2,
                         min_instance_area: float = 16, outside_box_value: float = 0.0,
                         normalize_after_upsampling: bool = False) -> dict[str, Tensor]:
    """:func:`ciae_core.fusion.fuse_panoptic` (same arguments and result; ``return_confidence`` and
    ``method`` do not apply) with the image sizes as a tensor ``image_hw (N, 2)`` on the device and
    the assignment in Triton kernels (module docstring). float16/bfloat16 inputs are computed in
    float32, as there; float64 is not supported (the kernels are float32)."""
    embedding, stuff_queries, instance_queries, instance_boxes, instance_scores = (
        _promote_half(t) for t in (embedding, stuff_queries, instance_queries, instance_boxes, instance_scores))
    if embedding.dtype != torch.float32:
        raise ValueError(f"fuse_panoptic_static: float32 (or half) embeddings only, got {embedding.dtype}")
    n, _, he, we = embedding.shape
    s_num, q_num = stuff_queries.shape[0], instance_queries.shape[1]
    k_num = s_num + q_num
    if k_num == 0:
        raise ValueError("fuse_panoptic_static needs at least one query (stuff class or instance)")
    hh, ww = he * embedding_stride, we * embedding_stride
    dev, dtype = embedding.device, embedding.dtype
    assign_kernel, _ = kernels_for(dev)
    queries = torch.cat([stuff_queries[None].expand(n, -1, -1).to(dtype), instance_queries.to(dtype)], dim=1)  # V
    # 1. Eq. 16 at the embedding resolution, as the coarse-to-fine path forms it
    sim_low = torch.einsum("ndhw,nkd->nkhw", embedding, queries).contiguous()
    value_low = _unit_similarities(embedding, queries, sim_low).contiguous() if normalize_after_upsampling else sim_low
    (i0y, i1y, l0y, l1y), (i0x, i1x, l0x, l1x) = bilinear_taps(hh, he, dev), bilinear_taps(ww, we, dev)
    taps = (i0y.int(), i1y.int(), l0y, l1y, i0x.int(), i1x.int(), l0x, l1x)
    sizes = image_hw.to(device=dev, dtype=torch.long)
    in_y, in_x, box_area = _box_masks(instance_boxes.to(dtype), hh, ww, sizes)
    valid = instance_valid.bool()
    stuff_ok = torch.ones(n, s_num, dtype=torch.bool, device=dev)
    assign = torch.empty(n, hh, ww, dtype=torch.int32, device=dev)
    value = torch.empty(n, hh, ww, dtype=torch.float32, device=dev)
    options = _launch_options(dev)
    grid = _grid(n, hh, ww, options)
    common = (in_y.to(torch.uint8).contiguous(), in_x.to(torch.uint8).contiguous())
    size32 = sizes.to(torch.int32).contiguous()

    def run(ok: Tensor, dropped: Tensor, reassign: bool) -> None:
        assign_kernel[grid](sim_low, value_low, *taps, *common, ok.to(torch.uint8).contiguous(),
                            dropped.to(torch.uint8).contiguous(), size32, assign, value, k_num, s_num, he, we, hh, ww,
                            float(outside_box_value), REASSIGN=reassign, **options)

    # 2.-3. first assignment
    no_drop = torch.zeros(n, k_num + 1, dtype=torch.bool, device=dev)
    run(torch.cat([stuff_ok, valid], dim=1), no_drop, reassign=False)
    # 4. mostly hidden instances dropped; the pixels they had won go to the next best query
    counts, _, _ = segment_stats(assign, k_num + 1)
    drop = _hidden_instances(counts[:, :k_num], valid=valid, box_area=box_area, s_num=s_num, dtype=dtype,
                             min_instance_area=min_instance_area, min_visible_fraction=min_visible_fraction)
    keep_instances = valid & ~drop
    if q_num:
        dropped = torch.cat([torch.zeros(n, s_num, dtype=torch.bool, device=dev), drop,
                             torch.zeros(n, 1, dtype=torch.bool, device=dev)], dim=1)
        run(torch.cat([stuff_ok, keep_instances], dim=1), dropped, reassign=True)
    # 5.-6. extents of the final assignment, kept segments, ids, id map, table (fuse_panoptic's steps)
    area, sums, boxes = segment_stats(assign, k_num + 1, value)
    area, sums = area[:, :k_num], sums[:, :k_num].float()
    boxes = torch.cat([boxes[:, :k_num, :2], boxes[:, :k_num, 2:] + 1], dim=-1)  # max edge exclusive, as fuse_panoptic
    keep = _kept_segments(area, keep_instances, sizes, s_num, min_stuff_area, stuff_area_reference,
                          min_instance_area, dtype)
    segment_ids = torch.cumsum(keep.long(), dim=1) * keep.long()
    id_map = _id_map(segment_ids, assign, assign.flatten(1).long())
    return _segment_table(id_map, segment_ids, keep, area * keep, boxes.to(dtype), sums, instance_labels,
                          instance_scores, num_things, dtype)
