"""The torchvision peers of ``ciae-bench`` (FCOS, Mask R-CNN) and how they are run.

* :func:`build_peer` — ``torchvision.models.detection.FCOS`` / ``MaskRCNN`` with the same backbone
  as ours (``fcos_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` for r50), random weights, score
  threshold 0 and a fixed cap of detections (the bench's module docstring says why).
* :class:`GraphedFCOS` — FCOS's inference split as torchvision's ``FCOS.forward`` does it:
  transform (normalise, resize, batch), backbone + head, anchors, post-processing (per-level
  top-k, class-wise NMS), boxes back to the input size. Backbone + head have no data-dependent
  control flow, so on CUDA they are replayed from a CUDA graph per input batch shape (captured on
  the second sighting of a shape, after three warm-up runs, as ours' forward is); the rest runs
  eagerly (the transform builds its mean/std tensors from Python lists and NMS synchronises with
  the host, neither can be captured). Optionally ``torch.compile`` of backbone + head. Same
  precision (autocast) and memory format as ours.

Each row says how it was timed (:data:`FCOS_TIMING`, :data:`EAGER_PEER_TIMING`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch

from ciae_core.user_input import quote

logger = logging.getLogger(__name__)

FCOS_TIMING = ("wall time per call, synchronised at both ends: uint8 host image -> detections on the host; transform, "
               "anchors and post-processing (top-k, batched NMS) eager, backbone + head {how}")
EAGER_PEER_TIMING = "wall time per call, synchronised at both ends: uint8 host image -> detections on the host; eager"


def _tv_backbone(name: str, kind: str):
    """torchvision FPN backbone of ``name`` (resnet*/mobilenet_v3_large), random weights;
    ``kind="fcos"``: P3..P7 (P6/P7 from P5, as ``fcos_resnet50_fpn``), else P2..P6 (Mask R-CNN)."""
    from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    extra = LastLevelP6P7(256, 256) if kind == "fcos" else LastLevelMaxPool()
    if name.startswith("resnet"):
        layers = [2, 3, 4] if kind == "fcos" else [1, 2, 3, 4]
        return resnet_fpn_backbone(backbone_name=name, weights=None, trainable_layers=5, returned_layers=layers,
                                   extra_blocks=extra)
    # mobilenet stage outputs 1..4 have strides 4, 8, 16, 32: FCOS takes 8..32 (+P6, P7), Mask R-CNN 4..32
    # (+pool), so both get the 5 maps their default anchor generators expect
    layers = [2, 3, 4] if kind == "fcos" else [1, 2, 3, 4]
    return mobilenet_backbone(backbone_name=name, weights=None, fpn=True, trainable_layers=6, returned_layers=layers,
                              extra_blocks=extra)


def build_peer(kind: str, backbone_name: str, size: int, max_size: int, detections: int) -> torch.nn.Module:
    """torchvision FCOS / Mask R-CNN with ``backbone_name``, score threshold 0, ``detections`` cap."""
    from torchvision.models import detection as det

    from ciae_core.bench import BenchError

    common = dict(min_size=size, max_size=max_size)
    if kind == "fcos":
        if backbone_name == "resnet50":
            m = det.fcos_resnet50_fpn(weights=None, weights_backbone=None, score_thresh=0.0,
                                      detections_per_img=detections, **common)
        else:
            m = det.FCOS(_tv_backbone(backbone_name, "fcos"), num_classes=91, score_thresh=0.0,
                         detections_per_img=detections, **common)
    elif kind == "maskrcnn":
        kw = dict(box_score_thresh=0.0, box_detections_per_img=detections, **common)
        if backbone_name == "resnet50":
            m = det.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kw)
        else:
            m = det.MaskRCNN(_tv_backbone(backbone_name, "rcnn"), num_classes=91, **kw)
    else:
        raise BenchError(f"unknown peer model {quote(kind)}")
    return m.eval()


class GraphedFCOS:
    """Inference of a torchvision ``FCOS`` (eval mode) with backbone + head as one replayable unit
    (module docstring). ``__call__(images)``: a list of ``(3, H, W)`` float 0..1 tensors → a list
    of ``boxes, scores, labels`` dicts, as ``model(images)``.

    ``cuda_graphs``: on CUDA, one graph per batch shape (at most ``max_graphs``, least recently
    used dropped; a failed capture falls back to eager with a warning). ``compile``:
    ``torch.compile(dynamic=True)`` of backbone + head. ``channels_last``: the batch is passed in
    that memory format (convert the model's weights before)."""

    def __init__(self, model: torch.nn.Module, cuda_graphs: bool = False, compile: bool = False,
                 channels_last: bool = False, max_graphs: int = 4):
        self.model = model
        self.channels_last = channels_last
        self.compiled = bool(compile)
        self._trunk: Callable = self._backbone_and_head
        if compile:
            self._trunk = torch.compile(self._backbone_and_head, dynamic=True)
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, tuple] = {}
        self._seen: set[tuple] = set()

    @property
    def timing(self) -> str:
        how = "replayed from a CUDA graph per input shape" if self.cuda_graphs else "eager"
        if self.compiled:
            how += " (torch.compile)"
        return FCOS_TIMING.format(how=how)

    def _backbone_and_head(self, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        feats = self.model.backbone(x)
        if isinstance(feats, torch.Tensor):
            feats = {"0": feats}
        feats = list(feats.values())
        return feats, self.model.head(feats)

    def _capture(self, x: torch.Tensor):
        """Three warm-up runs on a side stream, then the capture; None (and eager from now on) on failure."""
        caller = torch.cuda.current_stream(x.device)
        try:
            static_in = x.clone()
            side = torch.cuda.Stream(x.device)
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._trunk(static_in)
            caller.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                static_out = self._trunk(static_in)
        except Exception as e:  # noqa: BLE001 - the peer then runs eagerly, and its row says so
            torch.cuda.set_stream(caller)
            logger.warning("FCOS backbone+head capture failed (%s: %s); running it eagerly", type(e).__name__, e)
            self.cuda_graphs = False
            self._graphs.clear()
            return None
        if len(self._graphs) >= self.max_graphs:
            self._graphs.pop(next(iter(self._graphs)))
        self._graphs[tuple(x.shape)] = (graph, static_in, static_out)
        return self._graphs[tuple(x.shape)]

    def _trunk_outputs(self, x: torch.Tensor):
        if not (self.cuda_graphs and x.is_cuda):
            return self._trunk(x)
        key = tuple(x.shape)
        entry = self._graphs.pop(key, None)
        if entry is None:
            if key not in self._seen:  # first sighting: eager (as ours)
                self._seen.add(key)
                return self._trunk(x)
            entry = self._capture(x)
            if entry is None:
                return self._trunk(x)
        self._graphs[key] = entry
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out  # read by the post-processing below before the next replay

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        m = self.model
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        batch, _ = m.transform(images)
        x = batch.tensors
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats, head_out = self._trunk_outputs(x)
        anchors = m.anchor_generator(batch, feats)
        per_level = [f.size(2) * f.size(3) for f in feats]
        split_out = {k: list(v.split(per_level, dim=1)) for k, v in head_out.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        detections = m.postprocess_detections(split_out, split_anchors, batch.image_sizes)
        return m.transform.postprocess(detections, batch.image_sizes, original_sizes)


def peer_info(forward) -> dict[str, Any]:
    """How a peer's calls ran (its row's ``timing``, ``cuda_graphs``, ``compile``), read after its
    calls: a failed capture has switched :class:`GraphedFCOS` to eager by then."""
    if isinstance(forward, GraphedFCOS):
        return {"timing": forward.timing, "cuda_graphs": "backbone+head" if forward.cuda_graphs else "off",
                "compile": forward.compiled}
    return {"timing": EAGER_PEER_TIMING, "cuda_graphs": "off", "compile": False}


def peer_runner(kind: str, backbone_name: str, size: int, device: torch.device, *, max_size: int, detections: int,
                precision: str, channels_last: bool, cuda_graphs: bool,
                compile: bool) -> tuple[Callable, torch.nn.Module, Any]:
    """``run(image)``: uint8 ``(H, W, 3)`` host image → detections on the host, with the peer
    ``kind`` on ``device`` in ``precision`` (autocast on CUDA) and the memory format of ours;
    FCOS through :class:`GraphedFCOS`, Mask R-CNN eagerly. Returns ``run``, the model and what
    runs it (for :func:`peer_info`)."""
    model = build_peer(kind, backbone_name, size, max_size, detections).to(device)
    if channels_last:  # the same memory format as ours (fair ratios)
        model = model.to(memory_format=torch.channels_last)
    use_amp = device.type == "cuda" and precision in ("fp16", "bf16")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    forward: Any = model
    if kind == "fcos":
        forward = GraphedFCOS(model, cuda_graphs=cuda_graphs and device.type == "cuda", compile=compile,
                              channels_last=channels_last)

    def run(im) -> list[dict[str, torch.Tensor]]:
        # same input contract as ours: uint8 host image in, results on the host out
        x = torch.from_numpy(im).to(device, non_blocking=True).permute(2, 0, 1).float().div_(255.0)
        ctx = torch.autocast("cuda", dtype=dtype) if use_amp else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            out = forward([x])
        return [{k: v.cpu() for k, v in o.items()} for o in out]

    return run, model, forward
