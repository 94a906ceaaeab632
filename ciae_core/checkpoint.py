"""Model checkpoints: safetensors weights + JSON config, written atomically, no pickle.

``save_model(path, model)`` writes ``path`` (``*.safetensors``; the metadata key ``ciae_config``
holds the :class:`~ciae_core.model.CIAEConfig` as JSON) and a human-readable ``*.json`` next to it.
``load_model(path, device)`` rebuilds the model from the metadata and loads the weights; every
failure is a :class:`CheckpointError` with a one-line message naming the file and the problem.
The optional metadata key ``domain`` (:mod:`ciae_core.model_domain`: what images the weights
know) is written from ``model.domain`` when the model has one and set on the loaded model, so
load, export and save carry it along.

Decision (tensor dtypes on load): every tensor must have the model's shape and the model's
*kind* of dtype. Floating-point model tensors accept a float16, bfloat16, float32 or float64
checkpoint tensor and are cast to the model's dtype (float32): a
half-precision copy of the weights (half the file size) is a common and legitimate way to ship
a model, and float16/bfloat16 → float32 is exact. Integer model buffers (BatchNorm's
``num_batches_tracked``) accept any integer dtype. Everything else — integer or bool tensors for
floating-point weights (e.g. a checkpoint re-saved with ``.long()``, which would load silently
and give garbage), floating-point values for integer buffers, complex tensors — is refused with
a :class:`CheckpointError` naming the file and the first offending tensor.

Generic helpers for the trainer: :func:`atomic_write_bytes`, :func:`atomic_write_text`,
:func:`save_tensors_atomic`, :func:`load_tensors`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ciae_core.model_domain import DOMAIN_KEY
from ciae_core.user_input import clip_path, file_problem, quote

logger = logging.getLogger(__name__)

CONFIG_KEY = "ciae_config"
FORMAT_KEY = "format"
FORMAT = "ciae-model/1"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read (one-line message naming the file)."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # the temp file may not exist yet
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors_atomic(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save a dict of tensors as safetensors (string ``metadata``) atomically.

    Tensors are moved to CPU and made contiguous; tensors sharing storage are copied, so any
    state dict can be saved.
    """
    from safetensors.torch import save

    clean = {}
    for k, v in tensors.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"cannot save {path}: entry {quote(k)} is {type(v).__name__}, not a tensor")
        clean[k] = v.detach().to("cpu").contiguous().clone()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write_bytes(path, save(clean, metadata=meta))


def check_readable_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """``path`` as a :class:`Path` if it is a readable, non-empty regular file; else
    :class:`CheckpointError` saying exactly why not ("checkpoint /x does not exist", "... is a
    directory", "... is a character device" for ``/dev/zero``, "... is not readable ...")."""
    problem = file_problem(path)
    if problem is not None:
        raise CheckpointError(f"{what} {clip_path(path)} {problem}")
    return Path(path)


