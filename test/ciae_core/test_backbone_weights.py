"""Backbone weights: safetensors or a tensors-only .pth; a refused file is one line that never
suggests turning the restriction off."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from ciae_core.backbone_weights import BackboneWeightsError, read_backbone_state


class _RunsCodeOnLoad:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_safetensors_and_torchvision_pth_give_the_same_state(tmp_path):
    from safetensors.torch import save_file

    state = {"conv1.weight": torch.randn(4, 3, 3, 3), "bn1.running_var": torch.rand(4)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    for name in ("w.safetensors", "w.pth", "wrapped.pth"):
        got = read_backbone_state(tmp_path / name)
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize("make,expected", [
    (lambda d: torch.save({"w": torch.zeros(1), "x": _RunsCodeOnLoad(d / "ran")}, d / "evil.pth"),
     "refused backbone weights {d}/evil.pth: it refers to the Python object 'posix.mkdir'"),
    (lambda d: (d / "evil.pth").write_bytes(pickle.dumps({"x": _RunsCodeOnLoad(d / "ran")})),
     "refused backbone weights {d}/evil.pth: it is not a torch.save file of tensors"),
    (lambda d: (d / "evil.pth").write_bytes(b"\x00" * 64), "refused backbone weights {d}/evil.pth"),
    (lambda d: torch.save([torch.zeros(1)], d / "evil.pth"), "hold a list, not a state dict of named tensors"),
    (lambda d: (d / "evil.pth").mkdir(), "backbone weights file {d}/evil.pth is a directory"),
])
def test_anything_but_tensors_is_refused_in_one_line_without_running_code(tmp_path, make, expected):
    make(tmp_path)
    with pytest.raises(BackboneWeightsError) as e:
        read_backbone_state(tmp_path / "evil.pth")
    text = str(e.value)
    assert expected.format(d=tmp_path) in text and "\n" not in text, text
    assert "weights_only" not in text and "trust" not in text  # never suggests disabling the restriction
    assert not (tmp_path / "ran").exists()


def test_dev_zero_and_missing_files_are_named_for_what_they_are(tmp_path):
    with pytest.raises(BackboneWeightsError, match="/dev/zero is a character device"):
        read_backbone_state("/dev/zero")
    with pytest.raises(BackboneWeightsError, match="not found"):
        read_backbone_state(tmp_path / "nope.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10" + bytes(20))
    with pytest.raises(BackboneWeightsError, match="not a valid safetensors file"):
        read_backbone_state(bad)
