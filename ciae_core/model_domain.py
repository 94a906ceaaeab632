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

    ``domain`` is ``None`` when the file does not say (unknown). Unreadable files raise what
    their readers raise (:class:`~ciae_core.checkpoint.CheckpointError`,
    :class:`~ciae_core.export.ExportError`); the tools call this after the model loaded.
    """
    path = pathlib.Path(path)
    if path.suffix.lower() == ".onnx":
        from ciae_core.export import read_onnx_metadata

        meta = read_onnx_metadata(path)
        domain, config = meta.get(ONNX_DOMAIN_KEY), meta.get("ciae_config")
    else:
        from ciae_core.checkpoint import CONFIG_KEY, read_metadata

        meta = read_metadata(path)
        domain, config = meta.get(DOMAIN_KEY), meta.get(CONFIG_KEY)
    names: list[str] = []
    if config:
        try:
            names = [str(c["name"]) for c in json.loads(config).get("categories", [])]
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
            names = []
    return (domain or None), names


def domain_warning(domain: str | None, category_names: Iterable[str]) -> str | None:
    """The one-line warning for a model of ``domain`` (``None`` when there is nothing to say)."""
    if domain != SYNTHETIC_SHAPES:
        return None
    names = list(category_names)
    knows = f"it knows {', '.join(names)} in rendered scenes" if names else "it knows rendered scenes only"
    return f"synthetic-only model: {knows}; on real images its segments are meaningless; {REAL_SCENE_HINT}"


def model_domain_warning(path: str | os.PathLike) -> str | None:
    """:func:`domain_warning` for the model file ``path`` (prefixed with the file name)."""
    text = domain_warning(*read_model_domain(path))
    return None if text is None else f"{pathlib.Path(path).name}: {text}"
