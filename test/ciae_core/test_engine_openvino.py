"""The OpenVINO engine: parity with torch, shapes, compile settings, cache, precisions and bad files."""

from __future__ import annotations

import pathlib
import sys

import cv2
import pytest
import torch

pytest.importorskip("openvino")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from openvino_testing import coco_images, exported_onnx, rendered_scenes, shipped_weights  # noqa: E402

from ciae_core.checkpoint import load_model  # noqa: E402
from ciae_core.cpu_features import CpuFeatures, parse_cpuinfo  # noqa: E402
from ciae_core.engine_openvino import RAW_OUTPUT_NAMES, OpenVINOEngine, default_openvino_cache_dir  # noqa: E402
from ciae_core.predictor import Predictor  # noqa: E402
from ciae_core.predictor_error import PredictorError  # noqa: E402

NO_BF16 = CpuFeatures(*parse_cpuinfo("model name : AVX2-only test CPU\nflags : avx avx2 fma\n"))
AMX = CpuFeatures(*parse_cpuinfo("model name : AMX test CPU\nflags : avx2 avx512f avx512_bf16 avx512_vnni "
                                 "amx_tile amx_bf16 amx_int8\n"))


@pytest.fixture(scope="module")
def dynamic_onnx() -> pathlib.Path:
    return exported_onnx("dynamic")


@pytest.fixture(scope="module")
def engine(dynamic_onnx, tmp_path_factory) -> OpenVINOEngine:
    return OpenVINOEngine(dynamic_onnx, precision="fp32", threads=1, cache_dir=tmp_path_factory.mktemp("ovcache"))


def openvino_predictor(path, cache_dir, **kw) -> Predictor:
    """A Predictor on the OpenVINO engine (torch pre/post-processing, as for onnxruntime)."""
    return Predictor(path, engine="openvino", intra_op_threads=1, openvino_cache_dir=cache_dir, **kw)


def batch_of(images, shape) -> torch.Tensor:
    batch = torch.zeros(shape)
    for i in range(shape[0]):
        im = cv2.resize(images[i % len(images)], (shape[3], shape[2]), interpolation=cv2.INTER_AREA)
        batch[i] = torch.from_numpy(im).permute(2, 0, 1).float()
    return batch


@pytest.mark.parametrize("shape", [(1, 3, 256, 352), (2, 3, 192, 256)])
def test_raw_outputs_match_torch(engine, shape):
    images = coco_images() + [s[0] for s in rendered_scenes(1)]
    batch = batch_of(images, shape)
    with torch.no_grad():
        ref = load_model(shipped_weights()).forward_raw(batch)
    out = engine(batch)
    assert list(out) == list(RAW_OUTPUT_NAMES) or sorted(out) == sorted(RAW_OUTPUT_NAMES)
    for k in RAW_OUTPUT_NAMES:
        assert out[k].dtype == torch.float32 and tuple(out[k].shape) == tuple(ref[k].shape), k
        # the onnxruntime engine's bound: box_regression is in pixels (up to ~350)
        err = float((out[k] - ref[k]).abs().max())
        assert err <= 1e-3, (k, err)


def test_predictor_results_match_torch_on_coco_and_rendered_scenes(dynamic_onnx, tmp_path):
    """fp32: >= 99 % of the pixels carry the same id and the segment lists (id, category) are equal.
    The checkpoint goes through the onnxruntime engine's export cache (here pre-filled with the same
    export, so it is reused, not exported again)."""
    from ciae_core.engine_onnxruntime import onnx_for_checkpoint
    from ciae_core.export import file_sha256

    weights = shipped_weights()
    cache = tmp_path / "onnx"
    cache.mkdir()
    cached = cache / f"{weights.stem}-{file_sha256(str(weights))[:16]}-opset17.onnx"
    cached.write_bytes(pathlib.Path(dynamic_onnx).read_bytes())
    assert onnx_for_checkpoint(str(weights), cache, None) == str(cached)
    torch_p = Predictor(weights, input_size=320)
    ov_p = openvino_predictor(weights, tmp_path, input_size=320, onnx_cache_dir=cache, precision="auto",
                              score_threshold=0.05)
    assert (ov_p.engine, ov_p.onnx_path) == ("openvino", str(cached))
    assert ov_p.providers[0].startswith("OpenVINO") and ov_p.model_info["engine"] == "openvino"
    for im in coco_images() + [s[0] for s in rendered_scenes(3)]:
        a, b = torch_p(im), ov_p(im)
        assert float((a.id_map == b.id_map).mean()) >= 0.99
        seg_a = sorted((s.id, s.category_id) for s in a.segments)
        assert seg_a and seg_a == sorted((s.id, s.category_id) for s in b.segments)


