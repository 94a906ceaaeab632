"""What images a model was trained on (its *domain*), and the warning the tools give for it.

A model file may say which data its weights know: the safetensors metadata key ``domain``
(:data:`DOMAIN_KEY`, written by :func:`ciae_core.checkpoint.save_model` from ``model.domain``),
carried into a ``ciae-export`` ONNX file as ``metadata_props`` key ``ciae_domain``
(:data:`ONNX_DOMAIN_KEY`). The trainer sets it from its training data
(:func:`training_domain`). Values:

* ``synthetic-shapes`` (:data:`SYNTHETIC_SHAPES`): rendered scenes of ``ciae_core.synth`` (the
  shipped ``models/ciae_synthetic_small.safetensors``). On real camera images such a model still
  assigns every pixel to one of its few shape classes, so every tool that runs one says so once
  (:func:`domain_warning`): the node at start, ``ciae-predict``, ``ciae-eval``, ``ciae-bag`` and
  ``ciae-demo``.
* absent: unknown (e.g. a model trained on a COCO-panoptic folder); no warning.

Decision: the text is computed here, once, and every caller logs it with its own logger (the
node through the ROS logger), so the wording cannot drift between tools.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable

DOMAIN_KEY = "domain"
ONNX_DOMAIN_KEY = "ciae_domain"
CONFIG_KEY = "ciae_config"  # the model config's key in both formats (ciae_core.checkpoint.CONFIG_KEY)
SYNTHETIC_SHAPES = "synthetic-shapes"
REAL_SCENE_HINT = "train on COCO for real scenes: see README 'Train a real-scene model'"


def training_domain(kind: str, categories: Iterable) -> str | None:
    """The domain of a model trained on data of ``kind`` (``synthetic`` | ``coco``) with
    ``categories`` (:class:`~ciae_core.structures.CategoryInfo`, training order).

    ``synthetic`` data, or a COCO-panoptic folder whose category table is exactly
    ``ciae_core.synth``'s (a ``ciae-synth`` output), gives :data:`SYNTHETIC_SHAPES`; anything else
    ``None`` (unknown).
    """
    if kind == "synthetic":
        return SYNTHETIC_SHAPES
    from ciae_core.synth import SYNTH_CATEGORIES

    def key(cats):
        return [(int(c.id), str(c.name), bool(c.isthing)) for c in cats]
    return SYNTHETIC_SHAPES if key(categories) == key(SYNTH_CATEGORIES) else None


def read_model_domain(path: str | os.PathLike) -> tuple[str | None, list[str]]:
    """``(domain, category names)`` of a ``.safetensors`` model or a ``ciae-export`` ``.onnx``.

    ``domain`` is ``None`` when the file does not say (unknown). Only the metadata is read, without
    torch (the demo's client process asks too). A file that cannot be read gives ``(None, [])``:
    the model loaders report a bad file in their own one-line errors; this is only for the warning.
    """
    path = pathlib.Path(path)
    try:
        if path.suffix.lower() == ".onnx":
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            domain = meta.get(ONNX_DOMAIN_KEY)
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                meta = dict(f.metadata() or {})
            domain = meta.get(DOMAIN_KEY)
    except Exception:  # noqa: BLE001 - any reader failure (OSError, safetensors/protobuf errors): unknown
        return None, []
    names: list[str] = []
    try:
        names = [str(c["name"]) for c in json.loads(meta.get(CONFIG_KEY) or "{}").get("categories", [])]
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
        names = []
    return (domain or None), names


def domain_warning(domain: str | None, category_names: Iterable[str], file_name: str = "") -> str | None:
    """The one-line warning for a model of ``domain`` (``None`` when there is nothing to say),
    prefixed with ``file_name`` when given."""
    if domain != SYNTHETIC_SHAPES:
        return None
    names = list(category_names)
    knows = f"it knows {', '.join(names)} in rendered scenes" if names else "it knows rendered scenes only"
    prefix = f"{file_name}: " if file_name else ""
    return f"{prefix}synthetic-only model: {knows}; on real images its segments are meaningless; {REAL_SCENE_HINT}"


def model_domain_warning(path: str | os.PathLike) -> str | None:
    """:func:`domain_warning` for the model file ``path`` (prefixed with the file name)."""
    return domain_warning(*read_model_domain(path), file_name=pathlib.Path(path).name)
