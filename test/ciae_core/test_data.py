import json
import os
import shutil

import numpy as np
import pytest
import torch

from ciae_core.data import (CocoPanopticDataset, DatasetError, RandomHorizontalFlip, ResizeShortestEdge,
                            SyntheticPanopticDataset, build_loader, build_transforms, categories_from_json,
                            collate_panoptic, read_panoptic_png, resize_id_map, shortest_edge_size,
                            targets_from_panoptic)
from ciae_core.synth import SYNTH_CATEGORIES
from ciae_core.cli.synth import main as synth_main

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "data", "coco-panoptic-sample")


def _dataset(transforms=None, json_path=None, root=SAMPLE):
    return CocoPanopticDataset(os.path.join(root, "images"), os.path.join(root, "panoptic"),
                               json_path or os.path.join(root, "panoptic_examples.json"), transforms=transforms)


@pytest.fixture(scope="module")
def sample_json():
    with open(os.path.join(SAMPLE, "panoptic_examples.json")) as f:
        return json.load(f)


def test_categories_things_first_with_contiguous_train_ids(sample_json):
    ds = _dataset()
    assert ds.num_things == 80 and ds.num_stuff == 53 and len(ds.categories) == 133
    assert all(c.isthing for c in ds.categories[:80]) and not any(c.isthing for c in ds.categories[80:])
    assert ds.cat_id_to_train_id[1] == 0  # person
    json_things = [c["id"] for c in sample_json["categories"] if c["isthing"]]
    assert [c.id for c in ds.categories[:80]] == json_things
    assert sorted(ds.cat_id_to_train_id.values()) == list(range(133))


@pytest.mark.parametrize("index,num_segments,num_things,num_crowd", [(0, 18, 15, 1), (1, 32, 28, 2)])
def test_sample_targets_match_png_and_json(sample_json, index, num_segments, num_things, num_crowd):
    ds = _dataset()
    image, t = ds[index]
    ann = sample_json["annotations"][index]
    assert t["image_id"] == ann["image_id"] and t["file_name"] == ann["file_name"].replace(".png", ".jpg")
    pan = read_panoptic_png(os.path.join(SAMPLE, "panoptic", ann["file_name"]))
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *pan.shape) and t["orig_size"] == pan.shape
    k = len(t["labels"])
    assert k == num_segments and int(t["isthing"].sum()) == num_things and int(t["iscrowd"].sum()) == num_crowd
    masks = t["masks"].numpy()
    # Masks are disjoint and cover exactly the non-void pixels.
    assert masks.sum(0).max() == 1
    assert np.array_equal(masks.any(0), pan != 0)
    cats = {c.id: c for c in ds.categories}
    for j, s in enumerate(ann["segments_info"]):
        assert np.array_equal(masks[j], pan == s["id"])
        assert masks[j].sum() == s["area"]
        assert ds.categories[int(t["labels"][j])].id == s["category_id"]
        assert bool(t["isthing"][j]) == cats[s["category_id"]].isthing
        assert bool(t["iscrowd"][j]) == bool(s["iscrowd"])
        x, y, w, h = s["bbox"]
        assert t["boxes"][j].tolist() == [x, y, x + w, y + h]
    assert t["labels"].dtype == torch.int64 and t["boxes"].dtype == torch.float32


def test_flip_mirrors_image_masks_and_boxes():
    plain = _dataset()
    flipped = _dataset(transforms=RandomHorizontalFlip(prob=1.0))
    img0, t0 = plain[0]
    img1, t1 = flipped[0]
    w = img0.shape[2]
    assert torch.equal(img1, img0.flip(-1))
    assert torch.equal(t1["masks"], t0["masks"].flip(-1))
    assert torch.equal(t1["labels"], t0["labels"])
    assert torch.equal(t1["boxes"][:, [0, 2]], w - t0["boxes"][:, [2, 0]])
    assert torch.equal(t1["boxes"][:, [1, 3]], t0["boxes"][:, [1, 3]])


