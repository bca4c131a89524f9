"""Fused step, initial-latent and VQ kernels against their PyTorch references, every backend.

Inputs are fresh random tensors at several shapes, odd sizes included, laid out as in the sampling
loop: x is U[:, :C] of a [B, 2C, h, w] buffer and is updated in place; eps is a slice of a wider
U-Net output. Tolerance: the C++ kernels repeat the reference's float32 operations in order, so
they differ only through log/cos/sqrt (a few ulp of the noise) and, on a GPU, fused multiply-adds.
"""

from __future__ import annotations

import pytest
import torch

from bsldm_fast import kernels
from bsldm_fast.diffusion import noise
from bsldm_fast.diffusion.plan import ddim_entry, ddpm_entry, dpmpp_entry, log_snr
from bsldm_fast.diffusion.samplers import ddim_update, ddpm_update, dpmpp_update
from bsldm_fast.models.vqgan import Codebook

SHAPES = [(1, 4, 8, 8), (3, 4, 5, 7), (2, 3, 17, 1), (2, 4, 33, 31)]
TOL = dict(rtol=1e-5, atol=1e-5)


def _buffers(shape, gen, device):
    """(U, eps): U = [x | c] with x drawn at a scale that makes clipping bite; eps inside a wider tensor."""
    b, c, h, w = shape
    u = (torch.randn(b, 2 * c, h, w, generator=gen) * 2.0).to(device)
    eps = torch.randn(b, 2 * c + 1, h, w, generator=gen).to(device)[:, 1 : c + 1]
    return u, eps


def _random_alpha_bars(gen):
    ab = float(torch.rand((), generator=gen)) * 0.9 + 0.05
    ab_prev = ab + (1.0 - ab) * float(torch.rand((), generator=gen)) * 0.9
    return ab, ab_prev


def _seeds(gen, batch, device):
    return noise.seed_tensor([int(s) for s in torch.randint(0, 2**62, (batch,), generator=gen)], device)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", [1.4, None])
