"""Synthetic panoptic scenes: a small, learnable, deterministic stand-in for COCO panoptic.

Each scene has three textured *stuff* regions (sky, wall, ground) separated by irregular
(sum-of-sinusoids) boundaries and a number of *thing* instances of four shape classes (disc,
box, triangle, ring). Things are placed in clusters of the same class, so many instances of one
class touch and overlap each other: exactly the situation instance-aware embeddings exist for.

Geometry is drawn first into an id map (painter's order, later instances occlude earlier ones);
instances that end up too occluded are removed, and only then is the image textured from the
final id map, so the image and the ground truth always agree pixel for pixel.

Everything is a pure function of the seed (``numpy.random.default_rng``), so the same seed gives
the same arrays and, through :func:`write_dataset`, byte-identical files.

``ciae-synth --out DIR --num N --size WIDTHxHEIGHT --seed S [--sequence]`` (:mod:`ciae_core.cli.synth`)
writes the COCO panoptic format (``images/``, ``panoptic/``, ``panoptic.json``) that
:class:`ciae_core.data.CocoPanopticDataset` reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Sequence

import cv2
import numpy as np

from ciae_core.user_input import quote

from .structures import CategoryInfo

logger = logging.getLogger(__name__)

#: Categories of the synthetic data set in training order: things first, then stuff.
#: Dataset ids are deliberately different from the training ids (0..6) so that code that mixes
#: the two up fails loudly in tests.
SYNTH_CATEGORIES: list[CategoryInfo] = [
    CategoryInfo(id=1, name="disc", isthing=True, color=(220, 40, 40)),
    CategoryInfo(id=2, name="box", isthing=True, color=(30, 170, 170)),
    CategoryInfo(id=3, name="triangle", isthing=True, color=(230, 210, 40)),
    CategoryInfo(id=4, name="ring", isthing=True, color=(190, 40, 190)),
    CategoryInfo(id=11, name="sky", isthing=False, color=(130, 180, 240)),
    CategoryInfo(id=12, name="wall", isthing=False, color=(140, 140, 135)),
    CategoryInfo(id=13, name="ground", isthing=False, color=(70, 130, 50)),
]
_THINGS = [c for c in SYNTH_CATEGORIES if c.isthing]
_STUFF = [c for c in SYNTH_CATEGORIES if not c.isthing]
SHAPES = ("disc", "box", "triangle", "ring")

# Mean RGB colour of each thing class' instances (per-instance jitter is added).
_THING_BASE = {"disc": (205, 45, 40), "box": (30, 165, 170), "triangle": (225, 205, 45), "ring": (185, 45, 185)}


class SynthError(ValueError):
    """A user-facing error of the synthetic generator (bad size, count, output dir)."""


@dataclass(frozen=True)
class Instance:
    """One thing instance: shape class index (into ``SHAPES``) and pose in pixels.

    ``size`` is the outer diameter; ``aspect`` stretches boxes; ``angle`` in radians; ``color``
    is the instance's RGB colour; ``texture`` a per-instance phase/period for the class texture.
    """

    shape: int
    cx: float
    cy: float
    size: float
    angle: float
    aspect: float
    color: tuple[int, int, int]
    texture: float


@dataclass(frozen=True)
class StuffLayout:
    """Two irregular horizontal boundaries: sky above ``top``, ground below ``bottom``, wall between.

    Each boundary is ``base * H + sum_k amp_k * sin(2*pi*freq_k * x / W + phase_k)``. A boundary
    with ``base`` < 0 (top) or > 1 (bottom) removes that region from the scene.
    """

    top: tuple[float, tuple[tuple[float, float, float], ...]]
    bottom: tuple[float, tuple[tuple[float, float, float], ...]]
    shift: float = 0.0  # horizontal offset of the boundaries in pixels (sequence mode pans it)


def _sample_boundary(rng: np.random.Generator, base: float, height: int) -> tuple[float, tuple]:
    waves = tuple((float(rng.uniform(0.01, 0.06) * height), float(rng.uniform(0.5, 4.0)),
                   float(rng.uniform(0, 2 * np.pi)))
                  for _ in range(3))
    return (base, waves)


def _sample_layout(rng: np.random.Generator, height: int) -> StuffLayout:
    top = float(rng.uniform(0.15, 0.45)) if rng.random() < 0.8 else -1.0
    bottom = float(rng.uniform(0.55, 0.85)) if rng.random() < 0.85 else 2.0
    return StuffLayout(top=_sample_boundary(rng, top, height), bottom=_sample_boundary(rng, bottom, height))


def _boundary_rows(boundary, height: int, width: int, shift: float) -> np.ndarray:
    base, waves = boundary
    x = np.arange(width, dtype=np.float64) + shift
    y = np.full(width, base * height)
    for amp, freq, phase in waves:
        y += amp * np.sin(2 * np.pi * freq * x / width + phase)
    return y


def _sample_instances(rng: np.random.Generator, height: int, width: int, max_instances: int,
                      min_size: float, max_size_frac: float) -> list[Instance]:
    """Clusters of same-class instances with log-uniform scale; members touch or overlap."""
    instances: list[Instance] = []
    small = min(height, width)
    max_size = max(min_size * 1.5, max_size_frac * small)
    num_groups = int(rng.integers(2, 6))
    for _ in range(num_groups):
        shape = int(rng.integers(len(SHAPES)))
        group_size = float(np.exp(rng.uniform(np.log(min_size * 1.2), np.log(max_size))))
        count = int(rng.integers(1, 7))
        gx, gy = rng.uniform(0, width), rng.uniform(0, height)
        for j in range(count):
            if len(instances) >= max_instances:
                return instances
            size = float(np.clip(group_size * rng.uniform(0.7, 1.3), min_size, max_size))
            if j == 0:
                cx, cy = gx, gy
            else:
                # Next to a random earlier member of the group, at 0.55-1.05 diameters: touching or overlapping.
                ref = instances[-int(rng.integers(1, j + 1))]
                dist = 0.5 * (ref.size + size) * rng.uniform(0.55, 1.05)
                a = rng.uniform(0, 2 * np.pi)
                cx, cy = ref.cx + dist * np.cos(a), ref.cy + dist * np.sin(a)
            base = np.array(_THING_BASE[SHAPES[shape]], dtype=np.float64)
            color = tuple(int(v) for v in np.clip(base + rng.uniform(-30, 30, size=3), 0, 255))
            instances.append(Instance(shape=shape, cx=float(cx), cy=float(cy), size=size,
                                      angle=float(rng.uniform(0, 2 * np.pi)), aspect=float(rng.uniform(0.6, 1.6)),
                                      color=color, texture=float(rng.uniform(0, 1))))
    return instances


_SHIFT = 4  # cv2 sub-pixel bits: smooth motion in sequence mode
_ONE = 1 << _SHIFT


def _draw_instance(id_map: np.ndarray, inst: Instance, value: int) -> None:
    """Rasterise ``inst`` into ``id_map`` (int32) with ``value`` (no anti-aliasing: it is a label map)."""
    name = SHAPES[inst.shape]
    r = inst.size / 2.0
    c = (int(round(inst.cx * _ONE)), int(round(inst.cy * _ONE)))
    color = (int(value),)
    if name == "disc":
        cv2.circle(id_map, c, int(round(r * _ONE)), color, thickness=-1, lineType=cv2.LINE_8, shift=_SHIFT)
    elif name == "ring":
        # Annulus: outer radius r, width 0.35 r (at least 5 px) so the hole shows what is behind.
        t = max(5.0, 0.35 * r)
        cv2.circle(id_map, c, int(round((r - t / 2) * _ONE)), color, thickness=int(round(t)),
                   lineType=cv2.LINE_8, shift=_SHIFT)
    else:
        if name == "box":
            w, h = inst.size * math.sqrt(inst.aspect) / 1.2, inst.size / math.sqrt(inst.aspect) / 1.2
            corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
        else:  # triangle
            ang = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) - np.pi / 2
            corners = np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)
        ca, sa = math.cos(inst.angle), math.sin(inst.angle)
        rot = corners @ np.array([[ca, sa], [-sa, ca]])
        pts = np.round((rot + [inst.cx, inst.cy]) * _ONE).astype(np.int32)
        cv2.fillPoly(id_map, [pts], color, lineType=cv2.LINE_8, shift=_SHIFT)


def _stuff_map(layout: StuffLayout, height: int, width: int) -> np.ndarray:
    """(H, W) int index into ``_STUFF`` (0 sky, 1 wall, 2 ground)."""
    rows = np.arange(height, dtype=np.float64)[:, None]
    top = _boundary_rows(layout.top, height, width, layout.shift)[None, :]
    bottom = _boundary_rows(layout.bottom, height, width, layout.shift)[None, :]
    stuff = np.ones((height, width), dtype=np.int32)
    stuff[rows < top] = 0
    stuff[rows >= np.maximum(bottom, top)] = 2
    return stuff


def _thing_id_map(instances: Sequence[Instance], height: int, width: int) -> np.ndarray:
    id_map = np.zeros((height, width), dtype=np.int32)
    for k, inst in enumerate(instances):
        _draw_instance(id_map, inst, k + 1)
    return id_map


def _dense_id_stats(id_map: np.ndarray, num_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count and tight ``(x0, y0, x1, y1)`` box (inclusive) of every id ``0..num_ids-1`` of a
    map with small non-negative ids, in three scatter passes (no per-id loop over the pixels).
    Ids without pixels get area 0 and box ``(-1, -1, -1, -1)``."""
    h, w = id_map.shape
    areas = np.bincount(id_map.ravel(), minlength=num_ids)[:num_ids]
    in_row = np.zeros((num_ids, h), dtype=bool)
    in_row[id_map, np.arange(h)[:, None]] = True
    in_col = np.zeros((num_ids, w), dtype=bool)
    in_col[id_map, np.arange(w)[None, :]] = True
    y0, y1 = in_row.argmax(1), h - 1 - in_row[:, ::-1].argmax(1)
    x0, x1 = in_col.argmax(1), w - 1 - in_col[:, ::-1].argmax(1)
    boxes = np.stack([x0, y0, x1, y1], axis=1)
    boxes[areas == 0] = -1
    return areas, boxes


