"""ciae_ros.spatial_outputs: Segment 3-D fields, markers that never go stale, Detection3DArray."""

import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from ciae_core.depth import SegmentDepth, SegmentGeometry
from ciae_core.structures import PanopticResult, Segment as CoreSegment
from ciae_core.synth import render_scene
from ciae_core.synth_depth import render_depth
from ciae_ros.conversions import segments_msg
from ciae_ros.msg import PanopticSegments, Segment
from ciae_ros.spatial_outputs import (SegmentMarkers, detection_id, fill_segments_3d, segment_colour_table)

REPO = pathlib.Path(__file__).resolve().parents[2]
COLORS = {1: (220, 40, 40), 2: (30, 170, 170), 13: (70, 130, 50)}


def _seg(sid, cat=1, isthing=True, track=0, has_3d=True, z=2.0, label="disc"):
    s = Segment(id=sid, category_id=cat, label=label, isthing=isthing, track_id=track, has_3d=has_3d, score=0.9)
    if has_3d:
        s.centroid.x, s.centroid.y, s.centroid.z = 0.1 * sid, -0.2, z
        s.size.x, s.size.y, s.size.z = 0.3, 0.2, 0.0
        s.min_distance = z - 0.05
    return s


def _frame(*segs):
    m = PanopticSegments()
    m.segments = list(segs)
    return m


def _apply(shown: dict, arr: MarkerArray) -> dict:
    """What rviz shows after receiving ``arr``: (ns, id) -> marker, by ADD/DELETE."""
    arr = deserialize_message(serialize_message(arr), MarkerArray)  # as it travels
    for m in arr.markers:
        if m.action == Marker.ADD:
            shown[(m.ns, m.id)] = m
        elif m.action == Marker.DELETE:
            assert (m.ns, m.id) in shown, f"DELETE of a marker never added: {(m.ns, m.id)}"
            del shown[(m.ns, m.id)]
    return shown


def test_fill_segments_3d_from_geometry():
    ids = np.zeros((40, 60), np.int32)
    ids[5:20, 5:30], ids[25:38, 10:50], ids[0:4, 50:60] = 1, 2, 3
    result = PanopticResult(ids, [CoreSegment(i, 1, "disc", True, 0.9, int((ids == i).sum()), (0, 0, 1, 1))
                                  for i in (1, 2, 3)])
    msg = segments_msg(result, Header(frame_id="camera_color_optical_frame"))
    depth = np.full(ids.shape, 2.5, np.float32)
    depth[0:4] = np.nan  # segment 3: no valid depth
    k = np.array([[60.0, 0, 29.5], [0, 60.0, 19.5], [0, 0, 1]])
    geo = SegmentDepth(min_points=5)(ids, depth, k, ids=[s.id for s in msg.segments])
    assert fill_segments_3d(msg, geo, "camera_depth_optical_frame") == 2
    assert msg.depth_frame_id == "camera_depth_optical_frame"
    for seg in msg.segments:
        r = geo.row(seg.id)
        assert seg.has_3d == bool(geo.has_3d[r])
        if seg.has_3d:
            assert (seg.centroid.x, seg.centroid.y, seg.centroid.z) == pytest.approx(tuple(geo.centroid[r]))
            assert (seg.size.x, seg.size.y, seg.size.z) == pytest.approx(tuple(geo.size[r]))
            assert seg.min_distance == pytest.approx(geo.min_distance[r]) and seg.depth_points == geo.points[r] > 0
        else:
            assert (seg.centroid.z, seg.size.x, seg.min_distance, seg.depth_points) == (0.0, 0.0, 0.0, 0)
    back = deserialize_message(serialize_message(msg), PanopticSegments)
    assert back.segments[0].centroid.z == pytest.approx(2.5)
    # a frame without depth: no 3-D anywhere, no frame
    msg2 = segments_msg(result, Header())
    assert fill_segments_3d(msg2, None, "camera_depth_optical_frame") == 0
    assert msg2.depth_frame_id == "" and not any(s.has_3d for s in msg2.segments)
    assert fill_segments_3d(msg2, SegmentGeometry.empty([1, 2, 3]), "x") == 0 and msg2.depth_frame_id == ""


