"""No network at run time: OpenVINO's and NNCF's usage telemetry is switched off by ciae_core.

The proof is at socket level, in a fresh Python process (pytest itself would switch NNCF's
telemetry off, and the CI environment's CI=true would switch it off too, so both are removed from
the child's environment): every name lookup and connection attempt, in the child and in any
process it starts (openvino_telemetry sends from a multiprocessing child), is recorded and refused
(the network itself cannot be used from a test, so refusing is the only stand-in there is). With
ciae_core's switch, an NNCF quantisation and an OpenVINO model conversion attempt nothing and
write nothing under ~/intel; the control run without the switch shows that the same calls do
try to reach the telemetry server, so the guard sees what it should.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

pytest.importorskip("openvino")
pytest.importorskip("nncf")

# Installed as sitecustomize in every Python process of the run, so it also guards the processes
# openvino_telemetry starts to send from (multiprocessing: fork or spawn); attempts are appended
# to the file named by CIAE_NET_GUARD_LOG, one line each.
GUARD = textwrap.dedent("""
    import os, socket

    def _refuse(name):
        def call(*args, **kwargs):
            with open(os.environ["CIAE_NET_GUARD_LOG"], "a") as f:
                f.write(name + " " + repr(args[:2])[:120] + "\\n")
            raise OSError("network refused by the test guard")
        return call

    for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection"):
        setattr(socket, _name, _refuse(_name))
    socket.socket.connect = _refuse("connect")
    socket.socket.connect_ex = _refuse("connect_ex")
""")

CHILD = textwrap.dedent("""
    import json, os, sys, threading, time
    import multiprocessing

    if sys.argv[1] == "ciae":
        from ciae_core.no_telemetry import import_nncf, import_openvino
        ov, nncf = import_openvino(), import_nncf()
    else:
        import openvino as ov
        import nncf
    import numpy as np
    import openvino.opset13 as ops

    x = ops.parameter([1, 3, 8, 8], np.float32, name="x")
    w = ops.constant(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32))
    model = ov.Model([ops.relu(ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1]))], [x])
    data = [np.random.default_rng(i).random((1, 3, 8, 8), dtype=np.float32) for i in range(2)]
    nncf.quantize(model, nncf.Dataset(data), subset_size=2)
    ov.convert_model(sys.argv[2])
    log = os.environ["CIAE_NET_GUARD_LOG"]
    deadline = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < deadline and not os.path.getsize(log):  # sent from threads and processes
        busy = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
        if not busy and not multiprocessing.active_children():
            break
        time.sleep(0.2)
    home = os.path.expanduser("~")
    print("RESULT " + json.dumps({"intel": os.path.exists(os.path.join(home, "intel")),
                                  "blocked": sys.modules.get("openvino_telemetry") is None}))
    sys.stdout.flush()
    os._exit(0)
""")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> pathlib.Path:
    import torch

    path = tmp_path_factory.mktemp("onnx") / "conv.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3), (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False)
    return path


def run_child(mode: str, onnx: pathlib.Path, home: pathlib.Path, wait_s: float) -> dict:
    """Run CHILD under the guard; its result plus ``attempts`` (the guard's log lines)."""
    guard_dir = home / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    log = home / "net-attempts.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI", "NNCF_DEV", "PYTEST_CURRENT_TEST")}
    env.update(HOME=str(home), CIAE_NET_GUARD_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(guard_dir), str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(onnx), str(wait_s)], env=env, cwd=str(home),
                          capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-2000:]
    result = json.loads(line[len("RESULT "):])
    result["attempts"] = log.read_text().splitlines()
    return result


def test_quantisation_and_conversion_attempt_no_network_with_ciae_core(tiny_onnx, tmp_path):
    result = run_child("ciae", tiny_onnx, tmp_path, wait_s=10)
    assert result["blocked"]
    assert result["attempts"] == []
    assert not result["intel"]  # no client-id / consent files written into the user's home


def test_control_without_the_switch_the_guard_sees_the_telemetry(tiny_onnx, tmp_path):
    """Without ciae_core's switch the same calls try to reach the telemetry server (and are refused
    by the guard): what the test above would catch if the switch stopped working."""
    result = run_child("plain", tiny_onnx, tmp_path, wait_s=60)
    assert not result["blocked"]
    assert result["attempts"], "the guard saw no telemetry attempt: the control no longer tests anything"
    assert any("google-analytics" in a for a in result["attempts"]), result["attempts"]
    assert result["intel"]


def test_switch_after_the_real_package_was_imported_warns():
    """If someone imported openvino_telemetry before ciae_core, the block cannot apply: a warning
    names the opt-out, and NNCF's own switch is still set."""
    code = ("import logging, os, sys; logging.basicConfig(level=logging.WARNING)\n"
            "import openvino_telemetry\n"
            "from ciae_core.no_telemetry import disable_openvino_telemetry\n"
            "print(disable_openvino_telemetry(), os.environ.get('NNCF_CI'))\n")
    env = {k: v for k, v in os.environ.items() if k != "NNCF_CI"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "1"]
    assert "opt_in_out --opt_out" in proc.stderr


def test_openvino_native_libraries_use_no_sockets():
    """The runtime's shared libraries import no socket functions (the module docstring's claim)."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    import openvino

    libs = sorted((pathlib.Path(openvino.__file__).parent / "libs").glob("*.so*"))
    assert libs
    for lib in libs:
        out = subprocess.run([nm, "-D", "--undefined-only", str(lib)], capture_output=True, text=True).stdout
        used = {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}
        assert not used & {"socket", "connect", "getaddrinfo", "gethostbyname"}, lib.name
