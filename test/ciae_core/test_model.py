"""Tests of ciae_core.model: shapes per level and branch, config, gradients, memory buffer, export."""

from __future__ import annotations

import logging

import pytest
import torch

from ciae_core.model import CIAE, CIAEConfig, ModelConfigError, compute_points, load_backbone_weights
from ciae_core.structures import CategoryInfo

log = logging.getLogger(__name__)

CATS = [CategoryInfo(1, "person", True), CategoryInfo(3, "car", True), CategoryInfo(5, "bus", True),
        CategoryInfo(100, "road", False), CategoryInfo(101, "sky", False)]
SMALL = dict(backbone="resnet18", fpn_channels=32, head_channels=32, tower_depth=2, embed_branch_channels=16,
             embed_dim=8)


def small(**kw):
    torch.manual_seed(0)
    return CIAE(CATS, **{**SMALL, **kw})


def _levels(h, w):
    """FCOS level sizes of P3..P7 for an input padded to 32."""
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    sizes = []
    for s in (8, 16, 32):
        sizes.append((hp // s, wp // s))
    p5 = sizes[-1]
    p6 = ((p5[0] + 1) // 2, (p5[1] + 1) // 2)
    p7 = ((p6[0] + 1) // 2, (p6[1] + 1) // 2)
    return sizes + [p6, p7]


@pytest.mark.parametrize("h,w", [(512, 512), (800, 1216), (250, 333)])
def test_forward_raw_shapes(h, w):
    m = small().eval()
    x = torch.rand(1, 3, h, w) * 255
    with torch.no_grad():
        feats = m._forward_features(x)
        raw = m.forward_raw(x)
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    assert tuple(feats["padded_size"]) == (hp, wp)
    levels = _levels(h, w)
    for lvl, (hh, ww) in enumerate(levels):
        assert feats["cls"][lvl].shape == (1, 3, hh, ww)
        assert feats["reg"][lvl].shape == (1, 4, hh, ww)
        assert feats["ctr"][lvl].shape == (1, 1, hh, ww)
    assert feats["pre"].shape == (1, 8, hp // 4, wp // 4)
    a = sum(hh * ww for hh, ww in levels)
    assert raw["cls_logits"].shape == (1, a, 3)
    assert raw["box_regression"].shape == (1, a, 4) and (raw["box_regression"] > 0).all()
    assert raw["centerness"].shape == (1, a)
    assert raw["points"].shape == (a, 2)
    # embedding_stride 1 (the paper's P = L2norm(up4(P' + P''))): the un-normalised stride-4 map
    assert torch.equal(raw["embedding"], feats["pre"])
    assert raw["memory"].shape == (5, 8)
    # first and last location of P3 and P7
    assert raw["points"][0].tolist() == [4.0, 4.0]
    assert raw["points"][-1].tolist() == [(levels[4][1] - 1) * 128 + 64, (levels[4][0] - 1) * 128 + 64]


def test_fpn_levels_and_embedding_stride_four():
    m = small(embedding_stride=4).eval()
    x = torch.rand(2, 3, 96, 130) * 255
    with torch.no_grad():
        pyramid = m.backbone(m._pad((x - m.pixel_mean) / m.pixel_std))
        raw = m.forward_raw(x)
    assert list(pyramid) == ["p2", "p3", "p4", "p5", "p6", "p7"]
    assert [tuple(t.shape[-2:]) for t in pyramid.values()] == [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]
    assert all(t.shape[1] == 32 for t in pyramid.values())
    assert raw["embedding"].shape == (2, 8, 24, 33)  # ceil(96/4), ceil(130/4)
    assert torch.allclose(raw["embedding"].norm(dim=1), torch.ones(2, 24, 33), atol=1e-5)
    res = m.postprocess(raw, [(96, 130), (90, 100)], score_threshold=0.0, instance_score_threshold=0.0)
    assert res[0]["id_map"].shape == (96, 130) and res[1]["id_map"].shape == (90, 100)


def test_resnet50_fpn_at_512_and_parameter_count():
    m = CIAE(CATS).eval()
    n_params = sum(p.numel() for p in m.parameters())
    n_backbone = sum(p.numel() for p in m.backbone.parameters())
    log.info("CIAE R50-FPN: %.2fM parameters (backbone+FPN %.2fM)", n_params / 1e6, n_backbone / 1e6)
    # torchvision R50 body 23.5M + FPN P2-P7 ~4.5M (incl. P6/P7) + FCOS-style head ~4.8M + embedding branch
    assert 31e6 < n_params < 36e6
    assert 26e6 < n_backbone < 29e6
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable < n_params  # stem + layer1 frozen (trainable_backbone_layers=3)
    with torch.no_grad():
        raw = m.forward_raw(torch.rand(1, 3, 512, 512) * 255)
    assert raw["embedding"].shape == (1, 32, 128, 128)
    assert raw["cls_logits"].shape == (1, 64 * 64 + 32 * 32 + 16 * 16 + 8 * 8 + 4 * 4, 3)


def test_config_round_trip_and_validation():
    cfg = small().config
    assert cfg.num_things == 3 and cfg.num_stuff == 2
    d = cfg.to_dict()
    import json

    assert CIAEConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ModelConfigError, match="thing classes first"):
        CIAEConfig(categories=[CATS[3], CATS[0]])
    with pytest.raises(ModelConfigError, match="unknown backbone"):
        CIAEConfig(categories=CATS, backbone="vgg")
    with pytest.raises(ModelConfigError, match="unknown CIAEConfig field"):
        CIAEConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ModelConfigError, match="no thing class"):
        CIAEConfig(categories=CATS[3:])
    with pytest.raises(ModelConfigError, match=r"fpn_strides must be \(8, 16, 32, 64, 128\)"):
        CIAEConfig(categories=CATS, fpn_strides=(8, 16, 32, 64, 100))
    with pytest.raises(ModelConfigError, match="pixel_std > 0"):
        CIAEConfig(categories=CATS, pixel_std=(0.0, 0.0, 0.0))
    with pytest.raises(ModelConfigError, match="sizes_of_interest must be positive and increasing"):
        CIAEConfig(categories=CATS, sizes_of_interest=(64.0, 32.0, 256.0, 512.0))
    m2 = CIAE.from_config(cfg)
    assert m2.config == cfg


def test_input_normalisation_inside_model():
    m = small().eval()
    x = torch.full((1, 3, 64, 64), 0.0)
    x[:, 0], x[:, 1], x[:, 2] = 123.675, 116.28, 103.53  # ImageNet mean → zero input
    with torch.no_grad():
        a = m.backbone(m._pad((x - m.pixel_mean) / m.pixel_std))
        b = m.backbone(torch.zeros(1, 3, 64, 64))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    with pytest.raises(ModelConfigError, match=r"\(N, 3, H, W\)"):
        m.forward_raw(torch.zeros(1, 1, 64, 64))


def _scene(h=128, w=256):
    """One square object centred on a location of each level P3..P7 with half-size in that level's
    range for ``sizes_of_interest=(4, 8, 16, 24)``, so every level has positives; two stuff halves."""
    specs = [((4, 4), 4, 0), ((120, 8), 8, 1), ((144, 16), 12, 2), ((224, 96), 20, 0), ((64, 64), 32, 1)]
    masks, labels, boxes = [], [], []
    covered = torch.zeros(h, w, dtype=torch.bool)
    for (cx, cy), r, lab in specs:
        m = torch.zeros(h, w, dtype=torch.bool)
        m[cy - r: cy + r, cx - r: cx + r] = True
        assert not (m & covered).any()
        covered |= m
        masks.append(m)
        labels.append(lab)
        boxes.append([cx - r, cy - r, cx + r, cy + r])
    stuff_top = ~covered.clone()
    stuff_top[h // 2:] = False
    stuff_bottom = ~covered & ~stuff_top
    masks += [stuff_top, stuff_bottom]
    labels += [3, 4]
    boxes += [[0, 0, w, h // 2], [0, h // 2, w, h]]
    n = len(labels)
    return {"masks": torch.stack(masks), "labels": torch.tensor(labels), "isthing": torch.tensor(labels) < 3,
            "iscrowd": torch.zeros(n, dtype=torch.bool), "boxes": torch.tensor(boxes, dtype=torch.float32)}


def test_training_forward_gradients_and_memory_buffer():
    m = small(backbone_norm="gn", trainable_backbone_layers=5, sizes_of_interest=(4, 8, 16, 24),
              loss_pixel_samples=2048)
    m.train()
    x = torch.rand(2, 3, 128, 256) * 255
    targets = [_scene(), _scene()]
    assert "memory" in dict(m.named_buffers()) and "memory" not in dict(m.named_parameters())
    assert "memory" in m.state_dict()
    mem0 = m.memory.clone()
    m.set_schedule(0, 10)
    losses = m(x, targets, [(128, 256), (128, 256)])
    assert set(losses) == {"loss_cls", "loss_ctr", "loss_reg", "loss_cae", "loss_iae"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    # the memory moved (Eq. 14) but stays unit-norm; merged thing rows are equal; it has no grad
    assert not torch.equal(m.memory, mem0)
    assert torch.allclose(m.memory.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.equal(m.memory[0], m.memory[2])
    assert m.memory.grad is None and not m.memory.requires_grad
    # at t = T the momentum is 1: the memory no longer changes
    m.set_schedule(10, 10)
    mem1 = m.memory.clone()
    m(x, targets, [(128, 256), (128, 256)])
    assert torch.allclose(m.memory, mem1)


def test_training_needs_targets_and_eval_returns_results():
    m = small()
    m.train()
    with pytest.raises(ModelConfigError, match="needs targets"):
        m(torch.zeros(1, 3, 64, 64))
    m.eval()
    out = m(torch.rand(1, 3, 64, 64) * 255)
    assert isinstance(out, list) and out[0]["id_map"].shape == (64, 64) and out[0]["id_map"].dtype == torch.int32
    with pytest.raises(ModelConfigError, match="unknown postprocess"):
        m.inference(torch.zeros(1, 3, 64, 64), nms=0.5)


def test_backbone_weights_from_local_file(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "r18.safetensors"))
    torch.save(state, tmp_path / "r18.pth")
    for f in ("r18.safetensors", "r18.pth"):
        m = CIAE(CATS, backbone_weights=str(tmp_path / f), **SMALL)
        assert torch.equal(m.backbone.body.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
        assert torch.equal(m.backbone.body.bn1.running_var, ref.bn1.running_var)
    with pytest.raises(ModelConfigError, match="not found"):
        CIAE(CATS, backbone_weights=str(tmp_path / "nope.pth"), **SMALL)
    with pytest.raises(ModelConfigError, match="do not fit"):
        CIAE(CATS, backbone_weights=str(tmp_path / "r18.safetensors"), **{**SMALL, "backbone": "resnet34"})
    # deformable stages take the plain conv weights; their offsets start at zero
    d = small(dcn_stages=(5,))
    load_backbone_weights(d.backbone, str(tmp_path / "r18.safetensors"))
    assert torch.equal(d.backbone.body.layer4[0].conv2.weight, ref.layer4[0].conv2.weight)
    assert not d.backbone.body.layer4[0].conv2.offset.weight.any()


def test_compute_points():
    pts = compute_points([(2, 3), (1, 1)], (8, 16), "cpu")
    assert pts.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8]]


@pytest.mark.parametrize("variant", [{}, {"embedding_from_level": 3, "embedding_c2_skip": True}],
                         ids=["paper", "p3c2"])
def test_onnx_export_matches_torch(tmp_path, variant):
    ort = pytest.importorskip("onnxruntime")
    m = small(**variant).eval()
    names = ("cls_logits", "box_regression", "centerness", "points", "embedding", "memory")

    class Raw(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, images):
            r = self.model.forward_raw(images)
            return tuple(r[k] for k in names)

    path = tmp_path / "m.onnx"
    torch.onnx.export(Raw(m), (torch.rand(1, 3, 64, 96) * 255,), str(path), opset_version=17,
                      input_names=["images"], output_names=list(names),
                      dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 64, 96), (2, 3, 100, 70)):  # second: other size, not a multiple of 32
        x = torch.rand(*shape) * 255
        got = sess.run(None, {"images": x.numpy()})
        with torch.no_grad():
            want = m.forward_raw(x)
        for i, k in enumerate(names):
            assert got[i].shape == tuple(want[k].shape), k
            assert torch.allclose(torch.from_numpy(got[i]), want[k], atol=1e-3, rtol=1e-3), k


def test_training_under_autocast_keeps_losses_and_memory_in_float32():
    m = small(backbone_norm="gn", trainable_backbone_layers=5, sizes_of_interest=(4, 8, 16, 24),
              loss_pixel_samples=1024)
    m.train()
    x = torch.rand(1, 3, 128, 256) * 255
    mem0 = m.memory.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m(x, [_scene()], [(128, 256)])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert m.memory.dtype == torch.float32 and not torch.equal(m.memory, mem0)
    assert torch.allclose(m.memory.norm(dim=1), torch.ones(5), atol=1e-5)


def test_embedding_branch_from_p3_variant():
    """embedding_from_level=3 (our speed variant): no FPN P2, the branch works at stride 8, and
    training, raw outputs and fusion follow that stride."""
    x = torch.rand(2, 3, 96, 130) * 255
    for order in (1, 4):
        m = small(embedding_from_level=3, embedding_stride=order).eval()
        with torch.no_grad():
            pyramid = m.backbone(m._pad((x - m.pixel_mean) / m.pixel_std))
            raw = m.forward_raw(x)
        assert list(pyramid) == ["p3", "p4", "p5", "p6", "p7"]
        assert m.config.branch_stride == 8 and len(m.embedding_branch.scale_heads) == 3
        # paper order: the whole padded map (96x160 / 8); normalised first: cropped to ceil(H/8)
        assert tuple(raw["embedding"].shape[-2:]) == ((12, 20) if order == 1 else (12, 17))
        res = m.postprocess(raw, [(96, 130), (90, 100)], score_threshold=0.0, instance_score_threshold=0.0)
        assert res[0]["id_map"].shape == (96, 130) and res[1]["id_map"].shape == (90, 100)
        assert int((res[0]["id_map"] > 0).sum()) > 0
    m = small(embedding_from_level=3, backbone_norm="gn", trainable_backbone_layers=5,
              sizes_of_interest=(4, 8, 16, 24), loss_pixel_samples=2048).train()
    losses = m(torch.rand(2, 3, 128, 256) * 255, [_scene(), _scene()], [(128, 256), (128, 256)])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert m.embedding_branch.predictor.weight.grad.abs().sum() > 0
    with pytest.raises(ModelConfigError, match="embedding_from_level"):
        small(embedding_from_level=1)


def test_embedding_branch_from_p3_with_c2_skip_variant():
    """embedding_c2_skip (our second speed variant): P3..P5 aggregated at stride 8, up-sampled and
    added to a 1x1 projection of the backbone's C2, so the embedding is at stride 4 again;
    training reaches the skip's weights, and the fusion and ONNX-facing raw outputs follow."""
    x = torch.rand(2, 3, 96, 130) * 255
    m = small(embedding_from_level=3, embedding_c2_skip=True).eval()
    with torch.no_grad():
        feats = m.backbone(m._pad((x - m.pixel_mean) / m.pixel_std))
        raw = m.forward_raw(x)
    assert list(feats) == ["p3", "p4", "p5", "p6", "p7", "c2"]
    assert tuple(feats["c2"].shape[-2:]) == (24, 40) and feats["c2"].shape[1] == m.backbone.c2_channels
    assert m.config.branch_stride == 4 and len(m.embedding_branch.scale_heads) == 3
    assert tuple(raw["embedding"].shape[-2:]) == (24, 40)  # paper order: the padded 96x160 map / 4
    res = m.postprocess(raw, [(96, 130), (90, 100)], score_threshold=0.0, instance_score_threshold=0.0)
    assert res[0]["id_map"].shape == (96, 130) and int((res[0]["id_map"] > 0).sum()) > 0
    m = small(embedding_from_level=3, embedding_c2_skip=True, backbone_norm="gn", trainable_backbone_layers=5,
              sizes_of_interest=(4, 8, 16, 24), loss_pixel_samples=2048).train()
    losses = m(torch.rand(2, 3, 128, 256) * 255, [_scene(), _scene()], [(128, 256), (128, 256)])
    sum(losses.values()).backward()
    assert m.embedding_branch.c2_skip[0].weight.grad.abs().sum() > 0
    with pytest.raises(ModelConfigError, match="embedding_c2_skip needs embedding_from_level: 3"):
        small(embedding_c2_skip=True)