def test_markers_are_deleted_when_their_segment_vanishes():
    markers = SegmentMarkers()
    header = Header(frame_id="camera_depth_optical_frame")
    shown: dict = {}
    # frame 1: untracked thing 1, tracked thing 2 (track 7), stuff 3, thing 4 without 3-D
    f1 = _frame(_seg(1), _seg(2, cat=2, track=7, label="box"), _seg(3, cat=13, isthing=False, label="ground"),
                _seg(4, has_3d=False))
    _apply(shown, markers.update(f1, header, COLORS))
    assert set(shown) == {("segments", 1), ("segment_labels", 1), ("tracks", 7), ("track_labels", 7)}
    box, label = shown[("tracks", 7)], shown[("track_labels", 7)]
    assert box.type == Marker.CUBE and label.type == Marker.TEXT_VIEW_FACING
    assert box.header.frame_id == "camera_depth_optical_frame"
    assert (box.pose.position.x, box.pose.position.z) == pytest.approx((0.2, 2.0))
    assert (box.scale.x, box.scale.y, box.scale.z) == pytest.approx((0.3, 0.2, 0.01))  # min_scale for a plate
    assert label.text == "box #7 1.9 m" and label.pose.position.y < box.pose.position.y
    # frame 2: the tracked box is segment 1 now, the untracked disc is gone, a new thing 2 appears
    f2 = _frame(_seg(1, cat=2, track=7, label="box", z=2.2), _seg(2, z=3.0))
    _apply(shown, markers.update(f2, header, COLORS))
    assert set(shown) == {("tracks", 7), ("track_labels", 7), ("segments", 2), ("segment_labels", 2)}
    assert shown[("tracks", 7)].pose.position.z == pytest.approx(2.2)  # the same marker moved
    # frame 3: the tracked box loses its 3-D, nothing else
    _apply(shown, markers.update(_frame(_seg(1, cat=2, track=7, has_3d=False)), header, COLORS))
    assert shown == {} and markers.published == set()
    # frame 4: nothing at all -> nothing to add or delete
    assert len(markers.update(_frame(), header, COLORS).markers) == 0


def test_stuff_markers_and_clear():
    markers = SegmentMarkers(include_stuff=True)
    header = Header(frame_id="f")
    shown = _apply({}, markers.update(_frame(_seg(3, cat=13, isthing=False, label="ground"), _seg(5)), header))
    assert set(shown) == {("segments", 3), ("segment_labels", 3), ("segments", 5), ("segment_labels", 5)}
    assert shown[("segments", 3)].color.a == pytest.approx(0.35)
    _apply(shown, markers.clear(header))
    assert shown == {} and markers.published == set()


def test_marker_colours_follow_the_category():
    m = SegmentMarkers().update(_frame(_seg(1, cat=2, track=3)), Header(), COLORS)
    box = m.markers[0]
    table = segment_colour_table([_seg(1, cat=2, track=3)], COLORS)
    assert (round(box.color.r * 255), round(box.color.g * 255), round(box.color.b * 255)) == tuple(table[1])


def test_detection_ids():
    assert detection_id(_seg(4, track=12)) == "12" and detection_id(_seg(4)) == "s4"


# --------------------------------------------------------------------------------------------
# vision_msgs/Detection3DArray: vision_msgs is not installable from PyPI; build it from
# ../shared/ros2-src/vision_msgs with rosidl (as scripts/setup.sh builds msg/) and run the check in
# a process that has the built prefix on its paths. Skipped where the sources are absent.
# --------------------------------------------------------------------------------------------

ROS2_SRC = pathlib.Path(os.environ.get("CIAE_ROS2_SRC", REPO.parent / "shared" / "ros2-src"))


