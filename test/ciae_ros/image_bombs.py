"""Adversarial compressed images: a few hundred bytes whose headers declare a huge image.

A test helper (no test functions here). Every :class:`Bomb` is built from real encoder output
(OpenCV's own JPEG/PNG/TIFF/WebP writers, or a hand-written header where no encoder writes the
quirk) with the header patched to lie or to hide its true size from a naive header reader:

* JPEG: a frame header (SOF) claiming ``CLAIM``; the same for a progressive (SOF2) and a lossless
  (SOF3) stream; ``FF 00`` before the real SOF, which libjpeg skips as stuffing while a marker walk
  that reads a length after it lands on a decoy 16x16 SOF hidden in a comment; a lying first SOF
  followed by a true one (and the reverse); a decoy SOF inside an APP segment; an EXIF thumbnail
  larger than the main image (and a small thumbnail in front of a lying main image); a zero height
  (DNL); streams cut in the header and in the entropy-coded data.
* PNG: IHDR claiming ``CLAIM`` (garbage body, a valid all-zero deflate body, 8000 one-byte IDAT
  chunks, 16-bit RGBA); APNG whose first or second frame control chunk (fcTL) claims ``CLAIM``
  over a small IHDR; more image data than IHDR declares; a cut stream.
* TIFF: ImageWidth/ImageLength claiming ``CLAIM``; the tags repeated (first huge, later small:
  libtiff keeps the first); two pages, either one huge; a 16x16 image stored in one deflated
  4096x4096 tile; a strip taller than the image; a cut stream; BigTIFF.
* WebP: VP8L and VP8 key frames at the format's maximum size; a VP8X canvas claiming ``CLAIM``
  around a 16x16 VP8L image; an animated VP8X whose frame (ANMF) claims ``CLAIM``.
* BMP: 24-bit bottom-up and top-down (negative height) and an RLE8 bitmap, all claiming
  ``CLAIM`` with no pixel data.

``expect`` is what ``ciae_ros.image_conversion.compressed_to_rgb`` must do with a limit of
``LIMIT`` pixels: the one refusal reason, or ``"ok"`` with ``shape`` (H, W, 3) when the frame is
a legitimate small image whatever its headers hide. ``decoder_size`` is the (width, height) the
decoder itself reads (None where it cannot read a header at all).

Run as a script, the module is a camera process publishing ``sensor_msgs/CompressedImage``:
``python image_bombs.py publisher TOPIC`` reads JSON lines ``{"op": "bomb", "name": ...}``,
``{"op": "jpeg", "h": .., "w": ..}`` (a real frame) or ``{"op": "wait_subs"}`` on stdin.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace

import numpy as np

#: (width, height) declared by every bomb: 256 MP, 768 MB as 8-bit BGR.
CLAIM = (16000, 16000)
#: The pixel limit the expectations are written for (1 MP: above every honest image here, far
#: below ``CLAIM``).
LIMIT = 1_000_000


def rss_mib(pid: int | str = "self", field: str = "VmRSS") -> float:
    """``VmRSS`` (or ``VmHWM``, the peak) of a process in MiB, from /proc (Linux)."""
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} for process {pid}")


def reset_peak_rss(pid: int | str = "self") -> None:
    """Set a process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0, same user)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def rss_bound_mb(max_pixels: int) -> float:
    """Peak-RSS growth (MiB) allowed for decoding or refusing one frame under a limit of
    ``max_pixels``: 24 MiB for the decoder's first-use set-up and fixed buffers, plus 12 bytes
    per permitted pixel (3 for the RGB result, up to 8 for a progressive JPEG's coefficient
    buffers at 4:4:4 or CMYK). Measured at 1 MP: at most ~9 bytes per pixel + ~8 MiB."""
    return 24.0 + 12.0 * max_pixels / 2**20


@dataclass(frozen=True)
class Bomb:
    name: str
    codec: str                      # jpeg | png | tiff | webp | bmp
    data: bytes
    expect: str                     # too_large | unsupported_format | decode_failed | ok
    decoder_size: tuple[int, int] | None = CLAIM  # (width, height) the decoder's own header reader sees
    shape: tuple[int, int, int] | None = None      # decoded (H, W, 3) when expect == "ok"
    decoder_bounded: bool = True    # False: OpenCV's pixel limit does not bound what decoding costs
    note: str = ""


