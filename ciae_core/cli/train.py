"""``ciae-train --config config/train/<name>.yaml [--data DIR] [--resume] [--out DIR] [--set k=v ...]``.

The command line of :func:`ciae_core.train.train`: reads the YAML config
(:func:`ciae_core.train_config.load_config`, ``--set`` overrides, ``--data``/``--val-data`` and
``--device`` applied), trains, and prints where the result went: the model after the last
iteration, or the checkpoint to continue from after ``--stop-at`` and after Ctrl-C / SIGTERM.
Several processes: ``torchrun --nproc_per_node=G [--nnodes N --node_rank R --rdzv-endpoint
HOST:PORT] -m ciae_core.cli.train ...``. Exit codes: 0 ok, 2 bad config or input (one line on
stderr), 1 failure, 130 / 143 stopped by SIGINT / SIGTERM (one line naming the checkpoint).

``--data DIR`` trains on a COCO-panoptic folder as ``ciae-synth`` writes it (``DIR/images``,
``DIR/panoptic``, ``DIR/panoptic.json``); it is the same as ``--set data.train.kind=coco --set
data.train.image_dir=DIR/images --set data.train.panoptic_dir=DIR/panoptic --set
data.train.panoptic_json=DIR/panoptic.json`` (``--val-data`` likewise for ``data.val``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DATA_LAYOUT = {"image_dir": "images", "panoptic_dir": "panoptic", "panoptic_json": "panoptic.json"}


def _device(text: str) -> str:
    if not DEVICE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N (a GPU index), got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciae-train", description="Train CIAE from a YAML config (see config/train/).")
    p.add_argument("--config", required=True, help="YAML training config, e.g. config/train/synthetic_small.yaml")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="train on this COCO-panoptic folder (images/, panoptic/, panoptic.json, as ciae-synth "
                        "writes it) instead of the config's data.train")
    p.add_argument("--val-data", metavar="DIR", default=None,
                   help="evaluate on this COCO-panoptic folder instead of the config's data.val")
    p.add_argument("--out", default=None, help="output directory (default: output.dir of the config)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last")
    p.add_argument("--stop-at", type=int, default=None, metavar="ITER",
                   help="stop after this iteration with a checkpoint (schedule unchanged); continue with --resume")
    p.add_argument("--device", type=_device, default=None, metavar="{auto,cpu,cuda,cuda:N}",
                   help="overrides the config's device (cuda:N: GPU N; under torchrun each process uses GPU "
                        "LOCAL_RANK, so give cuda)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set solver.max_iter=100 (repeatable)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def data_overrides(split: str, folder: str, option: str) -> list[str]:
    """``--set`` assignments that point ``data.<split>`` at a COCO-panoptic ``folder`` (absolute
    paths, so the config file's directory plays no part); ``TrainConfigError`` when it is not one."""
    from ciae_core.train_config import TrainConfigError

    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise TrainConfigError(f"{option} {folder}: no such folder")
    missing = [name for name in DATA_LAYOUT.values() if not (root / name).exists()]
    if missing:
        raise TrainConfigError(f"{option} {folder} is not a COCO-panoptic folder as ciae-synth writes it (no "
                               f"{', '.join(missing)}); for another layout use --set data.{split}.image_dir=... "
                               f"(see README 'Training')")
    return [f"data.{split}.kind=coco"] + [f"data.{split}.{key}={root / name}" for key, name in DATA_LAYOUT.items()]


def _resume_hint(argv: list[str]) -> str:
    """The command to continue: this one with ``--resume`` (and without ``--stop-at``)."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--stop-at":
            skip = True
        elif not a.startswith("--stop-at=") and a != "--resume":
            keep.append(a)
    return "ciae-train " + " ".join(shlex.quote(a) for a in keep + ["--resume"])


def _checkpoint_line(out: Path | None, argv: list[str]) -> str:
    """Where a stopped run can continue from: the last complete checkpoint, or that there is none."""
    from ciae_core.train_state import find_last_checkpoint

    last = find_last_checkpoint(out) if out is not None and out.is_dir() else None
    if last is None:
        return "no checkpoint was written yet, so there is nothing to resume: start the same command again"
    iteration = last.name.rsplit("_", 1)[-1].lstrip("0") or "0"
    return f"last checkpoint {last} (iteration {iteration}); resume with: {_resume_hint(argv)}"


def main(argv: list[str] | None = None) -> int:
    """``ciae-train`` entry point; returns the process exit code (0 ok, 2 bad config/input, 1 failure,
    130/143 interrupted by SIGINT/SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=getattr(logging, args.log_level) if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s")
    stopped_by = [signal.SIGINT]

    def _on_sigterm(signum, frame):  # a batch scheduler's (or torchrun's) stop: end like Ctrl-C
        stopped_by[0] = signal.SIGTERM
        raise KeyboardInterrupt

    previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    out = None
    dist = None
    try:
        # imported here, not at module level: a Ctrl-C while torch loads ends in the one line below
        import torch.distributed as dist

        from ciae_core.train import train
        from ciae_core.train_config import TrainConfigError, TrainError, load_config

        try:
            overrides = list(args.overrides)
            if args.data:
                overrides += data_overrides("train", args.data, "--data")
            if args.val_data:
                overrides += data_overrides("val", args.val_data, "--val-data")
            overrides += [f"device={args.device}"] if args.device else []
            cfg = load_config(args.config, overrides)
            out = Path(args.out or cfg.output.dir)
            result = train(cfg, out_dir=out, resume=args.resume, stop_at=args.stop_at)
        except (TrainConfigError, TrainError) as e:
            print(f"ciae-train: error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        if rank == 0:
            print(f"ciae-train: interrupted ({stopped_by[0].name}); {_checkpoint_line(out, argv)}", file=sys.stderr)
        return 128 + int(stopped_by[0])
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        pq = result.metrics.get("PQ") if result.metrics else None
        scores = "".join(f"{name} {v:.2f}; " for name, v in (("PQ", pq), ("best PQ", result.best_pq)) if v is not None)
        if result.iteration < cfg.solver.max_iter:
            print(f"stopped at iteration {result.iteration} of {cfg.solver.max_iter} (--stop-at); {scores}"
                  f"{_checkpoint_line(result.out_dir, argv)}")
        else:
            print(f"finished at iteration {result.iteration}; {scores}model: {result.out_dir / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
