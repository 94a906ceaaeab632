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
* Compressed images (``sensor_msgs/CompressedImage``): the three codecs that ROS 2's
  ``compressed_image_transport`` produces, JPEG, PNG and classic TIFF (strips; compression none,
  LZW, Deflate or PackBits), each recognised by its magic bytes, not by the free-text ``format``
  field. Everything else OpenCV could decode (WebP, BMP, GIF, PNM, JPEG 2000, BigTIFF, tiled TIFF,
  ``compressedDepth``'s header-prefixed PNG, ...) is refused as ``unsupported_format``. EXIF
  orientation is ignored: the pixel grid stays the camera's (the one its camera_info describes),
  as ``compressed_image_transport`` decodes it.
* Size limit of compressed images (``too_large``), enforced three times: (1) from the stream
  header, read here before anything is decoded (PNG IHDR; the first JPEG SOFn, found as libjpeg
  finds it; TIFF ImageWidth/ImageLength, the largest value of a repeated tag); (2) by OpenCV's
  decoder itself, which checks the size *its own* header reader found before allocating the
  image, against the process-wide limit set by :func:`set_decoder_pixel_limit` (OpenCV's
  ``OPENCV_IO_MAX_IMAGE_PIXELS``, read once when OpenCV loads) -- a header quirk that fools (1)
  cannot fool the reader that sizes the allocation; (3) on the decoded image. (1) follows a
  run-time change of the limit at once and words the message; (2) is the guarantee.
  Measured with OpenCV 5.0 and a limit of 1 MP on 36 adversarial streams declaring 16000x16000
  (test/ciae_ros/image_bombs.py: stuffed ``FF 00``, lying and repeated SOFs and TIFF tags,
  progressive and lossless JPEG, EXIF thumbnails, APNG frames, multi-page TIFF, WebP
  VP8/VP8L/VP8X, BMP) with the header check switched off: the decoder refuses every one whose
  header it can read before allocating (peak RSS +3 MiB at most); the rest fail to decode or are
  legitimate small images. The one gap is a TIFF whose *tile* is larger than its image: OpenCV
  sizes its tile buffer by the tile (~1 GB for a 16x16 image in a 16000x16000 tile), hence no
  tiled TIFF.
"""

from __future__ import annotations

import array
import os
import re
import sys

import numpy as np

from ciae_core.user_input import clip, quote


# encoding -> (channels, bytes per channel, channel order of the colour channels)
_PLAIN_ENCODINGS: dict[str, tuple[int, int, str]] = {
    "rgb8": (3, 1, "rgb"), "bgr8": (3, 1, "bgr"), "rgba8": (4, 1, "rgb"), "bgra8": (4, 1, "bgr"),
    "mono8": (1, 1, "mono"), "8UC1": (1, 1, "mono"), "8UC3": (3, 1, "bgr"), "8UC4": (4, 1, "bgr"),
    "rgb16": (3, 2, "rgb"), "bgr16": (3, 2, "bgr"), "rgba16": (4, 2, "rgb"), "bgra16": (4, 2, "bgr"),
    "mono16": (1, 2, "mono"), "16UC1": (1, 2, "mono"), "16UC3": (3, 2, "bgr"),
}
# YUV 4:2:2: 2 bytes per pixel, converted by OpenCV (names of cv2 constants: cv2 loads lazily).
_YUV422_CODES = {
    "yuv422": "COLOR_YUV2RGB_UYVY", "uyvy": "COLOR_YUV2RGB_UYVY",
    "yuv422_yuy2": "COLOR_YUV2RGB_YUY2", "yuyv": "COLOR_YUV2RGB_YUY2",
}
# 8-bit Bayer mosaics, named by the colours of the top-left 2x2 block read row by row.
_BAYER_CODES = {
    "bayer_rggb8": "COLOR_BayerRGGB2RGB", "bayer_bggr8": "COLOR_BayerBGGR2RGB",
    "bayer_gbrg8": "COLOR_BayerGBRG2RGB", "bayer_grbg8": "COLOR_BayerGRBG2RGB",
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
        f"unsupported image encoding {quote(encoding)}; supported: {', '.join(SUPPORTED_ENCODINGS)}")


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
                        f"for encoding {quote(msg.encoding)}")
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
        raise ValueError(f"order must be 'rgb' or 'bgr', got {quote(order)}")
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
        cv2 = _cv2()
        rgb = cv2.cvtColor(rows, getattr(cv2, _YUV422_CODES[enc]))
        return rgb if order == "rgb" else rgb[:, :, ::-1]
    if enc in _BAYER_CODES:
        rows = np.ascontiguousarray(_rows(msg, 1))
        cv2 = _cv2()
        rgb = cv2.cvtColor(rows, getattr(cv2, _BAYER_CODES[enc]))
        return rgb if order == "rgb" else rgb[:, :, ::-1]
    converted = _cv_bridge_to_rgb(msg, order)
    if converted is not None:
        return converted
    raise ImageConversionError(
        "unsupported_encoding", f"unsupported image encoding {quote(enc)}; supported: {', '.join(SUPPORTED_ENCODINGS)}")


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
                                   f"cv_bridge could not convert encoding {quote(msg.encoding)}: {clip(exc)}") from None


# -- compressed images -------------------------------------------------------------------------
#
# OpenCV (imgcodecs, loadsave.cpp) reads OPENCV_IO_MAX_IMAGE_PIXELS in a static initialiser, i.e.
# once, when the cv2 extension is loaded into the process (measured with OpenCV 5.0: setting the
# variable after `import cv2` changes nothing). imdecode then checks the width and height that the
# codec's own header reader found (libjpeg, libpng, libtiff, libwebp, OpenCV's BMP reader) against
# it before allocating the output image, and raises cv2.error from validateInputImageSize. So the
# variable must be in the environment before the first `import cv2` of the process: this module
# imports cv2 lazily, and set_decoder_pixel_limit() sets the variable and then loads OpenCV.

_CV2 = None
_DECODER_LIMIT: int | None = None  # OpenCV's pixel limit in this process, when known
_DECODER_LIMIT_KNOWN = False
_OPENCV_DEFAULT_LIMIT = 1 << 30  # OpenCV's own default for OPENCV_IO_MAX_IMAGE_PIXELS
_LIMIT_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"


def _cv2():
    """The cv2 module, imported on first use. When this is the process's first import of OpenCV,
    the decoder limit it reads from the environment is recorded (:func:`decoder_pixel_limit`)."""
    global _CV2, _DECODER_LIMIT, _DECODER_LIMIT_KNOWN
    if _CV2 is None:
        first = "cv2" not in sys.modules
        import cv2

        if first and not _DECODER_LIMIT_KNOWN:
            text = os.environ.get(_LIMIT_ENV, "")
            _DECODER_LIMIT = int(text) if text.isdigit() else (None if text else _OPENCV_DEFAULT_LIMIT)
            _DECODER_LIMIT_KNOWN = True
        _CV2 = cv2
    return _CV2


def set_decoder_pixel_limit(pixels: int) -> int | None:
    """Make OpenCV's image decoders in this process refuse images of more than ``pixels`` pixels.

    Sets ``OPENCV_IO_MAX_IMAGE_PIXELS`` and loads OpenCV, which reads it once per process: call it
    before anything in the process imports ``cv2``. Returns :func:`decoder_pixel_limit` (``pixels``
    on success; the earlier limit, or ``None`` when unknown, if OpenCV was already loaded).
    """
    global _DECODER_LIMIT, _DECODER_LIMIT_KNOWN
    pixels = int(pixels)
    if pixels < 1:
        raise ValueError(f"decoder pixel limit must be >= 1, got {pixels}")
    if "cv2" not in sys.modules:
        os.environ[_LIMIT_ENV] = str(pixels)
        _DECODER_LIMIT, _DECODER_LIMIT_KNOWN = pixels, True
    _cv2()
    return decoder_pixel_limit()


def decoder_pixel_limit() -> int | None:
    """The pixel limit OpenCV's decoders enforce in this process: known when this module loaded
    OpenCV (OpenCV's default is 2**30); ``None`` when OpenCV was loaded elsewhere first (or not yet)."""
    return _DECODER_LIMIT if _DECODER_LIMIT_KNOWN else None


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC), which share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# markers without a length field: TEM and RST0..7 (SOI/EOI are handled explicitly)
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# libjpeg's next_marker(): skip bytes up to 0xFF, swallow fill bytes (more 0xFF); FF 00 is a
# stuffed zero, not a marker, and the scan goes on. The group is the marker code.
_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xff])")
# A header reader that walks segment by segment in Python must not be a CPU sink: real streams
# have a few dozen segments before the frame header.
_JPEG_MAX_SEGMENTS = 4096
# TIFF compressions accepted (what camera pipelines and cv::imencode write): none, LZW, Deflate
# (Adobe and old), PackBits. The others (JPEG-in-TIFF, old-style JPEG, JBIG, LERC, ...) bring
# their own decoders and their own buffer sizes.
_TIFF_COMPRESSIONS = frozenset({1, 5, 8, 32946, 32773})
# TIFF tags that make an image tiled (TileWidth, TileLength, TileOffsets, TileByteCounts)
_TIFF_TILE_TAGS = frozenset({322, 323, 324, 325})
# field types libtiff reads as an unsigned 32-bit value (ImageWidth, Compression): BYTE, SHORT,
# LONG, SBYTE, SSHORT, SLONG, LONG8, SLONG8 -> (size, signed)
_TIFF_INT_TYPES = {1: (1, False), 3: (2, False), 4: (4, False), 6: (1, True), 8: (2, True), 9: (4, True),
                   16: (8, False), 17: (8, True)}


