"""ONNX export of ``CIAE.forward_raw`` and reading exported files back (command line: ``ciae-export``).

The graph is the export boundary of docs/DESIGN.md (``do_postprocess=False``): everything up to
the raw network outputs, no data-dependent control flow. Proposal selection and the Eq. 16 fusion
are *not* in the graph; the onnxruntime engine of :mod:`ciae_core.engine_onnxruntime` runs the same torch
code (:func:`ciae_core.fusion.panoptic_from_raw`) on the graph's outputs instead.

Decision (measured, torch 2.14.1, onnxruntime 1.31.1, opset 17, the shipped
``models/ciae_synthetic_small.safetensors`` on the test/data images at 320x448): neither exporter
gives a correct graph of :func:`~ciae_core.fusion.select_proposals` or of the fusion as they are.

* ``select_proposals`` with the TorchScript exporter (``dynamo=False``) exports in 0.3 s and, on
  the three test images, matches torch exactly (same labels and locations, boxes identical,
  scores within 1.2e-7) at the default thresholds and at score threshold 0. But the trace freezes
  the data-dependent branch ``if cand.numel() > pre_nms_topk`` (and the image size, the
  thresholds and N) into constants: with fewer candidates than ``pre_nms_topk`` (534 when the
  class logits are shifted by -3, 0 when shifted by -100) onnxruntime fails with "k argument
  [1000] should not be greater than specified axis dim value [534]" in the TopK node, where torch
  returns 100 (resp. 0) proposals; traced on such an input it would silently skip the top-k on
  busy images instead. Not clean, so there is no ``--with-selection``.
* ``select_proposals`` with the dynamo exporter (``dynamo=True``, ``A`` dynamic):
  ``torch.export`` fails (strict and non-strict) with ``GuardOnDataDependentSymNode: Could not
  guard on data-dependent expression u0 > 1000`` at the same branch (fusion.py, the
  ``cand.numel() > pre_nms_topk`` line).
* ``panoptic_from_raw`` (selection + queries + ``fuse_panoptic(method="dense")``): TorchScript
  tracing aborts with "INTERNAL ASSERT FAILED at alias_analysis.cpp:623 ... We don't have an op for
  aten::view" (the dtype ``view`` of :func:`~ciae_core.fusion.first_argmax`); dynamo stops at the
  selection guard above. The coarse-to-fine and numba methods index by data-dependent pixel sets
  and call numpy kernels, so they are not traceable at all.

Making selection exportable would need a rewrite (e.g. top-k over ``min(pre_nms_topk, A*T)``
scores with the rejected ones masked, the image size as an input) and its own parity tests.

Graph signature (opset ``DEFAULT_OPSET`` = 17 by default, ``--opset`` 13..20):

* input ``images``: float32 ``(N, 3, H, W)``, RGB 0..255, H and W multiples of 32 (the predictor
  letterboxes and pads to them). A ``--dynamic`` export takes any N, H, W (other sizes are
  padded to 32 inside the graph); a fixed-shape (``--size``) export takes exactly the N, H, W it
  was exported with — onnxruntime refuses any other shape ("Got invalid dimensions for input"),
  so the caller must letterbox into that canvas. Normalisation is inside the graph.
* outputs (float32), with A = number of FCOS locations of P3..P7, T thing classes, S stuff
  classes, D embedding dims:
  ``cls_logits (N, A, T)``, ``box_regression (N, A, 4)`` ltrb input pixels, ``centerness (N, A)``,
  ``points (A, 2)`` xy input pixels, ``embedding (N, D, H/s, W/s)`` at the embedding branch's
  stride s (4; 8 with ``embedding_from_level == 3`` without ``embedding_c2_skip``), un-normalised
  ``P' + P''`` for ``embedding_stride == 1`` (the fusion normalises after up-sampling) and
  normalised for ``embedding_stride == 4``; ``memory (T+S, D)``.
* shapes: ``--dynamic`` makes N, H and W symbolic (``batch``, ``height``, ``width``) and A, the
  embedding size follow; ``--size WIDTHxHEIGHT`` (default 640x640) fixes them (what TensorRT likes best).
* ``metadata_props``: ``ciae_config`` (the :class:`~ciae_core.model.CIAEConfig` JSON: categories,
  thresholds, embedding stride), ``ciae_format`` (``ciae-onnx/2``), ``ciae_version``,
  ``ciae_outputs`` (output names in order), ``ciae_input_size`` (``WIDTHxHEIGHT`` or ``dynamic``),
  ``ciae_source_sha256`` (hash of the checkpoint it came from, used by the predictor's cache), and
  ``ciae_domain`` when the model has a domain (:mod:`ciae_core.model_domain`, from the
  checkpoint's ``domain`` metadata).

Decision: we use the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): it
exports this graph with dynamic batch/height/width in about a second and the result matches
torch to ~1e-5; the dynamo exporter specialised the batch dimension of this model (torch 2.14).
The exported file is checked with ``onnx.checker`` and written atomically: to a uniquely named
temporary file in the destination directory (``tempfile.mkstemp``, so concurrent exports to the
same path never write the same temporary file), then renamed over the destination; the last
rename wins and readers only ever see a complete file. Every failure, including an unusable
destination directory, is an :class:`ExportError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import tempfile
import warnings

import torch

from ciae_core.model_domain import ONNX_DOMAIN_KEY

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
OPSET_RANGE = (13, 20)
# /2: the embedding output is always at the branch's stride (/1 files of embedding_stride-1 models carried
# the full-resolution P and cannot be fused by this version)
FORMAT = "ciae-onnx/2"
INPUT_NAME = "images"
OUTPUT_NAMES = ("cls_logits", "box_regression", "centerness", "points", "embedding", "memory")


class ExportError(RuntimeError):
    """Export or ONNX-file problem (one line naming the file and what is wrong)."""


class RawOutputs(torch.nn.Module):
    """``CIAE.forward_raw`` as a module returning a tuple in ``OUTPUT_NAMES`` order."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        raw = self.model.forward_raw(images)
        return tuple(raw[k] for k in OUTPUT_NAMES)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux: /proc/self/status);
    elsewhere set and restored at once (a thread creating a file in between would get 022)."""
    with contextlib.suppress(OSError, ValueError, IndexError):  # no /proc (or no Umask line): the fallback
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _os_error_reason(path: pathlib.Path, e: OSError) -> str:
    """One line for an OSError while writing ``path``: names a parent that is not a directory."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return f"{parent} exists and is not a directory"
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or type(e).__name__}{where}"


