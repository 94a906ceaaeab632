"""``ciae-predict``: panoptic segmentation of an image file or folder, written as COCO panoptic.

Walks the images (:data:`IMAGE_EXTENSIONS`), runs :class:`ciae_core.predictor.Predictor` on them
in batches of ``--batch-size`` and writes PNGs + ``panoptic.json`` with
:func:`ciae_core.evaluation.write_coco_panoptic` (scorable with ``ciae-eval`` or panopticapi).
Exit codes: 0 done, 1 a one-line error (bad weights, images, output), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

import cv2
import torch

from ciae_core.cli.hints import command_line_hint, parser_options
from ciae_core.evaluation import EvaluationError, write_coco_panoptic
from ciae_core.model_domain import model_domain_warning
from ciae_core.predictor import ENGINES, PRECISIONS, Predictor, PredictorError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _list_images(path: str) -> list[pathlib.Path]:
    p = pathlib.Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise PredictorError(f"--images {path}: no such file or directory")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise PredictorError(f"--images {path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciae-predict", description="Panoptic segmentation of an image folder; writes "
                                "COCO-panoptic PNGs + predictions.json (scorable with ciae-eval or panopticapi).")
    p.add_argument("--weights", required=True, help=".safetensors checkpoint or .onnx export")
    p.add_argument("--images", required=True, help="image file or directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--engine", default="torch", choices=ENGINES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--score-threshold", type=float, default=None)
    p.add_argument("--nms-threshold", type=float, default=None)
    p.add_argument("--instance-score-threshold", type=float, default=None)
    p.add_argument("--min-stuff-area", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch / onnxruntime intra-op threads")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """``ciae-predict``: segment ``--images`` with ``--weights`` and write COCO panoptic to ``--out``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        print("ciae-predict: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        thr = {k: v for k, v in (("score_threshold", args.score_threshold), ("nms_threshold", args.nms_threshold),
                                 ("instance_score_threshold", args.instance_score_threshold),
                                 ("min_stuff_area", args.min_stuff_area)) if v is not None}
        predictor = Predictor(args.weights, engine=args.engine, device=args.device, input_size=args.input_size,
                              max_size=args.max_size, precision=args.precision, intra_op_threads=args.threads, **thr)
        warning = model_domain_warning(predictor.weights)
        if warning:
            logging.getLogger("ciae-predict").warning("%s", warning)
        files = _list_images(args.images)
        results, names, total_ms = [], [], 0.0
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            imgs = []
            for f in chunk:
                im = cv2.imread(str(f), cv2.IMREAD_COLOR)
                if im is None:
                    raise PredictorError(f"cannot decode image {f}")
                imgs.append(im)
            results.extend(predictor(imgs, color="bgr"))
            names.extend(f.name for f in chunk)
            total_ms += sum(predictor.timings.values())
        triples = [(n, int(pathlib.Path(n).stem) if pathlib.Path(n).stem.isdigit() else pathlib.Path(n).stem, r)
                   for n, r in zip(names, results)]
        try:
            json_path = write_coco_panoptic(args.out, triples, predictor.categories)
        except EvaluationError as e:
            raise PredictorError(str(e)) from None
    except PredictorError as e:
        print(f"ciae-predict: error: {command_line_hint(str(e), parser_options(parser))}", file=sys.stderr)
        return 1
    print(f"ciae-predict: {len(results)} image(s), {total_ms / max(1, len(results)):.1f} ms/image "
          f"({predictor.engine} on {predictor.device}); wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
