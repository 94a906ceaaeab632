import json

import numpy as np
import pytest

from ciae_core.synth import SYNTH_CATEGORIES, SynthError
from ciae_core.synth_video import TrackingSequence, write_tracking_sequence

THING_IDS = {c.id for c in SYNTH_CATEGORIES if c.isthing}


def _things(infos):
    return {s["id"]: s for s in infos if s["category_id"] in THING_IDS}


def test_frames_agree_with_their_ground_truth_and_are_deterministic():
    seq = TrackingSequence(7, 96, 128, 12, crossings=1, exits=1, side_by_side=1, others=1, min_size=12)
    image, pan, infos = seq.frame(5)
    assert image.shape == (96, 128, 3) and image.dtype == np.uint8 and pan.shape == (96, 128)
    ids, counts = np.unique(pan[pan > 0], return_counts=True)
    assert [s["id"] for s in infos] == ids.tolist() and [s["area"] for s in infos] == counts.tolist()
    again = TrackingSequence(7, 96, 128, 12, crossings=1, exits=1, side_by_side=1, others=1, min_size=12).frame(5)
    assert np.array_equal(image, again[0]) and np.array_equal(pan, again[1]) and infos == again[2]
    other = TrackingSequence(8, 96, 128, 12, crossings=1, exits=1, side_by_side=1, others=1, min_size=12).frame(5)
    assert not np.array_equal(pan, other[1])
    with pytest.raises(SynthError, match="outside the sequence"):
        seq.frame(12)


def test_ids_are_stable_and_keep_their_class():
    seq = TrackingSequence(3, 160, 160, 40)
    cls = {}
    for t in range(0, 40, 3):
        for i, s in _things(seq.frame(t)[2]).items():
            assert cls.setdefault(i, s["category_id"]) == s["category_id"]
            assert 4 <= i < 4 + len(seq.instances)
            assert seq.instances[i - 4].shape == s["category_id"] - 1  # SHAPES order = thing ids 1..4


def test_crossing_pairs_are_look_alikes_that_meet_and_one_hides_the_other():
    seq = TrackingSequence(11, 256, 256, 120, crossings=2, exits=0, side_by_side=0, others=0)
    crossings = [e for e in seq.events if e[0] == "cross"]
    assert len(crossings) == 2
    for _, a, b, t_c in crossings:
        ia, ib = seq.instances[a - 4], seq.instances[b - 4]
        assert ia.shape == ib.shape and abs(ia.size - ib.size) <= 0.11 * ia.size
        assert max(abs(ca - cb) for ca, cb in zip(ia.color, ib.color)) <= 12
        gap = np.linalg.norm(seq.paths[a - 4][t_c] - seq.paths[b - 4][t_c])
        assert gap <= 0.15 * ia.size * np.sqrt(2) + 1e-6  # they meet (nearly centre on centre)
        # Before and after the crossing they are apart; at it the one behind (a) is hidden.
        far = [abs(t - t_c) for t in range(seq.num_frames)
               if np.linalg.norm(seq.paths[a - 4][t] - seq.paths[b - 4][t]) > ia.size]
        assert far and min(far) <= 30
        at = _things(seq.frame(t_c)[2])
        alone = _things(seq.frame(t_c + min(far) if t_c + min(far) < seq.num_frames else t_c - min(far))[2])
        assert b in at and (a not in at or at[a]["area"] < 0.5 * alone[a]["area"])


def test_exits_leave_the_image_and_come_back():
    seq = TrackingSequence(5, 160, 160, 200, crossings=0, exits=2, side_by_side=0, others=0)
    for _, k in [e for e in seq.events if e[0] == "exit"]:
        seen = [k in _things(seq.frame(t)[2]) for t in range(0, 200, 2)]
        gone = [i for i in range(1, len(seen)) if seen[i - 1] and not seen[i]]
        back = [i for i in range(1, len(seen)) if not seen[i - 1] and seen[i]]
        assert gone and back and max(back) > min(gone)  # out at least once, then in again


def test_side_by_side_pairs_touch_and_move_together():
    seq = TrackingSequence(9, 200, 200, 60, crossings=0, exits=0, side_by_side=1, others=0, speed_change_every=20)
    (_, a, b), = [e for e in seq.events if e[0] == "side_by_side"]
    pa, pb = seq.paths[a - 4], seq.paths[b - 4]
    size = max(seq.instances[a - 4].size, seq.instances[b - 4].size)
    d0 = np.linalg.norm(pa[0] - pb[0])
    assert 0.4 * size <= d0 <= 1.05 * size
    steps = np.linalg.norm(np.diff(pa, axis=0), axis=1)
    assert steps.max() > 1.5 * np.median(steps) or steps.min() < 0.67 * np.median(steps)  # speed changes


def test_write_tracking_sequence(tmp_path):
    path = write_tracking_sequence(str(tmp_path), 4, 64, 96, seed=2, fps=15.0, crossings=1, exits=0,
                                   side_by_side=0, others=1, min_size=12)
    doc = json.loads(open(path).read())
    assert doc["info"]["sequence"] is True and doc["info"]["fps"] == 15.0
    assert [e[0] for e in doc["info"]["events"]] == ["cross"]
    assert [im["file_name"] for im in doc["images"]] == [f"{i:06d}.png" for i in range(4)]
    assert all((tmp_path / "panoptic" / a["file_name"]).is_file() for a in doc["annotations"])
    from ciae_core.data import CocoPanopticDataset
    ds = CocoPanopticDataset(str(tmp_path / "images"), str(tmp_path / "panoptic"), path)
    _, gt_ids, segs, _, _ = ds.load(3)
    _, pan, infos = TrackingSequence(2, 64, 96, 4, crossings=1, exits=0, side_by_side=0, others=1,
                                     min_size=12).frame(3)
    assert np.array_equal(gt_ids, pan)


def test_bad_arguments():
    with pytest.raises(SynthError, match="num_frames"):
        TrackingSequence(0, 64, 64, 0)
    with pytest.raises(SynthError, match="crossings"):
        TrackingSequence(0, 64, 64, 5, crossings=-1)
    with pytest.raises(SynthError, match="at least 32x32"):
        TrackingSequence(0, 16, 64, 5)
    with pytest.raises(SynthError, match="fps"):
        write_tracking_sequence("/nonexistent", 2, 64, 64, fps=0)