def test_fixed_shapes_from_the_second_sighting_same_outputs(dynamic_onnx, tmp_path):
    eng = OpenVINOEngine(dynamic_onnx, threads=1, cache_dir=tmp_path, max_shapes=1)
    a = batch_of(coco_images(), (1, 3, 192, 256))
    b = batch_of(coco_images(), (1, 3, 224, 256))
    first = eng(a)
    assert eng._per_shape == {}  # first sighting: the dynamic model
    second = eng(a)
    assert list(eng._per_shape) == [(1, 3, 192, 256)]
    for k in RAW_OUTPUT_NAMES:
        assert torch.allclose(first[k], second[k], atol=1e-3, rtol=1e-4), k
    eng(b), eng(b)
    assert list(eng._per_shape) == [(1, 3, 224, 256)]  # max_shapes=1: the older shape is dropped
    never = OpenVINOEngine(dynamic_onnx, threads=1, cache_dir=tmp_path, static_shapes=False)
    never(a), never(a)
    assert never._per_shape == {}


def test_fixed_shape_export_runs_batches_in_chunks(tmp_path):
    fixed = exported_onnx("256x320")
    eng = OpenVINOEngine(fixed, threads=1, cache_dir=tmp_path)
    assert (eng.fixed_batch, eng.fixed_hw, eng.static_shapes) == (1, (256, 320), False)
    batch = batch_of(coco_images() + [rendered_scenes(1)[0][0]], (3, 3, 256, 320))
    out = eng(batch)
    assert out["embedding"].shape[0] == 3 and out["cls_logits"].shape[0] == 3 and out["memory"].shape[0] == 7
    single = eng(batch[2:3])
    assert torch.allclose(out["embedding"][2], single["embedding"][0], atol=1e-4)
    with pytest.raises(PredictorError, match=r"fixed 256x320 model, got a 192x256 input"):
        eng(batch_of(coco_images(), (1, 3, 192, 256)))


def test_compiled_for_latency_with_the_thread_count_and_fp32_explicit(engine):
    props = engine.compiled_properties
    assert str(props["PERFORMANCE_HINT"]) == "LATENCY" and int(props["NUM_STREAMS"]) == 1
    assert int(props["INFERENCE_NUM_THREADS"]) == 1
    assert "f32" in str(props["INFERENCE_PRECISION_HINT"]) or "float32" in str(props["INFERENCE_PRECISION_HINT"])
    assert engine.providers[0].startswith("OpenVINO") and "CPU fp32" in engine.providers[0]


