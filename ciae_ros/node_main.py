"""The process around the panoptic node (``ciae-panoptic-node``): command line, logging, signals,
rclpy start-up, the spin loop and shutdown.

Decisions: SIGINT and SIGTERM are handled before anything slow is imported, and a stop is a
requested shutdown at any moment: while rclpy or torch load or the model loads it ends in one log
line and exit status 0 (the ROS 2 convention: ``ros2 launch`` reports such a node as finished
cleanly), while running the worker is stopped before the context goes away. Start-up errors are
one ``cannot start:`` line and exit status 1.
"""

from __future__ import annotations

import logging
import signal
import sys

from .node_params import NodeStartupError
from .node_startup import params_file_problem, parse_args, ros_args_problem

_parse_args = parse_args  # the name tests and users imported from the node


_INTERRUPTED_WHILE_STARTING = "interrupted while starting (before the node was running); exiting"


def _configure_logging(node_name: str) -> None:
    """Python logging of the node process: the node's own loggers at INFO, everything else at
    WARNING. torch's INFO lines (e.g. its FakeTensor cache statistics at exit) are not the node's
    news, and neither are ciae_core's: the node states the engine, precision, device and why in its
    own "model ... loaded" line, and a start-up that fails must print only its one "cannot start"
    line (ciae_core's INFO lines about the CPU's features or a first ONNX export came before it)."""
    logging.basicConfig(level=logging.WARNING, format="[%(levelname)s] [%(name)s]: %(message)s")
    for name in (node_name, "ciae_ros"):
        logging.getLogger(name).setLevel(logging.INFO)


def run(argv: list[str] | None, make_node_classes, node_name: str, default_image_topic: str) -> int:
    """Run the node until Ctrl-C / SIGTERM; returns the exit status (1 on a startup error).

    ``make_node_classes()`` returns ``(PanopticNode, PanopticLifecycleNode)``; ``node_name`` names
    the logger, ``default_image_topic`` is the remap target of ``image`` unless the user remaps it.
    Ctrl-C or SIGTERM is a requested shutdown at any moment, also while the node is still starting
    (importing rclpy or torch, loading the model): one log line, exit status 0, as ROS 2 nodes
    do (``ros2 launch`` then reports the node as finished cleanly, not as died).
    """
    _configure_logging(node_name)
    log = logging.getLogger(node_name)

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    # We handle SIGINT/SIGTERM ourselves, before anything slow is imported: a stop requested while
    # rclpy or torch load ends in one line, not a traceback. And so that the worker thread is
    # stopped before the context goes away (rclpy's handler would invalidate publishers under the
    # worker's feet). SIGINT is set explicitly too: a process started in the background by a
    # non-interactive shell (`node &` in a script) inherits SIGINT as ignored, Python then installs
    # no KeyboardInterrupt handler, and the node would not stop on Ctrl-C or on ros2 launch's first
    # shutdown signal.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    phase = ["starting"]
    try:
        return _run(argv, log, phase, make_node_classes, default_image_topic)
    except KeyboardInterrupt:
        if phase[0] == "starting":
            log.info(_INTERRUPTED_WHILE_STARTING)
        else:
            log.info("interrupted again while shutting down; exiting")
        return 0


def _run(argv: list[str] | None, log: logging.Logger, phase: list[str], make_node_classes,
         default_image_topic: str) -> int:
    """:func:`run` after the signal handlers: parse, start, spin, shut down. ``phase[0]`` says
    where a KeyboardInterrupt reaching :func:`run` came from (``starting`` | ``stopping``)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.impl.implementation_singleton import rclpy_implementation
    from rclpy.signals import SignalHandlerOptions
    from rclpy.utilities import remove_ros_args

    from .resources import use_large_data_dds_profile

    args = list(sys.argv[1:] if argv is None else argv)
    problem = params_file_problem(args)
    if problem:
        log.error("cannot start: %s", problem)
        return 1
    try:
        opts = parse_args(remove_ros_args(["ciae-panoptic-node", *args])[1:])
    except rclpy_implementation.RCLInvalidROSArgsError as exc:  # a malformed rule or params file
        status, text = ros_args_problem(exc)
        if status == 2:
            print(text, file=sys.stderr)
        else:
            log.error("cannot start: %s", text)
        return status
    use_large_data_dds_profile()
    # Default remap, used only when the user has no rule for 'image' (the first matching rule wins).
    ros_args = [*args, "--ros-args", "-r", f"image:={default_image_topic}"]
    PanopticNode, PanopticLifecycleNode = make_node_classes()
    try:
        import ciae_ros.msg  # noqa: F401 - generated by rosidl, not by pip
    except ImportError:
        log.error("cannot start: the ciae_ros messages are not built (no module ciae_ros.msg); run `make setup` "
                  "(or `colcon build` and source install/setup.bash on a ROS 2 install)")
        return 1
    try:
        ros = rclpy.init(args=["ciae-panoptic-node", *ros_args], signal_handler_options=SignalHandlerOptions.NO)
    except RuntimeError as exc:  # rcl cannot start (e.g. ROS_DOMAIN_ID out of range)
        log.error("cannot start: %s", ros_args_problem(exc)[1].split(": error: ")[-1])
        return 1
    with ros:
        try:
            node = PanopticLifecycleNode(autostart=opts.autostart) if opts.lifecycle else PanopticNode()
        except NodeStartupError as exc:
            log.error("cannot start: %s", exc)
            return 1
        except Exception as exc:  # noqa: BLE001 - e.g. a parameter file value outside its range
            text = (str(exc).strip().splitlines() or [""])[0]
            log.error("cannot start: %s: %s", type(exc).__name__, text)
            return 1
        try:
            if opts.lifecycle and opts.autostart:
                if node.trigger_configure() != _success():
                    log.error("cannot start: %s", node.configure_error or "lifecycle configure failed")
                    return 1
                if node.trigger_activate() != _success():
                    log.error("cannot start: lifecycle activate failed")
                    return 1
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            phase[0] = "running"
            while True:  # wakes up regularly so that Python's SIGINT/SIGTERM handlers can run
                executor.spin_once(timeout_sec=0.25)
        except (KeyboardInterrupt, ExternalShutdownException):
            if phase[0] == "starting":  # during the lifecycle autostart (model loading)
                log.info(_INTERRUPTED_WHILE_STARTING)
        finally:
            phase[0] = "stopping"
            node.destroy_node()
    return 0


def _success():
    from rclpy.lifecycle import TransitionCallbackReturn

    return TransitionCallbackReturn.SUCCESS
