"""Tests of ciae_core.checkpoint: safetensors round trip, atomic writes, one-line errors."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from ciae_core.checkpoint import (CheckpointError, atomic_write_bytes, check_readable_file, config_from_checkpoint,
                                  load_model, load_tensors, read_metadata, save_model, save_tensors_atomic)
from ciae_core.model import CIAE
from ciae_core.structures import CategoryInfo

CATS = [CategoryInfo(1, "person", True, (220, 20, 60)), CategoryInfo(3, "car", True),
        CategoryInfo(100, "road", False), CategoryInfo(101, "sky", False)]
SMALL = dict(backbone="resnet18", fpn_channels=32, head_channels=32, tower_depth=1, embed_branch_channels=16,
             embed_dim=8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CIAE(CATS, **SMALL)
    with torch.no_grad():
        m.memory.copy_(torch.nn.functional.normalize(torch.randn_like(m.memory), dim=1))
    return m.eval()


def test_round_trip_is_exact(model, tmp_path):
    path = save_model(tmp_path / "m.safetensors", model)
    assert path.exists() and (tmp_path / "m.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.categories == CATS
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "memory" in b
    x = torch.rand(1, 3, 64, 96) * 255
    ra, rb = model.forward_raw(x), loaded.forward_raw(x)
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


def test_metadata_and_sidecar(model, tmp_path):
    path = save_model(tmp_path / "m.safetensors", model)
    meta = read_metadata(path)
    cfg = json.loads(meta["ciae_config"])
    assert cfg["backbone"] == "resnet18" and cfg["embed_dim"] == 8
    assert [c["id"] for c in cfg["categories"]] == [1, 3, 100, 101]
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["ciae_config"] == cfg and side["weights"] == "m.safetensors"
    assert config_from_checkpoint(path) == model.config


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors does not exist") as e:
        load_model(tmp_path / "nope.safetensors")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("make,problem", [
    (lambda d: d, "is a directory"),
    (lambda d: pathlib.Path("/dev/zero"), "is a character device"),
    (lambda d: d / "empty.safetensors", "is empty"),
])
def test_paths_that_are_not_weight_files_are_named_for_what_they_are(tmp_path, make, problem):
    """A directory or /dev/zero given as weights is not reported as missing."""
    (tmp_path / "empty.safetensors").write_bytes(b"")
    path = make(tmp_path)
    for reader in (load_model, read_metadata, load_tensors, check_readable_file):
        with pytest.raises(CheckpointError) as e:
            reader(path)
        assert str(e.value) == f"checkpoint {path} {problem}"


def test_truncated_file(model, tmp_path):
    path = save_model(tmp_path / "m.safetensors", model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt") as e:
        load_model(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    path.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


def test_not_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_model(p)
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    with pytest.raises(CheckpointError, match="dir.safetensors is a directory"):
        load_model(d)


def test_a_torch_pickle_is_refused_without_being_unpickled(model, tmp_path):
    """A torch.save file (a zip with a pickle inside) given as weights: refused as not safetensors;
    nothing from it is unpickled (a pickle that would run code on load proves it)."""
    pt = tmp_path / "model.safetensors"
    torch.save({"state_dict": model.state_dict(), "evil": _RunsOnUnpickle(tmp_path / "ran")}, str(pt))
    with pytest.raises(CheckpointError, match="model.safetensors.*not a safetensors") as e:
        load_model(pt)
    assert "\n" not in str(e.value) and not (tmp_path / "ran").exists()


class _RunsOnUnpickle:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("where", ["after_header", "last_byte"])
def test_truncated_right_after_the_header_or_by_one_byte(model, tmp_path, where):
    path = save_model(tmp_path / "m.safetensors", model)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:header_end] if where == "after_header" else data[:-1])
    with pytest.raises(CheckpointError, match="m.safetensors.*(truncated|corrupt)") as e:
        load_model(path)
    assert "\n" not in str(e.value)


def test_config_missing(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="no 'ciae_config'"):
        load_model(p)
    save_file({"a": torch.zeros(2)}, str(p), metadata={"ciae_config": "{not json"})
    with pytest.raises(CheckpointError, match="invalid model config"):
        load_model(p)
    save_file({"a": torch.zeros(2)}, str(p), metadata={"ciae_config": json.dumps({"categories": [], "x": 1})})
    with pytest.raises(CheckpointError, match="invalid model config"):
        load_model(p)


def test_key_and_shape_mismatch(model, tmp_path):
    path = save_model(tmp_path / "m.safetensors", model)
    tensors, meta = load_tensors(path)
    t2 = dict(tensors)
    t2.pop("memory")
    save_tensors_atomic(tmp_path / "k.safetensors", t2, meta)
    with pytest.raises(CheckpointError, match="missing") as e:
        load_model(tmp_path / "k.safetensors")
    assert "'memory'" in str(e.value)
    t3 = dict(tensors)
    t3["memory"] = torch.zeros(4, 9)
    save_tensors_atomic(tmp_path / "s.safetensors", t3, meta)
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "s.safetensors")


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(p.parent) == ["f.bin"]


def test_save_tensors_atomic_handles_shared_storage_and_rejects_non_tensors(tmp_path):
    base = torch.arange(6.0)
    save_tensors_atomic(tmp_path / "t.safetensors", {"a": base, "b": base[:3]}, {"k": 1})
    t, meta = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(t["b"], torch.arange(3.0)) and meta == {"k": "1"}
    with pytest.raises(CheckpointError, match="not a tensor"):
        save_tensors_atomic(tmp_path / "u.safetensors", {"a": 3})


def test_wrong_suffix(model, tmp_path):
    with pytest.raises(CheckpointError, match=".safetensors"):
        save_model(tmp_path / "m.pt", model)


def test_integer_tensors_for_float_weights_are_refused(model, tmp_path):
    """A checkpoint re-saved with every tensor cast to int64 has the right keys and shapes; it must
    not load silently (it would give garbage) but name the file and the first offending tensor."""
    path = save_model(tmp_path / "m.safetensors", model)
    tensors, meta = load_tensors(path)
    save_tensors_atomic(tmp_path / "int.safetensors", {k: v.long() for k, v in tensors.items()}, meta)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "int.safetensors")
    msg = str(e.value)
    first = next(iter(model.state_dict()))
    assert "int.safetensors" in msg and repr(first) in msg and "int64" in msg and "floating-point" in msg, msg
    assert "\n" not in msg
    one = dict(tensors, memory=tensors["memory"].to(torch.bool))  # a single bad tensor is found too
    save_tensors_atomic(tmp_path / "bool.safetensors", one, meta)
    with pytest.raises(CheckpointError, match="'memory' has dtype bool"):
        load_model(tmp_path / "bool.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads_as_float32(model, tmp_path, dtype):
    """Decision (checkpoint docstring): half-precision weights are accepted and cast to float32."""
    path = save_model(tmp_path / "m.safetensors", model)
    tensors, meta = load_tensors(path)
    save_tensors_atomic(tmp_path / "half.safetensors", {k: v.to(dtype) for k, v in tensors.items()}, meta)
    loaded = load_model(tmp_path / "half.safetensors")
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, tensors[k].to(dtype).float()), k  # the exact cast of the stored values


def test_integer_buffers_keep_their_kind(tmp_path):
    """BatchNorm's num_batches_tracked (int64) accepts another integer dtype, not a float."""
    torch.manual_seed(0)
    bn = CIAE(CATS, **SMALL, backbone_norm="bn").eval()
    path = save_model(tmp_path / "bn.safetensors", bn)
    tensors, meta = load_tensors(path)
    key = next(k for k, v in tensors.items() if not v.is_floating_point())
    save_tensors_atomic(tmp_path / "i32.safetensors", dict(tensors, **{key: tensors[key].int()}), meta)
    assert load_model(tmp_path / "i32.safetensors").state_dict()[key].dtype == torch.int64
    save_tensors_atomic(tmp_path / "f.safetensors", dict(tensors, **{key: tensors[key].float()}), meta)
    with pytest.raises(CheckpointError, match=f"f.safetensors: tensor '{key}' has dtype float32, model expects an "
                                              "integer tensor"):
        load_model(tmp_path / "f.safetensors")
