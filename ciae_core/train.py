"""Training of CIAE: ``ciae-train --config config/train/<name>.yaml [--resume] [--out DIR] [--set k=v ...]``.

One YAML file describes a run. It is validated into the dataclasses below (``TrainConfig`` and its
sections); an unknown key or a value of the wrong type is a ``TrainConfigError`` whose one-line
message names the key and what is allowed. ``--set section.key=value`` overrides a key (the value
is parsed as YAML) before validation.

Distributed training uses torch's own engine: start with
``torchrun --nproc_per_node=G [--nnodes N --node_rank R --rdzv-endpoint HOST:PORT] -m ciae_core.train ...``;
every process trains a DDP replica on its shard of a deterministic sample stream (NCCL on CUDA,
gloo on CPU), the memory-embedding batch means are all-reduced by the model (see ``ciae_core.losses``),
and only rank 0 writes checkpoints and logs to TensorBoard; the evaluation is sharded over all ranks
(:func:`evaluate`). At the end all ranks compare
a hash of their weights and buffers (``check_replicas_agree``).

Decision: instead of ``DistributedSampler`` (whose position is an epoch + an index the loader
does not expose) the data come from ``TrainingSampler``, an infinite stream in which global
position ``p`` goes to rank ``p % world_size`` and carries its own augmentation seed
(``SeededDataset``); iteration ``i`` starts at position ``i * ims_per_batch``. Resuming therefore
needs only the iteration number, with any number of loader workers.

Checkpoints (``<out>/checkpoints/iter_XXXXXXX/``) hold ``model.safetensors`` (weights + model config),
``state.safetensors`` (optimizer / grad-scaler / RNG tensors) and ``state.json`` (iteration, the
rest). A checkpoint directory is written under a temporary name, fsync'ed and renamed, and the
``last`` pointer file is replaced atomically afterwards, so an interrupted run always leaves the old
complete checkpoint or the new complete one. ``--resume`` restores the weights, optimizer, grad
scaler, all RNGs and the data stream position, so that a resumed run is bit-identical to an
uninterrupted one (on CPU; CUDA kernels are not all deterministic).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
import yaml

logger = logging.getLogger("ciae_core.train")


class TrainConfigError(ValueError):
    """A training configuration (YAML file or override) is invalid; the message is one line."""


class TrainError(RuntimeError):
    """Training cannot start or continue (bad checkpoint, missing data, ...); one-line message."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class DatasetConfig:
    """One dataset split.

    ``kind: coco`` reads a COCO-panoptic layout (``image_dir``, ``panoptic_json``, ``panoptic_dir``;
    relative paths are resolved against the config file's directory, then the working directory).
    ``kind: synthetic`` generates the images on the fly with ``ciae_core.synth``, deterministically
    from ``seed`` (``num_images`` images of ``height`` x ``width``); train and val use different seeds.
    ``max_images`` > 0 keeps only the first images (e.g. a quick validation subset).
    """

    kind: Literal["coco", "synthetic"] = "synthetic"
    image_dir: str | None = None
    panoptic_json: str | None = None
    panoptic_dir: str | None = None
    seed: int = 0
    num_images: int = 1000
    height: int = 256
    width: int = 320
    synth: dict[str, Any] = field(default_factory=dict)
    max_images: int = 0


@dataclass
class InputConfig:
    """Resizing and augmentation.

    Training: the shorter side is drawn from ``min_size_train`` (``sampling: choice``) or uniformly
    from the closed range ``[min_size_train[0], min_size_train[-1]]`` (``sampling: range``; the
    paper's 640-800 scale jitter), the longer side is capped at ``max_size_train``; horizontal flip
    with probability 0.5 when ``hflip``. Evaluation: shorter side ``min_size_test``, cap ``max_size_test``.
    """

    min_size_train: list[int] = field(default_factory=lambda: [800])
    sampling: Literal["choice", "range"] = "choice"
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    hflip: bool = True


