"""CIAE network (paper §IV-A, Fig. 3): backbone + FPN, FCOS-style proposal head, embedding branch.

``CIAE`` extends the one-stage detector FCOS with a pixel-embedding branch that predicts a
category- and instance-aware pixel embedding (CIAE). Panoptic segmentation is obtained by comparing
every pixel embedding with query embeddings (stuff memory embeddings and one query per detected
instance), see :mod:`ciae_core.fusion`.

Layout (stride = input pixels per feature pixel)::

    images (N,3,H,W) 0..255 RGB ─ normalise (ImageNet mean/std) ─ pad to 32
      backbone C2..C5 ─ FPN P2..P5 (+P6, P7 from P5 as in FCOS)
      P3..P7 ─ ProposalHead ─ cls_logits (T), box_regression (ltrb), centerness, box embedding (D)
      P2..P5 ─ EmbeddingBranch (Panoptic-FPN upsample-and-sum, CoordConv on P5) ─ conv ─ P'
      box embeddings of P3..P7 ─ upsample to stride 4, sum ─ conv ─ P''
      P = L2norm(up4(P' + P''))    (Eq. 1)

The backbone lives in :mod:`ciae_core.backbone`, the proposal head and the embedding branch in
:mod:`ciae_core.heads`; this module holds the configuration, the loading of local backbone
weights and the assembled network.

Configuration is by constructor arguments; ``CIAEConfig`` records all of them (plus the category
list) so a checkpoint can rebuild the model (:mod:`ciae_core.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ciae_core.backbone import BACKBONES, BackboneFPN, fold_frozen_batchnorm  # noqa: F401 - re-exported
from ciae_core.heads import EmbeddingBranch, ProposalHead
from ciae_core.structures import CategoryInfo
from ciae_core.user_input import quote

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255
IMAGENET_STD = (58.395, 57.12, 57.375)


class ModelConfigError(ValueError):
    """Invalid model configuration (one-line message)."""


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass
class CIAEConfig:
    """Everything needed to rebuild a :class:`CIAE` (saved in checkpoints as JSON).

    categories: training order, all thing classes first (training ids ``0..T-1``), then stuff.
    Architecture: ``backbone`` (one of ``BACKBONES``), ``backbone_norm`` ("frozen_bn" for
    ImageNet-initialised backbones as in the paper, "gn"/"bn" when training from scratch),
    ``trainable_backbone_layers`` (0..5, torchvision convention; 3 = layer2..layer4 train),
    ``dcn_stages`` (ResNet stages 2..5 whose 3x3 convs become deformable, paper's R101-DCN row
    uses (3, 4, 5)), ``fpn_channels``, ``head_channels``/``tower_depth`` of the proposal head,
    ``embed_dim`` D (paper 32), ``embed_branch_channels`` (Panoptic FPN: 128),
    ``use_coordconv``/``use_box_embedding`` (Table VI ablation switches), ``embedding_stride``
    (inference only; training always normalises the up-sampled map. 1: the paper's
    P = L2norm(up4(P'+P'')), Eq. 1 — ``forward_raw`` returns P'+P'' at stride 4 and the fusion
    up-samples before normalising; 4: L2norm(P'+P'') at stride 4, the fusion up-samples the
    similarities. Both fuse coarse-to-fine at about the same cost; on the shipped synthetic
    model 1 scores PQ 83.8 and 4 scores 81.8 on 100 held-out scenes at 320.)
    ``embedding_from_level``: 2 = the embedding branch aggregates P2..P5 at stride 4 (paper);
    3 = P3..P5 at stride 8 and the FPN has no P2 (our speed variant, not in the paper: it drops
    FPN's stride-4 output conv and the branch's stride-4 blocks: R50 at 800x1088 needs 1.04x
    instead of 1.36x the multiply-adds of FCOS; the fusion up-samples by 8). "Stride 4" in the
    ``embedding_stride`` text then reads "the branch's stride".
    ``embedding_c2_skip`` (with ``embedding_from_level: 3``; our variant, not in the paper): the
    stride-8 aggregate is up-sampled 2x and added to a 1x1 conv + GN + ReLU projection of the
    backbone's stride-4 stage C2 before the predictor, so P' + P'' is at stride 4 again — a
    low-level detail path in the manner of DeepLabv3+'s decoder, instead of FPN's P2 output conv
    (3x3, 256->256) and the branch's 3x3 block at stride 4 (R50 at 800x1088: 1.06x the
    multiply-adds of FCOS).
    Loss and target arguments are forwarded to :class:`ciae_core.losses.CIAECriterion`; the
    inference thresholds are the defaults of :meth:`CIAE.postprocess`.
    """

    categories: list[CategoryInfo]
    backbone: str = "resnet50"
    backbone_norm: str = "frozen_bn"
    trainable_backbone_layers: int = 3
    dcn_stages: tuple[int, ...] = ()
    fpn_channels: int = 256
    head_channels: int = 256
    tower_depth: int = 4
    embed_dim: int = 32
    embed_branch_channels: int = 128
    use_coordconv: bool = True
    use_box_embedding: bool = True
    embedding_stride: int = 1
    embedding_from_level: int = 2
    embedding_c2_skip: bool = False
    fpn_strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    # targets and losses (ciae_core.losses.CIAECriterion)
    sizes_of_interest: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)
    center_sampling_radius: float = 0.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    iou_loss: str = "giou"
    margin: float = 0.15
    top_k: int = 5
    iae_weight: float = 2.0
    thing_pixel_weight: float = 5.0
    box_expand: float = 1.5
    merge_things_in_cae: bool = True
    include_positive_term: bool = True
    loss_pixel_samples: int = 16384
    memory_momentum_scale: float = 1e-4
    # inference (CIAE.postprocess / ciae_core.fusion)
    score_threshold: float = 0.05
    pre_nms_topk: int = 1000
    nms_threshold: float = 0.6
    detections_per_img: int = 100
    instance_score_threshold: float = 0.3
    min_stuff_area: int = 4096
    stuff_area_reference: int = 640 * 480
    min_visible_fraction: float = 0.2
    min_instance_area: int = 16
    outside_box_value: float = 0.0

    def __post_init__(self):
        self.categories = [c if isinstance(c, CategoryInfo) else CategoryInfo.from_dict(c) for c in self.categories]
        for name in ("dcn_stages", "fpn_strides", "pixel_mean", "pixel_std", "sizes_of_interest"):
            setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    @property
    def branch_stride(self) -> int:
        """Stride of the embedding branch's output P' + P'' (4 from P2 or with the C2 skip, 8 from P3)."""
        return 4 if self.embedding_c2_skip else 2 ** self.embedding_from_level

    @property
    def num_things(self) -> int:
        return sum(1 for c in self.categories if c.isthing)

    @property
    def num_stuff(self) -> int:
        return len(self.categories) - self.num_things

    def validate(self) -> None:
        if not self.categories:
            raise ModelConfigError("CIAEConfig.categories is empty; give at least one thing class")
        flags = [c.isthing for c in self.categories]
        if flags != sorted(flags, reverse=True):
            raise ModelConfigError("CIAEConfig.categories must list all thing classes first, then stuff")
        if self.num_things == 0:
            raise ModelConfigError("CIAEConfig.categories has no thing class; the detector needs at least one")
        if len({c.id for c in self.categories}) != len(self.categories):
            raise ModelConfigError("CIAEConfig.categories has duplicate category ids")
        if self.backbone not in BACKBONES:
            raise ModelConfigError(f"unknown backbone {quote(self.backbone)}; choose one of {', '.join(BACKBONES)}")
        if self.backbone_norm not in ("frozen_bn", "gn", "bn"):
            raise ModelConfigError(f"backbone_norm must be 'frozen_bn', 'gn' or 'bn', got {quote(self.backbone_norm)}")
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise ModelConfigError("trainable_backbone_layers must be in 0..5")
        if any(s not in (2, 3, 4, 5) for s in self.dcn_stages):
            raise ModelConfigError(f"dcn_stages must be ResNet stages in 2..5, got {self.dcn_stages}")
        if self.dcn_stages and not self.backbone.startswith("resnet"):
            raise ModelConfigError("dcn_stages needs a ResNet backbone")
        if len(self.fpn_strides) != 5 or len(self.sizes_of_interest) != 4:
            raise ModelConfigError("fpn_strides needs 5 entries (P3..P7) and sizes_of_interest 4 boundaries")
        if tuple(self.fpn_strides) != (8, 16, 32, 64, 128):
            raise ModelConfigError(f"fpn_strides must be (8, 16, 32, 64, 128), the strides P3..P7 have in this network, "
                                   f"got {tuple(self.fpn_strides)}")
        if list(self.sizes_of_interest) != sorted(self.sizes_of_interest) or min(self.sizes_of_interest) <= 0:
            raise ModelConfigError(f"sizes_of_interest must be positive and increasing, got {self.sizes_of_interest}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ModelConfigError(f"pixel_mean and pixel_std need 3 values (RGB) and pixel_std > 0, got "
                                   f"{self.pixel_mean} / {self.pixel_std}")
        if self.embedding_stride not in (1, 4):
            raise ModelConfigError(f"embedding_stride must be 1 or 4, got {self.embedding_stride}")
        if self.embedding_from_level not in (2, 3):
            raise ModelConfigError(f"embedding_from_level must be 2 (P2..P5, the paper) or 3 (P3..P5), got "
                                   f"{self.embedding_from_level}")
        if self.embedding_c2_skip and self.embedding_from_level != 3:
            raise ModelConfigError("embedding_c2_skip needs embedding_from_level: 3 (with P2 the branch is at stride 4 "
                                   "already)")
        if self.embed_dim < 2 or self.tower_depth < 0 or self.fpn_channels < 8:
            raise ModelConfigError("embed_dim >= 2, tower_depth >= 0 and fpn_channels >= 8 are required")
        if self.iou_loss not in ("iou", "giou"):
            raise ModelConfigError(f"iou_loss must be 'iou' or 'giou', got {quote(self.iou_loss)}")

    def to_dict(self) -> dict[str, Any]:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "categories":
                v = [c.to_dict() for c in v]
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CIAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ModelConfigError(f"unknown CIAEConfig field(s): {', '.join(unknown)}")
        if "categories" not in d:
            raise ModelConfigError("CIAEConfig needs 'categories'")
        kw = dict(d)
        kw["categories"] = [CategoryInfo.from_dict(c) if isinstance(c, dict) else c for c in d["categories"]]
        if kw.get("sizes_of_interest") is not None:
            kw["sizes_of_interest"] = tuple(float(v) for v in kw["sizes_of_interest"])
        return cls(**kw)


# ----------------------------------------------------------------------------------------------
# backbone weights


def load_backbone_weights(backbone: BackboneFPN, path: str) -> None:
    """Load ImageNet (torchvision layout) backbone weights from a LOCAL file into ``backbone.body``.

    Accepts ``.safetensors`` or a torchvision ``.pth`` read tensors-only
    (:func:`ciae_core.backbone_weights.read_backbone_state`: ``torch.load(weights_only=True)``,
    a refused file is one line). Classifier keys (``fc.*``, ``classifier.*``) are ignored;
    deformable offset convs keep their zero init. Raises :class:`ModelConfigError` on an
    unreadable file or mismatching keys/shapes.
    """
    from ciae_core.backbone_weights import BackboneWeightsError, read_backbone_state

    try:
        state = read_backbone_state(path)
    except BackboneWeightsError as e:
        raise ModelConfigError(str(e)) from None
    own = backbone.body.state_dict()
    mapped = {}
    for k, v in state.items():
        k2 = k[len("features."):] if (k.startswith("features.") and k not in own) else k
        if k2.startswith(("fc.", "classifier.")):
            continue
        mapped[k2] = v
    bad = [k for k, v in mapped.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in mapped if k not in own]
    missing = [k for k in own if k not in mapped and ".offset." not in k and not k.endswith("num_batches_tracked")]
    if bad or unexpected or missing:
        raise ModelConfigError(
            f"backbone weights {path} do not fit {backbone.name}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(bad)} shape-mismatched keys (e.g. {(missing + unexpected + bad)[:3]})")
    backbone.body.load_state_dict(mapped, strict=False)
    logger.info("loaded %d backbone tensors from %s", len(mapped), path)

# ----------------------------------------------------------------------------------------------
# the model


def compute_points(sizes: list[tuple[Any, Any]], strides, device, dtype=torch.float32) -> Tensor:
    """FCOS locations ``(A, 2)`` (x, y in input pixels): ``k * stride + stride // 2`` per level."""
    pts = []
    for (h, w), s in zip(sizes, strides):
        xs = torch.arange(w, device=device, dtype=dtype) * s + s // 2
        ys = torch.arange(h, device=device, dtype=dtype) * s + s // 2
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return torch.cat(pts, dim=0)


class CIAE(nn.Module):
    """Category- and instance-aware pixel embedding network for panoptic segmentation.

    Construct with the :class:`CIAEConfig` fields as keyword arguments, or
    ``CIAE.from_config(cfg)``. ``backbone_weights``: optional LOCAL path to ImageNet weights in
    torchvision layout (not recorded in the config; checkpoints carry all weights).

    Buffers: ``memory (T+S, D)`` category-aware memory embeddings (§III-C), unit rows, random
    normal init, updated in training forward by Eq. 13–14 (see :meth:`set_schedule`).

    ``forward(images, targets=None, image_sizes=None)``: in training mode returns the loss dict
    of Eq. 15 (``loss_cls``, ``loss_ctr``, ``loss_reg``, ``loss_cae``, ``loss_iae``; ``loss_iae``
    already carries alpha of Eq. 12, so the total loss is the plain sum); in eval mode returns
    :meth:`inference`.
    """

    size_divisibility = 32

    def __init__(self, categories, backbone_weights: str | None = None, **kwargs):
        super().__init__()
        cfg = CIAEConfig(categories=list(categories), **kwargs)
        self._config = cfg
        self.num_things = cfg.num_things
        self.num_stuff = cfg.num_stuff
        self.embed_dim = cfg.embed_dim
        self.embedding_stride = cfg.embedding_stride
        self.strides = cfg.fpn_strides
        self.branch_stride = cfg.branch_stride
        self.backbone = BackboneFPN(cfg.backbone, cfg.backbone_norm, cfg.trainable_backbone_layers, cfg.dcn_stages,
                                    cfg.fpn_channels, cfg.embedding_from_level, return_c2=cfg.embedding_c2_skip)
        if backbone_weights:
            load_backbone_weights(self.backbone, backbone_weights)
        self.head = ProposalHead(cfg.fpn_channels, cfg.head_channels, cfg.num_things, cfg.embed_dim, cfg.fpn_strides,
                                 cfg.tower_depth)
        self.embedding_branch = EmbeddingBranch(cfg.fpn_channels, cfg.embed_branch_channels, cfg.embed_dim,
                                                cfg.use_coordconv, cfg.use_box_embedding,
                                                num_levels=6 - cfg.embedding_from_level,
                                                c2_channels=(self.backbone.c2_channels if cfg.embedding_c2_skip
                                                             else None))
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)
        from ciae_core.losses import CIAECriterion, init_memory_embeddings

        self.register_buffer("memory", init_memory_embeddings(cfg.num_things, cfg.num_stuff, cfg.embed_dim,
                                                              cfg.merge_things_in_cae))
        self.criterion = CIAECriterion(
            num_things=cfg.num_things, num_stuff=cfg.num_stuff, strides=cfg.fpn_strides,
            sizes_of_interest=cfg.sizes_of_interest, center_sampling_radius=cfg.center_sampling_radius,
            focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma, iou_loss=cfg.iou_loss, margin=cfg.margin,
            top_k=cfg.top_k, iae_weight=cfg.iae_weight, thing_pixel_weight=cfg.thing_pixel_weight,
            box_expand=cfg.box_expand, merge_things_in_cae=cfg.merge_things_in_cae,
            include_positive_term=cfg.include_positive_term, pixel_samples=cfg.loss_pixel_samples,
            memory_momentum_scale=cfg.memory_momentum_scale)

    # -- configuration -----------------------------------------------------------------------
    @property
    def config(self) -> CIAEConfig:
        return dataclasses.replace(self._config)

    @property
    def categories(self) -> list[CategoryInfo]:
        return list(self._config.categories)

    @classmethod
    def from_config(cls, cfg: CIAEConfig, backbone_weights: str | None = None) -> "CIAE":
        d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        return cls(backbone_weights=backbone_weights, **d)

    def set_schedule(self, iteration: int, total_iterations: int) -> None:
        """Tell the memory update (Eq. 13) the current iteration t and the total T (call each step)."""
        self.criterion.set_schedule(iteration, total_iterations)

    # -- network -------------------------------------------------------------------------------
    def _pad(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        d = self.size_divisibility
        return F.pad(images, (0, (d - w % d) % d, 0, (d - h % d) % d))

    def _forward_features(self, images: Tensor) -> dict[str, Any]:
        """Run the network; returns per-level head outputs and the stride-4 pre-norm embedding."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ModelConfigError(f"CIAE expects images (N, 3, H, W), got shape {tuple(images.shape)}")
        x = (images.float() - self.pixel_mean) / self.pixel_std
        x = self._pad(x)
        feats = self.backbone(x)
        levels = [feats[k] for k in ("p3", "p4", "p5", "p6", "p7")]
        cls, reg, ctr, box_emb = self.head(levels)
        pre = self.embedding_branch([feats[f"p{lvl}"] for lvl in range(self._config.embedding_from_level, 6)], box_emb,
                                    feats.get("c2"))
        return {"cls": cls, "reg": reg, "ctr": ctr, "pre": pre, "padded_size": x.shape[-2:]}

    @staticmethod
    def _flatten(levels: list[Tensor]) -> Tensor:
        """list of ``(N, C, h, w)`` → ``(N, sum h*w, C)``."""
        n, c = levels[0].shape[:2]
        return torch.cat([t.permute(0, 2, 3, 1).reshape(n, -1, c) for t in levels], dim=1)

    def _upsampled_embedding(self, pre: Tensor, size) -> Tensor:
        """Bilinear up-sampling of the branch's map (4x, or 8x from P3), cropped to ``size`` (before Eq. 1)."""
        up = F.interpolate(pre, scale_factor=float(self.branch_stride), mode="bilinear", align_corners=False)
        return up[:, :, : size[0], : size[1]]

    def forward_raw(self, images: Tensor) -> dict[str, Tensor]:
        """Export boundary: raw network outputs, no data-dependent control flow.

        images: ``(N, 3, H, W)`` float RGB 0..255 (any H, W; padded to 32 inside).
        Returns ``cls_logits (N, A, T)``, ``box_regression (N, A, 4)`` ltrb in input pixels,
        ``centerness (N, A)`` logits, ``points (A, 2)`` xy in input pixels, ``embedding`` at
        the branch's stride s (4; 8 with ``embedding_from_level == 3`` without the C2 skip) and
        ``memory (T+S, D)``.
        The embedding is ``(N, D, Hp/s, Wp/s)`` of the padded input = ``P' + P''`` un-normalised
        when ``embedding_stride == 1`` (the paper's ``P = L2norm(up(P' + P''))`` of Eq. 1 is
        formed by the fusion, which up-samples before normalising, see
        :func:`ciae_core.fusion.fuse_panoptic`; exporting the low-res map keeps the network's
        output 16x smaller), or ``(N, D, ceil(H/s), ceil(W/s))`` = ``L2norm(P' + P'')`` when
        ``embedding_stride == 4`` (normalised before up-sampling).
        """
        out = self._forward_features(images)
        sizes = [t.shape[-2:] for t in out["cls"]]
        points = compute_points(sizes, self.strides, images.device)
        pre = out["pre"]
        if self.embedding_stride == 1:
            emb = pre
        else:
            h, w = images.shape[-2:]
            s = self.branch_stride
            emb = F.normalize(pre[:, :, : (h + s - 1) // s, : (w + s - 1) // s], dim=1)
        return {
            "cls_logits": self._flatten(out["cls"]),
            "box_regression": self._flatten(out["reg"]),
            "centerness": self._flatten(out["ctr"]).squeeze(-1),
            "points": points,
            "embedding": emb,
            "memory": self.memory.clone(),
        }

    # -- training / inference ------------------------------------------------------------------
    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None,
                image_sizes: list[tuple[int, int]] | None = None):
        if not self.training:
            if image_sizes is None:
                image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
            return self.inference(images, image_sizes)
        if targets is None:
            raise ModelConfigError("CIAE in training mode needs targets; call model.eval() for inference")
        if len(targets) != images.shape[0]:
            raise ModelConfigError(f"got {images.shape[0]} images but {len(targets)} target dicts")
        out = self._forward_features(images)
        sizes = [t.shape[-2:] for t in out["cls"]]
        points = compute_points(sizes, self.strides, images.device)
        pre_full = self._upsampled_embedding(out["pre"], images.shape[-2:])
        losses, class_sums = self.criterion(
            cls_logits=self._flatten(out["cls"]), box_regression=self._flatten(out["reg"]),
            centerness=self._flatten(out["ctr"]).squeeze(-1), points=points,
            level_sizes=[int(h) * int(w) for h, w in sizes], embedding_pre=pre_full,
            memory=self.memory, targets=targets, image_sizes=image_sizes)
        self.criterion.update_memory(self.memory, class_sums)
        return losses

    @torch.no_grad()
    def postprocess(self, raw: dict[str, Tensor], image_sizes: list[tuple[int, int]], **thresholds) -> list[dict[str, Tensor]]:
        """Proposals + fusion (§IV-C, Eq. 16) on the outputs of :meth:`forward_raw`.

        Thresholds default to the config values; accepted keywords: ``score_threshold``,
        ``pre_nms_topk``, ``nms_threshold``, ``detections_per_img``, ``instance_score_threshold``,
        ``min_stuff_area``, ``stuff_area_reference``, ``min_visible_fraction``,
        ``min_instance_area``, ``outside_box_value``, ``return_confidence``.
        Returns one dict per image, see :func:`ciae_core.fusion.panoptic_from_raw`.
        """
        from ciae_core.fusion import panoptic_from_raw

        cfg = self._config
        kw = dict(score_threshold=cfg.score_threshold, pre_nms_topk=cfg.pre_nms_topk,
                  nms_threshold=cfg.nms_threshold, detections_per_img=cfg.detections_per_img,
                  instance_score_threshold=cfg.instance_score_threshold, min_stuff_area=cfg.min_stuff_area,
                  stuff_area_reference=cfg.stuff_area_reference, min_visible_fraction=cfg.min_visible_fraction,
                  min_instance_area=cfg.min_instance_area, outside_box_value=cfg.outside_box_value,
                  return_confidence=False)
        unknown = set(thresholds) - set(kw)
        if unknown:
            raise ModelConfigError(f"unknown postprocess argument(s): {', '.join(sorted(unknown))}")
        kw.update(thresholds)
        return panoptic_from_raw(raw, image_sizes, num_things=self.num_things, embedding_stride=self.branch_stride,
                                 normalize_after_upsampling=self.embedding_stride == 1,
                                 **kw)

    @torch.no_grad()
    def inference(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None, **thresholds):
        """``postprocess(forward_raw(images), image_sizes)``."""
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        return self.postprocess(self.forward_raw(images), image_sizes, **thresholds)
