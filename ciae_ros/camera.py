"""A camera publisher for demos and tests: ``python -m ciae_ros.camera``.

Sources:

* ``synth`` (default): a moving synthetic scene from :class:`ciae_core.synth.SceneSequence`.
  Rendering costs ~0.1 s per 640x480 frame on one CPU core, so ``--clip N`` frames are rendered
  first and then played in a loop at ``--rate``.
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
import logging
import pathlib
import sys
import time

import cv2
import numpy as np

_LOG = logging.getLogger("ciae_camera")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class CameraSourceError(ValueError):
    """The camera source cannot be opened or holds no frames."""


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 640x480, got {text!r}") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32, got {text!r}")
    return h, w


def load_frames(source: str, size: tuple[int, int] | None, clip: int, seed: int = 0) -> list[np.ndarray]:
    """Frames ``(H, W, 3)`` uint8 RGB of ``source`` (``size`` = (H, W) resizes; synth default 480x640)."""
    if source == "synth":
        from ciae_core.synth import SceneSequence

        h, w = size or (480, 640)
        seq = SceneSequence(seed, h, w, num_instances=10, speed=4.0)
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
        raise CameraSourceError(f"camera source {source!r} is neither 'synth', a folder nor a video file; give one "
                                f"of those")
    if not frames:
        kind = (f"no image OpenCV can read ({', '.join(IMAGE_SUFFIXES)})" if path.is_dir()
                else "no frame OpenCV can decode (not a video, or a codec this OpenCV build lacks)")
        raise CameraSourceError(f"camera source {source!r} holds {kind}; give 'synth', a folder of images or another "
                                f"video file")
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
        raise ValueError(f"camera encoding must be rgb8, bgr8 or mono8, got {encoding!r}")
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
    ap.add_argument("--encoding", default="rgb8", choices=("rgb8", "bgr8", "mono8"))
    ap.add_argument("--compressed", action="store_true", help="publish JPEG CompressedImage on <topic>/compressed")
    ap.add_argument("--reliability", default="reliable", choices=("reliable", "best_effort"))
    ap.add_argument("--frame-id", default="camera_optical_frame")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: run forever)")
    ap.add_argument("--frames", type=int, default=0, help="stop after publishing this many frames (0: no limit)")
    ap.add_argument("--large-data-profile", action="store_true",
                    help="load config/fastdds_large_data.xml (unless FASTDDS_DEFAULT_PROFILES_FILE is set)")
    return ap


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
    with rclpy.init(args=["ciae_camera"]):
        node = rclpy.create_node("ciae_camera")
        qos = input_qos(reliability_policy(args.reliability), depth=1)
        if args.compressed:
            pub = node.create_publisher(CompressedImage, args.topic + "/compressed", qos)
        else:
            pub = node.create_publisher(Image, args.topic, qos)
        _LOG.info("publishing %d frame(s) of %s on %s at %.1f Hz (%s)", len(frames), args.source, pub.topic_name,
                  args.rate, args.reliability)
        period = 1.0 / args.rate
        t_start = time.monotonic()
        n = 0
        try:
            while rclpy.ok():
                data, step, shape = payloads[n % len(payloads)]
                stamp = node.get_clock().now().to_msg()
                if args.compressed:
                    msg = CompressedImage(format="jpeg", data=data)
                else:
                    msg = Image(height=shape[0], width=shape[1], encoding=args.encoding, is_bigendian=0, step=step,
                                data=data)
                msg.header.stamp = stamp
                msg.header.frame_id = args.frame_id
                pub.publish(msg)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
