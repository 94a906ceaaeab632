"""Training of CIAE: the building blocks of a run and the loop (``ciae-train``, :mod:`ciae_core.cli.train`).

:func:`train` runs (or resumes) the run one ``TrainConfig`` describes as a short sequence of
steps: set up (seeds, data, model, optimizer), resume, then per iteration one optimisation step,
a log line every ``output.log_period``, the periodic evaluation (:func:`evaluate`, sharded over all
ranks; rank 0 keeps ``best/``) and checkpoint, and at the end the replica check and the final
model. Under ``torchrun --nproc_per_node=G -m ciae_core.cli.train ...`` every process runs it;
only rank 0 writes checkpoints and logs to TensorBoard.

The pieces live beside it: the YAML schema in :mod:`ciae_core.train_config`, the process group,
DDP and the deterministic sample stream in :mod:`ciae_core.distributed`, and the checkpoints
(atomic, bit-exact resume) in :mod:`ciae_core.train_state`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import random
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ciae_core.checkpoint import atomic_write_text, save_model
from ciae_core.distributed import (DistContext, SeededDataset, TrainingSampler, barrier, check_replicas_agree,
                                   init_distributed, reduce_scalars, unwrap_model, wrap_ddp)
from ciae_core.model_domain import training_domain
from ciae_core.train_config import (DatasetConfig, InputConfig, SolverConfig, TrainConfig, TrainConfigError,
                                    TrainError, config_to_dict, config_warnings)
from ciae_core.train_state import (clean_stale, find_last_checkpoint, load_checkpoint, point_link,
                                   prune_checkpoints, save_checkpoint)
from ciae_core.user_input import quote

logger = logging.getLogger("ciae_core.train")


# ---------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------


def scaled_learning_rate(base_lr: float, reference_batch: int, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): ``base_lr`` is tuned for ``reference_batch`` images."""
    return base_lr * global_batch / reference_batch


def learning_rate_at(iteration: int, lr: float, max_iter: int, schedule: str = "multistep",
                     steps: typing.Sequence[int] = (), gamma: float = 0.1, warmup_iters: int = 0,
                     warmup_factor: float = 0.001) -> float:
    """Learning rate used for the update of (0-based) ``iteration``.

    Multistep: ``lr * gamma ** (#steps <= iteration)``; cosine: ``lr * 0.5 * (1 + cos(pi * it / max_iter))``.
    Linear warm-up multiplies by ``warmup_factor * (1 - a) + a`` with ``a = iteration / warmup_iters``
    for ``iteration < warmup_iters``. A pure function of the iteration, so resuming needs no
    scheduler state.
    """
    if schedule == "multistep":
        value = lr * gamma ** sum(1 for s in steps if s <= iteration)
    elif schedule == "cosine":
        value = lr * 0.5 * (1.0 + math.cos(math.pi * min(iteration, max_iter) / max_iter))
    else:
        raise ValueError(f"unknown schedule {quote(schedule)}")
    if iteration < warmup_iters:
        a = iteration / warmup_iters
        value *= warmup_factor * (1.0 - a) + a
    return value


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def build_model(model_cfg: dict[str, Any], categories: list, seed: int,
                backbone_weights: str | None = None) -> torch.nn.Module:
    """``CIAE`` with the ``model:`` section's fields and the data's categories, initialised from ``seed``
    (so every DDP rank starts from the same weights and memory embeddings)."""
    from ciae_core.model import CIAE, CIAEConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            config = CIAEConfig(categories=list(categories), **model_cfg)
            return CIAE.from_config(config, backbone_weights=backbone_weights)
        except (TypeError, ValueError) as e:
            raise TrainConfigError(f"invalid model section: {e}") from None


def _is_no_decay(module: torch.nn.Module, name: str) -> bool:
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm,
                  torch.nn.modules.instancenorm._InstanceNorm)
    return name == "bias" or isinstance(module, norm_types)


def build_optimizer(model: torch.nn.Module, solver: SolverConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW with two parameter groups: ``weight_decay`` for conv/linear weights,
    ``weight_decay_norm`` for normalisation parameters and biases. Frozen parameters are skipped."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if _is_no_decay(module, name) else decay).append(p)
    groups = [{"params": decay, "weight_decay": solver.weight_decay},
              {"params": no_decay, "weight_decay": solver.weight_decay_norm}]
    groups = [g for g in groups if g["params"]]
    if solver.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=solver.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(solver.betas))


