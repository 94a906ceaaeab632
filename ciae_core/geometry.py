"""Image geometry of inference: letterbox, resizing like training, input checks, segment tables.

Everything the :class:`~ciae_core.predictor.Predictor` does to the *shape* of an image, as pure
functions (no model, no engine):

* **Resize geometry** is the one of :func:`ciae_core.data.shortest_edge_size` used in training
  (:func:`letterbox`): ``scale = input_size / min(h, w)``, reduced to ``max_size / max(h, w)`` if
  the long side would exceed ``max_size``; resized size ``round(h * scale), round(w * scale)``;
  zero (black) padding bottom/right to a multiple of ``stride`` (32). Images whose shorter side is
  below ``min_image_side`` (default 8 px) or whose resized shorter side would fall below
  ``stride`` are rejected with :class:`~ciae_core.predictor_error.PredictorError` (a 1-pixel-high
  strip has no usable receptive field). A fixed-shape ONNX export is served by fitting the image
  into its canvas instead (:func:`letterbox_into`).
* **Interpolation** matches training (:mod:`ciae_core.data`): area averaging when both sides
  shrink (``cv2.INTER_AREA``), bilinear otherwise; :func:`resize_image_like_cv2` runs the same
  maths on any torch device (within one grey level of cv2), so CPU and GPU feed the network the
  same pixels. (An antialiased bilinear GPU resize differed from INTER_AREA by 2.7 grey levels on
  average and changed a fifth of the pixels of a random-weight model's output.)
* **Map back**: id maps go back to the input resolution with pixel-centre nearest-neighbour
  sampling (:func:`resize_nearest`, source index ``floor((i + 0.5) * resized / input)``, the
  geometry of :func:`ciae_core.data.resize_id_map`); :func:`segment_table` then recomputes areas
  and boxes from the mapped map on its device.
* :func:`validate_image`: the input contract, numpy ``uint8`` ``(H, W, 3)``, with one-line hints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ciae_core.predictor_error import PredictorError

MIN_IMAGE_SIDE = 8


@dataclass(frozen=True)
class Letterbox:
    """Geometry of one image through the predictor.

    ``(height, width)``: input image; ``(resized_height, resized_width)``: what the network sees
    (and the resolution of fusion); ``(padded_height, padded_width)``: multiple of the stride.
    """

    height: int
    width: int
    resized_height: int
    resized_width: int
    padded_height: int
    padded_width: int

    @property
    def scale(self) -> tuple[float, float]:
        """Per-axis scale ``(sy, sx)`` input → resized."""
        return self.resized_height / self.height, self.resized_width / self.width

    @property
    def resized_size(self) -> tuple[int, int]:
        return self.resized_height, self.resized_width

    @property
    def is_identity(self) -> bool:
        return (self.resized_height, self.resized_width) == (self.height, self.width)


def _checked_image_sides(height: int, width: int, min_image_side: int) -> tuple[int, int]:
    height, width = int(height), int(width)
    if min(height, width) < min_image_side:
        raise PredictorError(f"image of {width}x{height} pixels is too small; both sides must be at least "
                             f"{min_image_side} pixels")
    return height, width


def letterbox(height: int, width: int, input_size: int, max_size: int, stride: int = 32,
              min_image_side: int = MIN_IMAGE_SIDE) -> Letterbox:
    """Shorter side → ``input_size``, longer side capped at ``max_size``, padded to ``stride``.

    Same rounding as :func:`ciae_core.data.shortest_edge_size` (training). Raises
    :class:`PredictorError` for images with a side below ``min_image_side`` or whose resized
    shorter side would be below ``stride`` (extreme aspect ratios).
    """
    height, width = _checked_image_sides(height, width, min_image_side)
    scale = input_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    rh, rw = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
    if min(rh, rw) < stride:
        raise PredictorError(f"image of {width}x{height} pixels has an aspect ratio too extreme for max_size={max_size}: "
                             f"it would be resized to {rw}x{rh}, below the {stride}-pixel stride; crop it or raise max_size")
    ph, pw = int(math.ceil(rh / stride) * stride), int(math.ceil(rw / stride) * stride)
    return Letterbox(height, width, rh, rw, ph, pw)


def letterbox_into(height: int, width: int, canvas_height: int, canvas_width: int, stride: int = 32,
                   min_image_side: int = MIN_IMAGE_SIDE) -> Letterbox:
    """Fit an image into a fixed ``canvas_height x canvas_width`` input (a fixed-shape ONNX export).

    Decision: the whole image is kept (no crop) at its aspect ratio, ``scale = min(Hc / h, Wc / w)``,
    resized with the same rounding as :func:`letterbox` (clamped to the canvas) and padded
    bottom/right to the canvas, so results map back exactly as for dynamic inputs. The padding
    enters the heads' GroupNorm statistics, so results can differ slightly from a dynamic export at
    the same scale (as for ``mixed_size_batching="pad"``). Same rejections as :func:`letterbox`;
    the predictor's ``max_size`` does not apply (the canvas is the limit).
    """
    height, width = _checked_image_sides(height, width, min_image_side)
    scale = min(canvas_height / height, canvas_width / width)
    rh = min(canvas_height, max(1, int(round(height * scale))))
    rw = min(canvas_width, max(1, int(round(width * scale))))
    if min(rh, rw) < stride:
        raise PredictorError(f"image of {width}x{height} pixels has an aspect ratio too extreme for the fixed "
                             f"{canvas_width}x{canvas_height} input: it would be resized to {rw}x{rh}, below the "
                             f"{stride}-pixel stride; crop it or use a dynamic export")
    return Letterbox(height, width, rh, rw, int(canvas_height), int(canvas_width))


def nearest_source_index(out_len: int, in_len: int, device=None) -> torch.Tensor:
    """Pixel-centre nearest-neighbour: source index of each of ``out_len`` output pixels when a
    length-``in_len`` axis is resampled, ``floor((i + 0.5) * in_len / out_len)`` in exact integers."""
    i = torch.arange(out_len, device=device, dtype=torch.int64)
    return torch.clamp(((2 * i + 1) * in_len) // (2 * out_len), max=in_len - 1)


def resize_nearest(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resample of a ``(h, w)`` map (any dtype) to ``size = (H, W)``."""
    h, w = t.shape[-2:]
    if (h, w) == tuple(size):
        return t
    ys = nearest_source_index(size[0], h, t.device)
    xs = nearest_source_index(size[1], w, t.device)
    return t.index_select(-2, ys).index_select(-1, xs)