@dataclass
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig | None = None
    input: InputConfig = field(default_factory=InputConfig)
    num_workers: int = 2


@dataclass
class SolverConfig:
    """Optimisation (paper: SGD, momentum 0.9, lr 0.01 at batch 16, wd 1e-4, 90k iterations, x0.1 at 60k/80k).

    ``ims_per_batch`` is the *global* batch (all ranks together); it must be divisible by the
    number of processes. The learning rate is scaled linearly: ``lr = base_lr * ims_per_batch /
    reference_batch``. Warm-up: linear from ``warmup_factor * lr`` to ``lr`` over ``warmup_iters``.
    ``schedule: multistep`` multiplies by ``gamma`` at each of ``steps``; ``cosine`` decays to 0 at
    ``max_iter``. ``weight_decay_norm`` applies to normalisation weights and all biases (detectron2
    convention). ``clip_grad_norm`` > 0 clips the global gradient L2 norm. ``amp`` (CUDA only):
    ``bf16`` or ``fp16`` autocast (fp16 with a dynamic grad scaler). ``channels_last`` uses the NHWC
    memory format (helps tensor cores on CUDA).
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = 0.01
    reference_batch: int = 16
    ims_per_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_iter: int = 90000
    schedule: Literal["multistep", "cosine"] = "multistep"
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False


@dataclass
class EvalConfig:
    """Periodic PQ evaluation on ``data.val``. ``period`` 0 = only at the end; ``-1`` = never.

    With several ranks each evaluates its share of the images and the statistics are summed
    (:func:`evaluate`); rank 0 logs and keeps ``best/``.

    The post-processing thresholds are passed to ``CIAE.postprocess``; an empty dict uses the model's
    defaults.
    """

    period: int = 0
    postprocess: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputConfig:
    """Where and how often to write. ``dir`` is used unless ``--out`` is given.

    ``keep_last`` periodic checkpoints are kept (older ones are deleted); ``best/`` (highest PQ) and
    the final checkpoint are always kept. ``log_period`` iterations between log lines and
    TensorBoard scalars.
    """

    dir: str = "runs/ciae"
    checkpoint_period: int = 5000
    keep_last: int = 2
    log_period: int = 20
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class TrainConfig:
    """A complete training run. ``model`` holds ``CIAEConfig`` fields (its ``categories`` come from
    the training data). ``backbone_weights``: optional LOCAL file with ImageNet weights for the
    backbone (torchvision layout; nothing is downloaded), used when training starts (a resumed run
    takes all weights from its checkpoint). ``device``: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
    ``deterministic`` asks torch for deterministic algorithms (slower on CUDA)."""

    model: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(inner)}]"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value against a type annotation; raise TrainConfigError naming ``key``."""

    def bad() -> TrainConfigError:
        return TrainConfigError(f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except TrainConfigError as e:
                errors.append(e)
        raise bad()
    if origin is Literal:
        args = typing.get_args(tp)
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML 1.1 reads a bare off/on/no/yes as a boolean
            value = {False: "off", True: "on"}[value] if ("off" in args or "on" in args) else value
        if not isinstance(value, bool) and value in args:
            return value
        raise TrainConfigError(f"config key '{key}' must be one of {_type_name(tp)}, got {value!r}")
    if origin is list or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return dataclass_from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad()
    return value


def dataclass_from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (YAML) mapping, checking keys and value types.

    Missing keys take the dataclass defaults; an unknown key raises ``TrainConfigError`` naming the
    key and the allowed ones; a wrong type names the key, the expected and the given type.
    """
    if not isinstance(data, dict):
        raise TrainConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
                               f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise TrainConfigError(f"unknown config key '{prefix}{unknown[0]}' (allowed in "
                               f"'{prefix.rstrip('.') or '<root>'}': {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], prefix + name)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TrainConfigError(f"config key '{prefix}{missing[0]}' is required")
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict:
    """Plain-dict form of a config dataclass (what ``state.json``/``config.yaml`` of a run record)."""
    return dataclasses.asdict(cfg)


def _apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise TrainConfigError(f"override '{assignment}' must look like section.key=value")
    dotted, _, text = assignment.partition("=")
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise TrainConfigError(f"override '{assignment}' has an empty key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TrainConfigError(f"override '{assignment}': value is not valid YAML ({str(e).splitlines()[0]})") from None
    node = raw
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise TrainConfigError(f"override '{assignment}': '{'.'.join(keys[:i + 1])}' is not a section")
        node = nxt
    node[keys[-1]] = value


def _validate_model_section(model: dict) -> None:
    """Check ``model:`` keys/types against ``ciae_core.model.CIAEConfig`` (categories come from data)."""
    try:
        from ciae_core.model import CIAEConfig
    except ImportError as e:  # pragma: no cover - model module is part of the package
        raise TrainConfigError(f"cannot validate the model section: {e}") from None
    if "categories" in model:
        raise TrainConfigError("config key 'model.categories' is not allowed: categories come from the training data")
    hints = typing.get_type_hints(CIAEConfig)
    allowed = [f.name for f in dataclasses.fields(CIAEConfig) if f.init and f.name != "categories"]
    for k, v in model.items():
        if k not in allowed:
            raise TrainConfigError(f"unknown config key 'model.{k}' (allowed in 'model': {', '.join(sorted(allowed))})")
        model[k] = _convert(v, hints[k], f"model.{k}")


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Cross-field checks that types alone cannot express; returns ``cfg``."""
    s = cfg.solver
    if s.max_iter <= 0:
        raise TrainConfigError(f"config key 'solver.max_iter' must be > 0, got {s.max_iter}")
    if s.ims_per_batch <= 0 or s.reference_batch <= 0:
        raise TrainConfigError("config keys 'solver.ims_per_batch' and 'solver.reference_batch' must be > 0")
    if s.base_lr <= 0:
        raise TrainConfigError(f"config key 'solver.base_lr' must be > 0, got {s.base_lr}")
    if list(s.steps) != sorted(s.steps) or any(x <= 0 for x in s.steps):
        raise TrainConfigError(f"config key 'solver.steps' must be increasing positive iterations, got {s.steps}")
    if s.warmup_iters < 0 or not 0 < s.warmup_factor <= 1:
        raise TrainConfigError("config keys 'solver.warmup_iters' >= 0 and 0 < 'solver.warmup_factor' <= 1 required")
    if len(s.betas) != 2:
        raise TrainConfigError(f"config key 'solver.betas' must have 2 values, got {s.betas}")
    inp = cfg.data.input
    if not inp.min_size_train or any(x <= 0 for x in inp.min_size_train):
        raise TrainConfigError(f"config key 'data.input.min_size_train' must list positive sizes, got {inp.min_size_train}")
    if inp.sampling == "range" and len(inp.min_size_train) != 2:
        raise TrainConfigError("config key 'data.input.min_size_train' must be [low, high] with sampling: range")
    for split in ("train", "val"):
        ds = getattr(cfg.data, split)
        if ds is None:
            continue
        if ds.kind == "coco":
            for k in ("image_dir", "panoptic_json", "panoptic_dir"):
                if not getattr(ds, k):
                    raise TrainConfigError(f"config key 'data.{split}.{k}' is required for kind: coco")
        elif ds.num_images <= 0:
            raise TrainConfigError(f"config key 'data.{split}.num_images' must be > 0 for kind: synthetic")
    if cfg.output.checkpoint_period <= 0 or cfg.output.log_period <= 0:
        raise TrainConfigError("config keys 'output.checkpoint_period' and 'output.log_period' must be > 0")
    _validate_model_section(cfg.model)
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML training config, apply ``section.key=value`` overrides, validate it.

    Relative dataset paths are resolved against the config file's directory when they exist there,
    else kept relative to the working directory.
    """
    p = Path(path)
    if not p.is_file():
        raise TrainConfigError(f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrainConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"config file {p} must hold a mapping at the top level")
    for o in overrides:
        _apply_override(raw, o)
    cfg = validate_config(dataclass_from_dict(TrainConfig, raw))
    for split in ("train", "val"):
        ds = getattr(cfg.data, split)
        if ds is None:
            continue
        for k in ("image_dir", "panoptic_json", "panoptic_dir"):
            v = getattr(ds, k)
            if v and not Path(v).is_absolute() and (p.parent / v).exists() and not Path(v).exists():
                setattr(ds, k, str((p.parent / v).resolve()))
    return cfg


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
        raise ValueError(f"unknown schedule {schedule!r}")
    if iteration < warmup_iters:
        a = iteration / warmup_iters
        value *= warmup_factor * (1.0 - a) + a
    return value


# ---------------------------------------------------------------------------------------------
# Distributed plumbing
# ---------------------------------------------------------------------------------------------


@dataclass
class DistContext:
    """Where this process sits in the job (``world_size`` 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available else CPU; ``cuda`` without a GPU is a ``TrainError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("device 'cuda' requested but torch sees no CUDA GPU (use --device cpu)")
    return torch.device(name)


def init_distributed(device_name: str, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1) and pick this rank's device.

    NCCL on CUDA, gloo on CPU; each process uses GPU ``LOCAL_RANK``. An already initialised
    process group (e.g. created by a test harness) is reused.
    """
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    elif world_size > 1:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    else:
        rank, local_rank = 0, 0
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _barrier(ctx: DistContext) -> None:
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def reduce_scalars(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Mean of each scalar over all ranks (for logging)."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    t /= ctx.world_size
    return dict(zip(keys, t.tolist()))


def parameter_fingerprint(module: torch.nn.Module) -> int:
    """A 63-bit hash of all parameters and buffers (bit-exact: equal only for identical bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return int.from_bytes(h.digest()[:8], "little") >> 1


def check_replicas_agree(module: torch.nn.Module, ctx: DistContext) -> None:
    """Raise ``TrainError`` unless every rank holds bit-identical weights and buffers."""
    if not ctx.distributed:
        return
    fp = torch.tensor([parameter_fingerprint(module)], dtype=torch.int64,
                      device=ctx.device if ctx.device.type == "cuda" else "cpu")
    gathered = [torch.zeros_like(fp) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, fp)
    values = [int(g.item()) for g in gathered]
    if len(set(values)) != 1:
        raise TrainError(f"DDP replicas diverged: weight fingerprints per rank {values}")


# ---------------------------------------------------------------------------------------------
# Deterministic, resumable sample stream
# ---------------------------------------------------------------------------------------------


def sample_seed(seed: int, position: int) -> int:
    """Augmentation seed of the sample at global stream ``position`` (independent of workers/ranks)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, position & 0xFFFFFFFF, position >> 32]).generate_state(1)[0])


class TrainingSampler(torch.utils.data.Sampler):
    """Infinite deterministic stream of ``(dataset_index, augmentation_seed)`` for one rank.

    The global stream visits epoch ``e`` as ``randperm(size)`` drawn from ``seed + e``; global
    position ``p`` belongs to rank ``p % world_size``. Iteration ``i`` of a run with global batch
    ``B`` consumes positions ``[i*B, (i+1)*B)``, so ``start = i*B`` resumes the stream exactly
    (and each rank sees ``B / world_size`` of them per iteration).
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0,
                 shuffle: bool = True):
        if size <= 0:
            raise TrainError("the training dataset is empty")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.start, self.shuffle = start, shuffle

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        p = self.start + ((self.rank - self.start) % self.world_size)
        epoch, order = -1, None
        while True:
            e = p // self.size
            if e != epoch:
                epoch, order = e, self._epoch_order(e)
            yield int(order[p % self.size]), sample_seed(self.seed, p)
            p += self.world_size


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset so that item ``(index, seed)`` is produced with all global RNGs
    (python ``random``, numpy, torch) seeded from ``seed``: augmentation becomes a function of the
    stream position, whatever worker computes it. The caller's RNG states are restored afterwards.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            torch.manual_seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


# ---------------------------------------------------------------------------------------------
# Training state (no pickle: tensors → safetensors, the rest → JSON)
# ---------------------------------------------------------------------------------------------


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor inside a nested dict/list by ``{"__tensor__": key}``, collecting them."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"cannot serialise key {k!r} at {prefix}")
            out[str(k) if isinstance(k, str) else f"__int__{k}"] = _split_tensors(v, f"{prefix}.{k}", tensors)
        return out
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "__tuple__": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        if isinstance(obj, float) and not math.isfinite(obj):
            return {"__float__": repr(obj)}
        return obj
    if isinstance(obj, np.ndarray):
        return _split_tensors(torch.from_numpy(obj.copy()), prefix, tensors)
    raise TypeError(f"cannot serialise {type(obj).__name__} at {prefix}")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        if set(obj) == {"__list__", "__tuple__"}:
            items = [_join_tensors(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj["__tuple__"] else items
        return {(int(k[len("__int__"):]) if k.startswith("__int__") else k): _join_tensors(v, tensors)
                for k, v in obj.items()}
    return obj


def capture_rng_state() -> dict[str, Any]:
    """All RNG states of this process (python, numpy, torch CPU and CUDA)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    from ciae_core.checkpoint import atomic_write_text

    atomic_write_text(path, text)


def optimizer_state_to_json(optimizer: torch.optim.Optimizer, prefix: str,
                            tensors: dict[str, torch.Tensor]) -> Any:
    """``optimizer.state_dict()`` as JSON-able data; its tensors are moved into ``tensors``."""
    return _split_tensors(optimizer.state_dict(), prefix, tensors)


def optimizer_state_from_json(data: Any, tensors: dict[str, torch.Tensor]) -> dict:
    return _join_tensors(data, tensors)


CHECKPOINT_FORMAT = "ciae-train-checkpoint/1"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    iteration: int, scaler: torch.amp.GradScaler | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a complete training checkpoint to ``directory`` atomically.

    Layout: ``model.safetensors`` (``checkpoint.save_model``: weights incl. the memory embeddings,
    model config in the metadata), ``state.safetensors`` (optimizer, grad scaler and RNG tensors),
    ``state.json`` (format, iteration, optimizer/RNG structure, ``extra``). Everything is first
    written into a hidden sibling directory (each file fsync'ed), then renamed into place; an
    existing ``directory`` is moved aside first and deleted only after the new one is in place, and
    a crash in that short window is repaired by ``recover_checkpoint_dir``. A failure while writing
    leaves ``directory`` untouched.
    """
    from safetensors.torch import save as st_save

    from ciae_core.checkpoint import save_model

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_model(tmp / "model.safetensors", _unwrap(model))
        tensors: dict[str, torch.Tensor] = {}
        state = {
            "format": CHECKPOINT_FORMAT,
            "iteration": int(iteration),
            "optimizer": optimizer_state_to_json(optimizer, "optimizer", tensors),
            "scaler": _split_tensors(scaler.state_dict(), "scaler", tensors) if scaler is not None and scaler.is_enabled() else None,
            "rng": _split_tensors(capture_rng_state(), "rng", tensors),
            "extra": _split_tensors(extra or {}, "extra", tensors),
        }
        _write_file_synced(tmp / "state.safetensors", st_save(tensors, metadata={"format": CHECKPOINT_FORMAT}))
        _write_file_synced(tmp / "state.json", json.dumps(state, indent=1, sort_keys=True).encode())
        _fsync_dir(tmp)
        old = None
        if directory.exists():
            old = directory.parent / f".old-{directory.name}-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(directory, old)
        os.rename(tmp, directory)
        _fsync_dir(directory.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def recover_checkpoint_dir(directory: str | os.PathLike) -> None:
    """If a crash hit between 'move old aside' and 'rename new into place', put the old one back,
    and delete leftover temporary directories of ``directory``."""
    directory = Path(directory)
    parent = directory.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".old-{directory.name}-*"))
    if not directory.exists() and olds:
        os.rename(olds[-1], directory)
        olds = olds[:-1]
    for leftover in [*olds, *parent.glob(f".tmp-{directory.name}-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def point_link(link: str | os.PathLike, target_name: str) -> None:
    """Atomically make ``link`` a relative symlink to ``target_name`` (a sibling)."""
    link = Path(link)
    tmp = link.parent / f".{link.name}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def read_checkpoint_state(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``state.json`` + ``state.safetensors`` of a checkpoint; ``TrainError`` if unusable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        if not (d / name).is_file():
            raise TrainError(f"checkpoint {d} is incomplete: {name} is missing")
    try:
        state = json.loads((d / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"checkpoint {d / 'state.json'} is unreadable: {e}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"checkpoint {d} has format {state.get('format') if isinstance(state, dict) else '?'}, "
                         f"expected {CHECKPOINT_FORMAT}")
    try:
        tensors = load_file(str(d / "state.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise TrainError(f"checkpoint {d / 'state.safetensors'} is unreadable: {e}") from None
    return state, tensors


def load_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None, restore_rng: bool = True) -> dict:
    """Restore a ``save_checkpoint`` directory into ``model`` (+ optimizer, scaler, RNGs).

    Returns the state dict (``iteration``, ``extra``, ...). The checkpoint's model config must match
    ``model``'s (else ``TrainError``).
    """
    from ciae_core.checkpoint import CheckpointError, load_model

    d = Path(directory)
    state, tensors = read_checkpoint_state(d)
    target = _unwrap(model)
    try:
        loaded = load_model(d / "model.safetensors", device="cpu")
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    if loaded.config.to_dict() != target.config.to_dict():
        raise TrainError(f"checkpoint {d} was trained with a different model config than the one configured")
    with torch.no_grad():
        target.load_state_dict(loaded.state_dict())
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state_from_json(state["optimizer"], tensors))
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(_join_tensors(state["scaler"], tensors))
    if restore_rng:
        restore_rng_state(_join_tensors(state["rng"], tensors))
    state["extra"] = _join_tensors(state.get("extra") or {}, tensors)
    return state


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

    model = _unwrap(model)
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


def _prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` periodic checkpoints. Each is first renamed to a hidden
    name (atomic), so a crash mid-deletion never leaves a half-deleted checkpoint visible."""
    dirs = sorted(p for p in ckpt_dir.glob("iter_*") if p.is_dir() and not p.is_symlink())
    for p in dirs[:-keep] if keep > 0 else []:
        trash = p.parent / f".trash-{p.name}-{os.getpid()}"
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _clean_stale(out: Path) -> None:
    """Repair/remove what a killed run can leave: a half-swapped ``best/`` and hidden temp dirs."""
    recover_checkpoint_dir(out / "best")
    ckpt_dir = out / "checkpoints"
    if ckpt_dir.is_dir():
        for p in list(ckpt_dir.glob(".old-*")):  # ".old-<name>-<pid>"
            recover_checkpoint_dir(ckpt_dir / p.name[len(".old-"):].rsplit("-", 1)[0])
        for p in ckpt_dir.iterdir():
            if p.name.startswith((".tmp-", ".trash-", ".old-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def find_last_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``<out>/checkpoints/last`` points at (None if there is none)."""
    ckpt_dir = Path(out_dir) / "checkpoints"
    link = ckpt_dir / "last"
    if link.is_symlink() or link.exists():
        target = link.resolve()
        recover_checkpoint_dir(target)
        if target.is_dir():
            return target
    return None


def train(cfg: TrainConfig, out_dir: str | os.PathLike | None = None, resume: bool = False,
          ctx: DistContext | None = None, stop_at: int | None = None) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module docstring.

    ``stop_at``: stop after this many completed iterations (e.g. to fit a job time slot), writing a
    checkpoint there; the schedule still refers to ``solver.max_iter`` and ``--resume`` continues
    exactly. Final evaluation and ``model.safetensors`` are only written when ``max_iter`` is reached.
    """
    out = Path(out_dir or cfg.output.dir)
    ctx = ctx or init_distributed(cfg.device)
    device = ctx.device
    s = cfg.solver
    if s.ims_per_batch % ctx.world_size:
        raise TrainConfigError(f"config key 'solver.ims_per_batch' ({s.ims_per_batch}) must be divisible by the "
                               f"number of processes ({ctx.world_size})")
    per_rank = s.ims_per_batch // ctx.world_size
    if s.amp != "off" and device.type != "cuda":
        logger.warning("solver.amp=%s ignored on %s (autocast is used on CUDA only)", s.amp, device.type)
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
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = scaled_learning_rate(s.base_lr, s.reference_batch, s.ims_per_batch)
    optimizer = build_optimizer(model, s, lr)
    scaler = torch.amp.GradScaler("cuda", enabled=(s.amp == "fp16" and device.type == "cuda"))

    start_iter, best_pq, metrics = 0, None, {}
    if ctx.is_main and out.is_dir():
        _clean_stale(out)
    if ctx.distributed:
        _barrier(ctx)
    if resume:
        last = find_last_checkpoint(out)
        if last is None:
            raise TrainError(f"--resume: no checkpoint under {out / 'checkpoints'} (train without --resume first)")
        state = load_checkpoint(last, model, optimizer, scaler)
        start_iter = int(state["iteration"])
        best_pq = state["extra"].get("best_pq")
        metrics = state["extra"].get("metrics", {})
        if ctx.is_main:
            logger.info("resumed from %s at iteration %d", last, start_iter)
    if start_iter >= s.max_iter and ctx.is_main:
        logger.info("nothing to do: checkpoint is at iteration %d >= solver.max_iter %d", start_iter, s.max_iter)

    ddp_model = model
    if ctx.distributed:
        # Buffers are not broadcast from rank 0 at each forward: the memory embeddings are updated
        # identically on every rank from all-reduced class means (ciae_core.losses).
        import inspect

        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False, **no_buffer_sync)

    from ciae_core import data as data_mod

    sampler = TrainingSampler(len(train_set), seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
                              start=start_iter * s.ims_per_batch)
    loader = torch.utils.data.DataLoader(
        SeededDataset(train_set), batch_size=per_rank, sampler=sampler, num_workers=cfg.data.num_workers,
        collate_fn=data_mod.collate_panoptic, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if cfg.data.num_workers > 0 else None,
        # own generator: creating the iterator must not draw from the global RNG (exact resume);
        # worker seeds are irrelevant anyway, SeededDataset seeds every item from its stream position
        generator=torch.Generator().manual_seed(cfg.seed))

    tb = _TensorBoard(out / "tensorboard" if (ctx.is_main and cfg.output.tensorboard) else None)
    file_log = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        file_log = logging.FileHandler(out / "log.txt")
        file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("ciae_core").addHandler(file_log)
        _atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        logger.info("training on %s x %d, global batch %d (%d per process), lr %.5g, %d iterations -> %s",
                    device, ctx.world_size, s.ims_per_batch, per_rank, lr, s.max_iter, out)

    ckpt_dir = out / "checkpoints"
    model.train()
    data_iter = iter(loader)
    end_iter = s.max_iter if stop_at is None else max(start_iter, min(int(stop_at), s.max_iter))
    show_bar = ctx.is_main and cfg.output.progress_bar
    bar = _progress(range(start_iter, end_iter), enabled=show_bar, desc="train", initial=start_iter, total=s.max_iter)
    stack = contextlib.ExitStack()
    if show_bar:  # log lines above the bar instead of through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        stack.enter_context(logging_redirect_tqdm())
    window: dict[str, torch.Tensor] = {}  # running sums on the device: no host sync per iteration
    window_n, t_window = 0, time.perf_counter()
    iteration = start_iter
    try:
        for iteration in bar:
            cur_lr = learning_rate_at(iteration, lr, s.max_iter, s.schedule, s.steps, s.gamma,
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
                loss_dict = ddp_model(images, targets, image_sizes)
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

            done = iteration + 1
            for k, v in loss_dict.items():
                window[k] = window.get(k, 0.0) + v.detach().float()
            window["loss"] = window.get("loss", 0.0) + loss.detach()
            if grad_norm is not None:
                window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm.detach().float()
            window_n += 1
            if done % cfg.output.log_period == 0 or done == s.max_iter:
                avg = reduce_scalars({k: float(v) / window_n for k, v in window.items()}, ctx)
                elapsed = time.perf_counter() - t_window
                if ctx.is_main:
                    ips = window_n / max(elapsed, 1e-9)
                    eta = (s.max_iter - done) / max(ips, 1e-9)
                    logger.info("iter %d/%d  lr %.5g  %s  %.2f it/s  eta %s", done, s.max_iter, cur_lr,
                                "  ".join(f"{k} {v:.4f}" for k, v in sorted(avg.items())), ips,
                                datetime.timedelta(seconds=int(eta)))
                    tb.scalars({**{f"train/{k}": v for k, v in avg.items()}, "train/lr": cur_lr,
                                "train/it_per_s": ips}, done)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{avg['loss']:.3f}", lr=f"{cur_lr:.2g}")
                window, window_n, t_window = {}, 0, time.perf_counter()

            last_iter = done == s.max_iter
            do_eval = val_set is not None and ((cfg.eval.period > 0 and done % cfg.eval.period == 0) or last_iter)
            if do_eval:
                t0 = time.perf_counter()
                # every rank evaluates its share; all of them get the whole set's metrics
                metrics = evaluate(model, val_set, device, cfg.eval.postprocess, s.amp, s.channels_last)
                if ctx.is_main:
                    logger.info("eval at iter %d (%.1f s, %d images): %s", done, time.perf_counter() - t0,
                                metrics["num_images"], "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                                                                 if k != "num_images"))
                    tb.scalars({k: v for k, v in metrics.items() if k != "num_images"}, done, "val/")
                    pq = metrics.get("PQ")
                    if pq is not None and (best_pq is None or pq > best_pq):
                        best_pq = float(pq)
                        save_checkpoint(out / "best", model, optimizer, done, scaler,
                                        extra={"best_pq": best_pq, "metrics": metrics})
                        logger.info("new best PQ %.2f at iteration %d -> %s", best_pq, done, out / "best")
                if ctx.distributed:
                    _barrier(ctx)
            if done % cfg.output.checkpoint_period == 0 or last_iter or done == end_iter:
                if ctx.is_main:
                    name = f"iter_{done:07d}"
                    save_checkpoint(ckpt_dir / name, model, optimizer, done, scaler,
                                    extra={"best_pq": best_pq, "metrics": metrics})
                    point_link(ckpt_dir / "last", name)
                    _prune_checkpoints(ckpt_dir, cfg.output.keep_last)
                if ctx.distributed:
                    _barrier(ctx)
        iteration = end_iter
        check_replicas_agree(model, ctx)
        if ctx.is_main and iteration < s.max_iter:
            logger.info("stopped at iteration %d of %d; continue with --resume", iteration, s.max_iter)
        elif ctx.is_main:
            from ciae_core.checkpoint import save_model

            save_model(out / "model.safetensors", model)
            summary = {"iteration": iteration, "best_pq": best_pq, "metrics": metrics}
            _atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
            logger.info("done: %s", json.dumps(summary, sort_keys=True))
    finally:
        tb.close()
        if hasattr(bar, "close"):
            bar.close()
        stack.close()
        if file_log is not None:
            logging.getLogger("ciae_core").removeHandler(file_log)
            file_log.close()
        del data_iter
    return TrainResult(iteration=iteration, metrics=metrics, best_pq=best_pq, out_dir=out, model=model)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
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
    args = _build_parser().parse_args(argv)
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
