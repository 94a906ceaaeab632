"""The demo's tracking report: tracks in the node's output, and ID switches against the synthetic
camera's ground truth (issue 14).

After a ``ciae-demo`` run, :func:`tracking_report` reads the recorded ``panoptic/segments`` back
from the demo's bag and counts the track ids the node gave. When the camera was the synthetic one
it also wrote which clip frame each published stamp showed (``--truth``: ``camera_truth.jsonl``,
a first line with the scene's seed and size); each output is then matched to its frame by the
header stamp, the frame's ground truth is rendered again (:func:`ciae_ros.camera.synth_sequence`:
frames are a pure function of seed and index; each clip frame once) and scored with
:class:`ciae_core.video_metrics.VideoEvaluator` (motmetrics: a tracked thing matches a
ground-truth thing of its category at mask IoU > 0.5): ID switches, IDF1, MOTA.

Decisions: the outputs are evaluated after the run (the CPU is then free; during it the node needs
it), at half resolution (every second pixel in x and y: a quarter of the cost, IoUs change by a
pixel's worth), and only the MOT view (VPQ windows would cost seconds for a number the demo does
not show). Frames the node dropped are simply not in the sequence: the tracker saw the same gaps.
"""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np

from ciae_core.structures import PanopticResult, Segment

from .image_conversion import image_msg_to_array

_LOG = logging.getLogger("ciae_demo")
STRIDE = 2  # evaluated at every STRIDE-th pixel in x and y
TRUTH_FILE = "camera_truth.jsonl"  # the synthetic camera's --truth file in the demo's output folder


class GroundTruth:
    """The synthetic camera's ground truth: ``frame_of[(sec, nanosec)]`` = clip frame of a published
    stamp (from its ``--truth`` file); :meth:`frame` renders a clip frame's id map and segment infos
    (once per frame) with ``sequence`` (default: the camera's, :func:`ciae_ros.camera.synth_sequence`
    of the file's seed and size; anything whose ``frame(t)`` returns ``(image, ids, infos)``)."""

    def __init__(self, truth_file, sequence=None):
        lines = []
        for line in pathlib.Path(truth_file).read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by the camera's stop
                continue
        if not lines or lines[0].get("source") != "synth":
            raise ValueError(f"{truth_file} describes no synthetic scene")
        head = lines[0]
        self.frame_of = {tuple(d["stamp"]): int(d["frame"]) for d in lines[1:] if "stamp" in d}
        self._seed, self._size = int(head["seed"]), (int(head["height"]), int(head["width"]))
        self._sequence = sequence
        self._cache: dict[int, tuple[np.ndarray, list]] = {}

    @classmethod
    def load(cls, folder) -> "GroundTruth | None":
        """The ground truth the camera wrote in ``folder`` (``camera_truth.jsonl``), else ``None``."""
        path = pathlib.Path(folder) / TRUTH_FILE
        return cls(path) if path.is_file() else None

    def frame(self, index: int) -> tuple[np.ndarray, list]:
        if index not in self._cache:
            if self._sequence is None:
                from .camera import synth_sequence

                self._sequence = synth_sequence(self._seed, *self._size)
            _, ids, infos = self._sequence.frame(index)
            self._cache[index] = (ids, infos)
        return self._cache[index]


def result_of(msg, stride: int = 1) -> PanopticResult:
    """``PanopticSegments`` (rclpy or rosbags message) -> ``PanopticResult`` with the track ids,
    the id map taken at every ``stride``-th pixel (segments absent from it left out)."""
    id_map = image_msg_to_array(msg.id_image)[::stride, ::stride].astype(np.int32)
    present = set(np.unique(id_map).tolist())
    segs = [Segment(int(s.id), int(s.category_id), str(s.label), bool(s.isthing), float(s.score), int(s.area),
                    (int(s.bbox.x_offset), int(s.bbox.y_offset), int(s.bbox.width), int(s.bbox.height)),
                    int(s.track_id))
            for s in msg.segments if int(s.id) in present]
    return PanopticResult(id_map=id_map, segments=segs)


