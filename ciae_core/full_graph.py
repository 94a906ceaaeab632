"""The predictor's whole call in one CUDA graph per input shape (``Predictor(cuda_graphs="full")``).

One call of :class:`~ciae_core.predictor.Predictor` for a single image, as one graph
(:func:`whole_call` is its body; it runs on any device, which is how it is tested on the CPU)::

    host uint8 image ─ copied into a pinned staging buffer (host), one async H2D copy into the
      graph's static input buffer (not captured: a captured copy would record the pinned
      allocator's events inside the capture)
    graph: RGB/BGR, letterbox resize on the device (:func:`ciae_core.geometry.resize_image_like_cv2`)
      → forward_raw (the engine's eager forward: autocast, channels_last as configured)
      → static postprocess (:func:`ciae_core.static_postprocess.postprocess_static`: fixed-size
        proposal selection, Triton fusion)
      → map back to the input size (:func:`ciae_core.geometry.resize_nearest`) and the segment
        table recomputed from the mapped id map (:func:`ciae_core.fusion_triton.segment_stats`)
    then, after the replay: one D2H copy of the id map and one of the padded table (+ the NMS
    ``converged`` flag) into fresh pinned buffers, one synchronise.

Nothing in it synchronises with the host or has a data-dependent shape, so the CPU only launches
the graph and copies the results back: at camera rates the eager call is bound by kernel launches
and host synchronisations (the fusion synchronises many times), which the graph removes.

Decisions: a shape (input size, colour order) is captured on its second sighting, as the
engine's forward graphs (:mod:`ciae_core.engine_torch`); up to ``max_graphs`` are kept (least
recently used dropped); thresholds are baked into the graphs, so all are dropped when they change
(the next call of a shape is its first sighting again). A frame whose NMS did not converge in its fixed number of steps
(``converged`` False, rare) returns None: the predictor redoes it on the eager path, so results are
always those of the eager postprocess. A capture failure disables the full path with a warning
(the eager path with forward graphs stays). Single images only (a list of one counts); batches and
``return_confidence`` take the eager path.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ciae_core.geometry import Letterbox, resize_image_like_cv2, resize_nearest
from ciae_core.predictor_error import PredictorError

logger = logging.getLogger(__name__)


def _table(mapped: Tensor, fused: dict[str, Tensor]) -> Tensor:
    """The padded segment table ``(K + 1, 8)`` float64 of a mapped id map ``(H, W)`` int32: row j
    for slot j ``id, label, score, area, x, y, w, h`` (``id`` 0: no segment in the mapped map,
    areas and boxes from the mapped map as the eager path's ``geometry.segment_table``), and a last
    row ``converged, 0, ...``."""
    from ciae_core.fusion_triton import segment_stats

    k = fused["segment_ids"].shape[1]
    counts, _, boxes = segment_stats(mapped[None], k + 1)
    ids = fused["segment_ids"][0].long()  # (K,) 0 = no segment; ids <= K
    area = counts[0].gather(0, ids)
    present = (ids > 0) & (area > 0)
    b = boxes[0].index_select(0, ids)  # x0, y0, x1, y1 inclusive
    rows = torch.stack([ids.double(), fused["labels"][0].double(), fused["scores"][0].double(), area.double(),
                        b[:, 0].double(), b[:, 1].double(), (b[:, 2] - b[:, 0] + 1).double(),
                        (b[:, 3] - b[:, 1] + 1).double()], dim=1)
    rows = torch.where(present[:, None], rows, torch.zeros_like(rows))
    flag = torch.zeros(1, 8, dtype=torch.float64, device=rows.device)
    flag[0, 0] = fused["converged"][0].double()
    return torch.cat([rows, flag])


def whole_call(image: Tensor, lb: Letterbox, bgr: bool, image_hw: Tensor, forward: Callable[[Tensor], dict],
               settings: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The graph's body: ``image`` ``(H*W*3,)`` uint8 on the device of ``image_hw`` ``(1, 2)`` (the
    resized (h, w)) → the id map at the input size flattened ``(H*W,)`` int32 and the table of
    :func:`_table`. ``forward``: the engine's eager forward; ``settings``:
    :func:`~ciae_core.static_postprocess.postprocess_static`'s keywords."""
    from ciae_core.static_postprocess import postprocess_static

    dev = image_hw.device
    rh, rw = lb.resized_size
    x = image.view(lb.height, lb.width, 3).permute(2, 0, 1).float()
    if bgr:
        x = x.flip(0)
    if not lb.is_identity:
        x = resize_image_like_cv2(x, (rh, rw))
    batch = torch.zeros((1, 3, lb.padded_height, lb.padded_width), dtype=torch.float32, device=dev)
    batch[0, :, :rh, :rw] = x
    fused = postprocess_static(forward(batch), image_hw, fusion="triton", **settings)
    mapped = resize_nearest(fused["id_map"][0, :rh, :rw], (lb.height, lb.width)).to(torch.int32).contiguous()
    return mapped.reshape(-1), _table(mapped, fused)


def full_call_graphs(predictor, cuda_graphs) -> "FullCallGraphs | None":
    """A predictor's whole-call graphs: for ``cuda_graphs="full"`` with the torch engine on CUDA,
    else None (any graphs are ignored on the CPU); :class:`PredictorError` for a value that is not
    None, True, False, "forward" or "full", or "full" with another engine on CUDA."""
    if cuda_graphs not in (None, True, False, "forward", "full"):
        raise PredictorError(f"cuda_graphs must be None, True, False, 'forward' or 'full', got {cuda_graphs!r}")
    if cuda_graphs != "full" or predictor.device.type != "cuda":
        return None
    if predictor.engine_name != "torch":
        raise PredictorError(f"cuda_graphs='full' needs the torch engine, not {predictor.engine_name}")
    return FullCallGraphs(predictor.device, predictor._engine.forward_eager, lambda: static_settings(predictor))


def static_settings(predictor) -> dict[str, Any]:
    """The static postprocess's keywords (:mod:`ciae_core.static_postprocess`) for a predictor's
    model and current thresholds."""
    cfg = predictor.config
    return dict(num_things=predictor.num_things, embedding_stride=cfg.branch_stride,
                normalize_after_upsampling=cfg.embedding_stride == 1, **predictor.thresholds)


class FullCallGraphs:
    """Whole calls of one predictor as CUDA graphs (module docstring).

    ``forward``: the engine's eager forward (no graphs of its own); ``settings()``: the static
    postprocess's keywords now. ``__call__(image, lb, color)`` → ``(id_map (H, W) int32, table
    (n, 8) float64)`` on the host, or None when the eager path must run this frame (first
    sighting, NMS not converged, capture failed). ``timings`` (ms of the last replayed call):
    ``preprocess`` (host copy into the staging buffer), ``graph`` (H2D copy + replay) and
    ``to_host`` (CUDA events).
    """

    def __init__(self, device: torch.device, forward: Callable[[Tensor], dict], settings: Callable[[], dict],
                 max_graphs: int = 4):
        self.device = device
        self.forward = forward
        self.settings = settings
        self.max_graphs = int(max_graphs)
        self.enabled = True
        self.nms_iterations = 16  # fixed NMS steps (static_proposals.greedy_nms_fixed_point)
        self.fallbacks = 0  # frames redone eagerly because the NMS did not converge
        self.timings: dict[str, float] = {}
        self._graphs: dict[tuple, tuple] = {}
        self._seen: dict[tuple, None] = {}
        self._baked: tuple = ()  # the settings the graphs were captured with

    def clear(self) -> None:
        """Drop every graph (the settings they baked in changed)."""
        self._graphs.clear()
        self._seen.clear()

    def _capture(self, key: tuple, image: np.ndarray, lb: Letterbox, bgr: bool):
        """Three warm-up runs (Triton compiles, cuDNN plans, cached taps), then the capture, on a
        side stream; None (and the full path off) on failure."""
        caller = None
        try:
            caller = torch.cuda.current_stream(self.device)
            staging = torch.empty(image.size, dtype=torch.uint8, pin_memory=True)
            staging.numpy()[:] = image.reshape(-1)
            dev_in = torch.empty(image.size, dtype=torch.uint8, device=self.device)  # the graph's input
            dev_in.copy_(staging, non_blocking=True)
            image_hw = torch.tensor([lb.resized_size], dtype=torch.long, device=self.device)
            settings = {**self.settings(), "nms_iterations": self.nms_iterations}
            side = torch.cuda.Stream(self.device)
            side.wait_stream(caller)
            with torch.inference_mode():
                with torch.cuda.stream(side):
                    for _ in range(3):
                        whole_call(dev_in, lb, bgr, image_hw, self.forward, settings)
                caller.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    outputs = whole_call(dev_in, lb, bgr, image_hw, self.forward, settings)
        except Exception as e:  # noqa: BLE001 - any capture problem: the eager path from now on
            if caller is not None:  # a capture that fails in capture_end leaves its stream current
                torch.cuda.set_stream(caller)
            logger.warning("whole-call CUDA graph capture failed (%s: %s); using the eager postprocess",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.enabled = False
            self.clear()
            return None
        if len(self._graphs) >= self.max_graphs:
            self._graphs.pop(next(iter(self._graphs)))
        self._graphs[key] = (graph, staging, dev_in, image_hw, outputs)
        return self._graphs[key]

    def answer(self, images: list[np.ndarray], boxes: list[Letterbox], color: str, segments: Callable,
               extras: bool = False):
        """The predictor's call through the graph → a ``PanopticResult``, or None when this call
        takes the eager path: not a single image, ``extras`` asked for (confidence, embeddings), or
        :meth:`__call__` declined. ``segments(table)``: the predictor's table → segments."""
        from ciae_core.structures import PanopticResult

        done = None if len(images) != 1 or extras else self(images[0], boxes[0], color)
        if done is None:
            return None
        id_map, table = done
        return PanopticResult(id_map=id_map.reshape(boxes[0].height, boxes[0].width), segments=segments(table),
                              confidence=None)

    def __call__(self, image: np.ndarray, lb: Letterbox, color: str):
        if not self.enabled:
            return None
        baked = (tuple(sorted(self.settings().items())), self.nms_iterations)
        if baked != self._baked:  # thresholds changed (Predictor.update): start afresh
            self.clear()
            self._baked = baked
        key = (lb, color)
        entry = self._graphs.pop(key, None)
        if entry is None:
            if key not in self._seen:  # first sighting: eager (the engine's docstring says why)
                self._seen[key] = None
                while len(self._seen) > 64:
                    self._seen.pop(next(iter(self._seen)))
                return None
            entry = self._capture(key, image, lb, color == "bgr")
            if entry is None:
                return None
        self._graphs[key] = entry  # most recently used last
        return self._replay(entry, image)

    def _replay(self, entry, image: np.ndarray):
        graph, staging, dev_in, _, (dev_map, dev_table) = entry
        t0 = time.perf_counter()
        staging.numpy()[:] = image.reshape(-1)  # the previous call ended with a synchronise: free to write
        t1 = time.perf_counter()
        stream = torch.cuda.current_stream(self.device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record(stream)
        dev_in.copy_(staging, non_blocking=True)
        graph.replay()
        events[1].record(stream)
        host_map = torch.empty(dev_map.shape, dtype=dev_map.dtype, pin_memory=True)
        host_table = torch.empty(dev_table.shape, dtype=dev_table.dtype, pin_memory=True)
        host_map.copy_(dev_map, non_blocking=True)
        host_table.copy_(dev_table, non_blocking=True)
        events[2].record(stream)
        stream.synchronize()
        self.timings = {"preprocess": (t1 - t0) * 1e3, "graph": events[0].elapsed_time(events[1]),
                        "to_host": events[1].elapsed_time(events[2])}  # graph: with the H2D copy
        table = host_table.numpy()
        if table[-1, 0] != 1.0:  # the NMS needed more steps than it had: redo this frame eagerly
            self.fallbacks += 1
            logger.debug("whole-call graph: NMS did not converge; frame redone on the eager path")
            return None
        rows = table[:-1]
        return host_map.numpy(), rows[rows[:, 0] > 0]