@pytest.mark.parametrize("offset", [0.0, 0.1])
def test_ddpm_step(backend, device, shape, clip, offset, gen):
    u, eps = _buffers(shape, gen, device)
    seeds = _seeds(gen, shape[0], device)
    ab, ab_prev = _random_alpha_bars(gen)
    step = int(torch.randint(0, 1000, (), generator=gen))
    p = ddpm_entry(ab, ab_prev, clip, last=False)
    x = u[:, : shape[1]]
    z = noise.StepNoise(seeds.tolist(), shape[1:], "cpu", offset)(step)
    expected = ddpm_update(x.cpu(), eps.cpu(), p, z)
    before = u.clone()
    kernels.ddpm_step(x, eps, seeds, step, p, x, offset, backend=backend)
    torch.testing.assert_close(x.cpu(), expected, **TOL)
    assert torch.equal(u[:, shape[1]:], before[:, shape[1]:]), "the condition channels changed"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", [1.4, None])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step(backend, device, shape, clip, eta, gen):
    u, eps = _buffers(shape, gen, device)
    seeds = _seeds(gen, shape[0], device)
    ab, ab_prev = _random_alpha_bars(gen)
    step = int(torch.randint(0, 1000, (), generator=gen))
    p = ddim_entry(ab, ab_prev, clip, eta, last=False)
    x = u[:, : shape[1]]
    z = noise.StepNoise(seeds.tolist(), shape[1:], "cpu")(step) if eta else None
    expected = ddim_update(x.cpu(), eps.cpu(), p, z)
    kernels.ddim_step(x, eps, seeds, step, p, x, backend=backend)
    torch.testing.assert_close(x.cpu(), expected, **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", ["first", "second", "last"])
def test_dpmpp_2m_step(backend, device, shape, order, gen):
    u, eps = _buffers(shape, gen, device)
    ab, ab_next = _random_alpha_bars(gen)
    if order == "last":
        ab_next = 1.0
    h = log_snr(ab_next) - log_snr(ab) if ab_next < 1 else None
    h_prev = h * (0.5 + float(torch.rand((), generator=gen))) if order == "second" else None
    prev = torch.randn(shape, generator=gen).to(device) if order == "second" else None
    x = u[:, : shape[1]]
    p = dpmpp_entry(ab, ab_next, 1.4, h_prev)
    expected, x0_ref = dpmpp_update(x.cpu(), eps.cpu(), None if prev is None else prev.cpu(), p)
    # In place, as the loop runs it: x0 overwrites prev_x0, x_next overwrites x.
    x0 = prev if prev is not None else torch.empty(shape, device=device)
    kernels.dpmpp_2m_step(x, eps, prev, p, x, x0, backend=backend)
    torch.testing.assert_close(x.cpu(), expected, **TOL)
    torch.testing.assert_close(x0.cpu(), x0_ref, **TOL)


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 4, 13, 9), (2, 3, 1, 65)])
@pytest.mark.parametrize("num_codes", [256, 37])
def test_vq_quantize(backend, device, shape, num_codes, gen):
    z = torch.randn(shape, generator=gen)
    codes = torch.randn(num_codes, shape[1], generator=gen)
    out = torch.full((shape[0], 2 * shape[1], *shape[2:]), float("nan"), device=device)
    indices = torch.empty((shape[0], *shape[2:]), dtype=torch.int64, device=device)
    kernels.vq_quantize(z.to(device), codes.to(device), out[:, shape[1]:], indices, backend=backend)
    ref_out, ref_idx = kernels.vq_quantize(z, codes, backend="reference")
    indices = indices.cpu()
    # The chosen code is a nearest one (to float32 rounding of the distances) ...
    distances = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, shape[1]).double(), codes.double()) ** 2
    chosen = distances.gather(1, indices.view(-1, 1)).squeeze(1)
    assert bool((chosen <= distances.min(dim=1).values + 1e-4).all())
    # ... and the reference's one wherever the two nearest codes are not a near-tie.
    top2 = distances.topk(2, dim=1, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3
    assert torch.equal(indices.view(-1)[clear], ref_idx.view(-1)[clear])
    assert torch.equal(out[:, shape[1]:].cpu(), codes[indices].permute(0, 3, 1, 2))
    assert torch.isnan(out[:, : shape[1]]).all(), "wrote outside its slice"


def test_vq_ties_go_to_the_lowest_index(backend, device, gen):
    codes = torch.randn(16, 4, generator=gen)
    codes = torch.cat([codes, codes])  # every code twice: exact ties
    z = codes[torch.randint(0, 32, (2 * 5 * 3,), generator=gen)].view(2, 5, 3, 4).permute(0, 3, 1, 2)
    _, indices = kernels.vq_quantize(z.contiguous().to(device), codes.to(device), backend=backend)
    assert int(indices.max()) < 16


def test_reference_vq_is_the_codebook(gen):
    from bsldm_fast.config import preset

    book = Codebook(preset("tiny").vqgan)
    book.embedding.weight.data = torch.randn(book.embedding.weight.shape, generator=gen)
    z = torch.randn(2, book.embedding.weight.shape[1], 6, 5, generator=gen)
    out, indices = kernels.vq_quantize(z, book.embedding.weight, backend="reference")
    assert torch.equal(indices, book.indices(z))
    assert torch.equal(out, book(z))


def test_reference_kernels_are_the_samplers(gen):
    """The flat-parameter reference of a step is samplers.py's step, exactly."""
    shape = (2, 4, 6, 5)
    u, eps = _buffers(shape, gen, "cpu")
    seeds = _seeds(gen, 2, "cpu")
    ab, ab_prev = _random_alpha_bars(gen)
    p = ddpm_entry(ab, ab_prev, 1.5, last=False)
    out = torch.empty(shape)
    kernels.ddpm_step(u[:, :4], eps, seeds, 3, p, out, backend="reference")
    expected = ddpm_update(u[:, :4], eps, p, noise.StepNoise(seeds.tolist(), shape[1:], "cpu")(3))
    assert torch.equal(out, expected)


def test_arguments_are_checked(needs_c):
    x = torch.zeros(2, 4, 3, 3)
    seeds = noise.seed_tensor([1, 2])
    p = kernels.DDPMStep(0.5, 0.8, 1.4, 0.3, 0.6, 0.1)
    with pytest.raises(ValueError, match="float32"):
        kernels.ddpm_step(x, x, seeds, 0, p, x.double(), backend="cpp")
    with pytest.raises(ValueError, match="seeds must have shape"):
        kernels.ddpm_step(x, x, seeds[:1], 0, p, x, backend="cpp")
    with pytest.raises(ValueError, match="contiguous"):
        kernels.ddpm_step(x, x, seeds, 0, p, torch.zeros(2, 3, 3, 4).permute(0, 3, 1, 2), backend="cpp")
    with pytest.raises(ValueError, match="shape"):
        kernels.ddpm_step(x, x, seeds, 0, p, torch.zeros(2, 4, 3, 2), backend="cpp")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.resolve("fast", "cpu")
    with pytest.raises(ValueError, match="unavailable"):
        kernels.resolve("cpp", "meta")


def test_ops_pass_opcheck(needs_c, gen):
    """Schemas, fake (meta) implementations and dispatch registrations are consistent."""
    x = torch.randn(2, 4, 3, 5, generator=gen)
    seeds = noise.seed_tensor([1, 2])
    ops = torch.ops.bsldm_fast
    cases = [
        (ops.philox_normal.default, (seeds, 1, 3, torch.empty(2, 4, 3, 5))),
        (ops.initial_latent.default, (seeds, 0.1, torch.empty(2, 4, 3, 5))),
        (ops.ddpm_step.default, (x, x.clone(), seeds, 2, 0.5, 0.8, 1.4, 0.3, 0.6, 0.1, 0.0, torch.empty_like(x))),
        (ops.ddim_step.default, (x, x.clone(), seeds, 2, 0.5, 0.8, 1.4, 0.3, 0.6, 0.0, 0.0, torch.empty_like(x))),
        (ops.dpmpp_2m_step.default, (x, x.clone(), x.clone(), 0.5, 0.8, 1.4, 0.9, -0.2, 1.5, 0.5, False,
                                     torch.empty_like(x), torch.empty_like(x))),
        (ops.vq_quantize.default, (x, torch.randn(7, 4, generator=gen), torch.empty_like(x),
                                   torch.empty(2, 3, 5, dtype=torch.int64))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_reference_philox_normals_match_the_op(needs_c, gen):
    seeds = _seeds(gen, 3, "cpu")
    out = torch.empty(3, 4, 7, 9)
    kernels.philox_normal(seeds, 1, 11, out, backend="cpp")
    expected = noise.noise(seeds, 1, 11, (4, 7, 9), 0.0)
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6)