def _visible_instances(instances: Sequence[Instance], height: int, width: int, min_size: int,
                       min_visible: float) -> tuple[np.ndarray, list[int]]:
    """Draw, then drop instances whose visible part is smaller than ``min_size`` px in width or
    height or less than ``min_visible`` of their full area (heavily occluded or cut by the border).

    Returns the thing id map over the kept instances (values = 1 + index into ``kept``) and ``kept``.
    Removing an instance only ever un-occludes others, so one pass and a redraw suffice.
    """
    id_map = _thing_id_map(instances, height, width)
    n = len(instances)
    if n == 0:
        return id_map, []
    visible, boxes = _dense_id_stats(id_map, n + 1)
    visible, boxes = visible[1:], boxes[1:]
    kept = []
    for k, inst in enumerate(instances):
        if visible[k] == 0:
            continue
        # Full area of the unoccluded shape (drawn alone on a canvas around it; cheap, small).
        pad = int(inst.size) + 4
        canvas = np.zeros((2 * pad, 2 * pad), dtype=np.int32)
        _draw_instance(canvas, replace(inst, cx=inst.cx - math.floor(inst.cx) + pad,
                                       cy=inst.cy - math.floor(inst.cy) + pad), 1)
        full_area = int(canvas.sum())
        x0, y0, x1, y1 = boxes[k]
        if x1 - x0 + 1 < min_size or y1 - y0 + 1 < min_size:
            continue
        if visible[k] < min_visible * full_area:
            continue
        kept.append(k)
    if len(kept) < n:
        id_map = _thing_id_map([instances[k] for k in kept], height, width)
    return id_map, kept


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid bicubically upsampled."""
    gh, gw = max(2, height // cell + 2), max(2, width // cell + 2)
    coarse = rng.uniform(-1, 1, size=(gh, gw)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _stuff_planes(rng: np.random.Generator, stuff: np.ndarray, shift: float) -> list[np.ndarray]:
    """R, G, B planes ``(H, W)`` float32 of the stuff regions (``stuff``: 0 sky, 1 wall, 2 ground).

    Works on contiguous 2-D planes (numpy is slow on a broadcast trailing axis of 3)."""
    height, width = stuff.shape
    n_sky, n_wall, n_ground = (_smooth_noise(rng, height, width, cell) for cell in (24, 16, 12))
    t = (np.arange(height, dtype=np.float32) / max(1, height - 1))[:, None]
    # Wall: bricks of 10 x 22 px with dark mortar lines, staggered every other course.
    rows = np.arange(height)
    cols = np.floor(np.arange(width) + shift).astype(np.int64)
    col_mortar = np.stack([(cols % 22) < 2, ((cols + 11) % 22) < 2])  # (2, W): even / odd course
    mortar = ((rows % 10) < 2)[:, None] | col_mortar[(rows // 10) % 2]
    brick = np.where(mortar, np.float32(0.55), np.float32(1.0))
    ground_mod = 1 + np.float32(0.25) * n_ground  # ground: green with blotches
    is_sky, is_wall = stuff == 0, stuff == 1
    planes = []
    for top, bottom, wall, ground in zip((95, 150, 230), (185, 210, 245), (150, 145, 140), (75, 135, 50)):
        sky = (top * (1 - t) + bottom * t) + 12 * n_sky  # sky: vertical gradient, faint clouds
        planes.append(np.where(is_sky, sky, np.where(is_wall, (wall + 10 * n_wall) * brick, ground * ground_mod)))
    return planes


def _texture_image(rng: np.random.Generator, thing_map: np.ndarray, instances: Sequence[Instance],
                   stuff: np.ndarray, shift: float, noise_std: float) -> np.ndarray:
    """RGB uint8 image of the scene given its final thing id map and stuff index map.

    Thing textures are evaluated on the thing pixels only (1-D per-pixel arrays via lookup tables
    indexed by the id map): colour x shading (light from the top left, darker rim) x class pattern
    (box stripes, ring checks, disc rings, plain triangle), and a dark 1-px outline on the inner
    side of every instance boundary, also between touching instances of the same class: the
    visual cue that separates them.
    """
    height, width = thing_map.shape
    planes = _stuff_planes(rng, stuff, shift)
    if instances:
        flat = thing_map.ravel()
        idx = np.flatnonzero(flat)
        k = flat[idx]
        yy = (idx // width).astype(np.float32)
        xx = (idx % width).astype(np.float32)

        def lut(values):
            return np.asarray([0.0] + list(values), dtype=np.float32)[k]

        size = lut(i.size for i in instances)
        dx, dy = (xx - lut(i.cx for i in instances)) / size, (yy - lut(i.cy for i in instances)) / size
        ang, phase = lut(i.angle for i in instances), lut(i.texture for i in instances)
        shape = np.asarray([-1] + [i.shape for i in instances], dtype=np.int32)[k]
        rad = np.hypot(dx, dy)
        shade = 1.0 + 0.35 * (-dx - dy) - 0.5 * np.clip(rad - 0.3, 0, None)
        ca, sa = np.cos(ang), np.sin(ang)
        u, v = dx * ca + dy * sa, -dx * sa + dy * ca
        pattern = np.ones_like(shade)
        sel = shape == SHAPES.index("box")
        pattern[sel] = 1.0 + 0.18 * np.sign(np.sin(2 * np.pi * (u[sel] * 4 + phase[sel])))
        sel = shape == SHAPES.index("ring")
        pattern[sel] = 1.0 + 0.15 * np.sign(np.sin(2 * np.pi * u[sel] * 5) * np.sin(2 * np.pi * v[sel] * 5))
        sel = shape == SHAPES.index("disc")
        pattern[sel] = 1.0 + 0.12 * np.cos(2 * np.pi * (rad[sel] * 3 + phase[sel]))
        edge = np.zeros_like(thing_map, dtype=bool)
        edge[:-1, :] |= thing_map[:-1, :] != thing_map[1:, :]
        edge[1:, :] |= thing_map[1:, :] != thing_map[:-1, :]
        edge[:, :-1] |= thing_map[:, :-1] != thing_map[:, 1:]
        edge[:, 1:] |= thing_map[:, 1:] != thing_map[:, :-1]
        factor = shade * pattern * np.where(edge.ravel()[idx], np.float32(0.45), np.float32(1.0))
        colors = np.asarray([(0, 0, 0)] + [i.color for i in instances], dtype=np.float32)
        for c in range(3):
            planes[c].ravel()[idx] = colors[k, c] * factor
    img = cv2.merge(planes)
    if noise_std > 0:
        # Uniform noise with the requested std (a Gaussian draw costs 5x more; indistinguishable here).
        noise = rng.random(img.shape, dtype=np.float32)
        img += (noise - np.float32(0.5)) * np.float32(noise_std * math.sqrt(12.0))
    return cv2.convertScaleAbs(np.maximum(img, 0, out=img))  # round half to even, saturate at 255


def _compose(rng: np.random.Generator, layout: StuffLayout, instances: Sequence[Instance], height: int, width: int,
             min_size: int, min_visible: float, noise_std: float, void_border: int,
             instance_ids: Sequence[int] | None = None):
    thing_map, kept = _visible_instances(instances, height, width, min_size, min_visible)
    kept_instances = [instances[k] for k in kept]
    stuff = _stuff_map(layout, height, width)
    image = _texture_image(rng, thing_map, kept_instances, stuff, layout.shift, noise_std)

    # Panoptic ids: stuff regions get ids 1..3 by stuff class; thing k gets an id after them
    # (or its stable track id in sequence mode).
    pan = np.zeros((height, width), dtype=np.int32)
    stuff_ids = [1, 2, 3]
    if instance_ids is None:
        thing_ids = [len(stuff_ids) + 1 + j for j in range(len(kept))]
    else:
        thing_ids = [int(instance_ids[k]) for k in kept]
    pan[:] = np.asarray(stuff_ids, dtype=np.int32)[stuff]
    if kept:
        lut = np.asarray([0] + thing_ids, dtype=np.int32)
        pan = np.where(thing_map > 0, lut[thing_map], pan)
    if void_border > 0:
        edge = np.zeros(pan.shape, dtype=bool)
        edge[:-1, :] |= pan[:-1, :] != pan[1:, :]
        edge[:, :-1] |= pan[:, :-1] != pan[:, 1:]
        if void_border > 1:
            edge = cv2.dilate(edge.astype(np.uint8), np.ones((void_border, void_border), np.uint8)).astype(bool)
        pan[edge] = 0

    meta = {stuff_ids[s]: _STUFF[s] for s in range(3)}
    meta.update({thing_ids[j]: _THINGS[kept_instances[j].shape] for j in range(len(kept))})
    segments_info = _segments_info(pan, meta)
    return image, pan, segments_info


def _segments_info(pan: np.ndarray, meta: dict[int, CategoryInfo]) -> list[dict]:
    """COCO ``segments_info`` (area, xywh bbox from the pixels) for every id present in ``pan``, by id."""
    areas, boxes = _dense_id_stats(pan, max(meta) + 1)
    infos = []
    for seg_id in sorted(meta):
        if seg_id == 0 or areas[seg_id] == 0:
            continue
        cat = meta[seg_id]
        x0, y0, x1, y1 = (int(v) for v in boxes[seg_id])
        infos.append({"id": int(seg_id), "category_id": int(cat.id), "iscrowd": 0, "isthing": bool(cat.isthing),
                      "area": int(areas[seg_id]), "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1]})
    return infos


def render_scene(seed, height: int = 320, width: int = 320, *, max_instances: int = 18, min_size: int = 16,
                 max_size_frac: float = 0.4, min_visible: float = 0.3, noise_std: float = 6.0,
                 void_border: int = 0) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Render one random panoptic scene.

    Args:
        seed: int or sequence of ints for ``numpy.random.default_rng`` (same seed → same output).
        height, width: image size in pixels.
        max_instances: cap on the number of thing instances drawn (before occlusion culling).
        min_size: smallest instance diameter; instances whose visible part is narrower or
            shorter than this are removed (decision: 16 px keeps every instance detectable at
            stride 8 of an FPN).
        max_size_frac: largest instance diameter as a fraction of ``min(height, width)``.
        min_visible: instances with less than this fraction of their area visible are removed.
        noise_std: std of the additive Gaussian pixel noise (0..255 scale).
        void_border: if > 0, pixels within this many px of any segment boundary are void (0) in
            the ground truth (mimics the unlabeled seams of real annotations); 0 = no void.

    Returns:
        image: ``(H, W, 3)`` uint8 RGB.
        pan_ids: ``(H, W)`` int32 segment ids, 0 = void.
        segments_info: one dict per id present: ``id, category_id, iscrowd, isthing, area, bbox``
            (``bbox`` = x, y, w, h), ordered by id; stuff first (ids 1..3), then things.
    """
    height, width = _check_size(height, width)
    rng = np.random.default_rng(seed)
    layout = _sample_layout(rng, height)
    instances = _sample_instances(rng, height, width, max_instances, float(min_size), max_size_frac)
    return _compose(rng, layout, instances, height, width, min_size, min_visible, noise_std, void_border)


