"""ciae_core/cli/hints.py: the library's keyword hints in the words of the command line showing them."""

from __future__ import annotations

import argparse
import pathlib
import subprocess

import pytest
import torch

from ciae_core.cli.hints import command_line_hint, parser_options

REPO = pathlib.Path(__file__).resolve().parents[3]
LIB = "device='cuda' requested but no CUDA GPU is available; use device='cpu'"


def test_keyword_hints_become_options_or_ros_parameters():
    assert command_line_hint(LIB, {"device"}) == \
        "--device cuda requested but no CUDA GPU is available; use --device cpu"
    assert command_line_hint(LIB, {"device"}, "ros") == \
        "device:=cuda requested but no CUDA GPU is available; use device:=cpu"
    both = "precision='fp16' needs device=\"cuda\"; use 'fp32' or 'bf16' on the CPU"
    assert command_line_hint(both, {"device", "precision"}) == \
        "--precision fp16 needs --device cuda; use 'fp32' or 'bf16' on the CPU"
    assert command_line_hint("input_size=0.5 or publish_confidence=True", {"input_size", "publish_confidence"},
                             "ros") == "input_size:=0.5 or publish_confidence:=true"
    # a keyword the tool has no option for stays the library's (the truest hint there is)
    odd = "for onnxruntime use trt_fp16=True (TensorRT) or precision='fp32'"
    assert command_line_hint(odd, {"precision"}) == "for onnxruntime use trt_fp16=True (TensorRT) or --precision fp32"
    assert command_line_hint("unknown engine 'tf'; use 'torch'", {"engine"}) == "unknown engine 'tf'; use 'torch'"
    with pytest.raises(ValueError):
        command_line_hint(LIB, {"device"}, "python")


def test_parser_options_are_the_dest_names():
    p = argparse.ArgumentParser()
    p.add_argument("--input-size", type=int)
    p.add_argument("--device")
    p.add_argument("images")
    assert parser_options(p) == {"help", "input_size", "device"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("tool,extra,expected", [
    ("ciae-predict", ["--device", "cuda"], "ciae-predict: error: --device cuda requested but no CUDA GPU is available; "
                                           "use --device cpu"),
    ("ciae-predict", ["--precision", "fp16"], "ciae-predict: error: --precision fp16 needs --device cuda; use 'fp32' "
                                              "or 'bf16' on the CPU"),
    ("ciae-eval", ["--device", "cuda"], "ciae-eval: error: --device cuda requested but no CUDA GPU is available; use "
                                        "--device cpu"),
])
def test_tools_say_their_own_option(tool, extra, expected, tmp_path):
    """Through the console entries: the hint names the tool's option, not the Python keyword."""
    from console_scripts import console_command, console_env

    from ciae_core.synth import write_dataset

    write_dataset(str(tmp_path / "d"), 1, 192, 224, seed=0)
    data = ["--images", str(tmp_path / "d" / "images"), "--out", str(tmp_path / "o")] if tool == "ciae-predict" \
        else ["--data", str(tmp_path / "d")]
    res = subprocess.run([*console_command(tool), "--weights", str(REPO / "models" / "ciae_synthetic_small.safetensors"),
                          *data, *extra], env=console_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode in (1, 2) and res.stderr.strip().splitlines()[-1] == expected, res.stderr[-1500:]
