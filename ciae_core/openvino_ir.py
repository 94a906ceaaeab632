"""OpenVINO IR files (``.xml`` + ``.bin``) carrying the ciae metadata: atomic write, checked read.

An IR written here (the int8 model of :mod:`ciae_core.quantize`) keeps the metadata of the ONNX
export it came from (``ciae_config``, ``ciae_version``, ``ciae_outputs``, ``ciae_input_size``,
``ciae_source_sha256``, ...; :mod:`ciae_core.export`) in the model's ``rt_info`` section
``ciae``, plus ``ciae_format`` = :data:`IR_FORMAT`, ``ciae_precision`` and ``ciae_bin_sha256``.

Decisions:

* **Atomic pair.** An IR is two files and two renames are not one. Both are written under
  temporary names in the destination directory (``ov.save_model``, weights kept in fp32:
  ``compress_to_fp16=False``, so the float parts of an int8 model are not rounded), the
  sha256 of the ``.bin`` goes into the ``.xml`` (a fixed-length placeholder replaced in the
  text, so the weights are written once), then ``.bin`` and ``.xml`` are renamed into place.
  :func:`read_ir` checks the hash: a reader that catches the moment between the two renames,
  a ``.bin`` from another export or a truncated/corrupt one gets a one-line error instead of
  silently wrong weights. A failed write leaves no temporary file.
* Errors are :class:`ciae_core.export.ExportError` (one line naming the file), as for ONNX files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import tempfile

from ciae_core.export import ExportError, _os_error_reason, _umask
from ciae_core.no_telemetry import import_openvino

logger = logging.getLogger(__name__)

IR_FORMAT = "ciae-openvino-ir/1"
RT_SECTION = "ciae"
_HASH_KEY = "ciae_bin_sha256"
_PLACEHOLDER = "f" * 64  # replaced by the .bin's sha256 (same length) after the weights are written


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_ir(model, path: str | os.PathLike, metadata: dict[str, str]) -> str:
    """Write the ``ov.Model`` ``model`` to ``path`` (``.xml``; the ``.bin`` beside it) with
    ``metadata`` in its ``rt_info`` (module docstring). Returns the ``.xml`` path.
    Raises :class:`ExportError`."""
    ov = import_openvino()
    path = pathlib.Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"OpenVINO IR output must end in .xml: {path}")
    bin_path = path.with_suffix(".bin")
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["ciae_format"] = IR_FORMAT
    meta[_HASH_KEY] = _PLACEHOLDER
    for key, value in meta.items():
        model.set_rt_info(value, [RT_SECTION, key])
    tmp_xml = tmp_bin = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".xml", dir=path.parent)
        os.close(fd)
        tmp_xml = pathlib.Path(name)
        tmp_bin = tmp_xml.with_suffix(".bin")
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        digest = _sha256(tmp_bin)
        text = tmp_xml.read_text(encoding="utf-8")
        if text.count(_PLACEHOLDER) != 1:
            raise ExportError(f"writing {path}: the weights hash placeholder is not unique in the IR text")
        tmp_xml.write_text(text.replace(_PLACEHOLDER, digest), encoding="utf-8")
        mode = 0o666 & ~_umask()
        for tmp in (tmp_bin, tmp_xml):
            os.chmod(tmp, mode)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_xml, path)
    except ExportError:
        raise
    except OSError as e:
        raise ExportError(f"cannot write {path}: {_os_error_reason(path, e)}") from None
    except Exception as e:  # noqa: BLE001 - any serializer failure, in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"writing {path} failed: {type(e).__name__}: {msg}") from None
    finally:
        for tmp in (tmp_xml, tmp_bin):
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
    logger.info("wrote %s (+ %s)", path, bin_path.name)
    return str(path)


def ir_metadata(model) -> dict[str, str]:
    """The ``rt_info`` section ``ciae`` of an ``ov.Model`` as strings (empty if absent)."""
    rt = model.get_rt_info()
    if RT_SECTION not in rt.keys():
        return {}
    section = rt[RT_SECTION]
    keys = list(section.keys()) if isinstance(section, dict) else []
    return {k: model.get_rt_info([RT_SECTION, k]).astype(str) for k in keys}


def read_ir(path: str | os.PathLike, core=None):
    """Read an IR written by :func:`write_ir`: ``(ov.Model, metadata)``.

    :class:`ExportError` (one line naming the file) when the ``.xml`` or its ``.bin`` is
    missing, empty, corrupt, not ours, or the ``.bin`` does not belong to the ``.xml``.
    """
    path = pathlib.Path(path)
    bin_path = path.with_suffix(".bin")
    for p, what in ((path, "OpenVINO IR file"), (bin_path, "OpenVINO IR weights file (an IR is .xml + .bin)")):
        if not p.is_file():
            raise ExportError(f"{what} not found: {p}")
        if p.stat().st_size == 0:
            raise ExportError(f"{p} is empty (truncated IR)")
    from ciae_core.openvino_core import shared_core

    core = core or shared_core()
    try:
        model = core.read_model(str(path))
    except Exception as e:  # noqa: BLE001 - any reader failure means a bad file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{path} is corrupt, truncated or not an OpenVINO IR: {msg[:300]}") from None
    meta = ir_metadata(model)
    if meta.get("ciae_format") != IR_FORMAT:
        raise ExportError(f"{path} is not a ciae OpenVINO IR (no '{RT_SECTION}' metadata of format {IR_FORMAT}); "
                          f"write it with ciae-export --int8")
    if meta.get(_HASH_KEY) != _sha256(bin_path):
        raise ExportError(f"{bin_path} does not belong to {path.name} (sha256 differs from the one recorded at "
                          f"writing: truncated, corrupt, replaced, or caught mid-write); write the model again")
    return model, meta


def config_from_metadata(meta: dict[str, str], path: str | os.PathLike):
    """The :class:`~ciae_core.model.CIAEConfig` in ``meta['ciae_config']``; :class:`ExportError` if bad."""
    from ciae_core.model import CIAEConfig, ModelConfigError

    if "ciae_config" not in meta:
        raise ExportError(f"{path} has no 'ciae_config' metadata: not written by ciae-export (re-export the model)")
    try:
        return CIAEConfig.from_dict(json.loads(meta["ciae_config"]))
    except (json.JSONDecodeError, ModelConfigError, TypeError, KeyError, ValueError) as e:
        raise ExportError(f"{path} has an invalid 'ciae_config' metadata entry: {e}") from None
