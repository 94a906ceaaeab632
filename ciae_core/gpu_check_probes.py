"""The measurements of the prepared GPU run that are not ``ciae-bench``: environment, sanity and
id-map agreement (each run as its own phase by :mod:`ciae_core.gpu_check`, JSON out).

* :func:`environment` — versions, the device, and which of the hidden packages import.
* :func:`sanity` — every ``ciae_core`` module imports; one tiny forward of the shipped model on
  the device (eager call, CUDA-graph capture, replay); the static postprocess with the Triton
  fusion against the eager postprocess on one frame (:func:`static_against_eager`); on CUDA the
  whole-call graph (``cuda_graphs="full"``: capture and replay agree with the eager first call),
  and that autocast runs GroupNorm in float32 (the heads' precision lever).
* :func:`agreement` — the id maps of every precision and CUDA-graph path against fp32 eager on
  the same device, as the fraction of pixels whose segments match one to one
  (:func:`matched_agreement`): the shipped small model on rendered scenes (its domain) and on the
  COCO sample, a random-weight R50 on the COCO sample.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def matched_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels on which two id maps ``(H, W)`` show the same segment: segments are
    matched one to one, greedily by overlap (largest first); void (0) matches only void. Ids may
    differ between the maps (an instance dropped in one shifts the ids after it)."""
    if a.shape != b.shape:
        raise ValueError(f"id maps of different shapes {a.shape} and {b.shape}")
    if a.size == 0:
        return 1.0
    a64, b64 = a.astype(np.int64).ravel(), b.astype(np.int64).ravel()
    pairs, counts = np.unique(a64 * (int(b64.max()) + 1) + b64, return_counts=True)
    ia, ib = np.divmod(pairs, int(b64.max()) + 1)
    used_a, used_b, total = set(), set(), 0
    for k in np.argsort(-counts, kind="stable"):
        x, y = int(ia[k]), int(ib[k])
        if x in used_a or y in used_b or (x == 0) != (y == 0):
            continue
        used_a.add(x)
        used_b.add(y)
        total += int(counts[k])
    return total / a.size


def environment(device: str) -> dict[str, Any]:
    """Versions, the device's name and properties, and the import status of the packages the GPU
    machine does not have (with the run's blocker: hidden)."""
    import torch

    from ciae_core.gpu_check import BLOCKED_IMPORTS

    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    for name in ("torchvision", "triton", "numba", "cv2", "onnxruntime", "scipy"):
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError as e:
            info[name] = f"absent ({e})"
    info["hidden_packages_importable"] = {n: _importable(n) for n in BLOCKED_IMPORTS}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
        info["nvidia_smi"] = _nvidia_smi()
    return info


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def _nvidia_smi() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,"
                              "temperature.gpu,utilization.gpu,memory.used", "--format=csv"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


def import_all_modules() -> dict[str, str]:
    """Import every module of ``ciae_core`` (the command-line layer included); failures by name."""
    import ciae_core

    failed = {}
    for m in pkgutil.walk_packages(ciae_core.__path__, "ciae_core."):
        try:
            importlib.import_module(m.name)
        except Exception as e:  # noqa: BLE001 - reported, not raised: the other checks still run
            failed[m.name] = f"{type(e).__name__}: {e}"
    return failed


def shipped_weights():
    """The shipped model's checkpoint (``models/*.safetensors`` of the checkout)."""
    from ciae_core.bench import data_roots

    found = [m for r in data_roots() for m in sorted((r / "models").glob("*.safetensors"))]
    if not found:
        raise FileNotFoundError("no models/*.safetensors reachable from the source tree or the working directory")
    return found[0]


def _timed_calls(predictor, image, calls: int = 3) -> tuple[Any, float]:
    """``calls`` calls on one image (eager, capture, replay with CUDA graphs); the last result and
    its wall time in ms (the call ends with the device→host copy, so it is synchronous)."""
    result, ms = None, 0.0
    for _ in range(calls):
        t0 = time.perf_counter()
        result = predictor(image)
        ms = (time.perf_counter() - t0) * 1e3
    return result, ms


