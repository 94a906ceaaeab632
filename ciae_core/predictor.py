"""ROS-free inference: the ``Predictor`` facade over the torch and onnxruntime engines.

Pipeline of one call (docs/DESIGN.md, "Data flow")::

    HxWx3 uint8 (RGB or BGR) ─ letterbox: shorter side → input_size, longer side ≤ max_size,
      zero (black) pad bottom/right to a multiple of ``stride`` (32), the training batch format
    → engine.forward_raw  (torch: CIAE.forward_raw; onnxruntime: the exported graph of it)
    → ciae_core.fusion.panoptic_from_raw  (proposal selection + Eq. 16 fusion, same torch code
      for both engines, on the GPU when device="cuda")
    → map back to the input resolution, recompute areas/boxes → one device→host copy
    → PanopticResult per image

Decisions (all constructor arguments):

* **Resize geometry** is the one used in training (:mod:`ciae_core.geometry`: shorter side →
  ``input_size``, longer side ≤ ``max_size``, interpolation as cv2's ``INTER_AREA``/``INTER_LINEAR``
  on CPU and GPU alike); images too small (``min_image_side``) or too elongated for ``stride`` are
  rejected with :class:`PredictorError`.
* **Map back**: fusion runs at the *resized* resolution (where the network saw the image); the id
  map (and the optional confidence) is mapped to the input resolution with pixel-centre
  nearest-neighbour sampling (source index ``floor((i + 0.5) * resized / input)``, the geometry
  of :func:`ciae_core.data.resize_id_map`). Areas and boxes are then recomputed from the mapped
  id map, so ``segment.area`` equals the segment's pixel count in ``result.id_map``; segments
  that vanish in the mapping (sub-pixel slivers when up-/down-scaling) are dropped. Fusing at the
  input resolution instead would cost ``1/scale^2`` more similarity work for no new information.
* **Thresholds** are in network-input pixels (``min_stuff_area`` is interpreted by the fusion
  relative to ``stuff_area_reference``); defaults come from the model config
  (:class:`ciae_core.model.CIAEConfig`); :meth:`Predictor.update` changes them between calls.
* **Input size**: default 640 for ResNet-50/101 models and 320 for the small backbones
  (resnet18/34, mobilenet_v3_large); the valid range is [512, 800] for the large backbones (the
  paper's operating points) and [192, 800] for the small ones; ``input_size_range`` overrides it.
* **Batches**: a list of N images is letterboxed image by image; images with the same padded size
  (e.g. several identical cameras) run as one forward pass. Images of different padded sizes run
  as one forward per size by default (``mixed_size_batching="group"``), because padding an image
  further changes the GroupNorm statistics of the heads and so its result (with random weights up
  to a quarter of the pixels): a result must not depend on which other images share the batch.
  ``mixed_size_batching="pad"`` pads all to the largest padded size and runs one forward.
* **CUDA path** (torch engine): cudnn.benchmark, one CUDA graph per input shape replayed for the
  forward pass (``cuda_graphs``; the eager R50 forward is launch-bound on an H100), optional
  fp16/bf16 autocast (the raw outputs are cast back to fp32 before fusion), optional
  channels_last (off by default on CUDA: no gain measured on an H100 for these GroupNorm heads), uint8
  upload from a pinned staging buffer with an async copy, resize on the GPU, fusion and map-back
  on the GPU, then one device→host copy of all final id maps (plus one for the small segment
  table). Optional ``torch.compile(forward_raw, dynamic=True)`` (``compile=True``).
* **Memory format on the CPU** (torch engine): channels_last by default (``channels_last=None``):
  oneDNN's NHWC convolutions made the whole call 10-31 % faster on the 2-core development machine
  (end to end, NCHW → channels_last: small model 96 → 66 ms at 320 and 180 → 148 ms at 512;
  random-weight R50 1278 → 1155 ms at 512 and 3459 → 3078 ms at 800), with identical id maps on
  the shipped model's scenes and the COCO sample. ``channels_last=False`` restores NCHW.
* **onnxruntime engine**: ``weights`` may be a ``.onnx`` written by ``ciae-export`` (its
  metadata carries the model config) or a ``.safetensors`` checkpoint, which is exported on the fly
  (dynamic batch/height/width) to ``<onnx_cache_dir>/<stem>-<sha256[:16]>-opset<N>.onnx``;
  ``onnx_cache_dir`` defaults to ``$CIAE_CACHE_DIR/onnx`` or ``~/.cache/ciae/onnx``. The cached
  file is reused while the checkpoint's hash matches. Providers: TensorRT → CUDA → CPU (the ones
  this onnxruntime build offers; TensorRT only when its runtime loads) for device="cuda", CPU for
  device="cpu"; ``trt_cache_dir`` (default ``$CIAE_CACHE_DIR/tensorrt``, engines and timing cache
  kept across restarts) and ``trt_fp16`` configure TensorRT; a chosen GPU provider that does not
  start is an error, not a silent CPU run; full graph optimisation; thread counts settable. A
  fixed-shape file (``ciae-export --size HxW [--batch-size N]``) is served by fitting each image
  into its ``HxW`` canvas (:func:`letterbox_into`; ``input_size`` and ``max_size`` do not apply) and running
  batches in chunks of ``N``.

Timings (``predictor.timings``, milliseconds of the last call): ``preprocess``, ``forward``,
``postprocess`` (proposal selection + fusion), ``map_back`` (resize to input resolution +
segment table) and ``to_host``; their sum is the call's total. On CUDA they are measured with
CUDA events.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

# the inference error and the geometry keep their old import path ciae_core.predictor (re-exported)
from ciae_core.geometry import (MIN_IMAGE_SIDE, Letterbox, area_resize_weights, letterbox, letterbox_into,
                                nearest_source_index, resize_image_like_cv2, resize_nearest, segment_table,
                                validate_image)
from ciae_core.predictor_error import PredictorError
from ciae_core.structures import CategoryInfo, PanopticResult, Segment

logger = logging.getLogger(__name__)

THRESHOLD_NAMES = ("score_threshold", "pre_nms_topk", "nms_threshold", "detections_per_img",
                   "instance_score_threshold", "min_stuff_area", "stuff_area_reference", "min_visible_fraction",
                   "min_instance_area", "outside_box_value")
_UNIT_INTERVAL = ("score_threshold", "nms_threshold", "instance_score_threshold", "min_visible_fraction")
# accepted alternative spellings (the ROS node's parameter names)
THRESHOLD_ALIASES = {"stuff_area_min": "min_stuff_area"}
_POSITIVE_INT = ("pre_nms_topk", "detections_per_img", "stuff_area_reference")
_NON_NEGATIVE_INT = ("min_stuff_area", "min_instance_area")
SMALL_BACKBONES = ("resnet18", "resnet34", "mobilenet_v3_large")
ENGINES = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "fp16", "bf16")
RAW_OUTPUT_NAMES = ("cls_logits", "box_regression", "centerness", "points", "embedding", "memory")


def _checked_thresholds(current: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``current`` updated with ``changes`` (names or :data:`THRESHOLD_ALIASES`), each value checked;
    :class:`PredictorError` (one line) on an unknown name or a bad value."""
    changes = {THRESHOLD_ALIASES.get(k, k): v for k, v in changes.items()}
    unknown = sorted(set(changes) - set(THRESHOLD_NAMES))
    if unknown:
        raise PredictorError(f"unknown threshold(s) {', '.join(unknown)}; valid: {', '.join(THRESHOLD_NAMES)}")
    new = dict(current)
    for k, v in changes.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise PredictorError(f"{k} must be a finite number, got {v!r}")
        if k in _UNIT_INTERVAL and not 0.0 <= v <= 1.0:
            raise PredictorError(f"{k} must be in [0, 1], got {v}")
        if k in _POSITIVE_INT and (int(v) != v or v < 1):
            raise PredictorError(f"{k} must be a positive integer, got {v}")
        if k in _NON_NEGATIVE_INT and (int(v) != v or v < 0):
            raise PredictorError(f"{k} must be a non-negative integer, got {v}")
        new[k] = int(v) if k in _POSITIVE_INT + _NON_NEGATIVE_INT else float(v)
    return new


