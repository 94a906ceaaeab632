"""Metric depth, intrinsics and 3-D ground truth for the synthetic panoptic scenes.

Takes a rendered scene (the ``(image, pan_ids, segments_info)`` of :func:`ciae_core.synth.render_scene`
or :meth:`ciae_core.synth.SceneSequence.frame`) and defines a 3-D world that the id map is an exact
picture of, seen by a level pinhole camera (:class:`SynthCamera`: no pitch or roll, ``K`` with
``fx = fy``, principal point row ``cy`` on the horizon, ``camera_height`` above the ground):

* **ground**: the plane ``y = camera_height`` (optical frame: y down). A ground pixel in row
  ``v`` sees it at ``Z = fy * h / (v - cy)`` (Eq. 1), receding towards the horizon row ``cy``.
  The ground is finite: it ends where the wall stands (or, without a wall, at a cliff edge).
* **wall**: a vertical surface standing on the ground along the wall/ground boundary ``b(u)`` of
  the id map: column ``u`` of the wall is at ``Z = fy * h / (b(u) - cy)`` (Eq. 2), i.e. constant
  down a column (a vertical surface seen by a level camera). Where things hide the boundary,
  ``b(u)`` is interpolated between the columns where it is seen and kept between the lowest
  visible wall/sky pixel and the highest visible ground pixel of the column, so every visible
  pixel stays consistent. Without any ground the wall is a plane at ``wall_distance``.
* **sky**: nothing (``+inf``: no return).
* **things**: fronto-parallel plates (cut-outs with the shape of their mask) at a depth ``Z_k``.
  A plate *stands* on the ground (its lowest row touches it: ``Z_k = fy * h / (v_bottom - cy)``)
  when that is in front of everything behind it; otherwise it *floats* at ``float_factor`` times
  the distance of the nearest stuff behind it. Painter's order of the 2-D renderer (later ids
  occlude earlier ones) is kept in 3-D: within a cluster of touching things each thing is at most
  ``(1 - cluster_gap)`` times as far as every earlier one, so no plate pokes through another.

Thing sizes in the image are *not* consistent with their depths (the 2-D scenes were not made
that way); the depth values are what a camera would measure of the 3-D shapes defined above.
Void pixels (``void_border``) are filled with their neighbours' surfaces for the geometry.

:func:`simulate_sensor` adds what a real RGB-D camera adds (registration error, foreground
fattening at depth edges, depth noise growing with ``Z^2``); :func:`segment_truth` gives the
ground truth of each segment with the definitions of :class:`ciae_core.depth.SegmentDepth`
computed on the *exact* points of the *full* mask (no erosion, no sampling, no sensor effects).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from .depth import SegmentDepth, SegmentGeometry
from .synth import SYNTH_CATEGORIES

_SKY, _WALL, _GROUND, _THING = 1, 2, 3, 4
_STUFF_CLASS = {"sky": _SKY, "wall": _WALL, "ground": _GROUND}
_DEFAULTS = SegmentDepth()


class SynthDepthError(ValueError):
    """A scene that the depth renderer cannot make consistent (e.g. ground above the horizon)."""


@dataclass(frozen=True)
class SynthCamera:
    """Level pinhole camera of the synthetic scenes.

    ``hfov_deg``: horizontal field of view (69 deg, an RGB-D camera's colour stream);
    ``horizon``: principal-point row as a fraction of the height (0.3: the synthetic ground
    starts below 0.37 H); ``camera_height``: metres above the ground.
    """

    height: int
    width: int
    hfov_deg: float = 69.0
    horizon: float = 0.3
    camera_height: float = 1.0

    @property
    def focal(self) -> float:
        return (self.width / 2.0) / math.tan(math.radians(self.hfov_deg) / 2.0)

    @property
    def cy(self) -> float:
        return self.horizon * (self.height - 1)

    def K(self) -> np.ndarray:  # noqa: N802 - the usual name of the intrinsic matrix
        """``(3, 3)`` float64 intrinsics (pixel centres at integer coordinates)."""
        f = self.focal
        return np.array([[f, 0.0, (self.width - 1) / 2.0], [0.0, f, self.cy], [0.0, 0.0, 1.0]])

    def ground_depth(self, rows) -> np.ndarray:
        """Eq. 1: depth of the ground plane seen in image rows ``rows`` (must be below ``cy``)."""
        return self.focal * self.camera_height / (np.asarray(rows, np.float64) - self.cy)


@dataclass
class DepthRender:
    """Exact depth of a synthetic scene.

    depth: ``(H, W)`` float32 metres, ``+inf`` where nothing is (sky); K: ``(3, 3)`` float64;
    thing_depth: plate depth ``Z_k`` per thing id; standing: ids of the things standing on the
    ground; boundary: ``(W,)`` wall/ground boundary row ``b(u)`` (Eq. 2); truth: per-segment
    ground truth (:func:`segment_truth` with the default :class:`SegmentDepth` definitions).
    """

    depth: np.ndarray
    K: np.ndarray
    camera: SynthCamera
    thing_depth: dict[int, float]
    standing: set[int]
    boundary: np.ndarray
    truth: SegmentGeometry = field(repr=False, default=None)


def _fill_void(pan: np.ndarray) -> np.ndarray:
    """Void pixels (0) take the largest id among their neighbours, repeatedly, until none is left."""
    filled = pan.copy()
    if not (filled == 0).any() or not filled.any():
        return filled
    kernel = np.ones((3, 3), np.uint8)
    as_float = filled.astype(np.float32)  # exact for ids < 2^24
    for _ in range(max(pan.shape)):
        void = filled == 0
        if not void.any():
            break
        grown = cv2.dilate(as_float, kernel)
        as_float[void] = grown[void]
        filled = as_float.astype(np.int32)
    return filled


def _classes(pan: np.ndarray, segments_info: list[dict]) -> np.ndarray:
    """``(H, W)`` uint8 class map: 1 sky, 2 wall, 3 ground, 4 thing (0 for ids not in segments_info)."""
    names = {c.id: c.name for c in SYNTH_CATEGORIES}
    lut = np.zeros(int(pan.max(initial=0)) + 1, np.uint8)
    for s in segments_info:
        if 0 < s["id"] < lut.size:
            lut[s["id"]] = _STUFF_CLASS.get(names.get(int(s["category_id"]), ""), _THING)
    return lut[pan]


def _wall_base(cls: np.ndarray, camera: SynthCamera, wall_distance: float) -> np.ndarray:
    """``(W,)`` float64 row ``b(u)`` where the wall meets the ground (see the module docstring)."""
    h, w = cls.shape
    ground = cls == _GROUND
    above = (cls == _SKY) | (cls == _WALL)
    has_g, has_a = ground.any(0), above.any(0)
    first_g = np.where(has_g, ground.argmax(0), np.inf)
    last_a = np.where(has_a, h - 1 - above[::-1].argmax(0), -1)
    if has_g.any() and first_g[has_g].min() <= camera.cy + 1:
        raise SynthDepthError(f"ground visible at row {first_g[has_g].min():.0f}, at or above the horizon row "
                              f"{camera.cy:.1f}: lower SynthCamera.horizon")
    cols = np.arange(w)
    seen = has_g & has_a & (last_a + 1 == first_g)
    if seen.any():
        b = np.interp(cols, cols[seen], first_g[seen])
    else:
        b = np.full(w, camera.cy + camera.focal * camera.camera_height / wall_distance)
    b = np.maximum(np.maximum(b, last_a + 1), camera.cy + 1)
    return np.minimum(b, first_g)


def _pixels_by_id(ids: np.ndarray) -> dict[int, np.ndarray]:
    """Non-zero id -> flat indices of its pixels (one sort for all ids)."""
    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")
    values, starts = np.unique(flat[order], return_index=True)
    ends = np.append(starts[1:], flat.size)
    return {int(v): order[a:e] for v, a, e in zip(values, starts, ends) if v != 0}


def _thing_clusters(filled: np.ndarray, cls: np.ndarray) -> dict[int, int]:
    """Thing id -> cluster root: things that touch (8-neighbourhood) share a cluster (union-find)."""
    things = np.where(cls == _THING, filled, 0).astype(np.int64)
    parent: dict[int, int] = {int(i): int(i) for i in np.unique(things) if i}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in ((things[:, :-1], things[:, 1:]), (things[:-1, :], things[1:, :]),
                 (things[:-1, :-1], things[1:, 1:]), (things[:-1, 1:], things[1:, :-1])):
        touch = (a != b) & (a > 0) & (b > 0)
        pairs = np.unique(a[touch] * (1 << 31) + b[touch])
        for i, j in zip((pairs >> 31).tolist(), (pairs & ((1 << 31) - 1)).tolist()):
            ri, rj = root(i), root(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return {i: root(i) for i in parent}


def render_depth(pan_ids: np.ndarray, segments_info: list[dict], camera: SynthCamera | None = None, *,
                 wall_distance: float = 6.0, float_factor: float = 0.8, cluster_gap: float = 0.04,
                 truth: bool = True) -> DepthRender:
    """Exact metric depth of a synthetic scene (module docstring: the 3-D world it defines).

    Args:
        pan_ids: ``(H, W)`` int32 panoptic ids (0 = void); segments_info: its COCO segment list
            (``id``, ``category_id``, ``isthing``) from :mod:`ciae_core.synth`.
        camera: default ``SynthCamera(H, W)``.
        wall_distance: wall depth (m) of a scene without any ground.
        float_factor: a thing that cannot stand floats at this fraction of the depth of the
            stuff behind it.
        cluster_gap: relative depth step between touching things (painter's order).
        truth: also compute :func:`segment_truth` (default definitions).
    """
    pan = np.asarray(pan_ids)
    if pan.ndim != 2:
        raise SynthDepthError(f"pan_ids must be (H, W), got {pan.shape}")
    camera = camera or SynthCamera(pan.shape[0], pan.shape[1])
    if (camera.height, camera.width) != pan.shape:
        raise SynthDepthError(f"camera {camera.width}x{camera.height} differs from the scene {pan.shape[1]}x{pan.shape[0]}")
    filled = _fill_void(pan.astype(np.int32))
    cls = _classes(filled, segments_info)
    h, w = pan.shape
    b = _wall_base(cls, camera, wall_distance)
    rows = np.arange(h, dtype=np.float64)[:, None]
    z_wall = camera.ground_depth(b)[None, :]
    with np.errstate(divide="ignore"):
        z_ground = np.where(rows > camera.cy, camera.ground_depth(np.maximum(rows, camera.cy + 1e-9)), np.inf)
    # What a ray meets when no thing is in the way: ground in front of the wall base, else the wall.
    behind = np.where(rows >= b[None, :], z_ground, z_wall)
    depth = np.full((h, w), np.inf)
    depth[cls == _GROUND] = np.broadcast_to(z_ground, (h, w))[cls == _GROUND]
    depth[cls == _WALL] = np.broadcast_to(z_wall, (h, w))[cls == _WALL]
    thing_depth, standing = {}, set()
    clusters = _thing_clusters(filled, cls)
    nearest_in_cluster: dict[int, float] = {}
    pixels = _pixels_by_id(np.where(cls == _THING, filled, 0))
    for tid in sorted(clusters):  # ascending id = painter's order
        vs, us = np.divmod(pixels[tid], w)
        bound = float(behind[vs, us].min())
        v_bottom = float(vs.max())
        stand = float(camera.ground_depth(v_bottom)) if v_bottom > camera.cy + 1 else math.inf
        z = stand if stand <= bound else float_factor * bound
        c = clusters[tid]
        if c in nearest_in_cluster:
            z = min(z, (1.0 - cluster_gap) * nearest_in_cluster[c])
        if z == stand:
            standing.add(tid)
        nearest_in_cluster[c] = min(nearest_in_cluster.get(c, math.inf), z)
        thing_depth[tid] = z
        depth.ravel()[pixels[tid]] = z
    out = DepthRender(depth.astype(np.float32), camera.K(), camera, thing_depth, standing, b)
    if truth:
        out.truth = segment_truth(out.depth, pan, out.K)
    return out


def segment_truth(depth: np.ndarray, pan_ids: np.ndarray, k: np.ndarray, ids=None, *,
                  min_depth: float = _DEFAULTS.min_depth, max_depth: float = _DEFAULTS.max_depth,
                  percentiles: tuple[float, float] = _DEFAULTS.percentiles,
                  near_percentile: float = _DEFAULTS.near_percentile) -> SegmentGeometry:
    """Ground truth per segment from *exact* depth: every pixel of the mask with depth in
    ``[min_depth, max_depth]``, no erosion, no sampling; centroid = per-axis median, size = the
    ``percentiles`` extent, min_distance = ``near_percentile`` of the norms (one loop per segment,
    float64: a slow and plain reference)."""
    pan = np.asarray(pan_ids)
    pixels = _pixels_by_id(pan)
    want = np.array(sorted(pixels), np.int64) if ids is None else np.asarray(ids, np.int64)
    out = SegmentGeometry.empty(want)
    kk = np.asarray(k, np.float64)
    empty = np.zeros(0, np.int64)
    for i, sid in enumerate(want.tolist()):
        vs, us = np.divmod(pixels.get(sid, empty), pan.shape[1])
        z = depth[vs, us].astype(np.float64)
        ok = (z >= min_depth) & (z <= max_depth)
        if not ok.any():
            continue
        z, us, vs = z[ok], us[ok], vs[ok]
        pts = np.stack([(us - kk[0, 2]) * z / kk[0, 0], (vs - kk[1, 2]) * z / kk[1, 1], z], axis=1)
        out.points[i] = len(z)
        out.has_3d[i] = True
        out.centroid[i] = np.median(pts, axis=0)
        lo, hi = np.percentile(pts, percentiles, axis=0)
        out.size[i] = hi - lo
        out.min_distance[i] = np.percentile(np.linalg.norm(pts, axis=1), near_percentile)
    return out


def simulate_sensor(depth: np.ndarray, seed=0, *, noise: float = 0.005, shift: float = 0.5,
                    fattening: int = 1, edge_jump: float = 0.05) -> np.ndarray:
    """What an RGB-D camera would publish for the exact ``depth`` (float32 metres, NaN = no return).

    * ``shift``: depth-to-colour registration error in px (both axes): depth is resampled
      bilinearly at ``(u + shift, v + shift)``, so edge pixels mix the depths on both sides
      (flying pixels); next to ``inf`` (sky) they have no return.
    * ``fattening``: px by which the nearer side of a depth edge (relative jump > ``edge_jump``)
      bleeds into the farther side, as stereo matching windows do.
    * ``noise``: depth noise ``sigma = noise * Z^2`` (metres; stereo error grows with ``Z^2``):
      0.005 gives 2 cm at 2 m.
    """
    d = np.asarray(depth, np.float32)
    h, w = d.shape
    if fattening > 0:
        kernel = np.ones((2 * fattening + 1, 2 * fattening + 1), np.uint8)
        finite = np.where(np.isfinite(d), d, np.float32(1e6))
        near = cv2.erode(finite, kernel)
        far = cv2.dilate(finite, kernel)
        edge = (far - near) > edge_jump * near
        d = np.where(edge & np.isfinite(d), np.minimum(d, near), d)
    if shift:
        mx, my = np.meshgrid(np.arange(w, dtype=np.float32) + shift, np.arange(h, dtype=np.float32) + shift)
        src = np.where(np.isfinite(d), d, np.float32(np.nan))
        d = cv2.remap(src, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    rng = np.random.default_rng(seed)
    out = d + rng.standard_normal(d.shape, dtype=np.float32) * (np.float32(noise) * d * d)
    out[~np.isfinite(out)] = np.nan
    return out


def geometry_errors(estimate: SegmentGeometry, truth: SegmentGeometry, min_extent: float = 0.05) -> dict[str, np.ndarray]:
    """Relative errors of an estimate against the ground truth, over segments with 3-D in both.

    Returns ``centroid`` (``|c - c*| / |c*|``), ``size`` (``|s_a - s*_a| / s*_a`` for every axis
    whose true extent exceeds ``min_extent`` metres: a plate has no depth extent), ``min_distance``
    (relative) and ``lost`` (ids with true 3-D but none estimated). Rows are matched by id.
    """
    rows = {int(i): r for r, i in enumerate(estimate.ids.tolist())}
    cen, size, near, lost = [], [], [], []
    for t, sid in enumerate(truth.ids.tolist()):
        if not truth.has_3d[t]:
            continue
        e = rows.get(int(sid))
        if e is None or not estimate.has_3d[e]:
            lost.append(int(sid))
            continue
        cen.append(np.linalg.norm(estimate.centroid[e] - truth.centroid[t]) / np.linalg.norm(truth.centroid[t]))
        axes = truth.size[t] > min_extent
        size.extend((np.abs(estimate.size[e][axes] - truth.size[t][axes]) / truth.size[t][axes]).tolist())
        near.append(abs(estimate.min_distance[e] - truth.min_distance[t]) / truth.min_distance[t])
    return {"centroid": np.asarray(cen), "size": np.asarray(size), "min_distance": np.asarray(near),
            "lost": np.asarray(lost, np.int64)}
