"""``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` <-> numpy, without cv_bridge.

The one place where camera bytes become model input. Works on anything shaped like the messages
(``height``, ``width``, ``encoding``, ``is_bigendian``, ``step``, ``data``; ``format``/``data`` for
compressed images), so the same code serves rclpy messages and rosbags-deserialised ones.

Every malformed frame raises :class:`ImageConversionError`, whose ``reason`` is a short stable key
(counted per key in the node's /diagnostics) and whose message says what was wrong in one line.

Decisions (a careful camera-driver user's defaults, all arguments):

* ``step`` (row stride in bytes) may be larger than ``width * bytes_per_pixel`` (row padding is
  skipped); smaller is an error (``bad_step``). ``data`` must hold ``step * height`` bytes
  (``short_data``); extra trailing bytes are ignored.
* 16-bit images are scaled to 8 bits linearly with ``value * 255 / scale16_max``
  (``scale16_max=65535``: the full 16-bit range; set 4095 for a 12-bit sensor), clipped.
  ``is_bigendian`` selects the byte order of 16-bit samples.
* Alpha channels are dropped; mono images are replicated to three channels.
* YUV 4:2:2 (``yuv422``/``uyvy`` = UYVY byte order, ``yuv422_yuy2``/``yuyv`` = YUYV) and the four
  8-bit Bayer patterns are converted with OpenCV; an odd width for YUV 4:2:2 is an error.
* Anything else (e.g. float depth images) is ``unsupported_encoding``; when the ROS 2 ``cv_bridge``
  is importable (a real ROS install) it is tried for encodings not listed here.
* Compressed images are sized from their stream header **before** anything is decoded, so a small
  message claiming a huge image (a 425 KB PNG of 20000x20000 decodes to 1.2 GB) is rejected as
  ``too_large`` without allocating it. Accepted containers are the three codecs that ROS 2's
  ``compressed_image_transport`` produces (``sensor_msgs/CompressedImage``: jpeg, png, tiff), each
  recognised by its magic bytes, not by the free-text ``format`` field: PNG (IHDR), JPEG (the SOFn
  frame header, found by walking the marker segments) and classic TIFF (ImageWidth/ImageLength of
  the first IFD). Everything else OpenCV could decode (WebP, BMP, PNM, JPEG 2000, BigTIFF,
  ``compressedDepth``'s header-prefixed PNG, ...) is refused as ``unsupported_format``: we do not
  decode what we cannot size first.
"""

from __future__ import annotations

import array
import sys

import cv2
import numpy as np


# encoding -> (channels, bytes per channel, channel order of the colour channels)
_PLAIN_ENCODINGS: dict[str, tuple[int, int, str]] = {
    "rgb8": (3, 1, "rgb"), "bgr8": (3, 1, "bgr"), "rgba8": (4, 1, "rgb"), "bgra8": (4, 1, "bgr"),
    "mono8": (1, 1, "mono"), "8UC1": (1, 1, "mono"), "8UC3": (3, 1, "bgr"), "8UC4": (4, 1, "bgr"),
    "rgb16": (3, 2, "rgb"), "bgr16": (3, 2, "bgr"), "rgba16": (4, 2, "rgb"), "bgra16": (4, 2, "bgr"),
    "mono16": (1, 2, "mono"), "16UC1": (1, 2, "mono"), "16UC3": (3, 2, "bgr"),
}
# YUV 4:2:2: 2 bytes per pixel, converted by OpenCV.
_YUV422_CODES = {
    "yuv422": cv2.COLOR_YUV2RGB_UYVY, "uyvy": cv2.COLOR_YUV2RGB_UYVY,
    "yuv422_yuy2": cv2.COLOR_YUV2RGB_YUY2, "yuyv": cv2.COLOR_YUV2RGB_YUY2,
}
# 8-bit Bayer mosaics, named by the colours of the top-left 2x2 block read row by row.
_BAYER_CODES = {
    "bayer_rggb8": cv2.COLOR_BayerRGGB2RGB, "bayer_bggr8": cv2.COLOR_BayerBGGR2RGB,
    "bayer_gbrg8": cv2.COLOR_BayerGBRG2RGB, "bayer_grbg8": cv2.COLOR_BayerGRBG2RGB,
}
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_PLAIN_ENCODINGS) + tuple(_YUV422_CODES) + tuple(_BAYER_CODES)

#: Default upper bound on ``width * height`` accepted by :func:`image_to_rgb` (about 33 MP).
DEFAULT_MAX_PIXELS = 8192 * 4096


