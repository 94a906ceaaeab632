"""The node's model: building the Predictor from node parameter values, and what messages report.

:func:`load_model` turns the parameter values into a :class:`ciae_core.predictor.Predictor` (or
one ``NodeStartupError`` line), :class:`ModelHandle` carries it with the name, content hash,
engine, device and domain (:mod:`ciae_core.model_domain`: what images the weights know, and
the warning to log for a synthetic-only model) that the messages and /diagnostics report, and
:func:`predictor_settings` maps the run-time parameters (input size, thresholds; 0/-1 = the
model's own default) to ``Predictor.update`` keywords. Used by the node and by ``ciae-bag``.
"""

from __future__ import annotations

import hashlib
import pathlib
from dataclasses import dataclass

from ciae_core.user_input import file_problem, quote

from .node_params import THRESHOLD_PARAMS, NodeStartupError


@dataclass
class ModelHandle:
    """A loaded Predictor plus what the messages report about it."""

    predictor: object
    name: str
    version: str
    weights: str
    engine: str
    device: str
    domain: str | None = None            # None: the file does not say (unknown)
    domain_warning: str | None = None    # the one-line warning for a synthetic-only model, else None


def _file_version(path: pathlib.Path) -> str:
    """Short content hash of the weights file: identifies the exact model in every message."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()[:12]


def predictor_settings(values: dict, model_config=None, model_input_size: int | None = None) -> dict:
    """``Predictor.update`` keywords from node parameter values.

    ``input_size`` 0 and thresholds -1 mean "the model's own default"; with ``model_config`` given
    they are resolved to its values (so switching back to -1 at run time restores them), without
    it they are left out (the Predictor then uses its defaults). ``model_input_size``: the loaded
    predictor's own input size (``Predictor.default_input_size``: a fixed-shape ONNX export's
    canvas), else the backbone's default.
    """
    out = {}
    size = int(values["input_size"])
    if size:
        out["input_size"] = size
    elif model_config is not None:
        from ciae_core.predictor import default_input_size

        out["input_size"] = model_input_size or default_input_size(model_config.backbone)
    for name in THRESHOLD_PARAMS:
        v = values[name]
        if v != -1:
            out[name] = v
        elif model_config is not None:
            out[name] = getattr(model_config, "min_stuff_area" if name == "stuff_area_min" else name)
    return out


def load_model(values: dict, hint_style: str = "ros", options=None) -> ModelHandle:
    """Build the Predictor from node parameter values; ``NodeStartupError`` with one line on failure.

    The library's hints (``use device='cpu'``) are written for the caller
    (:func:`ciae_core.cli.hints.command_line_hint`): ``hint_style="ros"`` (the node: ``device:=cpu``)
    over the node's parameter names, or ``"option"`` (``--device cpu``) over ``options`` (a tool's
    option names, e.g. ``ciae-bag``'s).
    """
    from ciae_core.cli.hints import command_line_hint
    from ciae_core.predictor import Predictor, PredictorError

    from .node_params import SPECS

    from .resources import default_weights

    weights = str(values["weights"] or "")
    if not weights:
        found = default_weights()
        if found is None:
            raise NodeStartupError("no weights given and no shipped model found (models/*.safetensors); "
                                   "set the 'weights' parameter")
        weights = str(found)
    path = pathlib.Path(weights).expanduser()
    problem = file_problem(path)
    if problem is not None:  # a directory or /dev/zero is not "missing"
        raise NodeStartupError(f"weights file {quote(weights)} {problem}")
    try:
        predictor = Predictor(str(path), engine=str(values["engine"]), device=str(values["device"]),
                              max_size=int(values["max_size"]), precision=str(values["precision"]),
                              **predictor_settings(values))
    except PredictorError as exc:
        raise NodeStartupError(command_line_hint(str(exc), SPECS if options is None else options, hint_style)) from None
    except (OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NodeStartupError(f"cannot load model {quote(weights)}: {first}") from None
    from ciae_core.model_domain import domain_warning, read_model_domain

    domain, names = read_model_domain(path)
    return ModelHandle(predictor=predictor, name=path.stem, version=_file_version(path), weights=str(path),
                       engine=predictor.engine, device=str(values["device"]), domain=domain,
                       domain_warning=domain_warning(domain, names, file_name=path.name))
