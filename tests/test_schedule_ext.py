"""bsldm_fast._C.schedule_tables is a bit-exact twin of the PyTorch/NumPy reference."""

from __future__ import annotations

import pytest
import torch

from bsldm_fast import _ext
from bsldm_fast.diffusion.schedule import reference_tables

if _ext.C is None:
    pytest.skip(f"bsldm_fast._C is not built: {_ext.load_error}", allow_module_level=True)

C = _ext.C

TIMESTEPS = [1, 2, 10, 769, 1000, 4000]


def _check_same(actual: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, ...]):
    assert len(actual) == 2
    for got, want in zip(actual, expected):
        assert got.dtype == torch.float64
        assert got.device.type == "cpu"
        assert got.shape == want.shape
        # Exact, not allclose: any difference means the two computations diverged.
        mismatch = (got != want).nonzero().flatten().tolist()
        assert torch.equal(got, want), f"{len(mismatch)} entries differ, first at {mismatch[:5]}"


@pytest.mark.parametrize("num_timesteps", TIMESTEPS)
def test_cosine_matches_reference(num_timesteps):
    _check_same(
        C.schedule_tables(num_timesteps, "squaredcos_cap_v2"),
        reference_tables(num_timesteps, "squaredcos_cap_v2"),
    )


@pytest.mark.parametrize("num_timesteps", TIMESTEPS)
@pytest.mark.parametrize("beta_start, beta_end", [(0.0008, 0.02), (1e-4, 0.02), (0.0015, 0.0195)])
def test_linear_matches_reference(num_timesteps, beta_start, beta_end):
    _check_same(
        C.schedule_tables(num_timesteps, "linear", beta_start, beta_end),
        reference_tables(num_timesteps, "linear", beta_start, beta_end),
    )


def test_defaults_match_reference():
    _check_same(C.schedule_tables(1000, "linear"), reference_tables(1000, "linear"))
    _check_same(
        C.schedule_tables(num_timesteps=50, beta_schedule="linear", beta_start=0.001, beta_end=0.01),
        reference_tables(50, "linear", 0.001, 0.01),
    )


def test_tables_are_fresh_tensors():
    betas, _ = C.schedule_tables(10, "squaredcos_cap_v2")
    betas.zero_()
    again, _ = C.schedule_tables(10, "squaredcos_cap_v2")
    assert bool((again > 0).all())


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, "squaredcos_cap_v2"), "num_timesteps"),
        ((-1, "linear"), "num_timesteps"),
        ((10, "cosine"), "unknown beta_schedule 'cosine'"),
        ((10, "linear", 0.0, 0.02), "beta_start"),
        ((10, "linear", 0.02, 0.01), "beta_start"),
        ((10, "linear", 0.01, 1.0), "beta_end"),
        ((10, "linear", float("nan"), 0.02), "beta_start"),
    ],
)
def test_invalid_input_raises_value_error(args, message):
    with pytest.raises(ValueError, match=message):
        C.schedule_tables(*args)


def test_with_cuda_is_bool():
    assert isinstance(C.with_cuda(), bool)
    assert _ext.has_cuda_ops() == C.with_cuda()
