"""sensor_msgs/Image <-> numpy: every encoding, row padding, byte order and every error kind (no DDS)."""

from __future__ import annotations

import array
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

import image_bombs
from ros_testing import REPO, huge_jpeg, huge_png

from ciae_ros.image_conversion import (ImageConversionError, compressed_image_size, compressed_to_rgb,
                                       image_msg_to_array, image_to_rgb, numpy_to_image)

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


def _compressed(data: bytes, fmt: str = "png"):
    return sensor_msgs.CompressedImage(format=fmt, data=array.array("B", data))


def test_compressed_size_comes_from_the_header_for_jpeg_png_tiff():
    rgb = _rgb(37, 53)
    for ext, codec, params in [(".jpg", "jpeg", []), (".jpg", "jpeg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
                               (".png", "png", []), (".tiff", "tiff", [])]:
        ok, enc = cv2.imencode(ext, rgb[:, :, ::-1], params)
        assert ok
        assert compressed_image_size(enc.tobytes()) == (codec, 53, 37)
        assert compressed_image_size(array.array("B", enc.tobytes())) == (codec, 53, 37)  # rclpy's type
        assert compressed_image_size(enc) == (codec, 53, 37)  # numpy (rosbags)
        out = compressed_to_rgb(_compressed(enc.tobytes(), codec))
        assert out.shape == (37, 53, 3)
        if codec != "jpeg":
            np.testing.assert_array_equal(out, rgb)
    # a frame header behind a large APP segment (EXIF/ICC data) is still found
    ok, enc = cv2.imencode(".jpg", rgb[:, :, ::-1])
    app = b"\xff\xe2" + (2 + 60000).to_bytes(2, "big") + bytes(60000)
    data = enc.tobytes()[:2] + app + enc.tobytes()[2:]
    assert compressed_image_size(data) == ("jpeg", 53, 37)
    assert compressed_to_rgb(_compressed(data, "jpeg")).shape == (37, 53, 3)
    # stray bytes before a marker (some cameras write them): libjpeg skips them with a warning,
    # so the header walk must too
    second = 4 + int.from_bytes(enc.tobytes()[4:6], "big")  # the marker after the first segment
    stray = enc.tobytes()[:second] + b"\x00\x00" + enc.tobytes()[second:]
    assert cv2.imdecode(np.frombuffer(stray, np.uint8), cv2.IMREAD_COLOR).shape == (37, 53, 3)
    assert compressed_image_size(stray) == ("jpeg", 53, 37)
    assert compressed_to_rgb(_compressed(stray, "jpeg")).shape == (37, 53, 3)


def _tiff_claiming(width: int, height: int) -> bytes:
    """A real small TIFF whose ImageWidth/ImageLength entries are rewritten (classic little-endian)."""
    ok, enc = cv2.imencode(".tiff", _rgb(8, 8))
    data = bytearray(enc.tobytes())
    ifd = int.from_bytes(data[4:8], "little")
    for k in range(int.from_bytes(data[ifd:ifd + 2], "little")):
        e = ifd + 2 + 12 * k
        tag = int.from_bytes(data[e:e + 2], "little")
        if tag in (256, 257):
            data[e + 2:e + 4] = (4).to_bytes(2, "little")  # LONG
            data[e + 8:e + 12] = (width if tag == 256 else height).to_bytes(4, "little")
    return bytes(data)


@pytest.mark.parametrize("codec,data", [
    ("png", huge_png(20000, 20000, valid=False)),   # IHDR says 20000x20000, the body is not even deflate data
    ("jpeg", huge_jpeg(20000, 20000)),
    ("tiff", _tiff_claiming(20000, 20000)),
])
def test_oversized_compressed_frame_is_rejected_from_its_header(codec, data):
    assert compressed_image_size(data) == (codec, 20000, 20000)
    with pytest.raises(ImageConversionError) as e:
        compressed_to_rgb(_compressed(data, codec))  # default limit: 33 MP
    # without the header check the invalid PNG would be decode_failed (after allocating 1.2 GB)
    assert e.value.reason == "too_large"
    assert "20000x20000" in str(e.value) and "header" in str(e.value) and "\n" not in str(e.value)


def test_tiny_but_huge_compressed_images_cost_no_decoding_memory():
    """A 48 KB valid PNG and a 631-byte JPEG that decode to 20000x20000 (1.2 GB BGR; OpenCV peaks at
    2.3 GB): the peak resident memory of a fresh process must not move when they are rejected.
    Measured in a subprocess (ru_maxrss is a per-process high-water mark)."""
    code = """
import json, resource, sys, types
from ros_testing import huge_jpeg, huge_png
from ciae_ros.image_conversion import ImageConversionError, compressed_to_rgb
data = huge_png(20000, 20000) if sys.argv[1] == "png" else huge_jpeg(20000, 20000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    compressed_to_rgb(types.SimpleNamespace(format=sys.argv[1], data=data))
    reason = None
except ImageConversionError as exc:
    reason = exc.reason
print(json.dumps([reason, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024]))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "test" / "ciae_ros")])}
    for name in ("png", "jpeg"):  # one process each: the high-water mark of the first would hide the second
        res = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, timeout=300,
                             cwd=REPO, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        reason, grown_mb = json.loads(res.stdout.strip().splitlines()[-1])
        assert reason == "too_large", (name, reason)
        assert grown_mb < 100, f"{name}: peak memory grew by {grown_mb:.0f} MB while rejecting a huge frame"


@pytest.mark.parametrize("data,reason", [
    (cv2.imencode(".webp", np.zeros((8, 8, 3), np.uint8))[1].tobytes(), "unsupported_format"),
    (cv2.imencode(".bmp", np.zeros((8, 8, 3), np.uint8))[1].tobytes(), "unsupported_format"),
    (b"II+\x00" + bytes(12), "unsupported_format"),                        # BigTIFF
    (b"\x00\x00\x00\x0c" + bytes(100), "unsupported_format"),              # compressedDepth's header + PNG
    (b"\x89PNG\r\n\x1a\n\x00\x00", "decode_failed"),                       # cut in the IHDR
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "decode_failed"),                 # no frame header
    (b"\xff\xd8\xff\xda\x00\x08" + bytes(20), "decode_failed"),              # scan before the frame header
    (b"II*\x00\xff\xff\x00\x00", "decode_failed"),                           # IFD outside the data
])
def test_compressed_formats_we_cannot_size_are_refused(data, reason):
    with pytest.raises(ImageConversionError) as e:
        compressed_to_rgb(_compressed(data, "x"))
    assert e.value.reason == reason
    assert "\n" not in str(e.value) and len(str(e.value)) > 10


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


# ----------------------------------------------------------------------------------------------
# adversarial headers (image_bombs.py): one reason each, and the decoder itself refuses
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bomb", image_bombs.bombs(), ids=lambda b: b.name)
def test_every_bomb_is_refused_under_one_reason_or_decoded_as_its_true_image(bomb):
    """In this process OpenCV's own limit is its default (2**30 pixels), so what refuses here is
    the header check; the frames that are legitimate small images whatever their headers hide
    (a huge EXIF thumbnail, a decoy SOF in an APP segment, a huge second TIFF page) decode."""
    m = _compressed(bomb.data, bomb.codec)
    if bomb.expect == "ok":
        assert compressed_to_rgb(m, max_pixels=image_bombs.LIMIT).shape == bomb.shape
        return
    with pytest.raises(ImageConversionError) as e:
        compressed_to_rgb(m, max_pixels=image_bombs.LIMIT)
    assert e.value.reason == bomb.expect, str(e.value)
    text = str(e.value)
    assert "\n" not in text and 10 < len(text) < 300, text
    if bomb.expect == "too_large" and bomb.decoder_size is not None:
        assert f"{bomb.decoder_size[0]}x{bomb.decoder_size[1]}" in text  # WIDTHxHEIGHT, as the decoder sees it


_DECODE_IN_FRESH_PROCESS = """
import json, pathlib, sys, types
from image_bombs import reset_peak_rss, rss_mib
from ciae_ros.image_conversion import (ImageConversionError, compressed_to_rgb, decoder_pixel_limit,
                                       set_decoder_pixel_limit)
limit, header_check = int(sys.argv[1]), sys.argv[2] == "1"
assert set_decoder_pixel_limit(limit) == limit == decoder_pixel_limit()
out = []
for path in sys.argv[3:]:
    msg = types.SimpleNamespace(format="x", data=pathlib.Path(path).read_bytes())
    reset_peak_rss()
    before = rss_mib("self")
    try:
        compressed_to_rgb(msg, max_pixels=limit if header_check else None)
        reason, text = "ok", ""
    except ImageConversionError as exc:
        reason, text = exc.reason, str(exc)
    out.append([pathlib.Path(path).name, reason, text, rss_mib("self", "VmHWM") - before])
print(json.dumps(out))
"""


def _decode_in_fresh_process(tmp_path, cases, limit: int, header_check: bool) -> dict:
    """Decode ``cases`` one after the other in a new process whose OpenCV decoder limit is
    ``limit``; ``{name: (reason, message, peak RSS growth in MiB during this case)}`` (the peak is
    reset before each case through /proc/self/clear_refs)."""
    paths = []
    for b in cases:
        (tmp_path / b.name).write_bytes(b.data)
        paths.append(str(tmp_path / b.name))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "test" / "ciae_ros")])}
    env.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)
    res = subprocess.run([sys.executable, "-c", _DECODE_IN_FRESH_PROCESS, str(limit), str(int(header_check)), *paths],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return {name: (reason, text, grown) for name, reason, text, grown in json.loads(res.stdout.splitlines()[-1])}


def test_opencv_decoder_refuses_every_bomb_itself(tmp_path):
    """No header check (max_pixels=None): OpenCV's decoder, limited by set_decoder_pixel_limit,
    is the only size guard, and it refuses every bomb its own header reader can size before
    allocating anything: peak memory stays within the bound for the limit (a decoded 16000x16000
    frame would be 768 MB)."""
    limit = image_bombs.LIMIT
    cases = [b for b in image_bombs.bombs() if b.decoder_bounded]
    got = _decode_in_fresh_process(tmp_path, cases, limit, header_check=False)
    bound = image_bombs.rss_bound_mb(limit)
    for b in cases:
        reason, text, grown = got[b.name]
        assert grown <= bound, f"{b.name}: peak RSS grew by {grown:.0f} MiB (bound {bound:.0f} MiB for {limit} pixels)"
        if b.expect == "ok":
            assert reason == "ok", (b.name, text)
        elif b.decoder_size is not None and b.decoder_size[0] * b.decoder_size[1] > limit and b.expect == "too_large":
            assert reason == "too_large" and "refused by the decoder" in text, (b.name, reason, text)
        else:  # refused by the container check, or the decoder cannot read a header at all
            assert reason in ("unsupported_format", "decode_failed"), (b.name, reason, text)


def test_decoding_just_under_the_limit_costs_a_bounded_number_of_bytes_per_pixel(tmp_path):
    """The same quirks declaring exactly the limit (1000x1000) are not refused by size: what
    decoding (or failing to decode) them costs is what the bound of the node's RSS test allows
    per permitted pixel (progressive JPEG coefficient buffers included)."""
    limit = image_bombs.LIMIT
    cases = [b for b in image_bombs.bombs((1000, 1000)) if b.decoder_bounded]
    got = _decode_in_fresh_process(tmp_path, cases, limit, header_check=True)
    bound = image_bombs.rss_bound_mb(limit)
    assert any(reason == "ok" and name == "jpeg_progressive_sof2_huge" for name, (reason, _, _) in got.items())
    for name, (reason, text, grown) in got.items():
        assert grown <= bound, f"{name}: {reason}, peak RSS grew by {grown:.0f} MiB (bound {bound:.0f} MiB)"


_LOAD_ORDER = """
import os, sys
from ciae_ros import image_conversion as ic
assert ic.decoder_pixel_limit() is None  # OpenCV not loaded yet
if sys.argv[1] == "late":
    import cv2  # someone else loads OpenCV first: the limit set afterwards does not reach it
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = "1000"
print(ic.set_decoder_pixel_limit(1000), ic.decoder_pixel_limit())
import cv2, numpy as np
png = cv2.imencode(".png", np.zeros((40, 40, 3), np.uint8))[1]   # 1600 pixels
try:
    print("decoded", cv2.imdecode(png, cv2.IMREAD_COLOR).shape[:2])
except cv2.error as exc:
    print("refused", "validateInputImageSize" in str(exc))
"""


@pytest.mark.parametrize("order,expected", [("first", "1000 1000\nrefused True"),
                                            ("late", "None None\ndecoded (40, 40)")])
def test_opencv_reads_its_pixel_limit_once_when_it_loads(order, expected):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)
    res = subprocess.run([sys.executable, "-c", _LOAD_ORDER, order], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == expected


def test_tiled_tiff_and_foreign_tiff_compressions_are_refused():
    """OpenCV sizes a TIFF tile buffer by the tile, not by the image, beyond its pixel limit."""
    tiled = image_bombs.bomb("tiff_tile_larger_than_image").data
    with pytest.raises(ImageConversionError, match="tiled TIFF") as e:
        compressed_image_size(tiled)
    assert e.value.reason == "unsupported_format"
    page = [(t, k, 7 if t == 259 else v) for t, k, v in image_bombs._grey_page(16, 16, bytes(256))]  # JPEG
    with pytest.raises(ImageConversionError, match="compression 7") as e:
        compressed_image_size(image_bombs._tiff([page], [bytes(256)]))
    assert e.value.reason == "unsupported_format"
    lzw = cv2.imencode(".tiff", _rgb(8, 8))[1].tobytes()  # OpenCV writes LZW strips
    assert compressed_image_size(lzw) == ("tiff", 8, 8)


def test_jpeg_header_walk_is_bounded_and_skips_stuffing_like_libjpeg():
    jpg = image_bombs.real_jpeg(16, 16)
    many = jpg[:2] + b"\xff\xfe\x00\x02" * 5000 + jpg[2:]  # 5000 empty comments before the frame header
    with pytest.raises(ImageConversionError, match="more than 4096 segments") as e:
        compressed_image_size(many)
    assert e.value.reason == "decode_failed"
    assert compressed_image_size(jpg[:2] + b"\xff\xfe\x00\x02" * 100 + jpg[2:]) == ("jpeg", 16, 16)
    stuffed = image_bombs.jpeg_ff00_before_sof(640, 480)
    assert compressed_image_size(stuffed) == ("jpeg", 640, 480)
    assert cv2.imdecode(np.frombuffer(stuffed, np.uint8), cv2.IMREAD_COLOR).shape == (480, 640, 3)


def test_echoed_user_input_is_capped():
    m = _msg(_rgb(), "rgb8")
    m.encoding = "x" * 65536
    with pytest.raises(ImageConversionError) as e:
        image_to_rgb(m)
    assert e.value.reason == "unsupported_encoding" and len(str(e.value)) < 400 and "65536 characters" in str(e.value)
    c = _compressed(b"GIF89a" + bytes(40), "f" * 65536)
    with pytest.raises(ImageConversionError) as e:
        compressed_to_rgb(c)
    assert e.value.reason == "unsupported_format" and len(str(e.value)) < 400
