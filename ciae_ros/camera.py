"""A camera publisher for demos and tests: ``python -m ciae_ros.camera``.

Sources:

* ``synth`` (default): a moving synthetic scene from :class:`ciae_core.synth.SceneSequence`.
  Rendering costs ~0.1 s per 640x480 frame on one CPU core, so ``--clip N`` frames are rendered
  first and then played forwards and backwards at ``--rate`` (``--loop pingpong``, the default
  for synth: the motion reverses instead of every thing jumping back to its start, which would
  look like new things to a tracker). Like an RGB-D camera it also publishes the scene's metric
  depth registered to the colour image (:func:`ciae_core.synth_depth.render_depth` through
  ``simulate_sensor``: registration error, flying pixels, noise) on ``--depth-topic`` (``16UC1``
  millimetres or ``32FC1`` metres, ``--depth-encoding``) and its ``CameraInfo`` (``K`` of the
  rendering, no distortion) on ``--camera-info-topic``, both with the colour image's stamp and
  ``frame_id``, published just before it (``--no-depth``: colour only). ``--truth FILE`` writes
  one JSON line per published frame (stamp and frame index, after a first line with the scene's
  seed, size and clip), from which the demo's reports re-render the ground truth.
* a folder of images (``*.png``, ``*.jpg``, sorted by name), played in a loop;
* a video file (anything OpenCV can read), played in a loop.

Publishes ``sensor_msgs/Image`` (``--encoding``) on ``--topic`` with ``header.stamp`` = time of
publication and ``header.frame_id`` = ``--frame-id``, with the QoS a camera driver would offer
(``--reliability``, depth 1); ``--compressed`` publishes ``sensor_msgs/CompressedImage`` (JPEG)
on ``<topic>/compressed`` instead. ``--large-data-profile`` loads our Fast DDS profile (needed for
best-effort publishing of large frames between processes); by default the process keeps Fast DDS
defaults, like most camera drivers.
"""

from __future__ import annotations

import argparse
import array
import json
import logging
import pathlib
import sys
import time

import cv2
import numpy as np

from ciae_core.user_input import quote

_LOG = logging.getLogger("ciae_camera")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class CameraSourceError(ValueError):
    """The camera source cannot be opened or holds no frames."""


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 640x480, got {quote(text)}") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32, got {quote(text)}")
    return h, w


def synth_sequence(seed: int, height: int, width: int):
    """The moving scene of the ``synth`` source (the demo's report re-renders its frames)."""
    from ciae_core.synth import SceneSequence

    return SceneSequence(seed, height, width, num_instances=10, speed=4.0)


def play_index(n: int, count: int, loop: str) -> int:
    """Frame of the clip shown as the ``n``-th published frame: ``repeat`` 0, 1, .., N-1, 0, 1, ..;
    ``pingpong`` 0, 1, .., N-1, N-2, .., 1, 0, 1, .. (consecutive frames are always neighbours)."""
    if loop == "pingpong" and count > 1:
        k = n % (2 * count - 2)
        return k if k < count else 2 * count - 2 - k
    return n % count
def synth_depth(seed: int, height: int, width: int, clip: int) -> tuple[list[np.ndarray], np.ndarray]:
    """What an RGB-D camera measures of the ``synth`` frames 0..clip-1: ``(depths, K)``, each depth
    ``(H, W)`` float32 metres (NaN: no return) through ``simulate_sensor`` seeded by the frame index."""
    from ciae_core.synth_depth import render_depth, simulate_sensor

    seq = synth_sequence(seed, height, width)
    depths, k = [], None
    for t in range(clip):
        _, pan, info = seq.frame(t)
        r = render_depth(pan, info, truth=False)
        depths.append(simulate_sensor(r.depth, seed=t))
        k = r.K
    return depths, k


def load_frames(source: str, size: tuple[int, int] | None, clip: int, seed: int = 0) -> list[np.ndarray]:
    """Frames ``(H, W, 3)`` uint8 RGB of ``source`` (``size`` = (H, W) resizes; synth default 480x640)."""
    if source == "synth":
        h, w = size or (480, 640)
        seq = synth_sequence(seed, h, w)
        t0 = time.monotonic()
        frames = [seq.frame(t)[0] for t in range(clip)]
        _LOG.info("rendered %d synthetic %dx%d frames in %.1f s", clip, w, h, time.monotonic() - t0)
        return frames
    path = pathlib.Path(source).expanduser()
    frames = []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for p in files[:clip] if clip > 0 else files:
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if bgr is None:
                _LOG.warning("skipping unreadable image %s", p)
                continue
            frames.append(bgr[:, :, ::-1])
    elif path.is_file():
        cap = cv2.VideoCapture(str(path))
        while cap.isOpened() and (clip <= 0 or len(frames) < clip):
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(bgr[:, :, ::-1])
        cap.release()
    else:
        raise CameraSourceError(f"camera source {quote(source)} is neither 'synth', a folder nor a video file; give "
                                f"one of those")
    if not frames:
        kind = (f"no image OpenCV can read ({', '.join(IMAGE_SUFFIXES)})" if path.is_dir()
                else "no frame OpenCV can decode (not a video, or a codec this OpenCV build lacks)")
        raise CameraSourceError(f"camera source {quote(source)} holds {kind}; give 'synth', a folder of images or "
                                f"another video file")
    if size is not None:
        frames = [cv2.resize(np.ascontiguousarray(f), (size[1], size[0]), interpolation=cv2.INTER_AREA)
                  for f in frames]
    return [np.ascontiguousarray(f) for f in frames]


