"""The onnxruntime engine of the :class:`~ciae_core.predictor.Predictor`: provider choice, session, cache.

Decisions:

* ``weights`` may be a ``.onnx`` written by ``ciae-export`` (its metadata carries the model
  config) or a ``.safetensors`` checkpoint, which is exported on the fly (dynamic
  batch/height/width, :func:`onnx_for_checkpoint`) to
  ``<onnx_cache_dir>/<stem>-<sha256[:16]>-opset<N>.onnx``; ``onnx_cache_dir`` defaults to
  ``$CIAE_CACHE_DIR/onnx`` or ``~/.cache/ciae/onnx`` (:func:`default_onnx_cache_dir`). The
  cached file is reused while the checkpoint's hash matches.
* Providers (:func:`select_providers`): TensorRT → CUDA → CPU (the ones this onnxruntime build
  offers; TensorRT only when its runtime loads) for device="cuda", CPU for device="cpu";
  ``trt_cache_dir`` (default ``$CIAE_CACHE_DIR/tensorrt``, engines and timing cache kept across
  restarts) and ``trt_fp16`` configure TensorRT; a chosen GPU provider that does not start is an
  error, not a silent CPU run; full graph optimisation; thread counts settable.
* A fixed-shape file (``ciae-export --size WIDTHxHEIGHT [--batch-size N]``) is served by fitting each
  image into its canvas (:func:`ciae_core.geometry.letterbox_into`, done by the
  predictor; ``input_size`` and ``max_size`` do not apply) and running batches in chunks of ``N``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from typing import Sequence

import numpy as np
import torch

from ciae_core.predictor_error import PredictorError
from ciae_core.user_input import quote

logger = logging.getLogger(__name__)

RAW_OUTPUT_NAMES = ("cls_logits", "box_regression", "centerness", "points", "embedding", "memory")


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
                raise PredictorError(f"onnxruntime provider {quote(p)} is not available in this onnxruntime build "
                                     f"(available: {', '.join(available)})")
            if device == "cpu" and name != "CPUExecutionProvider":
                raise PredictorError(f"onnxruntime provider {quote(p)} needs device='cuda'")
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


#: Raw outputs with one entry per image (the others, e.g. ``memory``, are the same for every image).
PER_IMAGE_OUTPUTS = ("cls_logits", "box_regression", "centerness", "embedding")


def run_in_fixed_batches(run, images: torch.Tensor, fixed_batch: int | None) -> dict[str, torch.Tensor]:
    """``run(images)`` for a graph exported with a fixed batch ``fixed_batch``: ``images``
    ``(N, 3, H, W)`` in chunks of that size (the last padded with zeros), per-image outputs
    concatenated and cut back to ``N``; with ``None`` or ``N == fixed_batch`` one call."""
    n, fb = images.shape[0], fixed_batch
    if fb is None or n == fb:
        return run(images)
    chunks = []
    for start in range(0, n, fb):
        part = images[start:start + fb]
        if part.shape[0] < fb:
            part = torch.cat([part, part.new_zeros((fb - part.shape[0], *part.shape[1:]))])
        chunks.append(run(part))
    return {k: torch.cat([c[k] for c in chunks])[:n] if k in PER_IMAGE_OUTPUTS else chunks[0][k] for k in chunks[0]}


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
                raise PredictorError(f"{name} must be a non-negative integer (0: onnxruntime's default), "
                                     f"got {quote(value)}")
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
        return run_in_fixed_batches(self._run, images, self.fixed_batch)

    def _run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self._run_session(images)
        h, w = images.shape[-2:]
        s, d = self.config.branch_stride, self.config.embed_dim
        want = (images.shape[0], d, -(-h // s), -(-w // s))
        if tuple(out["embedding"].shape) != want:
            raise PredictorError(f"{self.path}: the graph's embedding output {tuple(out['embedding'].shape)} does not "
                                 f"match its metadata config (embed_dim {d}, stride {s}: {want} for a {w}x{h} "
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


def onnx_for_checkpoint(weights: str, cache_dir=None, opset: int | None = None) -> str:
    """The ``.onnx`` of a ``.safetensors`` checkpoint for the onnxruntime engine: the cached dynamic
    export in ``cache_dir`` (default :func:`default_onnx_cache_dir`) while the checkpoint's hash
    matches, else exported now (``ciae_core.export``). :class:`PredictorError` on failure."""
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