def tracking_report(bag_dir, truth_dir, categories, topic: str = "/panoptic/segments",
                    truth: GroundTruth | None = None) -> dict:
    """The report's ``tracking`` entry (``truth``: default :meth:`GroundTruth.load` of ``truth_dir``).

    ``tracks``: distinct track ids in the outputs; ``outputs_with_tracks``: outputs with at least
    one; ``ground_truth``: ``None`` without the synthetic camera's ground truth, else
    ``{"frames_evaluated", "gt_things", "id_switches", "idsw_per_100", "idf1", "mota",
    "stride"}`` (or ``{"error": reason}`` when the outputs cannot be scored against it, e.g. a
    model of other categories). ``categories``: the model's ``CategoryInfo`` list.
    """
    from ciae_core.evaluation import EvaluationError
    from ciae_core.video_metrics import VideoEvaluator

    from .bag import read_messages

    if truth is None:
        try:
            truth = GroundTruth.load(truth_dir)
        except (OSError, ValueError, KeyError) as exc:
            _LOG.warning("no ground truth for the tracking report: %s", exc)
    evaluator = VideoEvaluator(categories, windows=(0,)) if truth is not None else None
    tracks: set[int] = set()
    with_tracks = evaluated = 0
    error = None
    for _, msg in read_messages(bag_dir, topic):
        ids = {int(s.track_id) for s in msg.segments if s.track_id}
        tracks |= ids
        with_tracks += bool(ids)
        if evaluator is None or error is not None:
            continue
        index = truth.frame_of.get((int(msg.header.stamp.sec), int(msg.header.stamp.nanosec)))
        if index is None:
            continue
        gt, infos = truth.frame(index)
        try:
            evaluator.add(gt[::STRIDE, ::STRIDE], infos, result_of(msg, STRIDE))
            evaluated += 1
        except EvaluationError as exc:
            error = f"cannot score against the synthetic ground truth: {exc}"
    report = {"tracks": len(tracks), "outputs_with_tracks": with_tracks, "ground_truth": None}
    if error is not None:
        _LOG.warning("%s", error)
        report["ground_truth"] = {"error": error}
    elif evaluator is not None:
        logging.disable(logging.INFO)  # motmetrics logs its timings on the root logger
        try:
            mot = evaluator.mot() if evaluated else {"num_gt_tracks": 0, "id_switches": 0, "idsw_per_100": 0.0,
                                                     "idf1": 0.0, "mota": 0.0}
        finally:
            logging.disable(logging.NOTSET)
        report["ground_truth"] = {"frames_evaluated": evaluated, "gt_things": int(mot["num_gt_tracks"]),
                                  "id_switches": int(mot["id_switches"]),
                                  "idsw_per_100": round(float(mot["idsw_per_100"]), 1),
                                  "idf1": round(float(mot["idf1"]), 3), "mota": round(float(mot["mota"]), 3),
                                  "stride": STRIDE}
    return report


def tracking_markdown(r: dict) -> str:
    """One report line about tracking."""
    t = r.get("tracking") or {}
    line = f"- tracking: {t.get('tracks', 0)} track id(s) in {t.get('outputs_with_tracks', 0)} output(s)"
    resets = {k: v for k, v in (r.get("tracking_resets") or {}).items() if v}
    if resets:
        line += " (tracks reset: " + ", ".join(f"{k} {v}" for k, v in sorted(resets.items())) + ")"
    gt = t.get("ground_truth")
    if gt and "error" in gt:
        line += f"; {gt['error']}"
    elif gt:
        line += (f"; against the synthetic ground truth ({gt['frames_evaluated']} outputs, {gt['gt_things']} "
                 f"things): {gt['id_switches']} ID switch(es) ({gt['idsw_per_100']} per 100 things), "
                 f"IDF1 {gt['idf1']:.3f}, MOTA {gt['mota']:.3f}")
    return line
