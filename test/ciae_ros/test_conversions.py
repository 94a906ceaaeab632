"""PanopticResult -> messages and the overlay (no DDS: message classes only)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ciae_ros.msg")

from std_msgs.msg import Header  # noqa: E402

from ciae_core.structures import CategoryInfo, PanopticResult, segments_from_id_map  # noqa: E402
from ciae_core import visualize  # noqa: E402
from ciae_core.visualize import category_colors  # noqa: E402
from ciae_ros.conversions import categories_msg, detections_msg, render_overlay, segments_msg  # noqa: E402
from ciae_ros.image_conversion import image_msg_to_array  # noqa: E402

CATS = [CategoryInfo(5, "car", True, (255, 0, 0)), CategoryInfo(40, "road", False, (0, 0, 255))]


def _result() -> PanopticResult:
    ids = np.zeros((6, 8), np.int32)
    ids[:, :4] = 1          # road (stuff)
    ids[1:3, 5:7] = 2       # car instance
    ids[4:6, 5:8] = 3       # another car
    meta = {1: (40, "road", False, 0.7), 2: (5, "car", True, 0.9), 3: (5, "car", True, 1.3)}
    return PanopticResult(id_map=ids, segments=segments_from_id_map(ids, meta))


def test_segments_msg_carries_everything():
    res = _result()
    header = Header(frame_id="cam")
    header.stamp.sec, header.stamp.nanosec = 12, 34
    msg = segments_msg(res, header, "m", "sha256:abc", (320, 427), 12.5)
    assert msg.header.frame_id == "cam" and msg.id_image.header.stamp.sec == 12
    np.testing.assert_array_equal(image_msg_to_array(msg.id_image), res.id_map)
    assert [s.id for s in msg.segments] == [1, 2, 3]
    road, car, car2 = msg.segments
    assert (road.category_id, road.label, road.isthing, road.area) == (40, "road", False, 24)
    assert (car.bbox.x_offset, car.bbox.y_offset, car.bbox.width, car.bbox.height) == (5, 1, 2, 2)
    assert car.area == 4 and car2.area == 6
    assert car2.score == pytest.approx(1.0), "scores are clamped to [0, 1]"
    assert (msg.input_height, msg.input_width, msg.model_name, msg.model_version) == (320, 427, "m", "sha256:abc")
    assert msg.inference_time_ms == pytest.approx(12.5)


def test_categories_msg_advertises_the_overlay_colours():
    msg = categories_msg(CATS, "m", Header())
    assert [c.id for c in msg.categories] == [5, 40] and msg.model_name == "m"
    assert msg.categories[1].isthing is False
    palette = category_colors(CATS)
    for c in msg.categories:
        rgba = (c.color.r, c.color.g, c.color.b, c.color.a)
        assert rgba == pytest.approx((*(v / 255.0 for v in palette[c.id]), 1.0))
    assert palette[5] != CATS[0].color, "the overlay's palette, not the model file's colour"


def test_overlay_is_the_shared_renderer_in_the_advertised_colours():
    """The node draws panoptic/overlay through conversions.render_overlay: ciae_core's renderer
    (tested in test/ciae_core/test_visualize.py), called as the node calls it (a dict keyed by
    category id); stuff pixels get the colour panoptic/categories advertises."""
    res = _result()
    image = np.zeros((6, 8, 3), np.uint8)
    bgr = render_overlay(image, res, {c.id: c.color for c in CATS}, 1.0)
    np.testing.assert_array_equal(bgr, visualize.render_overlay(image, res, CATS, alpha=1.0))
    road = categories_msg(CATS, "m", Header()).categories[1].color
    assert tuple(bgr[0, 0]) == tuple(round(v * 255) for v in (road.b, road.g, road.r))


def test_detections_need_vision_msgs():
    try:
        import vision_msgs.msg  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError):
            detections_msg(_result(), Header())
        pytest.skip("vision_msgs is not installable here; Detection2DArray output untested")
    arr = detections_msg(_result(), Header())
    assert [d.id for d in arr.detections] == ["2", "3"]
    assert arr.detections[0].bbox.center.position.x == pytest.approx(6.0)
