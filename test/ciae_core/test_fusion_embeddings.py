"""Per-segment mean embeddings (Eq. E1): against a straightforward numpy mean, for every fusion
method on the shipped model, through the Predictor (rows follow segments), and on CUDA."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from ciae_core import fusion_kernels
from ciae_core.fusion import panoptic_from_raw
from ciae_core.fusion_embeddings import segment_mean_embeddings
from ciae_core.predictor import Predictor
from ciae_core.synth_video import TrackingSequence

REPO = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "models").glob("*.safetensors"))


def numpy_mean_embedding(embedding: np.ndarray, id_map: np.ndarray, seg_id: int, stride: int,
                         box=None) -> np.ndarray:
    """Eq. E1 written out: unit cells whose centre pixel belongs to the segment, averaged, normalised."""
    d, h, w = embedding.shape
    rows = []
    for r in range(h):
        for c in range(w):
            y, x = stride * r + stride // 2, stride * c + stride // 2
            if y < id_map.shape[0] and x < id_map.shape[1] and id_map[y, x] == seg_id:
                rows.append(embedding[:, r, c] / np.linalg.norm(embedding[:, r, c]))
    if not rows:  # no cell centre: the cell under the box centre
        x0, y0, x1, y1 = box
        r = min(int(((y0 + y1) / 2) // stride), h - 1)
        c = min(int(((x0 + x1) / 2) // stride), w - 1)
        rows = [embedding[:, r, c] / np.linalg.norm(embedding[:, r, c])]
    m = np.mean(rows, axis=0)
    return m / np.linalg.norm(m)


def test_eq_e1_against_numpy():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 8, 6, 7, generator=g)
    ids = torch.zeros(2, 26, 30, dtype=torch.int32)  # larger than 6x4 by 7x4: padding is ignored
    ids[0, :12, :] = 1
    ids[0, 12:, :] = 2
    ids[0, 5:7, 9:11] = 3  # no cell centre (centres at 2, 6, 10, ... along both axes): 2x2 px at rows 5-6
    ids[1, :, :14] = 2
    ids[1, :, 14:] = 1
    segment_ids = torch.tensor([[1, 2, 3, 0], [2, 1, 0, 0]], dtype=torch.int32)  # slot -> id (0 unused)
    boxes = torch.zeros(2, 4, 4)
    boxes[0, 2] = torch.tensor([9.0, 5.0, 11.0, 7.0])
    out = segment_mean_embeddings(emb, ids, segment_ids, boxes, embedding_stride=4)
    assert out.shape == (2, 4, 8) and out.dtype == torch.float32
    for n in range(2):
        for k in range(4):
            sid = int(segment_ids[n, k])
            if sid == 0:
                assert torch.count_nonzero(out[n, k]) == 0
                continue
            want = numpy_mean_embedding(emb[n].numpy(), ids[n].numpy(), sid, 4, boxes[n, k].tolist())
            np.testing.assert_allclose(out[n, k].numpy(), want, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than the embedding"):
        segment_mean_embeddings(emb, ids[:, :20], segment_ids, boxes, embedding_stride=4)


@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED:
        pytest.skip("no shipped model in models/")
    return Predictor(SHIPPED[0])


@pytest.fixture(scope="module")
def frame():
    return TrackingSequence(31, 240, 320, 4).frame(3)[0]


def test_every_fusion_method_on_the_shipped_model(shipped, frame):
    batch, boxes = shipped.preprocess([frame])
    raw = shipped.forward_raw(batch)
    methods = ["dense", "coarse_to_fine"] + (["numba"] if fusion_kernels.available() else [])
    stride = shipped.config.branch_stride
    maps = []
    for method in methods:
        with torch.inference_mode():
            (out,) = panoptic_from_raw(raw, [b.resized_size for b in boxes], num_things=shipped.num_things,
                                       embedding_stride=stride,
                                       normalize_after_upsampling=shipped.config.embedding_stride == 1,
                                       fusion_method=method, return_embeddings=True, **shipped.thresholds)
        id_map, emb = out["id_map"].numpy(), raw["embedding"][0].numpy()
        assert out["embeddings"].shape == (len(out["ids"]), emb.shape[0])
        for row, sid, box in zip(out["embeddings"].numpy(), out["ids"].tolist(), out["boxes"].tolist()):
            np.testing.assert_allclose(row, numpy_mean_embedding(emb, id_map, sid, stride, box), atol=1e-5)
        maps.append(id_map)
    assert all(np.array_equal(maps[0], m) for m in maps[1:])
    assert len(out["ids"]) >= 8  # a real scene: stuff and things


def test_predictor_rows_follow_the_segments(shipped, frame):
    plain = shipped(frame)
    result = shipped(frame, return_embeddings=True)
    assert plain.embeddings is None
    assert np.array_equal(plain.id_map, result.id_map) and plain.segments == result.segments
    assert result.embeddings.shape == (len(result.segments), 32) and result.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    batch, boxes = shipped.preprocess([frame])
    (out,) = shipped.postprocess(shipped.forward_raw(batch), boxes, return_embeddings=True)
    by_id = dict(zip(out["ids"].tolist(), out["embeddings"].numpy()))
    for seg, row in zip(result.segments, result.embeddings):
        np.testing.assert_allclose(row, by_id[seg.id], atol=1e-6)
    # a batch of two different images: each keeps its own rows
    other = TrackingSequence(32, 200, 300, 2).frame(1)[0]
    both = shipped([frame, other], return_embeddings=True)
    np.testing.assert_allclose(both[0].embeddings, result.embeddings, atol=1e-5)
    assert both[1].embeddings.shape == (len(both[1].segments), 32)


@pytest.mark.cuda
def test_cuda_embeddings_match_cpu_and_add_no_copy(shipped, frame, monkeypatch):
    gpu = Predictor(SHIPPED[0], device="cuda")
    cpu_result = shipped(frame, return_embeddings=True)
    copies = []
    original = torch.Tensor.copy_

    def counting_copy(self, src, non_blocking=False):
        if self.device.type == "cpu" and src.device.type == "cuda":
            copies.append(tuple(src.shape))
        return original(self, src, non_blocking=non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
    gpu(frame)
    without = len(copies)
    copies.clear()
    result = gpu(frame, return_embeddings=True)
    assert len(copies) == without  # the rows travel with the segment table
    cpu_rows = {s.id: e for s, e in zip(cpu_result.segments, cpu_result.embeddings)}
    matched = [float(e @ cpu_rows[s.id]) for s, e in zip(result.segments, result.embeddings) if s.id in cpu_rows]
    assert len(matched) >= 0.8 * len(result.segments) and np.median(matched) > 0.99