def _open_checked(path: Path):
    check_readable_file(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes) or not a safetensors file")
    with open(path, "rb") as f:
        head = f.read(8)
    header_len = int.from_bytes(head, "little")
    if header_len <= 0 or header_len > 100_000_000 or 8 + header_len > size:
        raise CheckpointError(f"{path} is not a safetensors file or is truncated (bad header length)")
    with open(path, "rb") as f:
        f.seek(8)
        first = f.read(1)
    if first != b"{":
        raise CheckpointError(f"{path} is not a safetensors file (header is not JSON)")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (``CheckpointError`` if unreadable)."""
    from safetensors import safe_open

    path = Path(path)
    _open_checked(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any reader failure means a bad file
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file (``CheckpointError`` on failure)."""
    from safetensors import safe_open

    path = Path(path)
    _open_checked(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is corrupt or truncated: {msg}") from None
    return tensors, meta


def save_model(path: str | os.PathLike, model) -> Path:
    """Save ``model`` (a :class:`~ciae_core.model.CIAE`) to ``path`` and ``path.with_suffix('.json')``.

    The safetensors metadata holds ``{"format": "ciae-model/1", "ciae_config": <json>}`` and, when
    ``model.domain`` is set, ``"domain"``; the sidecar JSON holds the same config (and domain), the
    category table and the tensor count for humans.
    Returns the weights path.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"model checkpoint must end in .safetensors: {path}")
    cfg = model.config.to_dict()
    cfg_json = json.dumps(cfg, sort_keys=True)
    state = model.state_dict()
    meta = {FORMAT_KEY: FORMAT, CONFIG_KEY: cfg_json}
    domain = getattr(model, "domain", None)
    if domain:
        meta[DOMAIN_KEY] = str(domain)
    save_tensors_atomic(path, state, meta)
    sidecar = {"format": FORMAT, "weights": path.name, "num_tensors": len(state),
               "num_parameters": int(sum(p.numel() for p in model.parameters())), "ciae_config": cfg}
    if domain:
        sidecar[DOMAIN_KEY] = str(domain)
    atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    logger.info("saved model to %s", path)
    return path


def config_from_checkpoint(path: str | os.PathLike):
    """The :class:`~ciae_core.model.CIAEConfig` stored in a checkpoint's metadata."""
    from ciae_core.model import CIAEConfig, ModelConfigError

    path = Path(path)
    meta = read_metadata(path)
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{path} has no '{CONFIG_KEY}' metadata; not a CIAE model checkpoint")
    try:
        return CIAEConfig.from_dict(json.loads(meta[CONFIG_KEY]))
    except (json.JSONDecodeError, ModelConfigError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid model config: {e}") from None


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_compatible(stored: torch.dtype, expected: torch.dtype) -> bool:
    """Same kind (module docstring): floating ← float16/bfloat16/float32/float64; integer ← any
    integer; else equal. (float8 needs per-tensor scales that safetensors files do not carry.)"""
    if expected.is_floating_point:
        return stored in _FLOAT_DTYPES or stored == expected
    if expected.is_complex or stored.is_complex or stored.is_floating_point:
        return stored == expected
    if expected == torch.bool or stored == torch.bool:
        return stored == expected
    return True  # integer ← integer


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a CIAE model from ``path`` on ``device``, in eval mode.

    Raises :class:`CheckpointError` (missing file, truncated/corrupt, not safetensors, config
    missing/invalid, missing/unexpected keys, shape mismatches, dtypes of the wrong kind: module
    docstring; half-precision weights are accepted and cast to float32). ``model.domain`` is the
    file's ``domain`` metadata (``None``: unknown).
    """
    from ciae_core.model import CIAE

    path = Path(path)
    cfg = config_from_checkpoint(path)
    tensors, meta = load_tensors(path, "cpu")
    model = CIAE.from_config(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise CheckpointError(f"{path} does not match its config: {len(missing)} missing and {len(unexpected)} "
                              f"unexpected tensors (e.g. {quote(example)})")
    cast = set()
    for k, v in own.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: tensor {quote(k)} has shape {tuple(tensors[k].shape)}, "
                                  f"model expects {tuple(v.shape)}")
        if not _dtype_compatible(tensors[k].dtype, v.dtype):
            kind = "a floating-point" if v.dtype.is_floating_point else "an integer"
            raise CheckpointError(f"{path}: tensor {quote(k)} has dtype {_dtype_name(tensors[k].dtype)}, model expects "
                                  f"{kind} tensor ({_dtype_name(v.dtype)})")
        if tensors[k].dtype != v.dtype:
            cast.add(_dtype_name(tensors[k].dtype))
    if cast:
        logger.info("%s: %s weights cast to the model's dtype", path, "/".join(sorted(cast)))
    model.load_state_dict(tensors, strict=True)  # copies, casting to each parameter's dtype
    model.domain = meta.get(DOMAIN_KEY) or None
    return model.to(device).eval()
