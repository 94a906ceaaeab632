"""Helpers for the ROS tests: node / camera processes and an in-process subscriber client.

Every DDS participant of a test is real (Fast DDS on loopback; ``test/conftest.py`` sets
``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` and a per-run ``ROS_DOMAIN_ID`` that the processes
started here inherit). Three processes take part, as on a robot:

* the node (``python -m ciae_ros.node``), which loads our large-data DDS profile itself;
* a camera publisher (this file run as a script), controlled with JSON lines on stdin, with
  Fast DDS defaults (like a camera driver) unless asked to load the large-data profile;
* the pytest process, whose :class:`Client` subscribes with default settings.

For the launch file there is a fourth: :class:`LaunchProcess` runs it under the real upstream
``launch``/``launch_ros`` from ``../shared/ros2-src`` (this file run as a script, ``launch`` mode),
with ``composition_interfaces`` built by :func:`build_ros2_src_interfaces`.
"""

from __future__ import annotations

import array
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
THIS = pathlib.Path(__file__).resolve()


def child_env(large_data_profile: bool = False) -> dict:
    env = os.environ.copy()
    env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    env.pop("FASTRTPS_DEFAULT_PROFILES_FILE", None)
    if large_data_profile:
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO / "config" / "fastdds_large_data.xml")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    assert env.get("ROS_AUTOMATIC_DISCOVERY_RANGE") == "LOCALHOST", "test/conftest.py must pin DDS to loopback"
    return env


# ----------------------------------------------------------------------------------------------
# upstream ROS 2 sources beside the checkout (../shared/ros2-src, tests only)
# ----------------------------------------------------------------------------------------------

# CIAE_ROS2_SRC: the sources elsewhere (e.g. a git worktree beside which there is no shared/)
ROS2_SRC = pathlib.Path(os.environ.get("CIAE_ROS2_SRC") or REPO.parent / "shared" / "ros2-src")
ROS2_SRC_CACHE = REPO / "build" / "ros2-src"


def rewrite_wheel_cmake_paths(venv: pathlib.Path) -> None:
    """What ``scripts/setup.sh`` does before building ``msg/``: the ROS wheels' exported CMake
    files name the wheel build container's Python and numpy include dirs; point them at this
    interpreter's (idempotent: only files still naming the container are rewritten)."""
    import sysconfig

    import numpy

    old_np = "/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include"
    old_py = "/opt/python/cp311-cp311/include/python3.11"
    for f in (venv / "share").rglob("*.cmake"):
        text = f.read_text()
        if "/opt/python/cp311-cp311" in text:
            tmp = f.with_name(f.name + ".ciae-tmp")
            tmp.write_text(text.replace(old_np, numpy.get_include()).replace(old_py, sysconfig.get_paths()["include"]))
            os.replace(tmp, f)


def build_ros2_src_interfaces(package: str, timeout: float = 1800.0) -> pathlib.Path:
    """Build the interface package ``../shared/ros2-src/<package>`` with rosidl into its own prefix
    ``build/ros2-src/<package>/install`` (cmake against the venv, as ``scripts/setup.sh`` builds
    ``msg/``) once, and return that prefix. Its Python packages are under
    ``lib/python3.X/site-packages``, its libraries under ``lib``. A prefix whose build did not
    finish (no ``.complete`` marker naming the sources' hash) is built again; a file lock keeps
    two test processes from building at the same time."""
    import fcntl
    import hashlib
    import shutil

    venv = pathlib.Path(sys.prefix)
    src = ROS2_SRC / package
    files = sorted(p for p in src.rglob("*") if p.is_file())
    digest = hashlib.sha256(str(venv).encode())
    for f in files:
        digest.update(str(f.relative_to(src)).encode() + f.read_bytes())
    stamp = digest.hexdigest()[:16]
    cache = ROS2_SRC_CACHE / package
    prefix, build, marker = cache / "install", cache / "build", cache / "install" / ".complete"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == stamp:
            return prefix
        shutil.rmtree(prefix, ignore_errors=True)
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        rewrite_wheel_cmake_paths(venv)
        env = {**os.environ, "AMENT_PREFIX_PATH": str(venv)}
        steps = [["cmake", str(src), f"-DCMAKE_PREFIX_PATH={venv}", f"-DCMAKE_INSTALL_PREFIX={prefix}",
                  f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF", "-DCMAKE_BUILD_TYPE=Release"],
                 ["make", f"-j{os.cpu_count() or 1}"], ["make", "install"]]
        for cmd in steps:
            res = subprocess.run(cmd, cwd=build, env=env, capture_output=True, text=True, timeout=timeout)
            if res.returncode != 0:
                raise RuntimeError(f"building {package} failed at `{' '.join(cmd[:2])}`:\n"
                                   f"{(res.stdout + res.stderr)[-3000:]}")
        marker.write_text(stamp)
    return prefix


def real_launch_env(interfaces_prefix: pathlib.Path, log_dir: pathlib.Path) -> dict:
    """Environment of a launch process as a new user has it with the venv *not* activated: the
    upstream ``launch``/``launch_ros``/``osrf_pycommon`` and the built ``composition_interfaces``
    on PYTHONPATH (neither the checkout nor the venv: the installed files must stand on their
    own), AMENT_PREFIX_PATH = the venv and that prefix, and a PATH without the venv's ``bin``
    (so ``/usr/bin/env python3`` is not the venv's Python)."""
    venv, venv_bin = pathlib.Path(sys.prefix), pathlib.Path(sys.executable).parent
    env = child_env()
    for name in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(name, None)
    env["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                  if p and os.path.realpath(p) != os.path.realpath(venv_bin))
    site = interfaces_prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (ROS2_SRC / "launch", ROS2_SRC / "launch_ros",
                                                         ROS2_SRC / "osrf_pycommon", site))
    env["AMENT_PREFIX_PATH"] = os.pathsep.join([str(venv), str(interfaces_prefix)])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(interfaces_prefix / "lib"), env.get("LD_LIBRARY_PATH"))
                                             if p)
    env["ROS_LOG_DIR"] = str(log_dir)
    return env


