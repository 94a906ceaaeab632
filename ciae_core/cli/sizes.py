"""Image sizes on our command lines: always ``WIDTHxHEIGHT`` (``640x480``), as cameras and ROS
``sensor_msgs/Image`` (width, height) write them.

Used by ``ciae-synth --size``, ``ciae-export --size``, ``ciae-demo --size`` and
``ciae-bench --node --size``; messages that print an image size use the same order.
"""

from __future__ import annotations

import argparse

from ciae_core.user_input import quote


def parse_size(text: str, option: str = "--size", minimum: int = 1, multiple_of: int = 1) -> tuple[int, int]:
    """``"640x480"`` -> ``(width, height)`` = ``(640, 480)``.

    Raises ``ValueError`` with a one-line message naming ``option`` when ``text`` is not
    ``WIDTHxHEIGHT`` or a side is below ``minimum`` or not a multiple of ``multiple_of``.
    """
    try:
        width, height = (int(v) for v in str(text).lower().replace("×", "x").split("x"))
    except ValueError:
        raise ValueError(f"{option} must be WIDTHxHEIGHT, e.g. 640x480; got {quote(text)}") from None
    if width < minimum or height < minimum:
        raise ValueError(f"{option} {text}: width and height must be at least {minimum}")
    if width % multiple_of or height % multiple_of:
        raise ValueError(f"{option} {text}: width and height must be multiples of {multiple_of}")
    return width, height


def size_type(option: str = "--size", minimum: int = 1, multiple_of: int = 1, as_text: bool = False):
    """An argparse ``type=`` for a ``WIDTHxHEIGHT`` option: returns ``(width, height)`` (with
    ``as_text``, the checked size as the text ``"640x480"``, to hand on to another command line); a
    bad value is a usage error (exit status 2) with :func:`parse_size`'s message."""
    def convert(text: str) -> tuple[int, int] | str:
        try:
            width, height = parse_size(text, option, minimum, multiple_of)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return f"{width}x{height}" if as_text else (width, height)
    convert.__name__ = "WIDTHxHEIGHT"  # argparse names the type in its own messages
    return convert
