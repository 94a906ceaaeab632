"""``ciae-bench``: latency of CIAE against its detector base (FCOS) and a two-stage peer (Mask R-CNN).

Everything runs in one process on the same inputs with the same thread settings and the same
memory format for every torch model: for each backbone (``r50`` and ``small``) and each
shorter-side size, every model gets ``--warmup`` untimed calls and ``--repeats`` timed calls on
the same real images, in interleaved rounds (:mod:`ciae_core.bench_contenders`), and we report
the median and the 90th percentile of the end-to-end wall time and the peak memory of one call
(:mod:`ciae_core.bench`).

Output: a markdown table of latencies and ratios (ours / FCOS, fusion share of ours' total,
onnxruntime / torch, ours / Mask R-CNN) and a stage table on stdout
(:mod:`ciae_core.bench_report`); everything in ``--json``. Exit status 0; 1 when an option's
value or a model is unusable (one line on stderr); argparse's 2 for an unknown flag.

``ciae-bench --node [...]``: the node overhead over real DDS. It belongs to the ROS layer, which
registers it as the entry point ``node`` of the group ``ciae_core.bench_plugins`` (this package
imports nothing of ROS); without that registration the flag fails with one line, exit status 2.

Run as ``python -m ciae_core.cli.bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import Any

import torch

from ciae_core.bench import BenchError, load_inputs, synthetic_inputs
from ciae_core.bench_contenders import (ALL_MODELS, BACKBONES, OURS_ARCH, SMALL_ARCH, BenchOptions, bench_group,
                                        channels_last_for, ours_checkpoint)
from ciae_core.bench_report import markdown_tables, ratios

# entry points other packages register to extend ciae-bench; "node" runs `ciae-bench --node`
PLUGIN_GROUP = "ciae_core.bench_plugins"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciae-bench", description="Latency of CIAE vs torchvision FCOS and Mask R-CNN "
                                "(same process, inputs and threads; median and p90).",
                                epilog="ciae-bench --node [...]: node overhead over real DDS "
                                       "(see ciae-bench --node --help).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="autocast precision on CUDA (torch engines; fp16 also enables TensorRT fp16)")
    p.add_argument("--sizes", default="512,640,800", help="shorter-side sizes, comma separated")
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--backbones", default="r50,small",
                   help="r50, r50-p3 (embedding branch from P3), r50-p3c2 (P3 + C2 skip) and/or small")
    p.add_argument("--models", default=",".join(ALL_MODELS), help="ours,fcos,maskrcnn")
    p.add_argument("--engines", default="torch,onnxruntime", help="engines for ours: torch,onnxruntime")
    p.add_argument("--ort-providers", default=None,
                   help="onnxruntime providers for ours, e.g. tensorrt,cuda (default: cuda on a GPU, the CPU "
                        "provider on the CPU); one this build cannot run fails only the onnxruntime rows")
    p.add_argument("--small-weights", default=None, help="small model checkpoint (default: models/*.safetensors)")
    p.add_argument("--images", default=None, help="image directory for every row (default: the COCO sample; "
                   "rendered 640x480 scenes for the small rows, see --small-images)")
    p.add_argument("--small-images", choices=("synthetic", "coco"), default="synthetic",
                   help="inputs of the small-backbone rows when --images is not given: rendered synthetic scenes "
                        "(the shipped model's domain) or the COCO sample")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model (raised to twice the number "
                   "of images so every input shape is warm and its CUDA graph captured; 0 = none)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--detections", type=int, default=30, help="instances per image for every model")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="memory format of all torch models, ours and the peers alike (auto: the Predictor's "
                        "default, channels_last on the CPU and not on CUDA)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="ours (torch): eager forward on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch and onnxruntime CPU threads (0: torch default)")
    p.add_argument("--json", default="bench.json", help="output JSON path")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def bench_plugin(name: str) -> importlib.metadata.EntryPoint | None:
    """The entry point registered as ``name`` in the group :data:`PLUGIN_GROUP` (installed package
    metadata), or None when no installed package provides it."""
    return next((ep for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP) if ep.name == name), None)


def _node_benchmark(argv: list[str]) -> int:
    """``ciae-bench --node ...``: the ROS layer's registered ``node`` plugin, called with the rest
    of the command line; its exit status."""
    plugin = bench_plugin("node")
    if plugin is None:
        print(f"ciae-bench --node: no ROS layer registered (install ciae_ros, which provides the 'node' entry point "
              f"of {PLUGIN_GROUP})", file=sys.stderr)
        return 2
    try:
        node_main = plugin.load()
    except ImportError as e:
        print(f"ciae-bench --node: needs rclpy and the built ciae_ros messages ({e})", file=sys.stderr)
        return 2
    return node_main(argv)


def _checked(args: argparse.Namespace) -> tuple[list[int], list[str], list[str], list[str], torch.device]:
    """The sizes, backbones, models, engines and device of the command line; BenchError if one is unusable."""
    sizes = [int(s) for s in _csv(args.sizes)]
    backbones, models, engines = _csv(args.backbones), _csv(args.models), _csv(args.engines)
    for b in backbones:
        if b not in ("small", *OURS_ARCH):
            raise BenchError(f"unknown backbone {b!r}; use {', '.join(OURS_ARCH)} and/or small")
    for m in models:
        if m not in ALL_MODELS:
            raise BenchError(f"unknown model {m!r}; use {', '.join(ALL_MODELS)}")
    for e in engines:
        if e not in ("torch", "onnxruntime"):
            raise BenchError(f"unknown engine {e!r}; use torch and/or onnxruntime")
    if args.repeats < 1 or args.warmup < 0 or not sizes or min(sizes) < 32:
        raise BenchError("need --repeats >= 1, --warmup >= 0 and sizes >= 32")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda requested but no CUDA GPU is available")
    if device.type == "cpu" and args.precision == "fp16":
        raise BenchError("--precision fp16 needs CUDA")
    return sizes, backbones, models, engines, device


def _print_row(row: dict[str, Any]) -> None:
    print(f"  {row['backbone']:5s} {row['size']:4d} {row['model']:8s} {row['engine']:11s} median "
          f"{row['median_ms']:8.1f} ms  p90 {row['p90_ms']:8.1f} ms", flush=True)


def _run(args: argparse.Namespace, sizes, backbones, models, engines, device, coco_images, synth_images) -> list[dict]:
    """Every (backbone, size) group of the command line → the result rows."""
    from ciae_core.checkpoint import config_from_checkpoint

    options = BenchOptions(warmup=args.warmup, repeats=args.repeats, detections=args.detections,
                           max_size=args.max_size, precision=args.precision, channels_last=args.channels_last,
                           cuda_graphs=not args.no_cuda_graphs, threads=args.threads,
                           ort_providers=args.ort_providers)
    results = []
    with tempfile.TemporaryDirectory(prefix="ciae-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        for bb in backbones:
            images = synth_images if bb == "small" else coco_images
            weights = ours_checkpoint(bb, tmp, args.small_weights) if "ours" in models else None
            bb_name = config_from_checkpoint(weights).backbone if weights else \
                (SMALL_ARCH["backbone"] if bb == "small" else BACKBONES[bb])
            entries = [(m, e) for m in models for e in (engines if m == "ours" else ["torch"])]
            for size in sizes:
                results += bench_group(entries, bb, bb_name, size, weights, images, device, options, tmp / "onnx",
                                       on_row=_print_row)
    return results


def _metadata(args: argparse.Namespace, device: torch.device, coco_images, synth_images) -> dict[str, Any]:
    """The run's conditions (``meta`` of the JSON)."""
    meta = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "precision": args.precision, "torch": torch.__version__,
            "channels_last": channels_last_for(args.channels_last, device),
            "warmup": args.warmup, "repeats": args.repeats, "detections": args.detections,
            "images": len(coco_images), "image_sizes": [list(im.shape[:2]) for im in coco_images],
            "small_images": "given" if args.images else args.small_images,
            "small_image_sizes": [list(im.shape[:2]) for im in synth_images],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with contextlib.suppress(ImportError):  # versions are informative only
        import onnxruntime
        import torchvision

        meta.update(torchvision=torchvision.__version__, onnxruntime=onnxruntime.__version__)
    return meta


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--node":
        return _node_benchmark(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        sizes, backbones, models, engines, device = _checked(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        coco_images = load_inputs(args.images)
        # the shipped small model knows only the synthetic scenes: on COCO photos its embedding is
        # noise and fusion works on a fragmented map no deployment sees; its rows (all models)
        # use rendered scenes unless --images is given or --small-images coco
        synth_images = synthetic_inputs() if (args.images is None and args.small_images == "synthetic") else coco_images
        if args.warmup > 0:  # every image shape twice: oneDNN/cuDNN plans are per shape, and the
            # predictor captures a shape's CUDA graph the second time it sees it
            args.warmup = max(args.warmup, 2 * len(coco_images), 2 * len(synth_images))
        results = _run(args, sizes, backbones, models, engines, device, coco_images, synth_images)
    except BenchError as e:
        print(f"ciae-bench: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - predictor/export errors are one-line already
        from ciae_core.predictor import PredictorError

        if isinstance(e, PredictorError):
            print(f"ciae-bench: error: {e}", file=sys.stderr)
            return 1
        raise
    ratio_rows = ratios(results)
    meta = _metadata(args, device, coco_images, synth_images)
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results, "ratios": ratio_rows}, indent=1))
    print(f"ciae-bench on {meta['gpu'] or 'CPU'} ({meta['threads']} threads, {args.precision}, "
          f"{args.detections} instances/image, median of {args.repeats} after {args.warmup} warm-up)\n")
    print(markdown_tables(results, ratio_rows))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