def static_against_eager(device: str) -> dict[str, Any]:
    """The shipped model's raw outputs for one rendered frame on ``device``, postprocessed by
    :func:`ciae_core.static_postprocess.postprocess_static` (Triton fusion) and by
    :func:`ciae_core.fusion.panoptic_from_raw`: equal id maps and tables? On the CPU (Triton's
    interpreter, ~0.5 s per slot and 100k pixels) a smaller frame and 10 instance slots."""
    import torch

    from ciae_core.checkpoint import load_model
    from ciae_core.fusion import panoptic_from_raw, split_panoptic
    from ciae_core.static_postprocess import postprocess_static
    from ciae_core.synth import render_scene

    model = load_model(shipped_weights(), device=device).eval()
    cfg = model.config
    kw = dict(num_things=model.num_things, embedding_stride=model.branch_stride,
              normalize_after_upsampling=model.embedding_stride == 1, score_threshold=cfg.score_threshold,
              pre_nms_topk=cfg.pre_nms_topk, nms_threshold=cfg.nms_threshold,
              detections_per_img=cfg.detections_per_img if device.startswith("cuda") else 10,
              instance_score_threshold=cfg.instance_score_threshold, min_stuff_area=cfg.min_stuff_area,
              stuff_area_reference=cfg.stuff_area_reference, min_visible_fraction=cfg.min_visible_fraction,
              min_instance_area=cfg.min_instance_area, outside_box_value=cfg.outside_box_value)
    sizes = [(240, 320)] if device.startswith("cuda") else [(120, 160)]
    image = torch.from_numpy(render_scene(9, *sizes[0])[0]).permute(2, 0, 1).float()[None].to(device)
    with torch.inference_mode():
        raw = model.forward_raw(image)
        want = panoptic_from_raw(raw, sizes, **kw)[0]
        t0 = time.perf_counter()
        static = postprocess_static(raw, torch.tensor(sizes, device=device), fusion="triton", **kw)
        got = split_panoptic({k: v for k, v in static.items() if k != "converged"}, sizes)[0]
        first_ms = (time.perf_counter() - t0) * 1e3
    same = {k: bool(torch.equal(got[k], want[k])) for k in ("id_map", "ids", "labels", "areas", "boxes")}
    same["scores"] = bool(torch.allclose(got["scores"], want["scores"], atol=1e-4, rtol=0))
    agreement = matched_agreement(want["id_map"].cpu().numpy(), got["id_map"].cpu().numpy())
    return {"equal": same, "matched_agreement": agreement, "converged": bool(static["converged"].all()),
            "segments": int(want["ids"].numel()), "first_call_ms": round(first_ms, 1), "ok": all(same.values())}


def sanity(device: str) -> dict[str, Any]:
    """Imports, one tiny forward of the shipped model on ``device``, and (CUDA) autocast's GroupNorm
    precision. ``ok`` is False when any of them failed."""
    import torch

    from ciae_core.predictor import Predictor
    from ciae_core.synth import render_scene

    out: dict[str, Any] = {"device": device, "import_failures": import_all_modules()}
    scene = render_scene(5, 240, 320)[0]
    p = Predictor(shipped_weights(), device=device, input_size=192)
    result, ms = _timed_calls(p, scene)
    out["tiny_forward"] = {"segments": len(result.segments), "id_map_shape": list(result.id_map.shape),
                           "last_call_ms": round(ms, 3), "timings_ms": p.timings}
    ok = not out["import_failures"] and result.id_map.shape == scene.shape[:2] and len(result.segments) > 0
    try:
        out["static_postprocess"] = static_against_eager(device)
        ok = ok and out["static_postprocess"]["ok"]
    except Exception as e:  # noqa: BLE001 - reported; the other checks stand
        logger.exception("static postprocess check")
        out["static_postprocess"] = {"error": f"{type(e).__name__}: {e}"}
        ok = False
    if device.startswith("cuda"):  # the whole-call graph: eager, capture, replay
        full = Predictor(shipped_weights(), device=device, input_size=192, cuda_graphs="full")
        first = full(scene)
        replayed, ms = _timed_calls(full, scene, 2)
        out["full_graph"] = {"used": "graph" in full.timings, "timings_ms": full.timings, "last_call_ms": round(ms, 3),
                             "agreement_with_first_call": matched_agreement(first.id_map, replayed.id_map)}
        ok = ok and out["full_graph"]["used"] and out["full_graph"]["agreement_with_first_call"] >= 0.999
        x = torch.randn(2, 8, 16, 16, device=device, dtype=torch.bfloat16)
        gn = torch.nn.GroupNorm(4, 8).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = gn(x)
        out["autocast_group_norm_dtype"] = str(y.dtype)
        ok = ok and y.dtype == torch.float32
    out["ok"] = bool(ok)
    return out


