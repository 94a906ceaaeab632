"""Tests of ciae_core.fusion_coarse: the first-argmax rule and torch's bilinear taps, the building
blocks of the coarse-to-fine fusion (its equality with the dense path is tested in test_fusion.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ciae_core.fusion_coarse import bilinear_taps, first_argmax


@pytest.mark.parametrize("k", [1, 7, 83, 300])
def test_first_argmax_equals_torch_max_with_ties(k):
    g = torch.Generator().manual_seed(k)
    sim = torch.randint(-3, 4, (2, k, 9, 11), generator=g).float() / 4  # many exact ties
    values, index = first_argmax(sim, 1)
    ref_values, ref_index = sim.max(dim=1)
    assert torch.equal(values, ref_values) and torch.equal(index, ref_index)
    assert torch.equal(first_argmax(sim.transpose(1, 3), 3)[1], ref_index.transpose(1, 2))


def test_bilinear_taps_reproduce_torch_interpolate():
    src = torch.randn(1, 3, 7, 9)
    for size in ((29, 35), (28, 36)):  # an odd ratio and the exact stride 4
        out = F.interpolate(src, size=size, mode="bilinear", align_corners=False)
        (y0, y1, ly0, ly1), (x0, x1, lx0, lx1) = bilinear_taps(size[0], 7), bilinear_taps(size[1], 9)
        cols = src[..., x0] * lx0 + src[..., x1] * lx1
        mine = cols[..., y0, :] * ly0[:, None] + cols[..., y1, :] * ly1[:, None]
        torch.testing.assert_close(mine, out, rtol=0, atol=1e-6)
