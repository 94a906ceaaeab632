"""Measurement primitives of ``ciae-bench``: wall time, peak memory, and the benchmark's inputs.

Timing (:func:`time_calls`, :func:`summarize`): every call is bracketed by a device synchronise,
and a run is reported as the median and the 90th percentile (nearest rank) of the end-to-end wall
time (uint8 image in → final result on the host).

Inputs (:func:`load_inputs`): the same real images for every model — the COCO sample shipped in
test/data, cycled, or ``--images DIR``; for the ``small`` rows two rendered 640x480 synthetic
scenes (:func:`synthetic_inputs`), the shipped model's domain (on photos its embedding is noise
and the fusion would work on a fragmented map that no deployment of it sees; ``--small-images
coco`` to change). An installed copy run away from a checkout falls back to the rendered scenes
and to COCO's class counts (:func:`coco_categories`).

Peak memory, over one call after the warm-up (whose cuDNN autotuning allocates large trial
workspaces), with :class:`PeakMemory`. On the CPU (``mem_kind: "rss"``): the peak resident set
size sampled from ``/proc/self/statm`` every 2 ms (``peak_mem_mb``, which includes the models of the group built
before this one) and its increase over the level before this model was built (``mem_delta_mb``,
the number to compare); it counts every allocator, onnxruntime's included.

On CUDA the rows are made comparable as follows (decision; a measured CUDA-graph replay would be
biased in our favour), see :func:`memory_fields`:

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

The models and how they are run are :mod:`ciae_core.bench_contenders`, the tables
:mod:`ciae_core.bench_report`, the command line :mod:`ciae_core.cli.bench`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import statistics
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_RELATIVE = pathlib.Path("test") / "data" / "coco-panoptic-sample"


class BenchError(RuntimeError):
    """User-facing benchmark problem (one line)."""


# ----------------------------------------------------------------------------------------------
# measurement helpers


def sync(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_level(device: torch.device) -> int:
    """Bytes in use now: resident set size on the CPU, allocated CUDA memory on a GPU."""
    return _rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)


def device_used_bytes(device: torch.device) -> int | None:
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
                self.device_used_delta_mb = (device_used_bytes(self.device) - self.baseline_device_used) / 2**20
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
    sync(device)
    times = []
    for i in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn(i)
        sync(device)
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
    """COCO panoptic's categories (things first) from the sample, else stand-ins with its counts."""
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