def build_dataset(ds: DatasetConfig, inp: InputConfig, train: bool, categories: list | None = None):
    """The dataset of one split (see ``DatasetConfig``) with its transforms; returns ``(dataset, categories)``.

    Training: jittered shorter-side resize + flip (``InputConfig``); evaluation: shorter side
    ``min_size_test``. ``categories`` imposes a category order (the validation set uses the
    training set's).
    """
    from ciae_core import data as data_mod

    if train:
        transforms = data_mod.build_transforms(True, list(inp.min_size_train), inp.max_size_train,
                                               0.5 if inp.hflip else 0.0, inp.sampling)
    else:
        transforms = data_mod.build_transforms(False, [inp.min_size_test], inp.max_size_test)
    try:
        if ds.kind == "coco":
            dataset = data_mod.CocoPanopticDataset(ds.image_dir, ds.panoptic_dir, ds.panoptic_json,
                                                   transforms=transforms, categories=categories)
        else:
            dataset = data_mod.SyntheticPanopticDataset(ds.num_images, ds.height, ds.width, ds.seed,
                                                        transforms=transforms, **ds.synth)
    except data_mod.DatasetError as e:
        raise TrainError(str(e)) from None
    except TypeError as e:
        raise TrainConfigError(f"config section 'data.*.synth': {e}") from None
    cats = list(dataset.categories)
    if ds.max_images > 0 and ds.max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(ds.max_images))
    return dataset, cats


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, device: torch.device, postprocess: dict[str, Any] | None = None,
             amp: str = "off", channels_last: bool = False, progress: bool = False) -> dict[str, float]:
    """PQ / SQ / RQ in percent (``PQ``, ``PQ_th``, ``PQ_st``, ...) of ``model`` on ``dataset``, and
    ``num_images`` (how many were evaluated, over all ranks).

    Images go one at a time through ``forward_raw`` + ``postprocess``; ``PanopticEvaluator``
    compares the id maps with the ground truth at the network's input resolution (the dataset's
    evaluation transform). Decision: this in-training PQ skips mapping back to the original image
    size (identical for the synthetic sets, whose test size equals the rendered size; a close
    proxy on COCO). The official number comes from ``ciae-eval`` on the original resolution.

    Under ``torchrun`` (an initialised process group) every rank must call this: rank ``r`` of
    ``W`` evaluates images ``r, r + W, r + 2W, ...`` and the evaluator sums the statistics of all
    ranks, so each rank returns the metrics of the whole set (W times faster than rank 0 alone,
    and no rank idles at a barrier for the whole evaluation).
    """
    from ciae_core import data as data_mod
    from ciae_core.evaluation import PanopticEvaluator

    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    evaluator = PanopticEvaluator(model.categories)
    evaluator.reset()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if world > 1:
        dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0,
                                         collate_fn=data_mod.collate_panoptic)
    try:
        for batch in _progress(loader, enabled=progress and rank == 0, desc="eval", total=len(dataset)):
            images = batch.images.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                raw = model.forward_raw(images)
            raw = {k: v.float() if v.is_floating_point() else v for k, v in raw.items()}
            outputs = model.postprocess(raw, batch.image_sizes, **(postprocess or {}))
            evaluator.process(batch, outputs)
        metrics = evaluator.evaluate()
        return {**metrics, "num_images": evaluator.summary["num_images"]}
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _autocast(device: torch.device, amp: str):
    if amp == "off" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)


class _TensorBoard:
    """Scalar writer on rank 0 (a no-op elsewhere or when disabled)."""

    def __init__(self, log_dir: Path | None):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


@dataclass
class TrainResult:
    """What ``train`` returns: the final iteration, the last evaluation, the best PQ, the model."""

    iteration: int
    metrics: dict[str, float]
    best_pq: float | None
    out_dir: Path
    model: torch.nn.Module


def _move_targets(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
            for t in targets]