# ----------------------------------------------------------------------------------------------
# input-size policy


def default_input_size(backbone: str) -> int:
    """640 for ResNet-50/101 models (between the paper's 512 and 800 points), 320 for the small
    backbones (the shipped MobileNetV3 model, trained at 224-288, scores PQ 85.3 at 320 against
    82.9 at 256 on its held-out scenes, models/README.md: small things gain from the upscale)."""
    return 320 if backbone in SMALL_BACKBONES else 640


def input_size_range(backbone: str) -> tuple[int, int]:
    """Valid shorter-side sizes: the paper's [512, 800] for large backbones, [192, 800] for small."""
    return (192, 800) if backbone in SMALL_BACKBONES else (512, 800)


# ----------------------------------------------------------------------------------------------
# engines


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


def select_providers(device: str, available: Sequence[str], providers: Sequence[str] | None = None,
                     trt_cache_dir: str | None = None, trt_fp16: bool = False,
                     device_id: int = 0) -> list[tuple[str, dict]]:
    """onnxruntime execution providers with options, in priority order.

    device="cuda": TensorRT → CUDA → CPU (those in ``available``); device="cpu": CPU only.
    ``providers`` (short names "tensorrt", "cuda", "cpu" or full provider names; one string or a
    sequence) restricts and orders the choice; asking for one this build lacks raises
    :class:`PredictorError`.

    Decision: by default TensorRT is offered only when its runtime library can be loaded
    (:func:`tensorrt_runtime_loadable`). onnxruntime-gpu lists the TensorRT provider whenever it
    was built with it, and without ``libnvinfer`` the session fails and falls back to CUDA
    without the provider options (so ``device_id`` would be lost). Asked for explicitly, it is
    always tried, and a failure is an error.
    """
    full = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
    if providers is None:
        wanted = ["tensorrt", "cuda", "cpu"] if device == "cuda" else ["cpu"]
        chosen = [full[p] for p in wanted if full[p] in available
                  and (p != "tensorrt" or tensorrt_runtime_loadable())]
    else:
        if isinstance(providers, str):
            providers = [providers]
        chosen = []
        for p in providers:
            name = full.get(str(p).lower(), str(p))
            if name not in available:
                raise PredictorError(f"onnxruntime provider {p!r} is not available in this onnxruntime build "
                                     f"(available: {', '.join(available)})")
            if device == "cpu" and name != "CPUExecutionProvider":
                raise PredictorError(f"onnxruntime provider {p!r} needs device='cuda'")
            chosen.append(name)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    out = []
    for name in chosen:
        opts: dict = {}
        if name == "TensorrtExecutionProvider":
            opts = {"device_id": device_id, "trt_fp16_enable": bool(trt_fp16)}
            if trt_cache_dir:
                opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache_dir),
                            trt_timing_cache_enable=True, trt_timing_cache_path=str(trt_cache_dir))
        elif name == "CUDAExecutionProvider":
            opts = {"device_id": device_id}
        out.append((name, opts))
    return out