def test_resize_keeps_labels_and_geometry():
    plain = _dataset()
    small = _dataset(transforms=ResizeShortestEdge((213,), 1000))
    img0, t0 = plain[0]
    img1, t1 = small[0]
    assert tuple(img1.shape[1:]) == (213, 319)  # 427x640 → shorter side 213
    assert np.array_equal(t1["masks"].any(0).numpy(), resize_id_map(read_panoptic_png(
        os.path.join(SAMPLE, "panoptic", "000000142238.png")), (213, 319)) != 0)
    # Every big segment survives with its label, area scales with the pixel count, box with the scale.
    scale = 213 / 427
    areas0 = t0["masks"].flatten(1).sum(1).float()
    big = torch.nonzero(areas0 > 2000).flatten()
    kept = {int(lbl) for lbl in t1["labels"]}
    assert {int(t0["labels"][i]) for i in big} <= kept
    # Segments are in JSON order in both; match big ones by label + box centre.
    for i in big.tolist():
        c0 = (t0["boxes"][i, :2] + t0["boxes"][i, 2:]) / 2 * scale
        cand = [j for j in range(len(t1["labels"])) if t1["labels"][j] == t0["labels"][i]]
        j = min(cand, key=lambda j: float(((t1["boxes"][j, :2] + t1["boxes"][j, 2:]) / 2 - c0).norm()))
        assert float(((t1["boxes"][j, :2] + t1["boxes"][j, 2:]) / 2 - c0).norm()) < 2.0
        area1 = float(t1["masks"][j].sum())
        assert abs(area1 / float(areas0[i]) / scale ** 2 - 1) < 0.1


def test_resize_geometry_helpers():
    assert shortest_edge_size(427, 640, 800, 1333) == (800, 1199)
    assert shortest_edge_size(400, 1600, 800, 1333) == (333, 1333)
    ids = np.arange(6, dtype=np.int32).reshape(2, 3)
    up = resize_id_map(ids, (4, 6))
    assert np.array_equal(up, np.kron(ids, np.ones((2, 2), dtype=np.int32)))
    assert np.array_equal(resize_id_map(up, (2, 3)), ids)


def test_resize_jitter_sizes_and_determinism():
    t = ResizeShortestEdge((640, 800), 1333, sample_style="range")
    torch.manual_seed(0)
    sizes = {t.sample_short() for _ in range(50)}
    assert min(sizes) >= 640 and max(sizes) <= 800 and len(sizes) > 10
    c = ResizeShortestEdge((96, 128), 1000)
    assert {c.sample_short() for _ in range(50)} == {96, 128}
    tr = build_transforms(True, (96, 128), 1000)
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    pan = np.arange(64 * 80, dtype=np.int32).reshape(64, 80)
    torch.manual_seed(3)
    a = tr(img, pan)
    torch.manual_seed(3)
    b = tr(img, pan)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    ev = build_transforms(False, (96, 128), 1000)
    assert ev(img, pan)[0].shape[:2] == (128, 160)


def test_collate_pads_to_multiple_of_32():
    ds = SyntheticPanopticDataset(2, 70, 90, seed=1)
    ds_b = SyntheticPanopticDataset(2, 100, 64, seed=2)
    batch = [ds[0], ds_b[1]]
    images, targets, sizes = collate_panoptic(batch)
    assert images.shape == (2, 3, 128, 96) and images.dtype == torch.float32
    assert sizes == [(70, 90), (100, 64)]
    assert torch.equal(images[0, :, :70, :90], batch[0][0].float())
    assert images[0, :, 70:].abs().sum() == 0 and images[0, :, :, 90:].abs().sum() == 0
    for (img, t), tp in zip(batch, targets):
        h, w = img.shape[1:]
        assert tp["masks"].shape[1:] == (128, 96)
        assert torch.equal(tp["masks"][:, :h, :w], t["masks"]) and not tp["masks"][:, h:].any()
        assert not tp["masks"][:, :, w:].any()


def test_synthetic_dataset_matches_ciae_synth_files(tmp_path):
    assert synth_main(["--out", str(tmp_path), "--num", "2", "--size", "64x80", "--seed", "4"]) == 0
    files = CocoPanopticDataset(str(tmp_path / "images"), str(tmp_path / "panoptic"), str(tmp_path / "panoptic.json"))
    mem = SyntheticPanopticDataset(2, 64, 80, seed=4)
    assert [c.id for c in files.categories] == [c.id for c in SYNTH_CATEGORIES] == [c.id for c in mem.categories]
    for i in range(2):
        (a, ta), (b, tb) = files[i], mem[i]
        assert torch.equal(a, b)
        for key in ("masks", "labels", "isthing", "iscrowd", "boxes"):
            assert torch.equal(ta[key], tb[key])
    pan, infos = mem.ground_truth(1)
    assert pan.shape == (64, 80) and {s["id"] for s in infos} == set(np.unique(pan).tolist()) - {0}


