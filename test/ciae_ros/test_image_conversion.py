"""sensor_msgs/Image <-> numpy: every encoding, row padding, byte order and every error kind (no DDS)."""

from __future__ import annotations

import array
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from ciae_ros.image_conversion import (ImageConversionError, compressed_to_rgb, image_msg_to_array, image_to_rgb,
                                       numpy_to_image)

sensor_msgs = pytest.importorskip("sensor_msgs.msg")


def _rgb(h=6, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _msg(pixels: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False):
    """Image message of ``pixels`` (H, W[, C]) with ``pad`` garbage bytes after every row."""
    h, w = pixels.shape[:2]
    if pixels.dtype.itemsize > 1:
        pixels = pixels.astype(pixels.dtype.newbyteorder(">" if bigendian else "<"))
    rows = pixels.reshape(h, -1).view(np.uint8).reshape(h, -1)
    garbage = np.full((h, pad), 0xAB, np.uint8)
    data = np.concatenate([rows, garbage], axis=1)
    m = sensor_msgs.Image()
    m.height, m.width, m.encoding = h, w, encoding
    m.is_bigendian = int(bigendian)
    m.step = data.shape[1]
    m.data = array.array("B", data.tobytes())
    return m


@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("encoding,make", [
    ("rgb8", lambda rgb: rgb),
    ("bgr8", lambda rgb: rgb[:, :, ::-1]),
    ("8UC3", lambda rgb: rgb[:, :, ::-1]),
    ("rgba8", lambda rgb: np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])),
    ("bgra8", lambda rgb: np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 7, np.uint8)])),
])
def test_colour_8bit_round_trip(encoding, make, pad):
    rgb = _rgb()
    m = _msg(np.ascontiguousarray(make(rgb)), encoding, pad=pad)
    np.testing.assert_array_equal(image_to_rgb(m), rgb)
    np.testing.assert_array_equal(image_to_rgb(m, order="bgr"), rgb[:, :, ::-1])


@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
def test_mono8_is_replicated(encoding):
    g = _rgb()[:, :, 0]
    out = image_to_rgb(_msg(g, encoding, pad=3))
    assert out.shape == (*g.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("pad", [0, 3])  # odd padding: 16-bit rows start at odd offsets
def test_mono16_scaled_and_byte_order(bigendian, pad):
    vals = np.array([[0, 257, 257 * 100, 65535, 128, 32768]], np.uint16)
    out = image_to_rgb(_msg(vals, "mono16", pad=pad, bigendian=bigendian))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 100, 255, 0, 128])
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_16bit_colour_and_12bit_scale():
    rgb16 = np.array([[[4095, 0, 2048]]], np.uint16)
    out = image_to_rgb(_msg(rgb16, "rgb16"), scale16_max=4095)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 128])
    out = image_to_rgb(_msg(rgb16[:, :, ::-1].copy(), "bgr16", bigendian=True), scale16_max=4095)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 128])
    above = np.array([[60000]], np.uint16)
    assert image_to_rgb(_msg(above, "16UC1"), scale16_max=4095)[0, 0, 0] == 255  # clipped, not wrapped


