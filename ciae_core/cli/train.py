"""``ciae-train --config config/train/<name>.yaml [--resume] [--out DIR] [--set k=v ...]``.

The command line of :func:`ciae_core.train.train`: reads the YAML config
(:func:`ciae_core.train_config.load_config`, ``--set`` overrides and ``--device`` applied), trains,
and prints where the model went. Several processes: ``torchrun --nproc_per_node=G
[--nnodes N --node_rank R --rdzv-endpoint HOST:PORT] -m ciae_core.cli.train ...``. Exit codes: 0 ok,
2 bad config or input (one line on stderr), 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch.distributed as dist

from ciae_core.train import train
from ciae_core.train_config import TrainConfigError, TrainError, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciae-train", description="Train CIAE from a YAML config (see config/train/).")
    p.add_argument("--config", required=True, help="YAML training config, e.g. config/train/synthetic_small.yaml")
    p.add_argument("--out", default=None, help="output directory (default: output.dir of the config)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last")
    p.add_argument("--stop-at", type=int, default=None, metavar="ITER",
                   help="stop after this iteration with a checkpoint (schedule unchanged); continue with --resume")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="overrides the config's device")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set solver.max_iter=100 (repeatable)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def main(argv: list[str] | None = None) -> int:
    """``ciae-train`` entry point; returns the process exit code (0 ok, 2 bad config/input, 1 failure)."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=getattr(logging, args.log_level) if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s")
    try:
        overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
        cfg = load_config(args.config, overrides)
        result = train(cfg, out_dir=args.out, resume=args.resume, stop_at=args.stop_at)
    except (TrainConfigError, TrainError) as e:
        print(f"ciae-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        pq = result.metrics.get("PQ") if result.metrics else None
        print(f"finished at iteration {result.iteration}; "
              + (f"PQ {pq:.2f}; best PQ {result.best_pq:.2f}; " if pq is not None else "")
              + f"model: {result.out_dir / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
