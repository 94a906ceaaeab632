"""What the CPU can do for inference, and the CPU default engine/precision chosen from it.

Detection reads the instruction-set flags the kernel reports (``/proc/cpuinfo`` on Linux) and,
where OpenVINO is installed, its CPU device's ``OPTIMIZATION_CAPABILITIES`` (``BF16`` appears
only where oneDNN has native bf16 kernels). What matters here:

* **bf16**: native bf16 arithmetic is AMX (``amx_bf16`` + ``amx_tile``: Xeon Sapphire Rapids
  and later) or AVX512_BF16 (``avx512_bf16``: Cooper Lake, AMD Zen 4+). Without either,
  OpenVINO's bf16 hint silently runs fp32 (measured here on an AVX2-only AMD EPYC: the compiled
  model reports ``INFERENCE_PRECISION_HINT`` f32) and torch emulates bf16 slowly, so asking for
  bf16 there is an error (:func:`check_precision`), not a silent no-op.
* **int8**: oneDNN runs u8 x s8 convolutions from AVX2 on (``vpmaddubsw``); VNNI
  (``avx512_vnni``, ``avx_vnni``) or AMX-INT8 (``amx_int8``) make them several times faster.
  Below AVX2 int8 is refused.

:func:`choose_precision` (``precision="auto"``) and :func:`default_cpu_engine` encode the
measurements written down in README.md ("CPU engines and precisions"): see their docstrings.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass

from ciae_core.predictor_error import PredictorError

logger = logging.getLogger(__name__)

CPU_PRECISIONS = ("fp32", "bf16", "int8")
# the CPU default without native bf16: (engine, precision, why), from the measurements on the AVX2-only
# development machine (README.md, "CPU engines and precisions")
AVX2_DEFAULT = ("onnxruntime", "fp32", "1.4x less CPU time per frame than torch fp32 on the small model (OpenVINO "
                "fp32 1.1-1.3x), identical id maps; int8 (1.5-1.7x) needs a quantised file")


@dataclass(frozen=True)
class CpuFeatures:
    """Inference-relevant features of the CPU.

    ``flags``: lower-case ISA flags (``/proc/cpuinfo`` names); ``openvino_capabilities``:
    OpenVINO CPU ``OPTIMIZATION_CAPABILITIES`` (None when OpenVINO was not asked or is missing).
    """

    name: str
    flags: frozenset
    openvino_capabilities: frozenset | None = None

    def has(self, *flags: str) -> bool:
        return all(f in self.flags for f in flags)

    @property
    def avx2(self) -> bool:
        return self.has("avx2")

    @property
    def avx512(self) -> bool:
        return self.has("avx512f")

    @property
    def amx_bf16(self) -> bool:
        return self.has("amx_tile", "amx_bf16")

    @property
    def amx_int8(self) -> bool:
        return self.has("amx_tile", "amx_int8")

    @property
    def avx512_bf16(self) -> bool:
        return self.has("avx512_bf16")

    @property
    def vnni(self) -> bool:
        return self.has("avx512_vnni") or self.has("avx_vnni")

    @property
    def bf16(self) -> bool:
        """Native bf16 arithmetic (AMX-BF16 or AVX512_BF16), confirmed by OpenVINO where it was asked."""
        native = self.amx_bf16 or self.avx512_bf16
        if self.openvino_capabilities is not None:
            return native and "BF16" in self.openvino_capabilities
        return native

    @property
    def int8(self) -> bool:
        """int8 convolutions are possible (AVX2 or better; fast with :attr:`int8_fast`)."""
        ok = self.avx2 or self.vnni or self.amx_int8
        if self.openvino_capabilities is not None:
            return ok and "INT8" in self.openvino_capabilities
        return ok

    @property
    def int8_fast(self) -> bool:
        """VNNI or AMX-INT8 dot-product instructions."""
        return self.vnni or self.amx_int8

    def describe(self) -> str:
        """One line, e.g. ``AMD EPYC: AVX2, no AVX-512, no VNNI, no AMX``."""
        parts = ["AVX2" if self.avx2 else "no AVX2", "AVX-512" if self.avx512 else "no AVX-512",
                 "AVX512_BF16" if self.avx512_bf16 else "no AVX512_BF16",
                 ("AVX512-VNNI" if self.has("avx512_vnni") else "AVX-VNNI") if self.vnni else "no VNNI",
                 "AMX (bf16, int8)" if self.amx_bf16 and self.amx_int8 else
                 ("AMX-BF16" if self.amx_bf16 else ("AMX-INT8" if self.amx_int8 else "no AMX"))]
        return f"{self.name}: {', '.join(parts)}"


def parse_cpuinfo(text: str) -> tuple[str, frozenset]:
    """``(model name, flags)`` of the first processor in ``/proc/cpuinfo`` text (x86 ``flags``,
    Arm ``Features``)."""
    name, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "Features") and flags is None:
            flags = frozenset(value.lower().split())
    return name or platform.processor() or "unknown CPU", flags or frozenset()


def openvino_cpu_capabilities() -> frozenset | None:
    """OpenVINO's CPU ``OPTIMIZATION_CAPABILITIES``, or None without OpenVINO."""
    try:
        from ciae_core.openvino_core import shared_core

        return frozenset(str(c) for c in shared_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception as e:  # noqa: BLE001 - not installed or no CPU plugin: detection from the flags alone
        logger.debug("OpenVINO CPU capabilities unavailable: %s", e)
        return None


def read_cpu_features(cpuinfo_path: str = "/proc/cpuinfo", ask_openvino: bool = True) -> CpuFeatures:
    """Detect this machine's :class:`CpuFeatures` (flags empty where ``cpuinfo_path`` is missing,
    e.g. not Linux: then only OpenVINO's capabilities say anything)."""
    text = ""
    if os.path.isfile(cpuinfo_path):
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    name, flags = parse_cpuinfo(text)
    caps = openvino_cpu_capabilities() if ask_openvino else None
    if not flags and caps is not None:  # no cpuinfo: take what OpenVINO says
        flags = frozenset({"avx2"} if "INT8" in caps else set()) | (
            frozenset({"avx512_bf16"}) if "BF16" in caps else frozenset())
    return CpuFeatures(name=name, flags=flags, openvino_capabilities=caps)


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """:func:`read_cpu_features` of this machine, detected once per process."""
    features = read_cpu_features()
    logger.info("CPU features: %s", features.describe())
    return features


def check_precision(precision: str, features: CpuFeatures, engine: str = "openvino") -> None:
    """:class:`PredictorError` (one line) when ``precision`` cannot run natively on this CPU."""
    if precision not in CPU_PRECISIONS:
        raise PredictorError(f"unknown CPU precision {precision!r}; choose one of {', '.join(CPU_PRECISIONS)} or 'auto'")
    if precision == "bf16" and not features.bf16:
        raise PredictorError(f"precision='bf16' needs a CPU with AMX or AVX512_BF16 (this one: {features.describe()}); "
                             f"{engine} would run it in fp32 or emulate it slowly: use precision='fp32' or 'auto'")
    if precision == "int8" and not features.int8:
        raise PredictorError(f"precision='int8' needs a CPU with AVX2 or better (this one: {features.describe()}); "
                             f"use precision='fp32' or 'auto'")


def choose_precision(features: CpuFeatures, engine: str = "openvino") -> tuple[str, str]:
    """``precision="auto"`` for a float model: ``(precision, reason)``.

    bf16 where the CPU computes it natively (the accuracy proxy measured here, torch's bf16
    autocast, is in README.md "CPU engines and precisions"), else fp32. int8 is never
    chosen for a float model: it needs a calibrated file (``ciae-export --int8``), and a file
    that is one runs as int8.
    """
    if features.bf16:
        return "bf16", f"{features.describe()}: native bf16; {engine} runs it"
    return "fp32", (f"{features.describe()}: no native bf16 (needs AMX or AVX512_BF16), so fp32; for int8 give a "
                    f"quantised model (ciae-export --int8)")


def default_cpu_engine(features: CpuFeatures | None = None, openvino_installed: bool | None = None
                       ) -> tuple[str, str, str]:
    """The CPU default of the node and the demo: ``(engine, precision, reason)``, decided from the
    CPU's features at start (README.md "CPU engines and precisions" has the measurements):

    * native bf16 (AMX or AVX512_BF16) → OpenVINO bf16 (not measured here, whose CPU has neither:
      the issue's side-by-side on an AMX Xeon had OpenVINO bf16 1.4-4.4x faster than onnxruntime
      fp32; its PQ is not measured either — torch's bf16 autocast, which rounds activations and
      weights alike, is the only proxy run here, see README.md);
    * otherwise → :data:`AVX2_DEFAULT` (the fastest float engine measured on the AVX2-only
      development machine; int8, faster still, needs a quantised file, which :func:`auto_engine`
      takes when it is given one);
    * OpenVINO not installed → torch fp32.
    """
    if openvino_installed is None:
        import importlib.util

        openvino_installed = importlib.util.find_spec("openvino") is not None
    if not openvino_installed:
        return "torch", "fp32", "OpenVINO is not installed (pip install openvino): torch fp32"
    features = features or cpu_features()
    if features.bf16:
        return "openvino", "bf16", f"{features.describe()}: native bf16, OpenVINO bf16 (fastest on such CPUs)"
    engine, precision, why = AVX2_DEFAULT
    return engine, precision, f"{features.describe()}: no native bf16; {engine} {precision}: {why}"


def auto_engine(device: str, weights: str, precision: str = "auto") -> tuple[str, str, str]:
    """``engine="auto"``: ``(engine, precision, reason)`` for ``weights`` on ``device``.

    CUDA → torch (CUDA graphs); an OpenVINO IR (``.xml``) → openvino; on the CPU otherwise
    :func:`default_cpu_engine` (an ``.onnx`` goes to onnxruntime where that would be torch). A
    precision other than ``"auto"`` is kept as given.
    """
    suffix = os.path.splitext(str(weights))[1].lower()
    if not str(device).startswith("cpu"):
        engine, chosen, reason = "torch", "auto", f"device {device}: the torch engine (CUDA graphs)"
    elif suffix == ".xml":
        engine, chosen, reason = "openvino", "auto", "the weights are an OpenVINO IR"
    else:
        engine, chosen, reason = default_cpu_engine()
        if suffix == ".onnx" and engine == "torch":
            engine, chosen, reason = "onnxruntime", "fp32", reason + " (an .onnx file: onnxruntime)"
    return engine, (chosen if precision == "auto" else precision), reason