def test_compiled_models_are_cached_and_reused(dynamic_onnx, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    OpenVINOEngine(dynamic_onnx, threads=1, cache_dir=cache)
    blobs = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert blobs  # the compiled model went to the cache
    OpenVINOEngine(dynamic_onnx, threads=1, cache_dir=cache)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == blobs  # imported, not compiled again
    monkeypatch.setenv("CIAE_CACHE_DIR", str(tmp_path / "base"))
    assert default_openvino_cache_dir() == tmp_path / "base" / "openvino"
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(PredictorError, match="cannot create the OpenVINO cache"):
        OpenVINOEngine(dynamic_onnx, cache_dir=blocker / "cache")


def test_precision_choices_and_errors(dynamic_onnx, tmp_path):
    with pytest.raises(PredictorError, match=r"bf16.*AMX or AVX512_BF16.*AVX2-only test CPU") as e:
        OpenVINOEngine(dynamic_onnx, precision="bf16", cache_dir=tmp_path, features=NO_BF16)
    assert "\n" not in str(e.value)
    with pytest.raises(PredictorError, match="unknown precision 'fp8'"):
        OpenVINOEngine(dynamic_onnx, precision="fp8", cache_dir=tmp_path)
    with pytest.raises(PredictorError, match="fp16' is for device='GPU'"):
        OpenVINOEngine(dynamic_onnx, precision="fp16", cache_dir=tmp_path)
    with pytest.raises(PredictorError, match="is not quantised; precision='int8' needs an int8 IR"):
        OpenVINOEngine(dynamic_onnx, precision="int8", cache_dir=tmp_path)
    auto = OpenVINOEngine(dynamic_onnx, precision="auto", threads=1, cache_dir=tmp_path, features=NO_BF16)
    assert auto.precision == "fp32" and "no native bf16" in auto.precision_reason
    amx = OpenVINOEngine(dynamic_onnx, precision="auto", threads=1, cache_dir=tmp_path, features=AMX)
    assert amx.precision == "bf16" and "AMX" in amx.precision_reason
    with pytest.raises(PredictorError, match="threads must be a non-negative integer"):
        OpenVINOEngine(dynamic_onnx, threads=-1, cache_dir=tmp_path)


def test_predictor_engine_and_precision_checks(dynamic_onnx, tmp_path):
    with pytest.raises(PredictorError, match="unknown precision 'int8' for the torch engine"):
        Predictor(shipped_weights(), precision="int8")
    with pytest.raises(PredictorError, match="needs an int8 model; write one with ciae-export"):
        Predictor(shipped_weights(), engine="openvino", precision="int8", onnx_cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before exporting anything
    xml = tmp_path / "m.xml"
    xml.write_text("<net/>")
    with pytest.raises(PredictorError, match="is an OpenVINO IR; use engine='openvino'"):
        Predictor(xml)
    p = openvino_predictor(dynamic_onnx, tmp_path, precision="auto")
    assert p.precision == p.model_info["precision"] == ("bf16" if p._engine.precision == "bf16" else "fp32")
    assert Predictor(shipped_weights(), precision="auto").precision == "fp32"


def test_devices(dynamic_onnx, tmp_path):
    import openvino as ov

    with pytest.raises(PredictorError, match="unknown OpenVINO device 'TPU'"):
        OpenVINOEngine(dynamic_onnx, device="TPU", cache_dir=tmp_path)
    if not any(d.startswith("GPU") for d in ov.Core().available_devices):
        with pytest.raises(PredictorError, match=r"device 'GPU' is not present \(available: CPU"):
            OpenVINOEngine(dynamic_onnx, device="GPU", cache_dir=tmp_path)


def test_intel_gpu_matches_the_cpu(dynamic_onnx, tmp_path, engine):
    import openvino as ov

    if not any(d.startswith("GPU") for d in ov.Core().available_devices):
        pytest.skip("no Intel GPU (OpenVINO device GPU) on this machine")
    gpu = OpenVINOEngine(dynamic_onnx, device="GPU", precision="fp32", cache_dir=tmp_path)
    batch = batch_of(coco_images(), (1, 3, 256, 352))
    a, b = engine(batch), gpu(batch)
    assert torch.allclose(a["embedding"], b["embedding"], atol=1e-2)
    assert OpenVINOEngine(dynamic_onnx, device="GPU", precision="auto", cache_dir=tmp_path).precision == "fp16"


def test_bad_files_give_one_line_errors_naming_the_file(dynamic_onnx, tmp_path):
    import onnx

    with pytest.raises(PredictorError, match="model file not found"):
        OpenVINOEngine(tmp_path / "none.onnx", cache_dir=tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "garbage.onnx").write_bytes(b"this is not an onnx file" * 20)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(pathlib.Path(dynamic_onnx).read_bytes()[:100_000])
    (tmp_path / "model.pt").write_bytes(b"x")
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3), (torch.zeros(1, 3, 8, 8),), str(plain), dynamo=False)
    renamed = tmp_path / "renamed.onnx"
    proto = onnx.load(str(dynamic_onnx))
    proto.graph.output[0].name = "logits"
    proto.graph.node[-1].output[0] = "logits"  # keep the graph valid only if the last node made it
    onnx.save(proto, str(renamed))
    cases = {"empty.onnx": "empty", "garbage.onnx": "corrupt", "cut.onnx": "corrupt|truncated|cannot read",
             "model.pt": "reads a .onnx", "plain.onnx": "no 'ciae_config'",
             "renamed.onnx": "not a ciae forward_raw model|cannot read"}
    for name, pattern in cases.items():
        with pytest.raises(PredictorError, match=pattern) as e:
            OpenVINOEngine(tmp_path / name, cache_dir=tmp_path / "cache")
        assert name in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


def test_fp32_ir_loads_and_agrees(dynamic_onnx, tmp_path, engine):
    """An fp32 IR with our metadata (what write_ir gives an unquantised model) runs like the ONNX."""
    import openvino as ov

    from ciae_core.export import read_onnx_metadata
    from ciae_core.openvino_ir import write_ir

    meta = read_onnx_metadata(dynamic_onnx)
    meta["ciae_onnx_format"] = meta.pop("ciae_format")
    xml = write_ir(ov.Core().read_model(str(dynamic_onnx)), tmp_path / "fp32.xml", meta)
    ir = OpenVINOEngine(xml, precision="auto", threads=1, cache_dir=tmp_path, features=NO_BF16)
    assert ir.precision == "fp32" and not ir.quantized
    batch = batch_of(coco_images(), (1, 3, 192, 256))
    a, b = engine(batch), ir(batch)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in RAW_OUTPUT_NAMES)
    meta["ciae_onnx_format"] = "ciae-onnx/1"
    old = write_ir(ov.Core().read_model(str(dynamic_onnx)), tmp_path / "old.xml", meta)
    with pytest.raises(PredictorError, match="ciae-onnx/1 export whose embedding output"):
        OpenVINOEngine(old, cache_dir=tmp_path)

