"""Where ciae_ros finds its data files (config/, models/, msg/) and how processes join DDS.

The shipped model's lookup lives in :mod:`ciae_core.shipped_model` (the ROS-free tools need it too).

Two layouts are supported:

* the source tree (``pip install -e .`` or running from the repository): ``<repo>/config``,
  ``<repo>/models``, ``<repo>/msg`` next to the ``ciae_ros`` package directory;
* an ament install (``colcon build`` or the CMake route): ``share/ciae_ros/{config,models,msg}``
  found through ``ament_index_python`` (needs ``AMENT_PREFIX_PATH``), or under the running
  interpreter's prefix (``<venv>/share/ciae_ros`` after ``make setup``).

The source tree wins when both exist, so edits in a checkout take effect without reinstalling.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys

_LOG = logging.getLogger(__name__)

PACKAGE = "ciae_ros"
SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[1]
DDS_PROFILE_NAME = "fastdds_large_data.xml"


def share_dirs() -> list[pathlib.Path]:
    """Candidate data roots, most specific first."""
    roots = []
    if (SOURCE_ROOT / "config").is_dir() or (SOURCE_ROOT / "msg").is_dir():
        roots.append(SOURCE_ROOT)
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:  # no ament index (a plain pip install): the source tree and sys.prefix only
        get_package_share_directory = None
    if get_package_share_directory is not None:
        with contextlib.suppress(PackageNotFoundError, KeyError, ValueError, LookupError, OSError):
            roots.append(pathlib.Path(get_package_share_directory(PACKAGE)))
    # an install into this interpreter's prefix (the CMake route into a venv) without AMENT_PREFIX_PATH
    prefix_share = pathlib.Path(sys.prefix) / "share" / PACKAGE
    if prefix_share.is_dir() and prefix_share not in roots:
        roots.append(prefix_share)
    return roots


def find_data_file(relative: str) -> pathlib.Path | None:
    """First existing ``<root>/<relative>`` among :func:`share_dirs`, else ``None``."""
    for root in share_dirs():
        p = root / relative
        if p.exists():
            return p
    return None


def default_weights() -> pathlib.Path | None:
    """The shipped model (:func:`ciae_core.shipped_model.default_weights`: the same lookup as
    ``ciae-predict``, which cannot import this package)."""
    from ciae_core.shipped_model import default_weights as shipped

    return shipped()


def use_large_data_dds_profile(env: dict | None = None) -> str | None:
    """Point Fast DDS at ``config/fastdds_large_data.xml`` unless the user chose a profile.

    Must run before the process's first ``rclpy.init`` (Fast DDS reads the variable when the
    participant is created). Only done when the RMW is Fast DDS (the ROS default) and neither
    ``FASTDDS_DEFAULT_PROFILES_FILE`` nor the older ``FASTRTPS_DEFAULT_PROFILES_FILE`` is set.
    ``env`` defaults to ``os.environ`` (pass a copy to prepare a child process's environment).
    With our profile, ``RMW_FASTRTPS_USE_QOS_FROM_XML=1`` is set too (unless set already): the
    profile's history memory policy applies only then. Returns the profile path in effect
    (``None`` when none is set).
    """
    env = os.environ if env is None else env
    user = env.get("FASTDDS_DEFAULT_PROFILES_FILE") or env.get("FASTRTPS_DEFAULT_PROFILES_FILE")
    if user:
        return user
    rmw = env.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    if not rmw.startswith("rmw_fastrtps"):
        return None
    path = find_data_file(f"config/{DDS_PROFILE_NAME}")
    if path is None:
        _LOG.warning("DDS profile %s not found; large best-effort samples may be lost between processes",
                     DDS_PROFILE_NAME)
        return None
    env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(path)
    # the profile's endpoint memory policy (buffers freed, not kept at the largest sample's size)
    # reaches rmw_fastrtps only with this variable; ROS QoS set in code still apply
    env.setdefault("RMW_FASTRTPS_USE_QOS_FROM_XML", "1")
    return str(path)
