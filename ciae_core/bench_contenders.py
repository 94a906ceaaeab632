"""The contenders of ``ciae-bench``: ours and its peers, built and run alike on the same inputs.

Models (random weights unless a checkpoint is given; latency does not depend on the values,
except through the number of detections, which we fix, see below):

* ``ours`` — :class:`ciae_core.predictor.Predictor`, torch eager (``--engines torch``),
  onnxruntime (``--engines onnxruntime``; the checkpoint is exported once to a temporary cache)
  and OpenVINO (``--engines openvino``); an engine may name its precision (``torch:bf16``,
  ``openvino:bf16``, ``openvino:int8``, :func:`parse_engine_spec`). The ``openvino:int8`` row
  quantises the checkpoint once (:func:`int8_model`: synthetic calibration scenes, kept in
  ``$CIAE_CACHE_DIR/int8`` across runs; for a random-weight model only its speed means anything).
  ``r50``: the paper's ResNet-50-FPN config with the 133 COCO panoptic categories;
  ``r50-p3``: the same with the embedding branch starting at P3 (our speed variant, no FPN P2);
  ``r50-p3c2``: the P3 branch plus a 1x1 skip from C2 back to stride 4 (our second variant);
  ``small``: the shipped model (``--small-weights``, default the first ``models/*.safetensors``),
  else the ``config/train/synthetic_small.yaml`` architecture with random weights.
* ``fcos`` / ``maskrcnn`` — the torchvision peers with the same backbone, resized by their own
  transform to the same shorter side / max size (:mod:`ciae_core.bench_peers`; FCOS's backbone +
  head replayed from a CUDA graph on CUDA, as ours' forward).

Every torch model runs in the same memory format (``--channels-last``; by default the
Predictor's: channels_last on the CPU, NCHW on CUDA; the peers are converted alike), with the
same thread settings, the same precision (``--precision``: autocast on CUDA) and, with
``--compile``, ``torch.compile`` for ours' ``forward_raw`` and FCOS's backbone + head. Every row
says how it was timed (``timing``; ours: :data:`OURS_TIMING`).

Decision (detections): random weights give arbitrary numbers of detections, which changes the
cost of NMS, fusion and mask pasting. All models are therefore run at score threshold 0 with the
same cap of ``--detections`` (default 30) instances per image, so every model post-processes the
same number of instances (Mask R-CNN runs its mask head and pastes that many masks; ours fuses
that many instance queries plus all stuff queries).

Stage breakdown of ours (torch engine; :mod:`ciae_core.bench_stages`: CUDA events on CUDA, no
synchronise between stages), in separate repeats after the timed rounds: ``resize_copy``,
``backbone_fpn``, ``heads``, ``proposal_selection``, ``fusion``, ``map_back_copy``; the fusion
share is the ``fusion`` stage over the end-to-end median.

Timing: per (backbone, size) every model is built and warmed up, then the timed calls run in
interleaved rounds (each round calls every model once on the same image, the order rotating), so
slow drifts of the machine's load affect all models alike (:func:`bench_group`). How time and
memory are measured is :mod:`ciae_core.bench`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import time
from typing import Any, Callable

import numpy as np
import torch

from ciae_core.bench import (BenchError, PeakMemory, coco_categories, data_roots, device_used_bytes, memory_fields,
                             memory_level, summarize, time_calls)
# build_peer and the stage-breakdown helpers keep their import path here
from ciae_core.bench_peers import build_peer, peer_info, peer_runner  # noqa: F401
from ciae_core.bench_stages import (EVENT_TIMING, SYNC_TIMING, _timed_proposal_selection, eager_calls,  # noqa: F401
                                    ours_stage_breakdown)
from ciae_core.user_input import quote

logger = logging.getLogger(__name__)

BACKBONES = {"r50": "resnet50", "r50-p3": "resnet50", "r50-p3c2": "resnet50"}  # -> torchvision backbone (peers)
# ours' architecture per bench name (random weights): the paper's R50-FPN, and our variants whose
# embedding branch starts at P3 (CIAEConfig.embedding_from_level=3), without or with the C2 skip
OURS_ARCH = {"r50": {"backbone": "resnet50"}, "r50-p3": {"backbone": "resnet50", "embedding_from_level": 3},
             "r50-p3c2": {"backbone": "resnet50", "embedding_from_level": 3, "embedding_c2_skip": True}}
ALL_MODELS = ("ours", "fcos", "maskrcnn")
# the shipped small model's architecture (config/train/synthetic_small.yaml) for a random stand-in
# how ours' rows were timed, by CUDA-graph path (the row's "timing")
_OURS_CALL = ("wall time per call, synchronised at both ends: uint8 host image -> id map and segment table on the "
              "host; ")
OURS_TIMING = {"off": _OURS_CALL + "eager forward and postprocess",
               "forward": _OURS_CALL + "forward replayed from a CUDA graph per input shape (captured on its second "
                                       "sighting), postprocess eager",
               "full": _OURS_CALL + "the whole call replayed from one CUDA graph per input shape (captured on its "
                                    "second sighting; ciae_core.full_graph), H2D and D2H copies around it"}
GRAPH_MODES = tuple(OURS_TIMING)  # --cuda-graphs values for ours
STAGE_TIMING = {True: EVENT_TIMING, False: SYNC_TIMING}  # by "on CUDA"
SMALL_ARCH = dict(backbone="mobilenet_v3_large", backbone_norm="gn", trainable_backbone_layers=5, fpn_channels=64,
                  head_channels=64, tower_depth=2, embed_dim=32, embed_branch_channels=64, embedding_stride=4)



@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What every contender of a run shares (the ``ciae-bench`` flags of the same names)."""

    warmup: int = 3  # untimed calls per model before its memory call and the timed rounds
    repeats: int = 20  # timed calls per model (interleaved rounds)
    detections: int = 30  # instances per image for every model (module docstring)
    max_size: int = 1333  # longer-side limit of every model's resize
    precision: str = "fp32"  # fp32, fp16 or bf16: autocast on CUDA (torch engines); fp16 also TensorRT fp16
    channels_last: str = "auto"  # auto, on or off: see channels_last_for
    cuda_graphs: bool = True  # FCOS (and ours unless graph_modes says otherwise): CUDA graphs on CUDA
    graph_modes: tuple[str, ...] = ("forward",)  # ours (torch): one row per mode (GRAPH_MODES), see ours_variants
    compile: bool = False  # torch.compile ours' forward_raw and FCOS's backbone + head
    threads: int = 0  # onnxruntime / OpenVINO threads (0: their default)
    ort_providers: str | None = None  # comma-separated onnxruntime providers for ours, see ort_providers
    int8_calib_images: int = 64  # synthetic calibration scenes of the openvino:int8 rows


