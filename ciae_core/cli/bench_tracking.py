"""``ciae-bench --tracking``: IoU-only against embedding + IoU association on unseen sequences (issue 14).

For every seed (default 9001-9005, used by no test and not for tuning: the tracker's defaults were
chosen on 2001-2005) a :class:`ciae_core.synth_video.TrackingSequence` of ``--frames`` frames is
rendered in memory; the shipped model (:class:`ciae_core.predictor.Predictor`, with embeddings)
segments each frame once, and every association variant (IoU or embedding + IoU, box or mask
IoU) tracks the same results at the sequence's frame rate. Reported per variant over all
sequences (:class:`ciae_core.video_metrics.VideoEvaluator`): IDF1, the detection F1 that bounds it,
MOTA, ID switches (in total, per 100 ground-truth tracks, and within the frames of the scripted
crossings), VPQ (k = 0, 5, 10, 15), STQ, and the tracker's wall time per frame on the sequences
and on frames with 30 thing segments (640x480, ground-truth segments, random unit embeddings).
Prints a markdown table; everything in ``--json``. Exit status 0; 1 for an unusable option or
model (one line); argparse's 2 for an unknown flag.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from typing import Any

import numpy as np

from ciae_core.cli.eval_video import track_frames
from ciae_core.structures import PanopticResult, Segment
from ciae_core.synth import SYNTH_CATEGORIES
from ciae_core.synth_video import TrackingSequence
from ciae_core.tracking import SegmentTracker
from ciae_core.cli.sizes import parse_size
from ciae_core.user_input import quote
from ciae_core.video_metrics import VideoEvaluator

VARIANTS = {"iou": {"association": "iou"}, "iou+mask": {"association": "iou", "mask_iou": True},
            "emb+iou": {"association": "embedding"}, "emb+mask": {"association": "embedding", "mask_iou": True}}
CROSSING_WINDOW = (-10, 30)  # frames around a scripted crossing in which a switch counts as "at the crossing"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciae-bench --tracking", description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=None, help="model (default: models/*.safetensors)")
    p.add_argument("--seeds", default="9001,9002,9003,9004,9005", help="sequence seeds, comma separated")
    p.add_argument("--frames", type=int, default=200, help="frames per sequence")
    p.add_argument("--size", default="320x320", metavar="WIDTHxHEIGHT", help="size of the sequences (default 320x320)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of the stamps")
    p.add_argument("--variants", default=",".join(VARIANTS), help="association variants: " + ", ".join(VARIANTS))
    p.add_argument("--timing-frames", type=int, default=60, help="frames of the 30-segment timing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--json", default="bench_tracking.json", help="output JSON path")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _options(args) -> tuple[list[int], tuple[int, int], list[str]]:
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {quote(args.seeds)}") from None
    w, h = parse_size(args.size, minimum=32)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or not seeds or args.frames < 2 or not args.fps > 0:
        raise ValueError(f"need known --variants ({', '.join(VARIANTS)}), seeds, --frames >= 2 and --fps > 0")
    return seeds, (h, w), variants


def _crossing_switches(evaluator: VideoEvaluator, crossings: list[list[tuple]]) -> int:
    """ID switches of a crossing pair's things within :data:`CROSSING_WINDOW` of their crossing."""
    n = 0
    for seq, frame, gt in evaluator.id_switches():
        for _, a, b, t_c in crossings[seq]:
            if gt in (a, b) and CROSSING_WINDOW[0] <= frame - t_c <= CROSSING_WINDOW[1]:
                n += 1
                break
    return n


