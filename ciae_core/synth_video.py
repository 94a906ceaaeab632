"""Synthetic sequences that make tracking hard (issue 14), in the look of :mod:`ciae_core.synth`.

:class:`TrackingSequence` scripts, on top of the textured stuff of :mod:`ciae_core.synth`, the
situations where trackers lose identities:

* **crossings**: pairs of same-class look-alikes (same shape and size, colours a few levels
  apart) whose paths cross inside the image at a chosen frame, one in front of the other, so
  the one behind is hidden for a few frames (and absent from the ground truth while less than
  ``min_visible`` of it shows) and comes out on the other side;
* **exits**: things that leave the image through a border, stay outside for a while and come back;
* **speed changes**: every thing's speed is piecewise constant and changes by a factor of 0.3-2.5
  at random frames (never within a few frames of a scripted crossing);
* **side by side**: pairs of look-alikes moving in parallel, touching;
* other things of random classes moving and bouncing inside the image.

Ground-truth thing ids are stable over the sequence (``4 + index`` of the thing, as
:class:`ciae_core.synth.SceneSequence`); stuff ids are 1..3. Trajectories are simulated once in
the constructor (frames ``0 .. num_frames-1``), so ``frame(t)`` can render frames in any order,
and everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import cv2
import numpy as np

from .synth import (SHAPES, SYNTH_CATEGORIES, Instance, SynthError, _check_size, _compose, _imwrite,
                    _sample_layout, categories_json, id_map_to_rgb, make_output_dirs)

_THING_BASE = {"disc": (205, 45, 40), "box": (30, 165, 170), "triangle": (225, 205, 45), "ring": (185, 45, 185)}
_NO_CHANGE_NEAR_CROSSING = 12  # frames around a scripted crossing without speed changes


class TrackingSequence:
    """A moving synthetic scene with scripted tracking difficulties (see the module docstring).

    Args:
        seed: int or sequence of ints for ``numpy.random.default_rng``.
        height, width: image size in pixels.
        num_frames: frames of the sequence (``frame(t)`` for ``0 <= t < num_frames``).
        crossings: number of look-alike pairs that cross (each at a random frame of the middle
            80 % of the sequence).
        exits: number of things that leave the image and come back.
        side_by_side: number of look-alike pairs moving in parallel.
        others: number of other things bouncing inside the image.
        speed: typical speed in px per frame (each thing draws 0.5-1.5 x this).
        speed_change_every: mean frames between two speed changes of a thing (0: never).
        min_size, max_size_frac: thing diameters between ``min_size`` px and ``max_size_frac``
            of the shorter image side.
        min_visible: a thing with less than this fraction of its area visible is not in the
            ground truth of that frame.
        noise_std: pixel noise std (0..255).

    ``events`` lists what was scripted: ``("cross", id_a, id_b, frame)``, ``("exit", id)``,
    ``("side_by_side", id_a, id_b)`` with ground-truth thing ids.
    """

    def __init__(self, seed, height: int = 320, width: int = 320, num_frames: int = 200, *, crossings: int = 2,
                 exits: int = 2, side_by_side: int = 1, others: int = 4, speed: float = 3.0,
                 speed_change_every: float = 60.0, min_size: int = 24, max_size_frac: float = 0.2,
                 min_visible: float = 0.2, noise_std: float = 6.0):
        self.height, self.width = _check_size(height, width)
        for name, v in (("num_frames", num_frames), ("crossings", crossings), ("exits", exits),
                        ("side_by_side", side_by_side), ("others", others)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "num_frames" else 0):
                raise SynthError(f"{name} must be an integer >= {1 if name == 'num_frames' else 0}, got {v!r}")
        if not (speed >= 0 and speed_change_every >= 0 and min_size >= 8 and 0 < max_size_frac <= 0.5
                and 0 <= min_visible < 1):
            raise SynthError("need speed >= 0, speed_change_every >= 0, min_size >= 8, 0 < max_size_frac <= 0.5 "
                             "and 0 <= min_visible < 1")
        self.seed, self.num_frames = seed, num_frames
        self.min_size, self.min_visible, self.noise_std = int(min_size), float(min_visible), float(noise_std)
        self.speed, self.speed_change_every = float(speed), float(speed_change_every)
        rng = np.random.default_rng(seed)
        self.layout = _sample_layout(rng, self.height)
        self.pan_speed = float(rng.uniform(-1.0, 1.0))
        self._max_size = max(self.min_size * 1.2, max_size_frac * min(self.height, self.width))
        self.instances: list[Instance] = []
        self.paths: list[np.ndarray] = []  # (num_frames, 2) centre per frame
        self.spins: list[float] = []
        self.events: list[tuple] = []
        for _ in range(others):
            self._add_mover(rng, self._random_look(rng), outside=False)
        for _ in range(exits):
            k = self._add_mover(rng, self._random_look(rng), outside=True)
            self.events.append(("exit", 4 + k))
        for _ in range(side_by_side):
            self._add_side_by_side(rng)
        for _ in range(crossings):
            self._add_crossing(rng)

    # -- looks ----------------------------------------------------------------------------------
    def _random_look(self, rng: np.random.Generator, shape: int | None = None) -> Instance:
        shape = int(rng.integers(len(SHAPES))) if shape is None else shape
        base = np.asarray(_THING_BASE[SHAPES[shape]], dtype=np.float64)
        color = tuple(int(v) for v in np.clip(base + rng.uniform(-30, 30, size=3), 0, 255))
        size = float(np.exp(rng.uniform(np.log(self.min_size * 1.1), np.log(self._max_size))))
        return Instance(shape=shape, cx=0.0, cy=0.0, size=size, angle=float(rng.uniform(0, 2 * np.pi)),
                        aspect=float(rng.uniform(0.7, 1.4)), color=color, texture=float(rng.uniform(0, 1)))

    @staticmethod
    def _look_alike(rng: np.random.Generator, inst: Instance) -> Instance:
        """Same class, size within 5 %, colour within 6 levels, similar pose and texture phase."""
        color = tuple(int(v) for v in np.clip(np.asarray(inst.color) + rng.integers(-6, 7, size=3), 0, 255))
        return replace(inst, size=inst.size * float(rng.uniform(0.95, 1.05)), color=color,
                       angle=inst.angle + float(rng.uniform(-0.3, 0.3)),
                       texture=(inst.texture + float(rng.uniform(-0.05, 0.05))) % 1.0)

    # -- motion ---------------------------------------------------------------------------------
    def _bounds(self, size: float, outside: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        r = size / 2
        if not outside:
            return np.array([r, r]), np.array([self.width - r, self.height - r])
        margin = r + self.speed * float(rng.uniform(8, 30))  # fully out for ~8-30 frames at the typical speed
        return np.array([-margin, -margin]), np.array([self.width + margin, self.height + margin])

    def _speed_events(self, rng: np.random.Generator, quiet: tuple[int, int] | None = None) -> dict[int, float]:
        if self.speed_change_every <= 0:
            return {}
        events = {}
        t = 0.0
        while True:
            t += float(rng.exponential(self.speed_change_every))
            if t >= self.num_frames:
                return events
            if quiet is None or not quiet[0] <= int(t) <= quiet[1]:
                events[int(t)] = float(rng.uniform(0.3, 2.5))

    def _simulate(self, anchor_t: int, anchor_p: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  factors: dict[int, float]) -> np.ndarray:
        """Centres ``(num_frames, 2)``: at ``anchor_t`` the thing is at ``anchor_p`` moving at ``v``
        (px/frame); forwards and backwards the velocity is reflected at ``lo``/``hi`` and its magnitude
        changes at the frames in ``factors`` (relative to the speed at the anchor)."""
        path = np.zeros((self.num_frames, 2))
        path[anchor_t] = anchor_p
        for direction in (1, -1):
            p, vel, scale = anchor_p.astype(np.float64).copy(), direction * v.astype(np.float64), 1.0
            t = anchor_t
            while 0 <= t + direction < self.num_frames:
                step_t = t if direction == 1 else t - 1  # the frame interval [step_t, step_t + 1]
                if step_t in factors:
                    scale = factors[step_t]
                p = p + vel * scale
                for ax in range(2):
                    if p[ax] < lo[ax]:
                        p[ax], vel[ax] = 2 * lo[ax] - p[ax], -vel[ax]
                    elif p[ax] > hi[ax]:
                        p[ax], vel[ax] = 2 * hi[ax] - p[ax], -vel[ax]
                t += direction
                path[t] = p
        return path

    def _velocity(self, rng: np.random.Generator, angle: float | None = None) -> np.ndarray:
        a = float(rng.uniform(0, 2 * np.pi)) if angle is None else angle
        mag = self.speed * float(rng.uniform(0.5, 1.5))
        return np.array([mag * math.cos(a), mag * math.sin(a)])

    def _append(self, inst: Instance, path: np.ndarray, rng: np.random.Generator) -> int:
        self.instances.append(inst)
        self.paths.append(path)
        self.spins.append(float(rng.uniform(-0.03, 0.03)))
        return len(self.instances) - 1

    def _add_mover(self, rng: np.random.Generator, inst: Instance, outside: bool) -> int:
        lo, hi = self._bounds(inst.size, False, rng)
        start = rng.uniform(lo, hi)
        lo, hi = self._bounds(inst.size, outside, rng)
        path = self._simulate(0, start, self._velocity(rng), lo, hi, self._speed_events(rng))
        return self._append(inst, path, rng)

    def _add_side_by_side(self, rng: np.random.Generator) -> None:
        a = self._random_look(rng)
        b = self._look_alike(rng, a)
        lo, hi = self._bounds(max(a.size, b.size) * 1.6, False, rng)
        centre, v = rng.uniform(lo, hi), self._velocity(rng)
        normal = np.array([-v[1], v[0]]) / max(np.linalg.norm(v), 1e-9)
        gap = 0.5 * (a.size + b.size) * float(rng.uniform(0.85, 1.0))  # touching or slightly overlapping
        factors = self._speed_events(rng)
        lo, hi = self._bounds(max(a.size, b.size), False, rng)
        ka = self._append(a, self._simulate(0, centre - normal * gap / 2, v, lo, hi, factors), rng)
        kb = self._append(b, self._simulate(0, centre + normal * gap / 2, v, lo, hi, factors), rng)
        self.events.append(("side_by_side", 4 + ka, 4 + kb))

    def _add_crossing(self, rng: np.random.Generator) -> None:
        a = self._random_look(rng)
        b = self._look_alike(rng, a)
        t_c = int(rng.integers(int(0.1 * self.num_frames), max(int(0.9 * self.num_frames), 1)))
        t_c = min(t_c, self.num_frames - 1)
        m = 0.25 * min(self.width, self.height)
        c = rng.uniform([m, m], [self.width - m, self.height - m])
        ang = float(rng.uniform(0, 2 * np.pi))
        va = self._velocity(rng, ang)
        vb = self._velocity(rng, ang + float(rng.uniform(np.pi / 3, 5 * np.pi / 3)))
        offset = (rng.uniform(-1, 1, size=2)) * 0.15 * a.size  # not exactly centre on centre
        quiet = (t_c - _NO_CHANGE_NEAR_CROSSING, t_c + _NO_CHANGE_NEAR_CROSSING)
        for inst, v, p in ((a, va, c), (b, vb, c + offset)):
            lo, hi = self._bounds(inst.size, False, rng)
            path = self._simulate(t_c, p, v, lo, hi, self._speed_events(rng, quiet))
            k = self._append(inst, path, rng)
        self.events.append(("cross", 4 + k - 1, 4 + k, t_c))

    # -- rendering ------------------------------------------------------------------------------
    def frame(self, t: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Frame ``t``: ``(image uint8 HxWx3 RGB, pan_ids int32 HxW, segments_info)`` as
        :meth:`ciae_core.synth.SceneSequence.frame`. Things later in ``instances`` are in front."""
        t = int(t)
        if not 0 <= t < self.num_frames:
            raise SynthError(f"frame {t} is outside the sequence (0..{self.num_frames - 1})")
        moved = [replace(inst, cx=float(path[t, 0]), cy=float(path[t, 1]), angle=inst.angle + spin * t)
                 for inst, path, spin in zip(self.instances, self.paths, self.spins)]
        layout = replace(self.layout, shift=self.pan_speed * t)
        rng = np.random.default_rng([*np.atleast_1d(self.seed).tolist(), t, 7919])
        return _compose(rng, layout, moved, self.height, self.width, self.min_size, self.min_visible,
                        self.noise_std, 0, instance_ids=[4 + k for k in range(len(moved))])


