"""``ciae-export --convert-backbone``: torchvision .pth -> safetensors once, so training reads no pickle."""

from __future__ import annotations

import os

import torch

from ciae_core.backbone_weights import read_backbone_state
from ciae_core.cli.export import main


def test_convert_backbone_writes_the_same_tensors_as_safetensors(tmp_path, capsys):
    state = {"conv1.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(2, 4)}
    torch.save(state, tmp_path / "r.pth")
    out = tmp_path / "r.safetensors"
    assert main(["--convert-backbone", str(tmp_path / "r.pth"), "--out", str(out)]) == 0
    assert f"wrote {out} (2 tensors" in capsys.readouterr().out
    got = read_backbone_state(out)
    assert all(torch.equal(got[k], state[k]) for k in state) and set(got) == set(state)


def test_convert_backbone_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    torch.save({"w": torch.zeros(1)}, tmp_path / "r.pth")
    assert main(["--convert-backbone", str(tmp_path / "r.pth"), "--out", str(tmp_path / "r.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ciae-export: error: --out must end in .safetensors") and err.count("\n") == 1
    (tmp_path / "evil.pth").write_bytes(b"\x80\x04\x95garbage")
    assert main(["--convert-backbone", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "e.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "refused backbone weights" in err and err.count("\n") == 1 and "weights_only" not in err
    assert not os.path.exists(tmp_path / "e.safetensors") and not os.path.exists(tmp_path / "r.onnx")
