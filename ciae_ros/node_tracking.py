"""The node's tracking: one :class:`~ciae_core.tracking.SegmentTracker` per camera, when its tracks
are reset, and what /diagnostics says about it. Used by the node and by ``ciae-bag``.

:class:`NodeTracking` gives the thing segments of each camera's results a ``track_id`` (0 = none:
stuff, a thing whose track is not confirmed yet, or tracking off) that stays with the thing across
frames; ``segments_msg`` copies it into ``Segment.track_id`` and the overlay labels and colours
things by it. The id image keeps its per-frame ids 1..N.

Rules (decisions, issue 14):

* **One tracker per camera** (key: the camera's index in the node, its topic in ``ciae-bag``),
  created on the camera's first frame and kept for the life of the node (lifecycle cycles
  included), so a track id is **never given twice** by one camera in one run of the node: a
  reset forgets the tracks, the ids keep counting. Two cameras number their tracks separately.
* **Reset** (tracks forgotten, counted per reason in /diagnostics ``tracking_resets_<reason>``,
  one throttled warning): ``frame_id`` - the camera's ``header.frame_id`` changed (another camera
  or a re-mounted one behind the same topic); ``time_backwards`` - a stamp older than the
  camera's previous one (a bag replayed or looped, ``use_sim_time`` restarted); ``model`` - the
  model was reloaded (other categories and embeddings); ``parameters`` - ``tracking_association``
  or ``tracking_mask_iou`` changed (the tracks hold state of the old kind). An equal stamp is a
  frame with no elapsed time; a jump forwards only ages tracks out (``tracking_max_age``).
* **A frame the tracker refuses** (e.g. embeddings that do not fit its segments; the tracker
  checks before it changes anything) is published without track ids rather than lost, the tracks
  kept, and counted (``tracking_errors``, one throttled warning).
* **Run-time parameter changes**: thresholds (``tracking_high_score``, ``tracking_max_age``, ...)
  retune the live trackers from the next frame, tracks kept; the two structural ones above reset
  them; ``tracking: false`` forgets all tracks and publishes ``track_id`` 0 until switched on
  again (then tracks start afresh, with new ids).
* **Embeddings** are asked of the Predictor only while tracking is on with
  ``tracking_association: embedding`` (:attr:`NodeTracking.wants_embeddings`); a frame computed
  without them just before that switch is left untracked instead of failing.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from ciae_core.structures import PanopticResult
from ciae_core.tracking import SegmentTracker

from .node_params import tracker_kwargs

RESET_REASONS = ("frame_id", "time_backwards", "model", "parameters")
#: SegmentTracker settings whose change makes the live tracks invalid (they hold state of the old kind)
_STRUCTURAL = ("association", "mask_iou")


@dataclass
class CameraTracking:
    """One camera's tracker and what happened to it."""

    tracker: SegmentTracker
    frame_id: str | None = None
    last_stamp: float | None = None
    frames: int = 0  # frames tracked
    max_track_id: int = 0  # the highest track id given so far (ids are 1, 2, ... in order)
    errors: int = 0  # frames the tracker refused
    resets: collections.Counter = field(default_factory=collections.Counter)


def header_seconds(header) -> float:
    """``header.stamp`` (``sec``, ``nanosec``; rclpy or rosbags message) in seconds."""
    return int(header.stamp.sec) + int(header.stamp.nanosec) * 1e-9


