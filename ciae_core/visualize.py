"""Colour overlays of panoptic results for people to look at (no ROS).

One renderer for every picture we show: the node's ``panoptic/overlay`` (through
``ciae_ros.conversions``), ``ciae-predict --vis``, ``ciae-bag`` and the demo. An overlay is the
image blended with one colour per segment, 1-px white outlines between segments, and a label per
segment drawn as detection viewers do (a small filled box with the category name, ``#track`` when
tracked, and the score where it fits).

Palette decisions:

* **Categorical, not the model's colours.** A category's base hue comes from its position in the
  model's category list, spread over the hue circle with a stride close to ``n / golden ratio``, so
  neighbouring categories (often related classes) get far-apart hues and any two categories differ.
  The model's own ``CategoryInfo.color`` is not used: for the shipped synthetic model it equals the
  synthetic scene's colours, and an overlay in the scene's own colours looks like the input
  (mean difference 9/255 on a demo frame). ``HUE_OFFSET`` turns the circle so that none of those
  scene colours coincides with its class's overlay colour.
* **Things saturated, stuff muted**: things ``(S, V) = (0.85, 0.95)``, stuff ``(0.45, 0.80)``, so
  objects stand out against the regions behind them.
* **Instances get shades**: a thing instance takes one of :data:`SHADES` (hue shift, saturation and
  value factors) of its category's colour. An instance with a ``track_id > 0`` takes shade
  ``track_id * 5 mod 12`` (stable for the track in every frame; 12 consecutive track ids of a
  category all differ); untracked instances take the shades not used by tracked instances of their
  category in that frame, in order of segment id (distinct for up to 12 instances per category).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import cv2
import numpy as np

from ciae_core.structures import CategoryInfo, PanopticResult, Segment

HUE_OFFSET = 0.5
THING_SV = (0.85, 0.95)
STUFF_SV = (0.45, 0.80)
# (hue shift in turns, saturation factor, value factor); the first ones are the most distinct
SHADES: tuple[tuple[float, float, float], ...] = (
    (0.0, 1.0, 1.0), (0.0, 1.0, 0.55), (0.05, 0.45, 1.0), (-0.05, 1.0, 0.78),
    (0.05, 1.0, 0.40), (-0.05, 0.45, 0.92), (0.0, 0.65, 0.70), (0.08, 1.0, 0.95),
    (-0.08, 1.0, 0.62), (0.0, 0.30, 1.0), (0.08, 0.60, 0.55), (-0.08, 0.70, 1.0),
)
TRACK_STRIDE = 5  # coprime with len(SHADES): consecutive track ids walk through every shade
OUTLINE_BGR = (255, 255, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _category_ids(categories: Iterable[CategoryInfo | int] | None) -> list[int]:
    if categories is None:
        return []
    return [int(c.id) if isinstance(c, CategoryInfo) else int(c) for c in categories]


def _stride(n: int) -> int:
    """Step through ``n`` palette slots: near ``n / golden ratio`` and coprime with ``n``."""
    if n < 3:
        return 1
    s = max(1, round(n / ((1 + 5 ** 0.5) / 2)))
    while math.gcd(s, n) != 1:
        s += 1
    return s


def category_hues(categories: Iterable[CategoryInfo | int] | None) -> dict[int, float]:
    """Category id -> base hue in turns ``[0, 1)``, by position in the model's category list.

    ``categories``: the model's categories (``CategoryInfo`` or ids, in the model's order; a dict
    keyed by category id works too). Slot ``i`` of ``n`` gets hue ``HUE_OFFSET + (i * s mod n) / n``
    with ``s`` from :func:`_stride`, so every category differs from every other by at least ``1/n``.
    """
    ids = _category_ids(categories)
    n, s = len(ids), _stride(len(ids))
    return {cid: (HUE_OFFSET + ((i * s) % n) / n) % 1.0 for i, cid in enumerate(ids)}


def _hue_of(category_id: int, hues: dict[int, float]) -> float:
    hue = hues.get(category_id)
    if hue is None:  # a category outside the list: a fixed hue from its id (golden-ratio walk)
        hue = (HUE_OFFSET + category_id * 0.6180339887) % 1.0
    return hue


def _rgb(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, min(max(sat, 0.0), 1.0), min(max(val, 0.0), 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def shade_color(hue: float, isthing: bool, shade: int = 0) -> tuple[int, int, int]:
    """RGB colour of shade ``shade`` of a category with base ``hue`` (stuff ignores the shade)."""
    if not isthing:
        return _rgb(hue, *STUFF_SV)
    dh, fs, fv = SHADES[shade % len(SHADES)]
    return _rgb(hue + dh, THING_SV[0] * fs, THING_SV[1] * fv)


def category_colors(categories: Sequence[CategoryInfo]) -> dict[int, tuple[int, int, int]]:
    """Category id -> the RGB base colour the overlay uses for it (shade 0; what
    ``panoptic/categories`` advertises as the display colour)."""
    hues = category_hues(categories)
    return {c.id: shade_color(hues[c.id], c.isthing) for c in categories}


def track_id(seg: Segment) -> int:
    """The segment's track id (0 = not tracked)."""
    return int(getattr(seg, "track_id", 0) or 0)


