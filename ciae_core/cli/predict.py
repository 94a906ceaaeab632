"""``ciae-predict``: panoptic segmentation of an image file or folder, written as COCO panoptic.

Walks the images (:data:`IMAGE_EXTENSIONS`; other files are named in a warning and skipped), runs
:class:`ciae_core.predictor.Predictor` on them in batches of ``--batch-size`` and writes PNGs +
``panoptic.json`` with :func:`ciae_core.evaluation.write_coco_panoptic` (scorable with
``ciae-eval`` or panopticapi). ``--vis DIR`` also writes one overlay PNG per image for people
(:func:`ciae_core.visualize.render_overlay`, the renderer of the node's ``panoptic/overlay``).
``--weights`` defaults to the shipped model, as the node, ``ciae-demo`` and ``ciae-bag`` do.

An image that cannot be decoded, or that the model cannot take (too small, extreme aspect ratio),
is skipped with a warning and counted in the summary line; ``--strict`` makes it an error instead.
Exit codes: 0 done, 1 a one-line error (bad weights, no usable image, output), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from dataclasses import dataclass, field

import cv2
import torch

from ciae_core.cli.hints import command_line_hint, parser_options
from ciae_core.evaluation import EvaluationError, write_coco_panoptic
from ciae_core.model_domain import model_domain_warning
from ciae_core.predictor import ENGINES, PRECISIONS, Predictor, PredictorError
from ciae_core.shipped_model import default_weights
from ciae_core.visualize import render_overlay

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_LOG = logging.getLogger("ciae-predict")


def _list_images(path: str) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """``(images, other_files)`` of a file or folder (not recursive; hidden files are ignored)."""
    p = pathlib.Path(path)
    if p.is_file():
        return [p], []
    if not p.is_dir():
        raise PredictorError(f"--images {path}: no such file or directory")
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise PredictorError(f"--images {path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return images, [f for f in files if f.suffix.lower() not in IMAGE_EXTENSIONS]


def _names(paths, limit: int = 5) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


@dataclass
class _Run:
    """What a run did: results with their file names, skipped files by reason, time."""

    names: list[str] = field(default_factory=list)
    results: list = field(default_factory=list)
    skipped: dict[str, list[pathlib.Path]] = field(default_factory=dict)
    total_ms: float = 0.0
    overlays: int = 0

    def skip(self, reason: str, f: pathlib.Path, detail: str, strict: bool) -> None:
        if strict:
            raise PredictorError(f"{detail} (without --strict it is skipped)")
        _LOG.warning("skipping %s", detail)
        self.skipped.setdefault(reason, []).append(f)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciae-predict", description="Panoptic segmentation of an image folder; writes "
                                "COCO-panoptic PNGs + panoptic.json (scorable with ciae-eval or panopticapi) and, "
                                "with --vis, overlay PNGs to look at.")
    p.add_argument("--weights", default="", help=".safetensors checkpoint, .onnx export or (openvino) int8 .xml "
                   "(default: the shipped model, models/*.safetensors, as the node uses)")
    p.add_argument("--images", required=True, help="image file or directory (not recursive)")
    p.add_argument("--out", required=True, help="output directory (panoptic/*.png and panoptic.json)")
    p.add_argument("--vis", default=None, metavar="DIR",
                   help="also write one overlay PNG per image to DIR: a colour per segment, outlines and labels "
                        "(category and score), the node's panoptic/overlay renderer")
    p.add_argument("--strict", action="store_true",
                   help="stop with an error at the first image that cannot be read or used (default: skip it "
                        "with a warning and count it)")
    p.add_argument("--engine", default="torch", choices=ENGINES, help="inference engine (default torch)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index> (default cpu)")
    p.add_argument("--input-size", type=int, default=None,
                   help="network input size: the shorter image side is resized to it (default: the model's)")
    p.add_argument("--max-size", type=int, default=1333, help="cap on the longer resized side (default 1333)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (default), fp16/bf16 (torch; openvino: bf16 on AMX/AVX512_BF16 CPUs), int8 (openvino, "
                        "an int8 .xml) or auto (the best the CPU runs natively)")
    p.add_argument("--openvino-device", default="CPU", help="engine openvino: CPU or GPU (an Intel GPU)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="proposal score threshold before NMS (default: the model's)")
    p.add_argument("--nms-threshold", type=float, default=None,
                   help="class-wise NMS IoU threshold (default: the model's)")
    p.add_argument("--instance-score-threshold", type=float, default=None,
                   help="minimum score of a thing instance in the output (default: the model's)")
    p.add_argument("--min-stuff-area", type=int, default=None,
                   help="stuff regions smaller than this many pixels become void (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch / onnxruntime / OpenVINO threads")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return p


def _make_predictor(args) -> Predictor:
    weights = args.weights
    if not weights:
        found = default_weights()
        if found is None:
            raise PredictorError("no --weights given and no shipped model found (models/*.safetensors)")
        weights = str(found)
    if args.threads:
        torch.set_num_threads(args.threads)
    thr = {k: v for k, v in (("score_threshold", args.score_threshold), ("nms_threshold", args.nms_threshold),
                             ("instance_score_threshold", args.instance_score_threshold),
                             ("min_stuff_area", args.min_stuff_area)) if v is not None}
    predictor = Predictor(weights, engine=args.engine, device=args.device, input_size=args.input_size,
                          max_size=args.max_size, precision=args.precision, intra_op_threads=args.threads,
                          openvino_device=args.openvino_device, **thr)
    warning = model_domain_warning(predictor.weights)
    if warning:
        _LOG.warning("%s", warning)
    return predictor


def _read(f: pathlib.Path, predictor: Predictor, run: _Run, strict: bool):
    """The BGR image of ``f``, or ``None`` (skipped and counted) when it cannot be used."""
    im = cv2.imread(str(f), cv2.IMREAD_COLOR)
    if im is None:
        run.skip("unreadable", f, f"{f}: cannot decode the image (corrupt or not an image)", strict)
        return None
    try:
        predictor.letterbox(im.shape[0], im.shape[1])
    except PredictorError as e:
        run.skip("unusable", f, f"{f}: {e}", strict)
        return None
    return im


def _predict_all(files: list[pathlib.Path], predictor: Predictor, args) -> _Run:
    """Segment ``files`` in batches; overlays to ``args.vis`` as they come."""
    run = _Run()
    vis = pathlib.Path(args.vis) if args.vis else None
    if vis is not None:
        try:
            vis.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PredictorError(f"--vis {vis}: cannot create the folder: {e.strerror or e}") from None
    for start in range(0, len(files), args.batch_size):
        chunk = [(f, _read(f, predictor, run, args.strict)) for f in files[start:start + args.batch_size]]
        chunk = [(f, im) for f, im in chunk if im is not None]
        if not chunk:
            continue
        results = predictor([im for _, im in chunk], color="bgr")
        run.total_ms += sum(predictor.timings.values())
        for (f, im), result in zip(chunk, results):
            run.names.append(f.name)
            run.results.append(result)
            if vis is not None:
                overlay = render_overlay(im[:, :, ::-1], result, predictor.categories)
                if not cv2.imwrite(str(vis / f"{f.stem}.png"), overlay):
                    raise PredictorError(f"--vis: cannot write {vis / (f.stem + '.png')}")
                run.overlays += 1
    return run


def main(argv: list[str] | None = None) -> int:
    """``ciae-predict``: segment ``--images`` with ``--weights`` and write COCO panoptic to ``--out``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        print("ciae-predict: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        files, others = _list_images(args.images)
        if others:
            _LOG.warning("skipping %d file(s) that are not images (extensions %s): %s", len(others),
                         " ".join(IMAGE_EXTENSIONS), _names(others))
        predictor = _make_predictor(args)
        run = _predict_all(files, predictor, args)
        if not run.results:
            raise PredictorError(f"--images {args.images}: none of the {len(files)} image(s) could be used "
                                 "(see the warnings above)")
        triples = [(n, int(pathlib.Path(n).stem) if pathlib.Path(n).stem.isdigit() else pathlib.Path(n).stem, r)
                   for n, r in zip(run.names, run.results)]
        try:
            json_path = write_coco_panoptic(args.out, triples, predictor.categories)
        except EvaluationError as e:
            raise PredictorError(str(e)) from None
    except PredictorError as e:
        print(f"ciae-predict: error: {command_line_hint(str(e), parser_options(parser))}", file=sys.stderr)
        return 1
    n = len(run.results)
    line = (f"ciae-predict: {n} image(s), {run.total_ms / max(1, n):.1f} ms/image "
            f"({predictor.engine} on {predictor.device}); wrote {json_path}")
    if run.overlays:
        line += f" and {run.overlays} overlay(s) to {args.vis}"
    skipped = [f"{len(fs)} {reason} ({_names(fs, 3)})" for reason, fs in run.skipped.items()]
    if others:
        skipped.append(f"{len(others)} not an image")
    if skipped:
        line += "; skipped " + ", ".join(skipped)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
