"""The YAML schema of a training run: ``TrainConfig`` and its sections, overrides, validation.

One YAML file describes a run. It is validated into the dataclasses below (``TrainConfig`` and its
sections); an unknown key or a value of the wrong type is a ``TrainConfigError`` whose one-line
message names the key and what is allowed. ``--set section.key=value`` overrides a key (the value
is parsed as YAML) before validation (:func:`load_config`).

The two error types of training live here, in the module every other training module builds on
(``train_config`` <- ``distributed``, ``train_state`` <- ``train``): ``TrainConfigError`` for an
invalid configuration, ``TrainError`` when training cannot start or continue.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ciae_core.user_input import quote


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
    takes all weights from its checkpoint). ``device``: ``auto`` (CUDA if available), ``cpu``, ``cuda``
    or ``cuda:N`` (GPU N; one process only: under torchrun each process uses GPU ``LOCAL_RANK``).
    ``deterministic`` asks torch for deterministic algorithms (slower on CUDA)."""

    model: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0
    device: str = "auto"
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
        return TrainConfigError(f"config key '{key}' must be {_type_name(tp)}, "
                                f"got {type(value).__name__} {quote(value)}")

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
        raise TrainConfigError(f"config key '{key}' must be one of {_type_name(tp)}, got {quote(value)}")
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
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise TrainConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N (a GPU index), got {cfg.device!r}")
    if cfg.output.checkpoint_period <= 0 or cfg.output.log_period <= 0:
        raise TrainConfigError("config keys 'output.checkpoint_period' and 'output.log_period' must be > 0")
    _validate_model_section(cfg.model)
    return cfg


def config_warnings(cfg: TrainConfig, device_type: str) -> list[str]:
    """One line per setting that is valid but will not do what it says on ``device_type``
    (``cpu`` | ``cuda``); the trainer logs them at start."""
    s = cfg.solver
    out = []
    if s.warmup_iters >= s.max_iter:
        out.append(f"solver.warmup_iters ({s.warmup_iters}) >= solver.max_iter ({s.max_iter}): the whole run is "
                   f"warm-up and the learning rate never reaches its full value; lower it, e.g. "
                   f"--set solver.warmup_iters={max(1, s.max_iter // 10)}")
    if s.amp != "off" and device_type != "cuda":
        out.append(f"solver.amp={s.amp} is ignored on {device_type} (autocast runs on CUDA only): training runs in "
                   f"fp32; drop --set solver.amp=... or train with --device cuda")
    return out


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