def _uyvy(y: np.ndarray, u: np.ndarray, v: np.ndarray, order: str) -> np.ndarray:
    """Pack per-pixel Y and per-pair U, V into UYVY or YUYV bytes, shape (H, W, 2)."""
    h, w = y.shape
    out = np.empty((h, w // 2, 4), np.uint8)
    if order == "uyvy":
        out[..., 0], out[..., 1], out[..., 2], out[..., 3] = u, y[:, 0::2], v, y[:, 1::2]
    else:
        out[..., 0], out[..., 1], out[..., 2], out[..., 3] = y[:, 0::2], u, y[:, 1::2], v
    return out.reshape(h, w, 2)


@pytest.mark.parametrize("encoding,order", [("yuv422", "uyvy"), ("uyvy", "uyvy"), ("yuv422_yuy2", "yuyv"),
                                            ("yuyv", "yuyv")])
def test_yuv422(encoding, order):
    h, w = 4, 8
    y = np.full((h, w), 120, np.uint8)
    u = np.full((h, w // 2), 128, np.uint8)
    v = np.full((h, w // 2), 128, np.uint8)
    v[:, 2:] = 220  # right half: strong red chroma
    out = image_to_rgb(_msg(_uyvy(y, u, v, order), encoding, pad=4))
    left, right = out[:, :4].astype(int), out[:, 4:].astype(int)
    assert np.all(np.abs(left - left[..., :1]) <= 2), "neutral chroma must give grey"
    assert np.all(right[..., 0] > right[..., 2] + 60), "high V must give red"


def test_yuv422_odd_width_rejected():
    m = _msg(np.zeros((2, 3, 2), np.uint8), "yuv422")
    with pytest.raises(ImageConversionError) as e:
        image_to_rgb(m)
    assert e.value.reason == "bad_size"


@pytest.mark.parametrize("encoding,pattern", [("bayer_rggb8", "RGGB"), ("bayer_bggr8", "BGGR"),
                                              ("bayer_gbrg8", "GBRG"), ("bayer_grbg8", "GRBG")])
def test_bayer_patterns(encoding, pattern):
    colour = {"R": 200, "G": 100, "B": 30}
    h, w = 8, 8
    mosaic = np.empty((h, w), np.uint8)
    for dy in range(2):
        for dx in range(2):
            mosaic[dy::2, dx::2] = colour[pattern[2 * dy + dx]]
    out = image_to_rgb(_msg(mosaic, encoding))
    np.testing.assert_allclose(out[2:-2, 2:-2].reshape(-1, 3).astype(float), [[200, 100, 30]] * 16, atol=2)


@pytest.mark.parametrize("setup,reason", [
    (lambda m: setattr(m, "encoding", "32FC1"), "unsupported_encoding"),
    (lambda m: setattr(m, "encoding", "jpeg"), "unsupported_encoding"),
    (lambda m: setattr(m, "step", m.width * 3 - 1), "bad_step"),
    (lambda m: setattr(m, "data", m.data[:-1]), "short_data"),
    (lambda m: (setattr(m, "height", 0), setattr(m, "width", 0), setattr(m, "data", array.array("B"))), "empty"),
    (lambda m: setattr(m, "height", 5000000), "too_large"),
])
def test_errors_have_reason_and_message(setup, reason):
    m = _msg(_rgb(), "rgb8")
    setup(m)
    with pytest.raises(ImageConversionError) as e:
        image_to_rgb(m, max_pixels=10_000_000)
    assert e.value.reason == reason
    assert "\n" not in str(e.value) and len(str(e.value)) > 10


def test_too_large_respects_limit_argument():
    m = _msg(_rgb(6, 10), "rgb8")
    image_to_rgb(m, max_pixels=60)
    with pytest.raises(ImageConversionError, match="max_image_pixels=59"):
        image_to_rgb(m, max_pixels=59)


def test_duck_typed_message_like_rosbags():
    rgb = _rgb()
    m = SimpleNamespace(height=6, width=10, encoding="bgr8", is_bigendian=0, step=30,
                        data=np.ascontiguousarray(rgb[:, :, ::-1]).reshape(-1))
    np.testing.assert_array_equal(image_to_rgb(m), rgb)


def test_compressed_jpeg_and_png():
    yy, xx = np.mgrid[0:48, 0:64]
    rgb = np.dstack([xx * 4, yy * 5, np.full_like(xx, 90)]).astype(np.uint8)
    ok, jpg = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    m = sensor_msgs.CompressedImage(format="jpeg", data=array.array("B", jpg.tobytes()))
    out = compressed_to_rgb(m)
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb).mean() < 3
    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])
    m = sensor_msgs.CompressedImage(format="png", data=array.array("B", png.tobytes()))
    np.testing.assert_array_equal(compressed_to_rgb(m), rgb)
    np.testing.assert_array_equal(compressed_to_rgb(m, order="bgr"), rgb[:, :, ::-1])
    with pytest.raises(ImageConversionError) as e:
        compressed_to_rgb(m, max_pixels=100)
    assert e.value.reason == "too_large"


@pytest.mark.parametrize("data,reason", [(b"", "empty"), (b"\xff\xd8\xff\xe0 definitely not a jpeg", "decode_failed")])
def test_compressed_errors(data, reason):
    m = sensor_msgs.CompressedImage(format="jpeg", data=array.array("B", data))
    with pytest.raises(ImageConversionError) as e:
        compressed_to_rgb(m)
    assert e.value.reason == reason


def test_numpy_to_image_round_trips():
    ids = np.random.default_rng(1).integers(-5, 1 << 20, size=(7, 9), dtype=np.int32)
    m = numpy_to_image(ids, "32SC1")
    assert (m.height, m.width, m.step, m.encoding, m.is_bigendian) == (7, 9, 36, "32SC1", 0)
    np.testing.assert_array_equal(image_msg_to_array(m), ids)
    big = _msg(ids, "32SC1", pad=4, bigendian=True)
    np.testing.assert_array_equal(image_msg_to_array(big), ids)
    rgb = _rgb()
    np.testing.assert_array_equal(image_to_rgb(numpy_to_image(rgb, "rgb8")), rgb)
    conf = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(image_msg_to_array(numpy_to_image(conf, "32FC1")), conf)
    with pytest.raises(ValueError, match="32SC1"):
        numpy_to_image(ids.astype(np.int64), "32SC1")
