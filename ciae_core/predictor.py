"""ROS-free inference: the ``Predictor`` facade over the torch, onnxruntime and OpenVINO engines.

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
* **Thresholds** and **input size**: names, checks and the per-backbone defaults and ranges are in
  :mod:`ciae_core.predictor_settings`; :meth:`Predictor.update` changes them between calls.
* **Batches**: a list of N images is letterboxed image by image; images with the same padded size
  (e.g. several identical cameras) run as one forward pass. Images of different padded sizes run
  as one forward per size by default (``mixed_size_batching="group"``), because padding an image
  further changes the GroupNorm statistics of the heads and so its result (with random weights up
  to a quarter of the pixels): a result must not depend on which other images share the batch.
  ``mixed_size_batching="pad"`` pads all to the largest padded size and runs one forward.
* **Engines**: ``engine="torch"`` (:mod:`ciae_core.engine_torch`: CUDA graphs, fp16/bf16
  autocast, channels_last, ``torch.compile``) or ``engine="onnxruntime"``
  (:mod:`ciae_core.engine_onnxruntime`: ``.onnx`` from ``ciae-export`` or a ``.safetensors``
  exported on the fly to ``onnx_cache_dir``, TensorRT → CUDA → CPU providers; a fixed-shape file
  is served by fitting each image into its canvas, :func:`letterbox_into`) or ``engine="openvino"``
  (:mod:`ciae_core.engine_openvino`: the same ``.onnx`` files and cache, or an int8 ``.xml`` IR from
  ``ciae-export --int8``; compiled for ``openvino_device`` "CPU" or "GPU" (an Intel GPU) in
  ``precision`` fp32 / bf16 (AMX, AVX512_BF16) / int8 / fp16 (GPU); pre- and post-processing on
  the CPU). All return the same raw outputs, so everything after ``forward_raw`` is shared.
* **Precision** ``"auto"``: the OpenVINO engine takes int8 for an int8 file, else bf16 where the
  CPU computes it natively, else fp32 (:func:`ciae_core.cpu_features.choose_precision`, logged);
  the torch and onnxruntime engines take fp32. ``Predictor.precision`` is the resolved one.
* **CUDA path**: cudnn.benchmark, uint8 upload from a pinned staging buffer with an async copy,
  resize on the GPU, fusion and map-back on the GPU, then one device→host copy of all final id
  maps (plus one for the small segment table); or the whole call in one graph (:mod:`ciae_core.full_graph`).

Timings (``predictor.timings``, milliseconds of the last call): ``preprocess``, ``forward``,
``postprocess`` (proposal selection + fusion), ``map_back`` (resize to input resolution +
segment table) and ``to_host``; their sum is the call's total. On CUDA they are measured with
CUDA events.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import time
from typing import Any, Sequence

import numpy as np
import torch

# PredictorError, the geometry, the settings and the onnxruntime helpers keep their old import path
# ciae_core.predictor (re-exported, see __all__)
from ciae_core.engine_onnxruntime import (RAW_OUTPUT_NAMES, _OrtEngine, default_onnx_cache_dir, onnx_for_checkpoint,
                                          select_providers, tensorrt_runtime_loadable)
from ciae_core.engine_torch import _TorchEngine
from ciae_core.full_graph import full_call_graphs
from ciae_core.geometry import (MIN_IMAGE_SIDE, Letterbox, area_resize_weights, letterbox, letterbox_into,
                                nearest_source_index, resize_image_like_cv2, resize_nearest, segment_table,
                                validate_image)
from ciae_core.predictor_error import PredictorError
from ciae_core.predictor_settings import (ENGINE_PRECISIONS, ENGINES, PRECISIONS, SMALL_BACKBONES, THRESHOLD_ALIASES,
                                          THRESHOLD_NAMES, _checked_thresholds, check_engine_and_precision_names,
                                          default_input_size, input_size_range, input_size_range_for)
from ciae_core.structures import CategoryInfo, PanopticResult, Segment
from ciae_core.user_input import quote

logger = logging.getLogger(__name__)

__all__ = ["ENGINES", "MIN_IMAGE_SIDE", "PRECISIONS", "RAW_OUTPUT_NAMES", "SMALL_BACKBONES", "THRESHOLD_ALIASES",
           "THRESHOLD_NAMES", "Letterbox", "Predictor", "PredictorError", "area_resize_weights", "default_input_size",
           "default_onnx_cache_dir", "input_size_range", "input_size_range_for", "letterbox", "letterbox_into",
           "nearest_source_index", "resize_image_like_cv2", "resize_nearest", "segment_table", "select_providers",
           "tensorrt_runtime_loadable", "validate_image"]

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


class Predictor:
    """Panoptic segmentation of HxWx3 uint8 images with a CIAE model (see the module docstring).

    Args:
        weights: ``.safetensors`` checkpoint (``ciae_core.checkpoint.save_model``) or, for
            ``engine="onnxruntime"`` / ``"openvino"``, a ``.onnx`` from ``ciae-export`` (openvino:
            also a ``.xml`` IR from ``ciae-export --int8``).
        engine: "torch", "onnxruntime", "openvino" or "auto" (:func:`ciae_core.cpu_features.auto_engine`:
            on the CPU the fastest within the accuracy bound for its features; the choice and why are
            ``engine`` / ``engine_reason``).
        device: "cpu", "cuda" or "cuda:N".
        input_size: shorter side fed to the network (None: :func:`default_input_size`).
        max_size: cap on the longer side after resizing.
        precision: "fp32", "fp16" (torch on CUDA; openvino on an Intel GPU), "bf16" (torch
            autocast; openvino on AMX/AVX512_BF16 CPUs), "int8" (openvino, an int8 file) or "auto".
        channels_last: run the torch engine in channels_last. None (default): on for the CPU
            (10-31 % faster there, module docstring), off for CUDA (no gain on an H100).
        cudnn_benchmark: None → on for CUDA.
        cuda_graphs: None/True/"forward" (CUDA default): one CUDA graph per input shape for the forward; "full":
            the whole call of one image in one graph (:mod:`ciae_core.full_graph`, eager fallback); False: eager.
        compile: wrap ``forward_raw`` in ``torch.compile`` (torch engine; composes with cuda_graphs).
        input_size_range: ``(lo, hi)`` valid shorter sides (None: :func:`input_size_range`).
        providers, trt_cache_dir, trt_fp16, intra_op_threads, inter_op_threads: onnxruntime
            (``intra_op_threads`` is also the OpenVINO engine's thread count).
        onnx_cache_dir, onnx_opset: on-the-fly export of a ``.safetensors`` for onnxruntime/openvino.
        openvino_device, openvino_cache_dir: the OpenVINO device ("CPU", "GPU") and compiled-model
            cache (None: ``$CIAE_CACHE_DIR/openvino``).
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
                 mixed_size_batching: str = "group", cuda_graphs: bool | str | None = None, fusion_method: str = "auto",
                 openvino_device: str = "CPU", openvino_cache_dir: str | os.PathLike | None = None, **thresholds):
        weights = self._resolved_weights(weights)
        self.engine_reason = "asked for"
        if engine == "auto":
            from ciae_core.cpu_features import auto_engine

            engine, precision, self.engine_reason = auto_engine(device, weights, precision)
            logger.info("engine auto: %s %s (%s)", engine, precision, self.engine_reason)
        self.device = self._checked_engine_and_device(engine, precision, device)
        self.mixed_size_batching, self.fusion_method = self._checked_batching_and_fusion(mixed_size_batching,
                                                                                         fusion_method)
        self.weights = weights
        self.engine_name = engine
        self.precision = precision
        self._set_geometry(stride, min_image_side, max_size, input_size_range)
        self._openvino = (openvino_device, openvino_cache_dir)
        self._build_engine(weights, engine, precision, channels_last, cudnn_benchmark, compile, cuda_graphs,
                           providers, trt_cache_dir, trt_fp16, intra_op_threads, inter_op_threads, onnx_cache_dir,
                           onnx_opset)
        self.categories: list[CategoryInfo] = list(self.config.categories)
        self.num_things = self.config.num_things
        self._set_input_size(weights, input_size, input_size_range)
        try:
            self.thresholds = _checked_thresholds({}, {k: getattr(self.config, k) for k in THRESHOLD_NAMES})
        except PredictorError as e:
            raise PredictorError(f"{weights}: invalid inference setting in the model config: {e}") from None
        self._full = full_call_graphs(self, cuda_graphs)  # cuda_graphs="full", else None
        self.update(**thresholds)
        self.timings: dict[str, float] = {}
        self._pinned: list[torch.Tensor] = []
        self.model_name = pathlib.Path(weights).stem
        self._prepare_fusion_kernels()
        logger.info("Predictor: %s engine=%s device=%s providers=%s input_size=%d", weights, engine, self.device,
                    self._engine.providers, self.input_size)

    # -- construction steps (in the constructor's order) -------------------------------------------
    def _checked_engine_and_device(self, engine: str, precision: str, device: str) -> torch.device:
        """The resolved device, after checking ``engine`` and ``precision`` (and that they fit it)."""
        check_engine_and_precision_names(engine, precision)
        dev = self._resolve_device(device)
        if engine == "openvino":
            if dev.type != "cpu":
                raise PredictorError("engine='openvino' pre- and post-processes on device='cpu'; choose the OpenVINO "
                                     "device with openvino_device ('CPU' or 'GPU', an Intel GPU)")
            return dev
        if precision == "fp16" and dev.type != "cuda":
            raise PredictorError("precision='fp16' needs device='cuda'; use 'fp32' or 'bf16' on the CPU")
        if precision not in ENGINE_PRECISIONS[engine]:
            raise PredictorError(f"precision={quote(precision)} applies to the torch and openvino engines; for "
                                 f"onnxruntime use trt_fp16=True (TensorRT) or precision='fp32'")
        return dev

    @staticmethod
    def _resolved_weights(weights: str | os.PathLike) -> str:
        """The weights file (``model.safetensors`` inside a directory); it must exist."""
        weights = os.fspath(weights)
        if not os.path.exists(weights):
            raise PredictorError(f"weights file not found: {weights}")
        if os.path.isdir(weights):
            cand = os.path.join(weights, "model.safetensors")
            if not os.path.isfile(cand):
                raise PredictorError(f"weights path {weights} is a directory without model.safetensors")
            weights = cand
        return weights

    def _checked_batching_and_fusion(self, mixed_size_batching: str, fusion_method: str) -> tuple[str, str]:
        if mixed_size_batching not in ("group", "pad"):
            raise PredictorError(f"mixed_size_batching must be 'group' or 'pad', got {quote(mixed_size_batching)}")
        from ciae_core.fusion import FUSION_METHODS

        if fusion_method not in FUSION_METHODS:
            raise PredictorError(f"unknown fusion_method {quote(fusion_method)}; "
                                 f"choose one of {', '.join(FUSION_METHODS)}")
        if fusion_method == "numba" and self.device.type != "cpu":
            raise PredictorError("fusion_method='numba' runs on the CPU; use 'auto' (or 'coarse_to_fine') on CUDA")
        return mixed_size_batching, fusion_method

    def _set_geometry(self, stride, min_image_side, max_size, input_size_range) -> None:
        """Check and keep ``stride``, ``min_image_side``, ``max_size``; check ``input_size_range``."""
        for name, value, low in (("stride", stride, 1), ("min_image_side", min_image_side, 1), ("max_size", max_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise PredictorError(f"{name} must be a positive integer, got {quote(value)}")
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
                                     f"{quote(input_size_range)}") from None

    def _build_engine(self, weights: str, engine: str, precision: str, channels_last, cudnn_benchmark, compile,
                      cuda_graphs, providers, trt_cache_dir, trt_fp16, intra_op_threads, inter_op_threads,
                      onnx_cache_dir, onnx_opset) -> None:
        """``self._engine`` and ``self.config`` (plus ``self.onnx_path`` for onnxruntime)."""
        is_onnx = weights.lower().endswith(".onnx")
        if weights.lower().endswith(".xml") and engine != "openvino":
            raise PredictorError(f"{weights} is an OpenVINO IR; use engine='openvino'")
        if engine == "openvino":
            self._build_openvino_engine(weights, precision, intra_op_threads, onnx_cache_dir, onnx_opset)
        elif engine == "torch":
            if is_onnx:
                raise PredictorError(f"{weights} is an ONNX file; use engine='onnxruntime' or a .safetensors checkpoint")
            if precision == "auto":  # torch's CPU bf16 measured slower (README, "CPU engines and precisions")
                self.precision = precision = "fp32"
            model = self._load_torch_model(weights)
            self.config = model.config
            cuda = self.device.type == "cuda"
            if cudnn_benchmark if cudnn_benchmark is not None else cuda:
                torch.backends.cudnn.benchmark = True
            self._engine = _TorchEngine(model, self.device, precision, channels_last if channels_last is not None
                                        else not cuda, compile, cuda_graphs=cuda if cuda_graphs is None
                                        else cuda_graphs in (True, "forward", "full"))
        else:
            self.precision = "fp32"
            onnx_path = weights if is_onnx else onnx_for_checkpoint(weights, onnx_cache_dir, onnx_opset)
            self.onnx_path = onnx_path
            self._engine = _OrtEngine(onnx_path, self.device, providers, trt_cache_dir, trt_fp16,
                                      intra_op_threads, inter_op_threads)
            self.config = self._engine.config

    def _build_openvino_engine(self, weights: str, precision: str, threads, onnx_cache_dir, onnx_opset) -> None:
        from ciae_core.engine_openvino import openvino_engine_for

        device, cache_dir = self._openvino
        self._engine, onnx_path = openvino_engine_for(weights, precision, device, threads, cache_dir, onnx_cache_dir,
                                                      onnx_opset)
        if onnx_path:
            self.onnx_path = onnx_path
        self.config, self.precision = self._engine.config, self._engine.precision

    def _set_input_size(self, weights: str, input_size, input_size_range) -> None:
        """``self.fixed_input_hw``, ``self.input_size_range`` and ``self.input_size`` (checked)."""
        self.fixed_input_hw: tuple[int, int] | None = getattr(self._engine, "fixed_hw", None)
        if self.fixed_input_hw is not None:
            fh, fw = self.fixed_input_hw
            if input_size is not None or input_size_range is not None:
                raise PredictorError(f"{weights} is a fixed {fw}x{fh} export: images are fitted into {fw}x{fh} and "
                                     f"input_size does not apply; leave it unset or re-export with --dynamic")
            self.input_size_range = (min(fh, fw), min(fh, fw))
            self.input_size = min(fh, fw)
        else:
            self.input_size_range = (tuple(int(v) for v in input_size_range) if input_size_range
                                     else input_size_range_for(self.config))
            self.input_size = self._check_input_size(input_size if input_size is not None
                                                     else default_input_size(self.config.backbone))

    def _prepare_fusion_kernels(self) -> None:
        """On the CPU, compile (or load from numba's cache) the fusion kernels now, not on the first frame."""
        from ciae_core.fusion import compile_fusion_kernels

        if self.device.type == "cpu" and self.fusion_method in ("auto", "numba"):
            if not compile_fusion_kernels() and self.fusion_method == "numba":
                raise PredictorError("fusion_method='numba' needs the numba package (pip install numba); use 'auto'")

    # -- construction helpers -------------------------------------------------------------------
    @staticmethod
    def _resolve_device(device: str) -> torch.device:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise PredictorError(f"unknown device {quote(device)}; use 'cpu', 'cuda' or 'cuda:N'") from None
        if dev.type not in ("cpu", "cuda"):
            raise PredictorError(f"unsupported device {quote(device)}; use 'cpu', 'cuda' or 'cuda:N'")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise PredictorError("device='cuda' requested but no CUDA GPU is available; use device='cpu'")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise PredictorError(f"device {quote(device)} does not exist: "
                                     f"{torch.cuda.device_count()} CUDA device(s)")
            if dev.index is None:  # pin "cuda" to the GPU current now: later calls may come from other threads
                dev = torch.device("cuda", torch.cuda.current_device())
        return dev

    def _load_torch_model(self, weights: str):
        from ciae_core.checkpoint import CheckpointError, load_model

        try:
            return load_model(weights, device="cpu")
        except CheckpointError as e:
            raise PredictorError(str(e)) from None

    def _check_input_size(self, size) -> int:
        lo, hi = self.input_size_range
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not lo <= int(size) <= hi:
            raise PredictorError(f"input_size must be an integer in [{lo}, {hi}] for this {self.config.backbone} model, "
                                 f"got {quote(size)} (input_size_range overrides the range)")
        if int(size) > self.max_size:
            raise PredictorError(f"input_size {size} exceeds max_size {self.max_size}")
        return int(size)

    # -- public properties ---------------------------------------------------------------------
    @property
    def engine(self) -> str:
        return self.engine_name

    @property
    def providers(self) -> list[str]:
        """onnxruntime providers in use (torch: empty; openvino: its version, device and precision)."""
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
                raise PredictorError(f"{self.weights} is a fixed {fw}x{fh} export: input_size cannot change "
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

    def postprocess(self, raw: dict[str, torch.Tensor], boxes: Sequence[Letterbox], return_confidence: bool = False,
                    return_embeddings: bool = False) -> list[dict[str, torch.Tensor]]:
        """Proposal selection + fusion at the resized resolution (``ciae_core.fusion``)."""
        from ciae_core.fusion import panoptic_from_raw

        with torch.inference_mode(), self._on_device():
            return panoptic_from_raw(raw, [b.resized_size for b in boxes], num_things=self.num_things,
                                     embedding_stride=self.config.branch_stride,
                                     normalize_after_upsampling=self.config.embedding_stride == 1,
                                     return_confidence=return_confidence, fusion_method=self.fusion_method,
                                     return_embeddings=return_embeddings, **self.thresholds)

    # -- call -----------------------------------------------------------------------------------
    def __call__(self, images, color: str = "rgb", return_confidence: bool = False, return_embeddings: bool = False):
        """Segment one image (→ ``PanopticResult``) or a list of images (→ list, same order).

        ``return_confidence``: ``result.confidence``; ``return_embeddings``: ``result.embeddings``,
        one unit mean embedding per segment, row ``i`` for ``segments[i]`` (the tracker's
        appearance cue, :mod:`ciae_core.fusion_embeddings`; computed in the fusion on the device and
        copied to the host with the segment table, no extra copy).

        On CUDA the whole call runs with ``self.device`` as the current device, whatever the
        calling thread's current device is (a ROS executor thread starts on GPU 0): CUDA-graph
        capture streams, timing events and onnxruntime's IO binding all use the current device.
        """
        with self._on_device():
            return self._call(images, color, return_confidence, return_embeddings)

    def _call(self, images, color: str, return_confidence: bool, return_embeddings: bool = False):
        """Validate → letterbox → per padded-size group: preprocess, forward, postprocess → map back
        → one device→host copy → results (stage times in ``self.timings``)."""
        if color not in ("rgb", "bgr"):
            raise PredictorError(f"color must be 'rgb' or 'bgr', got {quote(color)}")
        single = not isinstance(images, (list, tuple))
        batch_in = [images] if single else list(images)
        if not batch_in:
            return []
        batch_in = [validate_image(im, i) for i, im in enumerate(batch_in)]
        boxes = [self.letterbox(im.shape[0], im.shape[1]) for im in batch_in]
        done = self._full and self._full.answer(batch_in, boxes, color, self._segments,
                                                return_confidence or return_embeddings)
        if done:  # the whole-call graph answered (None: the eager path below)
            self.timings = dict(self._full.timings)
            return done if single else [done]
        clock = _StageClock(self.device)
        outs = self._fused_outputs(batch_in, boxes, color, return_confidence, clock, return_embeddings)
        clock.mark("start")
        maps, tables, confs = self._map_back(outs, boxes, return_confidence, return_embeddings)
        clock.mark("map_back")
        host_maps, host_tables, host_confs = self._to_host(maps, tables, confs)
        clock.mark("to_host")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.timings = clock.durations_ms()
        results = self._results(boxes, host_maps, host_tables, host_confs, return_confidence, return_embeddings)
        return results[0] if single else results

    def _fused_outputs(self, batch_in: list[np.ndarray], boxes: list[Letterbox], color: str, return_confidence: bool,
                       clock: _StageClock, return_embeddings: bool = False) -> list[dict]:
        """Fusion outputs (at the resized resolution) per image, one forward pass per padded size
        (or one for all with ``mixed_size_batching="pad"``)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, lb in enumerate(boxes):
            key = (0, 0) if self.mixed_size_batching == "pad" else (lb.padded_height, lb.padded_width)
            groups.setdefault(key, []).append(i)
        outs: list[dict] = [{}] * len(batch_in)
        for idx in groups.values():
            clock.mark("start")
            batch = self._letterbox_batch([batch_in[i] for i in idx], [boxes[i] for i in idx], color, slots=idx)
            clock.mark("preprocess")
            raw = self.forward_raw(batch)
            clock.mark("forward")
            for i, o in zip(idx, self.postprocess(raw, [boxes[i] for i in idx], return_confidence, return_embeddings)):
                outs[i] = o
            clock.mark("postprocess")
        return outs

    def _map_back(self, outs: list[dict], boxes: list[Letterbox], return_confidence: bool,
                  return_embeddings: bool = False):
        """Id maps (and confidences) at the input resolution, flattened, and segment tables ``(K, 8)``
        float64 ``id, label, score, area, x, y, w, h`` recomputed from the mapped id maps (``(K, 8 + D)``
        with the segments' embeddings appended); on the device."""
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
                if return_embeddings:
                    table = torch.cat([table, out["embeddings"].double()[k]], dim=1)
                maps.append(id_map.reshape(-1))
                tables.append(table)
                if return_confidence:
                    conf = out.get("confidence")
                    if conf is None:
                        raise PredictorError("this fusion returned no confidence map")
                    confs.append(resize_nearest(conf.float(), (lb.height, lb.width)).reshape(-1))
        return maps, tables, confs

    def _results(self, boxes: list[Letterbox], host_maps, host_tables, host_confs, return_confidence: bool,
                 return_embeddings: bool = False) -> list[PanopticResult]:
        """Cut the host copies back into one ``PanopticResult`` per image."""
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
            emb = host_tables[i][:, 8:].astype(np.float32) if return_embeddings else None
            results.append(PanopticResult(id_map=id_map, segments=self._segments(host_tables[i][:, :8]),
                                          confidence=conf, embeddings=emb))
        return results

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

        shapes = [t.shape for t in tables]
        flat_tables = copy([t.reshape(-1) for t in tables])
        out_tables, off = [], 0
        for rows, cols in shapes:
            out_tables.append(flat_tables[off:off + rows * cols].reshape(rows, cols))
            off += rows * cols
        return copy(maps), out_tables, copy(confs)

    def _segments(self, table: np.ndarray) -> list[Segment]:
        segs = []
        for seg_id, label, score, area, x, y, w, h in table.tolist():
            cat = self.categories[int(label)]
            segs.append(Segment(id=int(seg_id), category_id=cat.id, label=cat.name, isthing=cat.isthing,
                                score=float(score), area=int(area), bbox=(int(x), int(y), int(w), int(h))))
        return segs
