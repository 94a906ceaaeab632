"""``ciae-synth``: write a synthetic COCO-panoptic data set (:mod:`ciae_core.synth`).

``ciae-synth --out DIR --num N --size HxW --seed S [--sequence]`` writes ``images/``,
``panoptic/`` and ``panoptic.json`` with :func:`ciae_core.synth.write_dataset`. ``--sequence``
writes ``N`` frames of one moving scene: by default a
:class:`ciae_core.synth_video.TrackingSequence` (look-alikes that cross and hide each other,
things that leave and come back, speed changes; :func:`ciae_core.synth_video.write_tracking_sequence`,
``--fps`` recorded for the stamps), or with ``--sequence-style smooth`` the gently bouncing
:class:`ciae_core.synth.SceneSequence` of the camera demo. Exit codes: 0 written, 2 a one-line
error or bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ciae_core import synth
from ciae_core.synth import SynthError, write_dataset
from ciae_core.synth_video import write_tracking_sequence


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
    p.add_argument("--sequence-style", choices=("tracking", "smooth"), default="tracking",
                   help="with --sequence: 'tracking' (crossings, occlusions, exits, speed changes, look-alikes) or "
                        "'smooth' (the camera demo's bouncing scene)")
    p.add_argument("--fps", type=float, default=30.0, help="with --sequence tracking: frame rate recorded for stamps")
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
        if args.sequence and args.sequence_style == "tracking":
            if args.num < 1:
                raise SynthError(f"--num must be >= 1, got {args.num}")
            path = write_tracking_sequence(args.out, args.num, args.size[0], args.size[1], args.seed,
                                           args.image_format, fps=args.fps)
        else:
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