def encode_frame(rgb: np.ndarray, encoding: str) -> tuple[bytes, int]:
    """Pixel bytes and step of ``rgb`` in ``encoding`` (rgb8, bgr8, mono8)."""
    if encoding == "rgb8":
        a = rgb
    elif encoding == "bgr8":
        a = rgb[:, :, ::-1]
    elif encoding == "mono8":
        a = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    else:
        raise ValueError(f"camera encoding must be rgb8, bgr8 or mono8, got {quote(encoding)}")
    a = np.ascontiguousarray(a)
    return a.tobytes(), a.shape[1] * (a.shape[2] if a.ndim == 3 else 1)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ciae_ros.camera", description=__doc__.splitlines()[0])
    ap.add_argument("source", nargs="?", default="synth", help="'synth', a folder of images or a video file")
    ap.add_argument("--topic", default="/camera/image_raw")
    ap.add_argument("--rate", type=float, default=10.0, help="frames per second")
    ap.add_argument("--size", type=_parse_size, default=None, help="WIDTHxHEIGHT (synth default 640x480)")
    ap.add_argument("--clip", type=int, default=30, help="frames rendered/read before playing in a loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loop", choices=("auto", "repeat", "pingpong"), default="auto",
                    help="play the frames in a loop (repeat) or forwards and backwards (pingpong); auto: pingpong "
                         "for synth, repeat otherwise")
    ap.add_argument("--encoding", default="rgb8", choices=("rgb8", "bgr8", "mono8"))
    ap.add_argument("--compressed", action="store_true", help="publish JPEG CompressedImage on <topic>/compressed")
    ap.add_argument("--reliability", default="reliable", choices=("reliable", "best_effort"))
    ap.add_argument("--frame-id", default="camera_optical_frame")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: run forever)")
    ap.add_argument("--frames", type=int, default=0, help="stop after publishing this many frames (0: no limit)")
    ap.add_argument("--large-data-profile", action="store_true",
                    help="load config/fastdds_large_data.xml (unless FASTDDS_DEFAULT_PROFILES_FILE is set)")
    ap.add_argument("--depth-topic", default="", help="synth: depth image topic (default: <topic's parent>/depth/"
                    "image_raw, e.g. /camera/depth/image_raw)")
    ap.add_argument("--camera-info-topic", default="", help="synth: CameraInfo topic (default: <topic's parent>/"
                    "camera_info, the sibling the node looks for)")
    ap.add_argument("--depth-encoding", default="16UC1", choices=("16UC1", "32FC1"),
                    help="synth: 16UC1 (millimetres, 0 = no return; default) or 32FC1 (metres, NaN = no return)")
    ap.add_argument("--no-depth", action="store_true", help="synth: publish the colour image only")
    ap.add_argument("--truth", default="", metavar="FILE",
                    help="synth: write the stamp and frame index of every published frame to FILE (JSON lines)")
    return ap


def _sibling(topic: str, name: str) -> str:
    """``/camera/image_raw`` + ``camera_info`` -> ``/camera/camera_info``."""
    parent = topic.rstrip("/").rsplit("/", 1)[0] if "/" in topic.strip("/") else ""
    return f"{parent}/{name}" if parent or topic.startswith("/") else name


