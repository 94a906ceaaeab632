"""Decisions of ``launch/panoptic.launch.py`` as plain functions (no ``launch`` import).

``launch``/``launch_ros`` exist only on a ROS install, so the launch file keeps to wiring and calls
these functions, which are unit-tested everywhere.

Decision: the launch arguments that name node parameters (:data:`PARAMETER_ARGUMENTS`) default to
the empty string, meaning "not given", and only the ones the user gave are passed to the node, on
top of ``params_file``. So a value in the params file wins unless the same setting is given on the
command line. (Passing them always, with the node's defaults as launch defaults, silently replaced
the params file's ``weights``/``engine``/``device``/``input_transport``.) The price: an empty value
cannot be forced from the command line (``weights:=""`` does not switch a params file's weights
back to the shipped model; edit the params file for that).

Values are passed as Python strings, which launch_ros hands to the node as string parameters
(a raw ``LaunchConfiguration`` would be YAML-parsed: an empty one is rejected, ``123`` becomes an
integer).
"""

from __future__ import annotations

from collections.abc import Mapping

#: Launch arguments that set the node parameter of the same name when given (non-empty).
PARAMETER_ARGUMENTS: tuple[str, ...] = ("weights", "engine", "device", "input_transport")

#: The launch file's default for ``image_topic``: relative, like the node's own default remap, so
#: ``namespace:=front`` subscribes to ``/front/camera/image_raw`` in both.
DEFAULT_IMAGE_TOPIC = "camera/image_raw"


def parameter_overrides(arguments: Mapping[str, object]) -> dict[str, str]:
    """Node parameters to pass after ``params_file``: the :data:`PARAMETER_ARGUMENTS` whose value
    is non-empty (surrounding whitespace ignored). Other keys of ``arguments`` are ignored."""
    out = {}
    for name in PARAMETER_ARGUMENTS:
        value = str(arguments.get(name, "") or "").strip()
        if value:
            out[name] = value
    return out
