"""Issue 20: the README's fastest CPU rows once timed a torch.compile'd bf16 U-Net reported to return
only NaN (inductor, torch 2.13.0+cpu, `small` config, seeded input, t = 500, with and without
freezing). These compile that U-Net, and each op it was suspected of, as the benchmark does, and
compare them with the eager float32 reference under the benchmark's own bound (checks.py), so a
compiled path that goes wrong fails here before it is timed anywhere."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bsldm_fast.config import preset
from bsldm_fast.modeldir import random_model
from bsldm_fast.models.unet import AttentionBlock, GroupNorm32, timestep_embedding
from bsldm_fast.pipeline import Pipeline

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("_bench_checks", BENCH / "checks.py")
checks = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = checks
spec.loader.exec_module(checks)

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="no torch.compile")


def _compiled(module: torch.nn.Module, freezing: bool):
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    compiled = torch.compile(module)

    def call(*args):
        # As the runners' _Compiled: dynamo reads `freezing` while tracing, so it is set around the call.
        with inductor_config.patch(freezing=freezing), torch.inference_mode():
            return compiled(*args)
    return call


def _check(out, ref, precision):
    result = checks.check_output(out, ref, precision)
    assert result.passed, result.summary()
    return result


@pytest.mark.parametrize("freezing", [False, True], ids=["unfrozen", "frozen"])
def test_compiled_bf16_unet_matches_eager_fp32(freezing, gen):
    """The issue's case: the `small` U-Net as the benchmark's torch-compile row runs it (the
    Pipeline's torch-compile runner: bf16, channels-last on the CPU), fresh seeded input, t = 500."""
    model = random_model(preset("small"))
    config = model.config
    u = torch.randn(1, config.unet.in_channels, config.latent_size, config.latent_size, generator=gen)
    t = torch.full((1,), 500, dtype=torch.long)
    with torch.inference_mode():
        ref = Pipeline.create(config, model.vqgan, model.unet, "cpu", "fp32").denoiser(u, t)
    torch._dynamo.reset()
    p = Pipeline.create(config, copy.deepcopy(model.vqgan), copy.deepcopy(model.unet), "cpu", "bf16",
                        backend="torch-compile", freeze=("unet",) if freezing else ())
    with torch.inference_mode():
        out = p.denoiser(u, t)
    assert torch.isfinite(out).all(), f"{int((~torch.isfinite(out)).sum())} of {out.numel()} not finite"
    _check(out, ref, "bf16")


class _Norm(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = GroupNorm32(32, channels)

    def forward(self, x):
        return self.norm(x)


class _Embedding(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.SiLU(), torch.nn.Linear(4 * dim, 4 * dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.dim).to(self.mlp[0].weight.dtype))


def _randomised(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    # zero_module and GroupNorm's unit init would hide errors in the weights' paths.
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + scale)
    return module.eval()


@pytest.mark.parametrize("freezing", [False, True], ids=["unfrozen", "frozen"])
@pytest.mark.parametrize("op", ["groupnorm-native-bf16", "sdpa-attention-bf16", "timestep-embedding"])
def test_each_suspected_op_compiled_in_bf16_matches_eager_fp32(op, freezing, gen):
    """The bisection of the issue's suspects, one op at a time, in the layout the U-Net gives it:
    GroupNorm32's half-precision CPU path (the native kernel on bf16 input, channels-last), the
    attention block (SDPA on bf16), and the timestep embedding with its MLP."""
    if op == "groupnorm-native-bf16":
        module, x = _Norm(128), torch.randn(2, 128, 16, 16, generator=gen) * 3 + 1
    elif op == "sdpa-attention-bf16":
        module, x = AttentionBlock(128, num_head_channels=32), torch.randn(2, 128, 8, 8, generator=gen)
    else:
        module, x = _Embedding(128), torch.tensor([0, 500, 999])
    module = _randomised(module, gen)
    with torch.inference_mode():
        ref = module(x)
    low = copy.deepcopy(module).to(torch.bfloat16)
    if x.is_floating_point():
        low = low.to(memory_format=torch.channels_last)
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out = _compiled(low, freezing)(x)
    with torch.inference_mode():
        eager = low(x)
    _check(eager, ref, "bf16")  # the bound holds for eager bf16: a fair bound for the compiled op
    _check(out, ref, "bf16")


def _cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags and "amx_tile" in flags


def _onednn_version() -> tuple[int, ...] | None:
    import re

    found = re.search(r"MKL-DNN v(\d+)\.(\d+)\.(\d+)", torch.__config__.show())
    return tuple(int(x) for x in found.groups()) if found else None


@pytest.mark.xfail(_cpu_has_amx() and (_onednn_version() or (0,)) < (3, 15),
                   reason="oneDNN issue 5717 (fixed by oneDNN PR 5723, after v3.14): on AMX, the bf16 "
                          "brgemm reads past K when K > 32 and K % 32 != 0 and leaks other rows' "
                          "NaN into clean ones; the prime suspect for issue 20's compiled NaN",
                   strict=False)
def test_bf16_matmul_rows_do_not_leak_into_each_other():
    """A matmul's output row depends on its own input row only. oneDNN's AMX bf16 kernel broke that
    (K-tail overread, oneDNN issue 5717): NaN in other rows, or in uninitialised bytes beside a
    buffer, reached clean rows. Compiled graphs allocate and reuse buffers unlike eager code, which
    would explain a compiled-only NaN on AMX machines only; this machine class never showed it."""
    rng = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    for k in (33, 40, 72, 100):
        a = torch.full((16, 32, k), float("nan"), dtype=torch.bfloat16)
        a[:, 0] = torch.randn(16, k, generator=rng).to(torch.bfloat16)
        b = torch.randn(16, k, 64, generator=rng).to(torch.bfloat16)
        out = torch.bmm(a, b)[:, 0].float()
        ref = torch.bmm(a[:, :1].float(), b.float())[:, 0]
        assert torch.isfinite(out).all(), f"K={k}: NaN leaked into a clean row"
        torch.testing.assert_close(out, ref, atol=0.05 * ref.abs().max().item(), rtol=0.02)
