"""Post-training int8 quantisation of an exported model with NNCF, written as a ciae OpenVINO IR.

``quantize(source, out, calibration=...)``: ``source`` is a ``.safetensors`` checkpoint
(exported to a temporary dynamic ONNX first) or a ``ciae-export`` ``.onnx``; the calibration set
is ``"synthetic"`` (scenes of :func:`ciae_core.synth.render_scene` from seed
:data:`CALIBRATION_SEED`, which neither training (seed 0) nor the held-out validation set (seed
1000) uses) or a folder of the user's own images. Each calibration image is letterboxed exactly
as the :class:`~ciae_core.predictor.Predictor` does on the CPU (:func:`network_input`; a test
holds the two equal), so the activation ranges NNCF observes are those of inference.

The result (:func:`ciae_core.openvino_ir.write_ir`) is an ``.xml`` + ``.bin`` IR with FakeQuantize
nodes, the ONNX export's metadata (config, thresholds, source hash) and ``ciae_precision=int8``,
``ciae_calibration``, ``ciae_quantize_scope``, ``ciae_nncf_version``; the OpenVINO engine loads
it (precision ``int8`` or ``auto``). It keeps the source's shape (dynamic or fixed).

Decisions (measured, README.md "CPU engines and precisions"):

* **What stays in float** (``scope``, :data:`QUANTIZE_SCOPES`): GroupNorm (``MVN`` in OpenVINO)
  is never quantised by NNCF (only the convolutions before it). ``"outputs"`` additionally keeps
  the last convolution of every output in float — the class, box and centerness predictors,
  the box-embedding and embedding-branch projections that form the embedding ``P' + P''`` — so
  the values the fusion compares (Eq. 16 similarities, scores) are not rounded to 256 levels.
  Measured on the shipped model (100 held-out scenes, 64 calibration scenes): PQ 84.04 with
  either scope against 84.00 in fp32, so accuracy does not need it; ``"none"`` (the default)
  is 4-5 % faster (CPU time per frame). ``"outputs"`` stays available for models where it does.
* **Preset** ``mixed`` (symmetric weights, asymmetric activations): activations after
  hard-swish and GroupNorm are not sign-symmetric. ``fast_bias_correction`` on.
* NNCF's telemetry is blocked (:mod:`ciae_core.no_telemetry`); its progress bars are silenced
  unless the ``ciae_core.quantize`` logger is at DEBUG.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import pathlib
import tempfile
from typing import Sequence

import numpy as np

from ciae_core.export import ExportError
from ciae_core.openvino_core import ensure_signal_stack, shared_core
from ciae_core.user_input import quote

logger = logging.getLogger(__name__)

CALIBRATION_SEED = 3000
SYNTHETIC_SIZE = (256, 320)  # the shipped model's training scenes (models/README.md)
DEFAULT_NUM_IMAGES = 64
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# OpenVINO node-name patterns (from the ONNX export's module paths) kept in float
_OUTPUT_LAYERS = [r"/head/(cls_logits|bbox_pred|centerness|box_embedding)(_\d+)?/.*",
                  r"/embedding_branch/(predictor|box_fuse)/.*"]
QUANTIZE_SCOPES = {"none": [], "outputs": _OUTPUT_LAYERS}
DEFAULT_SCOPE = "none"
PRESETS = ("mixed", "performance")


class QuantizeError(ExportError):
    """Quantisation problem (one line: what is wrong and what to do)."""


def calibration_images(source: str | os.PathLike, num_images: int | None = DEFAULT_NUM_IMAGES,
                       seed: int = CALIBRATION_SEED, size: tuple[int, int] = SYNTHETIC_SIZE) -> list[np.ndarray]:
    """RGB uint8 ``(H, W, 3)`` calibration images: ``"synthetic"`` scenes ``(seed, i)`` of ``size``
    or the images of a folder (sorted by name, the first ``num_images``; None: all)."""
    if num_images is not None and (isinstance(num_images, bool) or int(num_images) < 1):
        raise QuantizeError(f"the number of calibration images must be >= 1, got {quote(num_images)}")
    if str(source) == "synthetic":
        from ciae_core.synth import render_scene

        return [render_scene((int(seed), i), *size)[0] for i in range(int(num_images or DEFAULT_NUM_IMAGES))]
    import cv2

    folder = pathlib.Path(source)
    if not folder.is_dir():
        raise QuantizeError(f"calibration folder not found: {folder} (give a folder of images or 'synthetic')")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise QuantizeError(f"calibration folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    images = []
    for f in files[:num_images]:
        im = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if im is None:
            raise QuantizeError(f"cannot decode calibration image {f}; remove it or convert it")
        images.append(np.ascontiguousarray(im[..., ::-1]))
    return images


def network_input(image: np.ndarray, lb) -> np.ndarray:
    """``(1, 3, Hp, Wp)`` float32 network input of an RGB image for the geometry ``lb``
    (:class:`ciae_core.geometry.Letterbox`): resized as the Predictor's CPU path (area averaging
    when both sides shrink, else bilinear), padded with zeros bottom/right."""
    import cv2

    rh, rw = lb.resized_size
    if not lb.is_identity:
        shrink = rh < lb.height and rw < lb.width
        image = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    out = np.zeros((1, 3, lb.padded_height, lb.padded_width), dtype=np.float32)
    out[0, :, :rh, :rw] = image.transpose(2, 0, 1)
    return out


def network_inputs(images: Sequence[np.ndarray], input_size: int, max_size: int = 1333,
                   canvas: tuple[int, int] | None = None) -> list[np.ndarray]:
    """:func:`network_input` of each image, letterboxed to ``input_size`` (or into ``canvas``)."""
    from ciae_core.geometry import letterbox, letterbox_into
    from ciae_core.predictor_error import PredictorError

    out = []
    for i, im in enumerate(images):
        try:
            lb = (letterbox_into(im.shape[0], im.shape[1], *canvas) if canvas
                  else letterbox(im.shape[0], im.shape[1], input_size, max_size))
        except PredictorError as e:
            raise QuantizeError(f"calibration image {i}: {e}") from None
        out.append(network_input(im, lb))
    return out


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF's progress bars and INFO lines off unless our logger is at DEBUG."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_logger.setLevel(level)


def _onnx_source(source: str, tmp_dir: str) -> str:
    if pathlib.Path(source).suffix.lower() == ".onnx":
        return source
    from ciae_core.export import export_checkpoint

    path = os.path.join(tmp_dir, pathlib.Path(source).stem + ".onnx")
    export_checkpoint(source, path, dynamic=True)
    return path


def quantize(source: str | os.PathLike, out: str | os.PathLike, calibration: str | os.PathLike = "synthetic",
             num_images: int | None = DEFAULT_NUM_IMAGES, input_size: int | None = None, scope: str = DEFAULT_SCOPE,
             preset: str = "mixed", fast_bias_correction: bool = True) -> str:
    """Quantise ``source`` to an int8 IR at ``out`` (``.xml``) on ``calibration`` (module docstring).

    ``input_size``: shorter side of the calibration inputs (None: the predictor's default for
    the model's backbone; ignored for a fixed-shape export, whose canvas is used).
    Returns the ``.xml`` path. Raises :class:`QuantizeError` / :class:`ExportError` (one line).
    """
    from ciae_core.export import FORMAT as ONNX_FORMAT
    from ciae_core.export import read_onnx_config, read_onnx_metadata
    from ciae_core.no_telemetry import import_nncf, import_openvino
    from ciae_core.openvino_ir import write_ir

    if scope not in QUANTIZE_SCOPES:
        raise QuantizeError(f"unknown quantisation scope {quote(scope)}; choose one of {', '.join(QUANTIZE_SCOPES)}")
    if preset not in PRESETS:
        raise QuantizeError(f"unknown preset {quote(preset)}; choose one of {', '.join(PRESETS)}")
    source, out = os.fspath(source), pathlib.Path(out)
    if out.suffix != ".xml":
        raise QuantizeError(f"the int8 model is an OpenVINO IR: the output must end in .xml, got {out}")
    if not os.path.isfile(source):
        raise QuantizeError(f"model file not found: {source}")
    if pathlib.Path(source).suffix.lower() not in (".onnx", ".safetensors"):
        raise QuantizeError(f"{source}: quantise a .safetensors checkpoint or a .onnx from ciae-export")
    images = calibration_images(calibration, num_images)
    import_openvino()  # telemetry off before NNCF loads it
    nncf = import_nncf()
    with tempfile.TemporaryDirectory(prefix="ciae-quantize-") as tmp:
        onnx_path = _onnx_source(source, tmp)
        config, meta = read_onnx_config(onnx_path), read_onnx_metadata(onnx_path)
        try:
            model = shared_core().read_model(onnx_path)
        except Exception as e:  # noqa: BLE001 - a bad file, in one line
            raise QuantizeError(f"openvino cannot read {onnx_path}: {str(e).strip().splitlines()[0][:300]}") from None
    shape = model.inputs[0].get_partial_shape()
    canvas = (shape[2].get_length(), shape[3].get_length()) if shape[2].is_static and shape[3].is_static else None
    if input_size is None:
        from ciae_core.predictor import default_input_size

        input_size = default_input_size(config.backbone)
    inputs = network_inputs(images, int(input_size), canvas=canvas)
    if shape[0].is_static and shape[0].get_length() != 1:  # a fixed batch N: calibrate with N copies
        inputs = [np.repeat(x, shape[0].get_length(), axis=0) for x in inputs]
    patterns = QUANTIZE_SCOPES[scope]
    ignored = nncf.IgnoredScope(patterns=patterns, validate=False) if patterns else None
    nncf_preset = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}[preset]
    logger.info("quantising %s on %d %s calibration images (scope %s, preset %s)", source, len(inputs),
                calibration, scope, preset)
    try:
        with _quiet_nncf():
            quantized = nncf.quantize(model, nncf.Dataset(inputs), preset=nncf_preset, subset_size=len(inputs),
                                      fast_bias_correction=fast_bias_correction, ignored_scope=ignored)
    except Exception as e:  # noqa: BLE001 - any NNCF failure, in one line
        raise QuantizeError(f"NNCF could not quantise {source}: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from None
    finally:  # NNCF's own Cores are gone now; one destroyed out of order leaves a dangling signal stack
        gc.collect()
        ensure_signal_stack()
    calib_text = (f"synthetic: {len(images)} scenes {SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]} seed {CALIBRATION_SEED}"
                  if str(calibration) == "synthetic" else f"folder {pathlib.Path(calibration).name}: {len(images)} images")
    metadata = {k: v for k, v in meta.items() if k != "ciae_format"}
    metadata.update(ciae_onnx_format=meta.get("ciae_format", ONNX_FORMAT), ciae_precision="int8",
                    ciae_calibration=f"{calib_text}, input size {input_size if canvas is None else 'x'.join(map(str, canvas))}",
                    ciae_quantize_scope=scope, ciae_quantize_preset=preset, ciae_nncf_version=nncf.__version__)
    return write_ir(quantized, out, metadata)
