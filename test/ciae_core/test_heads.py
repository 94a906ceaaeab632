"""Tests of ciae_core.heads: the ablation switches (CoordConv, box embedding, D) shape the heads."""

from __future__ import annotations

import torch

from ciae_core.model import CIAE
from ciae_core.structures import CategoryInfo

CATS = [CategoryInfo(1, "person", True), CategoryInfo(3, "car", True), CategoryInfo(5, "bus", True),
        CategoryInfo(100, "road", False), CategoryInfo(101, "sky", False)]
SMALL = dict(backbone="resnet18", fpn_channels=32, head_channels=32, tower_depth=2, embed_branch_channels=16,
             embed_dim=8)


def small(**kw):
    torch.manual_seed(0)
    return CIAE(CATS, **{**SMALL, **kw})


def test_ablation_switches_change_the_network():
    base = small()
    no_coord = small(use_coordconv=False)
    no_box = small(use_box_embedding=False)
    first_p5 = base.embedding_branch.scale_heads[3][0].conv
    assert first_p5.in_channels == 32 + 2
    assert no_coord.embedding_branch.scale_heads[3][0].conv.in_channels == 32
    assert base.embedding_branch.scale_heads[2][0].conv.in_channels == 32  # CoordConv only on P5
    assert not hasattr(no_box.embedding_branch, "box_fuse")
    for dim in (8, 16, 32, 64):
        m = small(embed_dim=dim).eval()
        with torch.no_grad():
            assert m.forward_raw(torch.rand(1, 3, 64, 64) * 255)["embedding"].shape[1] == dim
        assert m.memory.shape == (5, dim) and m.head.box_embedding.out_channels == dim
