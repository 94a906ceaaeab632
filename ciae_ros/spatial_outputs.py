"""3-D outputs of a segmented frame: the Segment 3-D fields, rviz markers, vision_msgs 3-D detections.

All three read a :class:`ciae_core.depth.SegmentGeometry` (or a ``PanopticSegments`` message whose
3-D fields were filled from one), in the optical frame of the depth image (x right, y down,
z forward; the frame is the depth image's ``header.frame_id``).

Markers (``visualization_msgs/MarkerArray``), per camera, by :class:`SegmentMarkers`:

* per segment with 3-D: a translucent ``CUBE`` at the centroid with the robust extent as its
  scale (at least ``min_scale``: a plate has no depth) and a ``TEXT_VIEW_FACING`` label above it
  ("label #track  1.4 m": category, track id if any, nearest distance); stuff only when
  ``include_stuff``;
* marker ids: a tracked segment (``track_id > 0``) uses its track id in namespaces
  ``tracks``/``track_labels``, so an object keeps its marker (rviz moves it) while it is tracked;
  an untracked one its per-frame segment id in ``segments``/``segment_labels`` (two namespaces:
  track ids and segment ids never collide);
* every marker published before and absent now is sent as ``DELETE`` in the same array: nothing
  is left stale when a segment vanishes, loses its 3-D or is filtered out; :meth:`SegmentMarkers.clear`
  deletes everything (deactivation, shutdown).
"""

from __future__ import annotations

import numpy as np

from ciae_core.depth import SegmentGeometry

from .conversions import instance_color

_ADD, _DELETE = 0, 2  # visualization_msgs/Marker actions
_CUBE, _TEXT = 1, 9  # visualization_msgs/Marker types


def fill_segments_3d(msg, geometry: SegmentGeometry | None, frame_id: str) -> int:
    """Fill ``has_3d``, ``centroid``, ``size``, ``min_distance``, ``depth_points`` of every
    ``msg.segments[i]`` (``ciae_ros/PanopticSegments``) from ``geometry`` (matched by segment id)
    and ``msg.depth_frame_id``; segments without 3-D keep zeros and ``has_3d`` False.

    ``geometry=None`` (no matching depth this frame) leaves all without 3-D. ``depth_frame_id`` is
    ``frame_id`` when at least one segment has 3-D, else empty. Returns how many have 3-D.
    """
    rows = {} if geometry is None else {int(i): r for r, i in enumerate(geometry.ids.tolist())}
    n = 0
    for seg in msg.segments:
        r = rows.get(int(seg.id))
        if r is None or not geometry.has_3d[r]:
            continue
        c, s = geometry.centroid[r], geometry.size[r]
        seg.has_3d = True
        seg.centroid.x, seg.centroid.y, seg.centroid.z = float(c[0]), float(c[1]), float(c[2])
        seg.size.x, seg.size.y, seg.size.z = float(s[0]), float(s[1]), float(s[2])
        seg.min_distance = float(geometry.min_distance[r])
        seg.depth_points = int(geometry.points[r])
        n += 1
    msg.depth_frame_id = str(frame_id) if n else ""
    return n


def _marker_key(seg) -> tuple[str, int]:
    """(namespace, id) of a segment's box; its label uses ``<namespace without s>_labels``."""
    track = int(getattr(seg, "track_id", 0))
    if track > 0:
        return "tracks", track & 0x7FFFFFFF  # Marker.id is int32
    return "segments", int(seg.id)


