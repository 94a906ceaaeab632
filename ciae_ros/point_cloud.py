"""Labelled point cloud (``sensor_msgs/PointCloud2``) of a segmented RGB-D frame, packed with numpy.

Every ``stride``-th pixel in both axes whose segment is not void and whose depth is valid becomes
one point (Eq. 1 of :mod:`ciae_core.depth`) with the fields below, little-endian, 28 bytes per
point, no padding (``sensor_msgs_py`` is not needed, nor installable here):

=============  =========  ============================================================
field          datatype   meaning
=============  =========  ============================================================
x, y, z        FLOAT32    metres in the depth image's optical frame (x right, y down)
rgb            FLOAT32    ``0x00RRGGBB`` as the bits of a float32, as rviz and Foxglove expect
segment_id     UINT32     value of the pixel in the id image (per frame)
category_id    UINT32     dataset category id of the segment
track_id       UINT32     persistent track id of the segment (0 = none)
=============  =========  ============================================================

The cloud is unorganised (``height`` 1) and dense (no NaN points). Colour comes from the camera
image (default) or from a per-segment colour table (segment colours, as in the overlay); rviz
can also colour by ``segment_id`` with its Intensity transformer.
"""

from __future__ import annotations

import time

import numpy as np

from ciae_core.depth import Intrinsics

from .image_conversion import byte_array

#: One point: 7 four-byte fields, little-endian, no padding.
POINT_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4"),
                        ("segment_id", "<u4"), ("category_id", "<u4"), ("track_id", "<u4")])
_FLOAT32, _UINT32 = 7, 6  # sensor_msgs/PointField datatypes
_DATATYPES = {np.dtype("<f4"): _FLOAT32, np.dtype("<u4"): _UINT32}
_NUMPY_OF = {1: "i1", 2: "u1", 3: "<i2", 4: "<u2", 5: "<i4", 6: "<u4", 7: "<f4", 8: "<f8"}


def segment_tables(segments) -> tuple[np.ndarray, np.ndarray]:
    """``(category_lut, track_lut)``: uint32 arrays indexed by segment id, from anything with
    ``id``, ``category_id`` and optionally ``track_id`` (``ciae_ros/Segment`` messages or
    ``ciae_core`` segments). Ids without a segment map to 0."""
    segs = list(segments)
    top = max((int(s.id) for s in segs), default=0)
    cat, track = np.zeros(top + 1, np.uint32), np.zeros(top + 1, np.uint32)
    for s in segs:
        cat[int(s.id)] = int(s.category_id)
        track[int(s.id)] = int(getattr(s, "track_id", 0))
    return cat, track


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """``(N, 3)`` uint8 RGB -> ``(N,)`` float32 whose bits are ``0x00RRGGBB``."""
    c = np.asarray(rgb, np.uint32)
    return ((c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]).view(np.float32)


