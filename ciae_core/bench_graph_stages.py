"""Stage breakdown of ours' whole-call graph path (``cuda_graphs="full"``) in ``ciae-bench``.

The whole call is one CUDA graph (:mod:`ciae_core.full_graph`), inside which no boundary is
visible; so here each stage of :func:`ciae_core.full_graph.whole_call` is captured as a graph of
its own, on the outputs of the one before, and the graphs are replayed back to back with CUDA
events between them (no synchronise, no launch gaps: the sum is the whole graph's time up to the
few microseconds a graph launch costs). Stages: ``resize_copy`` (H2D copy of the uint8 image,
RGB/BGR, letterbox resize), ``forward`` (``forward_raw``; backbone and heads are one graph here,
their split is the eager breakdown's), ``proposal_selection`` (fixed-size top-k, NMS fixed point,
queries), ``fusion`` (the Triton fusion), ``map_back`` (id map to the input size, segment table)
and ``to_host`` (the two D2H copies). CUDA only.
"""

from __future__ import annotations

import numpy as np
import torch

GRAPH_STAGES = ("resize_copy", "forward", "proposal_selection", "fusion", "map_back", "to_host")
GRAPH_STAGE_TIMING = ("each stage of the whole call captured as its own CUDA graph, replayed back to back, CUDA "
                      "events between them")


def _stage_functions(predictor, lb, dev_in: torch.Tensor, image_hw: torch.Tensor):
    """The stages of :func:`~ciae_core.full_graph.whole_call` as functions of the previous stage's output."""
    from ciae_core.full_graph import _table, static_settings
    from ciae_core.geometry import resize_image_like_cv2, resize_nearest
    from ciae_core.static_postprocess import SELECTION_SETTINGS, static_fusion, static_instances

    settings = {**static_settings(predictor), "nms_iterations": 16}
    geometry = {k: settings.pop(k) for k in ("embedding_stride", "normalize_after_upsampling")}
    num_things = settings.pop("num_things")
    selection = {k: v for k, v in settings.items() if k in SELECTION_SETTINGS}
    rest = {k: v for k, v in settings.items() if k not in SELECTION_SETTINGS}
    rh, rw = lb.resized_size

    def resize(_):
        x = dev_in.view(lb.height, lb.width, 3).permute(2, 0, 1).float()
        if not lb.is_identity:
            x = resize_image_like_cv2(x, (rh, rw))
        batch = torch.zeros((1, 3, lb.padded_height, lb.padded_width), dtype=torch.float32, device=dev_in.device)
        batch[0, :, :rh, :rw] = x
        return batch

    def select(raw):
        return raw, static_instances(raw, image_hw, **geometry, **selection)

    def fuse(state):
        raw, (instances, converged) = state
        out = static_fusion(raw, instances, image_hw, num_things=num_things, **geometry, **rest)
        out["converged"] = converged
        return out

    def map_back(fused):
        mapped = resize_nearest(fused["id_map"][0, :rh, :rw], (lb.height, lb.width)).to(torch.int32).contiguous()
        return mapped.reshape(-1), _table(mapped, fused)

    return [("resize_copy", resize), ("forward", predictor._engine.forward_eager), ("proposal_selection", select),
            ("fusion", fuse), ("map_back", map_back)]


def graph_stage_breakdown(predictor, image: np.ndarray, repeats: int) -> dict[str, float]:
    """Median ms per stage (module docstring) over ``repeats`` replays of the stage graphs for one
    image (RGB) with the predictor's current settings."""
    dev = predictor.device
    lb = predictor.letterbox(*image.shape[:2])
    staging = torch.empty(image.size, dtype=torch.uint8, pin_memory=True)
    staging.numpy()[:] = image.reshape(-1)
    dev_in = torch.empty(image.size, dtype=torch.uint8, device=dev)
    dev_in.copy_(staging)
    image_hw = torch.tensor([lb.resized_size], dtype=torch.long, device=dev)
    stages = _stage_functions(predictor, lb, dev_in, image_hw)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    graphs = []
    with torch.inference_mode():
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: Triton compiles, cuDNN plans, cached taps
                x = None
                for _, fn in stages:
                    x = fn(x)
        torch.cuda.current_stream(dev).wait_stream(side)
        x = None
        for _, fn in stages:  # each graph's outputs stay alive as the next one's inputs
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=side):
                x = fn(x)
            graphs.append(g)
    dev_map, dev_table = x
    host_map = torch.empty(dev_map.shape, dtype=dev_map.dtype, pin_memory=True)
    host_table = torch.empty(dev_table.shape, dtype=dev_table.dtype, pin_memory=True)
    stream = torch.cuda.current_stream(dev)
    rows: dict[str, list[float]] = {k: [] for k in GRAPH_STAGES}
    for _ in range(repeats):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(GRAPH_STAGES) + 1)]
        events[0].record(stream)
        dev_in.copy_(staging, non_blocking=True)
        for g, ev in zip(graphs, events[1:]):
            g.replay()
            ev.record(stream)
        host_map.copy_(dev_map, non_blocking=True)
        host_table.copy_(dev_table, non_blocking=True)
        events[-1].record(stream)
        stream.synchronize()
        for k, (a, b) in zip(GRAPH_STAGES, zip(events, events[1:])):
            rows[k].append(a.elapsed_time(b))
    return {k: float(np.median(v)) for k, v in rows.items()}