def segment_colors(segments: Sequence[Segment], categories: Iterable[CategoryInfo | int] | None = None
                   ) -> dict[int, tuple[int, int, int]]:
    """Segment id -> RGB display colour (palette rules in the module docstring)."""
    hues = category_hues(categories)
    shades: dict[int, int] = {}
    used: dict[int, set[int]] = {}
    for s in segments:
        if s.isthing and track_id(s) > 0:
            shades[s.id] = (track_id(s) * TRACK_STRIDE) % len(SHADES)
            used.setdefault(s.category_id, set()).add(shades[s.id])
    for s in sorted(segments, key=lambda seg: seg.id):
        if s.isthing and s.id not in shades:
            taken = used.setdefault(s.category_id, set())
            free = [k for k in range(len(SHADES)) if k not in taken]
            shades[s.id] = free[0] if free else s.id % len(SHADES)
            taken.add(shades[s.id])
    return {s.id: shade_color(_hue_of(s.category_id, hues), s.isthing, shades.get(s.id, 0)) for s in segments}


def segment_boundaries(id_map: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels whose right or lower neighbour belongs to another segment."""
    b = np.zeros(id_map.shape, bool)
    b[:, :-1] |= id_map[:, :-1] != id_map[:, 1:]
    b[:-1, :] |= id_map[:-1, :] != id_map[1:, :]
    return b


# ----------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Label:
    """One label to draw: ``text`` in a filled box ``(x0, y0, x1, y1)`` (inclusive pixel corners)."""

    segment_id: int
    text: str
    box: tuple[int, int, int, int]
    color: tuple[int, int, int]  # RGB fill (the segment's colour)


def font_scale(height: int, width: int) -> float:
    """Hershey font scale for an image: about 10 px tall text at 640x480, never below 0.35."""
    return float(min(1.2, max(0.35, min(height, width) / 1000.0)))


def _interior_point(id_map: np.ndarray, seg: Segment, step: int = 4) -> tuple[int, int]:
    """A pixel deep inside a segment, ``(x, y)``: the maximum of its distance transform, computed on
    every ``step``-th pixel of its box (a label position needs no more; ~16x cheaper)."""
    x, y, w, h = seg.bbox
    sub = id_map[y:y + h:step, x:x + w:step] == seg.id
    mask = np.zeros((sub.shape[0] + 2, sub.shape[1] + 2), np.uint8)  # a frame: the box edge is outside
    mask[1:-1, 1:-1] = sub
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    iy, ix = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return x + (int(ix) - 1) * step, y + (int(iy) - 1) * step


def _fit(x0: int, y0: int, bw: int, bh: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Shift a ``bw x bh`` box at ``(x0, y0)`` so that it lies inside the image."""
    x0 = min(max(0, x0), max(0, width - bw))
    y0 = min(max(0, y0), max(0, height - bh))
    return x0, y0, min(width, x0 + bw) - 1, min(height, y0 + bh) - 1


def _overlaps(a, b) -> bool:
    return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])


