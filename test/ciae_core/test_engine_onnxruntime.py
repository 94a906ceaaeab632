"""The onnxruntime engine: provider selection, session options, graph checks, the ONNX cache of a checkpoint."""

from __future__ import annotations

import json
import pathlib
import sys

import cv2
import numpy as np
import onnx
import pytest
import torch

from ciae_core.engine_onnxruntime import select_providers
from ciae_core.export import export_checkpoint, read_onnx_metadata
from ciae_core.predictor import Predictor, PredictorError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_export import _real_images  # noqa: E402
from test_predictor import FAST, SAMPLE_IMAGES, tiny_model_path  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> pathlib.Path:
    return tiny_model_path(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def dynamic_onnx(weights, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_checkpoint(weights, out, dynamic=True)
    return out


@pytest.fixture(scope="module")
def coco_image() -> np.ndarray:
    path = sorted(SAMPLE_IMAGES.glob("*.jpg"))[0]
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].copy()


# ----------------------------------------------------------------------------------------------
# provider selection


def test_select_providers_orders_and_checks(monkeypatch):
    import ciae_core.engine_onnxruntime as P

    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    # by default TensorRT is offered only when libnvinfer loads (it does not on this machine)
    loadable = P.tensorrt_runtime_loadable()
    names = [n for n, _ in select_providers("cuda", avail)]
    assert names == (avail if loadable else avail[1:])
    # mocked: the TensorRT runtime being present (it cannot be installed here)
    monkeypatch.setattr(P, "tensorrt_runtime_loadable", lambda: True)
    names = [n for n, _ in select_providers("cuda", avail, trt_cache_dir="/tmp/trt", trt_fp16=True)]
    assert names == avail
    trt_opts = select_providers("cuda", avail, trt_cache_dir="/tmp/trt", trt_fp16=True)[0][1]
    assert trt_opts["trt_fp16_enable"] and trt_opts["trt_engine_cache_path"] == "/tmp/trt"
    assert [n for n, _ in select_providers("cpu", avail)] == ["CPUExecutionProvider"]
    assert [n for n, _ in select_providers("cuda", ["CPUExecutionProvider"])] == ["CPUExecutionProvider"]
    assert [n for n, _ in select_providers("cuda", avail, ["cuda"])] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(PredictorError, match="not available"):
        select_providers("cuda", ["CPUExecutionProvider"], ["tensorrt"])
    with pytest.raises(PredictorError, match="needs device='cuda'"):
        select_providers("cpu", avail, ["cuda"])
    # one string is one provider, not a sequence of letters
    assert [n for n, _ in select_providers("cpu", avail, "cpu")] == ["CPUExecutionProvider"]
    monkeypatch.setattr(P, "tensorrt_runtime_loadable", lambda: False)
    assert [n for n, _ in select_providers("cuda", avail, ["tensorrt"])][0] == "TensorrtExecutionProvider"


def test_tensorrt_provider_options():
    """Unit level (no GPU/TensorRT here, so no TensorRT session can be built): the options
    select_providers hands to onnxruntime for TensorRT — fp16 as asked, engine and timing caches
    in the given directory, the device id — and CUDA gets the same device."""
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    # asked for explicitly (by default TensorRT may be skipped where its runtime library is missing)
    chosen = dict(select_providers("cuda", avail, ["tensorrt", "cuda"], trt_cache_dir="/var/cache/trt", trt_fp16=True,
                                   device_id=1))
    assert list(chosen) == avail
    trt = chosen["TensorrtExecutionProvider"]
    assert trt["trt_fp16_enable"] is True and trt["device_id"] == 1
    assert trt["trt_engine_cache_enable"] is True and trt["trt_engine_cache_path"] == "/var/cache/trt"
    assert trt["trt_timing_cache_enable"] is True and trt["trt_timing_cache_path"] == "/var/cache/trt"
    assert chosen["CUDAExecutionProvider"] == {"device_id": 1} and chosen["CPUExecutionProvider"] == {}
    trt = dict(select_providers("cuda", avail, ["tensorrt"]))["TensorrtExecutionProvider"]
    assert trt["trt_fp16_enable"] is False and "trt_engine_cache_path" not in trt


# ----------------------------------------------------------------------------------------------
# the session


def test_gpu_provider_that_does_not_start_is_an_error_not_a_silent_cpu_run(weights, tmp_path):
    """onnxruntime-gpu lists the CUDA provider here, but with no GPU it cannot start: onnxruntime
    only warns and runs on the CPU. The engine must refuse instead (real onnxruntime, no mock)."""
    import onnxruntime as ort

    from ciae_core.export import export_checkpoint
    from ciae_core.engine_onnxruntime import _OrtEngine

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider")
    if torch.cuda.is_available():
        pytest.skip("the CUDA provider can start on this machine")
    path = export_checkpoint(weights, tmp_path / "m.onnx", dynamic=True)
    with pytest.raises(PredictorError, match="could not start CUDAExecutionProvider"):
        _OrtEngine(str(path), torch.device("cuda"), providers=["cuda"])
    with pytest.raises(PredictorError, match="could not start CUDAExecutionProvider"):
        _OrtEngine(str(path), torch.device("cuda"))  # the default choice for device='cuda'


def test_onnxruntime_cpu_session_leaves_the_cores_after_a_run(dynamic_onnx):
    """On the CPU provider the intra-op threads must not spin-wait after a run: the torch fusion
    that follows needs the same cores (spinning made it 6x slower on a 2-core machine)."""
    engine = Predictor(dynamic_onnx, engine="onnxruntime", input_size=256, intra_op_threads=2)._engine
    assert engine.providers == ["CPUExecutionProvider"]
    options = engine.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 2


def test_onnxruntime_session_gets_full_optimisation_and_the_thread_counts(dynamic_onnx):
    """The real session (read back from onnxruntime) has ORT_ENABLE_ALL and the given intra-/inter-op
    thread counts; without counts onnxruntime's defaults (0) stay. (ORT_ENABLE_ALL is also
    SessionOptions' default in onnxruntime 1.31: this guards against a lower level being set.)"""
    import onnxruntime as ort

    engine = Predictor(dynamic_onnx, engine="onnxruntime", input_size=256, intra_op_threads=2,
                       inter_op_threads=3)._engine
    options = engine.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 3)
    options = Predictor(dynamic_onnx, engine="onnxruntime", input_size=256)._engine.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (0, 0)


