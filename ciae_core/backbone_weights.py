"""Reading ImageNet backbone weights from a local file: safetensors, or a torchvision ``.pth`` read
tensors-only, and the one-time conversion of such a ``.pth`` to safetensors.

torchvision ships its ImageNet weights as ``torch.save`` files, i.e. pickles. Reading a pickle
with the standard unpickler runs whatever code the file names, so a ``.pth`` is only ever read
with ``torch.load(weights_only=True)``: torch's restricted unpickler, which rebuilds tensors,
dicts, lists and numbers and refuses any other object. A file it refuses (or that holds anything
but tensors) is reported in one line that names the file and what was refused; the line never
suggests turning the restriction off (torch's own message does). To keep pickles out of training
runs altogether, convert the file once (``ciae-export --convert-backbone resnet50.pth --out
resnet50.safetensors``) and give the ``.safetensors``.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
from torch import Tensor

from ciae_core.user_input import clip, clip_path, file_problem, quote


class BackboneWeightsError(ValueError):
    """A backbone weights file that cannot be read as tensors (one-line message naming it)."""


_GLOBAL = re.compile(r"GLOBAL (\S+)")


def _refusal(exc: Exception) -> str:
    """What torch's restricted unpickler refused, in a few words (its message is a paragraph)."""
    text = str(exc)
    found = _GLOBAL.search(text)
    if found:
        return f"it refers to the Python object {quote(found.group(1).rstrip('.'))}, which a file of tensors never does"
    return "it is not a torch.save file of tensors (corrupt, or another kind of pickle)"


def read_backbone_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict (name -> tensor, on the CPU) of a ``.safetensors`` or torchvision ``.pth``
    file; a ``{"state_dict": {...}}`` wrapper is unwrapped. :class:`BackboneWeightsError` otherwise."""
    shown = clip_path(path)
    problem = file_problem(path)
    if problem == "does not exist":
        raise BackboneWeightsError(f"backbone weights file not found: {shown}")
    if problem is not None:  # a directory, /dev/zero, unreadable: named, not "not found"
        raise BackboneWeightsError(f"backbone weights file {shown} {problem}")
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return dict(load_file(path))
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BackboneWeightsError(f"cannot read backbone weights {shown}: not a valid safetensors file "
                                       f"({clip(first, 120)})") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr, in several lines
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)  # restricted: tensors only
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError, ...
        import pickle

        if isinstance(e, pickle.UnpicklingError):
            raise BackboneWeightsError(f"refused backbone weights {shown}: {_refusal(e)}") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "weights_only" in first:
            first = "not a torch.save file of tensors"
        raise BackboneWeightsError(f"cannot read backbone weights {shown}: {clip(first, 120)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise BackboneWeightsError(f"backbone weights {shown} hold a {type(state).__name__}, not a state dict "
                                   "of named tensors")
    return state
