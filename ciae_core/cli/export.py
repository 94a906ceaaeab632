"""``ciae-export``: a checkpoint's ``forward_raw`` as an ONNX file (:mod:`ciae_core.export`), or int8.

``--size WIDTHxHEIGHT`` (default 640x640, multiples of 32) with ``--batch-size N`` gives a fixed-shape
graph, ``--dynamic`` a symbolic batch/height/width; ``--opset`` in ``OPSET_RANGE``.
``--int8 --calib DIR|synthetic`` quantises that graph with NNCF on the calibration images
(:mod:`ciae_core.quantize`) and writes an OpenVINO IR (``--out`` ends in ``.xml``; the ``.bin``
goes beside it) for ``engine="openvino"``. Exit codes: 0 written, 1 a one-line error (nothing is
left behind), 2 bad arguments.

``--convert-backbone FILE.pth --out FILE.safetensors`` instead converts torchvision ImageNet
weights once, so that training never reads a pickle (:mod:`ciae_core.backbone_weights`: the
``.pth`` is read with ``torch.load(weights_only=True)``, tensors only).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import tempfile

from ciae_core.backbone_weights import BackboneWeightsError, read_backbone_state
from ciae_core.checkpoint import CheckpointError, save_tensors_atomic
from ciae_core.cli.sizes import parse_size
from ciae_core.export import DEFAULT_OPSET, OPSET_RANGE, ExportError, export_checkpoint


def parse_export_size(text: str) -> tuple[int, int]:
    """``"640x480"`` (WIDTHxHEIGHT) → ``(height, width)`` = ``(480, 640)``, as
    :func:`ciae_core.export.export_checkpoint` takes it; both multiples of 32."""
    try:
        width, height = parse_size(text, "--size", minimum=32, multiple_of=32)
    except ValueError as e:
        raise ExportError(str(e)) from None
    return height, width


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciae-export", description="Export a CIAE checkpoint's forward_raw to ONNX "
                                "(network outputs; selection and fusion run in ciae_core.fusion).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--weights", help=".safetensors checkpoint")
    what.add_argument("--convert-backbone", metavar="PTH",
                      help="instead: convert torchvision ImageNet weights (.pth) to --out (.safetensors), once")
    p.add_argument("--out", required=True, help="output .onnx path (.xml with --int8, .safetensors with "
                   "--convert-backbone)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--size", default="640x640", metavar="WIDTHxHEIGHT",
                       help="fixed input size WIDTHxHEIGHT, multiples of 32 (default 640x640)")
    shape.add_argument("--dynamic", action="store_true", help="symbolic batch, height and width")
    p.add_argument("--batch-size", type=int, default=1, help="fixed batch size (ignored with --dynamic)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {OPSET_RANGE[0]}..{OPSET_RANGE[1]} (default {DEFAULT_OPSET})")
    p.add_argument("--int8", action="store_true", help="quantise to int8 with NNCF: an OpenVINO IR for engine openvino")
    p.add_argument("--calib", default=None, help="with --int8: folder of calibration images like the deployment's, or "
                   "'synthetic' (rendered scenes: the synthetic model's domain)")
    p.add_argument("--calib-images", type=int, default=64, help="with --int8: calibration images used (default 64)")
    p.add_argument("--input-size", type=int, default=None, help="with --int8 and --dynamic: calibration input size "
                   "(default: the model's own, 320 small / 640 R50)")
    p.add_argument("--int8-scope", choices=("none", "outputs"), default="none",
                   help="with --int8: layers kept in float besides GroupNorm (outputs: every output's last "
                        "convolution; none, the default: measured as accurate and faster)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _export_int8(args, size: tuple[int, int]) -> str:
    """ONNX of the requested shape in a temporary directory, quantised to ``args.out``."""
    from ciae_core.quantize import quantize

    if not args.calib:
        raise ExportError("--int8 needs --calib DIR (images like the deployment's) or --calib synthetic")
    if pathlib.Path(args.out).suffix != ".xml":
        raise ExportError(f"--int8 writes an OpenVINO IR: --out must end in .xml, got {args.out}")
    with tempfile.TemporaryDirectory(prefix="ciae-export-") as tmp:
        onnx = export_checkpoint(args.weights, os.path.join(tmp, pathlib.Path(args.out).stem + ".onnx"), size=size,
                                 dynamic=args.dynamic, batch_size=args.batch_size, opset=args.opset)
        return quantize(onnx, args.out, calibration=args.calib, num_images=args.calib_images,
                        input_size=args.input_size, scope=args.int8_scope)


def convert_backbone(src: str, dst: str) -> int:
    """Write the tensors of torchvision weights ``src`` (``.pth``) to ``dst`` (``.safetensors``,
    atomically); the number of tensors. The classifier is kept (a faithful copy; the model
    ignores it)."""
    if not dst.endswith(".safetensors"):
        raise BackboneWeightsError(f"--out must end in .safetensors with --convert-backbone, got {dst}")
    state = read_backbone_state(src)
    save_tensors_atomic(dst, state, {"converted_from": os.path.basename(src)})
    return len(state)


def main(argv: list[str] | None = None) -> int:
    """``ciae-export``: write ``--weights``' ``forward_raw`` as ONNX to ``--out``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.convert_backbone:
        try:
            n = convert_backbone(args.convert_backbone, args.out)
        except (BackboneWeightsError, CheckpointError) as e:
            print(f"ciae-export: error: {e}", file=sys.stderr)
            return 1
        print(f"ciae-export: wrote {args.out} ({n} tensors from {args.convert_backbone})")
        return 0
    try:
        if args.batch_size < 1:
            raise ExportError("--batch-size must be >= 1")
        size = parse_export_size(args.size)
        if args.int8:
            out = _export_int8(args, size)
        else:
            out = export_checkpoint(args.weights, args.out, size=size, dynamic=args.dynamic,
                                    batch_size=args.batch_size, opset=args.opset)
    except ExportError as e:
        print(f"ciae-export: error: {e}", file=sys.stderr)
        return 1
    mb = sum(os.path.getsize(p) for p in (out, str(pathlib.Path(out).with_suffix(".bin"))) if os.path.exists(p)) / 1e6
    print(f"ciae-export: wrote {out} ({'int8 OpenVINO IR, ' if args.int8 else ''}opset {args.opset}, "
          f"{'dynamic' if args.dynamic else args.size}, {mb:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
