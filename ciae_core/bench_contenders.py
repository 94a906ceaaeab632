"""The contenders of ``ciae-bench``: ours and its peers, built and run alike on the same inputs.

Models (random weights unless a checkpoint is given; latency does not depend on the values,
except through the number of detections, which we fix, see below):

* ``ours`` — :class:`ciae_core.predictor.Predictor`, torch eager (``--engines torch``) and
  onnxruntime (``--engines onnxruntime``; the checkpoint is exported once to a temporary cache).
  ``r50``: the paper's ResNet-50-FPN config with the 133 COCO panoptic categories;
  ``r50-p3``: the same with the embedding branch starting at P3 (our speed variant, no FPN P2);
  ``r50-p3c2``: the P3 branch plus a 1x1 skip from C2 back to stride 4 (our second variant);
  ``small``: the shipped model (``--small-weights``, default the first ``models/*.safetensors``),
  else the ``config/train/synthetic_small.yaml`` architecture with random weights.
* ``fcos`` — ``torchvision.models.detection.FCOS`` with the same backbone
  (``fcos_resnet50_fpn(weights=None, weights_backbone=None)`` for r50); input resized by its own
  transform to the same shorter side / max size.
* ``maskrcnn`` — ``torchvision.models.detection.MaskRCNN`` with the same backbone
  (``maskrcnn_resnet50_fpn`` for r50), same resizing.

Every torch model runs in the same memory format (``--channels-last``; by default the
Predictor's: channels_last on the CPU, NCHW on CUDA; the peers are converted alike), with the
same thread settings.

Decision (detections): random weights give arbitrary numbers of detections, which changes the
cost of NMS, fusion and mask pasting. All models are therefore run at score threshold 0 with the
same cap of ``--detections`` (default 30) instances per image, so every model post-processes the
same number of instances (Mask R-CNN runs its mask head and pastes that many masks; ours fuses
that many instance queries plus all stuff queries).

Stage breakdown of ours (torch engine, separate timed repeats with a synchronise between stages;
the forward pass runs eagerly there, since module boundaries are invisible in a CUDA-graph
replay, so on CUDA ``backbone_fpn + heads`` exceed the graph-replayed forward of the end-to-end
timing; the fusion share is the ``fusion`` stage over the end-to-end median):
``resize_copy`` (letterbox + upload; also the final map-back + device→host copy, reported as
``map_back_copy``), ``backbone_fpn``, ``heads`` (proposal head + embedding branch, the rest of
``forward_raw``), ``proposal_selection`` (:func:`ciae_core.fusion.select_proposals`) and
``fusion`` (the rest of :func:`ciae_core.fusion.panoptic_from_raw`: queries + Eq. 16); the
backbone and the selection are timed inside the calls that make them (forward hooks, a timing
wrapper), so each stage comes from one call.

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
                             memory_level, summarize, sync, time_calls)

logger = logging.getLogger(__name__)

BACKBONES = {"r50": "resnet50", "r50-p3": "resnet50", "r50-p3c2": "resnet50"}  # -> torchvision backbone (peers)
# ours' architecture per bench name (random weights): the paper's R50-FPN, and our variants whose
# embedding branch starts at P3 (CIAEConfig.embedding_from_level=3), without or with the C2 skip
OURS_ARCH = {"r50": {"backbone": "resnet50"}, "r50-p3": {"backbone": "resnet50", "embedding_from_level": 3},
             "r50-p3c2": {"backbone": "resnet50", "embedding_from_level": 3, "embedding_c2_skip": True}}
ALL_MODELS = ("ours", "fcos", "maskrcnn")
# the shipped small model's architecture (config/train/synthetic_small.yaml) for a random stand-in
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
    cuda_graphs: bool = True  # ours (torch): replay CUDA graphs on CUDA
    threads: int = 0  # onnxruntime intra-op threads (0: its default)
    ort_providers: str | None = None  # comma-separated onnxruntime providers for ours, see ort_providers


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
        raise BenchError(f"unknown peer model {kind!r}")
    return m.eval()


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


def prepare_ours(weights: pathlib.Path, engine: str, size: int, images, device: torch.device,
                 options: BenchOptions, cache_dir: pathlib.Path) -> Contender:
    """Ours (a :class:`~ciae_core.predictor.Predictor` on ``engine``) at shorter side ``size``."""
    from ciae_core.predictor import Predictor

    base_rss = memory_level(device)
    base_device_used = device_used_bytes(device)
    kw = dict(engine=engine, device=str(device), input_size=size, max_size=options.max_size,
              input_size_range=(64, 4096), **_fusion_thresholds(options.detections))
    if engine == "torch":
        kw.update(precision=options.precision, channels_last=channels_last_for(options.channels_last, device),
                  cuda_graphs=options.cuda_graphs)
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
        if engine == "torch":
            extra["stages_ms"] = ours_stage_breakdown(predictor, images, device, options)
        return extra

    memory_mode = None
    if engine == "torch" and getattr(predictor._engine, "cuda_graphs", False):
        @contextlib.contextmanager
        def memory_mode():  # eager forward for the memory call (ciae_core.bench's docstring)
            torch_engine = predictor._engine
            graphs, torch_engine.cuda_graphs = torch_engine.cuda_graphs, False
            try:
                predictor(images[0])  # one untimed eager call first (eager allocations, cuDNN plans)
                yield
            finally:
                torch_engine.cuda_graphs = graphs

    info = {"providers": predictor.providers, "weights": str(weights), "backbone_name": predictor.config.backbone}
    if engine == "torch":
        info["channels_last"] = _is_channels_last(predictor._engine.model)
    return Contender("ours", engine, call, info, finish, base_rss, base_device_used, memory_mode)


def _is_channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's first 4-d convolution weight is stored channels_last (what the run used)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4:
            return m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
    return False


@contextlib.contextmanager
def _timed_proposal_selection(device: torch.device, spans: list[float]):
    """While active, every call of :func:`ciae_core.fusion.select_proposals` made through
    ``ciae_core.fusion`` (the one ``panoptic_from_raw`` makes) appends its ms to ``spans``, with a
    synchronise around it — the function-level counterpart of the backbone's forward hooks, so the
    selection and the fusion are both timed inside the same postprocess call (two separately
    timed calls differ by more than a small model's fusion on a busy machine)."""
    from ciae_core import fusion

    select = fusion.select_proposals

    def timed(*args, **kwargs):
        sync(device)
        t0 = time.perf_counter()
        out = select(*args, **kwargs)
        sync(device)
        spans.append((time.perf_counter() - t0) * 1e3)
        return out

    fusion.select_proposals = timed
    try:
        yield
    finally:
        fusion.select_proposals = select


def ours_stage_breakdown(predictor, images, device: torch.device, options: BenchOptions) -> dict[str, float]:
    """Median ms per stage (module docstring), with a synchronise between stages."""
    engine = predictor._engine
    model = engine.model
    graphs, engine.cuda_graphs = engine.cuda_graphs, False  # module hooks do not fire in graph replays
    marks: dict[str, float] = {}

    def pre_hook(_m, _inp):
        sync(device)
        marks["bb0"] = time.perf_counter()

    def post_hook(_m, _inp, _out):
        sync(device)
        marks["bb1"] = time.perf_counter()

    h1 = model.backbone.register_forward_pre_hook(pre_hook)
    h2 = model.backbone.register_forward_hook(post_hook)
    rows: dict[str, list[float]] = {k: [] for k in ("resize_copy", "backbone_fpn", "heads", "proposal_selection",
                                                    "fusion", "map_back_copy")}
    try:
        for i in range(options.warmup + options.repeats):
            im = images[i % len(images)]
            sync(device)
            t0 = time.perf_counter()
            batch, boxes = predictor.preprocess([im])
            sync(device)
            t1 = time.perf_counter()
            raw = predictor.forward_raw(batch)
            sync(device)
            t2 = time.perf_counter()
            backbone_ms = (marks["bb1"] - marks["bb0"]) * 1e3  # this forward's: the full call below fires the hooks too
            spans: list[float] = []
            with _timed_proposal_selection(device, spans):
                predictor.postprocess(raw, boxes)
            sync(device)
            t3 = time.perf_counter()
            if len(spans) != 1:
                raise BenchError("stage breakdown: postprocess did not select proposals through ciae_core.fusion")
            predictor(im)  # full call: its map_back + to_host stages
            if i < options.warmup:
                continue
            rows["resize_copy"].append((t1 - t0) * 1e3)
            rows["backbone_fpn"].append(backbone_ms)
            rows["heads"].append((t2 - t1) * 1e3 - backbone_ms)
            rows["proposal_selection"].append(spans[0])
            rows["fusion"].append(max(0.0, (t3 - t2) * 1e3 - spans[0]))
            rows["map_back_copy"].append(predictor.timings["map_back"] + predictor.timings["to_host"])
    finally:
        h1.remove()
        h2.remove()
        engine.cuda_graphs = graphs
    return {k: float(np.median(v)) for k, v in rows.items()}


def prepare_peer(kind: str, backbone_name: str, size: int, images, device: torch.device,
                 options: BenchOptions) -> Contender:
    """A torchvision peer (``fcos`` / ``maskrcnn``) with the same input and output contract as ours."""
    base_rss = memory_level(device)
    base_device_used = device_used_bytes(device)
    model = build_peer(kind, backbone_name, size, options.max_size, options.detections).to(device)
    if channels_last_for(options.channels_last, device):  # the same memory format as ours (fair ratios)
        model = model.to(memory_format=torch.channels_last)
    use_amp = device.type == "cuda" and options.precision in ("fp16", "bf16")
    dtype = torch.float16 if options.precision == "fp16" else torch.bfloat16

    def call(i: int):
        im = images[i % len(images)]
        # same input contract as ours: uint8 host image in, results on the host out
        x = torch.from_numpy(im).to(device, non_blocking=True).permute(2, 0, 1).float().div_(255.0)
        ctx = torch.autocast("cuda", dtype=dtype) if use_amp else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            out = model([x])[0]
        {k: v.cpu() for k, v in out.items()}

    return Contender(kind, "torch", call, {"backbone_name": backbone_name, "channels_last": _is_channels_last(model)},
                     base_rss=base_rss,
                     base_device_used=base_device_used)


def channels_last_for(choice: str, device: torch.device) -> bool:
    """``--channels-last`` → the memory format of every torch model of the run (ours and the
    peers alike, so the ratios compare like with like): ``auto`` follows the Predictor's default
    (on for the CPU, off for CUDA)."""
    if choice not in ("auto", "on", "off"):
        raise BenchError(f"--channels-last must be auto, on or off, got {choice!r}")
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