def _build_interfaces(package: str) -> pathlib.Path:
    """``build/ros2-src/<package>/install``, built once per source hash (a lock serialises builds)."""
    src, venv = ROS2_SRC / package, pathlib.Path(sys.prefix)
    digest = hashlib.sha256(str(venv).encode())
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(src)).encode() + f.read_bytes())
    cache = REPO / "build" / "ros2-src" / package
    prefix, build, marker = cache / "install", cache / "build", cache / "install" / ".complete"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == digest.hexdigest()[:16]:
            return prefix
        shutil.rmtree(prefix, ignore_errors=True)
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        env = {**os.environ, "AMENT_PREFIX_PATH": str(venv)}
        for cmd in (["cmake", str(src), f"-DCMAKE_PREFIX_PATH={venv}", f"-DCMAKE_INSTALL_PREFIX={prefix}",
                     f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF", "-DCMAKE_BUILD_TYPE=Release"],
                    ["make", f"-j{os.cpu_count() or 1}"], ["make", "install"]):
            res = subprocess.run(cmd, cwd=build, env=env, capture_output=True, text=True, timeout=3600)
            assert res.returncode == 0, f"building {package}: {' '.join(cmd[:2])} failed:\n{(res.stdout + res.stderr)[-3000:]}"
        marker.write_text(digest.hexdigest()[:16])
    return prefix


_DETECTIONS_CHECK = r"""
import json, numpy as np
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Header
from vision_msgs.msg import Detection3DArray
from ciae_ros.msg import PanopticSegments, Segment
from ciae_ros.spatial_outputs import detections_3d_msg

def seg(sid, isthing, has_3d, track=0):
    s = Segment(id=sid, category_id=sid + 10, isthing=isthing, has_3d=has_3d, track_id=track, score=0.5 + sid / 100)
    s.centroid.x, s.centroid.y, s.centroid.z = 0.1 * sid, 0.2, 1.0 + sid
    s.size.x, s.size.y, s.size.z = 0.3, 0.4, 0.05
    return s

msg = PanopticSegments(segments=[seg(1, True, True), seg(2, True, True, track=42), seg(3, False, True), seg(4, True, False)])
arr = deserialize_message(serialize_message(detections_3d_msg(msg, Header(frame_id="depth_frame"))), Detection3DArray)
print(json.dumps({"frame": arr.header.frame_id, "detections": [
    {"id": d.id, "frame": d.header.frame_id, "center": [d.bbox.center.position.x, d.bbox.center.position.y,
     d.bbox.center.position.z], "w": d.bbox.center.orientation.w, "size": [d.bbox.size.x, d.bbox.size.y, d.bbox.size.z],
     "class_id": [h.hypothesis.class_id for h in d.results], "score": [h.hypothesis.score for h in d.results],
     "pose_z": [h.pose.pose.position.z for h in d.results]} for d in arr.detections]}))
"""


def test_detection3d_array_with_vision_msgs_built_from_source():
    if not (ROS2_SRC / "vision_msgs" / "package.xml").is_file():
        pytest.skip(f"vision_msgs sources not found at {ROS2_SRC} (tests-only upstream sources)")
    if shutil.which("cmake") is None or shutil.which("make") is None:
        pytest.skip("cmake/make not installed")
    prefix = _build_interfaces("vision_msgs")
    site = prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(prefix / "lib")] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    env["AMENT_PREFIX_PATH"] = os.pathsep.join([sys.prefix, str(prefix)])
    res = subprocess.run([sys.executable, "-c", _DETECTIONS_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["frame"] == "depth_frame"
    dets = out["detections"]  # things with 3-D only: segments 1 and 2
    assert [d["id"] for d in dets] == ["s1", "42"]
    assert dets[1]["center"] == pytest.approx([0.2, 0.2, 3.0]) and dets[1]["w"] == 1.0
    assert dets[1]["size"] == pytest.approx([0.3, 0.4, 0.05]) and dets[1]["frame"] == "depth_frame"
    assert dets[1]["class_id"] == ["12"] and dets[1]["score"] == pytest.approx([0.52]) and dets[1]["pose_z"] == [3.0]


def test_detection3d_needs_vision_msgs_here():
    try:
        import vision_msgs.msg  # noqa: F401
    except ImportError:
        from ciae_ros.spatial_outputs import detections_3d_msg

        with pytest.raises(ImportError):
            detections_3d_msg(_frame(_seg(1)), Header())
    else:
        pytest.skip("vision_msgs is installed in this environment")


def test_markers_on_a_rendered_scene():
    """End to end without DDS: rendered scene -> 3-D -> message -> markers, one box per thing."""
    _, pan, info = render_scene((2, 77), 240, 320)
    r = render_depth(pan, info)
    segs = [CoreSegment(s["id"], s["category_id"], str(s["category_id"]), s["isthing"], 1.0, s["area"],
                        tuple(s["bbox"])) for s in info]
    msg = segments_msg(PanopticResult(pan, segs), Header())
    fill_segments_3d(msg, SegmentDepth()(pan, r.depth, r.K, ids=r.truth.ids), "cam")
    shown = _apply({}, SegmentMarkers().update(msg, Header(frame_id="cam")))
    things = [s["id"] for s in info if s["isthing"]]
    assert {k for k in shown if k[0] == "segments"} == {("segments", t) for t in things}
    for t in things:
        assert shown[("segments", t)].pose.position.z == pytest.approx(r.thing_depth[t], rel=0.01)
