"""Setup of the ciae_core tests: Triton's interpreter on a machine without CUDA.

:mod:`ciae_core.fusion_triton`'s kernels run on CPU tensors only in Triton's interpreter, and
Triton fixes that mode when it is first imported (torchvision imports it), so it is chosen here,
before the test modules of this directory are imported. With a GPU nothing changes: the kernels
are compiled and the interpreter tests skip.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
