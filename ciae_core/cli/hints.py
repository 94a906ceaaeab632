"""Error hints in the words of the command line that shows them.

The library speaks Python: ``PredictorError("... no CUDA GPU is available; use device='cpu'")`` is
right for a caller of ``Predictor(device=...)``. Shown by ``ciae-predict`` it should say
``--device cpu``, by the node (a ROS parameter) ``device:=cpu``. :func:`command_line_hint`
rewrites the keyword forms ``name='value'`` / ``name="value"`` / ``name=1.5`` / ``name=True`` of
the names the tool really has as options, and leaves everything else alone (a keyword the tool has
no option for stays as it is: it is still the truest hint there is).
"""

from __future__ import annotations

import argparse
import re
from typing import Iterable

_KEYWORD = re.compile(r"\b([a-z][a-z0-9_]*)=(?:'([^']*)'|\"([^\"]*)\"|(True|False|-?\d+(?:\.\d+)?)\b)")


def parser_options(parser: argparse.ArgumentParser) -> set[str]:
    """The keyword names of ``parser``'s options (``--input-size`` -> ``input_size``)."""
    return {a.dest for a in parser._actions if a.option_strings}  # noqa: SLF001 - argparse has no public list


def command_line_hint(message: str, options: Iterable[str], style: str = "option") -> str:
    """``message`` with ``name=value`` of every name in ``options`` written for a command line.

    ``style="option"``: ``--name-with-dashes value`` (argparse tools); ``style="ros"``:
    ``name:=value`` (a ROS parameter, as ``-p`` and ``ros2 launch`` take it; booleans lower case).
    """
    if style not in ("option", "ros"):
        raise ValueError(f"style must be 'option' or 'ros', got {style!r}")
    names = set(options)

    def rewrite(m: re.Match) -> str:
        name = m.group(1)
        if name not in names:
            return m.group(0)
        value = next(v for v in m.groups()[1:] if v is not None)
        if style == "ros":
            return f"{name}:={value.lower() if value in ('True', 'False') else value}"
        return f"--{name.replace('_', '-')} {value}"

    return _KEYWORD.sub(rewrite, message)
