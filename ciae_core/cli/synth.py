"""``ciae-synth``: write a synthetic COCO-panoptic data set (:mod:`ciae_core.synth`).

``ciae-synth --out DIR --num N --size HxW --seed S [--sequence]`` writes ``images/``,
``panoptic/`` and ``panoptic.json`` with :func:`ciae_core.synth.write_dataset`. Exit codes: 0
written, 2 a one-line error or bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ciae_core import synth
from ciae_core.synth import SynthError, write_dataset


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 320x320 (HxW), got {text!r}") from None
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciae-synth", description=synth.__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (images/, panoptic/, panoptic.json)")
    p.add_argument("--num", type=int, default=100, help="number of images (frames with --sequence)")
    p.add_argument("--size", type=_parse_size, default=(320, 320), help="HxW, e.g. 320x320")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequence", action="store_true", help="frames of one moving scene instead of independent scenes")
    p.add_argument("--image-format", choices=("png", "jpg"), default="png")
    p.add_argument("--void-border", type=int, default=0,
                   help="void seam width in px at segment boundaries (independent scenes only)")
    p.add_argument("--workers", type=int, default=0, help="render in this many processes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``ciae-synth``: write a synthetic COCO-panoptic data set."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        kwargs = {} if args.sequence else {"void_border": args.void_border}
        path = write_dataset(args.out, args.num, args.size[0], args.size[1], args.seed, args.sequence,
                             args.image_format, num_workers=args.workers, **kwargs)
    except SynthError as e:
        print(f"ciae-synth: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.num} {'frames' if args.sequence else 'scenes'} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
