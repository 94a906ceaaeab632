"""Image geometry of inference: letterbox maths, resizing like training, segment tables, input checks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from ciae_core.data import resize_id_map, shortest_edge_size
from ciae_core.geometry import (Letterbox, letterbox, nearest_source_index, resize_image_like_cv2, resize_nearest,
                                segment_table, validate_image)
from ciae_core.predictor_error import PredictorError
from ciae_core.structures import segments_from_id_map


# ----------------------------------------------------------------------------------------------
# letterbox maths


@pytest.mark.parametrize("h,w,size,max_size", [(427, 641, 512, 1333), (641, 427, 800, 1333), (480, 640, 640, 1333),
                                               (100, 3000, 512, 1333), (333, 333, 320, 1333), (1080, 1920, 800, 1000),
                                               (9, 13, 320, 1333)])
def test_letterbox_matches_training_resize_and_pads_to_stride(h, w, size, max_size):
    lb = letterbox(h, w, size, max_size)
    assert lb.resized_size == shortest_edge_size(h, w, size, max_size)
    assert max(lb.resized_size) <= max_size + 1  # rounding only
    assert lb.padded_height % 32 == 0 and lb.padded_width % 32 == 0
    assert 0 <= lb.padded_height - lb.resized_height < 32 and 0 <= lb.padded_width - lb.resized_width < 32
    assert (lb.height, lb.width) == (h, w)


def test_letterbox_odd_size_exact_numbers():
    lb = letterbox(427, 641, 512, 1333)
    # scale 512/427: 641 * 512 / 427 = 768.6 -> 769; padded to 512 x 800
    assert lb == Letterbox(427, 641, 512, 769, 512, 800)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 640), (5, 7), (0, 10)])
def test_letterbox_rejects_tiny_images(h, w):
    with pytest.raises(PredictorError, match="too small"):
        letterbox(h, w, 512, 1333)


def test_letterbox_rejects_extreme_aspect_ratio():
    with pytest.raises(PredictorError, match="aspect ratio"):
        letterbox(10, 5000, 512, 1333)


@pytest.mark.parametrize("src,dst", [((7, 5), (427, 641)), ((512, 769), (427, 641)), ((10, 10), (3, 4)),
                                     ((256, 384), (427, 641))])
def test_resize_nearest_matches_training_label_resize(src, dst):
    rng = np.random.default_rng(0)
    m = rng.integers(0, 50, size=src).astype(np.int32)
    ours = resize_nearest(torch.from_numpy(m), dst).numpy()
    assert ours.shape == dst
    np.testing.assert_array_equal(ours, resize_id_map(m, dst))


@pytest.mark.parametrize("src,dst", [((427, 641), (256, 384)), ((1080, 1920), (800, 1422)), ((100, 100), (50, 50)),
                                     ((480, 640), (512, 683))])
def test_torch_image_resize_matches_cv2_training_resize(src, dst):
    rng = np.random.default_rng(0)
    im = cv2.GaussianBlur((rng.random((*src, 3)) * 255).astype(np.uint8), (5, 5), 2)
    shrink = dst[0] < src[0] and dst[1] < src[1]
    ref = cv2.resize(im, dst[::-1], interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR).astype(np.float32)
    ours = resize_image_like_cv2(torch.from_numpy(im).permute(2, 0, 1).float(), dst).permute(1, 2, 0).numpy()
    diff = np.abs(ours - ref)
    assert diff.max() <= 1.0
    # area averaging is exact up to float rounding; cv2's fixed-point bilinear differs by 1 in ~1/8
    assert (diff > 0).mean() < (1e-3 if shrink else 0.15)


def test_nearest_source_index_is_in_range_and_monotonic():
    for out_len, in_len in [(641, 512), (1, 7), (7, 1), (1000, 999)]:
        idx = nearest_source_index(out_len, in_len)
        assert idx.min() >= 0 and idx.max() <= in_len - 1
        assert bool((idx[1:] >= idx[:-1]).all())


def test_segment_table_equals_structures_reference():
    rng = np.random.default_rng(1)
    m = np.zeros((37, 53), np.int32)
    for k in range(1, 9):
        y, x = rng.integers(0, 30), rng.integers(0, 45)
        m[y:y + rng.integers(1, 8), x:x + rng.integers(1, 9)] = k
    m[m == 4] = 0  # an id with no pixels
    ids, areas, boxes = segment_table(torch.from_numpy(m), 9)
    ref = segments_from_id_map(m, {k: (k, str(k), True, 0.0) for k in range(1, 10)})
    assert ids.tolist() == [s.id for s in ref]
    assert areas.tolist() == [s.area for s in ref]
    assert [tuple(b) for b in boxes.tolist()] == [s.bbox for s in ref]


# ----------------------------------------------------------------------------------------------
# input checks and errors


@pytest.mark.parametrize("bad,match", [(np.zeros((20, 20, 3), np.float32), "uint8"),
                                       (np.zeros((20, 20), np.uint8), r"\(H, W, 3\)"),
                                       (np.zeros((20, 20, 4), np.uint8), r"\(H, W, 3\)"),
                                       (torch.zeros(20, 20, 3, dtype=torch.uint8), "numpy"),
                                       ([[1, 2, 3]], "numpy"),
                                       (np.zeros((20, 20, 3), np.uint16), r"img >> 8"),
                                       (np.zeros((2, 20, 20, 3), np.uint8), "pass a batch as a list")])
def test_validate_image_errors(bad, match):
    with pytest.raises(PredictorError, match=match):
        validate_image(bad)
