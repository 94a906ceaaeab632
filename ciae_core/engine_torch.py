"""The PyTorch engine of the :class:`~ciae_core.predictor.Predictor`: ``CIAE.forward_raw`` as it runs.

Decisions (set by the predictor's constructor arguments):

* **CUDA path**: cudnn.benchmark (set by the predictor), one CUDA graph per input shape replayed
  for the forward pass (``cuda_graphs``; the eager R50 forward is launch-bound on an H100),
  optional fp16/bf16 autocast (the raw outputs are cast back to fp32 before fusion), optional
  channels_last (off by default on CUDA: no gain measured on an H100 for these GroupNorm heads).
  Optional ``torch.compile(forward_raw, dynamic=True)`` (``compile=True``).
* **Memory format on the CPU**: channels_last by default (the predictor's ``channels_last=None``):
  oneDNN's NHWC convolutions made the whole call 10-31 % faster on the 2-core development machine
  (end to end, NCHW → channels_last: small model 96 → 66 ms at 320 and 180 → 148 ms at 512;
  random-weight R50 1278 → 1155 ms at 512 and 3459 → 3078 ms at 800), with identical id maps on
  the shipped model's scenes and the COCO sample. ``channels_last=False`` restores NCHW.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class _TorchEngine:
    """``CIAE.forward_raw`` in PyTorch, fp32 outputs, frozen BN folded into the convolutions
    (:func:`ciae_core.model.fold_frozen_batchnorm`; the engine owns its model copy).

    On CUDA with ``cuda_graphs`` the forward pass of each input shape is captured once into a
    CUDA graph (after 3 eager warm-up runs that also let cuDNN pick its algorithms) and replayed:
    ``forward_raw`` has no data-dependent control flow, and at camera rates the eager forward is
    bound by kernel-launch overhead (an R50 forward launches ~700 kernels). Up to
    ``max_graphs`` shapes are kept (least recently used dropped); a capture failure falls back
    to eager execution with a warning. Outputs are copied out of the graph's static buffers.
    Decision: a shape is captured the second time it is seen, not the first: a capture costs
    three warm-up runs, a device sync and an ``empty_cache``, which a folder of differently sized
    photos (``ciae-predict``) would pay on every image, while a camera repeats its shape at once.
    """

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str, channels_last: bool,
                 compile: bool, cuda_graphs: bool = False, max_graphs: int = 4):
        from ciae_core.model import fold_frozen_batchnorm

        self.model = model.eval().to(device)
        # frozen BN is affine: folded into its conv (same outputs to float rounding; onnxruntime
        # does the same to the exported graph)
        folded = fold_frozen_batchnorm(self.model)
        if folded:
            logger.debug("folded %d frozen BatchNorm layers into their convolutions", folded)
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._fn = self.model.forward_raw
        if compile:
            self._fn = torch.compile(self.model.forward_raw, dynamic=True)
        self.cuda_graphs = bool(cuda_graphs) and device.type == "cuda"
        self.max_graphs = int(max_graphs)
        self._graphs: dict[tuple, tuple] = {}
        self._seen: dict[tuple, None] = {}  # shapes run once (an ordered set, the last 64)
        self.providers: list[str] = []

    def _eager(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        with torch.inference_mode():
            if dtype is None:
                raw = self._fn(images)
            else:
                with torch.autocast(self.device.type, dtype=dtype):
                    raw = self._fn(images)
            return {k: v.float() for k, v in raw.items()}

    def _capture(self, images: torch.Tensor):
        caller_stream = torch.cuda.current_stream(self.device)
        try:
            static_in = images.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._eager(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # captured on our side stream of self.device (torch's default capture stream would
            # belong to the thread's current device)
            with torch.cuda.graph(graph, stream=side):
                static_out = self._eager(static_in)
        except Exception as e:  # noqa: BLE001 - any capture problem: run eagerly instead
            # a capture that fails in capture_end leaves the capture stream current (torch's
            # graph context skips restoring it): go back to the caller's stream
            torch.cuda.set_stream(caller_stream)
            logger.warning("CUDA graph capture failed (%s: %s); running the forward pass eagerly",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.cuda_graphs = False
            self._graphs.clear()
            return None
        if len(self._graphs) >= self.max_graphs:
            self._graphs.pop(next(iter(self._graphs)))
        entry = (graph, static_in, static_out)
        self._graphs[tuple(images.shape)] = entry
        return entry

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if not self.cuda_graphs:
            return self._eager(images)
        key = tuple(images.shape)
        entry = self._graphs.pop(key, None)
        if entry is None:
            if key not in self._seen:  # first sighting: eager (see the class docstring)
                self._seen[key] = None
                while len(self._seen) > 64:
                    self._seen.pop(next(iter(self._seen)))
                return self._eager(images)
            entry = self._capture(images)
            if entry is None:
                return self._eager(images)
        self._graphs[key] = entry  # most recently used last
        graph, static_in, static_out = entry
        static_in.copy_(images)
        graph.replay()
        return {k: v.clone() for k, v in static_out.items()}