def area_resize_weights(in_len: int, out_len: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """``(out_len, in_len)`` weights of area-averaging down-sampling (cv2 ``INTER_AREA``).

    Output pixel ``i`` averages the source interval ``[i * s, (i + 1) * s)``, ``s = in / out``,
    each source pixel weighted by its overlap with the interval (fractional at the ends).
    """
    s = in_len / out_len
    i = torch.arange(out_len, device=device, dtype=dtype)[:, None]
    j = torch.arange(in_len, device=device, dtype=dtype)[None, :]
    overlap = torch.minimum((i + 1) * s, j + 1) - torch.maximum(i * s, j)
    return overlap.clamp_min(0) / s


def resize_image_like_cv2(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a float ``(3, H, W)`` image (0..255) to ``size = (h, w)`` as the training pipeline's
    ``cv2.resize`` does: area averaging (``INTER_AREA``) when both sides shrink, else bilinear with
    pixel-centre alignment (``INTER_LINEAR``); the result is rounded to integers like cv2's uint8
    output. Runs on any device (two float64 matrix products for the area case, exact to
    rounding), so the CUDA path feeds the network the same pixels as the CPU path (±1 grey level).
    """
    h, w = x.shape[-2:]
    oh, ow = size
    if (oh, ow) == (h, w):
        return x
    if oh < h and ow < w:
        wy = area_resize_weights(h, oh, x.device)
        wx = area_resize_weights(w, ow, x.device)
        y = torch.matmul(torch.matmul(wy, x.double()), wx.t())
    else:
        y = F.interpolate(x[None].float(), size=(oh, ow), mode="bilinear", align_corners=False)[0]
    return torch.floor(y + 0.5).clamp_(0, 255).to(x.dtype)  # cv2 rounds uint8 half up


def segment_table(id_map: torch.Tensor, max_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Areas and tight boxes of the non-zero ids of ``id_map`` ``(H, W)`` (values in ``0..max_id``).

    Returns ``ids (K,)`` int64 present ids in increasing order, ``areas (K,)`` int64 pixel
    counts and ``boxes (K, 4)`` int64 ``x, y, w, h``. Runs on the map's device, so on CUDA only the
    tiny table goes to the host. Boxes come from ``(max_id+1, H)`` / ``(max_id+1, W)`` presence
    tables filled by plain (idempotent) index writes: a scatter-min/max over the pixels is
    several times slower on a GPU because every pixel of a large region hits the same slot.
    """
    h, w = id_map.shape
    ids_l = id_map.long()
    n = int(max_id) + 1
    dev = id_map.device
    areas = torch.bincount(ids_l.reshape(-1), minlength=n)[:n]
    rows = torch.zeros((n, h), dtype=torch.bool, device=dev)
    cols = torch.zeros((n, w), dtype=torch.bool, device=dev)
    rows[ids_l, torch.arange(h, device=dev)[:, None].expand(h, w)] = True
    cols[ids_l, torch.arange(w, device=dev)[None, :].expand(h, w)] = True
    ids = torch.nonzero(areas[1:] > 0).squeeze(1) + 1
    r, c = rows[ids].to(torch.uint8), cols[ids].to(torch.uint8)
    y0, x0 = r.argmax(1), c.argmax(1)
    y1, x1 = h - 1 - r.flip(1).argmax(1), w - 1 - c.flip(1).argmax(1)
    boxes = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], dim=1)
    return ids, areas[ids], boxes


def validate_image(image: Any, index: int = 0) -> np.ndarray:
    """Check one input image: numpy ``uint8`` ``(H, W, 3)``; returns it (C-contiguous)."""
    where = f"image {index}"
    if not isinstance(image, np.ndarray):
        raise PredictorError(f"{where}: expected a numpy uint8 array of shape (H, W, 3), got {type(image).__name__}")
    if image.dtype != np.uint8:
        hint = {np.dtype(np.uint16): "scale 16-bit images to 8 bits, e.g. (img >> 8).astype(np.uint8)",
                np.dtype(np.bool_): "convert masks with img.astype(np.uint8) * 255"}.get(
            image.dtype, "scale to 0..255 first, then np.clip(img, 0, 255).astype(np.uint8)")
        raise PredictorError(f"{where}: expected dtype uint8 (0..255 pixels), got {image.dtype}; {hint}")
    if image.ndim == 4 and image.shape[-1] == 3:
        raise PredictorError(f"{where}: got a stacked array of shape {image.shape}; pass a batch as a list of "
                             f"(H, W, 3) images, e.g. list(images)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise PredictorError(f"{where}: expected shape (H, W, 3), got {image.shape}; convert grey/RGBA images to 3 channels")
    return np.ascontiguousarray(image)