def export_model(model: torch.nn.Module, path: str | os.PathLike, size: tuple[int, int] = (640, 640),
                 dynamic: bool = False, batch_size: int = 1, opset: int = DEFAULT_OPSET,
                 extra_metadata: dict[str, str] | None = None) -> str:
    """Export ``model.forward_raw`` (a :class:`~ciae_core.model.CIAE`) to ONNX at ``path``.

    ``size``/``batch_size`` give the traced example (and the fixed shape unless ``dynamic``).
    The model config goes into ``metadata_props`` (module docstring). Runs ``onnx.checker``.
    Returns the path written. Raises :class:`ExportError`.
    """
    import onnx

    from ciae_core import __version__

    if not OPSET_RANGE[0] <= int(opset) <= OPSET_RANGE[1]:
        raise ExportError(f"opset {opset} is not supported; use {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    path = pathlib.Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"output file must end in .onnx: {path}")
    h, w = size
    model = model.eval().to("cpu")
    example = torch.zeros(batch_size, 3, h, w)
    example[:, :, : h // 2] = 128.0
    dyn = None
    if dynamic:
        dyn = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
               "cls_logits": {0: "batch", 1: "locations"}, "box_regression": {0: "batch", 1: "locations"},
               "centerness": {0: "batch", 1: "locations"}, "points": {0: "locations"},
               "embedding": {0: "batch", 2: "embedding_height", 3: "embedding_width"}}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = pathlib.Path(tmp_name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the export gets the usual mode
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(RawOutputs(model), (example,), str(tmp), dynamo=False, opset_version=int(opset),
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=dyn,
                              do_constant_folding=True)
        proto = onnx.load(str(tmp))
        meta = {"ciae_config": json.dumps(model.config.to_dict(), sort_keys=True), "ciae_format": FORMAT,
                "ciae_version": __version__, "ciae_outputs": ",".join(OUTPUT_NAMES),
                "ciae_input_size": "dynamic" if dynamic else f"{w}x{h}"}
        if getattr(model, "domain", None):  # what the weights know (ciae_core.model_domain)
            meta[ONNX_DOMAIN_KEY] = str(model.domain)
        meta.update(extra_metadata or {})
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=str(v))
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except ExportError:
        raise
    except OSError as e:  # destination unusable: a path component is a file, no permission, disk full, ...
        raise ExportError(f"cannot write {path}: {_os_error_reason(path, e)}") from None
    except Exception as e:  # noqa: BLE001 - report any exporter failure in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"exporting to {path} failed: {type(e).__name__}: {msg}") from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    logger.info("exported %s (opset %d, %s)", path, opset, "dynamic" if dynamic else f"{w}x{h}")
    return str(path)


def export_checkpoint(weights: str | os.PathLike, path: str | os.PathLike, **kwargs) -> str:
    """Load a ``.safetensors`` checkpoint and :func:`export_model` it; records its sha256."""
    from ciae_core.checkpoint import CheckpointError, load_model

    try:
        model = load_model(weights, device="cpu")
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    extra = dict(kwargs.pop("extra_metadata", None) or {})
    extra["ciae_source_sha256"] = file_sha256(str(weights))
    extra["ciae_source_name"] = pathlib.Path(weights).name
    return export_model(model, path, extra_metadata=extra, **kwargs)


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """``metadata_props`` of an ONNX file (graph weights not loaded). :class:`ExportError` if the
    file is missing, truncated or not ONNX."""
    import onnx
    from google.protobuf.message import DecodeError

    from ciae_core.user_input import clip_path, file_problem

    path = pathlib.Path(path)
    problem = file_problem(path)
    if problem == "does not exist":
        raise ExportError(f"ONNX file not found: {clip_path(path)}")
    if problem == "is empty":
        raise ExportError(f"{clip_path(path)} is empty (truncated ONNX file)")
    if problem is not None:  # a directory, /dev/zero, unreadable: named, not "not found"
        raise ExportError(f"ONNX file {clip_path(path)} {problem}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{path} is corrupt, truncated or not an ONNX file: {msg}") from None
    if not proto.graph.node:
        raise ExportError(f"{path} is corrupt, truncated or not an ONNX file: it has no graph")
    return {p.key: p.value for p in proto.metadata_props}


def read_onnx_config(path: str | os.PathLike):
    """The :class:`~ciae_core.model.CIAEConfig` stored in a ``ciae-export`` file."""
    from ciae_core.model import CIAEConfig, ModelConfigError

    meta = read_onnx_metadata(path)
    if "ciae_config" not in meta:
        raise ExportError(f"{path} has no 'ciae_config' metadata: not written by ciae-export (re-export the model)")
    try:
        cfg = CIAEConfig.from_dict(json.loads(meta["ciae_config"]))
    except (json.JSONDecodeError, ModelConfigError, TypeError, KeyError, ValueError) as e:
        raise ExportError(f"{path} has an invalid 'ciae_config' metadata entry: {e}") from None
    fmt = meta.get("ciae_format")
    if fmt != FORMAT and not (fmt == "ciae-onnx/1" and cfg.embedding_stride == 4):
        raise ExportError(f"{path} is a {fmt or 'unversioned'} export whose embedding output this version cannot "
                          f"fuse (needs {FORMAT}); re-export it with ciae-export")
    return cfg