# ----------------------------------------------------------------------------------------------
# graph checks and the ONNX cache


def test_onnx_with_mismatched_config(dynamic_onnx, tmp_path):
    proto = onnx.load(str(dynamic_onnx))
    meta = {p.key: p for p in proto.metadata_props}
    cfg = json.loads(meta["ciae_config"].value)
    extra = dict(cfg["categories"][0], id=9999, name="extra-thing")
    cfg["categories"] = [extra] + cfg["categories"]  # one more thing class than the graph predicts
    meta["ciae_config"].value = json.dumps(cfg)
    path = tmp_path / "mismatch.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(PredictorError, match="mismatch.onnx: graph outputs .* do not match"):
        Predictor(path, engine="onnxruntime")


def test_onnx_whose_metadata_does_not_fit_its_graph_is_refused(weights, tmp_path, coco_image):
    """A file whose ciae_config was edited (here: it claims the stride-8 branch) would be fused at
    the wrong scale (1 % of pixels agreed); the engine checks the embedding output on every run."""
    import onnx

    from ciae_core.export import export_checkpoint

    path = export_checkpoint(weights, tmp_path / "m.onnx", dynamic=True)
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "ciae_config":
            cfg = json.loads(prop.value)
            cfg["embedding_from_level"] = 3
            prop.value = json.dumps(cfg)
    onnx.save(proto, str(tmp_path / "edited.onnx"))
    p = Predictor(tmp_path / "edited.onnx", engine="onnxruntime", input_size=256)
    with pytest.raises(PredictorError, match="edited.onnx: the graph's embedding output .* does not match"):
        p(coco_image)


def test_safetensors_with_onnxruntime_exports_once_to_cache(weights, tmp_path):
    cache = tmp_path / "cache"
    p = Predictor(weights, engine="onnxruntime", input_size=256, onnx_cache_dir=cache, **FAST)
    files = list(cache.glob("*.onnx"))
    assert len(files) == 1 and p.onnx_path == str(files[0])
    assert read_onnx_metadata(files[0])["ciae_source_name"] == pathlib.Path(weights).name
    mtime = files[0].stat().st_mtime_ns
    Predictor(weights, engine="onnxruntime", input_size=256, onnx_cache_dir=cache)
    assert files[0].stat().st_mtime_ns == mtime  # reused
    im = _real_images()[0]
    r = p(im)
    assert r.id_map.shape == im.shape[:2] and r.segments