def test_loader_shuffle_is_seeded_and_batches_have_design_format():
    ds = SyntheticPanopticDataset(6, 48, 48, seed=0)
    order = lambda seed: [t["image_id"] for _, ts, _ in build_loader(ds, 2, num_workers=0, seed=seed)  # noqa: E731
                          for t in ts]
    assert order(1) == order(1) and sorted(order(1)) == list(range(6))
    assert any(order(s) != order(1) for s in (2, 3, 4))
    images, targets, sizes = next(iter(build_loader(ds, 3, num_workers=0, shuffle=False)))
    assert images.shape == (3, 3, 64, 64) and sizes == [(48, 48)] * 3
    assert [t["image_id"] for t in targets] == [0, 1, 2]


def test_loader_with_workers_and_distributed_sampler(tmp_path):
    import torch.distributed as dist
    ds = SyntheticPanopticDataset(4, 40, 40, seed=0, transforms=build_transforms(True, (32, 40), 100))
    batches = list(build_loader(ds, 2, num_workers=1, seed=0))
    assert len(batches) == 2 and all(b[0].shape[0] == 2 for b in batches)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        loader = build_loader(ds, 2, num_workers=0, distributed=True, seed=0)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        loader.sampler.set_epoch(1)
        ids = sorted(t["image_id"] for _, ts, _ in loader for t in ts)
        assert ids == [0, 1, 2, 3]
    finally:
        dist.destroy_process_group()


def test_targets_from_panoptic_errors_and_empty():
    pan = np.array([[0, 5], [7, 7]], dtype=np.int32)
    infos = [{"id": 5, "category_id": 1, "iscrowd": 0}, {"id": 7, "category_id": 2, "iscrowd": 1}]
    t = targets_from_panoptic(pan, infos, {1: 0, 2: 1}, num_things=1)
    assert t["labels"].tolist() == [0, 1] and t["isthing"].tolist() == [True, False]
    assert t["iscrowd"].tolist() == [False, True] and t["boxes"].tolist() == [[1, 0, 2, 1], [0, 1, 2, 2]]
    with pytest.raises(DatasetError, match="not in the JSON"):
        targets_from_panoptic(pan, infos[:1], {1: 0, 2: 1}, num_things=1)
    with pytest.raises(DatasetError, match="category_id 2"):
        targets_from_panoptic(pan, infos, {1: 0}, num_things=1)
    empty = targets_from_panoptic(np.zeros((3, 4), np.int32), [], {1: 0}, num_things=1)
    assert empty["masks"].shape == (0, 3, 4) and empty["boxes"].shape == (0, 4)


def _copy_sample(tmp_path, edit):
    root = tmp_path / "sample"
    shutil.copytree(SAMPLE, root)
    path = root / "panoptic_examples.json"
    doc = json.loads(path.read_text())
    edit(doc, root)
    path.write_text(json.dumps(doc))
    return root


def test_dataset_errors_are_one_line(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        CocoPanopticDataset(SAMPLE + "/images", SAMPLE + "/panoptic", str(tmp_path / "nope.json"))
    with pytest.raises(DatasetError, match="directory not found"):
        CocoPanopticDataset(str(tmp_path / "x"), SAMPLE + "/panoptic", SAMPLE + "/panoptic_examples.json")

    def drop_segment(doc, root):
        doc["annotations"][0]["segments_info"].pop(0)
    root = _copy_sample(tmp_path / "a", drop_segment)
    with pytest.raises(DatasetError, match="in the PNG but not in the JSON") as e:
        _dataset(root=str(root))[0]
    assert "\n" not in str(e.value)
    _dataset(root=str(root))[1]  # the other image is fine

    def extra_segment(doc, root):
        doc["annotations"][1]["segments_info"].append({"id": 77, "category_id": 1, "iscrowd": 0, "area": 5,
                                                       "bbox": [0, 0, 1, 1]})
    img, t = _dataset(root=str(_copy_sample(tmp_path / "e", extra_segment)))[1]
    assert len(t["labels"]) == 32  # the pixel-less JSON segment is dropped

    def remove_image(doc, root):
        os.remove(root / "images" / "000000439180.jpg")
    root = _copy_sample(tmp_path / "b", remove_image)
    with pytest.raises(DatasetError, match="image not found"):
        _dataset(root=str(root))[1]

    def unknown_category(doc, root):
        doc["annotations"][0]["segments_info"][0]["category_id"] = 999
    with pytest.raises(DatasetError, match="category_id 999"):
        _dataset(root=str(_copy_sample(tmp_path / "c", unknown_category)))

    def bad_image_id(doc, root):
        doc["annotations"][1]["image_id"] = 1
    with pytest.raises(DatasetError, match="image_id 1"):
        _dataset(root=str(_copy_sample(tmp_path / "d", bad_image_id)))

    with pytest.raises(DatasetError, match="isthing"):
        categories_from_json([{"id": 1, "name": "x"}])