def timing_at_30_segments(variants: list[str], frames: int = 60, seed: int = 77) -> dict[str, float]:
    """Median tracker wall time (ms) per frame on 640x480 frames with ~30 thing segments
    (ground-truth segments of a crowded :class:`TrackingSequence`, random unit embeddings)."""
    seq = TrackingSequence(seed, 480, 640, frames, crossings=4, exits=4, side_by_side=3, others=14, min_size=20,
                           max_size_frac=0.12)
    cats = {c.id: c for c in SYNTH_CATEGORIES}
    rng = np.random.default_rng(seed)
    looks = rng.normal(size=(4 + len(seq.instances), 32))
    results = []
    for t in range(frames):
        _, pan, infos = seq.frame(t)
        segs = [Segment(s["id"], s["category_id"], cats[s["category_id"]].name, s["isthing"], 0.9, s["area"],
                        tuple(s["bbox"])) for s in infos]
        emb = np.stack([looks[s.id] + 0.05 * rng.normal(size=32) for s in segs]).astype(np.float32)
        results.append(PanopticResult(pan, segs, embeddings=emb / np.linalg.norm(emb, axis=1, keepdims=True)))
    out = {"segments_per_frame": float(np.mean([sum(s.isthing for s in r.segments) for r in results]))}
    for name in variants:
        tracker, times = SegmentTracker(**VARIANTS[name]), []
        for t, r in enumerate(results):
            t0 = time.perf_counter()
            tracker.update(r, t / 30.0)
            times.append(1e3 * (time.perf_counter() - t0))
        out[name] = float(np.median(times[5:]))
    return out


def run(args) -> dict[str, Any]:
    from ciae_core.predictor import Predictor

    seeds, (h, w), variants = _options(args)
    weights = args.weights or str(sorted((pathlib.Path(__file__).resolve().parents[2] / "models")
                                         .glob("*.safetensors"))[0])
    predictor = Predictor(weights, device=args.device)
    evaluators = {v: VideoEvaluator(predictor.categories) for v in variants}
    timings: dict[str, list[float]] = {v: [] for v in variants}
    crossings, predict_ms = [], []
    for seed in seeds:
        seq = TrackingSequence(seed, h, w, args.frames)
        crossings.append([e for e in seq.events if e[0] == "cross"])
        frames = []
        for t in range(args.frames):
            image, pan, infos = seq.frame(t)
            t0 = time.perf_counter()
            frames.append((t / args.fps, pan, infos, predictor(image, return_embeddings=True)))
            predict_ms.append(1e3 * (time.perf_counter() - t0))
        track_frames(frames, {v: SegmentTracker(**VARIANTS[v]) for v in variants}, evaluators, timings)
        logging.getLogger(__name__).info("sequence %d done", seed)
    rows = {}
    for v in variants:
        s = evaluators[v].summary()
        s["crossing_switches"] = _crossing_switches(evaluators[v], crossings)
        s["tracker_ms"] = float(np.median(timings[v]))
        rows[v] = s
    return {"rows": rows, "timing_30": timing_at_30_segments(variants, max(6, args.timing_frames)), "predict_ms": float(np.median(predict_ms)),
            "seeds": seeds, "frames": args.frames, "size": [h, w], "weights": weights,
            "num_crossings": sum(len(c) for c in crossings)}


def markdown(report: dict[str, Any]) -> str:
    head = ("| association | IDF1 | det. F1 (IDF1 bound) | MOTA | ID sw. | ID sw. / 100 GT tracks | ID sw. at "
            "crossings | VPQ | STQ | tracker ms/frame | ms/frame, 30 segments |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in report["rows"].items():
        lines.append(f"| {name} | {100 * s['idf1']:.1f} | {100 * s['detection_f1']:.1f} | {100 * s['mota']:.1f} | "
                     f"{s['id_switches']} | {s['idsw_per_100']:.1f} | {s['crossing_switches']} | "
                     f"{100 * s['vpq']:.1f} | {100 * s['stq']:.1f} | {s['tracker_ms']:.2f} | "
                     f"{report['timing_30'][name]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from ciae_core.predictor_error import PredictorError

    try:
        report = run(args)
    except (ValueError, IndexError, PredictorError) as e:
        print(f"ciae-bench --tracking: error: {e}", file=sys.stderr)
        return 1
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    any_row = next(iter(report["rows"].values()))
    print(f"ciae-bench --tracking: {len(report['seeds'])} sequences x {report['frames']} frames "
          f"({report['size'][0]}x{report['size'][1]}, seeds {report['seeds'][0]}-{report['seeds'][-1]}), "
          f"{any_row['num_gt_tracks']} ground-truth tracks, {report['num_crossings']} scripted crossings; "
          f"model {pathlib.Path(report['weights']).name} ({report['predict_ms']:.0f} ms/frame); "
          f"{report['timing_30']['segments_per_frame']:.0f} thing segments/frame in the 30-segment timing\n")
    print(markdown(report))
    print(f"\nwrote {path}")
    return 0
