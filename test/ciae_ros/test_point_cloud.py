"""ciae_ros.point_cloud: the labelled PointCloud2, read back field by field after CDR serialisation."""

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Header

from ciae_core.depth import Intrinsics, metres_to_uint16
from ciae_ros.point_cloud import (POINT_DTYPE, benchmark, cloud_points, pack_rgb, point_cloud_msg, points_from_msg,
                                  segment_tables)
from ciae_ros.msg import Segment

INTR = Intrinsics(50.0, 40.0, 15.5, 11.5)


def _frame(seed=0, h=24, w=32):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 5, (h // 4, w // 4)).repeat(4, 0).repeat(4, 1).astype(np.int32)
    depth = rng.uniform(0.05, 12.0, (h, w)).astype(np.float32)  # some out of [0.1, 10]
    depth[rng.random((h, w)) < 0.15] = np.nan
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    segs = [Segment(id=i, category_id=10 * i + 3, track_id=(100 + i) if i % 2 else 0) for i in (1, 2, 3, 4)]
    return ids, depth, image, segs


def _expected(ids, depth, image, stride):
    """Point by point, in row-major pixel order (independent of the vectorised packing)."""
    rows = []
    for v in range(0, ids.shape[0], stride):
        for u in range(0, ids.shape[1], stride):
            z = float(depth[v, u])
            if ids[v, u] == 0 or not (0.1 <= z <= 10.0):
                continue
            r, g, b = (int(c) for c in image[v, u])
            sid = int(ids[v, u])
            rows.append(((u - INTR.cx) * z / INTR.fx, (v - INTR.cy) * z / INTR.fy, z, (r << 16) | (g << 8) | b,
                         sid, 10 * sid + 3, (100 + sid) if sid % 2 else 0))
    return rows


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_cloud_read_back_field_by_field_after_serialisation(stride):
    ids, depth, image, segs = _frame()
    cat, track = segment_tables(segs)
    pts = cloud_points(ids, depth, INTR, cat, track, stride=stride, image_rgb=image)
    header = Header(frame_id="camera_depth_optical_frame")
    header.stamp.sec, header.stamp.nanosec = 12, 345
    raw = serialize_message(point_cloud_msg(pts, header))
    # a different deserialiser (rosbags, pure Python) than the one that wrote it
    msg = get_typestore(Stores.ROS2_KILTED).deserialize_cdr(raw, "sensor_msgs/msg/PointCloud2")
    assert msg.header.frame_id == "camera_depth_optical_frame" and msg.header.stamp.sec == 12
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, len(pts), 28, 28 * len(pts))
    assert not msg.is_bigendian and msg.is_dense
    fields = {f.name: (f.offset, f.datatype, f.count) for f in msg.fields}
    assert fields == {"x": (0, 7, 1), "y": (4, 7, 1), "z": (8, 7, 1), "rgb": (12, 7, 1),
                      "segment_id": (16, 6, 1), "category_id": (20, 6, 1), "track_id": (24, 6, 1)}
    data = np.frombuffer(bytes(msg.data), np.uint8).reshape(-1, 28)
    exp = _expected(ids, depth, image, stride)
    assert len(exp) == len(pts) > 0
    for k, (name, fmt) in enumerate((("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4"),
                                     ("segment_id", "<u4"), ("category_id", "<u4"), ("track_id", "<u4"))):
        off = fields[name][0]
        col = np.ascontiguousarray(data[:, off:off + 4]).view(fmt).ravel()
        want = np.array([row[k] for row in exp])
        if fmt == "<f4":
            np.testing.assert_allclose(col, want, rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(col, want, err_msg=name)
        packed = pts[name].view(np.uint32) if name == "rgb" else pts[name]
        np.testing.assert_array_equal(col, packed, err_msg=name)  # equal to what was packed


def test_rclpy_round_trip_and_points_from_msg():
    ids, depth, image, segs = _frame(1)
    pts = cloud_points(ids, depth, INTR, *segment_tables(segs), stride=2, image_rgb=image)
    back = points_from_msg(deserialize_message(serialize_message(point_cloud_msg(pts, Header())), PointCloud2))
    assert back.dtype.names == POINT_DTYPE.names
    for name in POINT_DTYPE.names:
        np.testing.assert_array_equal(back[name].view(np.uint32), pts[name].view(np.uint32))


def test_uint16_depth_and_segment_colours():
    ids, depth, image, segs = _frame(2)
    mm = metres_to_uint16(depth)
    table = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3]], np.uint8)
    a = cloud_points(ids, mm, INTR, *segment_tables(segs), stride=1, segment_colors=table)
    b = cloud_points(ids, np.where(mm > 0, mm * 0.001, np.nan).astype(np.float32), INTR, *segment_tables(segs),
                     stride=1, segment_colors=table)
    np.testing.assert_array_equal(a["segment_id"], b["segment_id"])
    np.testing.assert_allclose(a["z"], b["z"], rtol=1e-6)
    assert (a["rgb"].view(np.uint32) == ((table[a["segment_id"]].astype(np.uint32) << [16, 8, 0]).sum(1))).all()


def test_pack_rgb_bits():
    assert pack_rgb(np.array([[255, 128, 1]], np.uint8)).view(np.uint32).tolist() == [0xFF8001]


def test_no_valid_points_gives_an_empty_cloud():
    ids = np.ones((8, 8), np.int32)
    pts = cloud_points(ids, np.full((8, 8), np.nan, np.float32), INTR, *segment_tables([]), stride=1)
    msg = point_cloud_msg(pts, Header())
    assert msg.width == 0 and len(msg.data) == 0 and len(msg.fields) == 7
    assert points_from_msg(deserialize_message(serialize_message(msg), PointCloud2)).size == 0


def test_bad_arguments():
    ids = np.ones((8, 8), np.int32)
    with pytest.raises(ValueError):
        cloud_points(ids, np.ones((4, 8), np.float32), INTR, *segment_tables([]))
    with pytest.raises(ValueError):
        cloud_points(ids, np.ones((8, 8), np.float32), INTR, *segment_tables([]), stride=0)
    with pytest.raises(ValueError):
        cloud_points(ids, np.ones((8, 8), np.float32), INTR, *segment_tables([]), image_rgb=np.zeros((4, 4, 3), np.uint8))


def test_benchmark_entry_reports_timings():
    res = benchmark(height=48, width=64, repeats=2)
    assert res["points"] == 12 * 16 and 0 < res["min_ms"] <= res["median_ms"]