def agreement_paths(device: str) -> list[str]:
    """The CUDA-graph paths compared with fp32 eager on ``device``: the default (forward graphs,
    eager postprocess) and the whole call in one graph; "eager" alone on the CPU."""
    return ["forward", "full"] if device.startswith("cuda") else ["eager"]


def _predictor_for_path(weights, device: str, precision: str, path: str, input_size: int):
    from ciae_core.predictor import Predictor

    graphs = {"eager": False, "forward": True, "full": "full"}[path]
    return Predictor(weights, device=device, precision=precision, input_size=input_size, cuda_graphs=graphs,
                     input_size_range=(64, 4096))


def _agreement_sets(device: str, quick: bool, tmp) -> list[tuple[str, Any, str, list[np.ndarray], int]]:
    """(model name, weights, image set name, images, input size) to compare."""
    from ciae_core.bench import load_inputs, synthetic_inputs

    small = shipped_weights()
    rendered = synthetic_inputs()
    if quick:  # the dry run: one small scene at a small size
        return [("small (shipped)", small, "rendered", [np.ascontiguousarray(rendered[0][:96, :128])], 64)]
    from ciae_core.bench_contenders import ours_checkpoint

    coco = load_inputs()
    r50 = ours_checkpoint("r50", tmp, None)
    return [("small (shipped)", small, "rendered", rendered, 320), ("small (shipped)", small, "coco", coco, 320),
            ("r50 (random)", r50, "coco", coco, 800)]


def _release(device: str) -> None:
    """Free the last predictor's GPU memory (its graphs' pools) before the next one is built."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def agreement(device: str, quick: bool = False) -> dict[str, Any]:
    """Matched-segment agreement (:func:`matched_agreement`, mean and min over the images) of the
    id maps of every precision and path with fp32 eager on ``device``; each entry also has the
    last call's wall time. ``quick``: one small scene of the shipped model (the dry run)."""
    import pathlib

    precisions = ["fp32", "bf16"] + (["fp16"] if device.startswith("cuda") else [])
    entries = []
    with tempfile.TemporaryDirectory(prefix="ciae-agreement-") as tmp:
        for model, weights, images_name, images, size in _agreement_sets(device, quick, pathlib.Path(tmp)):
            ref_p = _predictor_for_path(weights, device, "fp32", "eager", size)
            refs = [_timed_calls(ref_p, im, 1)[0].id_map for im in images]
            del ref_p
            for precision in precisions:
                for path in agreement_paths(device):
                    if precision == "fp32" and path == "eager":
                        continue
                    entry = {"model": model, "images": images_name, "precision": precision, "path": path,
                             "input_size": size}
                    try:
                        p = _predictor_for_path(weights, device, precision, path, size)
                        got = [_timed_calls(p, im) for im in images]
                        scores = [matched_agreement(ref, r.id_map) for ref, (r, _) in zip(refs, got)]
                        entry.update(agreement=float(np.mean(scores)), min_agreement=float(np.min(scores)),
                                     last_call_ms=[round(ms, 3) for _, ms in got])
                        if p._full is not None:  # did the whole-call graph answer (not a fallback)?
                            entry.update(full_graph_used=bool(p._full.enabled and p._full._graphs
                                                              and "graph" in p.timings),
                                         nms_fallbacks=p._full.fallbacks)
                    except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
                        logger.exception("agreement %s %s %s", model, precision, path)
                        entry.update(agreement=None, error=f"{type(e).__name__}: {e}")
                    entries.append(entry)
                    p = None  # noqa: F841 - its graphs' memory goes back before the next predictor
                    _release(device)
    return {"device": device, "reference": "fp32, CUDA graphs off (eager forward and postprocess)",
            "paths": {"forward": "forward from a CUDA graph, postprocess eager (the default)",
                      "full": "the whole call from one CUDA graph (cuda_graphs='full')", "eager": "no graphs"},
            "entries": entries}
