"""The one noise stream: Philox4x32-10 + Box-Muller, the same in PyTorch, C++, CUDA and Triton."""

from __future__ import annotations

import pytest
import torch

from bsldm_fast import _ext, kernels
from bsldm_fast.diffusion import noise


# Known-answer vectors of philox4x32_10 from Random123 (kat_vectors): counter, key -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_reference_philox_matches_random123(counter, key, expected):
    got = noise.philox4x32_10(*counter, *key)
    assert tuple(int(v) for v in got) == expected


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_cpp_philox_matches_random123(needs_c, counter, key, expected):
    assert _ext.C.philox4x32_10(*counter, *key) == expected


def test_cpp_philox_matches_reference_on_random_counters(needs_c, gen):
    words = torch.randint(0, 2**32, (200, 6), generator=gen, dtype=torch.int64)
    expected = torch.stack(noise.philox4x32_10(*words.t()), dim=1)
    got = torch.tensor([_ext.C.philox4x32_10(*map(int, row)) for row in words])
    assert torch.equal(got, expected)


def test_reference_philox_matches_tritons_own(triton_device, gen):
    """Triton ships its own Philox (tl.random.philox); the reference must agree with it bit for bit."""
    import triton
    import triton.language as tl

    @triton.jit
    def philox_kernel(c_ptr, out_ptr, seed_lo, seed_hi, N: tl.constexpr):
        i = tl.arange(0, N)
        c0 = tl.load(c_ptr + i * 4).to(tl.uint32)
        c1 = tl.load(c_ptr + i * 4 + 1).to(tl.uint32)
        c2 = tl.load(c_ptr + i * 4 + 2).to(tl.uint32)
        c3 = tl.load(c_ptr + i * 4 + 3).to(tl.uint32)
        r0, r1, r2, r3 = tl.random.philox_impl(c0, c1, c2, c3, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))
        tl.store(out_ptr + i * 4, r0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + i * 4 + 1, r1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + i * 4 + 2, r2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + i * 4 + 3, r3.to(tl.int64) & 0xFFFFFFFF)

    counters = torch.randint(0, 2**31, (64, 4), generator=gen, dtype=torch.int64)
    key = torch.randint(0, 2**31, (2,), generator=gen).tolist()
    out = torch.empty(64, 4, dtype=torch.int64, device=triton_device)
    philox_kernel[(1,)](counters.to(triton_device), out, key[0], key[1], N=64)
    expected = torch.stack(noise.philox4x32_10(*counters.t(), key[0], key[1]), dim=1)
    assert torch.equal(out.cpu(), expected)


SEEDS = [0, 7, 2**32 + 3, 2**63 + 11, 2**64 - 1]


@pytest.mark.parametrize("shape", [(4, 5, 7), (3, 17, 1), (4, 33, 31), (2000,)])
def test_backends_draw_the_same_normals(backend, device, shape, gen):
    """Same stream everywhere, to float32 rounding of log/cos/sqrt (a few ulp)."""
    seeds = noise.seed_tensor(SEEDS, device)
    step = int(torch.randint(0, 1000, (1,), generator=gen))
    out = torch.empty((len(SEEDS), *shape), device=device)
    kernels.philox_normal(seeds, noise.STEP_STREAM, step, out, backend=backend)
    expected = noise.normal(SEEDS, noise.STEP_STREAM, step, shape)
    torch.testing.assert_close(out.cpu(), expected, rtol=2e-6, atol=2e-6)


def test_initial_latent_on_every_backend(backend, device, gen):
    seeds = [int(s) for s in torch.randint(0, 2**62, (3,), generator=gen)]
    u = torch.full((3, 8, 9, 5), float("nan"), device=device)
    kernels.initial_latent(noise.seed_tensor(seeds, device), 0.1, u[:, :4], backend=backend)
    torch.testing.assert_close(u[:, :4].cpu(), noise.initial_latent(seeds, (4, 9, 5), 0.1),
                               rtol=2e-6, atol=2e-6)
    assert torch.isnan(u[:, 4:]).all(), "wrote outside its slice"


def test_stream_statistics_and_independence():
    x = noise.normal(list(range(8)), noise.STEP_STREAM, 0, (4, 32, 64))
    # Bounds are about 5 standard errors for these 65536 draws.
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.014
    # Kurtosis 3 and the tail mass beyond 2: a normal, not just any unit-variance distribution.
    assert abs((x**4).mean().item() - 3.0) < 0.19
    assert abs((x > 2).float().mean().item() - 0.02275) < 0.003
    # Streams, steps and seeds are uncorrelated.
    others = [noise.normal(list(range(8)), noise.STEP_STREAM, 1, (4, 32, 64)),
              noise.normal(list(range(8)), noise.INIT_STREAM, 0, (4, 32, 64)),
              noise.normal(list(range(100, 108)), noise.STEP_STREAM, 0, (4, 32, 64))]
    for other in others:
        assert abs((x * other).mean().item()) < 0.02


def test_noise_of_a_sample_does_not_depend_on_its_batch():
    alone = noise.normal([123], noise.STEP_STREAM, 5, (4, 6, 6))
    batched = noise.normal([9, 123, 4], noise.STEP_STREAM, 5, (4, 6, 6))
    assert torch.equal(alone[0], batched[1])