def _depth_payloads(args, size: tuple[int, int]) -> tuple[list, np.ndarray] | tuple[None, None]:
    """``([(data, step)], K)`` of the synth source's depth images, or ``(None, None)`` (no depth)."""
    if args.source != "synth" or args.no_depth:
        return None, None
    from ciae_core.depth import metres_to_uint16
    from ciae_core.synth_depth import SynthDepthError

    t0 = time.monotonic()
    try:
        depths, k = synth_depth(args.seed, size[0], size[1], args.clip)
    except SynthDepthError as exc:
        _LOG.warning("publishing no depth: %s", exc)
        return None, None
    payloads = []
    for d in depths:
        a = np.ascontiguousarray(metres_to_uint16(d) if args.depth_encoding == "16UC1" else d.astype("<f4"))
        payloads.append((array.array("B", a.tobytes()), a.shape[1] * a.itemsize))
    _LOG.info("rendered the depth of %d frames in %.1f s", len(depths), time.monotonic() - t0)
    return payloads, k


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] [%(name)s]: %(message)s")
    args = build_parser().parse_args(argv)
    if args.rate <= 0:
        _LOG.error("--rate must be positive, got %s", args.rate)
        return 2
    try:
        frames = load_frames(args.source, args.size, args.clip, args.seed)
    except CameraSourceError as exc:
        _LOG.error("%s", exc)
        return 1
    if args.large_data_profile:
        from .resources import use_large_data_dds_profile

        use_large_data_dds_profile()

    import rclpy
    from rclpy.executors import ExternalShutdownException
    from sensor_msgs.msg import CompressedImage, Image

    from .qos import input_qos, reliability_policy

    payloads = []  # message-ready byte arrays, built once
    for f in frames:
        if args.compressed:
            ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(f[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
            payloads.append((array.array("B", jpg.tobytes()), 0, f.shape))
        else:
            data, step = encode_frame(f, args.encoding)
            payloads.append((array.array("B", data), step, f.shape))
    loop = args.loop if args.loop != "auto" else ("pingpong" if args.source == "synth" else "repeat")
    depth_payloads, k = _depth_payloads(args, frames[0].shape[:2])
    try:
        truth = open(args.truth, "w") if args.truth else None  # noqa: SIM115 - open for the whole run
    except OSError as exc:
        _LOG.error("cannot write --truth %s: %s", args.truth, exc.strerror)
        return 1
    if truth is not None:
        truth.write(json.dumps({"source": args.source, "seed": args.seed, "width": frames[0].shape[1],
                                "height": frames[0].shape[0], "clip": len(frames), "frame_id": args.frame_id,
                                "loop": loop,
                                "depth_encoding": None if depth_payloads is None else args.depth_encoding}) + "\n")
    with rclpy.init(args=["ciae_camera"]):
        node = rclpy.create_node("ciae_camera")
        qos = input_qos(reliability_policy(args.reliability), depth=1)
        if args.compressed:
            pub = node.create_publisher(CompressedImage, args.topic + "/compressed", qos)
        else:
            pub = node.create_publisher(Image, args.topic, qos)
        if depth_payloads is not None:
            from sensor_msgs.msg import CameraInfo

            from .depth_input import camera_info_msg

            # history 5, not 1: a reliable depth sample that lost a fragment on the way can still be
            # re-sent after the next one was written (with 1, a quarter of the demo's frames had no depth)
            dq = input_qos(reliability_policy(args.reliability), depth=5)
            depth_pub = node.create_publisher(Image, args.depth_topic or _sibling(args.topic, "depth/image_raw"), dq)
            info_pub = node.create_publisher(CameraInfo, args.camera_info_topic or _sibling(args.topic, "camera_info"),
                                             dq)
            _LOG.info("publishing depth (%s) on %s and camera info on %s", args.depth_encoding, depth_pub.topic_name,
                      info_pub.topic_name)
        _LOG.info("publishing %d frame(s) of %s on %s at %.1f Hz (%s, %s)", len(frames), args.source,
                  pub.topic_name, args.rate, args.reliability, loop)
        period = 1.0 / args.rate
        t_start = time.monotonic()
        n = 0
        try:
            while rclpy.ok():
                index = play_index(n, len(payloads), loop)
                data, step, shape = payloads[index]
                stamp = node.get_clock().now().to_msg()
                if args.compressed:
                    msg = CompressedImage(format="jpeg", data=data)
                else:
                    msg = Image(height=shape[0], width=shape[1], encoding=args.encoding, is_bigendian=0, step=step,
                                data=data)
                msg.header.stamp = stamp
                msg.header.frame_id = args.frame_id
                if depth_payloads is not None:  # registered to the colour image: same stamp and frame
                    ddata, dstep = depth_payloads[index]
                    depth_pub.publish(Image(header=msg.header, height=shape[0], width=shape[1], is_bigendian=0,
                                            encoding=args.depth_encoding, step=dstep, data=ddata))
                    info_pub.publish(camera_info_msg(k, shape[0], shape[1], msg.header, CameraInfo))
                pub.publish(msg)
                if truth is not None:
                    truth.write(json.dumps({"stamp": [stamp.sec, stamp.nanosec], "frame": index}) + "\n")
                    truth.flush()
                n += 1
                if (args.frames and n >= args.frames) or (args.duration and time.monotonic() - t_start >= args.duration):
                    break
                next_t = t_start + n * period
                rclpy.spin_once(node, timeout_sec=max(0.0, next_t - time.monotonic()))
                while time.monotonic() < next_t:  # spin_once returns early when there is work
                    time.sleep(min(0.002, max(0.0, next_t - time.monotonic())))
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        _LOG.info("published %d frame(s)", n)
        node.destroy_node()
    if truth is not None:
        truth.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