def tensorrt_runtime_loadable() -> bool:
    """Whether the TensorRT runtime library (``libnvinfer``, major version 8..10) can be loaded."""
    import ctypes

    names = [f"libnvinfer.so.{v}" for v in (10, 9, 8)] + [f"nvinfer_{v}.dll" for v in (10, 9, 8)] + ["nvinfer.dll"]
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


class _OrtEngine:
    """An onnxruntime session over an exported ``forward_raw`` graph; returns torch tensors.

    On CUDA the input is bound straight from the torch tensor and the outputs are written into
    torch tensors (IO binding; output shapes are learnt on the first run of each input shape),
    so nothing goes through the host.

    A fixed-shape export (``ciae-export --size``) is served too: ``fixed_hw`` is its ``(H, W)``
    (the predictor letterboxes into it, :func:`letterbox_into`), and a batch of another size
    than its fixed N runs in chunks of N, the last one padded with black images whose outputs
    are dropped (GroupNorm is per image, so they change nothing).

    A GPU provider that was chosen but does not start (missing CUDA/cuDNN/TensorRT libraries:
    onnxruntime then only warns and runs on the CPU) raises :class:`PredictorError`, as does a
    failing provider (no silent fallback, ``enable_fallback=0``): a robot should not run 10x
    slower without being told.

    On the CPU provider its intra-op threads do not spin-wait after a run
    (``session.intra_op.allow_spinning = 0``): the torch fusion that follows runs on the same
    cores, and spinning threads had made it 6x slower (8 -> 45 ms on the 2-core machine). (A
    session per input shape with the dynamic axes fixed was measured too: no difference to the
    dynamic session once nothing spins, so there is one session.)
    """

    name = "onnxruntime"

    def __init__(self, path: str, device: torch.device, providers: Sequence[str] | None = None,
                 trt_cache_dir: str | None = None, trt_fp16: bool = False, intra_op_threads: int | None = None,
                 inter_op_threads: int | None = None):
        import onnxruntime as ort

        from ciae_core.export import ExportError, read_onnx_config

        try:
            self.config = read_onnx_config(path)
        except ExportError as e:
            raise PredictorError(str(e)) from None
        self.device = device
        self.path = path
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for name, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 0):
                raise PredictorError(f"{name} must be a non-negative integer (0: onnxruntime's default), got {value!r}")
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads:
            opts.inter_op_num_threads = int(inter_op_threads)
        opts.log_severity_level = 3
        # TensorRT builds an engine per input shape range (minutes for an R50): keep them on disk so a
        # restarted node does not build again (default: beside the ONNX cache; created only if used)
        trt_cache_dir = str(trt_cache_dir or default_onnx_cache_dir().parent / "tensorrt")
        chosen = select_providers(device.type, ort.get_available_providers(), providers, trt_cache_dir, trt_fp16,
                                  device.index or 0)
        if chosen[0][0] == "TensorrtExecutionProvider":
            try:
                os.makedirs(trt_cache_dir, exist_ok=True)
            except OSError as e:
                raise PredictorError(f"cannot create the TensorRT cache {trt_cache_dir}: {e.strerror}; set "
                                     f"trt_cache_dir") from None
        if chosen[0][0] == "CPUExecutionProvider":  # leave the cores to the fusion after a run (docstring)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(path, sess_options=opts, providers=[n for n, _ in chosen],
                                                provider_options=[o for _, o in chosen], enable_fallback=0)
        except Exception as e:  # noqa: BLE001 - any session failure is a bad/unsupported file or provider
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PredictorError(f"onnxruntime cannot load {path} with {[n for n, _ in chosen]}: {msg}") from None
        self.providers = self.session.get_providers()
        missing = [n for n, _ in chosen if n not in self.providers]
        if missing:
            raise PredictorError(f"onnxruntime could not start {', '.join(missing)} (running would fall back to "
                                 f"{self.providers}): check that its CUDA, cuDNN and TensorRT libraries match this "
                                 f"onnxruntime-gpu build, or choose other providers / engine='torch'")
        if device.type == "cuda" and self.providers[0] == "CPUExecutionProvider":
            raise PredictorError("device='cuda' but this onnxruntime build has no GPU provider (available: "
                                 f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu, use "
                                 "engine='torch', or device='cpu'")
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != ["images"] or sorted(outputs) != sorted(RAW_OUTPUT_NAMES):
            raise PredictorError(f"{path} is not a ciae forward_raw export: inputs {inputs}, outputs {outputs} "
                                 f"(expected ['images'] and {list(RAW_OUTPUT_NAMES)}); re-export with ciae-export")
        self.output_names = outputs
        shapes = {o.name: o.shape for o in self.session.get_outputs()}
        t = self.config.num_things
        d = self.config.embed_dim
        mem = shapes["memory"]
        cls_t = shapes["cls_logits"][-1]
        if (isinstance(cls_t, int) and cls_t != t) or (all(isinstance(v, int) for v in mem)
                                                       and tuple(mem) != (len(self.config.categories), d)):
            raise PredictorError(f"{path}: graph outputs (cls_logits {shapes['cls_logits']}, memory {mem}) do not match "
                                 f"its metadata config ({t} thing classes, {len(self.config.categories)} categories, "
                                 f"embed_dim {d}); re-export with ciae-export")
        self._on_cuda = device.type == "cuda"
        self._out_shapes: dict[tuple, list] = {}
        in_shape = list(self.session.get_inputs()[0].shape)
        fixed = [isinstance(v, int) and v > 0 for v in in_shape]
        if len(in_shape) != 4 or (fixed[2] != fixed[3]):
            raise PredictorError(f"{path}: input shape {in_shape} is not (N, 3, H, W) with both H and W fixed or both "
                                 f"dynamic; re-export with ciae-export")
        self.fixed_batch: int | None = int(in_shape[0]) if fixed[0] else None
        self.fixed_hw: tuple[int, int] | None = (int(in_shape[2]), int(in_shape[3])) if fixed[2] else None

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n, fb = images.shape[0], self.fixed_batch
        if fb is None or n == fb:
            return self._run(images)
        chunks = []
        for start in range(0, n, fb):
            part = images[start:start + fb]
            if part.shape[0] < fb:
                part = torch.cat([part, part.new_zeros((fb - part.shape[0], *part.shape[1:]))])
            chunks.append(self._run(part))
        per_image = ("cls_logits", "box_regression", "centerness", "embedding")
        return {k: torch.cat([c[k] for c in chunks])[:n] if k in per_image else chunks[0][k] for k in chunks[0]}

    def _run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self._run_session(images)
        h, w = images.shape[-2:]
        s, d = self.config.branch_stride, self.config.embed_dim
        want = (images.shape[0], d, -(-h // s), -(-w // s))
        if tuple(out["embedding"].shape) != want:
            raise PredictorError(f"{self.path}: the graph's embedding output {tuple(out['embedding'].shape)} does not "
                                 f"match its metadata config (embed_dim {d}, stride {s}: {want} for a {h}x{w} "
                                 f"input); the file was edited or mixed up, re-export it with ciae-export")
        return out

    def _run_session(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.float().contiguous()
        if not self._on_cuda:
            outs = self.session.run(self.output_names, {"images": images.cpu().numpy()})
            return {k: torch.from_numpy(v).to(self.device) for k, v in zip(self.output_names, outs)}
        torch.cuda.current_stream(self.device).synchronize()
        dev_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        binding = self.session.io_binding()
        binding.bind_input("images", "cuda", dev_id, np.float32, list(images.shape), images.data_ptr())
        key = tuple(images.shape)
        shapes = self._out_shapes.get(key)
        if shapes is None:
            for name in self.output_names:
                binding.bind_output(name, "cuda", dev_id)
            self.session.run_with_iobinding(binding)
            vals = binding.copy_outputs_to_cpu()
            self._out_shapes[key] = [v.shape for v in vals]
            return {k: torch.from_numpy(v).to(self.device) for k, v in zip(self.output_names, vals)}
        result = {}
        for name, shape in zip(self.output_names, shapes):
            t = torch.empty(shape, dtype=torch.float32, device=self.device)
            binding.bind_output(name, "cuda", dev_id, np.float32, list(shape), t.data_ptr())
            result[name] = t
        self.session.run_with_iobinding(binding)
        return result


# ----------------------------------------------------------------------------------------------
# timing


class _StageClock:
    """Stage timestamps: CUDA events on a GPU (no extra syncs), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def durations_ms(self) -> dict[str, float]:
        """Milliseconds per stage name, summed over repeats ("start" marks open a new span).
        Call after the last mark (and, on CUDA, after a synchronise)."""
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            if name != "start":
                out[name] = out.get(name, 0.0) + (a.elapsed_time(b) if self.cuda else (b - a) * 1e3)
        return out


# ----------------------------------------------------------------------------------------------
# the predictor


def _file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def default_onnx_cache_dir() -> pathlib.Path:
    """``$CIAE_CACHE_DIR/onnx`` or ``~/.cache/ciae/onnx``."""
    base = os.environ.get("CIAE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ciae")
    return pathlib.Path(base) / "onnx"


class Predictor:
    """Panoptic segmentation of HxWx3 uint8 images with a CIAE model (see the module docstring).

    Args:
        weights: ``.safetensors`` checkpoint (``ciae_core.checkpoint.save_model``) or, for
            ``engine="onnxruntime"``, a ``.onnx`` from ``ciae-export``.
        engine: "torch" or "onnxruntime".
        device: "cpu", "cuda" or "cuda:N".
        input_size: shorter side fed to the network (None: :func:`default_input_size`).
        max_size: cap on the longer side after resizing.
        precision: "fp32", "fp16" (CUDA only) or "bf16" (torch engine autocast).
        channels_last: run the torch engine in channels_last. None (default): on for the CPU
            (10-31 % faster there, module docstring), off for CUDA (no gain on an H100).
        cudnn_benchmark: None → on for CUDA.
        cuda_graphs: None → on for CUDA (torch engine): one CUDA graph per input shape.
        compile: wrap ``forward_raw`` in ``torch.compile`` (torch engine; disables cuda_graphs).
        input_size_range: ``(lo, hi)`` valid shorter sides (None: :func:`input_size_range`).
        providers, trt_cache_dir, trt_fp16, intra_op_threads, inter_op_threads: onnxruntime.
        onnx_cache_dir, onnx_opset: on-the-fly export of a ``.safetensors`` for onnxruntime.
        mixed_size_batching: "group" (one forward per distinct padded size: exact, results do
            not depend on the other images) or "pad" (one forward for the whole list).
        fusion_method: ``ciae_core.fusion.fuse_panoptic``'s method ("auto": the compiled numba
            kernels when fusing on the CPU and numba is installed, else the tensor paths; they
            give the same results). On the CPU the kernels are compiled (or loaded from numba's
            cache) here, not on the first frame.
        **thresholds: any of ``THRESHOLD_NAMES`` (defaults: the model config).
    """

    def __init__(self, weights: str | os.PathLike, engine: str = "torch", device: str = "cpu",
                 input_size: int | None = None, max_size: int = 1333, stride: int = 32, precision: str = "fp32",
                 channels_last: bool | None = None, cudnn_benchmark: bool | None = None, compile: bool = False,
                 input_size_range: tuple[int, int] | None = None, min_image_side: int = MIN_IMAGE_SIDE,
                 providers: Sequence[str] | None = None, trt_cache_dir: str | None = None, trt_fp16: bool = False,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 onnx_cache_dir: str | os.PathLike | None = None, onnx_opset: int | None = None,
                 mixed_size_batching: str = "group", cuda_graphs: bool | None = None, fusion_method: str = "auto",
                 **thresholds):
        if engine not in ENGINES:
            raise PredictorError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if precision not in PRECISIONS:
            raise PredictorError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.device = self._resolve_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise PredictorError("precision='fp16' needs device='cuda'; use 'fp32' or 'bf16' on the CPU")
        if precision != "fp32" and engine != "torch":
            raise PredictorError(f"precision={precision!r} applies to the torch engine; for onnxruntime use "
                                 f"trt_fp16=True (TensorRT) or precision='fp32'")
        weights = os.fspath(weights)
        if not os.path.exists(weights):
            raise PredictorError(f"weights file not found: {weights}")
        if os.path.isdir(weights):
            cand = os.path.join(weights, "model.safetensors")
            if not os.path.isfile(cand):
                raise PredictorError(f"weights path {weights} is a directory without model.safetensors")
            weights = cand
        if mixed_size_batching not in ("group", "pad"):
            raise PredictorError(f"mixed_size_batching must be 'group' or 'pad', got {mixed_size_batching!r}")
        self.mixed_size_batching = mixed_size_batching
        from ciae_core.fusion import FUSION_METHODS, compile_fusion_kernels

        if fusion_method not in FUSION_METHODS:
            raise PredictorError(f"unknown fusion_method {fusion_method!r}; choose one of {', '.join(FUSION_METHODS)}")
        if fusion_method == "numba" and self.device.type != "cpu":
            raise PredictorError("fusion_method='numba' runs on the CPU; use 'auto' (or 'coarse_to_fine') on CUDA")
        self.fusion_method = fusion_method
        self.weights = weights
        self.engine_name = engine
        self.precision = precision
        for name, value, low in (("stride", stride, 1), ("min_image_side", min_image_side, 1), ("max_size", max_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise PredictorError(f"{name} must be a positive integer, got {value!r}")
        if stride % 32:
            raise PredictorError(f"stride must be a multiple of 32 (the network's coarsest pyramid level P5), got {stride}")
        self.stride = int(stride)
        self.min_image_side = int(min_image_side)
        self.max_size = int(max_size)
        if input_size_range is not None:
            try:
                lo, hi = (int(v) for v in input_size_range)
                if not 0 < lo <= hi or any(isinstance(v, bool) or int(v) != v for v in input_size_range):
                    raise ValueError
            except (TypeError, ValueError):
                raise PredictorError(f"input_size_range must be two integers (low, high) with 0 < low <= high, got "
                                     f"{input_size_range!r}") from None
        is_onnx = weights.lower().endswith(".onnx")
        if engine == "torch":
            if is_onnx:
                raise PredictorError(f"{weights} is an ONNX file; use engine='onnxruntime' or a .safetensors checkpoint")
            model = self._load_torch_model(weights)
            self.config = model.config
            cuda = self.device.type == "cuda"
            if cudnn_benchmark if cudnn_benchmark is not None else cuda:
                torch.backends.cudnn.benchmark = True
            self._engine = _TorchEngine(model, self.device, precision,
                                        channels_last if channels_last is not None else not cuda, compile,
                                        cuda_graphs=(cuda_graphs if cuda_graphs is not None else cuda) and not compile)
        else:
            onnx_path = weights if is_onnx else self._onnx_for_checkpoint(weights, onnx_cache_dir, onnx_opset)
            self.onnx_path = onnx_path
            self._engine = _OrtEngine(onnx_path, self.device, providers, trt_cache_dir, trt_fp16,
                                      intra_op_threads, inter_op_threads)
            self.config = self._engine.config
        self.categories: list[CategoryInfo] = list(self.config.categories)
        self.num_things = self.config.num_things
        self.fixed_input_hw: tuple[int, int] | None = getattr(self._engine, "fixed_hw", None)
        if self.fixed_input_hw is not None:
            fh, fw = self.fixed_input_hw
            if input_size is not None or input_size_range is not None:
                raise PredictorError(f"{weights} is a fixed {fh}x{fw} export: images are fitted into {fh}x{fw} and "
                                     f"input_size does not apply; leave it unset or re-export with --dynamic")
            self.input_size_range = (min(fh, fw), min(fh, fw))
            self.input_size = min(fh, fw)
        else:
            self.input_size_range = (tuple(int(v) for v in input_size_range) if input_size_range
                                     else input_size_range_for(self.config))
            self.input_size = self._check_input_size(input_size if input_size is not None
                                                     else default_input_size(self.config.backbone))
        try:
            self.thresholds = _checked_thresholds({}, {k: getattr(self.config, k) for k in THRESHOLD_NAMES})
        except PredictorError as e:
            raise PredictorError(f"{weights}: invalid inference setting in the model config: {e}") from None
        self.update(**thresholds)
        self.timings: dict[str, float] = {}
        self._pinned: list[torch.Tensor] = []
        self.model_name = pathlib.Path(weights).stem
        if self.device.type == "cpu" and fusion_method in ("auto", "numba"):
            if not compile_fusion_kernels() and fusion_method == "numba":
                raise PredictorError("fusion_method='numba' needs the numba package (pip install numba); use 'auto'")
        logger.info("Predictor: %s engine=%s device=%s providers=%s input_size=%d", weights, engine, self.device,
                    self._engine.providers, self.input_size)

    # -- construction helpers -------------------------------------------------------------------
    @staticmethod
    def _resolve_device(device: str) -> torch.device:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise PredictorError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
        if dev.type not in ("cpu", "cuda"):
            raise PredictorError(f"unsupported device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise PredictorError("device='cuda' requested but no CUDA GPU is available; use device='cpu'")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise PredictorError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
            if dev.index is None:  # pin "cuda" to the GPU current now: later calls may come from other threads
                dev = torch.device("cuda", torch.cuda.current_device())
        return dev

    def _load_torch_model(self, weights: str):
        from ciae_core.checkpoint import CheckpointError, load_model

        try:
            return load_model(weights, device="cpu")
        except CheckpointError as e:
            raise PredictorError(str(e)) from None

    def _onnx_for_checkpoint(self, weights: str, cache_dir, opset: int | None) -> str:
        from ciae_core.export import DEFAULT_OPSET, ExportError, export_checkpoint, read_onnx_metadata
        from ciae_core.export import FORMAT as ONNX_FORMAT

        opset = int(opset or DEFAULT_OPSET)
        digest = _file_sha256(weights)
        cache = pathlib.Path(cache_dir) if cache_dir else default_onnx_cache_dir()
        path = cache / f"{pathlib.Path(weights).stem}-{digest[:16]}-opset{opset}.onnx"
        if path.is_file():
            try:
                meta = read_onnx_metadata(str(path))
                if meta.get("ciae_source_sha256") == digest and meta.get("ciae_format") == ONNX_FORMAT:
                    logger.info("reusing cached ONNX export %s", path)
                    return str(path)
            except ExportError:
                logger.warning("cached ONNX export %s is unreadable; exporting again", path)
        logger.info("exporting %s to %s for onnxruntime (first use)", weights, path)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            export_checkpoint(weights, str(path), dynamic=True, opset=opset)
        except ExportError as e:
            raise PredictorError(str(e)) from None
        except OSError as e:
            raise PredictorError(f"cannot write the ONNX cache {path}: {e.strerror}; set onnx_cache_dir") from None
        return str(path)

    def _check_input_size(self, size) -> int:
        lo, hi = self.input_size_range
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not lo <= int(size) <= hi:
            raise PredictorError(f"input_size must be an integer in [{lo}, {hi}] for this {self.config.backbone} model, "
                                 f"got {size!r} (input_size_range overrides the range)")
        if int(size) > self.max_size:
            raise PredictorError(f"input_size {size} exceeds max_size {self.max_size}")
        return int(size)

    # -- public properties ---------------------------------------------------------------------
    @property
    def engine(self) -> str:
        return self.engine_name

    @property
    def providers(self) -> list[str]:
        """onnxruntime providers in use (empty for the torch engine)."""
        return list(self._engine.providers)

    @property
    def model_info(self) -> dict[str, Any]:
        """Model and runtime description (for logs, diagnostics and the ROS node)."""
        from ciae_core import __version__

        return {"name": self.model_name, "weights": self.weights, "backbone": self.config.backbone,
                "num_things": self.config.num_things, "num_stuff": self.config.num_stuff,
                "embed_dim": self.config.embed_dim, "engine": self.engine_name, "device": str(self.device),
                "precision": self.precision, "providers": self.providers, "input_size": self.input_size,
                "max_size": self.max_size, "ciae_version": __version__,
                "fixed_input": "x".join(map(str, self.fixed_input_hw)) if self.fixed_input_hw else ""}

    def update(self, input_size: int | None = None, **thresholds) -> None:
        """Change thresholds (names in ``THRESHOLD_NAMES`` or ``THRESHOLD_ALIASES``) and/or
        ``input_size`` for later calls. Values are checked; on an error nothing changes."""
        new = _checked_thresholds(self.thresholds, thresholds)
        if input_size is not None and self.fixed_input_hw is not None:
            if isinstance(input_size, bool) or not isinstance(input_size, (int, np.integer)) \
                    or int(input_size) != self.input_size:
                fh, fw = self.fixed_input_hw
                raise PredictorError(f"{self.weights} is a fixed {fh}x{fw} export: input_size cannot change "
                                     f"(re-export with --dynamic)")
        elif input_size is not None:
            self.input_size = self._check_input_size(input_size)
        self.thresholds = new

    def letterbox(self, height: int, width: int) -> Letterbox:
        """The geometry this predictor gives an ``height x width`` image (:func:`letterbox`, or
        :func:`letterbox_into` for a fixed-shape export); :class:`PredictorError` if it cannot take it."""
        if self.fixed_input_hw is not None:
            return letterbox_into(height, width, *self.fixed_input_hw, self.stride, self.min_image_side)
        return letterbox(height, width, self.input_size, self.max_size, self.stride, self.min_image_side)

    @property
    def default_input_size(self) -> int:
        """The model's own input size: the canvas' shorter side for a fixed-shape export."""
        if self.fixed_input_hw is not None:
            return self.input_size
        return default_input_size(self.config.backbone)

    # -- stages ----------------------------------------------------------------------------------
    def _pinned_buffer(self, i: int, numel: int) -> torch.Tensor:
        while len(self._pinned) <= i:
            self._pinned.append(torch.empty(0, dtype=torch.uint8))
        if self._pinned[i].numel() < numel:
            self._pinned[i] = torch.empty(numel, dtype=torch.uint8, pin_memory=True)
        return self._pinned[i][:numel]

    def preprocess(self, images: Sequence[np.ndarray], color: str = "rgb") -> tuple[torch.Tensor, list[Letterbox]]:
        """Letterbox a list of validated images into one float32 RGB 0..255 batch ``(N, 3, Hp, Wp)``
        (padded to the largest padded size among them)."""
        boxes = [self.letterbox(im.shape[0], im.shape[1]) for im in images]
        with self._on_device():
            return self._letterbox_batch(images, boxes, color), boxes

    def _on_device(self):
        """``self.device`` as the current CUDA device for the block (a no-op on the CPU): the
        public stages and ``__call__`` run there whatever the calling thread's current device."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.device(self.device)

    def _letterbox_batch(self, images: Sequence[np.ndarray], boxes: Sequence[Letterbox], color: str,
                         slots: Sequence[int] | None = None) -> torch.Tensor:
        """``slots``: pinned staging buffer of each image on CUDA (its position in the call), so
        no buffer is rewritten within a call while its async upload may still be in flight; the
        call ends with a stream sync, after which all buffers are free again."""
        hp, wp = max(b.padded_height for b in boxes), max(b.padded_width for b in boxes)
        batch = torch.zeros((len(images), 3, hp, wp), dtype=torch.float32, device=self.device)
        bgr = color == "bgr"
        for i, (im, lb) in enumerate(zip(images, boxes)):
            rh, rw = lb.resized_size
            if self.device.type == "cpu":
                import cv2

                if not lb.is_identity:
                    im = cv2.resize(im, (rw, rh), interpolation=cv2.INTER_AREA if (rh < lb.height and rw < lb.width)
                                     else cv2.INTER_LINEAR)
                t = torch.from_numpy(im).permute(2, 0, 1)
                batch[i, :, :rh, :rw] = t.flip(0) if bgr else t
            else:
                buf = self._pinned_buffer(slots[i] if slots is not None else i, im.size)
                buf.view(im.shape).copy_(torch.from_numpy(im))
                x = buf.view(im.shape).to(self.device, non_blocking=True).permute(2, 0, 1).float()
                if bgr:
                    x = x.flip(0)
                if not lb.is_identity:
                    x = resize_image_like_cv2(x, (rh, rw))
                batch[i, :, :rh, :rw] = x
        return batch

    def forward_raw(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the engine on a preprocessed batch; fp32 raw outputs on ``self.device``."""
        with self._on_device():
            return self._engine(batch)

    def postprocess(self, raw: dict[str, torch.Tensor], boxes: Sequence[Letterbox],
                    return_confidence: bool = False) -> list[dict[str, torch.Tensor]]:
        """Proposal selection + fusion at the resized resolution (``ciae_core.fusion``)."""
        from ciae_core.fusion import panoptic_from_raw

        with torch.inference_mode(), self._on_device():
            return panoptic_from_raw(raw, [b.resized_size for b in boxes], num_things=self.num_things,
                                     embedding_stride=self.config.branch_stride,
                                     normalize_after_upsampling=self.config.embedding_stride == 1,
                                     return_confidence=return_confidence, fusion_method=self.fusion_method,
                                     **self.thresholds)

    # -- call -----------------------------------------------------------------------------------
    def __call__(self, images, color: str = "rgb", return_confidence: bool = False):
        """Segment one image (→ ``PanopticResult``) or a list of images (→ list, same order).

        On CUDA the whole call runs with ``self.device`` as the current device, whatever the
        calling thread's current device is (a ROS executor thread starts on GPU 0): CUDA-graph
        capture streams, timing events and onnxruntime's IO binding all use the current device.
        """
        with self._on_device():
            return self._call(images, color, return_confidence)

    def _call(self, images, color: str, return_confidence: bool):
        if color not in ("rgb", "bgr"):
            raise PredictorError(f"color must be 'rgb' or 'bgr', got {color!r}")
        single = not isinstance(images, (list, tuple))
        batch_in = [images] if single else list(images)
        if not batch_in:
            return []
        batch_in = [validate_image(im, i) for i, im in enumerate(batch_in)]
        boxes = [self.letterbox(im.shape[0], im.shape[1]) for im in batch_in]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, lb in enumerate(boxes):
            key = (0, 0) if self.mixed_size_batching == "pad" else (lb.padded_height, lb.padded_width)
            groups.setdefault(key, []).append(i)
        clock = _StageClock(self.device)
        outs: list[dict] = [{}] * len(batch_in)
        for idx in groups.values():
            clock.mark("start")
            batch = self._letterbox_batch([batch_in[i] for i in idx], [boxes[i] for i in idx], color, slots=idx)
            clock.mark("preprocess")
            raw = self.forward_raw(batch)
            clock.mark("forward")
            for i, o in zip(idx, self.postprocess(raw, [boxes[i] for i in idx], return_confidence)):
                outs[i] = o
            clock.mark("postprocess")
        clock.mark("start")
        maps, confs, tables = [], [], []
        with torch.inference_mode():
            for out, lb in zip(outs, boxes):
                id_map = resize_nearest(out["id_map"], (lb.height, lb.width)).to(torch.int32)
                ids = out["ids"].long()
                max_id = int(ids.max()) if ids.numel() else 0
                seg_ids, areas, bxs = segment_table(id_map, max_id)
                pos = torch.zeros(max_id + 1, dtype=torch.int64, device=id_map.device)
                pos[ids] = torch.arange(ids.numel(), device=id_map.device)
                k = pos[seg_ids]
                table = torch.cat([seg_ids[:, None].double(), out["labels"].long()[k][:, None].double(),
                                   out["scores"].double()[k][:, None], areas[:, None].double(), bxs.double()], dim=1)
                maps.append(id_map.reshape(-1))
                tables.append(table)
                if return_confidence:
                    conf = out.get("confidence")
                    if conf is None:
                        raise PredictorError("this fusion returned no confidence map")
                    confs.append(resize_nearest(conf.float(), (lb.height, lb.width)).reshape(-1))
        clock.mark("map_back")
        host_maps, host_tables, host_confs = self._to_host(maps, tables, confs)
        clock.mark("to_host")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.timings = clock.durations_ms()
        results = []
        off_m = off_c = 0
        for i, lb in enumerate(boxes):
            n = lb.height * lb.width
            id_map = host_maps[off_m:off_m + n].reshape(lb.height, lb.width)
            off_m += n
            conf = None
            if return_confidence:
                conf = host_confs[off_c:off_c + n].reshape(lb.height, lb.width)
                off_c += n
            results.append(PanopticResult(id_map=id_map, segments=self._segments(host_tables[i]), confidence=conf))
        return results[0] if single else results

    def _to_host(self, maps, tables, confs):
        """One device→host copy for all id maps (and one for the tables, one for confidences)."""
        def copy(ts):
            if not ts:
                return None
            dev = torch.cat(ts) if len(ts) > 1 else ts[0]
            if self.device.type == "cpu":
                return dev.numpy()
            host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
            host.copy_(dev, non_blocking=True)
            return host.numpy()

        sizes = [t.shape[0] for t in tables]
        flat_tables = copy([t.reshape(-1) for t in tables])
        out_tables, off = [], 0
        for s in sizes:
            out_tables.append(flat_tables[off:off + s * 8].reshape(s, 8))
            off += s * 8
        return copy(maps), out_tables, copy(confs)

    def _segments(self, table: np.ndarray) -> list[Segment]:
        segs = []
        for seg_id, label, score, area, x, y, w, h in table.tolist():
            cat = self.categories[int(label)]
            segs.append(Segment(id=int(seg_id), category_id=cat.id, label=cat.name, isthing=cat.isthing,
                                score=float(score), area=int(area), bbox=(int(x), int(y), int(w), int(h))))
        return segs


def input_size_range_for(config) -> tuple[int, int]:
    """:func:`input_size_range` of a model config."""
    return input_size_range(config.backbone)


# ----------------------------------------------------------------------------------------------
# ciae-predict


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _list_images(path: str) -> list[pathlib.Path]:
    p = pathlib.Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise PredictorError(f"--images {path}: no such file or directory")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise PredictorError(f"--images {path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciae-predict", description="Panoptic segmentation of an image folder; writes "
                                "COCO-panoptic PNGs + predictions.json (scorable with ciae-eval or panopticapi).")
    p.add_argument("--weights", required=True, help=".safetensors checkpoint or .onnx export")
    p.add_argument("--images", required=True, help="image file or directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--engine", default="torch", choices=ENGINES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--score-threshold", type=float, default=None)
    p.add_argument("--nms-threshold", type=float, default=None)
    p.add_argument("--instance-score-threshold", type=float, default=None)
    p.add_argument("--min-stuff-area", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch / onnxruntime intra-op threads")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        print("ciae-predict: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        import cv2

        if args.threads:
            torch.set_num_threads(args.threads)
        thr = {k: v for k, v in (("score_threshold", args.score_threshold), ("nms_threshold", args.nms_threshold),
                                 ("instance_score_threshold", args.instance_score_threshold),
                                 ("min_stuff_area", args.min_stuff_area)) if v is not None}
        predictor = Predictor(args.weights, engine=args.engine, device=args.device, input_size=args.input_size,
                              max_size=args.max_size, precision=args.precision, intra_op_threads=args.threads, **thr)
        files = _list_images(args.images)
        results, names, total_ms = [], [], 0.0
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            imgs = []
            for f in chunk:
                im = cv2.imread(str(f), cv2.IMREAD_COLOR)
                if im is None:
                    raise PredictorError(f"cannot decode image {f}")
                imgs.append(im)
            results.extend(predictor(imgs, color="bgr"))
            names.extend(f.name for f in chunk)
            total_ms += sum(predictor.timings.values())
        from ciae_core.evaluation import EvaluationError, write_coco_panoptic

        triples = [(n, int(pathlib.Path(n).stem) if pathlib.Path(n).stem.isdigit() else pathlib.Path(n).stem, r)
                   for n, r in zip(names, results)]
        try:
            json_path = write_coco_panoptic(args.out, triples, predictor.categories)
        except EvaluationError as e:
            raise PredictorError(str(e)) from None
    except PredictorError as e:
        print(f"ciae-predict: error: {e}", file=sys.stderr)
        return 1
    print(f"ciae-predict: {len(results)} image(s), {total_ms / max(1, len(results)):.1f} ms/image "
          f"({predictor.engine} on {predictor.device}); wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