def _check_size(height: int, width: int) -> tuple[int, int]:
    height, width = int(height), int(width)
    if height < 32 or width < 32:
        raise SynthError(f"image size must be at least 32x32, got {width}x{height} (WIDTHxHEIGHT)")
    return height, width


class SceneSequence:
    """A scene whose thing instances move smoothly (constant velocity, bouncing at the borders,
    slow rotation) and whose stuff boundaries pan slowly, for the camera demo.

    ``frame(t)`` is a pure function of ``(seed, t)``: frames can be rendered in any order.
    Segment ids of things are stable track ids over the whole sequence (``4 + track index``);
    stuff ids are 1..3 as in :func:`render_scene`.
    """

    def __init__(self, seed, height: int = 320, width: int = 320, *, num_instances: int = 10,
                 speed: float = 2.0, min_size: int = 16, noise_std: float = 6.0):
        self.height, self.width = _check_size(height, width)
        self.seed = seed
        self.min_size = int(min_size)
        self.noise_std = float(noise_std)
        rng = np.random.default_rng(seed)
        self.layout = _sample_layout(rng, self.height)
        self.instances = _sample_instances(rng, self.height, self.width, num_instances, float(min_size), 0.3)
        n = len(self.instances)
        ang = rng.uniform(0, 2 * np.pi, size=n)
        mag = rng.uniform(0.3, 1.0, size=n) * speed
        self.velocity = np.stack([mag * np.cos(ang), mag * np.sin(ang)], axis=1)  # px / frame
        self.spin = rng.uniform(-0.05, 0.05, size=n)  # rad / frame
        self.pan_speed = float(rng.uniform(-1.0, 1.0))  # px / frame of the stuff boundaries

    @staticmethod
    def _bounce(p0: np.ndarray, v: np.ndarray, t: float, lo: float, hi: float) -> np.ndarray:
        """Position at time t of a point moving at v inside [lo, hi], reflected at the ends."""
        span = max(hi - lo, 1e-6)
        q = np.mod(p0 - lo + v * t, 2 * span)
        return lo + np.where(q > span, 2 * span - q, q)

    def frame(self, t: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Frame ``t`` (int >= 0): ``(image uint8 HxWx3 RGB, pan_ids int32 HxW, segments_info)``."""
        t = int(t)
        moved = []
        for k, inst in enumerate(self.instances):
            r = inst.size / 2
            cx = float(self._bounce(np.float64(inst.cx), self.velocity[k, 0], t, r, self.width - r))
            cy = float(self._bounce(np.float64(inst.cy), self.velocity[k, 1], t, r, self.height - r))
            moved.append(replace(inst, cx=cx, cy=cy, angle=inst.angle + self.spin[k] * t))
        layout = replace(self.layout, shift=self.pan_speed * t)
        rng = np.random.default_rng([*np.atleast_1d(self.seed).tolist(), t, 7919])
        return _compose(rng, layout, moved, self.height, self.width, self.min_size, 0.1, self.noise_std, 0,
                        instance_ids=[4 + k for k in range(len(moved))])


# --------------------------------------------------------------------------------------------
# Writing the COCO panoptic format
# --------------------------------------------------------------------------------------------

def id_map_to_rgb(pan_ids: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG encoding: ``id = R + 256 G + 256^2 B`` → ``(H, W, 3)`` uint8 RGB."""
    ids = np.asarray(pan_ids, dtype=np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256 ** 3:
        raise ValueError("panoptic ids must be in [0, 2^24)")
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)


def categories_json(categories: Sequence[CategoryInfo]) -> list[dict]:
    """``categories`` entries of a COCO panoptic JSON (``isthing`` as 0/1, ``color`` RGB)."""
    return [{"id": c.id, "name": c.name, "supercategory": "thing" if c.isthing else "stuff",
             "isthing": int(c.isthing), "color": list(c.color)} for c in categories]


def _imwrite(path: str, rgb: np.ndarray, params: Sequence[int] = ()) -> None:
    ok, buf = cv2.imencode(os.path.splitext(path)[1], np.ascontiguousarray(rgb[..., ::-1]), list(params))
    if not ok:
        raise SynthError(f"could not encode {path}")
    with open(path, "wb") as f:
        f.write(buf.tobytes())


def _write_item(job) -> tuple[int, list[dict]]:
    """Render and write item ``i`` (a scene or a sequence frame); returns ``(i, segments_info)``."""
    i, out_dir, height, width, seed, sequence, image_format, render_kwargs = job
    if sequence:
        image, pan, infos = SceneSequence(seed, height, width).frame(i)
    else:
        image, pan, infos = render_scene((seed, i), height, width, **render_kwargs)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    _imwrite(os.path.join(out_dir, "images", f"{i:06d}.{image_format}"), image, params)
    _imwrite(os.path.join(out_dir, "panoptic", f"{i:06d}.png"), id_map_to_rgb(pan), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    return i, [{k: v for k, v in s.items() if k != "isthing"} for s in infos]



def make_output_dirs(out_dir: str) -> tuple[str, str]:
    """``out_dir/images`` and ``out_dir/panoptic``, created if needed (:class:`SynthError` if not)."""
    img_dir, pan_dir = os.path.join(out_dir, "images"), os.path.join(out_dir, "panoptic")
    try:
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(pan_dir, exist_ok=True)
    except OSError as e:
        raise SynthError(f"cannot create output directory {out_dir}: {e.strerror}") from None
    return img_dir, pan_dir


def write_dataset(out_dir: str, num: int, height: int, width: int, seed: int = 0, sequence: bool = False,
                  image_format: str = "png", num_workers: int = 0, **render_kwargs) -> str:
    """Write ``num`` scenes (or ``num`` frames of one :class:`SceneSequence`) as COCO panoptic.

    Layout: ``out_dir/images/{i:06d}.{png|jpg}``, ``out_dir/panoptic/{i:06d}.png``,
    ``out_dir/panoptic.json``. Scene ``i`` uses seed ``(seed, i)``. Returns the JSON path.
    Decision: images default to PNG (lossless; JPEG artefacts would blur the 1-px outlines that
    separate touching instances); ``image_format="jpg"`` (quality 95) makes files ~5x smaller.
    ``num_workers`` > 1 renders in that many processes (the files are the same).
    """
    if num < 1:
        raise SynthError(f"--num must be >= 1, got {num}")
    if image_format not in ("png", "jpg"):
        raise SynthError(f"image format must be png or jpg, got {quote(image_format)}")
    height, width = _check_size(height, width)
    make_output_dirs(out_dir)
    jobs = [(i, out_dir, height, width, seed, sequence, image_format, render_kwargs) for i in range(num)]
    if num_workers > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
            done = pool.map(_write_item, jobs, chunksize=max(1, num // (8 * num_workers)))
    else:
        done = [_write_item(job) for job in jobs]
    images = [{"id": i, "file_name": f"{i:06d}.{image_format}", "height": height, "width": width} for i, _ in done]
    annotations = [{"image_id": i, "file_name": f"{i:06d}.png", "segments_info": infos} for i, infos in done]
    doc = {"info": {"description": "ciae_ros synthetic panoptic scenes", "seed": seed, "sequence": bool(sequence)},
           "images": images, "annotations": annotations, "categories": categories_json(SYNTH_CATEGORIES)}
    json_path = os.path.join(out_dir, "panoptic.json")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    return json_path
