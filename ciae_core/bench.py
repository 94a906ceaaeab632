"""``ciae-bench``: latency of CIAE against its detector base (FCOS) and a two-stage peer (Mask R-CNN).

Everything runs in one process on the same inputs with the same thread settings and the same
memory format for every torch model (``--channels-last``; by default the Predictor's: channels_last
on the CPU, NCHW on CUDA; the peers are converted alike): for each
backbone (``r50`` and ``small``) and each shorter-side size, every model gets ``--warmup`` untimed
calls and ``--repeats`` timed calls on the same real images (the COCO sample shipped in
test/data, cycled; for the ``small`` rows two rendered 640x480 synthetic scenes, the shipped
model's domain — on photos its embedding is noise and the fusion would work on a fragmented map
that no deployment of it sees; ``--small-images coco`` to change), and we report the median and the 90th percentile of the end-to-end wall time
(uint8 image in → final result on the host).

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
``fusion`` (the rest of :func:`ciae_core.fusion.panoptic_from_raw`: queries + Eq. 16).

Timing: per (backbone, size) every model is built and warmed up, then the timed calls run in
interleaved rounds (each round calls every model once on the same image, the order rotating), so
slow drifts of the machine's load affect all models alike (:func:`bench_group`).

Peak memory, over one call after the warm-up (whose cuDNN autotuning allocates large trial
workspaces). On the CPU (``mem_kind: "rss"``): the peak resident set size sampled from
``/proc/self/statm`` every 2 ms (``peak_mem_mb``, which includes the models of the group built
before this one) and its increase over the level before this model was built (``mem_delta_mb``,
the number to compare); it counts every allocator, onnxruntime's included.

On CUDA the rows are made comparable as follows (decision; a measured CUDA-graph replay would be
biased in our favour):

* torch rows (``mem_kind: "cuda_max_allocated"``): ``torch.cuda.max_memory_allocated`` over the
  call and its increase over the allocation before the model was built. A CUDA-graph replay
  allocates nothing — the activations of ours' captured forward live in the graph's private
  pool, allocated at capture time — so ``max_memory_allocated`` would miss them while counting
  all of the eager peers'. Ours' memory call therefore runs its forward **eagerly** (graphs off
  for that one call, after one untimed eager call; ``mem_note`` says so); the timed calls still
  replay graphs, whose pool is one more copy of the activations on top (see below).
* the onnxruntime row (``mem_kind: "not_measured_by_torch"``): onnxruntime allocates the graph's
  GPU memory in its own arena, which torch cannot see, so ``peak_mem_mb``/``mem_delta_mb`` are
  ``null``; ``torch_alloc_peak_mb`` is what torch saw (the fusion's share only).
* every CUDA row also has ``device_used_delta_mb``: the device's used memory (``total - free`` of
  ``torch.cuda.mem_get_info``, i.e. cudaMemGetInfo) after the call minus before the model was
  built. It counts every allocator (torch's cache, CUDA-graph pools, onnxruntime's arena, cuDNN
  workspaces) but not memory freed back before the end of the call, and any other process
  on the GPU, so it is a level, not a peak; it is the only number for the onnxruntime row.

Output: a markdown table of latencies and ratios (ours / FCOS, fusion share of ours' total,
onnxruntime / torch, ours / Mask R-CNN) and a stage table on stdout; everything in ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_RELATIVE = pathlib.Path("test") / "data" / "coco-panoptic-sample"
BACKBONES = {"r50": "resnet50", "r50-p3": "resnet50", "r50-p3c2": "resnet50"}  # -> torchvision backbone (peers)
# ours' architecture per bench name (random weights): the paper's R50-FPN, and our variants whose
# embedding branch starts at P3 (CIAEConfig.embedding_from_level=3), without or with the C2 skip
OURS_ARCH = {"r50": {"backbone": "resnet50"}, "r50-p3": {"backbone": "resnet50", "embedding_from_level": 3},
             "r50-p3c2": {"backbone": "resnet50", "embedding_from_level": 3, "embedding_c2_skip": True}}
ALL_MODELS = ("ours", "fcos", "maskrcnn")
# the shipped small model's architecture (config/train/synthetic_small.yaml) for a random stand-in
SMALL_ARCH = dict(backbone="mobilenet_v3_large", backbone_norm="gn", trainable_backbone_layers=5, fpn_channels=64,
                  head_channels=64, tower_depth=2, embed_dim=32, embed_branch_channels=64, embedding_stride=4)


class BenchError(RuntimeError):
    """User-facing benchmark problem (one line)."""


# ----------------------------------------------------------------------------------------------
# measurement helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_level(device: torch.device) -> int:
    """Bytes in use now: resident set size on the CPU, allocated CUDA memory on a GPU."""
    return _rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)


def _device_used_bytes(device: torch.device) -> int | None:
    """Used memory of the whole CUDA device (``total - free``, cudaMemGetInfo); None on the CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)