class LaunchProcess:
    """A launch file run by the real ``launch.LaunchService`` in its own process, as ``ros2 launch
    FILE name:=value ...`` does (ros2launch itself needs ros2cli, which is not here): the file is
    included with ``IncludeLaunchDescription(PythonLaunchDescriptionSource(FILE))`` carrying the
    arguments. Output (launch's and the nodes') in ``log``; see :func:`_launch_main`."""

    def __init__(self, launch_file: pathlib.Path, arguments: dict, env: dict, log: pathlib.Path):
        self.log_path = pathlib.Path(log)
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, str(THIS), "launch", str(launch_file), *(f"{k}:={v}" for k, v in arguments.items())]
        # its own session: on a failed stop the launch process and its nodes go together
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 90.0) -> int:
        """Ctrl-C as a terminal sends it: SIGINT to the launch process and its nodes (launch does
        not forward a SIGINT it got itself; it waits ``sigterm_timeout`` for its processes before
        escalating to SIGTERM). The session is killed after ``timeout``."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def peak_rss_mb(pid: int) -> float:
    """High-water mark of a process's resident memory in MiB (Linux ``VmHWM``): catches a large
    allocation that was already freed again."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmHWM for pid {pid}")


class NodeProcess:
    """``ciae-panoptic-node`` in its own process; output in ``log``."""

    def __init__(self, log: pathlib.Path, weights: str, params: dict | None = None, extra_args=(), ros_args=(),
                 params_file: str | None = None, console_script: bool = False, sigint_ignored: bool = False):
        self.log_path = pathlib.Path(log)
        self._log = open(self.log_path, "w")
        script = pathlib.Path(sys.executable).parent / "ciae-panoptic-node"
        exe = [str(script)] if console_script else [sys.executable, "-m", "ciae_ros.node"]
        cmd = [*exe, *extra_args, "--ros-args"]
        if params_file:
            cmd += ["--params-file", str(params_file)]
        cmd += ["-p", f"weights:={weights}"]
        for k, v in (params or {}).items():
            cmd += ["-p", f"{k}:={_param_text(v)}"]
        cmd += list(ros_args)
        self.cmd = cmd
        # sigint_ignored: start it as a non-interactive shell starts a background job (SIGINT ignored)
        pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=pre)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self, collector, timeout: float = 180.0):
        """Wait for the first message on ``collector`` (e.g. the latched categories) while alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            msg = collector.wait_for(lambda m: True, timeout=1.0)
            if msg is not None:
                return msg
        raise AssertionError(f"node not ready (exit status {self.proc.poll()}):\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _param_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_param_text(x) for x in v) + "]"
    return str(v)


class Publisher:
    """A camera publisher process driven by JSON commands (see :func:`_publisher_main`)."""

    def __init__(self, topic: str, reliability: str = "reliable", large_data_profile: bool = False,
                 compressed: bool = False, depth: int = 5):
        args = [sys.executable, str(THIS), "publisher", topic, reliability, str(int(compressed)), str(depth)]
        self.proc = subprocess.Popen(args, cwd=REPO, env=child_env(large_data_profile), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.topic = topic
        self.request({"op": "ping"}, timeout=60)

    def request(self, cmd: dict, timeout: float = 60.0) -> dict:
        if self.proc.poll() is not None:
            raise RuntimeError(f"publisher exited ({self.proc.returncode}): {self.proc.stderr.read()[-2000:]}")
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"publisher did not answer {cmd.get('op')} within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"publisher died: {self.proc.stderr.read()[-2000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"publisher: {reply['error']}")
        return reply

    def wait_subscribers(self, n: int = 1, timeout: float = 30.0, which: str = "image") -> int:
        """Subscribers of the image topic (or of ``which``: ``depth`` / ``info`` after :meth:`rgbd_advertise`)."""
        return self.request({"op": "wait_subs", "n": n, "timeout": timeout, "which": which},
                            timeout=timeout + 10)["count"]

    def rgbd_advertise(self, depth_topic: str, info_topic: str) -> dict:
        """Also publish depth (``sensor_msgs/Image``) and ``CameraInfo`` on these topics (op ``rgbd``)."""
        return self.request({"op": "rgbd_advertise", "depth_topic": depth_topic, "info_topic": info_topic})

    def rgbd(self, h: int, w: int, stamp: tuple[int, int], seed: int = 0, **opts) -> dict:
        """Publish depth, camera info and colour image of a rendered scene
        (:func:`rgbd_testing.rgbd_messages`; ``opts``: its bad inputs)."""
        return self.request({"op": "rgbd", "h": h, "w": w, "stamp": list(stamp), "seed": seed, **opts})

    def image(self, h: int, w: int, stamp: tuple[int, int], frame_id: str = "camera_optical_frame",
              encoding: str = "rgb8", **fields) -> dict:
        """Publish one image; ``fields`` override message fields (height, width, step, encoding,
        is_bigendian) or set ``data_len`` (bytes of data actually sent)."""
        return self.request({"op": "image", "h": h, "w": w, "stamp": list(stamp), "frame_id": frame_id,
                             "encoding": encoding, "fields": fields})

    def compressed(self, h: int, w: int, stamp: tuple[int, int], frame_id: str = "camera_optical_frame",
                   garbage: bool = False, crafted: str = "") -> dict:
        """Publish one JPEG of an ``h`` x ``w`` scene; ``garbage``: bytes that are no JPEG;
        ``crafted``: ``huge_png`` / ``huge_jpeg`` (see :func:`huge_png`, ``h``/``w`` ignored)."""
        return self.request({"op": "compressed", "h": h, "w": w, "stamp": list(stamp), "frame_id": frame_id,
                             "garbage": garbage, "crafted": crafted})

    def rgb_file(self, path, stamp: tuple[int, int], frame_id: str = "camera_optical_frame") -> dict:
        """Publish the ``(H, W, 3)`` uint8 array saved with ``numpy.save`` at ``path`` as one rgb8
        image (frames the test rendered itself, e.g. of a moving synthetic sequence)."""
        return self.request({"op": "rgb_file", "path": str(path), "stamp": list(stamp), "frame_id": frame_id})

    def flood(self, h: int, w: int, rate: float, seconds: float, first: int = 0) -> dict:
        """Publish at ``rate`` for ``seconds``; frame ids ``flood<first>``, ``flood<first + 1>``, ..."""
        return self.request({"op": "flood", "h": h, "w": w, "rate": rate, "seconds": seconds, "first": first},
                            timeout=seconds * 3 + 30)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                # a clean exit removes its DDS endpoints at once; a killed one lingers in discovery
                self.proc.wait(60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class Collector:
    """Thread-safe list of ``(receive_time, message)`` filled by a subscription callback."""

    def __init__(self):
        self.items: list = []
        self._cond = threading.Condition()

    def __call__(self, msg) -> None:
        with self._cond:
            self.items.append((time.time(), msg))
            self._cond.notify_all()

    def snapshot(self) -> list:
        with self._cond:
            return list(self.items)

    def __len__(self) -> int:
        with self._cond:
            return len(self.items)

    def wait_for(self, predicate, timeout: float = 30.0, since: int = 0):
        """First message (in arrival order, from index ``since``) for which ``predicate(msg)``
        holds; ``None`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, m in self.items[since:]:
                    if predicate(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))


class Client:
    """rclpy participant of the test process, with its own context and a spinning thread."""

    def __init__(self, name: str = "ciae_test_client"):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        self.context = Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except (ExternalShutdownException, Exception):  # noqa: BLE001 - ends with the context
            pass

    def subscribe(self, msg_type, topic: str, qos=10) -> Collector:
        col = Collector()
        self.node.create_subscription(msg_type, topic, col, qos)
        return col

    def call(self, srv_type, name: str, request, timeout: float = 30.0):
        cli = self.node.create_client(srv_type, name)
        try:
            if not cli.wait_for_service(timeout_sec=timeout):
                raise TimeoutError(f"service {name} not available")
            fut = cli.call_async(request)
            deadline = time.monotonic() + timeout
            while not fut.done():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"service {name} did not answer within {timeout} s")
                time.sleep(0.01)
            return fut.result()
        finally:
            self.node.destroy_client(cli)

    def set_parameters(self, node_name: str, **values):
        """Set parameters of another node through its parameter service; list of SetParametersResult."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        req = SetParameters.Request()
        req.parameters = [Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        return list(self.call(SetParameters, f"{node_name}/set_parameters", req).results)

    def get_parameters(self, node_name: str, *names):
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        req = GetParameters.Request(names=list(names))
        return [parameter_value_to_python(v) for v in self.call(GetParameters, f"{node_name}/get_parameters", req).values]

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        self.context.try_shutdown()
        self._thread.join(5)


def stamp_of(msg) -> tuple[int, int]:
    """``(sec, nanosec)`` of a message's header stamp."""
    return msg.header.stamp.sec, msg.header.stamp.nanosec


def diagnostics_values(diag_msg, suffix: str) -> dict | None:
    """``{key: value}`` of the status whose name ends with ``suffix`` (None if absent)."""
    for st in diag_msg.status:
        if st.name.endswith(suffix):
            return {kv.key: kv.value for kv in st.values}
    return None


# ----------------------------------------------------------------------------------------------
# crafted compressed images: a few bytes that claim (or really hold) a huge image
# ----------------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def huge_png(width: int = 20000, height: int = 20000, valid: bool = True) -> bytes:
    """A PNG of ``width`` x ``height`` in ~50 KB: 1-bit grey, all zero rows, deflated.

    ``valid=False``: the same header followed by a body that is not deflate data at all (only the
    header can tell its size). OpenCV decodes the valid one to a 1.2 GB BGR image.
    """
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale, no interlace
    if valid:
        z = zlib.compressobj(9)
        row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed bits
        body = b"".join([z.compress(row * 1000) for _ in range(height // 1000)]
                        + [z.compress(row * (height % 1000)), z.flush()])
    else:
        body = b"not a deflate stream " * 4
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def huge_jpeg(width: int = 20000, height: int = 20000) -> bytes:
    """A real 16x16 JPEG (631 bytes) whose frame header (SOF0) is patched to claim ``width`` x
    ``height``: libjpeg decodes it, warning about the missing data, to a full-size image."""
    import struct

    import cv2
    import numpy as np

    ok, enc = cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))
    data = bytearray(enc.tobytes())
    sof = data.index(b"\xff\xc0")  # FF C0, length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# ----------------------------------------------------------------------------------------------
# the publisher process
# ----------------------------------------------------------------------------------------------

def _scene(h: int, w: int, cache: dict):
    import numpy as np

    key = (h, w)
    if key not in cache:
        if h >= 32 and w >= 32:
            from ciae_core.synth import render_scene

            cache[key] = render_scene(h * 1000 + w, h, w)[0]
        else:
            cache[key] = np.random.default_rng(h * 1000 + w).integers(0, 256, (max(h, 1), max(w, 1), 3), np.uint8)
    return cache[key]


def _publisher_main(topic: str, reliability: str, compressed: bool, depth: int) -> int:
    import cv2
    import numpy as np
    import rclpy
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image

    out = sys.stdout
    cache: dict = {}
    extra: dict = {}  # "depth", "info": publishers of the rgbd ops
    with rclpy.init(args=["ciae_test_camera"]):
        node = rclpy.create_node("ciae_test_camera")
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                         reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable"
                         else ReliabilityPolicy.BEST_EFFORT)
        pub = node.create_publisher(CompressedImage if compressed else Image,
                                    topic + "/compressed" if compressed else topic, qos)

        def image_msg(cmd) -> Image:
            h, w = cmd["h"], cmd["w"]
            rgb = _scene(h, w, cache)
            enc = cmd.get("encoding", "rgb8")
            px = {"rgb8": rgb, "bgr8": rgb[:, :, ::-1], "mono8": rgb[:, :, 1]}.get(enc, rgb)
            data = np.ascontiguousarray(px).tobytes()
            f = dict(cmd.get("fields") or {})
            if "data_len" in f:
                n = int(f.pop("data_len"))
                data = (data * (n // max(len(data), 1) + 1))[:n]
            m = Image(height=h, width=w, encoding=enc, is_bigendian=0, step=w * (px.shape[2] if px.ndim == 3 else 1))
            for k, v in f.items():
                setattr(m, k, v)
            m.data = array.array("B", data)
            return m

        def stamp(m, cmd):
            m.header.stamp.sec, m.header.stamp.nanosec = int(cmd["stamp"][0]), int(cmd["stamp"][1])
            m.header.frame_id = cmd.get("frame_id", "camera_optical_frame")

        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            reply: dict = {"ok": True}
            try:
                if op == "quit":
                    break
                if op == "ping":
                    pass
                elif op == "wait_subs":
                    deadline = time.monotonic() + cmd["timeout"]
                    target = extra.get(cmd.get("which"), pub)
                    while target.get_subscription_count() < cmd["n"] and time.monotonic() < deadline:
                        rclpy.spin_once(node, timeout_sec=0.05)
                    reply["count"] = target.get_subscription_count()
                elif op == "rgbd_advertise":
                    extra["depth"] = node.create_publisher(Image, cmd["depth_topic"], qos)
                    extra["info"] = node.create_publisher(CameraInfo, cmd["info_topic"], qos)
                elif op == "rgbd":
                    from rgbd_testing import rgbd_messages

                    image, depth_msg, info = rgbd_messages(cmd, cache)
                    for key, m in (("depth", depth_msg), ("info", info)):
                        if m is not None:
                            extra[key].publish(m)
                    pub.publish(image)
                elif op == "image":
                    m = image_msg(cmd)
                    stamp(m, cmd)
                    pub.publish(m)
                elif op == "rgb_file":
                    rgb = np.ascontiguousarray(np.load(cmd["path"]), dtype=np.uint8)
                    m = Image(height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", is_bigendian=0,
                              step=rgb.shape[1] * 3, data=array.array("B", rgb.tobytes()))
                    stamp(m, cmd)
                    pub.publish(m)
                elif op == "compressed":
                    fmt = "jpeg"
                    if cmd.get("crafted"):
                        data = {"huge_png": huge_png, "huge_jpeg": huge_jpeg}[cmd["crafted"]]()
                        fmt = cmd["crafted"][5:]
                    elif cmd.get("garbage"):
                        data = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8
                    else:
                        ok, jpg = cv2.imencode(".jpg", _scene(cmd["h"], cmd["w"], cache)[:, :, ::-1])
                        data = jpg.tobytes()
                    m = CompressedImage(format=fmt, data=array.array("B", data))
                    stamp(m, cmd)
                    pub.publish(m)
                elif op == "flood":
                    base = image_msg({"h": cmd["h"], "w": cmd["w"]})
                    period = 1.0 / cmd["rate"]
                    t0 = time.monotonic()
                    n = 0
                    stamps = []
                    while time.monotonic() - t0 < cmd["seconds"]:
                        now = node.get_clock().now().to_msg()
                        base.header.stamp = now
                        base.header.frame_id = f"flood{cmd.get('first', 0) + n}"
                        pub.publish(base)
                        stamps.append([now.sec, now.nanosec])
                        n += 1
                        delay = t0 + n * period - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    reply.update(published=n, seconds=time.monotonic() - t0, stamps=stamps)
                else:
                    reply = {"error": f"unknown op {op}"}
            except Exception as exc:  # noqa: BLE001 - report to the test
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
        node.destroy_node()
    return 0


# ----------------------------------------------------------------------------------------------
# the launch process (see LaunchProcess)
# ----------------------------------------------------------------------------------------------

def _launch_main(launch_file: str, arguments: list[str]) -> int:
    """What ``ros2 launch`` does with a Python launch file and ``name:=value`` arguments."""
    import launch
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    pairs = [tuple(a.split(":=", 1)) for a in arguments]
    service = launch.LaunchService(argv=arguments)
    service.include_launch_description(launch.LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(launch_file), launch_arguments=pairs)]))
    return service.run()


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "publisher":
        sys.exit(_publisher_main(sys.argv[2], sys.argv[3], bool(int(sys.argv[4])), int(sys.argv[5])))
    if len(sys.argv) >= 3 and sys.argv[1] == "launch":
        sys.exit(_launch_main(sys.argv[2], sys.argv[3:]))
    sys.exit(f"usage: {sys.argv[0]} publisher TOPIC RELIABILITY COMPRESSED DEPTH | launch FILE [NAME:=VALUE ...]")