def parse_engine_spec(spec: str) -> tuple[str, str | None]:
    """``"engine[:precision]"`` → ``(engine, precision or None)``; :class:`BenchError` if unknown."""
    from ciae_core.predictor_settings import ENGINE_PRECISIONS

    engine, _, precision = spec.partition(":")
    if engine not in ENGINE_PRECISIONS:
        raise BenchError(f"unknown engine {engine!r} in {spec!r}; use {', '.join(ENGINE_PRECISIONS)}[:precision]")
    if precision and precision not in ENGINE_PRECISIONS[engine]:
        raise BenchError(f"engine {engine} has no precision {precision!r}; use one of "
                         f"{', '.join(ENGINE_PRECISIONS[engine])}")
    return engine, precision or None


def int8_model(weights: pathlib.Path, onnx_cache: pathlib.Path, num_images: int) -> pathlib.Path:
    """The int8 OpenVINO IR of ``weights`` on ``num_images`` synthetic calibration scenes, quantised
    once and kept in ``$CIAE_CACHE_DIR/int8`` (keyed by the checkpoint's hash)."""
    from ciae_core.engine_onnxruntime import default_onnx_cache_dir, onnx_for_checkpoint
    from ciae_core.export import ExportError, file_sha256
    from ciae_core.openvino_ir import read_ir
    from ciae_core.quantize import quantize

    out = default_onnx_cache_dir().parent / "int8" / f"{weights.stem}-{file_sha256(str(weights))[:16]}-synthetic" \
                                                     f"{num_images}.xml"
    if out.is_file():
        try:
            read_ir(out)
            return out
        except ExportError as e:
            logger.warning("cached int8 model unusable (%s); quantising again", e)
    logger.info("quantising %s to int8 for the bench (once; cached in %s)", weights, out.parent)
    return pathlib.Path(quantize(onnx_for_checkpoint(str(weights), onnx_cache, None), out, calibration="synthetic",
                                 num_images=num_images))