class NodeTracking:
    """Trackers of all cameras of a node (or of a ``ciae-bag`` run); thread-safe.

    Args:
        values: node parameter values (``tracking`` and the ``tracking_*`` parameters), already
            validated (:func:`ciae_ros.node_params.settings_error`).
        warn: ``warn(key, text)``: a throttled warning (the node's); ``None``: no warnings.
        times: a :class:`ciae_ros.node_diagnostics.StageTimes` to record the tracking time per
            frame in (stage ``tracking``), or ``None``.
    """

    def __init__(self, values: dict, warn=None, times=None):
        self._lock = threading.Lock()
        self._warn = warn
        self._times = times
        self._cameras: dict[object, CameraTracking] = {}
        self._enabled = bool(values["tracking"])
        self._settings = tracker_kwargs(values)
        SegmentTracker(**self._settings)  # ValueError now, not on the first frame

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def wants_embeddings(self) -> bool:
        """Whether the Predictor must return segment embeddings for the next frames."""
        return self._enabled and self._settings["association"] == "embedding"

    # -- configuration ------------------------------------------------------------------------
    def configure(self, values: dict) -> None:
        """Apply (validated) parameter values at run time (rules in the module docstring)."""
        settings = tracker_kwargs(values)
        probe = SegmentTracker(**settings)  # the constructor's checks and normalised values
        enabled = bool(values["tracking"])
        structural = any(settings[k] != self._settings[k] for k in _STRUCTURAL)
        with self._lock:
            for cam in self._cameras.values():
                for k in settings:
                    setattr(cam.tracker, k, getattr(probe, k))
                if not enabled:
                    self._forget(cam)
                elif structural:
                    self._reset(cam, "parameters")
            self._settings, self._enabled = settings, enabled

    def reset_all(self, reason: str) -> None:
        """Forget the tracks of every camera (e.g. ``"model"``: the model was reloaded)."""
        with self._lock:
            for cam in self._cameras.values():
                self._reset(cam, reason)

    @staticmethod
    def _forget(cam: CameraTracking) -> None:
        cam.tracker.reset()
        cam.frame_id = cam.last_stamp = None

    def _reset(self, cam: CameraTracking, reason: str) -> None:
        if len(cam.tracker) or cam.last_stamp is not None:
            cam.resets[reason] += 1
        self._forget(cam)

    # -- frames -------------------------------------------------------------------------------
    def update(self, key, result: PanopticResult, header) -> PanopticResult:
        """Track the thing segments of ``result`` (camera ``key``, image ``header``): sets their
        ``track_id`` in place (all 0 while tracking is off) and returns ``result``."""
        t0 = time.monotonic()
        for s in result.segments:
            s.track_id = 0
        if not self._enabled:
            return result
        stamp, frame_id = header_seconds(header), str(header.frame_id)
        with self._lock:
            cam = self._cameras.get(key)
            if cam is None:
                cam = self._cameras[key] = CameraTracking(SegmentTracker(**self._settings))
            tracker = cam.tracker
            if tracker.association == "embedding" and result.embeddings is None and \
                    any(s.isthing for s in result.segments):
                return result  # computed before the switch to embedding association: skip this frame
            if cam.frame_id is not None and frame_id != cam.frame_id:
                self._say(key, "frame_id", f"camera {key}: frame_id changed from {cam.frame_id!r} to {frame_id!r}: "
                                           "tracks reset")
                self._reset(cam, "frame_id")
            elif cam.last_stamp is not None and stamp < cam.last_stamp:
                self._say(key, "time_backwards", f"camera {key}: stamp {stamp:.3f} s is older than the previous "
                                                 f"{cam.last_stamp:.3f} s (bag replay, use_sim_time?): tracks reset")
                self._reset(cam, "time_backwards")
            try:
                tracker.update(result, stamp)
            except ValueError as exc:
                self._say(key, "error", f"camera {key}: frame published without track ids (tracking refused it): {exc}")
                cam.errors += 1
                for s in result.segments:
                    s.track_id = 0
                return result
            cam.frame_id, cam.last_stamp = frame_id, stamp
            cam.frames += 1
            cam.max_track_id = max([cam.max_track_id, *(s.track_id for s in result.segments)])
        if self._times is not None:
            self._times.add("tracking", (time.monotonic() - t0) * 1e3)
        return result

    def _say(self, key, reason: str, text: str) -> None:
        if self._warn is not None:
            self._warn(f"tracking:{reason}:{key}", text)

    # -- reporting ----------------------------------------------------------------------------
    def camera_values(self, key) -> list[tuple[str, str]]:
        """/diagnostics values of camera ``key``: ``tracking`` (on/off), ``tracks_confirmed`` and
        ``tracks_lost`` (live tracks now), ``track_ids_issued`` (the highest id so far, i.e. the
        tracks confirmed in this run), ``tracking_resets_<reason>`` for every reason,
        ``tracking_errors`` (frames published untracked because the tracker refused them)."""
        with self._lock:
            cam = self._cameras.get(key)
            states = collections.Counter(t.state for t in cam.tracker.tracks()) if cam is not None else {}
            vals = [("tracking", "on" if self._enabled else "off"),
                    ("tracks_confirmed", str(states.get("confirmed", 0))), ("tracks_lost", str(states.get("lost", 0))),
                    ("track_ids_issued", str(cam.max_track_id if cam else 0))]
            vals += [(f"tracking_resets_{r}", str(cam.resets[r] if cam else 0)) for r in RESET_REASONS]
            vals.append(("tracking_errors", str(cam.errors if cam else 0)))
        return vals

    def annotate(self, statuses, keys) -> None:
        """Append :meth:`camera_values` to each camera's ``diagnostic_msgs/DiagnosticStatus``
        (``statuses[i]`` is camera ``keys[i]``)."""
        from diagnostic_msgs.msg import KeyValue

        for status, key in zip(statuses, keys):
            status.values.extend(KeyValue(key=k, value=v) for k, v in self.camera_values(key))

    def totals(self) -> dict:
        """``{"tracks": ids issued over all cameras, "resets": {reason: n}}`` (``ciae-bag``'s summary)."""
        with self._lock:
            resets = collections.Counter()
            for cam in self._cameras.values():
                resets.update(cam.resets)
            return {"tracks": sum(c.max_track_id for c in self._cameras.values()), "resets": dict(resets)}
