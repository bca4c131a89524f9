"""Kernel tests: every backend against the PyTorch reference on fresh random inputs.

Without a CUDA device the Triton kernels run under the Triton interpreter. TRITON_INTERPRET is read
when a kernel is decorated, so it is set here, before the tests import the kernels (and the kernel
module is reloaded if something imported it earlier). It is set only on machines without CUDA,
where Triton cannot run otherwise, so it never changes how a GPU runs Triton.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from bsldm_fast import _ext, kernels

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    if "bsldm_fast.kernels.triton_kernels" in sys.modules:
        importlib.reload(sys.modules["bsldm_fast.kernels.triton_kernels"])

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""Where the Triton and CUDA kernels run: the GPU when there is one, else the CPU (interpreted)."""

FAST_BACKENDS = ("cpp", "cuda", "triton")


def backend_device(backend: str) -> torch.device:
    return torch.device("cpu") if backend == "cpp" else DEVICE


@pytest.fixture(params=FAST_BACKENDS)
def backend(request) -> str:
    """Each fast backend, skipped with the reason when it cannot run here."""
    name = request.param
    reason = kernels.unavailable(name, backend_device(name))
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return name


@pytest.fixture
def device(backend) -> torch.device:
    """The device the tested backend runs on."""
    return backend_device(backend)


@pytest.fixture
def triton_device() -> torch.device:
    reason = kernels.unavailable("triton", DEVICE)
    if reason is not None:
        pytest.skip(f"triton: {reason}")
    return DEVICE


@pytest.fixture
def needs_c():
    if _ext.C is None:
        pytest.skip(f"bsldm_fast._C is not built: {_ext.load_error}")