def _u16(b, big: bool) -> int:
    return int.from_bytes(b[:2], "big" if big else "little")


def _u32(b, big: bool) -> int:
    return int.from_bytes(b[:4], "big" if big else "little")


def _png_size(data: bytes) -> tuple[int, int]:
    # signature (8), IHDR length (4), "IHDR" (4), width (4, big-endian), height (4); libpng
    # refuses a stream whose first chunk is not IHDR
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageConversionError("decode_failed", "PNG without an IHDR header chunk")
    return _u32(data[16:20], True), _u32(data[20:24], True)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from the first SOFn segment, found as libjpeg finds it: bytes before a
    marker are skipped (libjpeg only warns "extraneous bytes before marker": some cameras write
    them, and their frames decode), and ``FF 00`` is stuffing, not a marker."""
    i, n = 2, len(data)  # after SOI (FF D8)
    for _ in range(_JPEG_MAX_SEGMENTS):
        m = _JPEG_MARKER.search(data, i)
        if m is None:
            break
        marker, i = m.group(1)[0], m.end()
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA) or i + 2 > n:  # EOI / start of scan before any frame header
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
    else:
        raise ImageConversionError("decode_failed", f"JPEG with more than {_JPEG_MAX_SEGMENTS} segments "
                                                    "before its frame header")
    raise ImageConversionError("decode_failed", "JPEG without a frame header (SOFn) before its image data")


def _tiff_int(data: bytes, entry: np.void, big: bool) -> int | None:
    """The single integer of an IFD entry as libtiff reads ImageWidth & co.; None if it cannot be one."""
    kind, count = int(entry["type"]), int(entry["count"])
    if kind not in _TIFF_INT_TYPES or count != 1:
        return None
    size, signed = _TIFF_INT_TYPES[kind]
    raw = entry["value"].tobytes()
    if size > 4:  # LONG8 in a classic TIFF: the field holds an offset
        off = _u32(raw, big)
        raw = data[off:off + size]
        if len(raw) < size:
            return None
    value = int.from_bytes(raw[:size], "big" if big else "little", signed=signed)
    return value if value >= 0 else None


def _tiff_size(data: bytes) -> tuple[int, int]:
    """Width and height of the first page, read conservatively: a tag that appears more than once
    counts with its largest value (libtiff keeps the first; another reader might keep the last).
    Tiled images and compressions outside :data:`_TIFF_COMPRESSIONS` are refused."""
    big = data[:2] == b"MM"
    ifd = _u32(data[4:8], big)
    if ifd < 8 or ifd + 2 > len(data):
        raise ImageConversionError("decode_failed", f"TIFF first IFD offset {ifd} outside the {len(data)} bytes")
    count = min(_u16(data[ifd:ifd + 2], big), (len(data) - ifd - 2) // 12)
    e = ">" if big else "<"
    entries = np.frombuffer(data, np.dtype([("tag", e + "u2"), ("type", e + "u2"), ("count", e + "u4"),
                                            ("value", "V4")]), count=count, offset=ifd + 2)
    tags = entries["tag"]
    if np.isin(tags, list(_TIFF_TILE_TAGS)).any():
        # OpenCV sizes its tile buffer by the tile, not by the image, and OPENCV_IO_MAX_IMAGE_PIXELS
        # does not cover it: a 16x16 image in one 16000x16000 tile costs ~1 GB (measured).
        raise ImageConversionError("unsupported_format", "tiled TIFF is not supported (strips only)")
    found: dict[int, int] = {}
    for entry in entries[np.isin(tags, [256, 257, 259])]:
        tag, value = int(entry["tag"]), _tiff_int(data, entry, big)
        if value is None:
            raise ImageConversionError("decode_failed", f"TIFF tag {tag} is not a single unsigned integer")
        if tag == 259:
            if value not in _TIFF_COMPRESSIONS:
                raise ImageConversionError("unsupported_format", f"TIFF compression {value} is not supported "
                                                                 "(none, LZW, Deflate or PackBits)")
            continue
        found[tag] = max(found.get(tag, 0), value)
    if 256 not in found or 257 not in found:
        raise ImageConversionError("decode_failed", "TIFF without ImageWidth/ImageLength in its first IFD")
    return found[256], found[257]


def compressed_image_size(data) -> tuple[str, int, int]:
    """``(codec, width, height)`` of a compressed image read from its header only (nothing decoded).

    ``codec`` is ``"png"``, ``"jpeg"`` or ``"tiff"``, recognised by the magic bytes. Raises
    :class:`ImageConversionError`: ``empty``, ``unsupported_format`` (any other container, a tiled
    TIFF or a TIFF compression outside none/LZW/Deflate/PackBits) or ``decode_failed`` (a
    recognised container whose header is cut short or malformed).
    """
    view = memoryview(np.frombuffer(data, dtype=np.uint8))  # array.array (rclpy), numpy (rosbags), bytes
    if view.nbytes == 0:
        raise ImageConversionError("empty", "compressed image has no data")
    head = bytes(view[:8])
    if head == _PNG_MAGIC:
        return ("png", *_png_size(bytes(view[:24])))
    if head[:2] == b"\xff\xd8":
        return ("jpeg", *_jpeg_size(view.tobytes()))
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ("tiff", *_tiff_size(view.tobytes()))
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        raise ImageConversionError("unsupported_format", "BigTIFF is not supported (use jpeg, png or classic tiff)")
    raise ImageConversionError(
        "unsupported_format", f"compressed data starting with {head.hex(' ')} is not JPEG, PNG or TIFF "
                              "(the formats of compressed_image_transport)")


def _decoder_error(exc: Exception, codec: str, nbytes: int, max_pixels: int | None) -> ImageConversionError:
    """The one refusal a cv2.error from imdecode stands for (its text has several lines)."""
    text = str(exc)
    if "validateInputImageSize" in text:
        limit = decoder_pixel_limit()
        return ImageConversionError(
            "too_large", f"{codec.upper()} of {nbytes} bytes refused by the decoder: its header declares more "
                         f"than {limit if limit is not None else max_pixels} pixels (the decoder's limit)")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(">")]
    return ImageConversionError("decode_failed", f"cannot decode {nbytes} bytes of {codec.upper()}: "
                                                 f"{clip(lines[-1] if lines else type(exc).__name__, 160)}")


def compressed_to_rgb(msg, max_pixels: int | None = DEFAULT_MAX_PIXELS, order: str = "rgb") -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG, PNG or classic TIFF) to ``(H, W, 3)`` uint8.

    Three checks, each refusing with one reason: the size read from the stream header
    (:func:`compressed_image_size`) against ``max_pixels``, before decoding; OpenCV's decoder
    itself, which refuses what its own header reader finds above the process's decoder limit
    (:func:`set_decoder_pixel_limit`) before allocating the image; the decoded size again. EXIF
    orientation is ignored (the pixel grid stays the camera's, as ``compressed_image_transport``
    decodes it). Reasons: ``empty``, ``unsupported_format``, ``decode_failed``, ``too_large``.
    """
    if order not in ("rgb", "bgr"):
        raise ValueError(f"order must be 'rgb' or 'bgr', got {quote(order)}")
    try:
        codec, width, height = compressed_image_size(msg.data)
    except ImageConversionError as exc:
        raise ImageConversionError(exc.reason, f"{exc} (format field {quote(msg.format)})") from None
    try:
        _check_size(height, width, max_pixels)
    except ImageConversionError as exc:
        raise ImageConversionError(exc.reason, f"{exc} (from its {codec.upper()} header, not decoded)") from None
    cv2 = _cv2()
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    flags = (cv2.IMREAD_COLOR_RGB if order == "rgb" else cv2.IMREAD_COLOR_BGR) | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        img = cv2.imdecode(buf, flags)  # 16-bit images are reduced to 8 bits
    except cv2.error as exc:
        raise _decoder_error(exc, codec, buf.size, max_pixels) from None
    if img is None:
        raise ImageConversionError("decode_failed", f"cannot decode {buf.size} bytes of {codec.upper()} "
                                                    f"({width}x{height}, format field {quote(msg.format)})")
    try:
        _check_size(img.shape[0], img.shape[1], max_pixels)
    except ImageConversionError as exc:
        raise ImageConversionError(exc.reason, f"{exc} (decoded; its {codec.upper()} header said "
                                               f"{width}x{height})") from None
    return img


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
        raise ValueError(f"encoding {quote(encoding)} needs {expected[0]} channel(s) of {expected[1]}, "
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
        raise ImageConversionError("unsupported_encoding", f"no array layout for encoding {quote(msg.encoding)}")
    ch, dt = layout
    h, w = int(msg.height), int(msg.width)
    _check_size(h, w, None)
    rows = _rows(msg, ch * dt.itemsize)
    dt = dt.newbyteorder(">" if msg.is_bigendian else "<")
    a = np.ascontiguousarray(rows).view(dt).reshape((h, w) if ch == 1 else (h, w, ch))
    return a.astype(a.dtype.newbyteorder("="), copy=False)
