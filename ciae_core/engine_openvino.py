"""The OpenVINO engine: ``forward_raw`` of an exported model compiled by OpenVINO for the CPU or an Intel GPU.

Same contract as the onnxruntime engine (:mod:`ciae_core.engine_onnxruntime`): a float32
``(N, 3, H, W)`` RGB 0..255 batch in, the raw outputs of ``CIAE.forward_raw`` out (float32
torch tensors on the CPU, names and shapes of :data:`RAW_OUTPUT_NAMES`); proposal selection and
the fusion stay in torch (:mod:`ciae_core.fusion`).

Files: a ``.onnx`` written by ``ciae-export`` (config from its metadata), or a ``.xml`` OpenVINO
IR written by :mod:`ciae_core.quantize` (int8; config in its ``rt_info``,
:mod:`ciae_core.openvino_ir`). The predictor turns a ``.safetensors`` checkpoint into the first
through the onnxruntime engine's export cache.

Decisions:

* **Precision** (``INFERENCE_PRECISION_HINT``): ``fp32`` is set explicitly (on AMX CPUs
  OpenVINO's own default is bf16); ``bf16`` needs AMX or AVX512_BF16 and is refused elsewhere
  (:func:`ciae_core.cpu_features.check_precision`: OpenVINO would silently run fp32); ``int8``
  is a quantised IR (its float parts run in fp32); ``fp16`` is for ``device="GPU"`` only;
  ``auto`` takes ``int8`` for a quantised file, else :func:`ciae_core.cpu_features.choose_precision`
  (logged). A quantised file asked to run as fp32/bf16 is an error, not a quiet int8 run.
* **Latency**: ``PERFORMANCE_HINT=LATENCY`` (one stream, all threads on one request);
  ``threads`` sets ``INFERENCE_NUM_THREADS`` (None: OpenVINO's choice, all cores).
* **Shapes**: a dynamic export (``ciae-export --dynamic``, or the predictor's cache) is compiled
  once dynamically (here, so a bad file or precision fails at construction) and, with
  ``static_shapes`` (default), also per input shape with the shape fixed (``Model.reshape``)
  from the second time that shape is seen, keeping the ``max_shapes`` most recent ones: fixed
  shapes let the CPU plugin plan memory and fold the shape arithmetic (10-20 % faster on the
  small model, measured in one process on the 2-core machine), while a folder of
  differently sized photos should not pay a compile per image (the CUDA-graph rule of the torch
  engine). A fixed-shape export (``ciae-export --size``) is compiled once; the predictor fits
  images into its canvas and a batch of another size runs in chunks of its fixed N (black
  padding images dropped; GroupNorm is per image).
* **Cache**: compiled models are cached by OpenVINO in ``cache_dir`` (default
  ``$CIAE_CACHE_DIR/openvino`` or ``~/.cache/ciae/openvino``, created on first use): a restarted
  node imports its compiled blobs instead of compiling again.
* **No network**: openvino is imported through :func:`ciae_core.no_telemetry.import_openvino`.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections import OrderedDict

import numpy as np
import torch

from ciae_core.predictor_error import PredictorError
from ciae_core.user_input import quote

logger = logging.getLogger(__name__)

RAW_OUTPUT_NAMES = ("cls_logits", "box_regression", "centerness", "points", "embedding", "memory")
OPENVINO_DEVICES = ("CPU", "GPU")
OPENVINO_PRECISIONS = ("auto", "fp32", "bf16", "int8", "fp16")
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "fp16": "f16"}


def default_openvino_cache_dir() -> pathlib.Path:
    """``$CIAE_CACHE_DIR/openvino`` or ``~/.cache/ciae/openvino``."""
    base = os.environ.get("CIAE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ciae")
    return pathlib.Path(base) / "openvino"


def is_quantized(model) -> bool:
    """Whether an ``ov.Model`` holds quantisation nodes (an int8 model from NNCF)."""
    return any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def _port_name(port, wanted=RAW_OUTPUT_NAMES) -> str:
    """The name of an input/output port among ``wanted`` (a port's tensor can carry several names:
    the ONNX output name and the producing node's), else any of its names."""
    names = port.get_names()
    return next((n for n in wanted if n in names), port.get_any_name())


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def read_model_file(path: str, core):
    """``(ov.Model, CIAEConfig, metadata)`` of a ``ciae-export`` ``.onnx`` or a ciae ``.xml`` IR;
    :class:`PredictorError` (one line naming the file) for anything else or a bad file."""
    from ciae_core.export import FORMAT as ONNX_FORMAT
    from ciae_core.export import ExportError, read_onnx_config, read_onnx_metadata
    from ciae_core.openvino_ir import config_from_metadata, read_ir

    suffix = pathlib.Path(path).suffix.lower()
    try:
        if suffix == ".onnx":
            config = read_onnx_config(path)
            meta = read_onnx_metadata(path)
            try:
                model = core.read_model(path)
            except Exception as e:  # noqa: BLE001 - any reader failure means a bad file
                raise ExportError(f"openvino cannot read {path}: {_first_line(e)}") from None
        elif suffix == ".xml":
            model, meta = read_ir(path, core)
            config = config_from_metadata(meta, path)
            if meta.get("ciae_onnx_format") != ONNX_FORMAT:
                raise ExportError(f"{path} was made from a {meta.get('ciae_onnx_format') or 'unversioned'} export "
                                  f"whose embedding output this version cannot fuse (needs {ONNX_FORMAT}); write it again")
        else:
            raise ExportError(f"{path}: the openvino engine reads a .onnx from ciae-export or a .xml OpenVINO IR "
                              f"(ciae-export --int8), not {suffix or 'a file without extension'}")
    except ExportError as e:
        raise PredictorError(str(e)) from None
    return model, config, meta


def openvino_engine_for(weights: str, precision: str, device: str = "CPU", threads: int | None = None,
                        cache_dir=None, onnx_cache_dir=None, onnx_opset: int | None = None):
    """``(OpenVINOEngine, onnx_path or None)`` for a ``.onnx``/``.xml`` or a ``.safetensors``
    checkpoint (exported through the onnxruntime engine's cache,
    :func:`ciae_core.engine_onnxruntime.onnx_for_checkpoint`). bf16 on a CPU without it and int8
    from a float checkpoint fail before any export."""
    from ciae_core.cpu_features import check_precision, cpu_features
    from ciae_core.engine_onnxruntime import onnx_for_checkpoint

    path, onnx_path = weights, None
    if str(device).upper() == "CPU" and precision == "bf16":
        check_precision(precision, cpu_features(), engine="openvino")
    if not str(weights).lower().endswith((".onnx", ".xml")):
        if precision == "int8":
            raise PredictorError(f"{weights}: precision='int8' needs an int8 model; write one with ciae-export "
                                 f"--weights {weights} --int8 --calib DIR --out MODEL.xml")
        path = onnx_path = onnx_for_checkpoint(weights, onnx_cache_dir, onnx_opset)
    return OpenVINOEngine(path, device=device, precision=precision, threads=threads, cache_dir=cache_dir), onnx_path


class OpenVINOEngine:
    """``forward_raw`` compiled by OpenVINO (module docstring for the decisions).

    Args:
        path: ``.onnx`` (``ciae-export``) or ``.xml`` (ciae OpenVINO IR).
        device: OpenVINO device, "CPU" or "GPU" (an Intel GPU).
        precision: one of :data:`OPENVINO_PRECISIONS`.
        threads: CPU inference threads (None: OpenVINO's default).
        cache_dir: compiled-model cache (None: :func:`default_openvino_cache_dir`).
        static_shapes: compile fixed-shape copies of a dynamic model per input shape.
        max_shapes: fixed-shape compiled models kept.
        features: CPU features for the precision checks (None: this machine's).
    """

    name = "openvino"

    def __init__(self, path: str | os.PathLike, device: str = "CPU", precision: str = "fp32",
                 threads: int | None = None, cache_dir: str | os.PathLike | None = None, static_shapes: bool = True,
                 max_shapes: int = 4, features=None):
        from ciae_core.no_telemetry import import_openvino

        from ciae_core.openvino_core import ensure_signal_stack, shared_core

        ov = import_openvino()
        ensure_signal_stack()
        self.path = os.fspath(path)
        self.core = shared_core()  # never destroyed: see ciae_core.openvino_core
        self.device = torch.device("cpu")
        self.ov_device = self._checked_device(device)
        if not os.path.exists(self.path):
            raise PredictorError(f"model file not found: {self.path}")
        model, self.config, self.metadata = read_model_file(self.path, self.core)
        self.quantized = is_quantized(model)
        self.precision, self.precision_reason = self._resolve_precision(precision, features)
        self._check_io(model)
        self._properties = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": _HINT[self.precision]}
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
                raise PredictorError(f"threads must be a non-negative integer (0: OpenVINO's default), got {quote(threads)}")
            if threads and self.ov_device == "CPU":
                self._properties["INFERENCE_NUM_THREADS"] = int(threads)
        self.cache_dir = pathlib.Path(cache_dir) if cache_dir else default_openvino_cache_dir()
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PredictorError(f"cannot create the OpenVINO cache {self.cache_dir}: {e.strerror}; set cache_dir") from None
        self._properties["CACHE_DIR"] = str(self.cache_dir)  # per compiled model: the Core is shared
        self._model = model
        in_shape = model.inputs[0].get_partial_shape()
        fixed = [d.is_static for d in in_shape]
        if len(fixed) != 4 or fixed[2] != fixed[3]:
            raise PredictorError(f"{self.path}: input shape {in_shape} is not (N, 3, H, W) with both H and W fixed or both "
                                 f"dynamic; re-export with ciae-export")
        self.fixed_batch: int | None = in_shape[0].get_length() if fixed[0] else None
        self.fixed_hw: tuple[int, int] | None = ((in_shape[2].get_length(), in_shape[3].get_length())
                                                 if fixed[2] else None)
        self.static_shapes = bool(static_shapes) and not all(fixed)
        self.max_shapes = int(max_shapes)
        self._general = self._compile(model)  # dynamic (or the file's fixed shape)
        self._per_shape: OrderedDict[tuple, tuple] = OrderedDict()
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self.providers = [f"OpenVINO {ov.get_version().split('-')[0]} {self.ov_device} {self.precision}"]
        logger.info("OpenVINO engine: %s on %s, precision %s (%s)", self.path, self.ov_device, self.precision,
                    self.precision_reason)

    # -- construction helpers ---------------------------------------------------------------------
    def _checked_device(self, device: str) -> str:
        dev = str(device).upper()
        if dev.split(".")[0] not in OPENVINO_DEVICES:
            raise PredictorError(f"unknown OpenVINO device {quote(device)}; use 'CPU' or 'GPU' (an Intel GPU)")
        available = list(self.core.available_devices)
        if dev not in available and not (dev == "GPU" and any(d.startswith("GPU") for d in available)):
            raise PredictorError(f"OpenVINO device {quote(dev)} is not present (available: {', '.join(available)}); "
                                 f"use 'CPU'")
        return dev

    def _resolve_precision(self, precision: str, features) -> tuple[str, str]:
        from ciae_core.cpu_features import check_precision, choose_precision, cpu_features

        if precision not in OPENVINO_PRECISIONS:
            raise PredictorError(f"unknown precision {quote(precision)} for the openvino engine; choose one of "
                                 f"{', '.join(OPENVINO_PRECISIONS)}")
        on_cpu = self.ov_device == "CPU"
        if precision == "auto":
            if self.quantized:
                return "int8", "the file is an int8 (quantised) model"
            if not on_cpu:
                return "fp16", "the Intel GPU's native precision"
            return choose_precision(features or cpu_features(), engine="openvino")
        if self.quantized and precision != "int8":
            raise PredictorError(f"{self.path} is an int8 (quantised) model; use precision='int8' (or 'auto'), or the "
                                 f"fp32 .onnx for precision={quote(precision)}")
        if precision == "int8" and not self.quantized:
            raise PredictorError(f"{self.path} is not quantised; precision='int8' needs an int8 IR written by "
                                 f"ciae-export --int8 --calib DIR")
        if on_cpu and precision == "fp16":
            raise PredictorError("precision='fp16' is for device='GPU' (Intel GPU); on the CPU use 'fp32', 'bf16' "
                                 "(AMX/AVX512_BF16) or 'int8'")
        if not on_cpu and precision == "bf16":
            raise PredictorError("precision='bf16' is for the CPU; on an Intel GPU use 'fp16' or 'fp32'")
        if on_cpu:
            check_precision(precision, features or cpu_features(), engine="openvino")
        return precision, "asked for"

    def _check_io(self, model) -> None:
        inputs = [_port_name(i, ("images",)) for i in model.inputs]
        outputs = [_port_name(o) for o in model.outputs]
        if inputs != ["images"] or sorted(outputs) != sorted(RAW_OUTPUT_NAMES):
            raise PredictorError(f"{self.path} is not a ciae forward_raw model: inputs {inputs}, outputs {outputs} "
                                 f"(expected ['images'] and {list(RAW_OUTPUT_NAMES)}); re-export with ciae-export")
        shapes = {_port_name(o): o.get_partial_shape() for o in model.outputs}
        t, d, k = self.config.num_things, self.config.embed_dim, len(self.config.categories)
        cls_t, mem = shapes["cls_logits"][2], shapes["memory"]
        if (cls_t.is_static and cls_t.get_length() != t) or (
                mem.is_static and tuple(v.get_length() for v in mem) != (k, d)):
            raise PredictorError(f"{self.path}: graph outputs (cls_logits {shapes['cls_logits']}, memory {mem}) do not "
                                 f"match its metadata config ({t} thing classes, {k} categories, embed_dim {d}); "
                                 f"re-export with ciae-export")

    def _compile(self, model) -> tuple:
        try:
            compiled = self.core.compile_model(model, self.ov_device, self._properties)
        except Exception as e:  # noqa: BLE001 - plugin/compile failures, in one line
            raise PredictorError(f"OpenVINO cannot compile {self.path} for {self.ov_device} "
                                 f"({self.precision}): {_first_line(e)}") from None
        names = [_port_name(o) for o in compiled.outputs]
        return compiled, compiled.create_infer_request(), names

    # -- running ----------------------------------------------------------------------------------
    @property
    def compiled_properties(self) -> dict:
        """The properties OpenVINO reports for the general compiled model (for logs and tests)."""
        compiled = self._general[0]
        keys = ["PERFORMANCE_HINT", "INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS"]
        out = {}
        for key in keys:
            try:
                out[key] = compiled.get_property(key)
            except Exception:  # noqa: BLE001 - a property some device does not report
                continue
        return out

    def _request_for(self, shape: tuple) -> tuple:
        if not self.static_shapes:
            return self._general
        entry = self._per_shape.pop(shape, None)
        if entry is None:
            if shape not in self._seen:  # first sighting: the dynamic model (module docstring)
                self._seen[shape] = None
                while len(self._seen) > 64:
                    self._seen.popitem(last=False)
                return self._general
            model = self._model.clone()
            model.reshape({"images": list(shape)})
            entry = self._compile(model)
            logger.debug("OpenVINO: compiled %s for input shape %s", self.path, shape)
            if len(self._per_shape) >= self.max_shapes:
                self._per_shape.popitem(last=False)
        self._per_shape[shape] = entry  # most recently used last
        return entry

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` float ``(N, 3, H, W)`` → raw outputs (float32 CPU tensors)."""
        from ciae_core.engine_onnxruntime import run_in_fixed_batches

        return run_in_fixed_batches(self._run, images, self.fixed_batch)

    def _run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        if self.fixed_hw is not None and tuple(x.shape[2:]) != self.fixed_hw:
            fh, fw = self.fixed_hw
            raise PredictorError(f"{self.path} is a fixed {fh}x{fw} model, got a {x.shape[2]}x{x.shape[3]} input; "
                                 f"letterbox into the canvas (Predictor does) or use a dynamic export")
        _, request, names = self._request_for(tuple(x.shape))
        try:
            result = request.infer({0: x}, share_inputs=True, share_outputs=False)
        except Exception as e:  # noqa: BLE001 - a runtime failure of the plugin, in one line
            raise PredictorError(f"OpenVINO inference failed on {self.path} for input {tuple(x.shape)}: "
                                 f"{_first_line(e)}") from None
        out = {name: torch.from_numpy(np.asarray(result[i], dtype=np.float32)) for i, name in enumerate(names)}
        h, w = x.shape[2:]
        s, d = self.config.branch_stride, self.config.embed_dim
        want = (x.shape[0], d, -(-h // s), -(-w // s))
        if tuple(out["embedding"].shape) != want:
            raise PredictorError(f"{self.path}: the graph's embedding output {tuple(out['embedding'].shape)} does not "
                                 f"match its metadata config (embed_dim {d}, stride {s}: {want} for a {h}x{w} input); "
                                 f"the file was edited or mixed up, write it again")
        return out