@dataclass
class _Run:
    """What the steps of :func:`train` share: the run's configuration, place in the job and state."""

    cfg: TrainConfig
    ctx: DistContext
    out: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr: float
    per_rank: int
    train_set: Any
    val_set: Any
    ddp_model: torch.nn.Module | None = None
    tb: _TensorBoard | None = None
    start_iter: int = 0
    best_pq: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def _set_up(cfg: TrainConfig, out: Path, ctx: DistContext, resume: bool) -> _Run:
    """Check the batch split, set determinism and all seeds, build the data, model and optimizer."""
    device = ctx.device
    s = cfg.solver
    if s.ims_per_batch % ctx.world_size:
        raise TrainConfigError(f"config key 'solver.ims_per_batch' ({s.ims_per_batch}) must be divisible by the "
                               f"number of processes ({ctx.world_size})")
    per_rank = s.ims_per_batch // ctx.world_size
    if ctx.is_main:
        for text in config_warnings(cfg, device.type):
            logger.warning("%s", text)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    random.seed(cfg.seed)
    np.random.seed(cfg.seed & 0xFFFFFFFF)
    torch.manual_seed(cfg.seed)

    train_set, categories = build_dataset(cfg.data.train, cfg.data.input, train=True)
    val_set = None
    if cfg.data.val is not None and cfg.eval.period >= 0:
        val_set, val_categories = build_dataset(cfg.data.val, cfg.data.input, train=False,
                                                categories=categories if cfg.data.val.kind == "coco" else None)
        if [c.id for c in val_categories] != [c.id for c in categories]:
            raise TrainError("data.val has different categories than data.train")

    model = build_model(cfg.model, categories, cfg.seed, None if resume else cfg.backbone_weights).to(device)
    # what the weights will know, written into every model file of the run (ciae_core.model_domain)
    model.domain = training_domain(cfg.data.train.kind, categories)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = scaled_learning_rate(s.base_lr, s.reference_batch, s.ims_per_batch)
    optimizer = build_optimizer(model, s, lr)
    scaler = torch.amp.GradScaler("cuda", enabled=(s.amp == "fp16" and device.type == "cuda"))
    return _Run(cfg=cfg, ctx=ctx, out=out, model=model, optimizer=optimizer, scaler=scaler, lr=lr, per_rank=per_rank,
                train_set=train_set, val_set=val_set)


def _resume(run: _Run, resume: bool) -> None:
    """Repair what a killed run left in ``out``; with ``resume``, restore the last checkpoint (weights,
    optimizer, grad scaler, RNGs) and continue from its iteration, best PQ and metrics."""
    ctx, out, max_iter = run.ctx, run.out, run.cfg.solver.max_iter
    if ctx.is_main and out.is_dir():
        clean_stale(out)
    if ctx.distributed:
        barrier(ctx)
    if resume:
        last = find_last_checkpoint(out)
        if last is None:
            raise TrainError(f"--resume: no checkpoint under {out / 'checkpoints'} (train without --resume first)")
        state = load_checkpoint(last, run.model, run.optimizer, run.scaler)
        run.start_iter = int(state["iteration"])
        run.best_pq = state["extra"].get("best_pq")
        run.metrics = state["extra"].get("metrics", {})
        if ctx.is_main:
            logger.info("resumed from %s at iteration %d", last, run.start_iter)
    if run.start_iter >= max_iter and ctx.is_main:
        logger.info("nothing to do: checkpoint is at iteration %d >= solver.max_iter %d", run.start_iter, max_iter)


def _make_loader(run: _Run) -> torch.utils.data.DataLoader:
    """This rank's loader over the sample stream, positioned at the run's first iteration."""
    from ciae_core import data as data_mod

    cfg, ctx = run.cfg, run.ctx
    sampler = TrainingSampler(len(run.train_set), seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
                              start=run.start_iter * cfg.solver.ims_per_batch)
    return torch.utils.data.DataLoader(
        SeededDataset(run.train_set), batch_size=run.per_rank, sampler=sampler, num_workers=cfg.data.num_workers,
        collate_fn=data_mod.collate_panoptic, pin_memory=ctx.device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if cfg.data.num_workers > 0 else None,
        # own generator: creating the iterator must not draw from the global RNG (exact resume);
        # worker seeds are irrelevant anyway, SeededDataset seeds every item from its stream position
        generator=torch.Generator().manual_seed(cfg.seed))


def _open_outputs(run: _Run) -> logging.Handler | None:
    """TensorBoard writer (rank 0), and on rank 0 ``log.txt``, ``config.yaml`` and the opening log
    line; returns the ``log.txt`` handler to remove at the end (None on other ranks)."""
    cfg, ctx, out, s = run.cfg, run.ctx, run.out, run.cfg.solver
    run.tb = _TensorBoard(out / "tensorboard" if (ctx.is_main and cfg.output.tensorboard) else None)
    if not ctx.is_main:
        return None
    out.mkdir(parents=True, exist_ok=True)
    file_log = logging.FileHandler(out / "log.txt")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("ciae_core").addHandler(file_log)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    logger.info("training on %s x %d, global batch %d (%d per process), lr %.5g, %d iterations -> %s",
                ctx.device, ctx.world_size, s.ims_per_batch, run.per_rank, run.lr, s.max_iter, out)
    return file_log