def ours_checkpoint(backbone: str, directory: pathlib.Path, small_weights: str | None) -> pathlib.Path:
    """Weights for ``ours``: the shipped/given small model, or a random model saved to ``directory``."""
    if backbone == "small":
        cand = small_weights or next((m for r in data_roots() for m in sorted((r / "models").glob("*.safetensors"))),
                                     None)
        if cand:
            return pathlib.Path(cand)
    from ciae_core.checkpoint import save_model
    from ciae_core.model import CIAE

    torch.manual_seed(0)
    arch = SMALL_ARCH if backbone == "small" else OURS_ARCH[backbone]
    model = CIAE(coco_categories(), **arch)
    return save_model(directory / f"ours-{backbone}-random.safetensors", model)


# ----------------------------------------------------------------------------------------------
# per-model runs


def _fusion_thresholds(detections: int) -> dict[str, Any]:
    return dict(score_threshold=0.0, instance_score_threshold=0.0, detections_per_img=detections)


class Contender:
    """One model of a (backbone, size) group: ``call(i)`` runs image ``i`` end to end;
    ``finish()`` adds model-specific fields to its row after the timed rounds."""

    def __init__(self, model: str, engine: str, call: Callable[[int], Any], info: dict[str, Any],
                 finish: Callable[[], dict[str, Any]] | None = None, base_rss: int | None = None,
                 base_device_used: int | None = None,
                 memory_mode: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.model, self.engine, self.call, self.info = model, engine, call, info
        self.finish = finish or (lambda: {})
        self.base_rss = base_rss
        self.base_device_used = base_device_used
        # context for the memory call (ours/torch on CUDA: CUDA graphs off), None: as timed
        self.memory_mode = memory_mode
        self.times: list[float] = []


def ours_variants(spec: str, options: BenchOptions) -> list[str]:
    """The rows of ours for the engine ``spec``: a torch spec (``torch``, ``torch:bf16``) gives one
    row per CUDA-graph path of ``options.graph_modes`` — the spec itself for the first (the one the
    ratios use), ``<spec>/<mode>`` for each further one; any other spec one row."""
    if parse_engine_spec(spec)[0] != "torch":
        return [spec]
    modes = list(options.graph_modes) if options.cuda_graphs else ["off"]
    return [spec] + [f"{spec}/{m}" for m in modes[1:]]


def _graph_mode(label: str, options: BenchOptions) -> str:
    return label.split("/", 1)[1] if "/" in label else (options.graph_modes[0] if options.cuda_graphs else "off")


def _path_used(predictor) -> str:
    """The CUDA-graph path a predictor's timed calls took (a failed capture falls back)."""
    full = getattr(predictor, "_full", None)
    if full is not None and full.enabled and full._graphs:
        return "full"
    return "forward" if predictor._engine.cuda_graphs else "off"


def prepare_ours(weights: pathlib.Path, label: str, size: int, images, device: torch.device,
                 options: BenchOptions, cache_dir: pathlib.Path) -> Contender:
    """Ours (a :class:`~ciae_core.predictor.Predictor`) at shorter side ``size``; ``label``: a row of
    :func:`ours_variants`, an engine spec (:func:`parse_engine_spec`) with, for torch, its CUDA-graph path."""
    from ciae_core.predictor import Predictor

    spec = label.split("/", 1)[0]
    engine, precision = parse_engine_spec(spec)
    base_rss = memory_level(device)
    base_device_used = device_used_bytes(device)
    torch_engine = engine == "torch"
    mode = _graph_mode(label, options) if torch_engine else "off"
    kw = dict(engine=engine, device=str(device), input_size=size, max_size=options.max_size,
              input_size_range=(64, 4096), **_fusion_thresholds(options.detections))
    if torch_engine:
        kw.update(precision=precision or options.precision,
                  channels_last=channels_last_for(options.channels_last, device),
                  cuda_graphs={"off": False, "forward": True, "full": "full"}[mode], compile=options.compile)
    elif engine == "openvino":
        kw.update(onnx_cache_dir=cache_dir, intra_op_threads=options.threads or None, precision=precision or "fp32")
        if precision == "int8":
            weights = int8_model(weights, cache_dir, options.int8_calib_images)
    else:
        kw.update(onnx_cache_dir=cache_dir, intra_op_threads=options.threads or None)
        providers = ort_providers(options.ort_providers, device)
        if providers is not None:
            kw["providers"] = providers
        if device.type == "cuda":
            kw["trt_fp16"] = options.precision == "fp16"
    predictor = Predictor(weights, **kw)
    stage_sums: dict[str, list[float]] = {}

    def call(i: int):
        predictor(images[i % len(images)])
        for k, v in predictor.timings.items():
            stage_sums.setdefault(k, []).append(v)

    def finish() -> dict[str, Any]:
        # the timed calls only: not the warm-up calls nor the memory call
        extra = {"predictor_timings_ms": {k: float(np.median(v[options.warmup + 1:] or v))
                                          for k, v in stage_sums.items()}}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if torch_engine:  # the path the timed calls took (a failed capture falls back to eager)
            used = _path_used(predictor)
            extra.update(cuda_graphs=used, timing=OURS_TIMING[used])
            if predictor._full is not None:
                extra["nms_fallbacks"] = predictor._full.fallbacks
            if used == "full":
                from ciae_core.bench_graph_stages import GRAPH_STAGE_TIMING, graph_stage_breakdown

                extra["graph_stages_ms"] = graph_stage_breakdown(predictor, images[0], options.repeats)
                extra["graph_stages_timing"] = GRAPH_STAGE_TIMING
        if spec == "torch":  # (one eager breakdown per path; not for a second torch precision)
            extra["stages_ms"] = ours_stage_breakdown(predictor, images, device, options.warmup, options.repeats)
            extra["stages_timing"] = STAGE_TIMING[device.type == "cuda"]
        return extra

    memory_mode = None
    if torch_engine and mode != "off" and device.type == "cuda":
        @contextlib.contextmanager
        def memory_mode():  # eager calls for the memory call (ciae_core.bench's docstring)
            with eager_calls(predictor):
                predictor(images[0])  # one untimed eager call first (eager allocations, cuDNN plans)
                yield

    info = {"providers": predictor.providers, "weights": str(weights), "backbone_name": predictor.config.backbone,
            "precision": predictor.precision}
    if torch_engine:
        info.update(channels_last=_is_channels_last(predictor._engine.model), compile=options.compile,
                    cuda_graphs=mode, timing=OURS_TIMING[mode])
    return Contender("ours", label, call, info, finish, base_rss, base_device_used, memory_mode)


def _is_channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's first 4-d convolution weight is stored channels_last (what the run used)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4:
            return m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
    return False


def prepare_peer(kind: str, backbone_name: str, size: int, images, device: torch.device,
                 options: BenchOptions) -> Contender:
    """A torchvision peer (``fcos`` / ``maskrcnn``) with the same input and output contract as ours,
    run as :func:`ciae_core.bench_peers.peer_runner` says (FCOS: backbone + head from a CUDA graph)."""
    base_rss = memory_level(device)
    base_device_used = device_used_bytes(device)
    run, model, forward = peer_runner(kind, backbone_name, size, device, max_size=options.max_size,
                                      detections=options.detections, precision=options.precision,
                                      channels_last=channels_last_for(options.channels_last, device),
                                      cuda_graphs=options.cuda_graphs, compile=options.compile)

    def call(i: int):
        run(images[i % len(images)])

    return Contender(kind, "torch", call, {"backbone_name": backbone_name, "channels_last": _is_channels_last(model)},
                     finish=lambda: peer_info(forward), base_rss=base_rss, base_device_used=base_device_used)


def channels_last_for(choice: str, device: torch.device) -> bool:
    """``--channels-last`` → the memory format of every torch model of the run (ours and the
    peers alike, so the ratios compare like with like): ``auto`` follows the Predictor's default
    (on for the CPU, off for CUDA)."""
    if choice not in ("auto", "on", "off"):
        raise BenchError(f"--channels-last must be auto, on or off, got {quote(choice)}")
    return device.type == "cpu" if choice == "auto" else choice == "on"


def ort_providers(text: str | None, device: torch.device) -> list[str] | None:
    """``--ort-providers`` → the ``providers`` argument of the Predictor: the given list on any
    device (so asking for a provider that cannot run there fails that row, not silently another
    provider); not given: ``["cuda"]`` on a GPU, None (the CPU provider) on the CPU."""
    if text:
        return [t.strip() for t in text.split(",") if t.strip()]
    return ["cuda"] if device.type == "cuda" else None


def _error_row(bb: str, model: str, engine: str, size: int, e: Exception) -> dict[str, Any]:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    logger.warning("bench %s %s/%s @%d failed: %s: %s", bb, model, engine, size, type(e).__name__, msg)
    return {"backbone": bb, "model": model, "engine": engine, "size": size, "error": f"{type(e).__name__}: {msg}"}


def interleaved_rounds(contenders: list[Contender], device: torch.device, repeats: int,
                       settle_s: float = 0.0) -> list[tuple[Contender, Exception]]:
    """``repeats`` rounds; round r times ``call(r)`` of every contender once, starting with
    contender ``r mod n`` (the order rotates so no model always runs first or right after the
    same neighbour). Times go to ``contender.times``; a contender whose call raises is dropped
    (``times = None``) and returned with its exception. ``settle_s``: idle time before each
    timed call, so the previous model's worker threads (OpenMP, onnxruntime), which spin for a
    while after their work, are asleep and do not compete with the next one for the cores."""
    failed = []
    for r in range(repeats):
        for j in range(len(contenders)):
            c = contenders[(r + j) % len(contenders)]
            if c.times is None:
                continue
            if settle_s > 0:
                time.sleep(settle_s)
            try:
                c.times += time_calls(lambda _i, c=c, r=r: c.call(r), device, 0, 1)
            except Exception as e:  # noqa: BLE001 - reported in the failing model's row
                failed.append((c, e))
                c.times = None
    return failed


def bench_group(entries: list[tuple[str, str]], bb: str, bb_name: str, size: int, weights, images,
                device: torch.device, options: BenchOptions, cache_dir,
                on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """All models of one (backbone, size): each is built, warmed up and measured for memory (one
    call under :class:`PeakMemory`), then the timed calls run in **interleaved rounds** — every
    round calls each model once on the same image, the order rotating by one per round — so
    drifts in machine load (thermal, other processes) fall on all models alike and the ratios
    stay comparable. A failure is recorded in that model's row (``error``) and the others go on,
    so one peer that breaks on some torchvision version does not lose the rest — and an
    onnxruntime build without the requested provider (a :class:`~ciae_core.predictor.PredictorError`
    from building ours) loses only the onnxruntime row. ``on_row(row)`` is called with each
    measured row as it is complete (the command line prints it)."""
    rows, live = [], []
    for model, engine in entries:
        logger.info("bench %s %s/%s @%d: prepare", bb, model, engine, size)
        try:
            c = (prepare_ours(weights, engine, size, images, device, options, cache_dir) if model == "ours"
                 else prepare_peer(model, bb_name, size, images, device, options))
            time_calls(c.call, device, options.warmup, 0)  # warm-up (cudnn autotuning) outside the memory window
            with (c.memory_mode() if c.memory_mode else contextlib.nullcontext()):
                with PeakMemory(device, c.base_rss, c.base_device_used) as mem:
                    time_calls(c.call, device, 0, 1)
            c.info.update(memory_fields(device.type, engine, mem.peak_mb, mem.delta_mb, mem.device_used_delta_mb,
                                        eager_forward=c.memory_mode is not None))
            live.append(c)
        except Exception as e:  # noqa: BLE001 - keep the other measurements (PredictorError included)
            rows.append(_error_row(bb, model, engine, size, e))
    for c, e in interleaved_rounds(live, device, options.repeats, settle_s=0.1 if device.type == "cpu" else 0.0):
        rows.append(_error_row(bb, c.model, c.engine, size, e))
    for c in live:
        if c.times is None:
            continue
        row = {"backbone": bb, "model": c.model, "engine": c.engine, "size": size, **summarize(c.times), **c.info}
        row.update(c.finish())
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