def write_tracking_sequence(out_dir: str, num_frames: int, height: int, width: int, seed: int = 0,
                            image_format: str = "png", fps: float = 30.0, **kwargs) -> str:
    """Write the frames of a :class:`TrackingSequence` as COCO panoptic (the layout of
    :func:`ciae_core.synth.write_dataset`: ``images/``, ``panoptic/``, ``panoptic.json``).

    ``panoptic.json``'s ``info`` records ``sequence: true``, ``fps`` (frame ``i`` is at ``i / fps``
    seconds), the seed and the scripted ``events``. Returns the JSON path.
    """
    if image_format not in ("png", "jpg"):
        raise SynthError(f"image format must be png or jpg, got {image_format!r}")
    if not (fps > 0 and math.isfinite(fps)):
        raise SynthError(f"fps must be > 0, got {fps!r}")
    seq = TrackingSequence(seed, height, width, num_frames, **kwargs)
    img_dir, pan_dir = make_output_dirs(out_dir)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    images, annotations = [], []
    for i in range(num_frames):
        image, pan, infos = seq.frame(i)
        _imwrite(os.path.join(img_dir, f"{i:06d}.{image_format}"), image, params)
        _imwrite(os.path.join(pan_dir, f"{i:06d}.png"), id_map_to_rgb(pan), [cv2.IMWRITE_PNG_COMPRESSION, 3])
        images.append({"id": i, "file_name": f"{i:06d}.{image_format}", "height": seq.height, "width": seq.width})
        annotations.append({"image_id": i, "file_name": f"{i:06d}.png",
                            "segments_info": [{k: v for k, v in s.items() if k != "isthing"} for s in infos]})
    doc = {"info": {"description": "ciae_ros synthetic tracking sequence", "seed": seed, "sequence": True,
                    "fps": float(fps), "events": [list(e) for e in seq.events]},
           "images": images, "annotations": annotations, "categories": categories_json(SYNTH_CATEGORIES)}
    json_path = os.path.join(out_dir, "panoptic.json")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    return json_path
