"""ONNX export of forward_raw, reading exported files back, torch ↔ onnxruntime parity (the engine: test_engine_onnxruntime.py)."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import cv2
import numpy as np
import onnx
import pytest
import torch

from ciae_core.checkpoint import load_model
from ciae_core.export import OUTPUT_NAMES, export_checkpoint, read_onnx_config
from ciae_core.predictor import Predictor, PredictorError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_predictor import FAST, SAMPLE_IMAGES, matched_agreement, tiny_model_path  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> pathlib.Path:
    return tiny_model_path(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def dynamic_onnx(weights, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_checkpoint(weights, out, dynamic=True)
    return out


def _real_images() -> list[np.ndarray]:
    """The COCO sample images (RGB) and a synthetic scene when the generator is there."""
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR)[..., ::-1].copy() for p in sorted(SAMPLE_IMAGES.glob("*.jpg"))]
    try:
        from ciae_core.synth import render_scene
    except ImportError:
        return images
    image, _, _ = render_scene(3, 240, 320)
    return images + [image]


@pytest.mark.parametrize("shape", [(1, 3, 256, 352), (2, 3, 192, 256)])
def test_raw_outputs_match_torch(weights, dynamic_onnx, shape):
    import onnxruntime as ort

    model = load_model(weights)
    images = _real_images()
    batch = torch.zeros(shape)
    for i in range(shape[0]):
        im = cv2.resize(images[i % len(images)], (shape[3], shape[2]), interpolation=cv2.INTER_AREA)
        batch[i] = torch.from_numpy(im).permute(2, 0, 1).float()
    sess = ort.InferenceSession(str(dynamic_onnx), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": batch.numpy()})))
    with torch.no_grad():
        ref = model.forward_raw(batch)
    for k in OUTPUT_NAMES:
        assert outs[k].shape == tuple(ref[k].shape), k
        # absolute tolerance for every output, box_regression (ltrb pixels, up to ~350) included:
        # measured max abs error ~2.6e-4 there, ~1e-5 elsewhere
        err = float(np.abs(outs[k] - ref[k].numpy()).max())
        assert err <= 1e-3, (k, err)


@pytest.mark.parametrize("thresholds", [{}, FAST], ids=["model_defaults", "fast"])
def test_onnxruntime_predictor_matches_torch_on_real_images(weights, dynamic_onnx, thresholds):
    """Requirement: final id maps agree on >= 99.5% of pixels with identical segment categories —
    the full sorted (id, category_id) lists are equal, with the model's own thresholds and with
    the fast ones (score threshold 0, 20 detections) used elsewhere."""
    torch_p = Predictor(weights, input_size=256, **thresholds)
    ort_p = Predictor(dynamic_onnx, engine="onnxruntime", input_size=256, intra_op_threads=1, **thresholds)
    assert ort_p.providers == ["CPUExecutionProvider"]
    assert [c.id for c in ort_p.categories] == [c.id for c in torch_p.categories]
    for im in _real_images():
        a, b = torch_p(im), ort_p(im)
        agree = float((a.id_map == b.id_map).mean())
        assert agree >= 0.995, agree
        seg_a = sorted((s.id, s.category_id) for s in a.segments)
        seg_b = sorted((s.id, s.category_id) for s in b.segments)
        assert seg_a and seg_a == seg_b


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


def test_bad_onnx_files_give_one_line_errors_naming_the_file(dynamic_onnx, tmp_path):
    good = dynamic_onnx.read_bytes()
    cases = {
        "missing.onnx": None,
        "empty.onnx": b"",
        "garbage.onnx": b"\x00\xffnot a protobuf" * 50,
        "truncated.onnx": good[: len(good) // 3],
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            _write(path, data)
        with pytest.raises(PredictorError) as e:
            Predictor(path, engine="onnxruntime")
        msg = str(e.value)
        assert name in msg and "\n" not in msg, msg


def test_onnx_without_ciae_metadata(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["images"], ["out"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(PredictorError, match="foreign.onnx has no 'ciae_config'"):
        Predictor(path, engine="onnxruntime")


def test_onnx_from_the_full_resolution_embedding_format_is_refused(dynamic_onnx, tmp_path):
    """A ciae-onnx/1 export of a paper-order (embedding_stride 1) model output the full-resolution P;
    this version fuses from the stride-4 map, so it asks for a re-export instead of misreading it.
    A /1 export of an embedding_stride-4 model has the same outputs and is still accepted."""
    proto = onnx.load(str(dynamic_onnx))
    meta = {p.key: p for p in proto.metadata_props}
    meta["ciae_format"].value = "ciae-onnx/1"
    cfg = json.loads(meta["ciae_config"].value)
    for stride, name in ((1, "old_stride1.onnx"), (4, "old_stride4.onnx")):
        cfg["embedding_stride"] = stride
        meta["ciae_config"].value = json.dumps(cfg)
        onnx.save(proto, str(tmp_path / name))
    with pytest.raises(PredictorError, match="old_stride1.onnx is a ciae-onnx/1 export .* re-export"):
        Predictor(tmp_path / "old_stride1.onnx", engine="onnxruntime")
    assert read_onnx_config(tmp_path / "old_stride4.onnx").embedding_stride == 4


def test_onnx_file_with_torch_engine_is_refused(dynamic_onnx):
    with pytest.raises(PredictorError, match="engine='onnxruntime'"):
        Predictor(dynamic_onnx, engine="torch")


def test_export_writes_through_a_unique_temporary_file(weights, tmp_path):
    """Two exports to the same file must not share a temporary path: a ``m.onnx.tmp`` of another
    process (the old fixed name) is left alone, and nothing of ours is left behind."""
    other = _write(tmp_path / "m.onnx.tmp", b"another exporter's half-written file")
    out = tmp_path / "m.onnx"
    export_checkpoint(weights, out, size=(64, 64))
    assert other.read_bytes() == b"another exporter's half-written file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.tmp"]
    onnx.checker.check_model(onnx.load(str(out)))
    assert out.stat().st_mode & 0o444 == 0o444 & ~_umask()  # the usual mode, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.cuda
def test_onnxruntime_cuda_engine_matches_torch(weights, dynamic_onnx, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (install onnxruntime-gpu)")
    torch_p = Predictor(weights, device="cuda", input_size=256, **FAST)
    ort_p = Predictor(dynamic_onnx, engine="onnxruntime", device="cuda", providers=["cuda"], input_size=256, **FAST)
    assert ort_p.providers[0] == "CUDAExecutionProvider"
    for im in _real_images():
        for _ in range(2):  # first call learns output shapes, second binds torch outputs
            a, b = torch_p(im), ort_p(im)
            # both sides may use TF32 convolutions (cuDNN's and onnxruntime's defaults): near-ties
            # can swap instance ids, so compare matched segments as the CPU/GPU torch test does
            assert matched_agreement(a.id_map, b.id_map) >= 0.99