class ImageConversionError(ValueError):
    """A frame that cannot be converted; ``reason`` is a short key for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def bytes_per_pixel(encoding: str) -> int:
    """Bytes per pixel of a supported raw encoding (raises ``unsupported_encoding``)."""
    if encoding in _PLAIN_ENCODINGS:
        ch, size, _ = _PLAIN_ENCODINGS[encoding]
        return ch * size
    if encoding in _YUV422_CODES:
        return 2
    if encoding in _BAYER_CODES:
        return 1
    raise ImageConversionError(
        "unsupported_encoding",
        f"unsupported image encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}")


def _check_size(height: int, width: int, max_pixels: int | None) -> None:
    if height <= 0 or width <= 0:
        raise ImageConversionError("empty", f"empty image ({width}x{height})")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageConversionError(
            "too_large", f"image {width}x{height} has {width * height} pixels, above the limit "
                         f"max_image_pixels={max_pixels}")


def _rows(msg, bpp: int) -> np.ndarray:
    """``(H, W*bpp)`` uint8 view of the pixel bytes of ``msg`` with row padding removed."""
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    row = w * bpp
    if step < row:
        raise ImageConversionError(
            "bad_step", f"step {step} is smaller than width*bytes_per_pixel = {w}*{bpp} = {row} "
                        f"for encoding {msg.encoding!r}")
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    need = step * h
    if buf.size < need:
        raise ImageConversionError(
            "short_data", f"data has {buf.size} bytes, expected step*height = {step}*{h} = {need}")
    return buf[:need].reshape(h, step)[:, :row]


def _scale16(a: np.ndarray, scale16_max: int) -> np.ndarray:
    if scale16_max == 65535:
        # exact and fast: v * 255 / 65535 == v / 257
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return np.clip(np.rint(a.astype(np.float32) * (255.0 / scale16_max)), 0, 255).astype(np.uint8)


def image_to_rgb(msg, max_pixels: int | None = DEFAULT_MAX_PIXELS, scale16_max: int = 65535,
                 order: str = "rgb") -> np.ndarray:
    """Convert a ``sensor_msgs/Image`` (or look-alike) to a ``(H, W, 3)`` uint8 array.

    ``order`` is ``"rgb"`` or ``"bgr"`` (channel order of the result). The result may share memory
    with ``msg.data`` when no conversion is needed (treat it as read-only).
    Raises :class:`ImageConversionError` (reasons: ``empty``, ``too_large``,
    ``unsupported_encoding``, ``bad_step``, ``short_data``).
    """
    if order not in ("rgb", "bgr"):
        raise ValueError(f"order must be 'rgb' or 'bgr', got {order!r}")
    if not 1 <= scale16_max <= 65535:
        raise ValueError(f"scale16_max must be in 1..65535, got {scale16_max}")
    h, w = int(msg.height), int(msg.width)
    _check_size(h, w, max_pixels)
    enc = str(msg.encoding)
    if enc in _PLAIN_ENCODINGS:
        ch, size, src_order = _PLAIN_ENCODINGS[enc]
        rows = _rows(msg, ch * size)
        if size == 2:
            dt = np.dtype(">u2" if msg.is_bigendian else "<u2")
            px = _scale16(np.ascontiguousarray(rows).view(dt).reshape(h, w, ch), scale16_max)
        else:
            px = rows.reshape(h, w, ch)
        if src_order == "mono":
            return np.repeat(px, 3, axis=2)
        px = px[:, :, :3]
        return px if src_order == order else px[:, :, ::-1]
    if enc in _YUV422_CODES:
        if w % 2:
            raise ImageConversionError("bad_size", f"{enc} needs an even width, got {w}")
        rows = np.ascontiguousarray(_rows(msg, 2)).reshape(h, w, 2)
        rgb = cv2.cvtColor(rows, _YUV422_CODES[enc])
        return rgb if order == "rgb" else rgb[:, :, ::-1]
    if enc in _BAYER_CODES:
        rows = np.ascontiguousarray(_rows(msg, 1))
        rgb = cv2.cvtColor(rows, _BAYER_CODES[enc])
        return rgb if order == "rgb" else rgb[:, :, ::-1]
    converted = _cv_bridge_to_rgb(msg, order)
    if converted is not None:
        return converted
    raise ImageConversionError(
        "unsupported_encoding", f"unsupported image encoding {enc!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}")


_CV_BRIDGE = None  # None: not tried yet; False: not importable


def _cv_bridge_to_rgb(msg, order: str) -> np.ndarray | None:
    """Convert with the ROS 2 ``cv_bridge`` when it is importable (real ROS installs only)."""
    global _CV_BRIDGE
    if _CV_BRIDGE is None:
        try:
            from cv_bridge import CvBridge  # ROS 2 cv_bridge; the PyPI "cv-bridge" is ROS 1 code

            _CV_BRIDGE = CvBridge()
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            _CV_BRIDGE = False
    if _CV_BRIDGE is False:
        return None
    try:
        return np.asarray(_CV_BRIDGE.imgmsg_to_cv2(msg, desired_encoding=f"{order}8"))
    except Exception as exc:  # noqa: BLE001 - cv_bridge raises its own CvBridgeError
        raise ImageConversionError("unsupported_encoding",
                                   f"cv_bridge could not convert encoding {msg.encoding!r}: {exc}") from None


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC), which share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# markers without a length field: TEM and RST0..7 (SOI/EOI are handled explicitly)
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _u16(b, big: bool) -> int:
    return int.from_bytes(b[:2], "big" if big else "little")


def _u32(b, big: bool) -> int:
    return int.from_bytes(b[:4], "big" if big else "little")


def _png_size(data: memoryview) -> tuple[int, int]:
    # signature (8), IHDR length (4), "IHDR" (4), width (4, big-endian), height (4)
    if len(data) < 24 or bytes(data[12:16]) != b"IHDR":
        raise ImageConversionError("decode_failed", "PNG without an IHDR header chunk")
    return _u32(data[16:20], True), _u32(data[20:24], True)


def _jpeg_size(data: memoryview) -> tuple[int, int]:
    """Width and height from the first SOFn segment. Stray bytes between segments are skipped up
    to the next 0xFF, as libjpeg does (it only warns "extraneous bytes before marker"): some
    cameras write them, and their frames decode."""
    i, n = 2, len(data)  # after SOI (FF D8)
    while i < n:
        while i < n and data[i] != 0xFF:  # extraneous bytes before a marker
            i += 1
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # EOI / start of scan before any frame header
            break
        if i + 2 > n:
            break
        length = _u16(data[i:i + 2], True)
        if length < 2:
            raise ImageConversionError("decode_failed", f"JPEG segment of length {length} at byte {i}")
        if marker in _JPEG_SOF:
            if i + 7 > n:
                break
            # length (2), sample precision (1), number of lines (2), samples per line (2)
            height, width = _u16(data[i + 3:i + 5], True), _u16(data[i + 5:i + 7], True)
            if height == 0:
                raise ImageConversionError("decode_failed", "JPEG height defined by a DNL marker is not supported")
            return width, height
        i += length
    raise ImageConversionError("decode_failed", "JPEG without a frame header (SOFn) before its image data")


def _tiff_size(data: memoryview) -> tuple[int, int]:
    big = bytes(data[:2]) == b"MM"
    ifd = _u32(data[4:8], big)
    if ifd < 8 or ifd + 2 > len(data):
        raise ImageConversionError("decode_failed", f"TIFF first IFD offset {ifd} outside the {len(data)} bytes")
    count = _u16(data[ifd:ifd + 2], big)
    found: dict[int, int] = {}
    for k in range(count):
        e = ifd + 2 + 12 * k
        if e + 12 > len(data):
            break
        tag, kind = _u16(data[e:e + 2], big), _u16(data[e + 2:e + 4], big)
        if tag in (256, 257) and kind in (3, 4):  # ImageWidth, ImageLength as SHORT or LONG
            found[tag] = _u16(data[e + 8:e + 10], big) if kind == 3 else _u32(data[e + 8:e + 12], big)
    if 256 not in found or 257 not in found:
        raise ImageConversionError("decode_failed", "TIFF without ImageWidth/ImageLength in its first IFD")
    return found[256], found[257]


def compressed_image_size(data) -> tuple[str, int, int]:
    """``(codec, width, height)`` of a compressed image read from its header only (nothing decoded).

    ``codec`` is ``"png"``, ``"jpeg"`` or ``"tiff"``, recognised by the magic bytes. Raises
    :class:`ImageConversionError`: ``empty``, ``unsupported_format`` (any other container, see the
    module docstring) or ``decode_failed`` (a recognised container whose header is cut short or
    malformed).
    """
    buf = np.frombuffer(data, dtype=np.uint8)  # array.array (rclpy), numpy (rosbags), bytes: no copy
    if buf.size == 0:
        raise ImageConversionError("empty", "compressed image has no data")
    view = memoryview(buf)  # indexing gives ints, slicing gives views: header fields without copying
    head = bytes(view[:8])
    if head == _PNG_MAGIC:
        return ("png", *_png_size(view))
    if head[:2] == b"\xff\xd8":
        return ("jpeg", *_jpeg_size(view))
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ("tiff", *_tiff_size(view))
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        raise ImageConversionError("unsupported_format", "BigTIFF is not supported (use jpeg, png or classic tiff)")
    raise ImageConversionError(
        "unsupported_format", f"compressed data starting with {head.hex(' ')} is not JPEG, PNG or TIFF "
                              "(the only formats whose size is checked before decoding)")


def compressed_to_rgb(msg, max_pixels: int | None = DEFAULT_MAX_PIXELS, order: str = "rgb") -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG, PNG or TIFF) to ``(H, W, 3)`` uint8.

    The image size is read from the stream header (:func:`compressed_image_size`) and checked
    against ``max_pixels`` **before** decoding, so an oversized frame costs no decoding memory.
    The decoded size is checked again (belt and braces: the decoder, not our header reader, has the
    last word on what it produced).
    Reasons: ``empty``, ``unsupported_format``, ``decode_failed``, ``too_large``.
    """
    try:
        codec, width, height = compressed_image_size(msg.data)
    except ImageConversionError as exc:
        raise ImageConversionError(exc.reason, f"{exc} (format field {msg.format!r})") from None
    try:
        _check_size(height, width, max_pixels)
    except ImageConversionError as exc:
        raise ImageConversionError(exc.reason, f"{exc} (from its {codec.upper()} header, not decoded)") from None
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # BGR; 16-bit PNGs are reduced to 8 bits
    if img is None:
        raise ImageConversionError("decode_failed", f"cannot decode {buf.size} bytes of {codec.upper()} "
                                                    f"({width}x{height}, format field {msg.format!r})")
    _check_size(img.shape[0], img.shape[1], max_pixels)
    return img[:, :, ::-1] if order == "rgb" else img


