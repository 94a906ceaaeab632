"""CPU feature detection, precision checks and the automatic precision choice.

The CPUs other than this machine's are given as /proc/cpuinfo text (flags lines as Linux prints
them for those processors): a test cannot change the hardware it runs on.
"""

from __future__ import annotations

import pytest

from ciae_core.cpu_features import (CpuFeatures, check_precision, choose_precision, parse_cpuinfo,
                                    read_cpu_features)
from ciae_core.predictor_error import PredictorError

SAPPHIRE_RAPIDS = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
processor	: 1
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu
"""
ZEN4 = """model name	: AMD EPYC 9654 96-Core Processor
flags		: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16
"""
ZEN3 = """model name	: AMD EPYC
flags		: fpu sse sse2 avx avx2 fma
"""
OLD = """model name	: Intel(R) Core(TM)2 Duo CPU
flags		: fpu sse sse2 ssse3
"""
ARM = """processor	: 0
BogoMIPS	: 50.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm bf16 i8mm
"""


def features(text: str, caps=None) -> CpuFeatures:
    name, flags = parse_cpuinfo(text)
    return CpuFeatures(name, flags, None if caps is None else frozenset(caps))


def test_parse_cpuinfo_takes_the_first_processor():
    name, flags = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert name == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"amx_bf16", "amx_tile", "amx_int8", "avx512_vnni", "avx512_bf16"} <= flags
    _, arm_flags = parse_cpuinfo(ARM)
    assert "asimd" in arm_flags and "bf16" in arm_flags
    name, flags = parse_cpuinfo("")
    assert name and flags == frozenset()


@pytest.mark.parametrize("text, bf16, int8, fast_int8, described", [
    (SAPPHIRE_RAPIDS, True, True, True, "AMX (bf16, int8)"),
    (ZEN4, True, True, True, "AVX512_BF16"),
    (ZEN3, False, True, False, "no AMX"),
    (OLD, False, False, False, "no AVX2"),
])
def test_bf16_and_int8_support_by_processor(text, bf16, int8, fast_int8, described):
    f = features(text)
    assert (f.bf16, f.int8, f.int8_fast) == (bf16, int8, fast_int8)
    assert described in f.describe() and f.name in f.describe()


def test_openvino_capabilities_confirm_bf16():
    """Flags alone say AVX512_BF16; an OpenVINO that reports no BF16 kernel (e.g. a hypervisor
    that masks the state) wins: bf16 is then not offered."""
    assert features(ZEN4, caps={"FP32", "BF16", "INT8"}).bf16
    assert not features(ZEN4, caps={"FP32", "INT8"}).bf16
    assert not features(ZEN3, caps={"FP32", "INT8"}).bf16 and features(ZEN3, caps={"FP32", "INT8"}).int8


def test_check_precision_one_line_errors():
    zen3 = features(ZEN3)
    with pytest.raises(PredictorError, match=r"bf16.*AMX or AVX512_BF16.*AMD EPYC") as e:
        check_precision("bf16", zen3)
    assert "\n" not in str(e.value) and "fp32" in str(e.value)
    with pytest.raises(PredictorError, match=r"int8.*AVX2"):
        check_precision("int8", features(OLD))
    with pytest.raises(PredictorError, match="unknown CPU precision 'fp8'"):
        check_precision("fp8", zen3)
    check_precision("fp32", features(OLD))
    check_precision("int8", zen3)
    for p in ("fp32", "bf16", "int8"):
        check_precision(p, features(SAPPHIRE_RAPIDS))


def test_choose_precision_prefers_native_bf16_and_says_why():
    precision, reason = choose_precision(features(SAPPHIRE_RAPIDS))
    assert precision == "bf16" and "AMX" in reason and "native bf16" in reason
    assert choose_precision(features(ZEN4))[0] == "bf16"
    precision, reason = choose_precision(features(ZEN3))
    assert precision == "fp32" and "no native bf16" in reason and "int8" in reason


def test_this_machine_flags_agree_with_openvino():
    """On this machine the kernel's flags and OpenVINO's CPU capabilities say the same thing about
    bf16 (OpenVINO lists BF16 exactly where AMX-BF16 or AVX512_BF16 exist)."""
    pytest.importorskip("openvino")
    real = read_cpu_features()
    assert real.openvino_capabilities is not None and "FP32" in real.openvino_capabilities
    flags_only = read_cpu_features(ask_openvino=False)
    assert flags_only.openvino_capabilities is None and flags_only.flags == real.flags
    assert (flags_only.amx_bf16 or flags_only.avx512_bf16) == ("BF16" in real.openvino_capabilities)


def test_missing_cpuinfo_falls_back_to_openvino(tmp_path):
    pytest.importorskip("openvino")
    f = read_cpu_features(str(tmp_path / "no-cpuinfo"))
    assert f.int8 == ("INT8" in f.openvino_capabilities)


def test_auto_engine(monkeypatch):
    import ciae_core.cpu_features as cf

    assert cf.auto_engine("cuda:0", "m.safetensors")[:2] == ("torch", "auto")
    assert cf.auto_engine("cpu", "m-int8.xml")[:2] == ("openvino", "auto")
    monkeypatch.setattr(cf, "default_cpu_engine", lambda: ("torch", "fp32", "because"))
    assert cf.auto_engine("cpu", "m.safetensors") == ("torch", "fp32", "because")
    engine, precision, reason = cf.auto_engine("cpu", "m.onnx")
    assert (engine, precision) == ("onnxruntime", "fp32") and "onnxruntime" in reason
    assert cf.auto_engine("cpu", "m.safetensors", "bf16")[:2] == ("torch", "bf16")  # a given precision stays
    monkeypatch.setattr(cf, "default_cpu_engine", lambda: ("openvino", "bf16", "amx"))
    assert cf.auto_engine("cpu", "m.onnx") == ("openvino", "bf16", "amx")


def test_default_cpu_engine_follows_the_features():
    from ciae_core.cpu_features import AVX2_DEFAULT, default_cpu_engine

    assert default_cpu_engine(features(SAPPHIRE_RAPIDS), True)[:2] == ("openvino", "bf16")
    engine, precision, reason = default_cpu_engine(features(ZEN3), True)
    assert (engine, precision) == AVX2_DEFAULT[:2] and "no native bf16" in reason
    assert default_cpu_engine(features(SAPPHIRE_RAPIDS), False)[:2] == ("torch", "fp32")
