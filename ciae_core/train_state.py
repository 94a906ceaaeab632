"""Training checkpoints: save, load, recover and rotate them; RNG and optimizer state without pickle.

Checkpoints (``<out>/checkpoints/iter_XXXXXXX/``) hold ``model.safetensors`` (weights + model config),
``state.safetensors`` (optimizer / grad-scaler / RNG tensors) and ``state.json`` (iteration, the
rest). A checkpoint directory is written under a temporary name, fsync'ed and renamed, and the
``last`` pointer file is replaced atomically afterwards, so an interrupted run always leaves the old
complete checkpoint or the new complete one. ``--resume`` restores the weights, optimizer, grad
scaler, all RNGs and the data stream position, so that a resumed run is bit-identical to an
uninterrupted one (on CPU; CUDA kernels are not all deterministic).

No pickle: tensors go to safetensors, the structure around them to JSON (``_split_tensors`` /
``_join_tensors``). ``model.safetensors`` is written by :func:`ciae_core.checkpoint.save_model`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ciae_core.checkpoint import _fsync_dir
from ciae_core.distributed import unwrap_model
from ciae_core.train_config import TrainError


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


def optimizer_state_to_json(optimizer: torch.optim.Optimizer, prefix: str,
                            tensors: dict[str, torch.Tensor]) -> Any:
    """``optimizer.state_dict()`` as JSON-able data; its tensors are moved into ``tensors``."""
    return _split_tensors(optimizer.state_dict(), prefix, tensors)


def optimizer_state_from_json(data: Any, tensors: dict[str, torch.Tensor]) -> dict:
    return _join_tensors(data, tensors)


CHECKPOINT_FORMAT = "ciae-train-checkpoint/1"


def _write_file_synced(path: Path, data: bytes) -> None:
    """Write and fsync a file inside a checkpoint's hidden temporary directory (the directory's
    rename makes the checkpoint appear atomically, so the file needs no rename of its own)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
        save_model(tmp / "model.safetensors", unwrap_model(model))
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
    target = unwrap_model(model)
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


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` periodic checkpoints. Each is first renamed to a hidden
    name (atomic), so a crash mid-deletion never leaves a half-deleted checkpoint visible."""
    dirs = sorted(p for p in ckpt_dir.glob("iter_*") if p.is_dir() and not p.is_symlink())
    for p in dirs[:-keep] if keep > 0 else []:
        trash = p.parent / f".trash-{p.name}-{os.getpid()}"
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)


def clean_stale(out: Path) -> None:
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
