"""``ciae-eval``: Panoptic Quality of prediction files, or of a model on a COCO-panoptic data set.

Three modes: ``--gt-json/--pred-json`` scores COCO-panoptic files with
:func:`ciae_core.evaluation.pq_compute`; ``--weights`` runs :class:`ciae_core.predictor.Predictor`
over a data set (:class:`ciae_core.data.CocoPanopticDataset`) and evaluates in memory
(optionally writing the predictions); ``--weights --video DIR`` tracks over synthetic sequences
and reports the video metrics (:mod:`ciae_core.cli.eval_video`). Prints the PQ table; exit codes: 0 done, 2 a one-line
error or bad arguments. This layer is the only place that uses both the evaluator and the
predictor (the library modules do not import each other).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from ciae_core.cli import eval_video
from ciae_core.cli.hints import command_line_hint, parser_options
from ciae_core.evaluation import (CocoPanopticWriter, EvaluationError, PanopticEvaluator, format_pq_table,
                                  pq_compute)
from ciae_core.predictor_settings import ENGINES, PRECISIONS
from ciae_core.video_metrics import format_video_table

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciae-eval", description="Panoptic Quality (COCO panoptic API semantics).")
    p.add_argument("--gt-json", help="ground-truth panoptic JSON")
    p.add_argument("--gt-dir", help="ground-truth PNG directory (default: JSON path without .json)")
    p.add_argument("--pred-json", help="prediction panoptic JSON")
    p.add_argument("--pred-dir", help="prediction PNG directory (default: JSON path without .json)")
    p.add_argument("--weights", help="evaluate this model (.safetensors; .onnx / int8 .xml for the other engines) "
                   "instead of prediction files")
    p.add_argument("--data", help="with --weights: data set dir with images/, panoptic/, panoptic.json")
    p.add_argument("--image-dir", help="with --weights: image directory (default DATA/images)")
    p.add_argument("--engine", default="torch", choices=ENGINES,
                   help="with --weights: inference engine (default torch; auto: the CPU default, see README)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="with --weights: the engine's precision (int8: openvino with an int8 .xml; auto: the best the "
                        "CPU runs natively)")
    p.add_argument("--threads", type=int, default=None, help="with --weights: torch / onnxruntime / OpenVINO threads")
    p.add_argument("--device", default="cpu", help="with --weights: cpu, cuda or cuda:<index> (default cpu)")
    p.add_argument("--input-size", type=int, default=None,
                   help="with --weights: shorter side fed to the model (default: the model's)")
    p.add_argument("--max-images", type=int, default=0, help="with --weights: evaluate only the first N (0 = all)")
    p.add_argument("--pred-out", help="with --weights: also write the predictions (COCO panoptic) here")
    p.add_argument("--num-workers", type=int, default=0, help="processes for file evaluation")
    p.add_argument("--per-class", action="store_true", help="also print the per-class table")
    p.add_argument("--json-out", help="write the full result (fractions, per class) to this JSON file")
    eval_video.add_arguments(p)
    return p


def _evaluate_model(args) -> dict[str, Any]:
    """Run ``Predictor`` over a COCO-panoptic data set and evaluate in memory (optionally write)."""
    from ciae_core.data import CocoPanopticDataset, DatasetError  # lazy: these pull in torch and the model
    from ciae_core.model_domain import model_domain_warning
    from ciae_core.predictor import Predictor, PredictorError

    gt_json = args.gt_json or os.path.join(args.data, "panoptic.json")
    gt_dir = args.gt_dir or os.path.join(args.data, "panoptic")
    image_dir = args.image_dir or os.path.join(args.data, "images")
    try:
        dataset = CocoPanopticDataset(image_dir, gt_dir, gt_json)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        predictor = Predictor(args.weights, engine=args.engine, device=args.device, input_size=args.input_size,
                              precision=args.precision, intra_op_threads=args.threads)
    except (DatasetError, PredictorError) as e:
        raise EvaluationError(str(e)) from None
    warning = model_domain_warning(predictor.weights)
    if warning:
        logger.warning("%s", warning)
    categories = list(predictor.categories)
    model_ids = {c.id for c in categories}
    missing = [c.id for c in dataset.categories if c.id not in model_ids]
    if missing:
        raise EvaluationError(f"the model does not know the data set's category ids {missing[:5]}; "
                              f"evaluate it on data with its own categories")
    evaluator = PanopticEvaluator(categories)
    writer = CocoPanopticWriter(args.pred_out, categories) if args.pred_out else None
    n = len(dataset) if args.max_images <= 0 else min(len(dataset), args.max_images)
    for i in range(n):
        try:
            image, gt_ids, gt_segs, image_id, file_name = dataset.load(i)
        except DatasetError as e:
            raise EvaluationError(str(e)) from None
        result = predictor(image, color="rgb")
        evaluator.process((gt_ids, gt_segs), result, image_id=image_id)
        if writer is not None:
            writer.add(file_name, image_id, result)
        if (i + 1) % 50 == 0:
            logger.info("evaluated %d / %d images", i + 1, n)
    if writer is not None:
        logger.info("wrote predictions to %s", writer.close())
    evaluator.evaluate()
    return evaluator.summary


def main(argv: Sequence[str] | None = None) -> int:
    """``ciae-eval``: PQ of prediction files, or of a model (``--weights``) on a data set."""
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.video:
            summary = eval_video.run(args)
            print(format_video_table(summary))
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump(summary, f, indent=1, default=str)
            return 0
        if args.weights:
            if not (args.data or (args.gt_json and args.gt_dir and args.image_dir)):
                p.error("--weights needs --data DIR (or --gt-json, --gt-dir and --image-dir)")
            args.data = args.data or ""
            summary = _evaluate_model(args)
        else:
            if not (args.gt_json and args.pred_json):
                p.error("give --gt-json and --pred-json (or --weights and --data)")
            summary = pq_compute(args.gt_json, args.pred_json, args.gt_dir, args.pred_dir,
                                 num_workers=args.num_workers)
    except EvaluationError as e:
        print(f"ciae-eval: error: {command_line_hint(str(e), parser_options(p))}", file=sys.stderr)
        return 2
    print(format_pq_table(summary, per_class=args.per_class))
    if args.json_out:
        out = dict(summary)
        out["per_class"] = {str(k): v for k, v in summary["per_class"].items()}
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