# ----------------------------------------------------------------------------------------------
# JPEG
# ----------------------------------------------------------------------------------------------

def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth BGR test image (gradients plus mild noise): compresses like a camera frame."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(0, 24, (h, w, 3))
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(w + h - 2, 1)], -1)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _encode(ext: str, img: np.ndarray, params=()) -> bytes:
    import cv2

    ok, enc = cv2.imencode(ext, img, list(params))
    assert ok, ext
    return enc.tobytes()


def real_jpeg(h: int = 48, w: int = 64, progressive: bool = False) -> bytes:
    import cv2

    return _encode(".jpg", _image(h, w), [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])


def _jpeg_segments(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Segments ``(marker, body)`` between SOI and the first SOS, and the rest (SOS onwards), of a
    well-formed stream as our encoder writes it (no fill bytes, no stray bytes)."""
    assert data[:2] == b"\xff\xd8"
    segs, i = [], 2
    while data[i + 1] != 0xDA:
        assert data[i] == 0xFF
        length = int.from_bytes(data[i + 2:i + 4], "big")
        segs.append((data[i + 1], data[i + 4:i + 2 + length]))
        i += 2 + length
    return segs, data[i:]


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def _jpeg_join(segs, tail: bytes, prefix: bytes = b"") -> bytes:
    return b"\xff\xd8" + prefix + b"".join(_segment(m, b) for m, b in segs) + tail


def _sof_body(body: bytes, width: int, height: int) -> bytes:
    """SOF body: precision (1), height (2), width (2), components..."""
    return body[:1] + struct.pack(">HH", height, width) + body[5:]


def _patch_sof(data: bytes, width: int, height: int, marker: int | None = None) -> bytes:
    segs, tail = _jpeg_segments(data)
    out = []
    for m, b in segs:
        if 0xC0 <= m <= 0xC3:
            b = _sof_body(b, width, height)
            m = marker if marker is not None else m
        out.append((m, b))
    return _jpeg_join(out, tail)


def _sof_index(segs) -> int:
    return next(k for k, (m, _) in enumerate(segs) if 0xC0 <= m <= 0xC3)


def jpeg_ff00_before_sof(width: int = CLAIM[0], height: int = CLAIM[1]) -> bytes:
    """``FF 00`` right after SOI, then a comment holding a decoy 16x16 SOF, then the real
    headers with the SOF claiming ``width`` x ``height``. libjpeg discards ``FF 00`` (stuffing)
    and the two bytes after it and reads the comment as a comment; a marker walk that takes
    ``00`` for a marker with a length field jumps from those two bytes straight onto the decoy."""
    segs, tail = _jpeg_segments(real_jpeg(16, 16))
    k = _sof_index(segs)
    decoy = _segment(0xC0, _sof_body(segs[k][1], 16, 16))
    segs[k] = (segs[k][0], _sof_body(segs[k][1], width, height))
    # SOI | FF 00 | 00 06 | FF FE len | decoy SOF ... : the length 6 counts from the length field
    # (offset 4) and lands on offset 10, the first byte of the comment's payload.
    comment = _segment(0xFE, decoy + b"ciae")
    return _jpeg_join(segs, tail, prefix=b"\xff\x00\x00\x06" + comment)


def _exif_app1(thumbnail: bytes) -> bytes:
    """APP1 ``Exif`` body: IFD0 (Orientation = 1) -> IFD1 pointing at ``thumbnail`` (JPEG)."""
    ifd0_off = 8
    ifd1_off = ifd0_off + 2 + 12 + 4
    thumb_off = ifd1_off + 2 + 2 * 12 + 4
    tiff = b"II*\x00" + struct.pack("<I", ifd0_off)
    tiff += struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 1, 0) + struct.pack("<I", ifd1_off)
    tiff += struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, thumb_off)
    tiff += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail)) + struct.pack("<I", 0)
    return b"Exif\x00\x00" + tiff + thumbnail


def jpeg_with_thumbnail(main: bytes, thumbnail: bytes) -> bytes:
    segs, tail = _jpeg_segments(main)
    return _jpeg_join([(0xE1, _exif_app1(thumbnail))] + segs, tail)


def _jpeg_bombs(claim: tuple[int, int]) -> list[Bomb]:
    w, h = claim
    base = real_jpeg(16, 16)
    segs, tail = _jpeg_segments(base)
    k = _sof_index(segs)
    sof_m, sof_b = segs[k]
    first_lies = segs[:k + 1] + [(sof_m, _sof_body(sof_b, 16, 16))] + segs[k + 1:]
    first_lies[k] = (sof_m, _sof_body(sof_b, w, h))
    second_huge = segs[:k + 1] + [(sof_m, _sof_body(sof_b, w, h))] + segs[k + 1:]
    in_app = [(0xE2, b"ICC_PROFILE\x00" + _segment(0xC0, _sof_body(sof_b, w, h)))] + segs
    main = real_jpeg(48, 64)
    scan_cut = real_jpeg(480, 640)
    scan_cut = scan_cut[:len(scan_cut) // 2]
    sof_at = main.index(b"\xff\xc0")
    return [
        Bomb("jpeg_sof_claims_huge", "jpeg", _patch_sof(base, w, h), "too_large",
             note="baseline SOF0 patched"),
        Bomb("jpeg_progressive_sof2_huge", "jpeg", _patch_sof(real_jpeg(16, 16, progressive=True), w, h),
             "too_large", note="libjpeg would allocate whole-image coefficient buffers"),
        Bomb("jpeg_lossless_sof3_huge", "jpeg", _patch_sof(base, w, h, marker=0xC3), "too_large",
             note="lossless frame header (libjpeg-turbo 3 reads SOF3)"),
        Bomb("jpeg_ff00_before_sof", "jpeg", jpeg_ff00_before_sof(w, h), "too_large",
             note="stuffed FF 00 hides the real SOF from a marker walk"),
        Bomb("jpeg_first_sof_lies", "jpeg", _jpeg_join(first_lies, tail), "too_large", decoder_size=None,
             note="huge SOF, then a true 16x16 SOF: libjpeg refuses a second SOF while reading the header"),
        Bomb("jpeg_second_sof_huge", "jpeg", _jpeg_join(second_huge, tail), "decode_failed",
             decoder_size=(16, 16), note="a second SOF is an error for libjpeg"),
        Bomb("jpeg_decoy_sof_in_app2", "jpeg", _jpeg_join(in_app, tail), "ok", decoder_size=(16, 16),
             shape=(16, 16, 3), note="FF C0 inside an APP2 payload is data, not a marker"),
        Bomb("jpeg_exif_thumbnail_huge", "jpeg", jpeg_with_thumbnail(main, _patch_sof(base, w, h)), "ok",
             decoder_size=(64, 48), shape=(48, 64, 3), note="thumbnail claims 16000x16000, main 64x48"),
        Bomb("jpeg_exif_thumbnail_small_main_huge", "jpeg", jpeg_with_thumbnail(_patch_sof(main, w, h), base),
             "too_large", note="a true 16x16 thumbnail in front of a lying main SOF"),
        Bomb("jpeg_height_zero_dnl", "jpeg", _patch_sof(base, w, 0), "decode_failed", decoder_size=None,
             note="height 0: defined later by a DNL marker, which libjpeg does not support"),
        Bomb("jpeg_cut_in_sof", "jpeg", main[:sof_at + 6], "decode_failed", decoder_size=None),
        Bomb("jpeg_huge_cut_after_sof", "jpeg", _patch_sof(base, w, h)[:sof_at + 19], "too_large",
             decoder_size=None, note="no tables or scan after the SOF: the decoder cannot read a header"),
        Bomb("jpeg_cut_in_scan", "jpeg", scan_cut, "decode_failed", decoder_size=(640, 480),
             note="640x480, half the entropy-coded data"),
    ]


# ----------------------------------------------------------------------------------------------
# PNG
# ----------------------------------------------------------------------------------------------

def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _ihdr(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))


def _png_rows(width: int, height: int, bpp: int = 3) -> bytes:
    return zlib.compress(b"".join(b"\x00" + bytes(range(256)) * (width * bpp // 256) + bytes(width * bpp % 256)
                                  for _ in range(height)), 9)


def _fctl(seq: int, width: int, height: int) -> bytes:
    return _chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, width, height, 0, 0, 1, 10, 0, 0))


def _png_bombs(claim: tuple[int, int]) -> list[Bomb]:
    w, h = claim
    zero_rows = zlib.compressobj(9)
    row = bytes(1 + (w + 7) // 8)  # 1-bit grey, filter 0, all zero
    deflated = b"".join([zero_rows.compress(row * min(1000, h - k)) for k in range(0, h, 1000)] + [zero_rows.flush()])
    few_rows = _png_rows(w, 4)
    small = _png_rows(16, 16)
    real = _encode(".png", _image(48, 64))
    return [
        Bomb("png_ihdr_huge_garbage_body", "png", _PNG_SIG + _ihdr(w, h) + _chunk(b"IDAT", b"no deflate " * 8)
             + _chunk(b"IEND", b""), "too_large"),
        Bomb("png_ihdr_huge_valid_deflate", "png", _PNG_SIG + _ihdr(w, h, 1, 0) + _chunk(b"IDAT", deflated)
             + _chunk(b"IEND", b""), "too_large", note="zlib of all-zero 1-bit rows: decodes to 3 bytes a pixel"),
        Bomb("png_ihdr_huge_many_idat", "png", _PNG_SIG + _ihdr(w, h)
             + b"".join(_chunk(b"IDAT", few_rows[i:i + 1]) for i in range(len(few_rows)))
             + _chunk(b"IEND", b""), "too_large", note="the stream in one-byte IDAT chunks"),
        Bomb("png_ihdr_huge_16bit_rgba", "png", _PNG_SIG + _ihdr(w, h, 16, 6) + _chunk(b"IDAT", b"\x78\x9c")
             + _chunk(b"IEND", b""), "too_large"),
        Bomb("png_apng_first_fctl_huge", "png", _PNG_SIG + _ihdr(16, 16) + _chunk(b"acTL", struct.pack(">II", 1, 0))
             + _fctl(0, w, h) + _chunk(b"IDAT", small) + _chunk(b"IEND", b""), "decode_failed", decoder_size=(16, 16),
             note="frame 0 larger than IHDR: invalid APNG"),
        Bomb("png_apng_second_frame_huge", "png", _PNG_SIG + _ihdr(16, 16) + _chunk(b"acTL", struct.pack(">II", 2, 0))
             + _fctl(0, 16, 16) + _chunk(b"IDAT", small) + _fctl(1, w, h)
             + _chunk(b"fdAT", struct.pack(">I", 2) + few_rows) + _chunk(b"IEND", b""), "decode_failed",
             decoder_size=(16, 16), note="OpenCV checks every fcTL against IHDR and refuses the stream"),
        Bomb("png_more_data_than_ihdr", "png", _PNG_SIG + _ihdr(16, 16) + _chunk(b"IDAT", _png_rows(16, 4000))
             + _chunk(b"IEND", b""), "ok", decoder_size=(16, 16), shape=(16, 16, 3),
             note="libpng stops after the rows IHDR declares"),
        Bomb("png_cut_in_idat", "png", real[:len(real) // 2], "decode_failed", decoder_size=(64, 48)),
    ]


# ----------------------------------------------------------------------------------------------
# TIFF (little-endian, written by hand: entries are emitted in the order given, duplicates kept)
# ----------------------------------------------------------------------------------------------

_SHORT, _LONG = 3, 4
_STRIPS = -1  # value placeholder: one offset per strip (or tile), all pointing at the page's payload


def _tiff(pages: list[list[tuple[int, int, int]]], payloads: list[bytes]) -> bytes:
    """Classic little-endian TIFF, one IFD per page, entries ``(tag, type, value)`` written in the
    order given (duplicates kept). A value is an int or a list of ints (stored after the IFD when
    it does not fit in 4 bytes); ``_STRIPS`` in StripOffsets/TileOffsets (273/324) becomes the
    offset of that page's payload, repeated once per strip: every strip decodes the same few
    bytes, so a huge image needs only one small compressed strip."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    data_at = []
    for payload in payloads:
        data_at.append(len(out))
        out += payload + (b"\x00" if len(payload) % 2 else b"")
    prev_link = 4
    for entries, at in zip(pages, data_at):
        counts = {t: len(v) for t, _, v in entries if isinstance(v, list)}
        n_strips = max([counts.get(279, 1), counts.get(325, 1)])
        ifd = len(out)
        out[prev_link:prev_link + 4] = struct.pack("<I", ifd)
        extra_at = ifd + 2 + 12 * len(entries) + 4
        body, extra = bytearray(struct.pack("<H", len(entries))), bytearray()
        for tag, kind, value in entries:
            values = [at] * n_strips if value == _STRIPS else (value if isinstance(value, list) else [value])
            packed = b"".join(struct.pack("<H" if kind == _SHORT else "<I", v) for v in values)
            if len(packed) <= 4:
                field = packed.ljust(4, b"\x00")
            else:
                field = struct.pack("<I", extra_at + len(extra))
                extra += packed
            body += struct.pack("<HHI", tag, kind, len(values)) + field
        out += body
        prev_link = len(out)
        out += b"\x00\x00\x00\x00" + extra
    return bytes(out)


def _grey_page(width: int, height: int, strip: bytes, rows_per_strip: int | None = None,
               tile: tuple[int, int] | None = None, compression: int = 1) -> list[tuple[int, int, int]]:
    """8-bit grey page whose every strip (or tile) is the payload ``strip`` (sorted tags)."""
    rps = rows_per_strip or height
    if tile:
        n = -(-width // tile[0]) * -(-height // tile[1])
        layout = [(322, _LONG, tile[0]), (323, _LONG, tile[1]), (324, _LONG, _STRIPS), (325, _LONG, [len(strip)] * n)]
    else:
        n = -(-height // rps)
        layout = [(273, _LONG, _STRIPS), (278, _LONG, rps), (279, _LONG, [len(strip)] * n)]
    head = [(256, _LONG, width), (257, _LONG, height), (258, _SHORT, 8), (259, _SHORT, compression), (262, _SHORT, 1)]
    return sorted(head + layout + [(277, _SHORT, 1)], key=lambda e: e[0])


def _tiff_bombs(claim: tuple[int, int]) -> list[Bomb]:
    w, h = claim
    rps = max(1, min(h, 2**20 // w))  # about 1 MB per strip
    strip = zlib.compress(bytes(w * rps), 9)  # one deflated strip of zeros, used by every strip

    def page(width, height, **kw):
        return _grey_page(width, height, strip, rows_per_strip=rps, compression=8, **kw)

    small_data = zlib.compress(bytes(range(256)), 9)
    small = _grey_page(16, 16, small_data, compression=8)
    repeated = page(w, h) + [(256, _LONG, 16), (257, _LONG, 16)]  # duplicates after the sorted tags
    deflated_tile = zlib.compress(bytes(4096 * 4096), 9)
    tall = zlib.compress(bytes(4096 * 16), 9)
    real = _encode(".tiff", _image(48, 64))
    return [
        Bomb("tiff_claims_huge", "tiff", _tiff([page(w, h)], [strip]), "too_large",
             note="every strip offset points at one deflated strip: decodes in full"),
        Bomb("tiff_repeated_size_tags", "tiff", _tiff([repeated], [strip]), "too_large",
             note="ImageWidth/ImageLength huge first, then 16: libtiff keeps the first"),
        Bomb("tiff_second_page_huge", "tiff", _tiff([small, page(w, h)], [small_data, strip]),
             "ok", decoder_size=(16, 16), shape=(16, 16, 3), note="only page 0 is decoded"),
        Bomb("tiff_first_page_huge", "tiff", _tiff([page(w, h), small], [strip, small_data]), "too_large"),
        Bomb("tiff_tile_larger_than_image", "tiff",
             _tiff([_grey_page(16, 16, deflated_tile, tile=(4096, 4096), compression=8)], [deflated_tile]),
             "unsupported_format", decoder_size=(16, 16), decoder_bounded=False,
             note="a 16x16 image in one 4096x4096 deflated tile: OpenCV sizes its buffer by the tile"),
        Bomb("tiff_strip_taller_than_image", "tiff",
             _tiff([_grey_page(4096, 16, tall, rows_per_strip=60000, compression=8)], [tall]),
             "ok", decoder_size=(4096, 16), shape=(16, 4096, 3), note="RowsPerStrip 60000 on a 16-row image"),
        Bomb("tiff_cut", "tiff", real[:len(real) // 2], "decode_failed", decoder_size=(64, 48)),
        Bomb("tiff_bigtiff", "tiff", b"II+\x00\x08\x00\x00\x00" + bytes(16), "unsupported_format", decoder_size=None),
    ]


# ----------------------------------------------------------------------------------------------
# WebP and BMP (not accepted by the node: refused by their magic bytes, never decoded)
# ----------------------------------------------------------------------------------------------

def _riff(chunks: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


def _webp_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) % 2 else b"")


def _vp8l(width: int, height: int, rest: bytes = b"\x00" * 16) -> bytes:
    bits = (width - 1) | (height - 1) << 14  # alpha 0, version 0
    return _webp_chunk(b"VP8L", b"\x2f" + struct.pack("<I", bits) + rest)


def _vp8x(width: int, height: int, flags: int = 0) -> bytes:
    return _webp_chunk(b"VP8X", bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little")
                       + (height - 1).to_bytes(3, "little"))


def _webp_bombs(claim: tuple[int, int]) -> list[Bomb]:
    import cv2

    w, h = claim
    small = _encode(".webp", _image(16, 16), [cv2.IMWRITE_WEBP_QUALITY, 101])  # lossless 16x16: RIFF, WEBP, VP8L chunk
    small_vp8l = small[12:]
    vp8 = (b"\x10\x02\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", 16383, 16383) + bytes(16))
    anmf = (bytes(6) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little") + bytes(4) + small_vp8l)
    return [
        Bomb("webp_vp8l_max", "webp", _riff(_vp8l(16384, 16384)), "unsupported_format", decoder_size=(16384, 16384)),
        Bomb("webp_vp8_key_frame_max", "webp", _riff(_webp_chunk(b"VP8 ", vp8)), "unsupported_format",
             decoder_size=(16383, 16383)),
        Bomb("webp_vp8x_canvas_lies", "webp", _riff(_vp8x(w, h) + small_vp8l), "unsupported_format",
             note="VP8X canvas 16000x16000 around a 16x16 image"),
        Bomb("webp_vp8x_animated_frame_huge", "webp",
             _riff(_vp8x(w, h, flags=0x02) + _webp_chunk(b"ANIM", bytes(6)) + _webp_chunk(b"ANMF", anmf)),
             "unsupported_format"),
    ]


def _bmp(width: int, height: int, bpp: int = 24, compression: int = 0, palette: bytes = b"",
         pixels: bytes = b"") -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bpp, compression, len(pixels), 2835, 2835,
                       len(palette) // 4, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def _bmp_bombs(claim: tuple[int, int]) -> list[Bomb]:
    w, h = claim
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    return [
        Bomb("bmp_24bit_huge", "bmp", _bmp(w, h), "unsupported_format"),
        Bomb("bmp_top_down_huge", "bmp", _bmp(w, -h), "unsupported_format"),
        Bomb("bmp_rle8_huge", "bmp", _bmp(w, h, 8, 1, palette, b"\x00\x01"), "unsupported_format",
             note="RLE8 with only an end-of-bitmap code"),
    ]


def bombs(claim: tuple[int, int] = CLAIM) -> list[Bomb]:
    """Every case, in a fixed order (names are unique), declaring ``claim`` = (width, height).

    ``expect`` and ``decoder_size`` hold for the default ``CLAIM`` and ``LIMIT``; a smaller
    ``claim`` (e.g. just under a limit) makes the same quirks with sizes a decoder accepts, to
    measure what decoding them costs."""
    out = (_jpeg_bombs(claim) + _png_bombs(claim) + _tiff_bombs(claim) + _webp_bombs(claim)
           + _bmp_bombs(claim))
    out = [replace(b, decoder_size=claim) if b.decoder_size == CLAIM else b for b in out]
    assert len({b.name for b in out}) == len(out)
    return out


def bomb(name: str, claim: tuple[int, int] = CLAIM) -> Bomb:
    return next(b for b in bombs(claim) if b.name == name)


# ----------------------------------------------------------------------------------------------
# the camera process
# ----------------------------------------------------------------------------------------------

class BombCamera:
    """This module run as a camera process publishing ``sensor_msgs/CompressedImage`` on
    ``topic`` (reliable, depth 5, Fast DDS defaults), driven by JSON lines (see ``_publisher_main``)."""

    def __init__(self, topic: str):
        import pathlib
        import subprocess
        import sys

        from ros_testing import REPO, child_env

        self.proc = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).resolve()), "publisher", topic],
                                     cwd=REPO, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def request(self, cmd: dict, timeout: float = 120.0) -> dict:
        import json
        import select

        if self.proc.poll() is not None:
            raise RuntimeError(f"bomb camera exited with status {self.proc.returncode}")
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"bomb camera did not answer {cmd['op']} within {timeout} s")
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"bomb camera: {reply['error']}")
        return reply

    def wait_subscribers(self, timeout: float = 60.0) -> int:
        return self.request({"op": "wait_subs", "timeout": timeout}, timeout=timeout + 30)["count"]

    def bomb(self, name: str, stamp: tuple[int, int]) -> dict:
        return self.request({"op": "bomb", "name": name, "sec": stamp[0], "nanosec": stamp[1]})

    def jpeg(self, h: int, w: int, stamp: tuple[int, int]) -> dict:
        return self.request({"op": "jpeg", "h": h, "w": w, "sec": stamp[0], "nanosec": stamp[1]})

    def close(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()



def _publisher_main(topic: str) -> int:
    import array
    import json
    import sys
    import time

    import rclpy
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage

    cases = {b.name: b for b in bombs()}
    with rclpy.init(args=["ciae_bomb_camera"]):
        node = rclpy.create_node("ciae_bomb_camera")
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE)
        pub = node.create_publisher(CompressedImage, topic, qos)
        for line in sys.stdin:
            cmd = json.loads(line)
            reply: dict = {"ok": True}
            try:
                if cmd["op"] == "quit":
                    break
                if cmd["op"] == "wait_subs":
                    deadline = time.monotonic() + float(cmd.get("timeout", 30))
                    while pub.get_subscription_count() < 1 and time.monotonic() < deadline:
                        rclpy.spin_once(node, timeout_sec=0.05)
                    reply["count"] = pub.get_subscription_count()
                elif cmd["op"] in ("bomb", "jpeg"):
                    if cmd["op"] == "bomb":
                        b = cases[cmd["name"]]
                        data, fmt = b.data, b.codec
                    else:
                        data, fmt = real_jpeg(int(cmd["h"]), int(cmd["w"])), "jpeg"
                    m = CompressedImage(format=fmt, data=array.array("B", data))
                    m.header.stamp.sec, m.header.stamp.nanosec = int(cmd.get("sec", 0)), int(cmd.get("nanosec", 0))
                    m.header.frame_id = str(cmd.get("frame_id", "camera_optical_frame"))
                    pub.publish(m)
                    reply["bytes"] = len(data)
                else:
                    reply = {"error": f"unknown op {cmd['op']}"}
            except Exception as exc:  # noqa: BLE001 - reported to the test
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
        node.destroy_node()
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "publisher":
        sys.exit(_publisher_main(sys.argv[2]))
    sys.exit(f"usage: {sys.argv[0]} publisher TOPIC")