def layout_labels(result: PanopticResult, colors: dict[int, tuple[int, int, int]], scale: float | None = None,
                  min_area_frac: float = 0.0015) -> list[Label]:
    """Where the labels go: one per segment that has room, none overlapping another.

    Text: the category name, ``#track_id`` when tracked, and the score when the full text fits
    the segment's box width (else the name alone, when it fits twice the box width). Segments
    smaller than ``min_area_frac`` of the image (and at least 64 px), or lower than the text, get
    no label. Things are labelled at their box's top-left corner, stuff at its most interior pixel;
    every box is shifted inside the image. Order of precedence: things by score, then stuff by
    area; a label overlapping an earlier one is dropped.
    """
    id_map = np.asarray(result.id_map)
    height, width = id_map.shape
    scale = font_scale(height, width) if scale is None else scale
    pad = max(1, int(round(3 * scale)))
    min_area = max(64, int(min_area_frac * height * width))
    order = sorted((s for s in result.segments if s.isthing), key=lambda s: -s.score) + \
        sorted((s for s in result.segments if not s.isthing), key=lambda s: -s.area)
    placed: list[Label] = []
    for seg in order:
        (_, th), base = cv2.getTextSize("Ag", FONT, scale, 1)
        box_h = th + base + 2 * pad
        if seg.area < min_area or seg.bbox[3] < box_h:
            continue
        name = seg.label + (f" #{track_id(seg)}" if track_id(seg) > 0 else "")
        text = f"{name} {min(max(seg.score, 0.0), 1.0):.2f}"
        tw = cv2.getTextSize(text, FONT, scale, 1)[0][0]
        if tw + 2 * pad > seg.bbox[2]:
            text, tw = name, cv2.getTextSize(name, FONT, scale, 1)[0][0]
            if tw + 2 * pad > 2 * seg.bbox[2]:
                continue
        box_w = tw + 2 * pad
        if seg.isthing:
            x0, y0 = seg.bbox[0], seg.bbox[1]
        else:
            cx, cy = _interior_point(id_map, seg)
            x0, y0 = cx - box_w // 2, cy - box_h // 2
        box = _fit(x0, y0, box_w, box_h, width, height)
        if any(_overlaps(box, p.box) for p in placed):
            continue
        placed.append(Label(seg.id, text, box, colors[seg.id]))
    return placed


def draw_labels(image_bgr: np.ndarray, labels: Sequence[Label], scale: float) -> None:
    """Draw ``labels`` into ``image_bgr`` in place: filled box in the segment's colour, text in
    black or white, whichever contrasts more with the fill."""
    pad = max(1, int(round(3 * scale)))
    for lab in labels:
        r, g, b = lab.color
        x0, y0, x1, y1 = lab.box
        cv2.rectangle(image_bgr, (x0, y0), (x1, y1), (b, g, r), thickness=-1)
        ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
        base = cv2.getTextSize("Ag", FONT, scale, 1)[1]
        cv2.putText(image_bgr, lab.text, (x0 + pad, y1 - pad - base + 1), FONT, scale, ink, 1, cv2.LINE_AA)


# ----------------------------------------------------------------------------------------------
# The overlay
# ----------------------------------------------------------------------------------------------

def render_overlay(image_rgb: np.ndarray, result: PanopticResult,
                   categories: Iterable[CategoryInfo | int] | None = None, alpha: float = 0.5, *,
                   labels: bool = True) -> np.ndarray:
    """Colour overlay for display, ``(H, W, 3)`` uint8 **BGR** (the ``bgr8`` encoding rviz shows,
    and what ``cv2.imwrite`` expects).

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB, the image ``result`` was computed on.
        result: its panoptic result (``id_map`` ``(H, W)``).
        categories: the model's categories (``CategoryInfo`` or ids, in the model's order; a dict
            keyed by category id works too): they fix each category's palette slot. ``None``: hues
            from the category ids.
        alpha: segment pixels are ``(1 - alpha) * image + alpha * colour``; void pixels keep the image.
        labels: draw the segment labels (:func:`layout_labels`).
    """
    id_map = np.asarray(result.id_map)
    if id_map.shape != image_rgb.shape[:2]:
        raise ValueError(f"id map {id_map.shape[1]}x{id_map.shape[0]} and image "
                         f"{image_rgb.shape[1]}x{image_rgb.shape[0]} (WIDTHxHEIGHT) differ in size")
    colors = segment_colors(result.segments, categories)
    lut = np.zeros((max(colors, default=0) + 1, 3), np.uint8)
    for sid, (r, g, b) in colors.items():
        lut[sid] = (b, g, r)  # BGR table
    ids = np.clip(id_map, 0, lut.shape[0] - 1)
    colour = np.take(lut, ids, axis=0)
    # OpenCV for the per-pixel work: numpy's masked copies cost ~10x more at 640x480
    out = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR)
    blended = cv2.addWeighted(out, 1.0 - float(alpha), colour, float(alpha), 0.0)
    cv2.copyTo(blended, (ids > 0).view(np.uint8), out)
    cv2.copyTo(np.full_like(out, 255), segment_boundaries(id_map).view(np.uint8), out)
    if labels and result.segments:
        scale = font_scale(*id_map.shape)
        draw_labels(out, layout_labels(result, colors, scale), scale)
    return out
