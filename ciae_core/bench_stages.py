"""Stage breakdown of ours in ``ciae-bench``: where the time of one call goes.

Stages of one call (eager forward: module boundaries are invisible in a CUDA-graph replay):
``resize_copy`` (letterbox + upload: preprocess/H2D), ``backbone_fpn``, ``heads`` (proposal head +
embedding branch, the rest of ``forward_raw``), ``proposal_selection``
(:func:`ciae_core.fusion.select_proposals`), ``fusion`` (the rest of
:func:`ciae_core.fusion.panoptic_from_raw`: queries + Eq. 16) and ``map_back_copy`` (map back to
the input resolution + the device→host copy, the predictor's own ``map_back + to_host`` timings of
a full call). The backbone and the selection are timed inside the calls that make them (forward
hooks, a timing wrapper), so every stage of a repeat comes from one call.

How (:class:`StageMarks`): on CUDA, CUDA events recorded on the stream at each stage boundary,
with no synchronise between stages (the stages run as they do in a real call; one synchronise at
the end of the call, then the event pairs are read); on the CPU, ``perf_counter`` after each
stage. On CUDA ``backbone_fpn + heads`` of this eager forward exceed the graph-replayed forward
of the end-to-end timing (launch gaps).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from ciae_core.bench import BenchError, sync

STAGES = ("resize_copy", "backbone_fpn", "heads", "proposal_selection", "fusion", "map_back_copy")
EVENT_TIMING = "CUDA events at the stage boundaries, no synchronise between stages (eager forward)"
SYNC_TIMING = "perf_counter after each stage"


class StageMarks:
    """Named time marks of one call: CUDA events on the current stream (no synchronise) or
    ``perf_counter`` readings (CPU); :meth:`ms` after the call (on CUDA after a synchronise)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.marks: dict[str, object] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            self.marks[name] = ev
        else:
            self.marks[name] = time.perf_counter()

    def ms(self, start: str, end: str) -> float:
        a, b = self.marks[start], self.marks[end]
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3  # type: ignore[union-attr, operator]

    @property
    def method(self) -> str:
        return EVENT_TIMING if self.cuda else SYNC_TIMING


@contextlib.contextmanager
def _timed_proposal_selection(device: torch.device, spans: list[float]):
    """While active, every call of :func:`ciae_core.fusion.select_proposals` made through
    ``ciae_core.fusion`` (the one ``panoptic_from_raw`` makes) is bracketed by :class:`StageMarks`
    — the function-level counterpart of the backbone's forward hooks, so the selection and the
    fusion are both timed inside the same postprocess call; each call's ms is appended to
    ``spans`` when the block ends (on CUDA after a synchronise). The wrapper is removed
    afterwards, also when the timed code raises."""
    from ciae_core import fusion

    select = fusion.select_proposals
    calls: list[StageMarks] = []

    def timed(*args, **kwargs):
        marks = StageMarks(device)
        marks.mark("start")
        out = select(*args, **kwargs)
        marks.mark("end")
        calls.append(marks)
        return out

    fusion.select_proposals = timed
    try:
        yield
    finally:
        fusion.select_proposals = select
        sync(device)
        spans.extend(m.ms("start", "end") for m in calls)


@contextlib.contextmanager
def _backbone_marks(model: torch.nn.Module, marks: StageMarks):
    """Marks ``backbone0``/``backbone1`` around every forward of ``model.backbone`` while active."""
    h1 = model.backbone.register_forward_pre_hook(lambda _m, _i: marks.mark("backbone0"))
    h2 = model.backbone.register_forward_hook(lambda _m, _i, _o: marks.mark("backbone1"))
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def _staged_call(predictor, image, marks: StageMarks) -> dict[str, float]:
    """One call's stages (module docstring) from the public stages of the predictor, then a full
    call for its map-back and device→host copy."""
    engine = predictor._engine
    spans: list[float] = []
    with _backbone_marks(engine.model, marks):
        sync(marks.device)
        marks.mark("start")
        batch, boxes = predictor.preprocess([image])
        marks.mark("preprocessed")
        raw = predictor.forward_raw(batch)
        marks.mark("forwarded")
        with _timed_proposal_selection(marks.device, spans):
            predictor.postprocess(raw, boxes)
        marks.mark("postprocessed")
        sync(marks.device)
    if len(spans) != 1:
        raise BenchError("stage breakdown: postprocess did not select proposals through ciae_core.fusion")
    backbone = marks.ms("backbone0", "backbone1")
    selection = spans[0]
    predictor(image)  # full call: its map_back + to_host stages (the predictor's own timings)
    return {"resize_copy": marks.ms("start", "preprocessed"), "backbone_fpn": backbone,
            "heads": marks.ms("preprocessed", "forwarded") - backbone, "proposal_selection": selection,
            "fusion": max(0.0, marks.ms("forwarded", "postprocessed") - selection),
            "map_back_copy": predictor.timings["map_back"] + predictor.timings["to_host"]}


@contextlib.contextmanager
def eager_calls(predictor):
    """While active the predictor's calls run eagerly: its engine's forward graphs and its
    whole-call graphs (``cuda_graphs="full"``) off; both restored afterwards."""
    engine, full = predictor._engine, getattr(predictor, "_full", None)
    graphs, engine.cuda_graphs = engine.cuda_graphs, False
    full_on = full is not None and full.enabled
    if full_on:
        full.enabled = False
    try:
        yield
    finally:
        engine.cuda_graphs = graphs
        if full_on:
            full.enabled = True


def ours_stage_breakdown(predictor, images, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms per stage over ``repeats`` staged calls after ``warmup`` (module docstring); the
    calls run eagerly (:func:`eager_calls`: module hooks do not fire in graph replays)."""
    rows: dict[str, list[float]] = {k: [] for k in STAGES}
    with eager_calls(predictor):
        for i in range(warmup + repeats):
            stages = _staged_call(predictor, images[i % len(images)], StageMarks(device))
            if i >= warmup:
                for k, v in stages.items():
                    rows[k].append(v)
    return {k: float(np.median(v)) for k, v in rows.items()}
