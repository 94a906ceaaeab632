"""Shared vocabulary of ciae_core: categories, segments and panoptic results.

Plain dataclasses over numpy so that the predictor, the evaluator, the CLI tools and the ROS node
speak the same language without importing each other (and without importing ROS).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class CategoryInfo:
    """One dataset category.

    ``id`` is the dataset's category id (e.g. the COCO id), which is what users and messages see;
    the model's contiguous training id is the category's position in the model's category list
    (things first, then stuff).
    """

    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int] = (128, 128, 128)  # RGB display colour

    def to_dict(self) -> dict:
        return {"id": int(self.id), "name": self.name, "isthing": bool(self.isthing),
                "color": [int(c) for c in self.color]}

    @classmethod
    def from_dict(cls, d: dict) -> "CategoryInfo":
        return cls(id=int(d["id"]), name=str(d["name"]), isthing=bool(d["isthing"]),
                   color=tuple(int(c) for c in d.get("color", (128, 128, 128))))


@dataclass
class Segment:
    """One segment of a panoptic result (a thing instance or a stuff region).

    ``score``: for things the detection score of the proposal; for stuff the mean cosine
    similarity between the region's pixel embeddings and its stuff query (memory embedding).
    ``bbox`` is ``(x, y, w, h)``: the tight box of the segment's pixels in the id map.
    ``id`` is per frame (1..N, the value in the id map). ``track_id`` is the identity that persists
    across frames, set by :class:`ciae_core.tracking.SegmentTracker`: ``> 0`` for a confirmed track,
    ``0`` for none (stuff, a thing whose track is not yet confirmed, or tracking off).
    """

    id: int
    category_id: int
    label: str
    isthing: bool
    score: float
    area: int
    bbox: tuple[int, int, int, int]
    track_id: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bbox"] = [int(v) for v in self.bbox]
        return d


@dataclass
class PanopticResult:
    """Panoptic segmentation of one image.

    id_map: ``(H, W)`` int32 at the input image's resolution; 0 is void, ``k > 0`` is
        ``segments[i]`` with ``segments[i].id == k``.
    segments: one per non-zero id in ``id_map``, ordered by id.
    confidence: optional ``(H, W)`` float32, top-1 minus top-2 similarity per pixel.
    embeddings: optional ``(len(segments), D)`` float32, row ``i`` the L2-normalised mean pixel
        embedding of ``segments[i]`` over its mask (the appearance cue of the tracker); ``None``
        when not requested.
    """

    id_map: np.ndarray
    segments: list[Segment] = field(default_factory=list)
    confidence: np.ndarray | None = None
    embeddings: np.ndarray | None = None

    def segment_by_id(self) -> dict[int, Segment]:
        return {s.id: s for s in self.segments}


def segments_from_id_map(id_map: np.ndarray, seg_meta: dict[int, tuple[int, str, bool, float]]) -> list[Segment]:
    """Build the segment table of ``id_map`` (areas and tight boxes computed from the pixels).

    ``seg_meta`` maps segment id -> (category_id, label, isthing, score). Ids present in the map
    but missing from ``seg_meta`` raise ``KeyError``; ids in ``seg_meta`` with no pixels are
    left out, so the table always agrees with the map.
    """
    ids = np.asarray(id_map)
    if ids.ndim != 2:
        raise ValueError(f"id_map must be 2-D, got shape {ids.shape}")
    flat = ids.ravel()
    nz = np.flatnonzero(flat)
    if nz.size == 0:
        return []
    vals = flat[nz]
    order = np.argsort(vals, kind="stable")
    vals, nz = vals[order], nz[order]
    present, starts, areas = np.unique(vals, return_index=True, return_counts=True)
    w = ids.shape[1]
    ys, xs = nz // w, nz % w
    x0, x1 = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts)
    y0, y1 = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)
    segments = []
    for k, seg_id in enumerate(present.tolist()):
        cat, label, isthing, score = seg_meta[seg_id]
        segments.append(Segment(id=int(seg_id), category_id=int(cat), label=str(label), isthing=bool(isthing),
                                score=float(score), area=int(areas[k]),
                                bbox=(int(x0[k]), int(y0[k]), int(x1[k] - x0[k] + 1), int(y1[k] - y0[k] + 1))))
    return segments