def _step(run: _Run, data_iter, iteration: int) -> tuple[float, dict[str, torch.Tensor], torch.Tensor,
                                                          torch.Tensor | None]:
    """One optimisation step for (0-based) ``iteration``: learning rate, next batch, forward, loss
    check, backward, optional clipping, update. Returns ``(lr, loss_dict, loss, grad_norm)``."""
    s, device, model, optimizer, scaler = run.cfg.solver, run.ctx.device, run.model, run.optimizer, run.scaler
    cur_lr = learning_rate_at(iteration, run.lr, s.max_iter, s.schedule, s.steps, s.gamma,
                              s.warmup_iters, s.warmup_factor)
    for g in optimizer.param_groups:
        g["lr"] = cur_lr
    images, targets, image_sizes = next(data_iter)
    images = images.to(device, non_blocking=True)
    if s.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = _move_targets(targets, device)
    model.set_schedule(iteration, s.max_iter)
    with _autocast(device, s.amp):
        loss_dict = run.ddp_model(images, targets, image_sizes)
    loss = sum(v.float() for v in loss_dict.values())
    if not torch.isfinite(loss):
        raise TrainError(f"loss is {loss.item()} at iteration {iteration} "
                         f"({', '.join(f'{k}={v.item():.4g}' for k, v in loss_dict.items())}); "
                         "lower solver.base_lr or set solver.clip_grad_norm")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    grad_norm = None
    if s.clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return cur_lr, loss_dict, loss, grad_norm


class _LossWindow:
    """Running sums of the losses between two log lines, kept on the device (no host sync per iteration)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n, self.t0 = 0, time.perf_counter()

    def add(self, loss_dict: dict[str, torch.Tensor], loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        for k, v in loss_dict.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss.detach()
        if grad_norm is not None:
            self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + grad_norm.detach().float()
        self.n += 1

    def log(self, run: _Run, done: int, cur_lr: float, bar) -> None:
        """Rank means of the window's averages -> log line, TensorBoard, progress bar (rank 0); restart."""
        max_iter = run.cfg.solver.max_iter
        avg = reduce_scalars({k: float(v) / self.n for k, v in self.sums.items()}, run.ctx)
        elapsed = time.perf_counter() - self.t0
        if run.ctx.is_main:
            ips = self.n / max(elapsed, 1e-9)
            eta = (max_iter - done) / max(ips, 1e-9)
            logger.info("iter %d/%d  lr %.5g  %s  %.2f it/s  eta %s", done, max_iter, cur_lr,
                        "  ".join(f"{k} {v:.4f}" for k, v in sorted(avg.items())), ips,
                        datetime.timedelta(seconds=int(eta)))
            run.tb.scalars({**{f"train/{k}": v for k, v in avg.items()}, "train/lr": cur_lr,
                            "train/it_per_s": ips}, done)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{avg['loss']:.3f}", lr=f"{cur_lr:.2g}")
        self.sums, self.n, self.t0 = {}, 0, time.perf_counter()


