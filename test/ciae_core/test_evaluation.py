import json
import os
import shutil

import numpy as np
import pytest
import torch

from ciae_core.data import CocoPanopticDataset, SyntheticPanopticDataset, collate_panoptic, id_to_rgb, read_panoptic_png
from ciae_core.evaluation import EvaluationError, PanopticEvaluator, PQStat, flat_metrics, pq_compute, pq_stat_single
from ciae_core.structures import CategoryInfo

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "data", "coco-panoptic-sample")
GT_JSON = os.path.join(SAMPLE, "panoptic_examples.json")
GT_DIR = os.path.join(SAMPLE, "panoptic")

A, B, S, T = 1, 2, 10, 11  # two thing and two stuff categories
CATS = [CategoryInfo(A, "a", True), CategoryInfo(B, "b", True), CategoryInfo(S, "s", False),
        CategoryInfo(T, "t", False)]


def _gt():
    """10x10: A#1 top-left 5x5, A#2 top-right 5x5 (touching), S#3 bottom half."""
    ids = np.zeros((10, 10), np.int32)
    ids[:5, :5], ids[:5, 5:], ids[5:] = 1, 2, 3
    segs = [{"id": 1, "category_id": A, "iscrowd": 0}, {"id": 2, "category_id": A, "iscrowd": 0},
            {"id": 3, "category_id": S, "iscrowd": 0}]
    return ids, segs


def _summary(gt, pred):
    ev = PanopticEvaluator(CATS)
    ev.process(gt, pred)
    flat = ev.evaluate()
    return ev.summary, flat


def _segs(ids, cats):
    return [{"id": i, "category_id": c} for i, c in cats.items() if (ids == i).any()]


