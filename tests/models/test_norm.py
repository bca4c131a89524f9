"""GroupNorm32's half-precision CPU path (the native kernel, no float32 copy of the activation)
against guided-diffusion's reference: upcast to float32, normalise, round back."""

import pytest
import torch
import torch.nn.functional as F

from bsldm_fast.models.unet import GroupNorm32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision_groupnorm_matches_float32_upcast(gen, dtype, param_dtype, channels_last):
    norm = GroupNorm32(32, 96)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=gen))
        norm.bias.copy_(torch.randn(96, generator=gen))
    norm = norm.to(dtype if param_dtype == "same" else torch.float32)
    # An offset and a scale per sample, as activations deep in a network have.
    x = torch.randn(3, 96, 17, 23, generator=gen) * torch.rand(3, 1, 1, 1, generator=gen) * 8
    x = (x + torch.randn(3, 1, 1, 1, generator=gen) * 4).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    expected = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps).to(dtype)
    out = norm(x)

    assert out.dtype == dtype
    # Both accumulate in float32; the outputs may differ by one rounding step of `dtype`.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), expected.float(), rtol=eps, atol=eps)
