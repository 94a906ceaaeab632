"""``ciae-synth``: write a synthetic COCO-panoptic data set (:mod:`ciae_core.synth`).

``ciae-synth --out DIR --num N --size WIDTHxHEIGHT --seed S [--sequence] [--overwrite]`` writes
``images/``, ``panoptic/`` and ``panoptic.json`` with :func:`ciae_core.synth.write_dataset`.
A folder that is not empty is refused unless ``--overwrite``, which first removes the data-set
files a previous run wrote there (``images/NNNNNN.png|jpg``, ``panoptic/NNNNNN.png``,
``panoptic.json``), so old images never mix with new ones; other files are left alone. Exit codes:
0 written, 2 a one-line error or bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import re
import sys
from typing import Sequence

from ciae_core import synth
from ciae_core.cli.sizes import size_type
from ciae_core.synth import SynthError, write_dataset

_LOG = logging.getLogger("ciae-synth")
# the files write_dataset writes, by folder (what --overwrite may remove)
OWNED = {"images": re.compile(r"\d{6}\.(png|jpg)"), "panoptic": re.compile(r"\d{6}\.png")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciae-synth", description=synth.__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (images/, panoptic/, panoptic.json); "
                   "must be empty or new unless --overwrite")
    p.add_argument("--num", type=int, default=100, help="number of images (frames with --sequence)")
    p.add_argument("--size", type=size_type("--size", minimum=32), default=(320, 320), metavar="WIDTHxHEIGHT",
                   help="image size WIDTHxHEIGHT, e.g. 640x480 (default 320x320)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")
    p.add_argument("--sequence", action="store_true", help="frames of one moving scene instead of independent scenes")
    p.add_argument("--image-format", choices=("png", "jpg"), default="png",
                   help="image file format (png: lossless, default; jpg: quality 95, ~5x smaller)")
    p.add_argument("--void-border", type=int, default=0,
                   help="void seam width in px at segment boundaries (independent scenes only)")
    p.add_argument("--workers", type=int, default=0, help="render in this many processes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the data set in a non-empty --out (its old images/, panoptic/ files and "
                        "panoptic.json are removed first; other files stay)")
    return p


def prepare_output(out: pathlib.Path, overwrite: bool) -> int:
    """Make sure ``out`` can receive a new data set; returns how many old files were removed.

    New or empty: nothing to do. Not empty: ``SynthError`` unless ``overwrite``, which removes the
    files of :data:`OWNED` and ``panoptic.json`` (and ``images/``, ``panoptic/`` when that empties them).
    """
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return 0
    if not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise SynthError(f"--out {out} is not empty ({shown}); pass --overwrite to replace the data set in it, "
                         "or choose a new folder")
    removed = 0
    try:
        for sub, pattern in OWNED.items():
            folder = out / sub
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                if f.is_file() and pattern.fullmatch(f.name):
                    f.unlink()
                    removed += 1
            others = sorted(f.name for f in folder.iterdir())
            if others:
                _LOG.warning("%s keeps %d file(s) ciae-synth did not write (%s); panoptic.json lists only "
                             "the new ones", folder, len(others), ", ".join(others[:3]))
            else:
                folder.rmdir()
        if (out / "panoptic.json").is_file():
            (out / "panoptic.json").unlink()
            removed += 1
    except OSError as e:
        raise SynthError(f"cannot remove the old data set in {out}: {e.strerror or e}") from None
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    """``ciae-synth``: write a synthetic COCO-panoptic data set."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    width, height = args.size
    try:
        if args.num < 1:  # before anything is removed
            raise SynthError(f"--num must be >= 1, got {args.num}")
        removed = prepare_output(pathlib.Path(args.out), args.overwrite)
        if removed:
            _LOG.info("--overwrite: removed %d file(s) of the previous data set in %s", removed, args.out)
        kwargs = {} if args.sequence else {"void_border": args.void_border}
        path = write_dataset(args.out, args.num, height, width, args.seed, args.sequence,
                             args.image_format, num_workers=args.workers, **kwargs)
    except SynthError as e:
        print(f"ciae-synth: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.num} {'frames' if args.sequence else 'scenes'} ({width}x{height}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