def test_identity_is_perfect():
    gt = _gt()
    s, flat = _summary(gt, (gt[0].copy(), _segs(gt[0], {1: A, 2: A, 3: S})))
    assert s["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert flat["PQ"] == 100.0 and flat["PQ_th"] == 100.0 and flat["PQ_st"] == 100.0


def test_dropped_segment_is_a_false_negative():
    gt = _gt()
    pred = gt[0].copy()
    pred[pred == 2] = 0
    s, _ = _summary(gt, (pred, _segs(pred, {1: A, 3: S})))
    # A: TP 1 (IoU 1), FN 1 -> PQ = 1 / (1 + 0.5); S perfect.
    assert s["per_class"][A]["tp"] == 1 and s["per_class"][A]["fn"] == 1
    assert s["Things"]["pq"] == pytest.approx(2 / 3)
    assert s["All"]["pq"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["All"]["sq"] == pytest.approx(1.0) and s["All"]["rq"] == pytest.approx((2 / 3 + 1) / 2)


def test_split_segment_gives_one_tp_and_one_fp():
    gt = _gt()
    pred = gt[0].copy()
    pred[5:, 6:] = 4  # S split into 30 px (#3, IoU 0.6) and 20 px (#4, IoU 0.4)
    s, _ = _summary(gt, (pred, _segs(pred, {1: A, 2: A, 3: S, 4: S})))
    st = s["per_class"][S]
    assert (st["tp"], st["fp"], st["fn"]) == (1, 1, 0)
    assert st["sq"] == pytest.approx(0.6) and st["rq"] == pytest.approx(1 / 1.5)
    assert st["pq"] == pytest.approx(0.6 / 1.5)
    assert s["All"]["pq"] == pytest.approx((1.0 + 0.4) / 2)


def test_partial_overlap_iou_and_sq():
    gt = _gt()
    pred = gt[0].copy()
    pred[:5, 4] = 2  # A#1 loses a column to A#2
    s, _ = _summary(gt, (pred, _segs(pred, {1: A, 2: A, 3: S})))
    iou1, iou2 = 20 / 25, 25 / 30
    assert s["per_class"][A]["sq"] == pytest.approx((iou1 + iou2) / 2)
    assert s["per_class"][A]["pq"] == pytest.approx((iou1 + iou2) / 2)
    assert s["per_class"][A]["rq"] == 1.0


def test_wrong_category_is_fp_and_fn():
    gt = _gt()
    pred = gt[0].copy()
    s, flat = _summary(gt, (pred, [{"id": 1, "category_id": A}, {"id": 2, "category_id": B},
                                   {"id": 3, "category_id": S}]))
    assert s["per_class"][A]["fn"] == 1 and s["per_class"][B]["fp"] == 1
    assert s["All"]["n"] == 3 and s["Things"]["n"] == 2
    assert s["Things"]["pq"] == pytest.approx((2 / 3 + 0) / 2)
    assert s["All"]["pq"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert flat["PQ_th"] == pytest.approx(100 / 3)


def _crowd_gt():
    ids = np.zeros((10, 10), np.int32)
    ids[:5, :5], ids[:5, 5:], ids[5:, :5], ids[5:, 5:] = 1, 2, 4, 3
    segs = [{"id": 1, "category_id": A, "iscrowd": 0}, {"id": 2, "category_id": A, "iscrowd": 0},
            {"id": 3, "category_id": S, "iscrowd": 0}, {"id": 4, "category_id": A, "iscrowd": 1}]
    return ids, segs


def test_crowd_region_is_never_fn_and_absorbs_same_category_predictions():
    gt = _crowd_gt()
    pred = gt[0].copy()
    pred[pred == 4] = 7
    # A prediction lying on the crowd region of its own category is not a FP; the crowd is no FN.
    s, _ = _summary(gt, (pred, _segs(pred, {1: A, 2: A, 3: S, 7: A})))
    assert s["All"]["pq"] == 1.0 and s["per_class"][A]["fp"] == 0 and s["per_class"][A]["fn"] == 0
    # ... but it is a FP when its category differs from the crowd's.
    s, _ = _summary(gt, (pred, _segs(pred, {1: A, 2: A, 3: S, 7: B})))
    assert s["per_class"][B]["fp"] == 1 and s["All"]["pq"] == pytest.approx(2 / 3)
    # Exactly half on the crowd is not "more than half": FP; S is then missed (FN).
    pred2 = pred.copy()
    pred2[5:, 5:] = 7
    s, _ = _summary(gt, (pred2, _segs(pred2, {1: A, 2: A, 7: A})))
    a = s["per_class"][A]
    assert (a["tp"], a["fp"], a["fn"]) == (2, 1, 0) and s["per_class"][S]["fn"] == 1
    assert s["All"]["pq"] == pytest.approx((2 / 2.5 + 0) / 2)


def test_void_is_excluded_from_union_and_predictions_on_void_are_ignored():
    ids = np.zeros((10, 10), np.int32)
    ids[:5, :5], ids[:5, 5:], ids[5:, 5:] = 1, 2, 3  # bottom-left is void
    gt = (ids, [{"id": 1, "category_id": A}, {"id": 2, "category_id": A}, {"id": 3, "category_id": S}])
    pred = ids.copy()
    pred[5:, 2:] = 3  # S spills 15 px onto void: IoU = 25 / (40 + 25 - 25 - 15) = 1
    pred[5:, :2] = 9  # an A prediction entirely on void: ignored
    s, _ = _summary(gt, (pred, _segs(pred, {1: A, 2: A, 3: S, 9: A})))
    assert s["per_class"][S]["sq"] == pytest.approx(1.0)
    assert s["per_class"][A]["fp"] == 0
    assert s["All"]["pq"] == 1.0
    # Without the void exclusion this would be IoU 25/40 -- check the formula is really applied:
    pred[5:, :2] = 3
    s, _ = _summary(gt, (pred, _segs(pred, {1: A, 2: A, 3: S})))
    assert s["per_class"][S]["sq"] == pytest.approx(1.0)


def test_unmatched_prediction_mostly_on_void_of_other_image_part():
    # 60% on void -> ignored; 40% on void -> FP.
    ids = np.zeros((10, 10), np.int32)
    ids[:, 5:] = 3
    gt = (ids, [{"id": 3, "category_id": S}])
    for void_cols, is_fp in ((3, False), (2, True)):
        pred = np.full((10, 10), 3, np.int32)
        pred[:, 5 - void_cols:5 - void_cols + 5] = 8  # 5 columns: `void_cols` on void, rest on S
        pred[:, :5 - void_cols] = 0
        s, _ = _summary(gt, (pred, _segs(pred, {3: S, 8: T})))
        assert s["per_class"][T]["fp"] == int(is_fp)


def _sample_gt(index):
    doc = json.load(open(GT_JSON))
    ann = doc["annotations"][index]
    return read_panoptic_png(os.path.join(GT_DIR, ann["file_name"])), ann["segments_info"], doc


def test_real_sample_gt_vs_itself_is_100_and_matches_in_memory(tmp_path):
    s = pq_compute(GT_JSON, GT_JSON, GT_DIR, GT_DIR)
    assert (s["All"]["pq"], s["Things"]["pq"], s["Stuff"]["pq"]) == (1.0, 1.0, 1.0)
    assert s["All"]["n"] == 8 and s["num_images"] == 2
    assert s["per_class"][1]["tp"] == 26  # non-crowd persons only
    assert pq_compute(GT_JSON, GT_JSON, GT_DIR, GT_DIR, num_workers=2) == s


def test_real_sample_dropped_person_by_hand():
    ev = PanopticEvaluator(CocoPanopticDataset(os.path.join(SAMPLE, "images"), GT_DIR, GT_JSON).categories)
    for index in range(2):
        ids, segs, _ = _sample_gt(index)
        pred = ids.copy()
        pred_segs = [s for s in segs if not s["iscrowd"]]
        if index == 0:
            drop = pred_segs.pop(0)
            assert drop["category_id"] == 1
            pred[pred == drop["id"]] = 0
        for s in segs:
            if s["iscrowd"]:
                pred[pred == s["id"]] = 0
        ev.process((ids, segs), (pred, pred_segs))
    flat = ev.evaluate()
    person = 25 / (25 + 0.5)
    assert ev.summary["All"]["pq"] == pytest.approx((7 + person) / 8)
    assert ev.summary["Things"]["pq"] == pytest.approx((3 + person) / 4)
    assert flat["PQ_st"] == 100.0 and ev.summary["num_images"] == 2


def test_prediction_png_and_json_disagree(tmp_path):
    pred_dir = tmp_path / "pred"
    shutil.copytree(GT_DIR, pred_dir)
    doc = json.load(open(GT_JSON))
    doc["annotations"][0]["segments_info"].pop(3)
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(EvaluationError, match="in the id map but not in its segments_info"):
        pq_compute(GT_JSON, str(path), GT_DIR, str(pred_dir))
    with pytest.raises(EvaluationError, match="not found"):
        pq_compute(GT_JSON, str(tmp_path / "nope.json"), GT_DIR, str(pred_dir))


def test_single_image_errors():
    gt = _gt()
    with pytest.raises(EvaluationError, match="resize the prediction"):
        pq_stat_single(gt[0], gt[1], gt[0][:5], [], CATS)
    with pytest.raises(EvaluationError, match="no pixels"):
        pq_stat_single(gt[0], gt[1], gt[0], gt[1] + [{"id": 9, "category_id": A}], CATS)
    with pytest.raises(EvaluationError, match="category ids \\[99\\]"):
        pq_stat_single(gt[0], gt[1], gt[0], [{"id": 1, "category_id": 99}, {"id": 2, "category_id": A},
                                             {"id": 3, "category_id": S}], CATS)


def test_evaluator_on_training_batch_and_model_outputs():
    ds = SyntheticPanopticDataset(3, 50, 70, seed=5)
    batch = collate_panoptic([ds[i] for i in range(3)])
    cats = ds.categories
    outputs = []
    for t, (h, w) in zip(batch.targets, batch.image_sizes):
        keep = ~t["iscrowd"]
        masks = t["masks"][keep][:, :h, :w]
        id_map = torch.zeros((h, w), dtype=torch.int32)
        for j in range(masks.shape[0]):
            id_map[masks[j]] = j + 1
        outputs.append({"id_map": id_map, "ids": torch.arange(1, masks.shape[0] + 1), "labels": t["labels"][keep],
                        "isthing": t["isthing"][keep], "scores": torch.ones(masks.shape[0])})
    ev = PanopticEvaluator(cats)
    ev.process(batch, outputs)
    assert ev.evaluate()["PQ"] == 100.0
    # Swap the class of every instance of the first image: its things become FP + FN.
    outputs[0]["labels"] = torch.where(outputs[0]["isthing"], (outputs[0]["labels"] + 1) % ds.num_things,
                                       outputs[0]["labels"])
    ev.reset()
    ev.process(batch, outputs)
    assert ev.evaluate()["PQ_th"] < 100.0 and ev.summary["Stuff"]["pq"] == 1.0


def test_pqstat_addition_and_flat_metrics():
    a, b = PQStat(), PQStat()
    a.add(A, iou=0.8, tp=1)
    b.add(A, fn=1)
    b.add(S, iou=1.0, tp=1)
    a += b
    s = a.summarize(CATS)
    assert s["per_class"][A]["pq"] == pytest.approx(0.8 / 1.5)
    assert flat_metrics(s)["PQ"] == pytest.approx(100 * (0.8 / 1.5 + 1) / 2)
    empty = PQStat().summarize(CATS)
    assert empty["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}


def _three_images():
    """(gt, pred) pairs: a perfect image, one with a dropped instance, one with a split stuff region."""
    gt = _gt()
    dropped = gt[0].copy()
    dropped[dropped == 2] = 0
    split = gt[0].copy()
    split[7:] = 4
    return [(gt, (gt[0].copy(), _segs(gt[0], {1: A, 2: A, 3: S}))),
            (gt, (dropped, _segs(dropped, {1: A, 3: S}))),
            (gt, (split, _segs(split, {1: A, 2: A, 3: S, 4: T})))]


def _evaluator_rank(rank: int, world: int, port: int, out: str) -> None:
    """One gloo rank: processes images ``rank, rank + world, ...``, evaluates twice."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ev = PanopticEvaluator(CATS)
        for gt, pred in _three_images()[rank::world]:
            ev.process(gt, pred)
        first, second = ev.evaluate(), ev.evaluate()  # the second must not sum again
        own = PanopticEvaluator(CATS, sync_ranks=False)
        for gt, pred in _three_images()[rank::world]:
            own.process(gt, pred)
        own.evaluate()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"first": first, "second": second, "summary": ev.summary, "own_images": own.summary["num_images"]},
                      f)
    finally:
        dist.destroy_process_group()


def test_evaluator_sums_the_statistics_of_all_ranks(tmp_path):
    """Two real gloo ranks, each with its share of three images, both get the single-process result."""
    import socket

    import torch.multiprocessing as mp

    single = PanopticEvaluator(CATS)
    for gt, pred in _three_images():
        single.process(gt, pred)
    expected = single.evaluate()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_evaluator_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank, own_images in ((0, 2), (1, 1)):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["own_images"] == own_images
        assert got["summary"]["num_images"] == 3
        assert got["first"] == pytest.approx(expected) and got["second"] == pytest.approx(expected)
        for cat in (A, S, T):
            row, ref = got["summary"]["per_class"][str(cat)], single.summary["per_class"][cat]
            assert (row["tp"], row["fp"], row["fn"]) == (ref["tp"], ref["fp"], ref["fn"])
    assert single.summary["per_class"][T]["fp"] == 1  # the shares really differ: only rank 0 saw the split


def test_evaluator_sync_ranks_argument():
    with pytest.raises(EvaluationError, match="sync_ranks"):
        PanopticEvaluator(CATS, sync_ranks="always")
    ev = PanopticEvaluator(CATS, sync_ranks=True)
    ev.process(*_three_images()[0])
    with pytest.raises(EvaluationError, match="no torch.distributed process group"):
        ev.evaluate()
    ev = PanopticEvaluator(CATS)  # "auto" without a process group: this process's numbers
    ev.process(*_three_images()[0])
    assert ev.evaluate()["PQ"] == 100.0 and ev.summary["num_images"] == 1


def test_id_to_rgb_matches_reader(tmp_path):
    import cv2
    ids = np.array([[0, 1, 300], [70000, 5, 2 ** 24 - 1]], np.int32)
    cv2.imwrite(str(tmp_path / "x.png"), id_to_rgb(ids)[..., ::-1])
    assert np.array_equal(read_panoptic_png(str(tmp_path / "x.png")), ids)