class SegmentMarkers:
    """One camera's box + label markers, with deletion of those that vanished (module docstring).

    Args:
        include_stuff: also draw stuff segments (ground, wall, ... : large boxes).
        alpha: opacity of the boxes.
        text_height: label height in metres.
        min_scale: smallest box edge in metres (rviz does not draw zero-thickness cubes).
        lifetime: seconds rviz keeps a marker without news (0 = until deleted, which we do).
    """

    def __init__(self, include_stuff: bool = False, alpha: float = 0.35, text_height: float = 0.08,
                 min_scale: float = 0.01, lifetime: float = 0.0):
        self.include_stuff = bool(include_stuff)
        self.alpha, self.text_height, self.min_scale = float(alpha), float(text_height), float(min_scale)
        self.lifetime = float(lifetime)
        self._published: set[tuple[str, int]] = set()

    def update(self, msg, header, colors: dict[int, tuple[int, int, int]] | None = None):
        """``MarkerArray`` for ``msg`` (a ``PanopticSegments`` with its 3-D fields filled): ADD
        for every drawn segment, DELETE for every marker of the previous update not drawn now.

        ``header``: frame (the depth frame) and stamp of the markers; ``colors``: category id ->
        RGB 0-255 (the instances of a thing class get shades of it, as in the overlay)."""
        from visualization_msgs.msg import MarkerArray

        colors = colors or {}
        arr = MarkerArray()
        current: set[tuple[str, int]] = set()
        for seg in msg.segments:
            if not seg.has_3d or (not seg.isthing and not self.include_stuff):
                continue
            key = _marker_key(seg)
            if key in current:
                continue  # two segments of one track in a frame: the first wins
            current.add(key)
            base = colors.get(int(seg.category_id), (128, 128, 128))
            shade_id = key[1] if key[0] == "tracks" else int(seg.id)
            rgb = instance_color(tuple(int(v) for v in base), shade_id, bool(seg.isthing))
            arr.markers.extend(self._segment_markers(seg, key, header, rgb))
        for ns, mid in sorted(self._published - current):
            arr.markers.extend(self._delete(header, ns, mid))
        self._published = current
        return arr

    def clear(self, header):
        """``MarkerArray`` deleting every marker published so far (e.g. on deactivation)."""
        from visualization_msgs.msg import MarkerArray

        arr = MarkerArray()
        for ns, mid in sorted(self._published):
            arr.markers.extend(self._delete(header, ns, mid))
        self._published = set()
        return arr

    @property
    def published(self) -> set[tuple[str, int]]:
        """(namespace, id) of the boxes currently shown (each has a label in ``<ns>_labels``)."""
        return set(self._published)

    def _base(self, header, ns: str, mid: int, mtype: int, action: int):
        from visualization_msgs.msg import Marker

        m = Marker()
        m.header = header
        m.ns, m.id, m.type, m.action = ns, int(mid), mtype, action
        m.pose.orientation.w = 1.0
        m.lifetime.sec = int(self.lifetime)
        m.lifetime.nanosec = int(round((self.lifetime - int(self.lifetime)) * 1e9))
        return m

    def _delete(self, header, ns: str, mid: int) -> list:
        return [self._base(header, ns, mid, _CUBE, _DELETE), self._base(header, _label_ns(ns), mid, _TEXT, _DELETE)]

    def _segment_markers(self, seg, key: tuple[str, int], header, rgb) -> list:
        ns, mid = key
        box = self._base(header, ns, mid, _CUBE, _ADD)
        box.pose.position.x, box.pose.position.y, box.pose.position.z = seg.centroid.x, seg.centroid.y, seg.centroid.z
        box.scale.x = max(float(seg.size.x), self.min_scale)
        box.scale.y = max(float(seg.size.y), self.min_scale)
        box.scale.z = max(float(seg.size.z), self.min_scale)
        box.color.r, box.color.g, box.color.b = (c / 255.0 for c in rgb)
        box.color.a = self.alpha
        text = self._base(header, _label_ns(ns), mid, _TEXT, _ADD)
        text.pose.position.x, text.pose.position.z = seg.centroid.x, seg.centroid.z
        # above the box: y points down in the optical frame
        text.pose.position.y = seg.centroid.y - box.scale.y / 2.0 - self.text_height
        text.scale.z = self.text_height
        text.color.r = text.color.g = text.color.b = text.color.a = 1.0
        track = f" #{int(seg.track_id)}" if int(getattr(seg, "track_id", 0)) > 0 else ""
        text.text = f"{seg.label}{track} {seg.min_distance:.1f} m"
        return [box, text]


def _label_ns(ns: str) -> str:
    return ns[:-1] + "_labels"  # tracks -> track_labels, segments -> segment_labels


def detection_id(seg) -> str:
    """``Detection3D.id``: the track id where the segment is tracked (the same object keeps it, as
    vision_msgs asks), else ``"s<segment id>"`` (per frame; the prefix keeps it apart from track ids)."""
    track = int(getattr(seg, "track_id", 0))
    return str(track) if track > 0 else f"s{int(seg.id)}"


def detections_3d_msg(msg, header):
    """Thing segments with 3-D -> ``vision_msgs/Detection3DArray`` (only where vision_msgs is
    installed; raises ``ImportError`` otherwise).

    One detection per thing: ``bbox`` centred at the centroid with the robust extent as size
    (axis-aligned: identity orientation), one hypothesis (``class_id`` = dataset category id as a
    string, the segment's score, pose = centroid), ``id`` from :func:`detection_id`.
    """
    from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose

    arr = Detection3DArray()
    arr.header = header
    for seg in msg.segments:
        if not seg.isthing or not seg.has_3d:
            continue
        d = Detection3D()
        d.header = header
        d.id = detection_id(seg)
        d.bbox.center.position.x, d.bbox.center.position.y, d.bbox.center.position.z = (
            seg.centroid.x, seg.centroid.y, seg.centroid.z)
        d.bbox.center.orientation.w = 1.0
        d.bbox.size.x, d.bbox.size.y, d.bbox.size.z = seg.size.x, seg.size.y, seg.size.z
        hyp = ObjectHypothesisWithPose()
        hyp.hypothesis.class_id = str(int(seg.category_id))
        hyp.hypothesis.score = float(seg.score)
        hyp.pose.pose.position.x, hyp.pose.pose.position.y, hyp.pose.pose.position.z = (
            seg.centroid.x, seg.centroid.y, seg.centroid.z)
        hyp.pose.pose.orientation.w = 1.0
        d.results.append(hyp)
        arr.detections.append(d)
    return arr


def segment_colour_table(segments, colors: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """``(max_id + 1, 3)`` uint8 display colour by segment id (category colour, per-instance shade
    from the track id where tracked, as the markers): ``segment_colors`` of
    :func:`ciae_ros.point_cloud.cloud_points`."""
    segs = list(segments)
    top = max([int(s.id) for s in segs] + [0])
    table = np.zeros((top + 1, 3), np.uint8)
    for s in segs:
        track = int(getattr(s, "track_id", 0))
        base = colors.get(int(s.category_id), (128, 128, 128))
        table[int(s.id)] = instance_color(tuple(int(v) for v in base), track if track > 0 else int(s.id), bool(s.isthing))
    return table