class PeakMemory:
    """Context manager: peak CUDA allocation or peak sampled RSS while active (MB); on CUDA also
    the device's used-memory increase over ``baseline_device_used`` (module docstring)."""

    def __init__(self, device: torch.device, baseline_rss: int | None = None,
                 baseline_device_used: int | None = None):
        self.device = device
        self.baseline = baseline_rss
        self.baseline_device_used = baseline_device_used
        self.peak_mb = 0.0
        self.delta_mb = 0.0
        self.device_used_delta_mb: float | None = None
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            self._stop.wait(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.delta_mb = self.peak_mb - (self.baseline or 0) / 2**20
            if self.baseline_device_used is not None:
                self.device_used_delta_mb = (_device_used_bytes(self.device) - self.baseline_device_used) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_mb = self._peak / 2**20
            self.delta_mb = (self._peak - (self.baseline or 0)) / 2**20
        return False


EAGER_MEMORY_NOTE = ("forward run eagerly (CUDA graphs off) for the memory call, so its activations are counted "
                     "as the eager peers' are; the timed calls replay CUDA graphs")
ORT_MEMORY_NOTE = ("onnxruntime's GPU arena is invisible to torch: peak_mem_mb not measured; torch_alloc_peak_mb is "
                   "torch's share (fusion), device_used_delta_mb (cudaMemGetInfo) includes the arena")


def memory_fields(device_type: str, engine: str, peak_mb: float, delta_mb: float,
                  device_used_delta_mb: float | None = None, eager_forward: bool = False) -> dict[str, Any]:
    """The memory fields of a result row, labelled by what was measured (module docstring)."""
    if device_type != "cuda":
        return {"peak_mem_mb": peak_mb, "mem_delta_mb": delta_mb, "mem_kind": "rss"}
    if engine == "onnxruntime":
        return {"peak_mem_mb": None, "mem_delta_mb": None, "mem_kind": "not_measured_by_torch",
                "torch_alloc_peak_mb": peak_mb, "device_used_delta_mb": device_used_delta_mb,
                "mem_note": ORT_MEMORY_NOTE}
    out = {"peak_mem_mb": peak_mb, "mem_delta_mb": delta_mb, "mem_kind": "cuda_max_allocated",
           "device_used_delta_mb": device_used_delta_mb}
    if eager_forward:
        out["mem_note"] = EAGER_MEMORY_NOTE
    return out


def time_calls(fn: Callable[[int], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Run ``fn(i)`` ``warmup`` times untimed, then ``repeats`` times; wall times in ms."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    times = []
    for i in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn(i)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """median, p90 (nearest-rank), mean, min of a list of ms."""
    s = sorted(times)
    p90 = s[min(len(s) - 1, max(0, int(np.ceil(0.9 * len(s))) - 1))]
    return {"median_ms": float(statistics.median(s)), "p90_ms": float(p90), "mean_ms": float(np.mean(s)),
            "min_ms": float(s[0]), "repeats": len(s)}


# ----------------------------------------------------------------------------------------------
# inputs and models


def data_roots() -> list[pathlib.Path]:
    """Where the benchmark looks for ``test/data`` and ``models/``: the source tree this module
    comes from, the working directory (an installed copy run from a checkout), and the ament
    share directory of an install into this interpreter's prefix (``make setup``)."""
    roots = []
    for r in (REPO, pathlib.Path.cwd(), pathlib.Path(sys.prefix) / "share" / "ciae_ros"):
        r = r.resolve()
        if r not in roots:
            roots.append(r)
    return roots


def sample_dir() -> pathlib.Path | None:
    """The COCO sample directory (``test/data/coco-panoptic-sample``) if one is reachable."""
    for r in data_roots():
        if (r / SAMPLE_RELATIVE / "panoptic_coco_categories.json").is_file():
            return r / SAMPLE_RELATIVE
    return None


def synthetic_inputs(count: int = 2, height: int = 480, width: int = 640) -> list[np.ndarray]:
    """Rendered synthetic scenes (RGB uint8), the fallback when the COCO sample is not reachable."""
    from ciae_core.synth import render_scene

    return [render_scene(1000 + i, height, width)[0] for i in range(count)]


def load_inputs(image_dir: pathlib.Path | None = None) -> list[np.ndarray]:
    """The benchmark images (RGB uint8): ``image_dir``'s images, else the COCO sample, else (no
    checkout reachable, e.g. an installed copy run elsewhere) two rendered 640x480 synthetic scenes."""
    import cv2

    if image_dir:
        d = pathlib.Path(image_dir)
    else:
        sample = sample_dir()
        if sample is None:
            logger.warning("COCO sample (%s) not found from %s or the working directory; benchmarking on two "
                           "rendered 640x480 synthetic scenes (pass --images DIR to choose)", SAMPLE_RELATIVE, REPO)
            return synthetic_inputs()
        d = sample / "images"
    files = sorted(p for p in d.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise BenchError(f"no benchmark images in {d}")
    images = []
    for p in files:
        im = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if im is None:
            raise BenchError(f"cannot decode {p}")
        images.append(np.ascontiguousarray(im[..., ::-1]))
    return images


def coco_categories():
    from ciae_core.structures import CategoryInfo

    sample = sample_dir()
    if sample is None:  # same class counts as COCO panoptic (80 things, 53 stuff); only the counts matter for timing
        infos = [CategoryInfo(id=i + 1, name=f"class{i + 1}", isthing=i < 80, color=(i, 2 * i % 256, 3 * i % 256))
                 for i in range(133)]
    else:
        cats = json.loads((sample / "panoptic_coco_categories.json").read_text())
        infos = [CategoryInfo(id=int(c["id"]), name=c["name"], isthing=bool(c["isthing"]), color=tuple(c["color"]))
                 for c in cats]
    return [c for c in infos if c.isthing] + [c for c in infos if not c.isthing]


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


def prepare_ours(weights: pathlib.Path, engine: str, size: int, images, device: torch.device, args,
                 cache_dir: pathlib.Path) -> Contender:
    from ciae_core.predictor import Predictor

    base_rss = _memory_level(device)
    base_device_used = _device_used_bytes(device)
    kw = dict(engine=engine, device=str(device), input_size=size, max_size=args.max_size,
              input_size_range=(64, 4096), **_fusion_thresholds(args.detections))
    if engine == "torch":
        kw.update(precision=args.precision, channels_last=channels_last_for(args.channels_last, device),
                  cuda_graphs=not args.no_cuda_graphs)
    else:
        kw.update(onnx_cache_dir=cache_dir, intra_op_threads=args.threads or None)
        providers = ort_providers(args.ort_providers, device)
        if providers is not None:
            kw["providers"] = providers
        if device.type == "cuda":
            kw["trt_fp16"] = args.precision == "fp16"
    predictor = Predictor(weights, **kw)
    stage_sums: dict[str, list[float]] = {}

    def call(i: int):
        predictor(images[i % len(images)])
        for k, v in predictor.timings.items():
            stage_sums.setdefault(k, []).append(v)

    def finish() -> dict[str, Any]:
        # the timed calls only: not the warm-up calls nor the memory call
        extra = {"predictor_timings_ms": {k: float(np.median(v[args.warmup + 1:] or v))
                                          for k, v in stage_sums.items()}}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if engine == "torch":
            extra["stages_ms"] = ours_stage_breakdown(predictor, images, device, args)
        return extra

    memory_mode = None
    if engine == "torch" and getattr(predictor._engine, "cuda_graphs", False):
        @contextlib.contextmanager
        def memory_mode():  # eager forward for the memory call (module docstring)
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


def ours_stage_breakdown(predictor, images, device: torch.device, args) -> dict[str, float]:
    """Median ms per stage (module docstring), with a synchronise between stages."""
    from ciae_core.fusion import select_proposals

    engine = predictor._engine
    model = engine.model
    graphs, engine.cuda_graphs = engine.cuda_graphs, False  # module hooks do not fire in graph replays
    marks: dict[str, float] = {}

    def pre_hook(_m, _inp):
        _sync(device)
        marks["bb0"] = time.perf_counter()

    def post_hook(_m, _inp, _out):
        _sync(device)
        marks["bb1"] = time.perf_counter()

    h1 = model.backbone.register_forward_pre_hook(pre_hook)
    h2 = model.backbone.register_forward_hook(post_hook)
    rows: dict[str, list[float]] = {k: [] for k in ("resize_copy", "backbone_fpn", "heads", "proposal_selection",
                                                    "fusion", "map_back_copy")}
    thr = predictor.thresholds
    try:
        for i in range(args.warmup + args.repeats):
            im = images[i % len(images)]
            _sync(device)
            t0 = time.perf_counter()
            batch, boxes = predictor.preprocess([im])
            _sync(device)
            t1 = time.perf_counter()
            raw = predictor.forward_raw(batch)
            _sync(device)
            t2 = time.perf_counter()
            with torch.inference_mode():
                select_proposals(raw["cls_logits"], raw["box_regression"], raw["centerness"], raw["points"],
                                 [b.resized_size for b in boxes], score_threshold=thr["score_threshold"],
                                 pre_nms_topk=thr["pre_nms_topk"], nms_threshold=thr["nms_threshold"],
                                 detections_per_img=thr["detections_per_img"])
            _sync(device)
            t3 = time.perf_counter()
            predictor.postprocess(raw, boxes)
            _sync(device)
            t4 = time.perf_counter()
            predictor(im)  # full call: its map_back + to_host stages
            if i < args.warmup:
                continue
            rows["resize_copy"].append((t1 - t0) * 1e3)
            rows["backbone_fpn"].append((marks["bb1"] - marks["bb0"]) * 1e3)
            rows["heads"].append((t2 - t1) * 1e3 - rows["backbone_fpn"][-1])
            rows["proposal_selection"].append((t3 - t2) * 1e3)
            rows["fusion"].append(max(0.0, (t4 - t3) * 1e3 - rows["proposal_selection"][-1]))
            rows["map_back_copy"].append(predictor.timings["map_back"] + predictor.timings["to_host"])
    finally:
        h1.remove()
        h2.remove()
        engine.cuda_graphs = graphs
    return {k: float(np.median(v)) for k, v in rows.items()}


def prepare_peer(kind: str, backbone_name: str, size: int, images, device: torch.device, args) -> Contender:
    base_rss = _memory_level(device)
    base_device_used = _device_used_bytes(device)
    model = build_peer(kind, backbone_name, size, args.max_size, args.detections).to(device)
    if channels_last_for(args.channels_last, device):  # the same memory format as ours (fair ratios)
        model = model.to(memory_format=torch.channels_last)
    use_amp = device.type == "cuda" and args.precision in ("fp16", "bf16")
    dtype = torch.float16 if args.precision == "fp16" else torch.bfloat16

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
        return _csv(text)
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
                device: torch.device, args, cache_dir) -> list[dict[str, Any]]:
    """All models of one (backbone, size): each is built, warmed up and measured for memory (one
    call under :class:`PeakMemory`), then the timed calls run in **interleaved rounds** — every
    round calls each model once on the same image, the order rotating by one per round — so
    drifts in machine load (thermal, other processes) fall on all models alike and the ratios
    stay comparable. A failure is recorded in that model's row (``error``) and the others go on,
    so one peer that breaks on some torchvision version does not lose the rest — and an
    onnxruntime build without the requested provider (a :class:`~ciae_core.predictor.PredictorError`
    from building ours) loses only the onnxruntime row."""
    rows, live = [], []
    for model, engine in entries:
        logger.info("bench %s %s/%s @%d: prepare", bb, model, engine, size)
        try:
            c = (prepare_ours(weights, engine, size, images, device, args, cache_dir) if model == "ours"
                 else prepare_peer(model, bb_name, size, images, device, args))
            time_calls(c.call, device, args.warmup, 0)  # warm-up (cudnn autotuning) outside the memory window
            with (c.memory_mode() if c.memory_mode else contextlib.nullcontext()):
                with PeakMemory(device, c.base_rss, c.base_device_used) as mem:
                    time_calls(c.call, device, 0, 1)
            c.info.update(memory_fields(device.type, engine, mem.peak_mb, mem.delta_mb, mem.device_used_delta_mb,
                                        eager_forward=c.memory_mode is not None))
            live.append(c)
        except Exception as e:  # noqa: BLE001 - keep the other measurements (PredictorError included)
            rows.append(_error_row(bb, model, engine, size, e))
    for c, e in interleaved_rounds(live, device, args.repeats, settle_s=0.1 if device.type == "cpu" else 0.0):
        rows.append(_error_row(bb, c.model, c.engine, size, e))
    for c in live:
        if c.times is None:
            continue
        row = {"backbone": bb, "model": c.model, "engine": c.engine, "size": size, **summarize(c.times), **c.info}
        row.update(c.finish())
        rows.append(row)
        print(f"  {bb:5s} {size:4d} {c.model:8s} {c.engine:11s} median {row['median_ms']:8.1f} ms  "
              f"p90 {row['p90_ms']:8.1f} ms", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# report


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (backbone, size): ours/FCOS, fusion share, onnxruntime/torch, ours/Mask R-CNN (medians)."""
    out = []
    results = [r for r in results if "error" not in r]
    keys = sorted({(r["backbone"], r["size"]) for r in results}, key=lambda k: (k[0], k[1]))
    for bb, size in keys:
        rows = {(r["model"], r["engine"]): r for r in results if r["backbone"] == bb and r["size"] == size}
        ours = rows.get(("ours", "torch"))
        ort = rows.get(("ours", "onnxruntime"))
        fcos = rows.get(("fcos", "torch"))
        mrcnn = rows.get(("maskrcnn", "torch"))

        def ratio(a, b):
            return a["median_ms"] / b["median_ms"] if a and b else None

        fusion_share = None
        if ours and "stages_ms" in ours and ours["median_ms"] > 0:
            fusion_share = ours["stages_ms"]["fusion"] / ours["median_ms"]
        out.append({"backbone": bb, "size": size, "ours_over_fcos": ratio(ours, fcos),
                    "fusion_share": fusion_share, "ort_over_torch": ratio(ort, ours),
                    "ours_over_maskrcnn": ratio(ours, mrcnn)})
    return out


def _fmt(v, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def markdown_tables(results: list[dict[str, Any]], ratio_rows: list[dict[str, Any]]) -> str:
    failed = [r for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    lines = ["| backbone | size | ours torch ms (p90) | ours ORT ms (p90) | FCOS ms (p90) | Mask R-CNN ms (p90) | "
             "ours/FCOS | fusion share | ORT/torch | ours/Mask R-CNN |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rr in ratio_rows:
        rows = {(r["model"], r["engine"]): r for r in results
                if r["backbone"] == rr["backbone"] and r["size"] == rr["size"]}

        def cell(key):
            r = rows.get(key)
            return "–" if r is None else f"{r['median_ms']:.1f} ({r['p90_ms']:.1f})"

        lines.append(f"| {rr['backbone']} | {rr['size']} | {cell(('ours', 'torch'))} | {cell(('ours', 'onnxruntime'))} | "
                     f"{cell(('fcos', 'torch'))} | {cell(('maskrcnn', 'torch'))} | {_fmt(rr['ours_over_fcos'], '.2f')} | "
                     f"{_fmt(rr['fusion_share'], '.1%')} | {_fmt(rr['ort_over_torch'], '.2f')} | "
                     f"{_fmt(rr['ours_over_maskrcnn'], '.2f')} |")
    stage_rows = [r for r in results if "stages_ms" in r]
    if stage_rows:
        names = list(stage_rows[0]["stages_ms"])
        lines += ["", "| backbone | size | " + " | ".join(names) + " | (ms, median) |",
                  "|---|---|" + "---|" * len(names) + "---|"]
        for r in stage_rows:
            lines.append(f"| {r['backbone']} | {r['size']} | " + " | ".join(f"{r['stages_ms'][n]:.1f}" for n in names)
                         + " | |")
    mem_rows = [r for r in results if "mem_kind" in r]
    if mem_rows:
        device_level = any(r.get("device_used_delta_mb") is not None for r in mem_rows)
        extra = " device used increase MB |" if device_level else ""
        lines += ["", f"| backbone | size | model | engine | peak memory MB | increase MB | measured as |{extra}",
                  "|---|---|---|---|---|---|---|" + ("---|" if device_level else "")]
        for r in mem_rows:
            kind = r["mem_kind"].replace("_", " ") + (" (eager forward)" if r.get("mem_note") == EAGER_MEMORY_NOTE
                                                      else "")
            line = (f"| {r['backbone']} | {r['size']} | {r['model']} | {r['engine']} | {_fmt(r['peak_mem_mb'], '.0f')} | "
                    f"{_fmt(r['mem_delta_mb'], '.0f')} | {kind} |")
            if device_level:
                line += f" {_fmt(r.get('device_used_delta_mb'), '.0f')} |"
            lines.append(line)
    for r in failed:
        lines.append(f"\nfailed: {r['backbone']} {r['size']} {r['model']}/{r['engine']}: {r['error']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciae-bench", description="Latency of CIAE vs torchvision FCOS and Mask R-CNN "
                                "(same process, inputs and threads; median and p90).",
                                epilog="ciae-bench --node [...]: node overhead over real DDS "
                                       "(see ciae-bench --node --help).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="autocast precision on CUDA (torch engines; fp16 also enables TensorRT fp16)")
    p.add_argument("--sizes", default="512,640,800", help="shorter-side sizes, comma separated")
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--backbones", default="r50,small",
                   help="r50, r50-p3 (embedding branch from P3), r50-p3c2 (P3 + C2 skip) and/or small")
    p.add_argument("--models", default=",".join(ALL_MODELS), help="ours,fcos,maskrcnn")
    p.add_argument("--engines", default="torch,onnxruntime", help="engines for ours: torch,onnxruntime")
    p.add_argument("--ort-providers", default=None,
                   help="onnxruntime providers for ours, e.g. tensorrt,cuda (default: cuda on a GPU, the CPU "
                        "provider on the CPU); one this build cannot run fails only the onnxruntime rows")
    p.add_argument("--small-weights", default=None, help="small model checkpoint (default: models/*.safetensors)")
    p.add_argument("--images", default=None, help="image directory for every row (default: the COCO sample; "
                   "rendered 640x480 scenes for the small rows, see --small-images)")
    p.add_argument("--small-images", choices=("synthetic", "coco"), default="synthetic",
                   help="inputs of the small-backbone rows when --images is not given: rendered synthetic scenes "
                        "(the shipped model's domain) or the COCO sample")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model (raised to twice the number "
                   "of images so every input shape is warm and its CUDA graph captured; 0 = none)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--detections", type=int, default=30, help="instances per image for every model")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="memory format of all torch models, ours and the peers alike (auto: the Predictor's "
                        "default, channels_last on the CPU and not on CUDA)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="ours (torch): eager forward on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch and onnxruntime CPU threads (0: torch default)")
    p.add_argument("--json", default="bench.json", help="output JSON path")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--node":
        # Node overhead (publish -> receive latency minus predictor time) lives with the ROS glue;
        # imported only here so that ciae_core itself never imports ROS.
        try:
            from ciae_ros.bench_node import main as node_main
        except ImportError as e:
            print(f"ciae-bench --node: needs rclpy and the built ciae_ros messages ({e})", file=sys.stderr)
            return 2
        return node_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        sizes = [int(s) for s in _csv(args.sizes)]
        backbones, models, engines = _csv(args.backbones), _csv(args.models), _csv(args.engines)
        for b in backbones:
            if b not in ("small", *OURS_ARCH):
                raise BenchError(f"unknown backbone {b!r}; use {', '.join(OURS_ARCH)} and/or small")
        for m in models:
            if m not in ALL_MODELS:
                raise BenchError(f"unknown model {m!r}; use {', '.join(ALL_MODELS)}")
        for e in engines:
            if e not in ("torch", "onnxruntime"):
                raise BenchError(f"unknown engine {e!r}; use torch and/or onnxruntime")
        if args.repeats < 1 or args.warmup < 0 or not sizes or min(sizes) < 32:
            raise BenchError("need --repeats >= 1, --warmup >= 0 and sizes >= 32")
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda requested but no CUDA GPU is available")
        if device.type == "cpu" and args.precision == "fp16":
            raise BenchError("--precision fp16 needs CUDA")
        if args.threads:
            torch.set_num_threads(args.threads)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        coco_images = load_inputs(args.images)
        # the shipped small model knows only the synthetic scenes: on COCO photos its embedding is
        # noise and fusion works on a fragmented map no deployment sees; its rows (all models)
        # use rendered scenes unless --images is given or --small-images coco
        synth_images = synthetic_inputs() if (args.images is None and args.small_images == "synthetic") else coco_images
        if args.warmup > 0:  # every image shape twice: oneDNN/cuDNN plans are per shape, and the
            # predictor captures a shape's CUDA graph the second time it sees it
            args.warmup = max(args.warmup, 2 * len(coco_images), 2 * len(synth_images))
        results = []
        with tempfile.TemporaryDirectory(prefix="ciae-bench-") as tmp:
            tmp = pathlib.Path(tmp)
            for bb in backbones:
                images = synth_images if bb == "small" else coco_images
                weights = ours_checkpoint(bb, tmp, args.small_weights) if "ours" in models else None
                from ciae_core.checkpoint import config_from_checkpoint

                bb_name = config_from_checkpoint(weights).backbone if weights else \
                    (SMALL_ARCH["backbone"] if bb == "small" else BACKBONES[bb])
                entries = [(m, e) for m in models for e in (engines if m == "ours" else ["torch"])]
                for size in sizes:
                    results += bench_group(entries, bb, bb_name, size, weights, images, device, args, tmp / "onnx")
    except BenchError as e:
        print(f"ciae-bench: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - predictor/export errors are one-line already
        from ciae_core.predictor import PredictorError

        if isinstance(e, PredictorError):
            print(f"ciae-bench: error: {e}", file=sys.stderr)
            return 1
        raise
    ratio_rows = ratios(results)
    meta = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "precision": args.precision, "torch": torch.__version__,
            "channels_last": channels_last_for(args.channels_last, device),
            "warmup": args.warmup, "repeats": args.repeats, "detections": args.detections,
            "images": len(coco_images), "image_sizes": [list(im.shape[:2]) for im in coco_images],
            "small_images": "given" if args.images else args.small_images,
            "small_image_sizes": [list(im.shape[:2]) for im in synth_images],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with contextlib.suppress(ImportError):  # versions are informative only
        import onnxruntime
        import torchvision

        meta.update(torchvision=torchvision.__version__, onnxruntime=onnxruntime.__version__)
    doc = {"meta": meta, "results": results, "ratios": ratio_rows}
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    print(f"ciae-bench on {meta['gpu'] or 'CPU'} ({meta['threads']} threads, {args.precision}, "
          f"{args.detections} instances/image, median of {args.repeats} after {args.warmup} warm-up)\n")
    print(markdown_tables(results, ratio_rows))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
