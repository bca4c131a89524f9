"""Fused sampler kernels: one pass per sampler update, noise drawn in-kernel, output written in place.

Each op has four implementations with the same flat signature, picked by `backend`:

- ``"reference"``: plain PyTorch (`reference.py`), the specification;
- ``"cpp"``: C++ with OpenMP (`csrc/sampler_kernels.cpp`), CPU tensors;
- ``"cuda"``: CUDA C++ (`csrc/sampler_kernels.cu`), CUDA tensors, when `_C` was built with CUDA;
- ``"triton"``: Triton (`triton_kernels.py`), CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
- ``"auto"``: Triton on CUDA (else CUDA C++), C++ on the CPU; the reference when nothing is built.

Tensors are float32 [B, C, h, w] whose samples are each contiguous (any batch stride), so a step
reads x_t from U[:, :C] of the U-Net input buffer U = [x_t | c] and writes x_{t-1} back into it.
Noise comes from the one Philox stream of `bsldm_fast.diffusion.noise`, keyed by the int64 `seeds`
tensor (one per sample, on the tensors' device) and the step index.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from .. import _ext
from ..diffusion.plan import DDIMStep, DDPMStep, DPMStep, clip_bound
from . import reference

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")

_OPS = ("philox_normal", "initial_latent", "ddpm_step", "ddim_step", "dpmpp_2m_step", "vq_quantize")


def _has_ops() -> bool:
    """Whether the loaded `_C` registers the fused ops (an extension built before them does not)."""
    return _ext.C is not None and all(hasattr(torch.ops.bsldm_fast, name) for name in _OPS)


if _has_ops():
    # Meta implementations, so that the ops trace under torch.compile and FakeTensor: every op
    # writes into its `out` arguments and returns nothing.
    for _name in _OPS:
        torch.library.register_fake(f"bsldm_fast::{_name}")(lambda *args, **kwargs: None)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable(backend: str, device: torch.device | str) -> str | None:
    """Why `backend` cannot run on `device`, or None when it can."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend in ("cpp", "cuda"):
        if _ext.C is None:
            return f"bsldm_fast._C is not built: {_ext.load_error}"
        if not _has_ops():
            return "bsldm_fast._C predates the fused kernels: rebuild it (scripts/install.sh)"
        if backend == "cpp" and device.type != "cpu":
            return "the C++ kernels run on CPU tensors"
        if backend == "cuda" and not _ext.has_cuda_ops():
            return "bsldm_fast._C was built without CUDA"
        if backend == "cuda" and device.type != "cuda":
            return "the CUDA kernels run on CUDA tensors"
        return None
    if backend == "triton":
        if device.type == "cpu" and not _interpreting():
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device.type}"
        try:
            import triton  # noqa: F401
        except ImportError as error:
            return f"triton is not installed: {error}"
        return None
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")


def resolve(backend: str, device: torch.device | str) -> str:
    """The backend that `backend` means on `device` ('auto': the best available); raises if unavailable."""
    device = torch.device(device)
    if backend == "auto":
        order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpp", "reference")
        return next(b for b in order if unavailable(b, device) is None)
    reason = unavailable(backend, device)
    if reason is not None:
        raise ValueError(f"kernel backend {backend!r} is unavailable on {device}: {reason}")
    return backend


class _TorchOps:
    """torch.ops.bsldm_fast, under the module-like interface of `reference` and `triton_kernels`."""

    def __getattr__(self, name: str):
        return getattr(torch.ops.bsldm_fast, name)


_IMPLS: dict[tuple[str, str, bool], ModuleType | _TorchOps] = {}


def _impl(backend: str, device: torch.device) -> ModuleType | _TorchOps:
    # Cached: a step of a small latent takes microseconds, so the lookup must not cost more.
    key = (backend, device.type, _interpreting())
    impl = _IMPLS.get(key)
    if impl is None:
        name = resolve(backend, device)
        if name == "reference":
            impl = reference
        elif name == "triton":
            from . import triton_kernels

            impl = triton_kernels
        else:
            impl = _TorchOps()
        _IMPLS[key] = impl
    return impl


def _samplewise(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` if each of its samples is one contiguous block (what the kernels read), else a contiguous copy."""
    if t is None:
        return None
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t


def philox_normal(seeds: torch.Tensor, stream: int, step: int, out: torch.Tensor,
                  backend: str = "auto") -> torch.Tensor:
    """Fill out[b] with the standard normals of (seeds[b], stream, step), elements 0 .. out[b].numel() - 1."""
    _impl(backend, out.device).philox_normal(seeds, stream, step, out)
    return out


def initial_latent(seeds: torch.Tensor, offset: float, out: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """Fill out [B, C, h, w] with x_T = z + offset z_c (offset noise; 0 for plain N(0, I))."""
    _impl(backend, out.device).initial_latent(seeds, float(offset), out)
    return out


def ddpm_step(x: torch.Tensor, eps: torch.Tensor, seeds: torch.Tensor, step: int, p: DDPMStep,
              out: torch.Tensor, offset: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Fused DDPM ancestral step with dynamic clipping; `out` may be `x`."""
    return _noisy_step("ddpm_step", x, eps, seeds, step, p, p.x_coeff, out, offset, backend)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, seeds: torch.Tensor, step: int, p: DDIMStep,
              out: torch.Tensor, offset: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Fused DDIM step (eps re-derived from the clipped x0 when clipping); `out` may be `x`."""
    return _noisy_step("ddim_step", x, eps, seeds, step, p, p.eps_coeff, out, offset, backend)


def _noisy_step(op: str, x, eps, seeds, step, p: DDPMStep | DDIMStep, coeff: float, out, offset, backend):
    # DDPM and DDIM share the flat signature; only their second coefficient differs.
    fn = getattr(_impl(backend, out.device), op)
    fn(_samplewise(x), _samplewise(eps), seeds, step, p.sqrt_ab, p.sqrt_1mab, p.clip, p.x0_coeff, coeff,
       p.noise_std, float(offset), out)
    return out


def dpmpp_2m_step(x: torch.Tensor, eps: torch.Tensor, prev_x0: torch.Tensor | None, p: DPMStep,
                  out: torch.Tensor, x0_out: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Fused DPM-Solver++(2M) step; writes x0 to x0_out (may be prev_x0) and x_next to out (may be x)."""
    x, eps, prev_x0 = _samplewise(x), _samplewise(eps), _samplewise(prev_x0)
    _impl(backend, out.device).dpmpp_2m_step(x, eps, prev_x0, p.sqrt_ab, p.sqrt_1mab, p.clip,
                                             p.x_coeff, p.d_coeff, p.w_cur, p.w_prev, bool(p.last),
                                             out, x0_out)
    return out


def vq_quantize(z: torch.Tensor, codes: torch.Tensor, out: torch.Tensor | None = None,
                indices: torch.Tensor | None = None,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest of the codes [K, D] for each vector of z [B, D, h, w]: (quantised z, indices [B, h, w])."""
    codes = codes.detach().float().contiguous()
    if out is None:
        out = torch.empty(z.shape, dtype=torch.float32, device=z.device)
    if indices is None:
        indices = torch.empty((z.shape[0], *z.shape[2:]), dtype=torch.int64, device=z.device)
    _impl(backend, z.device).vq_quantize(_samplewise(z.float()), codes, out, indices)
    return out, indices


__all__ = [
    "BACKENDS", "DDIMStep", "DDPMStep", "DPMStep", "clip_bound", "ddim_step", "ddpm_step",
    "dpmpp_2m_step", "initial_latent", "philox_normal", "resolve", "unavailable", "vq_quantize",
]