def _evaluate_and_keep_best(run: _Run, done: int) -> None:
    """Evaluate on ``data.val`` after ``done`` iterations (every rank its share); rank 0 logs and
    writes ``best/`` when the PQ improved."""
    cfg, ctx, s = run.cfg, run.ctx, run.cfg.solver
    t0 = time.perf_counter()
    # every rank evaluates its share; all of them get the whole set's metrics
    run.metrics = metrics = evaluate(run.model, run.val_set, ctx.device, cfg.eval.postprocess, s.amp, s.channels_last)
    if ctx.is_main:
        logger.info("eval at iter %d (%.1f s, %d images): %s", done, time.perf_counter() - t0,
                    metrics["num_images"], "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                                                     if k != "num_images"))
        run.tb.scalars({k: v for k, v in metrics.items() if k != "num_images"}, done, "val/")
        pq = metrics.get("PQ")
        if pq is not None and (run.best_pq is None or pq > run.best_pq):
            run.best_pq = float(pq)
            save_checkpoint(run.out / "best", run.model, run.optimizer, done, run.scaler,
                            extra={"best_pq": run.best_pq, "metrics": metrics})
            logger.info("new best PQ %.2f at iteration %d -> %s", run.best_pq, done, run.out / "best")
    if ctx.distributed:
        barrier(ctx)


def _write_checkpoint(run: _Run, done: int) -> None:
    """Rank 0: ``checkpoints/iter_<done>``, ``last`` pointed at it, older ones pruned; all ranks wait."""
    if run.ctx.is_main:
        ckpt_dir = run.out / "checkpoints"
        name = f"iter_{done:07d}"
        save_checkpoint(ckpt_dir / name, run.model, run.optimizer, done, run.scaler,
                        extra={"best_pq": run.best_pq, "metrics": run.metrics})
        point_link(ckpt_dir / "last", name)
        prune_checkpoints(ckpt_dir, run.cfg.output.keep_last)
    if run.ctx.distributed:
        barrier(run.ctx)


def _iterate(run: _Run, data_iter, bar, end_iter: int) -> None:
    """The iterations ``bar`` yields: step, log window, periodic evaluation and checkpoint."""
    s, out_cfg, eval_cfg = run.cfg.solver, run.cfg.output, run.cfg.eval
    window = _LossWindow()
    for iteration in bar:
        cur_lr, loss_dict, loss, grad_norm = _step(run, data_iter, iteration)
        done = iteration + 1
        window.add(loss_dict, loss, grad_norm)
        if done % out_cfg.log_period == 0 or done == s.max_iter:
            window.log(run, done, cur_lr, bar)
        last_iter = done == s.max_iter
        if run.val_set is not None and ((eval_cfg.period > 0 and done % eval_cfg.period == 0) or last_iter):
            _evaluate_and_keep_best(run, done)
        if done % out_cfg.checkpoint_period == 0 or last_iter or done == end_iter:
            _write_checkpoint(run, done)


def _finish(run: _Run, iteration: int) -> None:
    """Replica check; rank 0 then writes ``model.safetensors`` and ``summary.json`` (or, stopped
    early, says how to continue)."""
    check_replicas_agree(run.model, run.ctx)
    max_iter = run.cfg.solver.max_iter
    if run.ctx.is_main and iteration < max_iter:
        logger.info("stopped at iteration %d of %d; continue with --resume", iteration, max_iter)
    elif run.ctx.is_main:
        save_model(run.out / "model.safetensors", run.model)
        summary = {"iteration": iteration, "best_pq": run.best_pq, "metrics": run.metrics}
        atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
        logger.info("done: %s", json.dumps(summary, sort_keys=True))


def train(cfg: TrainConfig, out_dir: str | os.PathLike | None = None, resume: bool = False,
          ctx: DistContext | None = None, stop_at: int | None = None) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module docstring.

    ``stop_at``: stop after this many completed iterations (e.g. to fit a job time slot), writing a
    checkpoint there; the schedule still refers to ``solver.max_iter`` and ``--resume`` continues
    exactly. Final evaluation and ``model.safetensors`` are only written when ``max_iter`` is reached.
    """
    out = Path(out_dir or cfg.output.dir)
    ctx = ctx or init_distributed(cfg.device)
    run = _set_up(cfg, out, ctx, resume)
    _resume(run, resume)
    run.ddp_model = wrap_ddp(run.model, ctx)
    loader = _make_loader(run)
    file_log = _open_outputs(run)

    max_iter = cfg.solver.max_iter
    run.model.train()
    data_iter = iter(loader)
    end_iter = max_iter if stop_at is None else max(run.start_iter, min(int(stop_at), max_iter))
    show_bar = ctx.is_main and cfg.output.progress_bar
    bar = _progress(range(run.start_iter, end_iter), enabled=show_bar, desc="train", initial=run.start_iter,
                    total=max_iter)
    stack = contextlib.ExitStack()
    if show_bar:  # log lines above the bar instead of through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        stack.enter_context(logging_redirect_tqdm())
    try:
        _iterate(run, data_iter, bar, end_iter)
        _finish(run, end_iter)
    finally:
        run.tb.close()
        if hasattr(bar, "close"):
            bar.close()
        stack.close()
        if file_log is not None:
            logging.getLogger("ciae_core").removeHandler(file_log)
            file_log.close()
        del data_iter
    return TrainResult(iteration=end_iter, metrics=run.metrics, best_pq=run.best_pq, out_dir=out, model=run.model)


if __name__ == "__main__":  # the command line is ciae_core.cli.train; fail loudly rather than do nothing
    sys.exit("ciae_core.train is the training library; run `python -m ciae_core.cli.train` (or `ciae-train`), "
             "e.g. torchrun --nproc_per_node=G -m ciae_core.cli.train --config ...")
