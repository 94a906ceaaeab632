"""Tests of ciae_core.backbone: ResNet/MobileNet bodies, DCN stages, frozen layers, frozen-BN folding."""

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


def test_mobile_and_dcn_backbones():
    m = small(backbone="mobilenet_v3_large", trainable_backbone_layers=5).eval()
    with torch.no_grad():
        raw = m.forward_raw(torch.rand(1, 3, 64, 96) * 255)
    assert raw["embedding"].shape == (1, 8, 16, 24)
    d = small(dcn_stages=(4, 5)).eval()
    from torchvision.ops import DeformConv2d

    assert isinstance(d.backbone.body.layer3[0].conv2, DeformConv2d)
    assert not isinstance(d.backbone.body.layer2[0].conv2, DeformConv2d)
    with torch.no_grad():
        out_d = d.forward_raw(torch.rand(1, 3, 64, 64) * 255)
    assert out_d["cls_logits"].shape[-1] == 3


def test_frozen_backbone_layers_get_no_gradient():
    m = small()  # frozen_bn, trainable_backbone_layers=3
    assert not m.backbone.body.conv1.weight.requires_grad
    assert not m.backbone.body.layer1[0].conv1.weight.requires_grad
    assert m.backbone.body.layer2[0].conv1.weight.requires_grad
    from torchvision.ops import FrozenBatchNorm2d

    assert isinstance(m.backbone.body.bn1, FrozenBatchNorm2d)


def test_fold_frozen_batchnorm_keeps_outputs():
    """Folding frozen BN into the convolutions (inference) changes the outputs only by rounding."""
    import copy

    from torchvision.ops import FrozenBatchNorm2d

    from ciae_core.backbone import fold_frozen_batchnorm

    torch.manual_seed(0)
    m = CIAE(CATS, backbone="resnet18", fpn_channels=32, head_channels=32, tower_depth=1, embed_dim=8,
             embed_branch_channels=16, dcn_stages=(5,)).eval()
    for mod in m.modules():  # non-trivial statistics, as after ImageNet training
        if isinstance(mod, FrozenBatchNorm2d):
            n = mod.weight.numel()
            mod.weight.copy_(0.5 + torch.rand(n))
            mod.bias.copy_(torch.randn(n) * 0.1)
            mod.running_mean.copy_(torch.randn(n) * 0.1)
            mod.running_var.copy_(0.5 + torch.rand(n))
    folded = copy.deepcopy(m)
    n_bn = sum(isinstance(mod, FrozenBatchNorm2d) for mod in m.modules())
    assert fold_frozen_batchnorm(folded) == n_bn > 0  # stem, every block, downsample, the DCN stage
    assert not any(isinstance(mod, FrozenBatchNorm2d) for mod in folded.modules())
    x = torch.rand(1, 3, 96, 128) * 255
    with torch.no_grad():
        a, b = m.forward_raw(x), folded.forward_raw(x)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)
    gn = small(backbone_norm="gn")
    assert fold_frozen_batchnorm(gn) == 0
