"""``ciae-eval --video DIR``: a model and the tracker over synthetic sequences (issue 14).

``DIR`` is one sequence written by ``ciae-synth --sequence`` (``images/``, ``panoptic/``,
``panoptic.json``, frames in file order, ``info.fps`` giving the stamps ``i / fps``; 30 when
absent) or a folder of such sequences (every sub-folder with a ``panoptic.json``). Every frame
runs :class:`ciae_core.predictor.Predictor` (with embeddings for ``--association embedding``)
and one :class:`ciae_core.tracking.SegmentTracker` per sequence; :class:`ciae_core.video_metrics.
VideoEvaluator` scores the tracked output (IDF1, MOTA, ID switches, VPQ, STQ). Prints the
metric table; exit codes as ``ciae-eval`` (0 done, 2 a one-line error).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from ciae_core.evaluation import EvaluationError
from ciae_core.structures import CategoryInfo, PanopticResult
from ciae_core.tracking import ASSOCIATIONS, SegmentTracker
from ciae_core.video_metrics import VideoEvaluator

logger = logging.getLogger(__name__)


def add_arguments(p) -> None:
    """The ``--video`` options of ``ciae-eval`` (with ``--weights``, ``--engine``, ``--device``,
    ``--input-size``, ``--json-out`` of the image mode)."""
    p.add_argument("--video", metavar="DIR", help="with --weights: track over the synthetic sequence(s) in DIR and "
                   "report IDF1, MOTA, ID switches, VPQ and STQ")
    p.add_argument("--association", choices=ASSOCIATIONS, default="embedding",
                   help="with --video: the tracker's association (embedding + IoU, or IoU only)")
    p.add_argument("--mask-iou", action="store_true", help="with --video: the tracker compares masks, not boxes")


def find_sequences(root: str) -> list[str]:
    """``root`` if it is a sequence, else its sub-folders that are (sorted); EvaluationError if none."""
    if os.path.isfile(os.path.join(root, "panoptic.json")):
        return [root]
    if not os.path.isdir(root):
        raise EvaluationError(f"--video: no such directory: {root}")
    found = sorted(os.path.join(root, d) for d in os.listdir(root)
                   if os.path.isfile(os.path.join(root, d, "panoptic.json")))
    if not found:
        raise EvaluationError(f"--video: {root} has no panoptic.json and no sub-folder with one "
                              f"(write sequences with ciae-synth --sequence)")
    return found


def sequence_frames(path: str):
    """``(dataset, fps)`` of one sequence folder (:class:`ciae_core.data.CocoPanopticDataset`)."""
    from ciae_core.data import CocoPanopticDataset, DatasetError

    try:
        with open(os.path.join(path, "panoptic.json")) as f:
            info = json.load(f).get("info", {})
        dataset = CocoPanopticDataset(os.path.join(path, "images"), os.path.join(path, "panoptic"),
                                      os.path.join(path, "panoptic.json"))
    except (OSError, ValueError, DatasetError) as e:
        raise EvaluationError(f"--video: {path}: {e}") from None
    fps = float(info.get("fps", 30.0))
    if not fps > 0:
        raise EvaluationError(f"--video: {path}: info.fps must be > 0, got {fps}")
    return dataset, fps


def track_frames(frames, trackers: dict[str, SegmentTracker], evaluators: dict[str, VideoEvaluator],
                 timings: dict[str, list[float]]) -> None:
    """Feed one sequence's ``(stamp, gt_ids, gt_segments, result)`` frames to every named tracker
    (each gets its own copy of the segments) and its evaluator; per-frame tracker wall times (ms)
    are appended to ``timings``."""
    for ev in evaluators.values():
        ev.begin_sequence()
    for stamp, gt_ids, gt_segs, result in frames:
        for name, tracker in trackers.items():
            mine = PanopticResult(result.id_map, [_copy(s) for s in result.segments], result.confidence,
                                  result.embeddings)
            t0 = time.perf_counter()
            tracker.update(mine, stamp)
            timings[name].append(1e3 * (time.perf_counter() - t0))
            evaluators[name].add(gt_ids, gt_segs, mine)


def _copy(segment):
    from dataclasses import replace

    return replace(segment)


def evaluate_video(predict: Callable[[np.ndarray], PanopticResult], categories: Sequence[CategoryInfo],
                   sequences: Sequence[str], tracker_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Track every sequence folder with ``predict`` (image → result) and a fresh tracker; the
    :meth:`VideoEvaluator.summary` plus ``tracker_ms`` (median per frame) and ``num_frames``."""
    evaluator = VideoEvaluator(categories)
    timings: dict[str, list[float]] = {"t": []}
    for path in sequences:
        dataset, fps = sequence_frames(path)

        def frames():
            for i in range(len(dataset)):
                image, gt_ids, gt_segs, _, _ = dataset.load(i)
                yield i / fps, gt_ids, gt_segs, predict(image)

        track_frames(frames(), {"t": SegmentTracker(**tracker_kwargs)}, {"t": evaluator}, timings)
        logger.info("tracked %s (%d frames)", path, len(dataset))
    summary = evaluator.summary()
    summary["tracker_ms"] = float(np.median(timings["t"])) if timings["t"] else 0.0
    return summary


def run(args) -> dict[str, Any]:
    """``ciae-eval --video``: the summary dict (EvaluationError for a one-line problem)."""
    from ciae_core.predictor import Predictor, PredictorError  # lazy: torch and the model

    if not args.weights:
        raise EvaluationError("--video needs --weights (the model to track with)")
    sequences = find_sequences(args.video)
    try:
        predictor = Predictor(args.weights, engine=args.engine, device=args.device, input_size=args.input_size)
    except PredictorError as e:
        raise EvaluationError(str(e)) from None
    with_embeddings = args.association == "embedding"
    return evaluate_video(lambda image: predictor(image, return_embeddings=with_embeddings), predictor.categories,
                          sequences, {"association": args.association, "mask_iou": args.mask_iou})
