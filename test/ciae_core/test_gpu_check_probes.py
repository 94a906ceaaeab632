"""ciae_core.gpu_check_probes: the agreement measure, and the probes run on the CPU (their CUDA
parts run in the lead's device run)."""

from __future__ import annotations

import numpy as np
import pytest

from ciae_core.gpu_check_probes import agreement, environment, import_all_modules, matched_agreement


def test_matched_agreement_matches_segments_one_to_one():
    a = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3]])
    assert matched_agreement(a, a) == 1.0
    assert matched_agreement(a, np.where(a > 0, a + 5, 0)) == 1.0  # other ids, same segments
    merged = np.where(a == 3, 2, a)  # segments 2 and 3 merged: only one of them can match the merged one
    assert matched_agreement(a, merged) == pytest.approx(10 / 12)
    voided = np.where(a == 1, 0, a)  # void matches only void: segment 1's 4 pixels (void in b) disagree
    assert matched_agreement(a, voided) == pytest.approx(8 / 12)
    assert matched_agreement(np.zeros((0, 3)), np.zeros((0, 3))) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        matched_agreement(a, a[:2])


def test_environment_and_imports_on_the_cpu():
    env = environment("cpu")
    assert {"python", "torch", "torchvision", "triton", "hidden_packages_importable"} <= set(env)
    assert "gpu" not in env
    assert import_all_modules() == {}


def test_quick_agreement_on_the_cpu():
    doc = agreement("cpu", quick=True)
    (entry,) = doc["entries"]
    assert entry["precision"] == "bf16" and entry["path"] == "eager" and entry["model"] == "small (shipped)"
    assert 0.9 <= entry["agreement"] <= 1.0 and entry["min_agreement"] == entry["agreement"]