def numpy_to_image(array_: np.ndarray, encoding: str, header=None, msg_type=None):
    """Build a ``sensor_msgs/Image`` from an array (fast: one copy of the pixel bytes).

    ``(H, W)`` arrays are single-channel, ``(H, W, C)`` multi-channel; ``encoding`` must match the
    array's dtype and channel count (``rgb8``/``bgr8`` uint8 x3, ``mono8`` uint8, ``mono16`` uint16,
    ``32SC1`` int32, ``32FC1`` float32, ...). Samples are written in the machine's byte order and
    ``is_bigendian`` says which. ``msg_type`` defaults to rclpy's ``sensor_msgs.msg.Image``.
    """
    if msg_type is None:
        from sensor_msgs.msg import Image as msg_type  # noqa: N813
    a = np.ascontiguousarray(array_)
    if a.ndim not in (2, 3):
        raise ValueError(f"image array must be (H, W) or (H, W, C), got shape {a.shape}")
    channels = 1 if a.ndim == 2 else a.shape[2]
    expected = _expected_layout(encoding)
    if expected is not None and (a.dtype != expected[1] or channels != expected[0]):
        raise ValueError(f"encoding {encoding!r} needs {expected[0]} channel(s) of {expected[1]}, "
                         f"got {channels} of {a.dtype}")
    msg = msg_type()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(a.shape[0]), int(a.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = int(a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"))
    msg.step = int(a.shape[1] * channels * a.dtype.itemsize)
    msg.data = byte_array(a)
    return msg


def byte_array(a: np.ndarray) -> array.array:
    """``array.array('B')`` holding the bytes of a C-contiguous array: one memcpy.

    (``array.array('B', a.tobytes())`` copies twice and is ~50x slower for a 1 MB image.)
    """
    out = array.array("B")
    out.frombytes(memoryview(np.ascontiguousarray(a)).cast("B"))
    return out


def _expected_layout(encoding: str) -> tuple[int, np.dtype] | None:
    if encoding in _PLAIN_ENCODINGS:
        ch, size, _ = _PLAIN_ENCODINGS[encoding]
        return ch, np.dtype(np.uint8 if size == 1 else np.uint16)
    other = {"32SC1": (1, np.int32), "32FC1": (1, np.float32), "16SC1": (1, np.int16)}
    if encoding in other:
        return other[encoding][0], np.dtype(other[encoding][1])
    return None


def image_msg_to_array(msg) -> np.ndarray:
    """Raw ``(H, W)``/``(H, W, C)`` view of an image whose encoding has a fixed numpy layout.

    Used for our own outputs (``32SC1`` id images, ``bgr8`` overlays) and for reading them back.
    """
    layout = _expected_layout(str(msg.encoding))
    if layout is None:
        raise ImageConversionError("unsupported_encoding", f"no array layout for encoding {msg.encoding!r}")
    ch, dt = layout
    h, w = int(msg.height), int(msg.width)
    _check_size(h, w, None)
    rows = _rows(msg, ch * dt.itemsize)
    dt = dt.newbyteorder(">" if msg.is_bigendian else "<")
    a = np.ascontiguousarray(rows).view(dt).reshape((h, w) if ch == 1 else (h, w, ch))
    return a.astype(a.dtype.newbyteorder("="), copy=False)