def cloud_points(id_map: np.ndarray, depth: np.ndarray, intrinsics: Intrinsics, category_lut: np.ndarray,
                 track_lut: np.ndarray, *, stride: int = 4, image_rgb: np.ndarray | None = None,
                 segment_colors: np.ndarray | None = None, min_depth: float = 0.1, max_depth: float = 10.0,
                 depth_scale: float = 0.001) -> np.ndarray:
    """Structured ``(N,)`` array of :data:`POINT_DTYPE` (see the module docstring).

    Args:
        id_map: ``(H, W)`` int segment ids (0 = void); depth: ``(H, W)`` uint16 (x ``depth_scale``
            metres) or float32 metres, registered to it.
        category_lut, track_lut: from :func:`segment_tables` (ids beyond them map to 0).
        stride: every n-th pixel in both axes.
        image_rgb: ``(H, W, 3)`` uint8 camera image for ``rgb``; else ``segment_colors``
            (``(max_id + 1, 3)`` uint8 table by segment id); else mid grey.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    ids = np.asarray(id_map)[::stride, ::stride]
    d = np.asarray(depth)[::stride, ::stride]
    if d.shape != ids.shape:
        raise ValueError(f"depth {np.shape(depth)} and id map {np.shape(id_map)} differ in size")
    if d.dtype == np.uint16:
        z = d.astype(np.float32) * np.float32(depth_scale)
    else:
        z = d.astype(np.float32, copy=False)
    ok = (ids > 0) & (z >= np.float32(min_depth)) & (z <= np.float32(max_depth))
    flat = np.flatnonzero(ok)  # row-major pixel order
    vs, us = np.divmod(flat, ids.shape[1])
    zz = z.ravel()[flat]
    lab = ids.ravel()[flat].astype(np.int64)
    out = np.zeros(zz.size, POINT_DTYPE)
    out["x"] = (us * stride - intrinsics.cx) * (zz / intrinsics.fx)
    out["y"] = (vs * stride - intrinsics.cy) * (zz / intrinsics.fy)
    out["z"] = zz
    out["segment_id"] = lab
    in_lut = lab < category_lut.size
    out["category_id"] = np.where(in_lut, category_lut[np.minimum(lab, category_lut.size - 1)], 0)
    in_lut = lab < track_lut.size
    out["track_id"] = np.where(in_lut, track_lut[np.minimum(lab, track_lut.size - 1)], 0)
    if image_rgb is not None:
        img = np.asarray(image_rgb)[::stride, ::stride]
        if img.shape[:2] != ids.shape:
            raise ValueError(f"image {np.shape(image_rgb)} and id map {np.shape(id_map)} differ in size")
        out["rgb"] = pack_rgb(img.reshape(-1, img.shape[2])[flat, :3])
    elif segment_colors is not None:
        table = np.asarray(segment_colors, np.uint8)
        out["rgb"] = pack_rgb(table[np.minimum(lab, table.shape[0] - 1)])
    else:
        out["rgb"] = pack_rgb(np.full((1, 3), 128, np.uint8))[0]
    return out


def point_cloud_msg(points: np.ndarray, header, msg_type=None, field_type=None):
    """``sensor_msgs/PointCloud2`` (unorganised, dense, little-endian) holding ``points``."""
    if msg_type is None:
        from sensor_msgs.msg import PointCloud2 as msg_type  # noqa: N813
    if field_type is None:
        from sensor_msgs.msg import PointField as field_type  # noqa: N813
    pts = np.ascontiguousarray(points)
    msg = msg_type()
    msg.header = header
    msg.height, msg.width = 1, int(pts.size)
    msg.fields = [field_type(name=name, offset=int(pts.dtype.fields[name][1]),
                             datatype=_DATATYPES[pts.dtype.fields[name][0]], count=1)
                  for name in pts.dtype.names]
    msg.is_bigendian = False
    msg.point_step = int(pts.dtype.itemsize)
    msg.row_step = int(pts.dtype.itemsize * pts.size)
    msg.data = byte_array(pts)
    msg.is_dense = True
    return msg


def points_from_msg(msg) -> np.ndarray:
    """Read a ``PointCloud2`` back into a structured array, from its own ``fields``, offsets and
    ``point_step`` (any little-endian cloud of single-count fields; for clients and tests)."""
    if msg.is_bigendian:
        raise ValueError("big-endian point clouds are not supported")
    dtype = np.dtype({"names": [f.name for f in msg.fields],
                      "formats": [_NUMPY_OF[int(f.datatype)] for f in msg.fields],
                      "offsets": [int(f.offset) for f in msg.fields], "itemsize": int(msg.point_step)})
    n = int(msg.width) * int(msg.height)
    return np.frombuffer(bytes(msg.data), dtype=dtype, count=n)


def benchmark(height: int = 480, width: int = 640, stride: int = 4, num_segments: int = 30,
              repeats: int = 50, seed: int = 0) -> dict[str, float]:
    """Time :func:`cloud_points` + :func:`point_cloud_msg` for one 640x480 frame (all pixels in
    segments with valid depth) with image colours; ``{"median_ms", "min_ms", "points"}``."""
    from std_msgs.msg import Header

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    id_map = ((yy * 5 // height) * int(np.ceil(num_segments / 5)) + xx * int(np.ceil(num_segments / 5)) // width + 1)
    id_map = np.minimum(id_map, num_segments).astype(np.int32)
    depth = (1.0 + 8.0 * (1.0 - yy / height)).astype(np.float32)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    intr = Intrinsics(525.0, 525.0, width / 2 - 0.5, height / 2 - 0.5)
    cat = np.arange(num_segments + 1, dtype=np.uint32)
    track = cat.copy()
    header = Header(frame_id="camera_optical_frame")
    times, n = [], 0
    for k in range(repeats + 1):
        t0 = time.perf_counter()
        pts = cloud_points(id_map, depth, intr, cat, track, stride=stride, image_rgb=image)
        point_cloud_msg(pts, header)
        if k:
            times.append((time.perf_counter() - t0) * 1e3)
        n = pts.size
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)), "points": int(n)}
