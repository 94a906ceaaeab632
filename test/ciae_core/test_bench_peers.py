"""ciae_core.bench_peers: FCOS's inference split into eager transform / replayable backbone + head /
eager post-processing computes what torchvision's own forward computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ciae_core.bench_peers import EAGER_PEER_TIMING, GraphedFCOS, build_peer, peer_info, peer_runner


def _images(device="cpu"):
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, 96, 128, generator=g).to(device), torch.rand(3, 80, 120, generator=g).to(device)]


def test_split_fcos_equals_the_torchvision_forward_on_the_cpu():
    torch.manual_seed(0)
    model = build_peer("fcos", "mobilenet_v3_large", 128, 1333, 10)
    images = _images()
    with torch.inference_mode():
        ref = model(images)
        got = GraphedFCOS(model)(images)
    assert len(got) == 2
    for a, b in zip(ref, got):
        assert set(a) == set(b) == {"boxes", "scores", "labels"} and a["boxes"].shape == (10, 4)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    g = GraphedFCOS(model.to(memory_format=torch.channels_last), channels_last=True)
    with torch.inference_mode():
        cl = g(images)
    assert all(torch.allclose(a["scores"], b["scores"], atol=1e-4) for a, b in zip(ref, cl))
    assert peer_info(g) == {"timing": g.timing, "cuda_graphs": "off", "compile": False}
    assert "backbone + head eager" in g.timing


def test_peer_runner_takes_a_host_image_and_returns_host_detections():
    torch.manual_seed(0)
    run, model, forward = peer_runner("fcos", "mobilenet_v3_large", 128, torch.device("cpu"), max_size=1333,
                                      detections=5, precision="fp32", channels_last=False, cuda_graphs=True,
                                      compile=False)
    im = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    (out,) = run(im)
    assert out["boxes"].device.type == "cpu" and out["boxes"].shape == (5, 4)
    assert float(out["boxes"][:, 2].max()) <= 120 and float(out["boxes"][:, 3].max()) <= 90  # input pixels
    assert isinstance(forward, GraphedFCOS) and not forward.cuda_graphs  # no graphs on the CPU
    assert peer_info(model) == {"timing": EAGER_PEER_TIMING, "cuda_graphs": "off", "compile": False}


@pytest.mark.cuda
def test_graphed_fcos_replays_what_the_eager_forward_computes():
    torch.manual_seed(0)
    model = build_peer("fcos", "resnet50", 256, 1333, 10).cuda()
    g = GraphedFCOS(model, cuda_graphs=True)
    images = _images("cuda")
    with torch.inference_mode():
        ref = model(images)
        outs = [g(images) for _ in range(3)]  # eager (first sighting), capture, replay
    assert g.cuda_graphs and len(g._graphs) == 1 and "CUDA graph" in g.timing
    for out in outs:
        for a, b in zip(ref, out):
            assert torch.allclose(a["scores"], b["scores"], atol=1e-4)
            assert torch.allclose(a["boxes"], b["boxes"], atol=1e-2)
