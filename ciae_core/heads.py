"""The heads of CIAE on top of the FPN (paper §IV-A, Fig. 3) and their building blocks.

:class:`ProposalHead` is the FCOS head over P3..P7 with the extra box-embedding output;
:class:`EmbeddingBranch` aggregates P2..P5 (Panoptic-FPN style, CoordConv on P5) and the box
embeddings into the pixel embedding ``P' + P''`` that Eq. 1 normalises. The blocks they share:
:func:`group_norm`, :class:`Scale`, :func:`add_coords` (CoordConv) and :class:`ConvGNReLU`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------------
# building blocks


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``max_groups`` that divides ``channels``.

    Groups keep at least 2 channels, so a 1x1 map (P7 of a small image) still normalises over
    more than one value.
    """
    g = math.gcd(channels, min(max_groups, max(1, channels // 2)))
    return nn.GroupNorm(g, channels)


class Scale(nn.Module):
    """Learnable scalar (FCOS per-level regression scale)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale

def add_coords(x: Tensor) -> Tensor:
    """CoordConv input: append normalised x and y coordinate channels in [-1, 1] (paper ref. [48]).

    x: ``(N, C, H, W)`` → ``(N, C + 2, H, W)``. Built with ``arange`` so it traces to ONNX.
    """
    n, _, h, w = x.shape
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w * 2 - 1
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h * 2 - 1
    gx = xs.view(1, 1, 1, w).expand(n, 1, h, w)
    gy = ys.view(1, 1, h, 1).expand(n, 1, h, w)
    return torch.cat([x, gx, gy], dim=1)


class ConvGNReLU(nn.Module):
    """3x3 conv (optionally CoordConv) → GroupNorm → ReLU."""

    def __init__(self, in_ch: int, out_ch: int, coord: bool = False):
        super().__init__()
        self.coord = coord
        self.conv = nn.Conv2d(in_ch + (2 if coord else 0), out_ch, 3, padding=1, bias=False)
        self.norm = group_norm(out_ch)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        if self.coord:
            x = add_coords(x)
        return F.relu(self.norm(self.conv(x)))


# ----------------------------------------------------------------------------------------------
# heads


class ProposalHead(nn.Module):
    """Shared FCOS head over P3..P7 with the CIAE box-embedding output (§IV-A, Fig. 3).

    Classification tower → box classification (T logits). Regression tower → centerness (1),
    box regression (4: l, t, r, b) and the box embedding (D channels, not supervised directly).
    Box regression decodes as ``stride * exp(scale_l * x)`` (original FCOS, per-level learnable
    scale; exp keeps every location's gradient alive, unlike a ReLU).

    forward(features: list of ``(N, C, h_l, w_l)``) → four lists (per level) of
    ``(N, T, h, w)``, ``(N, 4, h, w)`` distances in input pixels, ``(N, 1, h, w)``, ``(N, D, h, w)``.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, embed_dim: int, strides, tower_depth: int = 4,
                 prior_prob: float = 0.01):
        super().__init__()
        self.strides = tuple(strides)

        def tower():
            layers: list[nn.Module] = []
            c = in_channels
            for _ in range(tower_depth):
                layers += [nn.Conv2d(c, channels, 3, padding=1), group_norm(channels), nn.ReLU()]
                c = channels
            return nn.Sequential(*layers), c

        self.cls_tower, c_cls = tower()
        self.reg_tower, c_reg = tower()
        self.cls_logits = nn.Conv2d(c_cls, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(c_reg, 4, 3, padding=1)
        self.centerness = nn.Conv2d(c_reg, 1, 3, padding=1)
        self.box_embedding = nn.Conv2d(c_reg, embed_dim, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]):
        cls, reg, ctr, emb = [], [], [], []
        for i, x in enumerate(features):
            c = self.cls_tower(x)
            r = self.reg_tower(x)
            cls.append(self.cls_logits(c))
            reg.append(torch.exp(self.scales[i](self.bbox_pred(r)).clamp(max=12.0)) * self.strides[i])
            ctr.append(self.centerness(r))
            emb.append(self.box_embedding(r))
        return cls, reg, ctr, emb


class EmbeddingBranch(nn.Module):
    """Pixel-embedding branch (§IV-A): Panoptic-FPN aggregation of P2..P5 → P', box embeddings → P''.

    P_l (stride 2^l) passes through max(1, l-2) blocks of 3x3 conv + GN + ReLU, each but P2's
    followed by 2x bilinear up-sampling, so all four reach stride 4; they are summed and a 1x1
    conv predicts P' (D channels). The P5 path uses CoordConv (``use_coordconv``). P'' is a 3x3
    conv over the sum of the box embeddings of P3..P7 bilinearly up-sampled to stride 4
    (``use_box_embedding``; off → P = f(P'), Table VI).

    forward(p2..p5, box_embeddings) → pre-normalisation embedding ``P' + P''`` ``(N, D, H/4, W/4)``.
    With ``num_levels=3`` the same construction over P3..P5 gives ``(N, D, H/8, W/8)``; with
    ``c2_channels`` as well (``CIAEConfig.embedding_c2_skip``) that stride-8 sum is up-sampled 2x
    and added to ``relu(GN(conv1x1(C2)))`` (forward's ``c2``) before the predictor: stride 4.
    """

    def __init__(self, in_channels: int, channels: int, embed_dim: int, use_coordconv: bool = True,
                 use_box_embedding: bool = True, num_levels: int = 4, c2_channels: int | None = None):
        super().__init__()
        self.c2_skip = None
        if c2_channels:
            self.c2_skip = nn.Sequential(nn.Conv2d(c2_channels, channels, 1, bias=False), group_norm(channels),
                                         nn.ReLU())
            nn.init.kaiming_normal_(self.c2_skip[0].weight, mode="fan_out", nonlinearity="relu")
        self.use_box_embedding = use_box_embedding
        self.scale_heads = nn.ModuleList()
        for level in range(num_levels):  # P2..P5 (or P3..P5)
            n_blocks = max(1, level)
            blocks = []
            for b in range(n_blocks):
                blocks.append(ConvGNReLU(in_channels if b == 0 else channels, channels,
                                         coord=use_coordconv and level == num_levels - 1))
            self.scale_heads.append(nn.ModuleList(blocks))
        self.predictor = nn.Conv2d(channels, embed_dim, 1)
        nn.init.kaiming_normal_(self.predictor.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.predictor.bias)
        if use_box_embedding:
            self.box_fuse = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
            nn.init.normal_(self.box_fuse.weight, std=0.01)
            nn.init.zeros_(self.box_fuse.bias)

    def forward(self, pyramid: list[Tensor], box_embeddings: list[Tensor], c2: Tensor | None = None) -> Tensor:
        size = pyramid[0].shape[-2:]
        out = None
        for level, (x, blocks) in enumerate(zip(pyramid, self.scale_heads)):
            for b, block in enumerate(blocks):
                x = block(x)
                if level > 0:
                    # 2x up-sampling, written as "to the size of the next finer level" (identical for
                    # inputs padded to 32; keeps torch.export free of shape equations)
                    x = F.interpolate(x, size=pyramid[level - b - 1].shape[-2:], mode="bilinear", align_corners=False)
            out = x if out is None else out + x
        if self.c2_skip is not None:
            size = c2.shape[-2:]
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False) + self.c2_skip(c2)
        p1 = self.predictor(out)  # P'
        if not self.use_box_embedding:
            return p1
        acc = None
        for e in box_embeddings:
            e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            acc = e if acc is None else acc + e
        return p1 + self.box_fuse(acc)  # P' + P''
